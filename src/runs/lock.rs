//! The warehouse lock: an advisory `flock` on `ward.lock` that names its
//! holder and is taken over when the holder died.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, WardError};

/// Who holds (or last held) a warehouse lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    /// UTC, RFC 3339.
    pub started: String,
    pub command: String,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} ({}), since {}",
            self.pid, self.host, self.command, self.started
        )
    }
}

/// The exclusive lock of a warehouse, held until dropped.
#[derive(Debug)]
pub struct Lock {
    file: fs::File,
    path: PathBuf,
    /// The holder of a lock its process left behind (it died), taken over.
    pub stale: Option<LockHolder>,
}

impl Lock {
    /// Takes the lock of `warehouse` for `command`, or fails at once with
    /// [`WardError::Locked`] naming the holder.
    pub fn acquire(warehouse: &Path, command: &str) -> Result<Lock> {
        fs::create_dir_all(warehouse).map_err(|e| WardError::io("cannot create", warehouse, e))?;
        let path = warehouse.join("ward.lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| WardError::io("cannot open", &path, e))?;
        // A holder that is just releasing, or `ward status` looking, holds
        // it for an instant: retry for about a second before giving up.
        let mut attempts = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if attempts < 20 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(WardError::Locked {
                        path,
                        holder: read_holder(&mut file)
                            .map(|h| h.to_string())
                            .unwrap_or_else(|| "a process that has not written its name".into()),
                    });
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(WardError::io("cannot lock", path, e));
                }
            }
        }
        // Locked: whatever the file still names is a holder that died.
        let stale = read_holder(&mut file);
        let me = LockHolder {
            pid: std::process::id(),
            host: hostname(),
            started: now(),
            command: command.to_string(),
        };
        let json = serde_json::to_vec(&me).expect("serializable");
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(&json))
            .and_then(|()| file.sync_all())
            .map_err(|e| WardError::io("cannot write", &path, e))?;
        Ok(Lock { file, path, stale })
    }

    /// The holder recorded in a warehouse's lock file and whether it still
    /// holds it; `None` when no one ever held it or it was released.
    pub fn inspect(warehouse: &Path) -> Result<Option<(LockHolder, bool)>> {
        let path = warehouse.join("ward.lock");
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(WardError::io("cannot open", path, e)),
        };
        let Some(holder) = read_holder(&mut file) else {
            return Ok(None);
        };
        // A shared lock, released at once: it fails only while a run holds
        // the exclusive one (and a run starting meanwhile retries).
        let held = match file.try_lock_shared() {
            Ok(()) => false,
            Err(fs::TryLockError::WouldBlock) => true,
            Err(fs::TryLockError::Error(e)) => return Err(WardError::io("cannot lock", path, e)),
        };
        Ok(Some((holder, held)))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // An empty file means "released cleanly"; the flock goes with the file.
        if let Err(e) = self.file.set_len(0) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot clear the lock file");
        }
    }
}

fn read_holder(file: &mut fs::File) -> Option<LockHolder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// This machine's name (Linux), for lock files and manifests.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into())
}

/// Now, UTC, RFC 3339 with seconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
