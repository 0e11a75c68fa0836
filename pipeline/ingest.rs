//! Ingest: read the manufacturing CSVs of a batch, validate and normalise
//! every row, and find duplicates across the whole batch.
//!
//! Rows are read with the `csv` crate, which keeps each record's line, so a
//! problem can name file, line and column. Each device goes into a
//! [`Spool`] on disk as it is read, never into one big vector: later steps
//! walk it a page at a time. Batch-wide checks (duplicates) run on a polars
//! frame of 64-bit hashes, and each group it finds is confirmed against the
//! rows themselves. Every problem is collected before anything stops.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use polars::prelude::*;

use crate::crypto::sha256_hex;
use crate::csr::{check_csr, DeviceCsr};
use crate::error::{Error, Problem, Problems, Result};
use crate::profile::{ColumnKind, NamePattern, Profile};
use crate::rules::{check_attribute_value, check_thing_name};

/// One input file of the batch.
#[derive(Clone, Debug)]
pub struct InputFile {
    pub path: PathBuf,
    pub sha256: String,
    pub rows: usize,
    pub delimiter: u8,
}

/// One device, as read from its row.
#[derive(Clone, Debug)]
pub struct Device {
    pub serial: String,
    pub thing_name: String,
    /// Normalised values by profile column name (or trimmed header for
    /// columns the profile does not know).
    pub values: BTreeMap<String, String>,
    pub file: Arc<str>,
    pub line: u64,
    /// The CSR made on the device, when the row carries one.
    pub csr: Option<DeviceCsr>,
}

impl Device {
    pub fn value(&self, column: &str) -> Option<&str> {
        self.values.get(column).map(String::as_str)
    }
    /// A digest of everything that defines this device, to tell a re-run of
    /// the same row from a conflicting one.
    pub fn fingerprint(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.values {
            s.push_str(k);
            s.push('\u{1f}');
            s.push_str(v);
            s.push('\u{1e}');
        }
        s.push_str(&self.thing_name);
        sha256_hex(s.as_bytes())
    }
}

pub struct IngestOptions<'a> {
    pub profile: &'a Profile,
    pub pattern: &'a NamePattern,
    /// Columns whose values become thing attributes, checked against AWS's
    /// attribute value rules.
    pub attribute_columns: &'a BTreeSet<String>,
    /// Send the valid rows and report the rest, instead of rejecting the batch.
    pub skip_invalid: bool,
    /// Force a delimiter instead of detecting one per file.
    pub delimiter: Option<u8>,
    /// Columns the template reads beyond the profile's.
    pub template_columns: &'a BTreeSet<String>,
    /// Where the spool file goes (the output directory); None: the system's temporary directory.
    pub spool_dir: Option<&'a Path>,
}

pub struct Ingested {
    pub files: Vec<InputFile>,
    pub devices: Spool,
    /// Rows left out under `skip_invalid`, with why.
    pub skipped: Problems,
}

/// Reads and checks every file. Without `skip_invalid`, any problem rejects
/// the whole batch with the full list.
pub fn ingest(paths: &[PathBuf], opts: &IngestOptions<'_>) -> Result<Ingested> {
    if paths.is_empty() {
        return Err(Error::config("no input CSV given"));
    }
    let mut problems = Problems::default();
    let mut files = Vec::new();
    let mut devices = Spool::create(opts.spool_dir)?;
    let mut hashes = Hashes::default();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::from(Problem::new(format!("cannot read the file: {e}")).file(path.display().to_string()))
        })?;
        let before = devices.pushed;
        match read_file(path, &bytes, opts, &mut devices, &mut hashes, &mut problems) {
            Ok(file) => files.push(file),
            Err(p) => problems.push(*p),
        }
        tracing::debug!(file = %path.display(), rows = devices.pushed - before, "read");
    }
    devices.commit()?;
    find_duplicates(&mut devices, hashes, &mut problems)?;
    devices.count_good()?;

    if problems.is_empty() {
        return Ok(Ingested {
            files,
            devices,
            skipped: Problems::default(),
        });
    }
    // A problem with no row (a missing column, an unreadable file) cannot be skipped.
    let file_level = problems.0.iter().any(|p| p.line.is_none() || p.line == Some(1));
    if !opts.skip_invalid || file_level {
        return Err(Error::Input(problems));
    }
    Ok(Ingested {
        files,
        devices,
        skipped: problems,
    })
}

/// The 64-bit hash of a key, for the duplicate check (groups are confirmed
/// on the values themselves, so a collision costs a lookup, never a false report).
fn hash64(key: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// One key's hashes and the rows they came from.
type Keyed64 = (Vec<u64>, Vec<u32>);

/// The keys of every row, hashed: all the duplicate check holds in memory
/// (12 bytes a row and key).
#[derive(Default)]
struct Hashes {
    serial: Keyed64,
    thing: Keyed64,
    csr: Keyed64,
}

/// The devices of a batch after ingest, in row order, kept in a temporary
/// SQLite file (deleted when the spool is dropped) rather than in memory.
/// Rows with a problem stay in the file, marked, and are never returned.
pub struct Spool {
    conn: rusqlite::Connection,
    _path: tempfile::TempPath,
    files: Vec<Arc<str>>,
    /// Rows pushed, good or bad.
    pushed: usize,
    good: usize,
    with_csr: usize,
}

/// A row as the duplicate check needs it.
struct Light {
    file: Arc<str>,
    line: u64,
    serial: String,
    thing_name: String,
    csr: Option<String>,
}

fn spool_err(e: rusqlite::Error) -> Error {
    Error::infra(format!("the ingest spool: {e}"))
}

impl Spool {
    fn create(dir: Option<&Path>) -> Result<Spool> {
        let dir = dir.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        let path = tempfile::Builder::new()
            .prefix(".provline-ingest-")
            .suffix(".sqlite")
            .tempfile_in(&dir)
            .map_err(|e| Error::infra(format!("cannot make the ingest spool in {}: {e}", dir.display())))?
            .into_temp_path();
        let conn = rusqlite::Connection::open(&path).map_err(spool_err)?;
        // Scratch data, rebuilt from the CSVs on any failure: no journal, no sync.
        conn.execute_batch(
            "PRAGMA journal_mode = OFF;
             PRAGMA synchronous = OFF;
             CREATE TABLE rows (
                 seq        INTEGER PRIMARY KEY,
                 file       INTEGER NOT NULL,
                 line       INTEGER NOT NULL,
                 serial     TEXT NOT NULL,
                 thing_name TEXT NOT NULL,
                 vals       TEXT NOT NULL,
                 csr        TEXT,
                 bad        INTEGER NOT NULL
             );
             BEGIN;",
        )
        .map_err(spool_err)?;
        Ok(Spool {
            conn,
            _path: path,
            files: Vec::new(),
            pushed: 0,
            good: 0,
            with_csr: 0,
        })
    }

    fn push(&mut self, d: &Device, bad: bool) -> Result<usize> {
        let file = match self
            .files
            .iter()
            .rposition(|f| Arc::ptr_eq(f, &d.file) || **f == *d.file)
        {
            Some(i) => i,
            None => {
                self.files.push(d.file.clone());
                self.files.len() - 1
            }
        };
        let seq = self.pushed;
        let vals = serde_json::to_string(&d.values).map_err(|e| Error::Other(e.into()))?;
        self.conn
            .prepare_cached(
                "INSERT INTO rows (seq, file, line, serial, thing_name, vals, csr, bad) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut st| {
                st.execute(rusqlite::params![
                    seq as i64,
                    file as i64,
                    d.line as i64,
                    d.serial,
                    d.thing_name,
                    vals,
                    d.csr.as_ref().map(|c| c.pem.as_str()),
                    bad as i64
                ])
            })
            .map_err(spool_err)?;
        self.pushed += 1;
        Ok(seq)
    }

    fn commit(&mut self) -> Result<()> {
        self.conn.execute_batch("COMMIT").map_err(spool_err)
    }

    fn mark_bad(&self, seq: usize) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE rows SET bad = 1 WHERE seq = ?1")
            .and_then(|mut st| st.execute([seq as i64]))
            .map(|_| ())
            .map_err(spool_err)
    }

    fn count_good(&mut self) -> Result<()> {
        let (good, csr): (i64, i64) = self
            .conn
            .query_row("SELECT count(*), count(csr) FROM rows WHERE bad = 0", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(spool_err)?;
        self.good = good as usize;
        self.with_csr = csr as usize;
        Ok(())
    }

    fn light(&self, seq: u32) -> Result<Light> {
        self.conn
            .prepare_cached("SELECT file, line, serial, thing_name, csr FROM rows WHERE seq = ?1")
            .and_then(|mut st| {
                st.query_row([seq as i64], |r| {
                    Ok(Light {
                        file: self.files[r.get::<_, i64>(0)? as usize].clone(),
                        line: r.get::<_, i64>(1)? as u64,
                        serial: r.get(2)?,
                        thing_name: r.get(3)?,
                        csr: r.get(4)?,
                    })
                })
            })
            .map_err(spool_err)
    }

    /// The good devices: how many.
    pub fn len(&self) -> usize {
        self.good
    }

    pub fn is_empty(&self) -> bool {
        self.good == 0
    }

    /// How many of them carry a CSR made on the device.
    pub fn with_device_csr(&self) -> usize {
        self.with_csr
    }

    /// Up to `limit` good devices after row `after` (-1: from the start);
    /// returns them with the row number of the last.
    fn page(&self, after: i64, limit: usize) -> Result<(Vec<Device>, i64)> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT seq, file, line, serial, thing_name, vals, csr FROM rows WHERE seq > ?1 AND bad = 0 ORDER BY seq LIMIT ?2",
            )
            .map_err(spool_err)?;
        let mut rows = st.query(rusqlite::params![after, limit as i64]).map_err(spool_err)?;
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut last = after;
        while let Some(r) = rows.next().map_err(spool_err)? {
            last = r.get(0).map_err(spool_err)?;
            let file = self.files[r.get::<_, i64>(1).map_err(spool_err)? as usize].clone();
            let vals: String = r.get(5).map_err(spool_err)?;
            let csr: Option<String> = r.get(6).map_err(spool_err)?;
            out.push(Device {
                serial: r.get(3).map_err(spool_err)?,
                thing_name: r.get(4).map_err(spool_err)?,
                values: serde_json::from_str(&vals).map_err(|e| Error::infra(format!("the ingest spool: {e}")))?,
                line: r.get::<_, i64>(2).map_err(spool_err)? as u64,
                csr: match csr {
                    Some(pem) => Some(
                        check_csr(&pem)
                            .map_err(|e| Error::infra(format!("{file}: a device CSR read back from the spool: {e}")))?,
                    ),
                    None => None,
                },
                file,
            });
        }
        Ok((out, last))
    }

    /// Every good device in row order, read back a page at a time.
    pub fn iter(&self) -> SpoolIter<'_> {
        SpoolIter {
            spool: self,
            buf: Vec::new().into_iter(),
            after: -1,
            done: false,
        }
    }
}

pub struct SpoolIter<'a> {
    spool: &'a Spool,
    buf: std::vec::IntoIter<Device>,
    after: i64,
    done: bool,
}

impl Iterator for SpoolIter<'_> {
    type Item = Result<Device>;

    fn next(&mut self) -> Option<Result<Device>> {
        loop {
            if let Some(d) = self.buf.next() {
                return Some(Ok(d));
            }
            if self.done {
                return None;
            }
            match self.spool.page(self.after, 4096) {
                Ok((page, _)) if page.is_empty() => {
                    self.done = true;
                    return None;
                }
                Ok((page, last)) => {
                    self.after = last;
                    self.buf = page.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn detect_delimiter(text: &str) -> u8 {
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut counts = [(b',', 0usize), (b';', 0), (b'\t', 0)];
    let mut quoted = false;
    for c in first.bytes() {
        if c == b'"' {
            quoted = !quoted;
        } else if !quoted {
            for (d, n) in counts.iter_mut() {
                if *d == c {
                    *n += 1;
                }
            }
        }
    }
    counts
        .iter()
        .max_by_key(|(_, n)| *n)
        .filter(|(_, n)| *n > 0)
        .map(|(d, _)| *d)
        .unwrap_or(b',')
}

fn read_file(
    path: &Path,
    bytes: &[u8],
    opts: &IngestOptions<'_>,
    devices: &mut Spool,
    hashes: &mut Hashes,
    problems: &mut Problems,
) -> std::result::Result<InputFile, Box<Problem>> {
    let display: Arc<str> = path.display().to_string().into();
    let at = |line: u64| Problem::new("").file(display.to_string()).line(line);
    let sha256 = sha256_hex(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() as u64 + 1;
        Problem {
            message: format!(
                "the file is not UTF-8 (invalid byte at offset {}); export it as UTF-8",
                e.valid_up_to()
            ),
            ..at(line)
        }
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // The csv crate counts CRLF line ends one short; with LF only, every
    // reported line is the line an editor shows. No value keeps a `\r` either.
    let text: std::borrow::Cow<'_, str> = if text.contains('\r') {
        text.replace("\r\n", "\n").into()
    } else {
        text.into()
    };
    let text = text.as_ref();
    let delimiter = opts.delimiter.unwrap_or_else(|| detect_delimiter(text));
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(true)
        .from_reader(text.as_bytes());

    // Header: trimmed names, matched to the profile.
    let headers = reader.headers().map_err(|e| Problem {
        message: format!("the header does not parse: {e}"),
        ..at(1)
    })?;
    let mut columns: Vec<String> = Vec::new();
    let mut header_problems = Vec::new();
    for (i, raw) in headers.iter().enumerate() {
        let trimmed = raw.trim();
        if trimmed != raw {
            tracing::info!(file = %path.display(), column = trimmed, "trimmed spaces around a header name");
        }
        let name = match opts.profile.column_for_header(trimmed) {
            Some(rule) => rule.name.clone(),
            None => trimmed.to_string(),
        };
        if name.is_empty() {
            header_problems.push(format!("header field {} is empty", i + 1));
        } else if columns.contains(&name) {
            header_problems.push(format!("column `{name}` appears twice in the header"));
        }
        columns.push(name);
    }
    // A column nobody reads is usually a misspelt one: say so rather than
    // send the device without it.
    let known: Vec<&str> = opts
        .profile
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .chain(opts.template_columns.iter().map(String::as_str))
        .chain(opts.pattern.columns())
        .collect();
    for c in &columns {
        if known.contains(&c.as_str()) {
            continue;
        }
        let near = known
            .iter()
            .map(|k| (strsim::jaro_winkler(&c.to_lowercase(), k), *k))
            .filter(|(score, _)| *score >= 0.85)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        match near {
            Some((_, k)) if !columns.iter().any(|x| x == k) => header_problems.push(format!(
                "unknown column `{c}`: did you mean `{k}`? (a column the profile and template do not know is not sent; rename it, or add it to the profile)"
            )),
            _ => tracing::warn!(file = %path.display(), column = %c, "this column is not read by the profile or the template; it is ignored"),
        }
    }
    if columns.len() == 1 {
        if let Some(d) = [",", ";", "\t"].iter().find(|d| columns[0].contains(**d)) {
            header_problems.push(format!(
                "the header reads as one column, `{}`, which contains `{}`: is the delimiter right? (--delimiter, or leave it to detection)",
                columns[0].escape_debug(),
                d.escape_debug()
            ));
        }
    }
    let missing: Vec<&str> = opts
        .profile
        .columns
        .iter()
        .filter(|c| c.required && !columns.contains(&c.name))
        .map(|c| c.name.as_str())
        .collect();
    if !missing.is_empty() {
        header_problems.push(format!(
            "required column{} {} missing; the header has: {}",
            if missing.len() == 1 { " is" } else { "s are" },
            missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
            columns.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
        ));
    }
    for col in opts.pattern.columns() {
        if !columns.iter().any(|c| c == col) {
            header_problems.push(format!(
                "the thing name pattern reads column `{col}`, which this file does not have"
            ));
        }
    }
    if !header_problems.is_empty() {
        return Err(Box::new(Problem {
            message: header_problems.join("; "),
            ..at(1)
        }));
    }

    let mut rows = 0usize;
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                problems.push(Problem {
                    message: format!("the row does not parse as CSV: {e}"),
                    ..at(line)
                });
                continue;
            }
        }
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.iter().all(|f| f.trim().is_empty()) {
            continue; // a blank line, or a line of bare delimiters
        }
        rows += 1;
        if record.len() != columns.len() {
            problems.push(Problem {
                message: format!(
                    "expected {} fields (as in the header), found {}",
                    columns.len(),
                    record.len()
                ),
                ..at(line)
            });
            continue;
        }
        let mut row_bad = false;
        let mut values = BTreeMap::new();
        let mut csr = None;
        for (name, raw) in columns.iter().zip(record.iter()) {
            let rule = opts.profile.rule(name);
            let kind = rule.map(|r| r.kind).unwrap_or(ColumnKind::Text);
            let mut report = |msg: String| {
                problems.push(Problem {
                    message: msg,
                    ..at(line).column(name.clone())
                });
                row_bad = true;
            };
            let value = match kind {
                ColumnKind::Csr => {
                    if !raw.trim().is_empty() {
                        match check_csr(raw) {
                            Ok(c) => csr = Some(c),
                            Err(e) => report(e),
                        }
                    }
                    continue;
                }
                _ if rule.is_some() => match rule.expect("checked").apply(raw.trim()) {
                    Ok(v) => v,
                    Err(e) => {
                        report(e);
                        continue;
                    }
                },
                _ => raw.trim().to_string(),
            };
            if rule.is_some_and(|r| r.required) && value.is_empty() {
                report("a value is required here".into());
                continue;
            }
            if opts.attribute_columns.contains(name) {
                if let Err(e) = check_attribute_value(&value) {
                    report(e);
                    continue;
                }
            }
            values.insert(name.clone(), value);
        }
        let thing_name = opts.pattern.render(|c| values.get(c).cloned());
        let serial = values.get("serial_number").cloned().unwrap_or_default();
        if !row_bad {
            if let Err(e) = check_thing_name(&thing_name) {
                let cols: Vec<&str> = opts.pattern.columns().collect();
                problems.push(Problem {
                    message: e,
                    ..at(line).column(cols.join("+"))
                });
                row_bad = true;
            }
        }
        let device = Device {
            serial,
            thing_name,
            values,
            file: display.clone(),
            line,
            csr,
        };
        let seq = devices.push(&device, row_bad).map_err(|e| Problem {
            message: e.to_string(),
            ..at(line)
        })? as u32;
        if !device.serial.is_empty() {
            hashes.serial.0.push(hash64(&device.serial));
            hashes.serial.1.push(seq);
        }
        if !device.thing_name.is_empty() {
            hashes.thing.0.push(hash64(&device.thing_name));
            hashes.thing.1.push(seq);
        }
        if let Some(c) = &device.csr {
            hashes.csr.0.push(hash64(&c.pem));
            hashes.csr.1.push(seq);
        }
    }
    if rows == 0 {
        return Err(Box::new(Problem {
            message: "the file has a header but no rows".into(),
            ..at(1)
        }));
    }
    Ok(InputFile {
        path: path.to_path_buf(),
        sha256,
        rows,
        delimiter,
    })
}

/// Rows that share a serial number, a thing name or a device CSR.
fn find_duplicates(devices: &mut Spool, hashes: Hashes, problems: &mut Problems) -> Result<()> {
    type KeyOf = fn(&Light) -> Option<String>;
    let checks: [(&str, &str, KeyOf, Keyed64); 3] = [
        (
            "serial_number",
            "serial number",
            |d| Some(d.serial.clone()).filter(|s| !s.is_empty()),
            hashes.serial,
        ),
        (
            "thing name",
            "thing name",
            |d| Some(d.thing_name.clone()).filter(|s| !s.is_empty()),
            hashes.thing,
        ),
        ("csr", "device CSR", |d| d.csr.clone(), hashes.csr),
    ];
    let mut seen_pairs = BTreeSet::new();
    for (column, what, key_of, (keys, rows)) in checks {
        let candidates = duplicate_groups(keys, rows).map_err(|e| anyhow::anyhow!("duplicate check: {e}"))?;
        for candidate in candidates {
            // Equal hashes: group the rows by their actual key.
            let lights: Vec<(usize, Light)> = candidate
                .iter()
                .map(|&i| devices.light(i as u32).map(|l| (i, l)))
                .collect::<Result<_>>()?;
            let mut exact: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (pos, (_, l)) in lights.iter().enumerate() {
                if let Some(k) = key_of(l) {
                    exact.entry(k).or_default().push(pos);
                }
            }
            for members in exact.into_values().filter(|m| m.len() > 1) {
                let group: Vec<usize> = members.iter().map(|&p| lights[p].0).collect();
                // The serial check already names rows whose thing names collide for the same reason.
                if !seen_pairs.insert(group.clone()) {
                    continue;
                }
                let first = &lights[members[0]].1;
                let places: Vec<String> = members
                    .iter()
                    .map(|&p| format!("{}:{}", lights[p].1.file, lights[p].1.line))
                    .collect();
                for (k, &p) in members.iter().enumerate() {
                    let d = &lights[p].1;
                    let others: Vec<&str> = places
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != k)
                        .map(|(_, s)| s.as_str())
                        .collect();
                    let shown = if column == "csr" {
                        String::new()
                    } else if column == "thing name" {
                        format!(" `{}`", first.thing_name)
                    } else {
                        format!(" `{}`", first.serial)
                    };
                    problems.push(
                        Problem::new(format!("duplicate {what}{shown}: also on {}", others.join(", ")))
                            .file(d.file.to_string())
                            .line(d.line)
                            .column(column.to_string()),
                    );
                    devices.mark_bad(lights[p].0)?;
                }
            }
        }
    }
    Ok(())
}

/// Groups of row indices that share a key hash, each group in row order,
/// found with a polars group-by so that a million-row batch stays fast.
fn duplicate_groups(keys: Vec<u64>, rows: Vec<u32>) -> PolarsResult<Vec<Vec<usize>>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let df = DataFrame::new_infer_height(vec![Column::new("key".into(), keys), Column::new("row".into(), rows)])?;
    let dup_keys = df
        .clone()
        .lazy()
        .group_by([col("key")])
        .agg([len().alias("n")])
        .filter(col("n").gt(lit(1u32)));
    let out = df
        .lazy()
        .inner_join(dup_keys, col("key"), col("key"))
        .select([col("key"), col("row")])
        .sort(["row"], Default::default())
        .collect()?;
    let key_col = out.column("key")?.u64()?.clone();
    let row_col = out.column("row")?.u32()?.clone();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_key: HashMap<u64, usize> = HashMap::new();
    for (k, r) in key_col.iter().zip(row_col.iter()) {
        let (Some(k), Some(r)) = (k, r) else { continue };
        let g = *by_key.entry(k).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(r as usize);
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delimiter_is_detected_outside_quotes() {
        assert_eq!(detect_delimiter("a;b;c\n1;2;3"), b';');
        assert_eq!(detect_delimiter("a\tb\n"), b'\t');
        assert_eq!(detect_delimiter("\"x;y\",b,c"), b',');
    }

    #[test]
    fn duplicate_groups_are_in_row_order() {
        let keys = [7u64, 9, 7, 3, 9, 7].to_vec();
        let rows = (0..6).collect();
        let g = duplicate_groups(keys, rows).unwrap();
        assert_eq!(g, vec![vec![0, 2, 5], vec![1, 4]]);
    }
}
