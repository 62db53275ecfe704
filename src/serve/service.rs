//! The Flight SQL service: statements, prepared statements and metadata
//! over the research tables, each request authenticated, admitted and
//! audited.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetCrossReference,
    CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys, CommandGetPrimaryKeys,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandPreparedStatementUpdate, CommandStatementIngest,
    CommandStatementQuery, CommandStatementSubstraitPlan, CommandStatementUpdate,
    DoPutPreparedStatementResult, Nullable, ProstMessageExt, Searchable, SqlInfo,
    TicketStatementQuery, XdbcDataType, server::PeekableFlightDataStream,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use futures::{Stream, TryStreamExt};
use hmac::{Hmac, Mac};
use prost::Message;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Request, Response, Status, Streaming};

use super::ServeConfig;
use super::audit::{AuditLog, AuditRecord, Outcome};
use super::tokens::Researcher;
use crate::error::WardError;
use crate::query::{CATALOG, QueryEvent, QueryOptions, SCHEMA};
use crate::runs::ReaderLease;

type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The caller of a request, put there by the authentication interceptor.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub researcher: Researcher,
    /// The token as presented (handed back by the handshake).
    pub token: String,
}

/// What a ticket or a prepared-statement handle carries. Signed with the
/// server's key, so a client can neither forge one (point it at another
/// run, another researcher's tables) nor use another researcher's.
#[derive(Debug, Serialize, Deserialize)]
struct Handle {
    researcher: String,
    sql: String,
    /// The run a statement was planned on (tickets); `None` for a prepared
    /// statement, which reads the run current when it is executed.
    run: Option<String>,
}

pub(super) struct WardFlightSql {
    warehouse: PathBuf,
    config: ServeConfig,
    audit: Arc<AuditLog>,
    /// One permit per running query.
    slots: Arc<Semaphore>,
    /// Requests waiting for a permit.
    waiting: Arc<AtomicUsize>,
    /// Signs handles; new at every start (tickets do not outlive a server).
    key: [u8; 32],
    sql_info: SqlInfoData,
    type_info: XdbcTypeInfoData,
}

/// The SQL types of the research tables' columns, as DataFusion names
/// them (JDBC's `getTypeInfo`).
fn type_info() -> XdbcTypeInfoData {
    use XdbcDataType::*;
    let mut builder = XdbcTypeInfoDataBuilder::new();
    for (name, data_type, size, radix, quoted) in [
        ("BOOLEAN", XdbcBit, Some(1), None, false),
        ("INTEGER", XdbcInteger, Some(32), Some(2), false),
        ("BIGINT", XdbcBigint, Some(64), Some(2), false),
        ("DOUBLE", XdbcDouble, Some(53), Some(2), false),
        ("VARCHAR", XdbcVarchar, None, None, true),
        ("DATE", XdbcDate, Some(10), None, true),
        ("TIMESTAMP", XdbcTimestamp, Some(26), None, true),
    ] {
        builder.append(XdbcTypeInfo {
            type_name: name.into(),
            data_type,
            column_size: size,
            literal_prefix: quoted.then(|| "'".into()),
            literal_suffix: quoted.then(|| "'".into()),
            create_params: None,
            nullable: Nullable::NullabilityNullable,
            case_sensitive: name == "VARCHAR",
            searchable: Searchable::Full,
            unsigned_attribute: radix.map(|_| false),
            fixed_prec_scale: false,
            auto_increment: radix.map(|_| false),
            local_type_name: Some(name.into()),
            minimum_scale: None,
            maximum_scale: None,
            sql_data_type: data_type,
            datetime_subcode: None,
            num_prec_radix: radix,
            interval_precision: None,
        });
    }
    builder.build().expect("static type info")
}

/// The result schema of the key calls (Flight SQL's `CommandGetPrimaryKeys`,
/// and of `CommandGetImportedKeys` and its kin when `foreign`): the research
/// tables have no keys, so their answers are empty in these schemas.
fn keys_schema(foreign: bool) -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let fields = if foreign {
        vec![
            text("pk_catalog_name", true),
            text("pk_db_schema_name", true),
            text("pk_table_name", false),
            text("pk_column_name", false),
            text("fk_catalog_name", true),
            text("fk_db_schema_name", true),
            text("fk_table_name", false),
            text("fk_column_name", false),
            Field::new("key_sequence", DataType::Int32, false),
            text("fk_key_name", true),
            text("pk_key_name", true),
            Field::new("update_rule", DataType::UInt8, false),
            Field::new("delete_rule", DataType::UInt8, false),
        ]
    } else {
        vec![
            text("catalog_name", true),
            text("db_schema_name", true),
            text("table_name", false),
            text("column_name", false),
            text("key_name", true),
            Field::new("key_sequence", DataType::Int32, false),
        ]
    };
    Arc::new(Schema::new(fields))
}

/// A failed request's status, and the outcome its audit line records.
fn status_of(e: &WardError) -> (Status, Outcome) {
    match e {
        WardError::Query { refused: true, .. } => {
            (Status::permission_denied(e.to_string()), Outcome::Refused)
        }
        WardError::Query { .. } | WardError::Usage { .. } => {
            (Status::invalid_argument(e.to_string()), Outcome::Failed)
        }
        _ => {
            let text = e.to_string();
            let status = if text.contains("more memory than its limit") {
                Status::resource_exhausted(text)
            } else if text.contains("time limit") {
                Status::deadline_exceeded(text)
            } else {
                Status::internal(text)
            };
            (status, Outcome::Failed)
        }
    }
}

impl WardFlightSql {
    pub(super) fn new(warehouse: PathBuf, config: ServeConfig, audit: Arc<AuditLog>) -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Ward");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        let slots = Arc::new(Semaphore::new(config.max_concurrent));
        WardFlightSql {
            warehouse,
            audit,
            slots,
            waiting: Arc::new(AtomicUsize::new(0)),
            key,
            sql_info: info.build().expect("static SqlInfo"),
            type_info: type_info(),
            config,
        }
    }

    fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no valid token"))
    }

    fn record<T>(&self, call: &'static str, request: &Request<T>) -> AuditRecord {
        let caller = request.extensions().get::<Caller>();
        AuditRecord::start(
            call,
            caller.map(|c| c.researcher.name.as_str()),
            request.remote_addr().map(|a| a.to_string()),
        )
    }

    /// Writes `record` with `outcome` and returns `status`.
    fn fail(&self, mut record: AuditRecord, started: Instant, e: &WardError) -> Status {
        let (status, outcome) = status_of(e);
        record.outcome = outcome;
        record.error = Some(status.message().to_string());
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.audit.write(&record);
        status
    }

    fn options(&self, researcher: &Researcher) -> QueryOptions {
        QueryOptions {
            min_cell: self.config.min_cell,
            memory_limit: Some(self.config.memory_limit),
            timeout: Some(self.config.timeout),
            tables: researcher.tables.clone(),
        }
    }

    fn sign(&self, handle: &Handle) -> Vec<u8> {
        let body = serde_json::to_vec(handle).expect("handle serializes");
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(&body);
        let mut out = mac.finalize().into_bytes().to_vec();
        out.extend(body);
        out
    }

    fn open(&self, bytes: &[u8], caller: &Caller) -> Result<Handle, Status> {
        let invalid = || {
            Status::invalid_argument(
                "not a statement handle of this server (it restarted?): run the statement again",
            )
        };
        if bytes.len() < 32 {
            return Err(invalid());
        }
        let (tag, body) = bytes.split_at(32);
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| invalid())?;
        let handle: Handle = serde_json::from_slice(body).map_err(|_| invalid())?;
        if handle.researcher != caller.researcher.name {
            return Err(Status::permission_denied(
                "this statement handle was issued to another researcher",
            ));
        }
        Ok(handle)
    }

    /// A permit to run a query: at once when one is free, after waiting
    /// when at most `max_queued` wait already, else a "busy" refusal,
    /// written to the audit log as `record`'s outcome.
    async fn admit(&self, record: &mut AuditRecord) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.config.max_queued {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let status = Status::resource_exhausted(format!(
                "server busy: {} queries running and {} waiting; try again later",
                self.config.max_concurrent, self.config.max_queued
            ));
            record.outcome = Outcome::Busy;
            record.error = Some(status.message().to_string());
            self.audit.write(record);
            return Err(status);
        }
        let permit = self.slots.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        permit.map_err(|_| Status::unavailable("the server is shutting down"))
    }

    /// The research tables `researcher` may read in `lease`'s run.
    fn tables_of(lease: &ReaderLease, researcher: &Researcher) -> Result<Vec<String>, WardError> {
        Ok(crate::query::research_tables(&lease.dir.join("research"))?
            .into_iter()
            .map(|(name, _)| name)
            .filter(|n| researcher.tables.as_ref().is_none_or(|t| t.contains(n)))
            .collect())
    }

    /// Checks `sql` and plans it on the current run: the run's id, the
    /// tables read and the result's schema. Runs on a blocking thread.
    async fn plan(
        &self,
        researcher: &Researcher,
        sql: &str,
        record: &mut AuditRecord,
    ) -> Result<(String, SchemaRef), WardError> {
        let warehouse = self.warehouse.clone();
        let opts = self.options(researcher);
        let researcher = researcher.clone();
        let sql = sql.to_string();
        let (run, tables, schema) = tokio::task::spawn_blocking(move || {
            let lease = ReaderLease::current(&warehouse)?.ok_or_else(|| WardError::Usage {
                message: "no published run yet: the research tables appear after `ward run`".into(),
            })?;
            let tables = crate::query::check(&sql, &Self::tables_of(&lease, &researcher)?)?;
            let schema = crate::query::result_schema(&lease.dir.join("research"), &sql, &opts)?;
            Ok::<_, WardError>((lease.run_id.clone(), tables, schema))
        })
        .await
        .map_err(|_| WardError::Query {
            refused: false,
            message: "the query could not be planned (internal error)".into(),
        })??;
        record.run = Some(run.clone());
        record.tables = tables;
        Ok((run, schema))
    }

    /// Plans a statement and answers with its FlightInfo: one endpoint
    /// whose ticket names the statement and the run it was planned on.
    async fn flight_info(
        &self,
        call: &'static str,
        sql: &str,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let started = Instant::now();
        let caller = Self::caller(&request)?;
        let mut record = self.record(call, &request).statement(sql);
        let planned = {
            let _permit = self.admit(&mut record).await?;
            self.plan(&caller.researcher, sql, &mut record).await
        };
        let (run, schema) = planned.map_err(|e| self.fail(record.clone(), started, &e))?;
        let ticket = TicketStatementQuery {
            statement_handle: self
                .sign(&Handle {
                    researcher: caller.researcher.name.clone(),
                    sql: sql.to_string(),
                    run: Some(run),
                })
                .into(),
        };
        let info = flight_info_of(&schema, ticket.as_any(), request)?;
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.audit.write(&record);
        Ok(info)
    }

    /// Runs a ticket's statement on the run it names and streams the
    /// result; the audit line is written when the stream ends.
    async fn execute(
        &self,
        handle: Handle,
        request: &Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        let started = Instant::now();
        let caller = Self::caller(request)?;
        let mut record = self.record("execute", request).statement(&handle.sql);
        let permit = self.admit(&mut record).await?;
        let warehouse = self.warehouse.clone();
        let opts = self.options(&caller.researcher);
        let audit = self.audit.clone();
        let (tx, mut rx) = mpsc::channel::<Result<QueryEvent, Status>>(2);
        // The query runs on a thread of its own (query_each blocks); the
        // lease and the permit live as long as it does.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let run = match &handle.run {
                Some(run) => ReaderLease::take(&warehouse, run).and_then(|lease| {
                    lease.ok_or_else(|| WardError::Usage {
                        message: format!(
                            "run {run} was replaced and pruned since the statement was \
                             planned: run the statement again"
                        ),
                    })
                }),
                None => ReaderLease::current(&warehouse).and_then(|lease| {
                    lease.ok_or_else(|| WardError::Usage {
                        message: "no published run yet".into(),
                    })
                }),
            };
            let result = run.and_then(|lease| {
                record.run = Some(lease.run_id.clone());
                record.tables = crate::query::check(
                    &handle.sql,
                    &Self::tables_of(&lease, &caller.researcher)?,
                )?;
                let (mut rows, mut bytes, mut gone) = (0u64, 0u64, false);
                let outcome = crate::query::query_each(
                    &lease.dir.join("research"),
                    &handle.sql,
                    &opts,
                    &mut |event| {
                        if let QueryEvent::Batch(b) = &event {
                            rows += b.num_rows() as u64;
                            bytes += b.get_array_memory_size() as u64;
                        }
                        // This runs inside the query's own runtime, whose
                        // thread may wait here: the channel is the
                        // backpressure of a slow client.
                        gone = futures::executor::block_on(tx.send(Ok(event))).is_err();
                        !gone
                    },
                );
                drop(lease);
                record.rows = rows;
                record.bytes = bytes;
                if gone {
                    record.outcome = Outcome::Cancelled;
                }
                outcome
            });
            if let Err(e) = &result {
                let (status, outcome) = status_of(e);
                record.outcome = outcome;
                record.error = Some(status.message().to_string());
                let _ = tx.blocking_send(Err(status));
            }
            record.duration_ms = started.elapsed().as_millis() as u64;
            audit.write(&record);
        });
        // The schema first: a refusal or a planning error is the call's
        // status, not an error in the middle of a stream.
        let schema = match rx.recv().await {
            Some(Ok(QueryEvent::Schema { schema, .. })) => schema,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::internal("the query ended before its schema")),
        };
        let batches = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await? {
                Ok(QueryEvent::Batch(batch)) => Some((Ok(batch), rx)),
                Ok(QueryEvent::Schema { .. }) => Some((
                    Err(FlightError::ProtocolError("a second schema".into())),
                    rx,
                )),
                Err(status) => Some((Err(FlightError::from(status)), rx)),
            }
        });
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    /// FlightInfo of a metadata call: its ticket is the command itself.
    fn metadata_info(
        &self,
        call: &'static str,
        command: Any,
        schema: &Schema,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Self::caller(&request)?;
        self.audit.write(&self.record(call, &request));
        flight_info_of(schema, command, request)
    }

    /// A metadata result as a stream, audited.
    fn metadata_stream(
        &self,
        mut record: AuditRecord,
        started: Instant,
        batch: Result<RecordBatch, Status>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        let batch = batch.inspect_err(|s| {
            record.outcome = Outcome::Failed;
            record.error = Some(s.message().to_string());
        });
        if let Ok(b) = &batch {
            record.rows = b.num_rows() as u64;
            record.bytes = b.get_array_memory_size() as u64;
        }
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.audit.write(&record);
        let batch = batch?;
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(batch.schema())
            .build(futures::stream::once(async { Ok(batch) }))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    /// The research tables `researcher` may read, with the schema a query
    /// of each returns.
    async fn table_schemas(
        &self,
        researcher: &Researcher,
        with_schema: bool,
    ) -> Result<Vec<(String, SchemaRef)>, WardError> {
        let warehouse = self.warehouse.clone();
        let opts = self.options(researcher);
        let researcher = researcher.clone();
        tokio::task::spawn_blocking(move || {
            let Some(lease) = ReaderLease::current(&warehouse)? else {
                return Ok(Vec::new());
            };
            let research = lease.dir.join("research");
            let mut out = Vec::new();
            for table in Self::tables_of(&lease, &researcher)? {
                let schema = if with_schema {
                    let sql = format!("SELECT * FROM \"{table}\"");
                    crate::query::result_schema(&research, &sql, &opts)?
                } else {
                    Arc::new(Schema::empty())
                };
                out.push((table, schema));
            }
            Ok(out)
        })
        .await
        .map_err(|_| WardError::Query {
            refused: false,
            message: "listing the tables failed (internal error)".into(),
        })?
    }

    /// A write, an ingest, a Substrait plan or bound parameters: refused
    /// with `message` and audited like a refused statement.
    fn refuse_put<T>(
        &self,
        call: &'static str,
        sql: Option<&str>,
        message: &str,
        request: &Request<T>,
    ) -> Status {
        let mut record = self.record(call, request);
        if let Some(sql) = sql {
            record = record.statement(sql);
        }
        record.outcome = Outcome::Refused;
        record.error = Some(message.into());
        self.audit.write(&record);
        Status::permission_denied(message)
    }

    /// The empty answer of a key call, audited.
    fn no_keys(
        &self,
        call: &'static str,
        foreign: bool,
        request: &Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        let started = Instant::now();
        Self::caller(request)?;
        let record = self.record(call, request);
        let batch = RecordBatch::new_empty(keys_schema(foreign));
        self.metadata_stream(record, started, Ok(batch))
    }
}

/// A FlightInfo with `schema` and one endpoint whose ticket is `command`.
fn flight_info_of(
    schema: &Schema,
    command: Any,
    request: Request<FlightDescriptor>,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(arrow_status)?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command.encode_to_vec())))
        .with_descriptor(request.into_inner());
    Ok(Response::new(info))
}

/// Refusal of every write call.
const READ_ONLY: &str = "the research tables are read-only: only queries are allowed";

fn arrow_status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl FlightSqlService for WardFlightSql {
    type FlightService = WardFlightSql;

    /// The interceptor checked the credentials (a bearer token, or HTTP
    /// Basic with the researcher's name and token as password): the answer
    /// is the bearer token clients send from then on.
    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<FlightStream<HandshakeResponse>>, Status> {
        let caller = Self::caller(&request)?;
        self.audit.write(&self.record("handshake", &request));
        let output = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: caller.token.clone().into(),
        })]);
        let mut response: Response<FlightStream<HandshakeResponse>> =
            Response::new(Box::pin(output));
        let bearer = format!("Bearer {}", caller.token)
            .parse()
            .map_err(|_| Status::internal("token not ASCII"))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.flight_info("statement", &query.query, request).await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = Self::caller(&request)?;
        let handle = self.open(&cmd.prepared_statement_handle, &caller)?;
        self.flight_info("prepared_statement", &handle.sql, request)
            .await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = Self::caller(&request)?;
        let handle = self.open(&ticket.statement_handle, &caller)?;
        self.execute(handle, &request).await
    }

    /// Executing a prepared statement directly (without its FlightInfo):
    /// on the run current now.
    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = Self::caller(&request)?;
        let handle = self.open(&query.prepared_statement_handle, &caller)?;
        self.execute(handle, &request).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let started = Instant::now();
        let caller = Self::caller(&request)?;
        let mut record = self.record("prepare", &request).statement(&query.query);
        let (_, schema) = self
            .plan(&caller.researcher, &query.query, &mut record)
            .await
            .map_err(|e| self.fail(record.clone(), started, &e))?;
        let IpcMessage(schema_bytes) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(arrow_status)?;
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.audit.write(&record);
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: self
                .sign(&Handle {
                    researcher: caller.researcher.name.clone(),
                    sql: query.query,
                    run: None,
                })
                .into(),
            dataset_schema: schema_bytes,
            parameter_schema: Default::default(),
        })
    }

    /// Handles hold no server state: closing one frees nothing.
    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        Self::caller(&request)?;
        self.audit.write(&self.record("close_prepared", &request));
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info("catalogs", query.as_any(), &schema, request)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let started = Instant::now();
        Self::caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        let record = self.record("catalogs", &request);
        self.metadata_stream(record, started, builder.build().map_err(arrow_status))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info("schemas", query.as_any(), &schema, request)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let started = Instant::now();
        Self::caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        let record = self.record("schemas", &request);
        self.metadata_stream(record, started, builder.build().map_err(arrow_status))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info("tables", query.as_any(), &schema, request)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let started = Instant::now();
        let caller = Self::caller(&request)?;
        let record = self.record("tables", &request);
        let with_schema = query.include_schema;
        let tables = match self.table_schemas(&caller.researcher, with_schema).await {
            Ok(t) => t,
            Err(e) => return Err(self.fail(record, started, &e)),
        };
        let mut builder = query.into_builder();
        let batch = tables
            .iter()
            .try_for_each(|(name, schema)| builder.append(CATALOG, SCHEMA, name, "TABLE", schema))
            .and_then(|()| builder.build())
            .map_err(arrow_status);
        self.metadata_stream(record, started, batch)
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info("table_types", query.as_any(), &schema, request)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let started = Instant::now();
        Self::caller(&request)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        let record = self.record("table_types", &request);
        self.metadata_stream(record, started, builder.build().map_err(arrow_status))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.sql_info).schema();
        self.metadata_info("sql_info", query.as_any(), &schema, request)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let started = Instant::now();
        Self::caller(&request)?;
        let record = self.record("sql_info", &request);
        let batch = query
            .into_builder(&self.sql_info)
            .build()
            .map_err(arrow_status);
        self.metadata_stream(record, started, batch)
    }

    async fn do_put_statement_update(
        &self,
        cmd: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(self.refuse_put("update", Some(&cmd.query), READ_ONLY, &request))
    }

    async fn do_put_statement_ingest(
        &self,
        _cmd: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(self.refuse_put("ingest", None, READ_ONLY, &request))
    }

    async fn do_put_prepared_statement_query(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        Err(self.refuse_put(
            "prepared_statement_parameters",
            None,
            "query parameters are not supported: put the values in the SQL text",
            &request,
        ))
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(self.refuse_put("prepared_update", None, READ_ONLY, &request))
    }

    async fn do_put_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(self.refuse_put("substrait_plan", None, READ_ONLY, &request))
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder(&self.type_info).schema();
        self.metadata_info("type_info", query.as_any(), &schema, request)
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let started = Instant::now();
        Self::caller(&request)?;
        let record = self.record("type_info", &request);
        let batch = query
            .into_builder(&self.type_info)
            .build()
            .map_err(arrow_status);
        self.metadata_stream(record, started, batch)
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info("primary_keys", query.as_any(), &keys_schema(false), request)
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.no_keys("primary_keys", false, &request)
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info("imported_keys", query.as_any(), &keys_schema(true), request)
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.no_keys("imported_keys", true, &request)
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info("exported_keys", query.as_any(), &keys_schema(true), request)
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.no_keys("exported_keys", true, &request)
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(
            "cross_reference",
            query.as_any(),
            &keys_schema(true),
            request,
        )
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.no_keys("cross_reference", true, &request)
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
