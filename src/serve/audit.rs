//! The audit log of `ward serve`: one JSON line per request, appended and
//! flushed before the request's last answer leaves, never a result value.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Result, WardError};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered.
    Ok,
    /// No valid token.
    Unauthenticated,
    /// The statement is not a read-only query over the tables allowed.
    Refused,
    /// Too many queries running and waiting: try later.
    Busy,
    /// Valid SQL that failed: a planning error, a limit, a pruned run.
    Failed,
    /// The client went away before the end of the result.
    Cancelled,
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When the request arrived (UTC, RFC 3339 with milliseconds).
    pub time: String,
    /// The researcher named by the token; `None` when it was not valid.
    pub researcher: Option<String>,
    /// The client's address.
    pub client: Option<String>,
    /// The Flight SQL call (`statement`, `prepare`, `tables`, ...).
    pub call: &'static str,
    /// SHA-256 of the statement text, to group repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement_sha256: Option<String>,
    /// The statement, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// The published run read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The research tables the statement reads.
    pub tables: Vec<String>,
    pub rows: u64,
    /// Arrow in-memory size of the batches sent.
    pub bytes: u64,
    pub duration_ms: u64,
    pub outcome: Outcome,
    /// Why it was refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AuditRecord {
    /// A record of `call`, started now.
    pub fn start(
        call: &'static str,
        researcher: Option<&str>,
        client: Option<String>,
    ) -> AuditRecord {
        AuditRecord {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            researcher: researcher.map(str::to_string),
            client,
            call,
            statement_sha256: None,
            statement: None,
            run: None,
            tables: Vec::new(),
            rows: 0,
            bytes: 0,
            duration_ms: 0,
            outcome: Outcome::Ok,
            error: None,
        }
    }

    /// With the statement and its hash.
    pub fn statement(mut self, sql: &str) -> AuditRecord {
        self.statement_sha256 = Some(hex::encode(Sha256::digest(sql.as_bytes())));
        self.statement = Some(sql.to_string());
        self
    }
}

/// The append-only audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens `path` for appending (created with mode 0600 when missing).
    pub fn open(path: &Path) -> Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| WardError::io("cannot create", dir, e))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(path)
            .map_err(|e| WardError::io("cannot open the audit log", path, e))?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Appends one record as a line, in one write.
    pub fn write(&self, record: &AuditRecord) {
        let mut line = serde_json::to_vec(record).expect("audit record serializes");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&line).and_then(|()| file.flush()) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit log");
        }
    }
}
