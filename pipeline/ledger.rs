//! The ledger: one SQLite database per output directory, the single source
//! of truth for `status`, `resume` and re-runs. Every state change is
//! committed before the action that depends on it.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS batches (
    id          TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    settings    TEXT NOT NULL,
    state       TEXT NOT NULL,
    finished_at INTEGER
);
CREATE TABLE IF NOT EXISTS inputs (
    batch_id TEXT NOT NULL,
    path     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    rows     INTEGER NOT NULL,
    PRIMARY KEY (batch_id, path)
);
CREATE TABLE IF NOT EXISTS attempts (
    batch_id       TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    s3_bucket      TEXT NOT NULL,
    s3_key         TEXT NOT NULL,
    lines          INTEGER NOT NULL,
    uploaded       INTEGER NOT NULL DEFAULT 0,
    task_id        TEXT,
    task_status    TEXT,
    success_count  INTEGER,
    failure_count  INTEGER,
    message        TEXT,
    reports_done   INTEGER NOT NULL DEFAULT 0,
    reconciled     INTEGER NOT NULL DEFAULT 0,
    started_at     INTEGER,
    ended_at       INTEGER,
    PRIMARY KEY (batch_id, attempt)
);
CREATE TABLE IF NOT EXISTS devices (
    batch_id        TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    serial          TEXT NOT NULL,
    thing_name      TEXT NOT NULL,
    file            TEXT NOT NULL,
    line            INTEGER NOT NULL,
    fingerprint     TEXT NOT NULL,
    record          TEXT NOT NULL,
    key_fingerprint TEXT,
    key_type        TEXT,
    state           TEXT NOT NULL,
    attempt         INTEGER,
    tries           INTEGER NOT NULL DEFAULT 0,
    certificate_id  TEXT,
    certificate_pem TEXT,
    error_class     TEXT,
    error           TEXT,
    PRIMARY KEY (batch_id, thing_name)
);
CREATE INDEX IF NOT EXISTS devices_serial ON devices (serial);
CREATE INDEX IF NOT EXISTS devices_seq ON devices (batch_id, seq);
CREATE INDEX IF NOT EXISTS devices_attempt ON devices (batch_id, attempt, seq);
CREATE INDEX IF NOT EXISTS devices_state ON devices (batch_id, state, seq);
-- The keys of device-made CSRs, so that no later batch registers one again
-- for another thing. Generated keys are new by construction and not listed.
CREATE TABLE IF NOT EXISTS device_csr_keys (
    fingerprint TEXT NOT NULL,
    batch_id    TEXT NOT NULL,
    thing_name  TEXT NOT NULL,
    PRIMARY KEY (fingerprint, batch_id, thing_name)
);
"#;

/// Device states, in pipeline order.
pub mod state {
    pub const INGESTED: &str = "ingested";
    pub const KEYED: &str = "keyed";
    pub const STAGED: &str = "staged";
    pub const SUBMITTED: &str = "submitted";
    pub const REGISTERED: &str = "registered";
    pub const FAILED: &str = "failed";
    pub const BUNDLED: &str = "bundled";
}

/// Batch states.
pub mod batch_state {
    pub const OPEN: &str = "open";
    pub const DONE: &str = "done";
}

pub struct Ledger {
    conn: Connection,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchRow {
    pub id: String,
    pub created_at: i64,
    pub digest: String,
    pub settings: String,
    pub state: String,
    pub finished_at: Option<i64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AttemptRow {
    pub attempt: i64,
    pub s3_bucket: String,
    pub s3_key: String,
    pub lines: i64,
    pub uploaded: bool,
    pub task_id: Option<String>,
    pub task_status: Option<String>,
    pub success_count: Option<i64>,
    pub failure_count: Option<i64>,
    pub message: Option<String>,
    pub reports_done: bool,
    pub reconciled: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceRow {
    pub seq: i64,
    pub serial: String,
    pub thing_name: String,
    pub file: String,
    pub line: i64,
    pub fingerprint: String,
    #[serde(skip)]
    pub record: String,
    pub key_fingerprint: Option<String>,
    pub key_type: Option<String>,
    pub state: String,
    pub attempt: Option<i64>,
    pub tries: i64,
    pub certificate_id: Option<String>,
    #[serde(skip)]
    pub certificate_pem: Option<String>,
    pub error_class: Option<String>,
    pub error: Option<String>,
}

/// A new device for the ledger.
pub struct NewDevice {
    pub serial: String,
    pub thing_name: String,
    pub file: String,
    pub line: u64,
    pub fingerprint: String,
    pub record: String,
    /// The key fingerprint of a device-made CSR.
    pub csr_key: Option<String>,
}

/// What reconciliation decided for one device.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub thing_name: String,
    pub registered: bool,
    pub certificate_id: Option<String>,
    pub certificate_pem: Option<String>,
    pub error_class: Option<String>,
    pub error: Option<String>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::Other(anyhow::anyhow!("ledger: {e}"))
}

impl Ledger {
    pub fn open(path: &Path) -> Result<Ledger> {
        let conn = Connection::open(path)
            .map_err(|e| Error::infra(format!("cannot open the ledger {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        // 32 MiB of page cache (SQLite's default is 2): a fixed amount, and
        // a million-device batch's index updates stay off the disk.
        conn.pragma_update(None, "cache_size", -32768).map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        Ok(Ledger { conn })
    }

    pub fn batch(&self, id: &str) -> Result<Option<BatchRow>> {
        self.conn
            .query_row(
                "SELECT id, created_at, digest, settings, state, finished_at FROM batches WHERE id = ?1",
                [id],
                |r| {
                    Ok(BatchRow {
                        id: r.get(0)?,
                        created_at: r.get(1)?,
                        digest: r.get(2)?,
                        settings: r.get(3)?,
                        state: r.get(4)?,
                        finished_at: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(db_err)
    }

    pub fn batches(&self) -> Result<Vec<BatchRow>> {
        let mut st = self
            .conn
            .prepare("SELECT id, created_at, digest, settings, state, finished_at FROM batches ORDER BY created_at, id")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(BatchRow {
                    id: r.get(0)?,
                    created_at: r.get(1)?,
                    digest: r.get(2)?,
                    settings: r.get(3)?,
                    state: r.get(4)?,
                    finished_at: r.get(5)?,
                })
            })
            .map_err(db_err)?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(db_err)?;
        Ok(rows)
    }

    /// Records a new batch with its inputs and devices, all or nothing.
    pub fn create_batch(
        &mut self,
        id: &str,
        digest: &str,
        settings: &str,
        inputs: &[(String, String, usize)],
        devices: impl IntoIterator<Item = Result<NewDevice>>,
    ) -> Result<()> {
        let tx = self.conn.transaction().map_err(db_err)?;
        tx.execute(
            "INSERT INTO batches (id, created_at, digest, settings, state) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, now(), digest, settings, batch_state::OPEN],
        )
        .map_err(db_err)?;
        for (path, sha, rows) in inputs {
            tx.execute(
                "INSERT INTO inputs (batch_id, path, sha256, rows) VALUES (?1, ?2, ?3, ?4)",
                params![id, path, sha, *rows as i64],
            )
            .map_err(db_err)?;
        }
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO devices (batch_id, seq, serial, thing_name, file, line, fingerprint, record, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(db_err)?;
            let mut csr_key = tx
                .prepare(
                    "INSERT OR IGNORE INTO device_csr_keys (fingerprint, batch_id, thing_name) VALUES (?1, ?2, ?3)",
                )
                .map_err(db_err)?;
            for (seq, d) in devices.into_iter().enumerate() {
                let d = d?;
                if let Some(k) = &d.csr_key {
                    csr_key.execute(params![k, id, d.thing_name]).map_err(db_err)?;
                }
                st.execute(params![
                    id,
                    seq as i64,
                    d.serial,
                    d.thing_name,
                    d.file,
                    d.line as i64,
                    d.fingerprint,
                    d.record,
                    state::INGESTED
                ])
                .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    pub fn finish_batch(&self, id: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE batches SET state = ?2, finished_at = ?3 WHERE id = ?1",
                params![id, batch_state::DONE, now()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// The device rows a `WHERE` clause selects, in the order it asks for.
    fn device_rows(&self, clause: &str, params: impl rusqlite::Params) -> Result<Vec<DeviceRow>> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE {clause}"))
            .map_err(db_err)?;
        let rows = st
            .query_map(params, |r| device_row(r, 0))
            .map_err(db_err)?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(db_err)?;
        Ok(rows)
    }

    /// Like [`Ledger::device_rows`], with each row's batch.
    fn batch_device_rows(&self, clause: &str, params: impl rusqlite::Params) -> Result<Vec<(String, DeviceRow)>> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT batch_id, {DEVICE_COLUMNS} FROM devices WHERE {clause}"
            ))
            .map_err(db_err)?;
        let rows = st
            .query_map(params, |r| Ok((r.get(0)?, device_row(r, 1)?)))
            .map_err(db_err)?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(db_err)?;
        Ok(rows)
    }

    /// Earlier ledger entries for a serial or thing name, outside `batch`.
    pub fn earlier(&self, batch: &str, serial: &str, thing_name: &str) -> Result<Vec<(String, DeviceRow)>> {
        self.batch_device_rows(
            "(serial = ?1 OR thing_name = ?2) AND batch_id != ?3",
            params![serial, thing_name, batch],
        )
    }

    /// Earlier ledger entries, outside `batch`, whose device CSR's key has this fingerprint.
    pub fn earlier_with_key(&self, batch: &str, key_fingerprint: &str) -> Result<Vec<(String, DeviceRow)>> {
        self.batch_device_rows(
            "(batch_id, thing_name) IN (SELECT batch_id, thing_name FROM device_csr_keys WHERE fingerprint = ?1)
             AND batch_id != ?2",
            params![key_fingerprint, batch],
        )
    }

    pub fn devices(&self, batch: &str) -> Result<Vec<DeviceRow>> {
        self.device_rows("batch_id = ?1 ORDER BY seq", [batch])
    }

    /// The next page of up to `limit` devices in `state`, in device order,
    /// after the one `cursor` names (start it at -1); None when there are
    /// no more. The stages walk the batch a page at a time with this.
    pub fn next_page(
        &self,
        batch: &str,
        state: &str,
        cursor: &mut i64,
        limit: usize,
    ) -> Result<Option<Vec<DeviceRow>>> {
        let rows = self.device_rows(
            "batch_id = ?1 AND seq > ?2 AND state = ?3 ORDER BY seq LIMIT ?4",
            params![batch, *cursor, state, limit as i64],
        )?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        *cursor = last.seq;
        Ok(Some(rows))
    }

    /// The devices assigned to one attempt, in device order.
    pub fn devices_of_attempt(&self, batch: &str, attempt: i64) -> Result<Vec<DeviceRow>> {
        self.device_rows("batch_id = ?1 AND attempt = ?2 ORDER BY seq", params![batch, attempt])
    }

    /// Calls `f` with every device of the batch in order, one row in memory at a time.
    pub fn each_device(&self, batch: &str, mut f: impl FnMut(&DeviceRow) -> Result<()>) -> Result<()> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE batch_id = ?1 ORDER BY seq"
            ))
            .map_err(db_err)?;
        let mut rows = st.query([batch]).map_err(db_err)?;
        while let Some(r) = rows.next().map_err(db_err)? {
            f(&device_row(r, 0).map_err(db_err)?)?;
        }
        Ok(())
    }

    /// How many devices of the batch are in each state.
    pub fn state_counts(&self, batch: &str) -> Result<BTreeMap<String, usize>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT state, count(*) FROM devices WHERE batch_id = ?1 GROUP BY state")
            .map_err(db_err)?;
        let rows = st
            .query_map([batch], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize)))
            .map_err(db_err)?
            .collect::<std::result::Result<BTreeMap<_, _>, _>>()
            .map_err(db_err)?;
        Ok(rows)
    }

    /// Moves every device of the batch in `from` to `to`; returns how many.
    pub fn move_state(&self, batch: &str, from: &str, to: &str) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE devices SET state = ?3 WHERE batch_id = ?1 AND state = ?2",
                params![batch, from, to],
            )
            .map_err(db_err)
    }

    /// Marks devices keyed, with their key fingerprints, in one transaction.
    pub fn mark_keyed(&mut self, batch: &str, keyed: &[(String, String, String)]) -> Result<()> {
        let tx = self.conn.transaction().map_err(db_err)?;
        {
            let mut st = tx
                .prepare("UPDATE devices SET state = ?3, key_fingerprint = ?4, key_type = ?5 WHERE batch_id = ?1 AND thing_name = ?2")
                .map_err(db_err)?;
            for (thing, fp, kt) in keyed {
                st.execute(params![batch, thing, state::KEYED, fp, kt])
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    pub fn set_state(&mut self, batch: &str, things: &[String], new_state: &str, attempt: Option<i64>) -> Result<()> {
        let tx = self.conn.transaction().map_err(db_err)?;
        {
            let mut st = tx
                .prepare("UPDATE devices SET state = ?3, attempt = COALESCE(?4, attempt) WHERE batch_id = ?1 AND thing_name = ?2")
                .map_err(db_err)?;
            for t in things {
                st.execute(params![batch, t, new_state, attempt]).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    pub fn record_outcomes(&mut self, batch: &str, outcomes: &[Outcome]) -> Result<()> {
        let tx = self.conn.transaction().map_err(db_err)?;
        {
            let mut st = tx
                .prepare(
                    "UPDATE devices SET state = ?3, certificate_id = ?4, certificate_pem = ?5, error_class = ?6, error = ?7
                     WHERE batch_id = ?1 AND thing_name = ?2",
                )
                .map_err(db_err)?;
            for o in outcomes {
                let s = if o.registered { state::REGISTERED } else { state::FAILED };
                st.execute(params![
                    batch,
                    o.thing_name,
                    s,
                    o.certificate_id,
                    o.certificate_pem,
                    o.error_class,
                    o.error
                ])
                .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    pub fn attempts(&self, batch: &str) -> Result<Vec<AttemptRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT attempt, s3_bucket, s3_key, lines, uploaded, task_id, task_status, success_count,
                        failure_count, message, reports_done, reconciled
                 FROM attempts WHERE batch_id = ?1 ORDER BY attempt",
            )
            .map_err(db_err)?;
        let rows = st
            .query_map([batch], |r| {
                Ok(AttemptRow {
                    attempt: r.get(0)?,
                    s3_bucket: r.get(1)?,
                    s3_key: r.get(2)?,
                    lines: r.get(3)?,
                    uploaded: r.get::<_, i64>(4)? != 0,
                    task_id: r.get(5)?,
                    task_status: r.get(6)?,
                    success_count: r.get(7)?,
                    failure_count: r.get(8)?,
                    message: r.get(9)?,
                    reports_done: r.get::<_, i64>(10)? != 0,
                    reconciled: r.get::<_, i64>(11)? != 0,
                })
            })
            .map_err(db_err)?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(db_err)?;
        Ok(rows)
    }

    /// Opens an attempt (one bulk task) for `things`, all in one transaction:
    /// the attempt row, and each device assigned to it with one more try.
    pub fn add_attempt(&mut self, batch: &str, attempt: i64, bucket: &str, key: &str, things: &[String]) -> Result<()> {
        let tx = self.conn.transaction().map_err(db_err)?;
        tx.execute(
            "INSERT INTO attempts (batch_id, attempt, s3_bucket, s3_key, lines) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![batch, attempt, bucket, key, things.len() as i64],
        )
        .map_err(db_err)?;
        {
            let mut st = tx
                .prepare(
                    "UPDATE devices SET attempt = ?3, tries = tries + 1, state = ?4, error_class = NULL, error = NULL
                     WHERE batch_id = ?1 AND thing_name = ?2",
                )
                .map_err(db_err)?;
            for t in things {
                st.execute(params![batch, t, attempt, state::STAGED]).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    pub fn set_reconciled(&self, batch: &str, attempt: i64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE attempts SET reconciled = 1 WHERE batch_id = ?1 AND attempt = ?2",
                params![batch, attempt],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_uploaded(&self, batch: &str, attempt: i64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE attempts SET uploaded = 1 WHERE batch_id = ?1 AND attempt = ?2",
                params![batch, attempt],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_task(&self, batch: &str, attempt: i64, task_id: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE attempts SET task_id = ?3, started_at = ?4 WHERE batch_id = ?1 AND attempt = ?2",
                params![batch, attempt, task_id, now()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_task_end(
        &self,
        batch: &str,
        attempt: i64,
        status: &str,
        success: i64,
        failure: i64,
        message: Option<&str>,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE attempts SET task_status = ?3, success_count = ?4, failure_count = ?5, message = ?6, ended_at = ?7
                 WHERE batch_id = ?1 AND attempt = ?2",
                params![batch, attempt, status, success, failure, message, now()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_reports_done(&self, batch: &str, attempt: i64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE attempts SET reports_done = 1 WHERE batch_id = ?1 AND attempt = ?2",
                params![batch, attempt],
            )
            .map_err(db_err)?;
        Ok(())
    }
}

const DEVICE_COLUMNS: &str = "seq, serial, thing_name, file, line, fingerprint, record, key_fingerprint, key_type, state, attempt, tries, certificate_id, certificate_pem, error_class, error";

fn device_row(r: &rusqlite::Row<'_>, o: usize) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        seq: r.get(o)?,
        serial: r.get(o + 1)?,
        thing_name: r.get(o + 2)?,
        file: r.get(o + 3)?,
        line: r.get(o + 4)?,
        fingerprint: r.get(o + 5)?,
        record: r.get(o + 6)?,
        key_fingerprint: r.get(o + 7)?,
        key_type: r.get(o + 8)?,
        state: r.get(o + 9)?,
        attempt: r.get(o + 10)?,
        tries: r.get(o + 11)?,
        certificate_id: r.get(o + 12)?,
        certificate_pem: r.get(o + 13)?,
        error_class: r.get(o + 14)?,
        error: r.get(o + 15)?,
    })
}
