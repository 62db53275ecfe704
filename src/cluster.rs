//! Where the SQL stages run: in this process (`[engine] kind = "local"`,
//! the default) or on an Apache DataFusion Ballista cluster (`kind =
//! "ballista"`, cargo feature `ballista`).
//!
//! On a cluster every DataFusion plan of the core build, the data-quality
//! checks and the measures is planned by the scheduler and run by its
//! executors; the driver (`ward run`) keeps what is not SQL: CSV and FHIR
//! mapping, the linkage model's fit and clustering, report rendering and
//! de-identification. Tables the driver holds in memory (the linkage
//! records to block, the measurement period, care-gap marts) are written
//! as Parquet to a scratch directory the executors also see (`[engine]
//! scratch`, default `<warehouse>/.tmp/engine`) instead of being shipped
//! inside plans.
//!
//! The engine a process uses is chosen once, by [`activate`] (the binary
//! does it for `ward run`, `ward link` and `ward measure`); research
//! queries (`ward query`, `ward serve`) always run in process.
//!
//! `ward scheduler` and `ward executor` ([`run_scheduler`],
//! [`run_executor`]) are the cluster's two roles, built on the
//! ballista-scheduler and ballista-executor libraries with Ward's SQL
//! functions ([`crate::sqlfn`]) registered, so one program is installed
//! everywhere.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Result, WardError};

/// Where SQL stages run (`[engine]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Engine {
    /// In this process (the default).
    #[default]
    Local,
    /// On the Ballista cluster whose scheduler is at `scheduler`.
    Ballista(ClusterConfig),
}

/// `[engine] kind = "ballista"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The scheduler's gRPC address, `df://host:port` (`scheduler`).
    pub scheduler: String,
    /// Partitions of each shuffle (`partitions`, default 16): at least the
    /// cluster's task slots, so that every executor core has work.
    pub partitions: usize,
    /// A directory every executor can read at the same path (`scratch`,
    /// default `<warehouse>/.tmp/engine`): tables the driver holds in
    /// memory are written there while a stage uses them.
    pub scratch: PathBuf,
}

impl ClusterConfig {
    /// Checks `df://host[:port]` (port 50050 when left out) and returns
    /// the scheduler's `http://host:port`.
    pub fn scheduler_url(scheduler: &str) -> std::result::Result<String, String> {
        let rest = scheduler.strip_prefix("df://").ok_or_else(|| {
            format!("`{scheduler}` is not a scheduler address such as df://host:50050")
        })?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("`{port}` in `{scheduler}` is not a port"))?;
                (host, port)
            }
            None => (rest, 50050),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("`{scheduler}` names no host (df://host:50050)"));
        }
        Ok(format!("http://{host}:{port}"))
    }
}

/// The engine of this process and, on a cluster, the scratch directory of
/// the stages now running.
static ACTIVE: Mutex<Option<Active>> = Mutex::new(None);

struct Active {
    config: ClusterConfig,
    /// `<scratch>/<pid>-<n>`: this activation's in-memory tables.
    dir: PathBuf,
    /// Files written so far (numbering their names).
    written: usize,
}

/// The engine [`activate`]d until it is dropped; dropping it removes the
/// scratch files of its stages.
#[must_use = "the engine is active while this guard lives"]
pub struct EngineGuard {
    dir: Option<PathBuf>,
}

impl Drop for EngineGuard {
    fn drop(&mut self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        *active = None;
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the engine's scratch directory");
        }
    }
}

/// Makes `engine` the engine of this process's SQL stages until the guard
/// is dropped. A cluster needs a ward built with the `ballista` feature.
pub fn activate(engine: &Engine) -> Result<EngineGuard> {
    let Engine::Ballista(config) = engine else {
        return Ok(EngineGuard { dir: None });
    };
    if !cfg!(feature = "ballista") {
        return Err(WardError::Usage {
            message: "[engine] kind = \"ballista\" needs a ward built with the `ballista` feature \
                      (cargo build --release --features ballista)"
                .into(),
        });
    }
    reachable(&config.scheduler)?;
    let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    if active.is_some() {
        return Err(WardError::Usage {
            message: "an engine is already active in this process".into(),
        });
    }
    static ACTIVATIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = ACTIVATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = config.scratch.join(format!("{}-{n}", std::process::id()));
    *active = Some(Active {
        config: config.clone(),
        dir: dir.clone(),
        written: 0,
    });
    Ok(EngineGuard { dir: Some(dir) })
}

/// Fails unless the scheduler at `scheduler` (`df://host:port`) accepts a
/// connection within 10 s: a night whose cluster is down stops before it
/// reads anything, saying so.
fn reachable(scheduler: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    let url = ClusterConfig::scheduler_url(scheduler).map_err(|message| WardError::Usage {
        message: format!("[engine] scheduler: {message}"),
    })?;
    let host_port = url.trim_start_matches("http://");
    let what = "cannot reach the Ballista scheduler (is `ward scheduler` running?) at";
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the name resolves to no address",
    );
    for addr in host_port
        .to_socket_addrs()
        .map_err(|e| WardError::io(what, host_port, e))?
    {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(WardError::io(what, host_port, last))
}

/// The cluster SQL stages run on now, if any.
pub(crate) fn active_cluster() -> Option<ClusterConfig> {
    let active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    active.as_ref().map(|a| a.config.clone())
}

/// A new file in the active cluster's scratch directory for an in-memory
/// table (`None` when SQL runs locally).
pub(crate) fn scratch_file(name: &str) -> Result<Option<PathBuf>> {
    let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(active) = active.as_mut() else {
        return Ok(None);
    };
    std::fs::create_dir_all(&active.dir)
        .map_err(|e| WardError::io("cannot create", &active.dir, e))?;
    active.written += 1;
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Ok(Some(
        active
            .dir
            .join(format!("{safe}-{:05}.parquet", active.written)),
    ))
}

/// Writes `batches` to the Parquet file `path` (schema `schema`), for a
/// cluster's executors to read.
pub(crate) fn write_scratch(path: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> Result<()> {
    use datafusion::parquet::arrow::ArrowWriter;
    let file = std::fs::File::create(path).map_err(|e| WardError::io("cannot create", path, e))?;
    let err = |e: datafusion::parquet::errors::ParquetError| {
        WardError::data("writing a table for the cluster", path, e)
    };
    let mut writer = ArrowWriter::try_new(file, schema, None).map_err(err)?;
    for batch in batches {
        writer.write(batch).map_err(err)?;
    }
    writer.close().map_err(err)?;
    Ok(())
}

/// A session on the active cluster, if there is one: the scheduler plans
/// and the executors run every query; Ward's functions are registered.
pub(crate) fn remote_session(config: &SessionConfig) -> Option<Result<SessionContext>> {
    let cluster = active_cluster()?;
    #[cfg(feature = "ballista")]
    {
        Some(ballista_engine::session(config.clone(), &cluster))
    }
    #[cfg(not(feature = "ballista"))]
    {
        // (activate refuses a cluster without the feature.)
        let _ = (config, cluster);
        Some(Err(WardError::Usage {
            message: "this ward was built without the `ballista` feature".into(),
        }))
    }
}

#[cfg(feature = "ballista")]
pub use ballista_engine::{ExecutorOptions, run_executor, run_scheduler};

#[cfg(feature = "ballista")]
mod ballista_engine {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;

    use ballista::extension::{SessionConfigExt, SessionStateExt};
    use ballista_core::registry::BallistaFunctionRegistry;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::execution::registry::FunctionRegistry;
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::ClusterConfig;
    use super::no_metrics::WithoutOperatorMetrics;
    use crate::error::{Result, WardError};
    use crate::sqlfn::functions;

    fn engine_err(what: &'static str, e: impl Into<crate::error::BoxError>) -> WardError {
        WardError::data(what, PathBuf::new(), e)
    }

    /// The runtime a role serves on (Ballista's own binaries give its
    /// threads 32 MiB of stack: deep plans are planned recursively).
    fn runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .thread_stack_size(32 << 20)
            .enable_all()
            .build()
            .map_err(|e| WardError::io("cannot start the runtime", "tokio", e))
    }

    /// A client session of `cluster`'s scheduler.
    pub(super) fn session(
        config: SessionConfig,
        cluster: &ClusterConfig,
    ) -> Result<SessionContext> {
        let url = ClusterConfig::scheduler_url(&cluster.scheduler).map_err(|message| {
            WardError::Usage {
                message: format!("[engine] scheduler: {message}"),
            }
        })?;
        // Ballista 55's adaptive planner turned one data-quality query of
        // the sample into 36,345 stages; the static planner runs it as
        // DataFusion plans it.
        let config = config
            .with_target_partitions(cluster.partitions)
            .upgrade_for_ballista()
            .with_ballista_adaptive_query_planner(false);
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .build()
            .upgrade_for_ballista(url)
            .map_err(|e| engine_err("connecting to the Ballista scheduler", e))?;
        let ctx = SessionContext::new_with_state(state);
        ctx.add_optimizer_rule(Arc::new(crate::optimizer::InlineConstantRow));
        for f in functions() {
            ctx.register_udf(f);
        }
        Ok(ctx)
    }

    /// `ward scheduler`: a Ballista scheduler on `listen` whose sessions
    /// know Ward's functions; serves until the process ends. Its REST API
    /// (`/api/executors`, `/api/jobs`) shows the cluster's state.
    ///
    /// An executor that has not been heard of for `executor_timeout`
    /// seconds is declared dead: its tasks run again on the others.
    pub fn run_scheduler(listen: SocketAddr, executor_timeout: u64) -> Result<()> {
        use ballista_scheduler::cluster::BallistaCluster;
        use ballista_scheduler::config::SchedulerConfig;
        let defaults = SchedulerConfig::default();
        // Dead executors are looked for this often (Ballista: 15 s).
        let expire = defaults
            .expire_dead_executor_interval_seconds
            .min(executor_timeout.saturating_sub(1).max(1));
        let config = SchedulerConfig {
            bind_host: listen.ip().to_string(),
            bind_port: listen.port(),
            executor_timeout_seconds: executor_timeout,
            expire_dead_executor_interval_seconds: expire,
            no_executors_grace_period_seconds: executor_timeout,
            ..defaults
        }
        .with_override_session_builder(Arc::new(|config: SessionConfig| {
            let state = ballista_core::utils::default_session_builder(config)?;
            let mut state = SessionStateBuilder::new_from_existing(state)
                .with_optimizer_rule(Arc::new(crate::optimizer::InlineConstantRow))
                .build();
            for f in functions() {
                state.register_udf(Arc::new(f))?;
            }
            Ok(state)
        }));
        runtime()?.block_on(async move {
            let cluster = BallistaCluster::new_from_config(&config)
                .await
                .map_err(|e| engine_err("starting the scheduler", e))?;
            tracing::info!(%listen, "Ballista scheduler listening");
            ballista_scheduler::scheduler_process::start_server(cluster, listen, Arc::new(config))
                .await
                .map_err(|e| engine_err("running the scheduler", e))
        })
    }

    /// `ward executor`.
    #[derive(Debug, Clone)]
    pub struct ExecutorOptions {
        /// The scheduler, `host:port`.
        pub scheduler: String,
        /// The address to listen on for the scheduler's and other
        /// executors' fetches of shuffle data (Arrow Flight).
        pub listen: SocketAddr,
        /// The host others reach this executor at (default: `listen`'s).
        pub external_host: Option<String>,
        /// Port of the executor's gRPC service (task launches).
        pub grpc_port: u16,
        /// Concurrent tasks (default: the machine's cores).
        pub slots: Option<usize>,
        /// Where shuffle files go (default: a temporary directory,
        /// removed when the executor stops).
        pub work_dir: Option<PathBuf>,
        /// Seconds between heartbeats to the scheduler.
        pub heartbeat: u64,
        /// Memory the executor's queries may hold before they spill or
        /// fail; `None`: no limit, as Ward's local engine (DataFusion 55's
        /// spilling repartition can panic under a limit, see
        /// [`crate::engine`]).
        pub memory_limit: Option<u64>,
    }

    /// `ward executor`: a Ballista executor with Ward's functions that
    /// registers with the scheduler and runs tasks until the process ends.
    pub fn run_executor(opts: &ExecutorOptions) -> Result<()> {
        use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
        let (host, port) = opts
            .scheduler
            .rsplit_once(':')
            .ok_or_else(|| WardError::Usage {
                message: format!("--scheduler `{}` is not HOST:PORT", opts.scheduler),
            })?;
        let port: u16 = port.parse().map_err(|_| WardError::Usage {
            message: format!("--scheduler `{}` is not HOST:PORT", opts.scheduler),
        })?;
        // DataFusion's functions (nested ones, such as make_array, are not
        // in Ballista's default registry) and Ward's.
        let mut state = SessionStateBuilder::new().with_default_features().build();
        for f in functions() {
            state
                .register_udf(Arc::new(f))
                .map_err(|e| engine_err("starting the executor", e))?;
        }
        let registry = BallistaFunctionRegistry::from(&state);
        let defaults = ExecutorProcessConfig::default();
        let temp = match &opts.work_dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("ward-executor-")
                    .tempdir()
                    .map_err(|e| WardError::io("cannot create", std::env::temp_dir(), e))?,
            ),
        };
        let work_dir = opts
            .work_dir
            .as_deref()
            .or(temp.as_ref().map(|t| t.path()))
            .map(|d| d.display().to_string());
        let config = ExecutorProcessConfig {
            bind_host: opts.listen.ip().to_string(),
            port: opts.listen.port(),
            external_host: opts.external_host.clone(),
            grpc_port: opts.grpc_port,
            scheduler_host: host.to_string(),
            scheduler_port: port,
            vcores: opts.slots.unwrap_or(defaults.vcores),
            work_dir,
            // 0: no pool, the executor never spills.
            memory_pool_size: Some(opts.memory_limit.unwrap_or(0)),
            print_thread_info: false,
            executor_heartbeat_interval_seconds: opts.heartbeat,
            override_function_registry: Some(Arc::new(registry)),
            ..defaults
        };
        let outcome = runtime()?.block_on(async move {
            // (Without the pool of shuffle-fetch connections Ballista's own
            // binary keeps: its type is private to the executor crate.)
            let engine = ballista_executor::execution_engine::DefaultExecutionEngine::new();
            let config = ExecutorProcessConfig {
                override_execution_engine: Some(Arc::new(WithoutOperatorMetrics(engine))),
                ..config
            };
            start_executor_process(Arc::new(config))
                .await
                .map_err(|e| engine_err("running the executor", e))
        });
        drop(temp);
        outcome
    }
}

#[cfg(feature = "ballista")]
mod no_metrics {
    use std::sync::Arc;

    use ballista_core::JobId;
    use ballista_core::serde::protobuf::{
        RuntimeStatsReport, ShuffleWritePartition, TaskColumnStats, WindowStateReport,
    };
    use ballista_executor::execution_engine::{ExecutionEngine, QueryStageExecutor};
    use datafusion::error::Result;
    use datafusion::execution::TaskContext;
    use datafusion::physical_plan::ExecutionPlan;
    use datafusion::physical_plan::metrics::MetricsSet;
    use datafusion::prelude::SessionConfig;

    /// Ballista's execution engine, reporting no per-operator metrics.
    ///
    /// Ballista 55's scheduler rejects a task's status when its metrics
    /// have another number of operators than the first task of the stage
    /// had (it happened on a union of shuffle readers in a measure plan),
    /// and the task then never completes: the night hangs. Without
    /// operator metrics the scheduler takes every status; jobs, stages and
    /// tasks are still reported (`/api/jobs`), only per-operator figures
    /// are not.
    pub(crate) struct WithoutOperatorMetrics<E>(pub(crate) E);

    impl<E: ExecutionEngine> ExecutionEngine for WithoutOperatorMetrics<E> {
        fn create_query_stage_exec(
            &self,
            job_id: JobId,
            stage_id: usize,
            task_id: usize,
            global_output_partition_ids: Vec<usize>,
            plan: Arc<dyn ExecutionPlan>,
            work_dir: &str,
            config: &SessionConfig,
        ) -> Result<Arc<dyn QueryStageExecutor>> {
            let inner = self.0.create_query_stage_exec(
                job_id,
                stage_id,
                task_id,
                global_output_partition_ids,
                plan,
                work_dir,
                config,
            )?;
            Ok(Arc::new(Stage(inner)))
        }
    }

    #[derive(Debug)]
    struct Stage(Arc<dyn QueryStageExecutor>);

    impl std::fmt::Display for Stage {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.fmt(f)
        }
    }

    #[async_trait::async_trait]
    impl QueryStageExecutor for Stage {
        async fn execute_query_stage(
            &self,
            task_id: usize,
            context: Arc<TaskContext>,
        ) -> Result<Vec<ShuffleWritePartition>> {
            self.0.execute_query_stage(task_id, context).await
        }

        fn collect_plan_metrics(&self) -> Vec<MetricsSet> {
            Vec::new()
        }

        fn collect_runtime_stats_reports(&self) -> Vec<RuntimeStatsReport> {
            self.0.collect_runtime_stats_reports()
        }

        fn collect_window_state_reports(&self) -> Result<Vec<WindowStateReport>> {
            self.0.collect_window_state_reports()
        }

        fn collect_column_stats(&self) -> Vec<TaskColumnStats> {
            self.0.collect_column_stats()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_addresses() {
        assert_eq!(
            ClusterConfig::scheduler_url("df://sched.example:50051").unwrap(),
            "http://sched.example:50051"
        );
        assert_eq!(
            ClusterConfig::scheduler_url("df://10.0.0.5").unwrap(),
            "http://10.0.0.5:50050"
        );
        for bad in ["http://x:1", "df://", "df://x:port", "df://x/y:1"] {
            assert!(ClusterConfig::scheduler_url(bad).is_err(), "{bad}");
        }
    }

    #[cfg(not(feature = "ballista"))]
    #[test]
    fn a_cluster_needs_the_feature() {
        let engine = Engine::Ballista(ClusterConfig {
            scheduler: "df://s:1".into(),
            partitions: 4,
            scratch: PathBuf::from("/nonexistent"),
        });
        let e = activate(&engine).err().expect("refused").to_string();
        assert!(e.contains("--features ballista"), "{e}");
        assert!(active_cluster().is_none());
    }

    #[test]
    fn local_engine_has_no_scratch() {
        let guard = activate(&Engine::Local).unwrap();
        assert!(scratch_file("t").unwrap().is_none());
        assert!(remote_session(&SessionConfig::new()).is_none());
        drop(guard);
    }
}
