//! Ingest: read the manufacturing CSVs of a batch, validate and normalise
//! every row, and find duplicates across the whole batch.
//!
//! Rows are read with the `csv` crate, which keeps each record's line, so a
//! problem can name file, line and column; batch-wide checks (duplicates)
//! run on a polars frame. Every problem is collected before anything stops.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
}

pub struct Ingested {
    pub files: Vec<InputFile>,
    pub devices: Vec<Device>,
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
    let mut devices = Vec::new();
    // Rows with a problem, by index into `devices` (under skip_invalid they are dropped).
    let mut bad_rows: BTreeSet<usize> = BTreeSet::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::from(Problem::new(format!("cannot read the file: {e}")).file(path.display().to_string()))
        })?;
        let before = devices.len();
        match read_file(path, &bytes, opts, &mut devices, &mut problems, &mut bad_rows) {
            Ok(file) => files.push(file),
            Err(p) => problems.push(*p),
        }
        tracing::debug!(file = %path.display(), rows = devices.len() - before, "read");
    }
    find_duplicates(&devices, &mut problems, &mut bad_rows)?;

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
    let devices = devices
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !bad_rows.contains(i))
        .map(|(_, d)| d)
        .collect();
    Ok(Ingested {
        files,
        devices,
        skipped: problems,
    })
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
    devices: &mut Vec<Device>,
    problems: &mut Problems,
    bad_rows: &mut BTreeSet<usize>,
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
        let index = devices.len();
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
        if row_bad {
            bad_rows.insert(index);
        }
        devices.push(Device {
            serial,
            thing_name,
            values,
            file: display.clone(),
            line,
            csr,
        });
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
fn find_duplicates(devices: &[Device], problems: &mut Problems, bad_rows: &mut BTreeSet<usize>) -> Result<()> {
    type KeyOf = Box<dyn Fn(&Device) -> Option<String>>;
    let checks: [(&str, &str, KeyOf); 3] = [
        (
            "serial_number",
            "serial number",
            Box::new(|d: &Device| Some(d.serial.clone()).filter(|s| !s.is_empty())),
        ),
        (
            "thing name",
            "thing name",
            Box::new(|d: &Device| Some(d.thing_name.clone()).filter(|s| !s.is_empty())),
        ),
        (
            "csr",
            "device CSR",
            Box::new(|d: &Device| d.csr.as_ref().map(|c| sha256_hex(&c.der))),
        ),
    ];
    let mut seen_pairs = BTreeSet::new();
    for (column, what, key_of) in checks.iter() {
        let mut keys = Vec::with_capacity(devices.len());
        let mut rows = Vec::with_capacity(devices.len());
        for (i, d) in devices.iter().enumerate() {
            if let Some(k) = key_of(d) {
                keys.push(k);
                rows.push(i as u32);
            }
        }
        for group in duplicate_groups(keys, rows).map_err(|e| anyhow::anyhow!("duplicate check: {e}"))? {
            // The serial check already names rows whose thing names collide for the same reason.
            if !seen_pairs.insert(group.clone()) {
                continue;
            }
            let first = &devices[group[0]];
            let places: Vec<String> = group
                .iter()
                .map(|&i| format!("{}:{}", devices[i].file, devices[i].line))
                .collect();
            for &i in &group {
                let d = &devices[i];
                let others: Vec<&String> = places
                    .iter()
                    .zip(&group)
                    .filter(|(_, &j)| j != i)
                    .map(|(p, _)| p)
                    .collect();
                let shown = if *column == "csr" {
                    String::new()
                } else if *column == "thing name" {
                    format!(" `{}`", first.thing_name)
                } else {
                    format!(" `{}`", first.serial)
                };
                problems.push(
                    Problem::new(format!(
                        "duplicate {what}{shown}: also on {}",
                        others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                    .file(d.file.to_string())
                    .line(d.line)
                    .column(column.to_string()),
                );
                bad_rows.insert(i);
            }
        }
    }
    Ok(())
}

/// Groups of row indices that share a key, each group in row order, found
/// with a polars group-by so that a million-row batch stays fast.
fn duplicate_groups(keys: Vec<String>, rows: Vec<u32>) -> PolarsResult<Vec<Vec<usize>>> {
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
    let key_col = out.column("key")?.str()?.clone();
    let row_col = out.column("row")?.u32()?.clone();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (k, r) in key_col.iter().zip(row_col.iter()) {
        let (Some(k), Some(r)) = (k, r) else { continue };
        let g = *by_key.entry(k.to_string()).or_insert_with(|| {
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
        let keys = ["a", "b", "a", "c", "b", "a"].map(String::from).to_vec();
        let rows = (0..6).collect();
        let g = duplicate_groups(keys, rows).unwrap();
        assert_eq!(g, vec![vec![0, 2, 5], vec![1, 4]]);
    }
}
