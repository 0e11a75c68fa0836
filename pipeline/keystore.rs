//! The batch's key store: every device's private key, CSR and (own-CA
//! modes) certificate, in one SQLite file in the private work directory
//! (`work/keys.sqlite`, 0600). Keys go in a slice at a time, each slice one
//! synced transaction, so the store is durable before the ledger says
//! "keyed" and no stage ever needs the whole batch's keys in memory.

use std::collections::HashMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};

use crate::crypto::KeyId;
use crate::error::{Error, Result};
use crate::keygen::{Keyed, SecretPem};
use crate::workspace::Workspace;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS keys (
    thing_name      TEXT PRIMARY KEY,
    key_pem         TEXT,
    csr_pem         TEXT NOT NULL,
    certificate_pem TEXT,
    key_type        TEXT NOT NULL,
    algorithm       TEXT NOT NULL,
    curve           TEXT,
    public_key      BLOB NOT NULL
) WITHOUT ROWID;
"#;

pub struct KeyStore {
    conn: Connection,
    path: PathBuf,
}

impl KeyStore {
    pub fn file(ws: &Workspace) -> PathBuf {
        ws.work().join("keys.sqlite")
    }

    /// Opens (or creates, 0600) the batch's key store.
    pub fn open(ws: &Workspace) -> Result<KeyStore> {
        let path = Self::file(ws);
        Self::open_at(&path)
    }

    pub fn open_at(path: &Path) -> Result<KeyStore> {
        let err = |e: &dyn std::fmt::Display| Error::infra(format!("the key store {}: {e}", path.display()));
        // SQLite gives its journal the database file's mode: create it private first.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
            .map_err(|e| err(&e))?;
        let conn = Connection::open(path).map_err(|e| err(&e))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| err(&e))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| err(&e))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| err(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| err(&e))?;
        Ok(KeyStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        Error::infra(format!("the key store {}: {e}", self.path.display()))
    }

    /// Stores a slice of keys in one synced transaction. A thing already
    /// in the store keeps the key it has: a key, once made, is never replaced.
    pub fn insert(&mut self, keys: &[(&str, &Keyed)]) -> Result<()> {
        let path = self.path.display().to_string();
        let err = |e: rusqlite::Error| Error::infra(format!("the key store {path}: {e}"));
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO keys (thing_name, key_pem, csr_pem, certificate_pem, key_type, algorithm, curve, public_key)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(err)?;
            for (thing, k) in keys {
                st.execute(params![
                    thing,
                    k.key_pem.as_ref().map(|s| s.0.as_str()),
                    k.csr_pem,
                    k.certificate_pem,
                    k.key_type,
                    k.key.algorithm,
                    k.key.curve,
                    k.key.bits
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// The keys of the named things that the store holds.
    pub fn get_many<S: AsRef<str>>(&self, things: &[S]) -> Result<HashMap<String, Keyed>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT key_pem, csr_pem, certificate_pem, key_type, algorithm, curve, public_key FROM keys WHERE thing_name = ?1",
            )
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::with_capacity(things.len());
        for t in things {
            let t = t.as_ref();
            let mut rows = st.query([t]).map_err(|e| self.err(e))?;
            if let Some(r) = rows.next().map_err(|e| self.err(e))? {
                let k = Keyed {
                    key_pem: r.get::<_, Option<String>>(0).map_err(|e| self.err(e))?.map(SecretPem),
                    csr_pem: r.get(1).map_err(|e| self.err(e))?,
                    certificate_pem: r.get(2).map_err(|e| self.err(e))?,
                    key_type: r.get(3).map_err(|e| self.err(e))?,
                    key: KeyId {
                        algorithm: r.get(4).map_err(|e| self.err(e))?,
                        curve: r.get(5).map_err(|e| self.err(e))?,
                        bits: r.get(6).map_err(|e| self.err(e))?,
                    },
                };
                out.insert(t.to_string(), k);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen::{generate_one, KeyType};

    #[test]
    fn keys_come_back_as_stored_and_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.sqlite");
        let mut ks = KeyStore::open_at(&path).unwrap();
        let a = generate_one("SN-1", KeyType::EcP256).unwrap();
        let b = generate_one("SN-1", KeyType::EcP256).unwrap();
        ks.insert(&[("SN-1", &a)]).unwrap();
        ks.insert(&[("SN-1", &b)]).unwrap();
        let mut held = ks.get_many(&["SN-1", "SN-2"]).unwrap();
        assert_eq!(held.len(), 1, "SN-1 once, SN-2 never stored");
        let got = held.remove("SN-1").unwrap();
        assert_eq!(got.key, a.key);
        assert_eq!(got.csr_pem, a.csr_pem);
        assert_eq!(got.key_pem.unwrap().0, a.key_pem.unwrap().0);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
