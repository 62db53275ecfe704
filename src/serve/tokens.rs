//! Researchers' bearer tokens: issued by `ward serve token add NAME`,
//! stored hashed, revocable, each with an optional table allow-list.
//!
//! A token is 256 random bits (`ward_` and 43 base64url characters); the
//! store keeps its SHA-256, never the token. A password hash (argon2) is
//! for secrets people choose and guess; a 256-bit random token cannot be
//! guessed from its SHA-256, and a fast hash lets every request be checked
//! against the store as it is on disk, so a revocation takes effect at the
//! next request without restarting the server.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, WardError};

/// The prefix of every token (so a leaked one is recognisable in a scan).
const PREFIX: &str = "ward_";

/// One researcher's entry in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenEntry {
    /// Who: named in the audit log.
    pub name: String,
    /// `sha256:<hex>` of the token.
    pub hash: String,
    /// The research tables this researcher may query; `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<String>>,
    /// When issued (UTC, RFC 3339).
    pub created: String,
    /// When revoked; a revoked token is refused (the entry stays, so the
    /// audit log's names keep their meaning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    researchers: Vec<TokenEntry>,
}

/// The token store: a JSON file, written whole (temp file, then rename) by
/// the `token` commands and read by the server.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    /// The entries as last read, with the file's modification time.
    cache: Mutex<Option<(SystemTime, u64, Vec<TokenEntry>)>>,
}

/// Who a request comes from: a valid, unrevoked token's entry.
#[derive(Debug, Clone)]
pub struct Researcher {
    pub name: String,
    pub tables: Option<Vec<String>>,
}

fn hash(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

impl TokenStore {
    /// The store at `path` (which need not exist yet).
    pub fn new(path: &Path) -> TokenStore {
        TokenStore {
            path: path.to_path_buf(),
            cache: Mutex::new(None),
        }
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Vec<TokenEntry>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str::<StoreFile>(&text)
                .map(|f| f.researchers)
                .map_err(|e| WardError::State {
                    path: self.path.clone(),
                    message: format!("not a token store: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(WardError::io("cannot read", &self.path, e)),
        }
    }

    fn write(&self, entries: Vec<TokenEntry>) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| WardError::io("cannot create", dir, e))?;
        let text = serde_json::to_string_pretty(&StoreFile {
            researchers: entries,
        })
        .expect("token store serializes");
        let tmp = dir.join(format!(
            ".{}.{}",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options
                .open(&tmp)
                .map_err(|e| WardError::io("cannot write", &tmp, e))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| WardError::io("cannot write", &tmp, e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| WardError::io("cannot write", &self.path, e))
    }

    /// Every entry, revoked ones too, in the order issued.
    pub fn list(&self) -> Result<Vec<TokenEntry>> {
        self.read()
    }

    /// Issues a token for `name` (limited to `tables` when given) and
    /// returns it: the only time it is shown. A name with an active token
    /// must be revoked first.
    pub fn add(&self, name: &str, tables: Option<Vec<String>>) -> Result<String> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
        if !valid {
            return Err(WardError::Usage {
                message: format!(
                    "`{name}` is not a researcher name (letters, digits, . _ @ -, at most 64)"
                ),
            });
        }
        let mut entries = self.read()?;
        if entries
            .iter()
            .any(|e| e.name == name && e.revoked.is_none())
        {
            return Err(WardError::Usage {
                message: format!(
                    "{name} already has a token: `ward serve token revoke {name}` first"
                ),
            });
        }
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        entries.push(TokenEntry {
            name: name.to_string(),
            hash: hash(&token),
            tables,
            created: crate::runs::now(),
            revoked: None,
        });
        self.write(entries)?;
        Ok(token)
    }

    /// Revokes `name`'s active token; false when it has none.
    pub fn revoke(&self, name: &str) -> Result<bool> {
        let mut entries = self.read()?;
        let mut found = false;
        for e in entries
            .iter_mut()
            .filter(|e| e.name == name && e.revoked.is_none())
        {
            e.revoked = Some(crate::runs::now());
            found = true;
        }
        if found {
            self.write(entries)?;
        }
        Ok(found)
    }

    /// The researcher a presented token belongs to, if it is valid and not
    /// revoked. The store is read again whenever its file changed.
    pub fn verify(&self, token: &str) -> Result<Option<Researcher>> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(WardError::io("cannot read", &self.path, e)),
        };
        let Some((modified, len)) = meta else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = matches!(&*cache, Some((m, l, _)) if *m == modified && *l == len);
        if !fresh {
            *cache = Some((modified, len, self.read()?));
        }
        let wanted = hash(token);
        let entries = &cache.as_ref().expect("cache filled").2;
        Ok(entries
            .iter()
            .find(|e| e.revoked.is_none() && constant_time_eq(&e.hash, &wanted))
            .map(|e| Researcher {
                name: e.name.clone(),
                tables: e.tables.clone(),
            }))
    }
}

/// Compares two hashes without stopping at the first difference.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_until_revoked_and_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(&dir.path().join("serve/tokens.json"));
        let alice = store.add("alice", None).unwrap();
        let bob = store.add("bob", Some(vec!["observation".into()])).unwrap();
        assert!(alice.starts_with(PREFIX) && alice.len() == PREFIX.len() + 43);
        assert_ne!(alice, bob);
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(&alice) && !text.contains(&bob[PREFIX.len()..]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        assert_eq!(store.verify(&alice).unwrap().unwrap().name, "alice");
        let b = store.verify(&bob).unwrap().unwrap();
        assert_eq!(b.tables, Some(vec!["observation".to_string()]));
        assert!(store.verify("ward_nottoken").unwrap().is_none());
        assert!(store.verify(&alice[..alice.len() - 1]).unwrap().is_none());
        // A second token for an active name is refused.
        assert!(matches!(
            store.add("alice", None),
            Err(WardError::Usage { .. })
        ));
        // Revocation is seen by a store already in use (the server's).
        let server = TokenStore::new(store.path());
        assert!(server.verify(&alice).unwrap().is_some());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(store.revoke("alice").unwrap());
        assert!(!store.revoke("alice").unwrap());
        assert!(server.verify(&alice).unwrap().is_none());
        assert!(server.verify(&bob).unwrap().is_some());
        // Re-issued after revocation: a new token; the old stays refused.
        let again = store.add("alice", None).unwrap();
        assert!(server.verify(&again).unwrap().is_some());
        assert!(server.verify(&alice).unwrap().is_none());
        assert_eq!(store.list().unwrap().len(), 3);
        for bad in ["", "a b", "x/../y", &"n".repeat(65)] {
            assert!(store.add(bad, None).is_err(), "{bad}");
        }
    }
}
