//! `ward serve`: an Arrow Flight SQL endpoint over the research tables of
//! the current published run, for researchers' own tools (ADBC drivers for
//! Python, R and Go; the Flight SQL JDBC driver for DBeaver and BI tools).
//!
//! Every statement passes the same two barriers as `ward query` (Ward's
//! allow-list parser, then DataFusion's [`SQLOptions`] in a session holding
//! only the research tables), with the same refusal messages, the
//! `[serve] min_cell` aid and a per-query memory and time limit; a refused
//! or failed query is that request's error status, never the server's end.
//!
//! - **Authentication**: TLS (`[serve] tls_cert`, `tls_key`; plaintext only
//!   with `insecure = true`), and a bearer token per researcher
//!   ([`tokens`]) on every call, or HTTP Basic (name, token as password)
//!   in a handshake. A token may be limited to some tables.
//! - **Audit**: one JSON line per request ([`audit`]).
//! - **Publication**: a statement is planned on the run current at its
//!   `GetFlightInfo`; its ticket names that run, and the query holds a
//!   [`ReaderLease`](crate::runs::ReaderLease) on it while it reads, so a
//!   night that publishes (and prunes) meanwhile neither changes nor
//!   removes what it reads. The next statement reads the new run.
//! - **Concurrency**: at most `max_concurrent` queries run; up to
//!   `max_queued` more wait; beyond that a call is refused at once with
//!   `RESOURCE_EXHAUSTED` ("server busy").
//!
//! [`SQLOptions`]: datafusion::execution::context::SQLOptions

pub mod audit;
mod service;
pub mod tokens;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::flight_service_server::FlightServiceServer;
use base64::Engine as _;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::error::{Result, WardError};
use audit::{AuditLog, AuditRecord, Outcome};
use service::{Caller, WardFlightSql};
use tokens::TokenStore;

/// The `[serve]` section of `ward.toml`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (`listen`, default `127.0.0.1:32010`).
    pub listen: SocketAddr,
    /// Certificate chain and private key, PEM (`tls_cert`, `tls_key`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Plaintext without TLS is allowed (`insecure`, for local tests).
    pub insecure: bool,
    /// The token store (`tokens`, default `<warehouse>/serve/tokens.json`).
    pub tokens: PathBuf,
    /// The audit log (`audit_log`, default `<warehouse>/serve/audit.jsonl`).
    pub audit_log: PathBuf,
    /// Queries running at once (`max_concurrent`, default 4).
    pub max_concurrent: usize,
    /// Queries waiting for a slot before calls are refused as busy
    /// (`max_queued`, default 16).
    pub max_queued: usize,
    /// Memory of one query, operators and the batches in flight
    /// (`memory_limit`, default: half of physical memory shared by
    /// `max_concurrent`).
    pub memory_limit: usize,
    /// Time one query may take, streaming included (`timeout`, default 10m).
    pub timeout: Duration,
    /// Counts 1..min_cell-1 become NULL (`min_cell`, as `ward query
    /// --min-cell`); `None`: off.
    pub min_cell: Option<u64>,
}

impl ServeConfig {
    /// The defaults, for a warehouse at `warehouse`.
    pub fn defaults(warehouse: &Path) -> ServeConfig {
        const MAX_CONCURRENT: usize = 4;
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 32010)),
            tls: None,
            insecure: false,
            tokens: warehouse.join("serve").join("tokens.json"),
            audit_log: warehouse.join("serve").join("audit.jsonl"),
            max_concurrent: MAX_CONCURRENT,
            max_queued: 16,
            memory_limit: crate::query::default_memory_limit() / MAX_CONCURRENT,
            timeout: crate::query::DEFAULT_TIMEOUT,
            min_cell: None,
        }
    }
}

/// Checks the credentials of every call: a bearer token, or HTTP Basic
/// with the researcher's name and token; failures are audited.
#[derive(Clone)]
struct Authenticate {
    tokens: Arc<TokenStore>,
    audit: Arc<AuditLog>,
}

impl Authenticate {
    fn check(&self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let presented = if let Some(token) = header.strip_prefix("Bearer ") {
            Some((None, token.trim().to_string()))
        } else if let Some(basic) = header.strip_prefix("Basic ") {
            base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    let (name, token) = s.split_once(':')?;
                    Some((Some(name.to_string()), token.to_string()))
                })
        } else {
            None
        };
        let verified = match &presented {
            Some((name, token)) => match self.tokens.verify(token) {
                Ok(Some(r)) if name.as_ref().is_none_or(|n| *n == r.name) => Ok(Some(r)),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            },
            None => Ok(None),
        };
        match verified {
            Ok(Some(researcher)) => {
                let token = presented.map(|(_, t)| t).unwrap_or_default();
                request
                    .extensions_mut()
                    .insert(Caller { researcher, token });
                Ok(request)
            }
            other => {
                let mut record = AuditRecord::start(
                    "authenticate",
                    None,
                    request.remote_addr().map(|a| a.to_string()),
                );
                record.outcome = Outcome::Unauthenticated;
                let status = match other {
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the token store");
                        Status::unavailable("the token store cannot be read")
                    }
                    _ if header.is_empty() => Status::unauthenticated(
                        "a token is required: send `authorization: Bearer <token>`",
                    ),
                    _ => Status::unauthenticated("invalid or revoked token"),
                };
                record.error = Some(status.message().to_string());
                self.audit.write(&record);
                Err(status)
            }
        }
    }
}

/// Serves Flight SQL over `warehouse`'s research tables with `config`
/// until the process is interrupted (Ctrl-C, SIGTERM); `listening` is told
/// the bound address once the server accepts connections (port 0 in
/// `config.listen` picks a free port).
pub fn serve(
    warehouse: &Path,
    config: &ServeConfig,
    listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    if config.tls.is_none() && !config.insecure {
        return Err(WardError::Usage {
            message: "ward serve needs TLS: set [serve] tls_cert and tls_key in the config \
                      (or insecure = true, for a local test only)"
                .into(),
        });
    }
    let tls = match &config.tls {
        Some((cert, key)) => {
            let read =
                |p: &PathBuf| std::fs::read(p).map_err(|e| WardError::io("cannot read", p, e));
            Some(ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?)))
        }
        None => None,
    };
    let audit = Arc::new(AuditLog::open(&config.audit_log)?);
    let tokens = Arc::new(TokenStore::new(&config.tokens));
    // A store that cannot be read is a start-up error, not a refusal of
    // every call.
    tokens.list()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| WardError::io("cannot start the server runtime", "tokio", e))?;
    runtime.block_on(async {
        let incoming = tonic::transport::server::TcpIncoming::bind(config.listen)
            .map_err(|e| WardError::io("cannot listen on", config.listen.to_string(), e))?
            .with_nodelay(Some(true));
        let bound = incoming
            .local_addr()
            .map_err(|e| WardError::io("cannot listen on", config.listen.to_string(), e))?;
        let auth = Authenticate {
            tokens,
            audit: audit.clone(),
        };
        let service = WardFlightSql::new(warehouse.to_path_buf(), config.clone(), audit);
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).map_err(|e| WardError::Usage {
                message: format!("[serve] tls_cert / tls_key: {e}"),
            })?;
        }
        let router = builder.add_service(FlightServiceServer::with_interceptor(
            service,
            move |request| auth.check(request),
        ));
        listening(bound);
        router
            .serve_with_incoming_shutdown(incoming, shutdown())
            .await
            .map_err(|e| {
                WardError::io(
                    "the server failed",
                    bound.to_string(),
                    std::io::Error::other(e),
                )
            })
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
