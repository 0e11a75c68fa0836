//! The bulk pipeline for one batch, as a state machine over the ledger: each
//! step looks at what the ledger says is done and does the rest, so `run`,
//! a re-run and `resume` all go through the same code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use sha2::Digest;

use crate::aws::{describe, Aws};
use crate::bundle::{write_bundle, BundleInput};
use crate::crypto::KeyId;
use crate::error::{exit, Error, Problem, Problems, Result};
use crate::ingest::{ingest, IngestOptions};
use crate::keygen::{generate_all, KeyType, Keyed};
use crate::keystore::KeyStore;
use crate::ledger::{batch_state, state, AttemptRow, DeviceRow, Ledger, NewDevice, Outcome};
use crate::profile::{NamePattern, Profile};
use crate::reconcile::{reconcile, verify_certificate, StagedDevice, Verdict};
use crate::stage::{registration_line, Credential, StoredDevice};
use crate::template::Template;
use crate::workspace::{write_durable, Workspace};

/// How device certificates are made and registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// AWS signs each device's CSR in the bulk task.
    #[default]
    AwsCsr,
    /// provline signs with the factory CA; the bulk task registers the certificates.
    Byoca,
    /// provline signs with the factory CA; devices provision themselves on first connect (JITP).
    Jitp,
    /// provline signs with the factory CA; devices register as pending on first connect and
    /// `provline approve` activates them (JITR).
    Jitr,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::AwsCsr => "aws-csr",
            Mode::Byoca => "byoca",
            Mode::Jitp => "jitp",
            Mode::Jitr => "jitr",
        }
    }

    /// Whether the factory CA signs the device certificates.
    pub fn own_ca(self) -> bool {
        self != Mode::AwsCsr
    }

    /// Whether a bulk task registers the devices.
    pub fn registers(self) -> bool {
        matches!(self, Mode::AwsCsr | Mode::Byoca)
    }
}

/// What `provline run` was asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub key_type: KeyType,
    pub template: Option<PathBuf>,
    /// The profile (TOML); None uses the default one.
    pub profile: Option<PathBuf>,
    /// Overrides the profile's thing name pattern.
    pub thing_name: Option<String>,
    pub policy: Option<String>,
    pub bucket: Option<String>,
    pub prefix: String,
    pub role_arn: Option<String>,
    pub dry_run: bool,
    pub skip_invalid: bool,
    pub delimiter: Option<u8>,
    /// How long to follow a task before leaving it to `resume`.
    pub task_timeout: Option<Duration>,
    pub chunk_size: usize,
    pub max_retries: u32,
    pub mode: Mode,
    /// The factory CA's directory, for the own-CA modes.
    pub ca_dir: Option<PathBuf>,
    pub bundle_format: crate::bundle::BundleFormat,
}

/// The part of a run that defines the batch, kept in the ledger so that
/// `resume` needs nothing but the output directory.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub key_type: KeyType,
    pub template_source: String,
    pub template_body: String,
    pub thing_name: String,
    pub bucket: String,
    pub prefix: String,
    pub role_arn: String,
    pub inputs: Vec<String>,
    pub task_timeout_secs: Option<u64>,
    /// Devices per bulk task.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: usize,
    /// Follow-up tasks for a device whose line failed for a retryable reason.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Random, made when the batch is first recorded: it keeps this ledger's
    /// S3 keys (and so the tasks found by input key) apart from any other
    /// ledger's run of the same rows.
    #[serde(default)]
    pub run_id: String,
    /// Rows left out under --skip-invalid, with why.
    #[serde(default)]
    pub skipped: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Own-CA modes: where the CA is, its id, and the chain a device presents.
    #[serde(default)]
    pub ca_dir: Option<String>,
    #[serde(default)]
    pub ca_id: Option<String>,
    #[serde(default)]
    pub ca_chain_pem: Option<String>,
    #[serde(default)]
    pub certificate: crate::profile::CertificateSpec,
    /// The profile's `[parameters]`: template parameter -> column.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub bundle_format: crate::bundle::BundleFormat,
}

fn default_chunk_size() -> usize {
    10_000
}

fn default_max_retries() -> u32 {
    2
}

/// What a finished (or stopped) batch came to.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub batch: String,
    pub dir: PathBuf,
    pub devices: usize,
    pub registered: usize,
    pub failed: usize,
    pub bundled: usize,
    pub skipped: usize,
    pub task_ids: Vec<String>,
    pub already_done: bool,
    /// Wall time per stage in this run.
    pub stage_seconds: BTreeMap<&'static str, f64>,
}

impl Summary {
    pub fn exit_code(&self) -> i32 {
        if self.failed == 0 && self.skipped == 0 && self.bundled == self.devices {
            exit::OK
        } else {
            exit::PARTIAL
        }
    }
}

/// Per-stage wall time, for report.json.
#[derive(Default)]
pub struct Timings(pub BTreeMap<&'static str, f64>);

impl Timings {
    fn add(&mut self, stage: &'static str, since: Instant) {
        *self.0.entry(stage).or_default() += since.elapsed().as_secs_f64();
    }
}

/// The stages in pipeline order, as report.json and the summary name them.
pub const STAGES: [&str; 8] = [
    "ingest",
    "keygen",
    "persist",
    "stage",
    "register",
    "reconcile",
    "bundle",
    "report",
];

pub const LEDGER_FILE: &str = "ledger.sqlite";
const LOCK_FILE: &str = ".provline.lock";

/// Holds the output directory's lock for the life of a command: one provline
/// per ledger at a time.
pub struct DirLock(#[allow(dead_code)] std::fs::File);

pub fn lock_out_dir(out: &std::path::Path) -> Result<DirLock> {
    std::fs::create_dir_all(out).map_err(|e| Error::config(format!("cannot create {}: {e}", out.display())))?;
    let path = out.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::infra(format!("cannot open {}: {e}", path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(DirLock(f)),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::infra(format!(
            "another provline process is working in {} (it holds {}); wait for it to finish, one process per ledger",
            out.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::infra(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// Everything before anything is generated or sent: template, ingest,
/// batch identity. Used by `run`, `--dry-run` and `lint`.
pub struct Prepared {
    pub settings: Settings,
    pub template: Template,
    /// The rows, on disk: walk them with `devices.iter()`.
    pub devices: crate::ingest::Spool,
    pub files: Vec<crate::ingest::InputFile>,
    pub skipped: Problems,
    pub batch: String,
    pub digest: String,
}

pub fn prepare(opts: &RunOptions, sandbox_defaults: bool) -> Result<Prepared> {
    let profile = match &opts.profile {
        Some(p) => Profile::load(p)?,
        None => Profile::default(),
    };
    let (template_source, body) = match &opts.template {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p)
                .map_err(|e| Error::config(format!("cannot read the template {}: {e}", p.display())))?,
        ),
        None => {
            let policy = match (opts.policy.as_ref().or(profile.policy.as_ref()), sandbox_defaults) {
                (Some(p), _) => p.clone(),
                (None, true) => crate::sandbox_setup::SANDBOX_POLICY.to_string(),
                (None, false) => {
                    return Err(Error::config(
                        "the built-in template attaches a policy: name an existing IoT policy with --policy NAME or `policy` in the profile (or give --template FILE)",
                    ))
                }
            };
            let source = if opts.mode == Mode::Byoca {
                crate::template::CertificateSource::OwnCa
            } else {
                crate::template::CertificateSource::Csr
            };
            let body = crate::template::builtin_for(
                &policy,
                &profile.attributes,
                profile.thing_type.as_deref(),
                &profile.thing_groups,
                source,
            );
            ("built-in template".to_string(), body)
        }
    };
    let template = Template::check(&template_source, &body).map_err(Error::Input)?;
    match opts.mode {
        Mode::AwsCsr if template.csr_param.is_none() => {
            return Err(Error::config(format!(
                "{template_source}: the certificate resource must take its CSR from a parameter ({{\"Ref\": \"CSR\"}}) so that provline can supply each device's CSR{}",
                if template.cert_pem_param.is_some() { "; a template with CertificatePem is for --mode byoca --ca DIR" } else { "" }
            )));
        }
        Mode::Byoca if template.cert_pem_param.is_none() => {
            return Err(Error::config(format!(
                "{template_source}: in byoca mode the certificate resource must take its certificate from parameters ({{\"CertificatePem\": {{\"Ref\": \"CertificatePem\"}}, \"CACertificatePem\": {{\"Ref\": \"CACertificatePem\"}}}}) so that provline can supply the certificates it signs"
            )));
        }
        _ => {}
    }
    let ca = match (opts.mode.own_ca(), &opts.ca_dir) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(Error::config(
                "--ca is for the own-CA modes: add --mode byoca, jitp or jitr",
            ))
        }
        (true, None) => {
            return Err(Error::config(format!(
                "--mode {} signs device certificates with your CA: give --ca DIR (made with `provline ca init` or `provline ca import`)",
                opts.mode.as_str()
            )))
        }
        (true, Some(dir)) => Some(crate::ca::load(dir)?),
    };
    let thing_name = opts.thing_name.clone().unwrap_or_else(|| profile.thing_name.clone());
    let pattern = NamePattern::parse(&thing_name)?;
    let attribute_columns = template.attribute_columns(&profile.parameters);
    let template_columns: BTreeSet<String> = template
        .parameters
        .keys()
        .map(|p| template.column_of(p, &profile.parameters))
        .collect();
    let ingested = ingest(
        &opts.inputs,
        &IngestOptions {
            profile: &profile,
            pattern: &pattern,
            attribute_columns: &attribute_columns,
            skip_invalid: opts.skip_invalid,
            delimiter: opts.delimiter.or(profile.delimiter),
            template_columns: &template_columns,
            // Beside the output (the nearest directory that exists), not in a
            // temporary directory that may be memory.
            spool_dir: opts
                .out
                .ancestors()
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        std::path::Path::new(".")
                    } else {
                        a
                    }
                })
                .find(|a| a.is_dir()),
        },
    )?;
    if ingested.devices.is_empty() && !ingested.skipped.is_empty() {
        // --skip-invalid, and no row was valid: say why each was skipped.
        return Err(Error::Input(ingested.skipped));
    }
    // One pass over the spool: the columns present, every certificate
    // subject (own CA), and the digest of the rows.
    let mut columns = BTreeSet::new();
    let mut subject_problems = Problems::default();
    let mut rows_digest = sha2::Sha256::new();
    for d in ingested.devices.iter() {
        let d = d?;
        columns.extend(d.values.keys().cloned());
        if ca.is_some() {
            if let Err(e) = profile.certificate.subject_for(&d.thing_name, &d.values) {
                subject_problems.push(
                    Problem::new(format!("certificate subject: {e}"))
                        .file(d.file.to_string())
                        .line(d.line)
                        .device(d.thing_name.clone()),
                );
            }
        }
        rows_digest.update(d.fingerprint().as_bytes());
        rows_digest.update(b"\n");
    }
    let optional: BTreeSet<String> = profile
        .columns
        .iter()
        .filter(|c| !c.required)
        .map(|c| c.name.clone())
        .collect();
    let unfilled = template.unfilled_parameters(&columns, &optional, &profile.parameters);
    if !unfilled.is_empty() {
        return Err(Error::config(format!(
            "{template_source}: parameter{} {} ha{} no Default and no column supplies {}; add the column{} to the CSV or a Default to the template",
            if unfilled.len() == 1 { "" } else { "s" },
            unfilled.iter().map(|u| format!("`{u}`")).collect::<Vec<_>>().join(", "),
            if unfilled.len() == 1 { "s" } else { "ve" },
            if unfilled.len() == 1 { "it" } else { "them" },
            if unfilled.len() == 1 { "" } else { "s" },
        )));
    }
    let settings = Settings {
        key_type: opts.key_type,
        template_source,
        template_body: body,
        thing_name,
        bucket: opts.bucket.clone().unwrap_or_default(),
        prefix: opts.prefix.trim_matches('/').to_string(),
        role_arn: opts.role_arn.clone().unwrap_or_default(),
        inputs: opts.inputs.iter().map(|p| p.display().to_string()).collect(),
        task_timeout_secs: opts.task_timeout.map(|d| d.as_secs()),
        chunk_size: opts.chunk_size,
        max_retries: opts.max_retries,
        run_id: format!("{:016x}", rand::random::<u64>()),
        skipped: ingested.skipped.0.iter().map(|p| p.to_string()).collect(),
        mode: opts.mode,
        ca_dir: opts.ca_dir.as_ref().map(|d| {
            std::path::absolute(d)
                .unwrap_or_else(|_| d.clone())
                .display()
                .to_string()
        }),
        ca_id: ca.as_ref().map(|c| c.id.clone()),
        ca_chain_pem: ca.as_ref().map(|c| c.chain_pem()),
        certificate: profile.certificate.clone(),
        parameters: profile.parameters.clone(),
        bundle_format: opts.bundle_format,
    };
    if let Some(ca) = &ca {
        // Every subject must be makeable before anything is signed.
        subject_problems.into_result()?;
        tracing::debug!(ca = %ca.id, "factory CA loaded");
    }
    // The batch is what is registered: the rows (after skipping), how keys
    // and names are made, and the template. Same inputs, same batch.
    let mut h = String::new();
    h.push_str(settings.key_type.as_str());
    h.push('\n');
    if settings.mode != Mode::AwsCsr {
        h.push_str(settings.mode.as_str());
        h.push('\n');
        h.push_str(settings.ca_id.as_deref().unwrap_or(""));
        h.push('\n');
        h.push_str(&serde_json::to_string(&settings.certificate).expect("json"));
        h.push('\n');
    }
    h.push_str(&settings.template_body);
    rows_digest.update(h.as_bytes());
    let digest = hex::encode(rows_digest.finalize());
    let batch = format!("batch-{}", &digest[..12]);
    Ok(Prepared {
        settings,
        template,
        devices: ingested.devices,
        files: ingested.files,
        skipped: ingested.skipped,
        batch,
        digest,
    })
}

/// The plan `--dry-run` prints: plain data, no endpoint needed.
pub fn plan(p: &Prepared, out: &std::path::Path) -> serde_json::Value {
    let sample: Vec<_> = p
        .devices
        .iter()
        .take(5)
        .filter_map(|d| d.ok())
        .map(|d| serde_json::json!({"thing_name": d.thing_name, "serial_number": d.serial, "from": format!("{}:{}", d.file, d.line), "device_csr": d.csr.is_some()}))
        .collect();
    let device_csrs = p.devices.with_device_csr();
    serde_json::json!({
        "batch": p.batch,
        "out": out.join(&p.batch),
        "inputs": p.files.iter().map(|f| serde_json::json!({"path": f.path, "rows": f.rows, "sha256": f.sha256, "delimiter": (f.delimiter as char).to_string()})).collect::<Vec<_>>(),
        "devices": p.devices.len(),
        "keys_to_generate": p.devices.len() - device_csrs,
        "device_csrs": device_csrs,
        "key_type": p.settings.key_type,
        "skipped_rows": p.skipped.0.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        "template": p.settings.template_source,
        "template_parameters": p.template.parameters.keys().collect::<Vec<_>>(),
        "policy": p.template.policy_name,
        "s3_input": format!("s3://{}/{}", p.settings.bucket, input_key(&p.settings, &p.batch, 1)),
        "role_arn": p.settings.role_arn,
        "sample": sample,
    })
}

fn input_key(s: &Settings, batch: &str, attempt: i64) -> String {
    let prefix = if s.prefix.is_empty() {
        String::new()
    } else {
        format!("{}/", s.prefix)
    };
    format!("{prefix}{batch}/attempt-{attempt}/registration.ndjson")
}

fn template_key(s: &Settings, batch: &str, attempt: i64) -> String {
    let prefix = if s.prefix.is_empty() {
        String::new()
    } else {
        format!("{}/", s.prefix)
    };
    format!("{prefix}{batch}/attempt-{attempt}/template.json")
}

/// Records a prepared batch in the ledger, refusing rows that conflict with
/// earlier batches. Returns false when the batch was already there.
/// Rows that conflict with earlier batches of the ledger: the same serial or
/// thing name with other data, or a device already provisioned.
pub fn check_conflicts(ledger: &Ledger, p: &Prepared) -> Result<()> {
    let mut problems = Problems::default();
    for d in p.devices.iter() {
        let d = d?;
        // A device CSR's key already used by another device of the ledger
        // would give one key two things' certificates.
        if let Some(csr) = &d.csr {
            for (other, row) in ledger.earlier_with_key(&p.batch, &csr.key.fingerprint())? {
                let live = matches!(
                    row.state.as_str(),
                    state::REGISTERED | state::BUNDLED | state::SUBMITTED | state::STAGED
                );
                if live && row.thing_name != d.thing_name {
                    problems.push(
                        Problem::new(format!(
                            "this device CSR's key is already registered for thing `{}` in {other} ({}:{}, {}); one key would then authenticate two things: each device needs its own key pair",
                            row.thing_name, row.file, row.line, row.state
                        ))
                        .file(d.file.to_string())
                        .line(d.line)
                        .column("csr")
                        .device(d.thing_name.clone()),
                    );
                }
            }
        }
        for (other, row) in ledger.earlier(&p.batch, &d.serial, &d.thing_name)? {
            let live = matches!(
                row.state.as_str(),
                state::REGISTERED | state::BUNDLED | state::SUBMITTED | state::STAGED
            );
            let what = if row.fingerprint != d.fingerprint() {
                let before: Option<StoredDevice> = serde_json::from_str(&row.record).ok();
                let mut diff: Vec<String> = Vec::new();
                if let Some(b) = &before {
                    if b.thing_name != d.thing_name {
                        diff.push(format!("thing name `{}` was `{}`", d.thing_name, b.thing_name));
                    }
                    let keys: BTreeSet<&String> = b.values.keys().chain(d.values.keys()).collect();
                    for k in keys {
                        let (old, new) = (b.values.get(k), d.values.get(k));
                        if old != new {
                            diff.push(format!(
                                "`{k}` is {} here, was {}",
                                new.map(|v| format!("`{v}`")).unwrap_or_else(|| "absent".into()),
                                old.map(|v| format!("`{v}`")).unwrap_or_else(|| "absent".into())
                            ));
                        }
                    }
                }
                format!(
                    "serial `{}` / thing `{}` is already in {other} ({}:{}) with different data ({}); provline never re-registers a device silently: correct the row, or remove it if the device was already provisioned",
                    d.serial, d.thing_name, row.file, row.line, if diff.is_empty() { "its rows differ".to_string() } else { diff.join("; ") }
                )
            } else if live {
                format!(
                    "device `{}` was already provisioned in {other} ({}:{}, {}); remove the row, or it would get a second certificate",
                    d.thing_name, row.file, row.line, row.state
                )
            } else {
                continue;
            };
            problems.push(
                Problem::new(what)
                    .file(d.file.to_string())
                    .line(d.line)
                    .device(d.thing_name.clone()),
            );
        }
    }
    problems.into_result()
}

pub fn record_batch(ledger: &mut Ledger, p: &Prepared) -> Result<bool> {
    if ledger.batch(&p.batch)?.is_some() {
        return Ok(false);
    }
    check_conflicts(ledger, p)?;
    let settings = serde_json::to_string(&p.settings).map_err(|e| Error::Other(e.into()))?;
    let inputs: Vec<(String, String, usize)> = p
        .files
        .iter()
        .map(|f| (f.path.display().to_string(), f.sha256.clone(), f.rows))
        .collect();
    // Each record is made as it is inserted, never all at once.
    let new = p.devices.iter().map(|d| {
        let d = d?;
        let record = serde_json::to_string(&StoredDevice {
            serial: d.serial.clone(),
            thing_name: d.thing_name.clone(),
            values: d.values.clone(),
            device_csr: d.csr.as_ref().map(|c| c.pem.clone()),
        })
        .expect("a stored device serialises");
        Ok(NewDevice {
            csr_key: d.csr.as_ref().map(|c| c.key.fingerprint()),
            fingerprint: d.fingerprint(),
            serial: d.serial,
            thing_name: d.thing_name,
            file: d.file.to_string(),
            line: d.line,
            record,
        })
    });
    ledger.create_batch(&p.batch, &p.digest, &settings, &inputs, new)?;
    Ok(true)
}

/// Devices per page when a stage walks the batch: what one stage holds in
/// memory at a time, whatever the size of the batch.
pub const PAGE: usize = 8192;

fn names(rows: &[DeviceRow]) -> Vec<&str> {
    rows.iter().map(|r| r.thing_name.as_str()).collect()
}

fn stored(row: &DeviceRow) -> Result<StoredDevice> {
    serde_json::from_str(&row.record).map_err(|e| Error::infra(format!("ledger record of `{}`: {e}", row.thing_name)))
}

/// Keygen and persist, a page of devices at a time: every device that has
/// no key yet gets one, and its page of the key store is durable (a synced
/// transaction, 0600) before the ledger says "keyed".
fn keygen_stage(
    ledger: &mut Ledger,
    ws: &Workspace,
    s: &Settings,
    subject_params: &[(String, bool)],
    t: &mut Timings,
) -> Result<()> {
    let mut store = KeyStore::open(ws)?;
    let mut ca: Option<crate::ca::FactoryCa> = None;
    let mut cursor = -1;
    let mut generated = 0usize;
    while let Some(rows) = ledger.next_page(&ws.batch, state::INGESTED, &mut cursor, PAGE)? {
        // A crash between the key store and the ledger leaves keys already made.
        let mut keys = store.get_many(&names(&rows))?;
        let need: Vec<&DeviceRow> = rows.iter().filter(|r| !keys.contains_key(&r.thing_name)).collect();
        if !need.is_empty() {
            let started = Instant::now();
            let devices: Vec<crate::ingest::Device> = need
                .iter()
                .map(|r| {
                    let sd = stored(r)?;
                    let csr = match &sd.device_csr {
                        Some(pem) => Some(
                            crate::csr::check_csr(pem)
                                .map_err(|e| Error::infra(format!("stored CSR of `{}`: {e}", r.thing_name)))?,
                        ),
                        None => None,
                    };
                    Ok(crate::ingest::Device {
                        serial: sd.serial,
                        thing_name: sd.thing_name,
                        values: sd.values,
                        file: r.file.as_str().into(),
                        line: r.line as u64,
                        csr,
                    })
                })
                .collect::<Result<_>>()?;
            if ca.is_none() {
                if let Some(dir) = &s.ca_dir {
                    let loaded = crate::ca::load(std::path::Path::new(dir))?;
                    if let Some(id) = &s.ca_id {
                        if &loaded.id != id {
                            return Err(Error::config(format!(
                                "the CA in {} is not the one this batch was started with ({id}); put that CA back",
                                loaded.dir.display()
                            )));
                        }
                    }
                    ca = Some(loaded);
                }
            }
            let signer = ca.as_ref().map(|ca| crate::keygen::Signer {
                ca,
                spec: &s.certificate,
            });
            let made = generate_all(&devices, s.key_type, signer.as_ref());
            let mut problems = Problems::default();
            let mut fresh: Vec<(String, Keyed)> = Vec::with_capacity(made.len());
            for (d, k) in devices.iter().zip(made) {
                match k {
                    Ok(k) => {
                        // JITP: a subject field the CA's template reads and the
                        // certificate lacks means the device never activates.
                        if let Some(pem) = &k.certificate_pem {
                            match crate::ca::missing_subject_fields(pem, subject_params) {
                                Ok(missing) if missing.is_empty() => {}
                                Ok(missing) => problems.push(
                                    Problem::new(missing_subject_message(&missing, "has"))
                                        .file(d.file.to_string())
                                        .line(d.line)
                                        .device(d.thing_name.clone()),
                                ),
                                Err(e) => problems.push(Problem::new(e).device(d.thing_name.clone())),
                            }
                        }
                        fresh.push((d.thing_name.clone(), k));
                    }
                    Err(e) => problems.push(Problem::new(e).device(d.thing_name.clone())),
                }
            }
            problems.into_result()?;
            t.add("keygen", started);
            let started = Instant::now();
            crate::failpoint::hit("keygen");
            let refs: Vec<(&str, &Keyed)> = fresh.iter().map(|(n, k)| (n.as_str(), k)).collect();
            store.insert(&refs)?;
            crate::failpoint::hit("persist");
            generated += fresh.iter().filter(|(_, k)| k.key_pem.is_some()).count();
            keys.extend(fresh);
            t.add("persist", started);
        }
        let started = Instant::now();
        let unmarked: Vec<(String, String, String)> = rows
            .iter()
            .filter_map(|r| {
                keys.get(&r.thing_name)
                    .map(|k| (r.thing_name.clone(), k.key.fingerprint(), k.key_type.clone()))
            })
            .collect();
        ledger.mark_keyed(&ws.batch, &unmarked)?;
        t.add("persist", started);
    }
    if generated > 0 {
        tracing::info!(batch = %ws.batch, generated, "keys generated and persisted");
    }
    Ok(())
}

/// JITP: before a batch is recorded, every device's subject (from the
/// profile) must have each field the CA's template reads without a Default.
pub fn check_subjects(p: &Prepared, wanted: &[(String, bool)]) -> Result<()> {
    let mut problems = Problems::default();
    for d in p.devices.iter() {
        let d = d?;
        let Ok(subject) = p.settings.certificate.subject_for(&d.thing_name, &d.values) else {
            continue; // reported by prepare
        };
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|(field, has_default)| {
                !has_default
                    && !subject
                        .iter()
                        .any(|(ty, _)| crate::profile::subject_attribute(subject_key_for(field)).as_ref() == Some(ty))
            })
            .map(|(f, _)| f.as_str())
            .collect();
        if !missing.is_empty() {
            problems.push(
                Problem::new(missing_subject_message(&missing, "would have"))
                    .file(d.file.to_string())
                    .line(d.line)
                    .device(d.thing_name.clone()),
            );
        }
    }
    problems.into_result()
}

/// Why a device would never activate under JITP: the template reads
/// subject fields its certificate lacks (`has` or `would have`).
fn missing_subject_message<S: AsRef<str>>(missing: &[S], has: &str) -> String {
    format!(
        "the CA's JITP template reads {} from the certificate subject without a Default, and this device's certificate {has} no such field; add {} to [certificate.subject] in the profile (or a Default to the template)",
        missing.iter().map(|m| format!("AWS::IoT::Certificate::{}", m.as_ref())).collect::<Vec<_>>().join(", "),
        missing.iter().map(|m| subject_key_for(m.as_ref())).collect::<Vec<_>>().join(", ")
    )
}

/// The profile's subject attribute for a JITP certificate parameter.
fn subject_key_for(param: &str) -> &'static str {
    crate::ca::SUBJECT_PARAMETERS
        .iter()
        .find(|(name, _, _)| *name == param)
        .map(|(_, _, key)| *key)
        .unwrap_or("(no such field)")
}

/// Own-CA modes: the CA must be registered and set up for the mode before
/// anything is signed or shipped. Returns the subject fields a JITP
/// template reads.
pub async fn check_ca_for_mode(aws: &Aws, s: &Settings) -> Result<Vec<(String, bool)>> {
    let Some(id) = &s.ca_id else {
        return Ok(Vec::new());
    };
    let dir = s.ca_dir.as_deref().unwrap_or("DIR");
    let state = crate::ca_aws::describe_ca(aws, id).await?.ok_or_else(|| {
        Error::config(format!(
            "the factory CA {id} is not registered in this account; run `provline ca register --dir {dir}{}` first",
            match s.mode {
                Mode::Jitp => " --jitp-template FILE --role-arn ARN",
                Mode::Jitr => " --jitr",
                _ => "",
            }
        ))
    })?;
    if state.status != "ACTIVE" {
        return Err(Error::config(format!(
            "the factory CA {id} is {} in AWS IoT; devices it signs cannot connect until it is ACTIVE (`provline ca register --dir {dir}` activates it)",
            state.status
        )));
    }
    match s.mode {
        Mode::Jitp if !state.is_jitp() => Err(Error::config(format!(
            "--mode jitp needs the CA to have auto-registration with a provisioning template, but it has {}; run `provline ca register --dir {dir} --jitp-template FILE --role-arn ARN`",
            if state.auto_registration_on() { "auto-registration without a template (that is JITR)" } else { "auto-registration off" }
        ))),
        Mode::Jitr if !state.auto_registration_on() || state.template_body.is_some() => Err(Error::config(format!(
            "--mode jitr needs the CA to have auto-registration on and no template, but it has {}; run `provline ca register --dir {dir} --jitr`",
            if state.auto_registration_on() { "a JITP template (devices would provision themselves, no approval)" } else { "auto-registration off" }
        ))),
        Mode::Jitp => crate::ca::template_subject_parameters(state.template_body.as_deref().unwrap_or("{}")),
        _ => Ok(Vec::new()),
    }
}

/// Runs (or continues) a recorded batch to its end: attempt after attempt
/// (chunks first, then retries), each one bulk task, then bundles and reports.
/// Every stage walks the ledger a page (or one attempt) at a time and takes
/// keys from the key store, so memory follows the page and the chunk size,
/// not the batch.
pub async fn continue_batch(
    ledger: &mut Ledger,
    ws: &Workspace,
    s: &Settings,
    aws: &Aws,
    ingest_seconds: Option<f64>,
) -> Result<Summary> {
    let mut t = Timings::default();
    if let Some(secs) = ingest_seconds {
        t.0.insert("ingest", secs);
    }
    ws.create()
        .map_err(|e| Error::infra(format!("cannot create {}: {e}", ws.dir().display())))?;
    let template = Template::check(&s.template_source, &s.template_body).map_err(Error::Input)?;
    let subject_params = check_ca_for_mode(aws, s).await?;
    keygen_stage(ledger, ws, s, &subject_params, &mut t)?;
    let mut endpoint = None;
    if !s.mode.registers() {
        issue_own_certificates(ledger, ws)?;
    }
    while s.mode.registers() {
        let attempts = ledger.attempts(&ws.batch)?;
        let attempt = match attempts.iter().find(|a| !a.reconciled) {
            Some(a) => a.clone(),
            None => {
                // Choosing retries asks the registry about each failed device: reconcile work.
                let started = Instant::now();
                let next = next_attempt(ledger, ws, s, aws, attempts.len() as i64 + 1).await?;
                t.add("reconcile", started);
                match next {
                    Some(a) => a,
                    None => break,
                }
            }
        };
        run_attempt(ledger, ws, s, aws, &template, attempt, &mut endpoint, &mut t).await?;
        bundle_stage(ledger, ws, s, aws, &mut endpoint, &mut t).await?;
    }
    bundle_stage(ledger, ws, s, aws, &mut endpoint, &mut t).await?;
    if s.bundle_format == crate::bundle::BundleFormat::Tar {
        archive_stage(ledger, ws, s, aws, &mut endpoint, &mut t).await?;
    }

    let started = Instant::now();
    let task_ids: Vec<String> = ledger
        .attempts(&ws.batch)?
        .into_iter()
        .filter_map(|a| a.task_id)
        .collect();
    crate::failpoint::hit("report");
    let mut summary = write_reports(ledger, ws, &task_ids, &t, Some(started))?;
    t.add("report", started);
    summary.stage_seconds = t.0.clone();
    ledger.finish_batch(&ws.batch)?;
    Ok(summary)
}

/// JITP and JITR: nothing is registered now; the certificate is the
/// device's credential and AWS meets it at first connect. Each keyed device
/// is marked registered with its certificate, a page at a time.
fn issue_own_certificates(ledger: &mut Ledger, ws: &Workspace) -> Result<()> {
    let store = KeyStore::open(ws)?;
    let mut cursor = -1;
    while let Some(rows) = ledger.next_page(&ws.batch, state::KEYED, &mut cursor, PAGE)? {
        let keys = store.get_many(&names(&rows))?;
        let issued: Vec<Outcome> = rows
            .iter()
            .map(|r| {
                let verdict = keys
                    .get(&r.thing_name)
                    .and_then(|k| k.certificate_pem.clone())
                    .ok_or_else(|| "the key store holds no certificate for this device".to_string())
                    .and_then(|pem| crate::crypto::parse_certificate_pem(&pem).map(|info| (info.id, pem)));
                let verdict = match verdict {
                    Ok((certificate_id, certificate_pem)) => Verdict::Registered {
                        certificate_id,
                        certificate_pem,
                    },
                    Err(message) => Verdict::Failed {
                        class: "certificate".into(),
                        message,
                    },
                };
                outcome(&r.thing_name, verdict)
            })
            .collect();
        ledger.record_outcomes(&ws.batch, &issued)?;
    }
    Ok(())
}

/// The next attempt: the next chunk of devices never sent, else the devices
/// whose failure is worth a retry (and that the registry confirms have no
/// certificate), else none.
async fn next_attempt(
    ledger: &mut Ledger,
    ws: &Workspace,
    s: &Settings,
    aws: &Aws,
    number: i64,
) -> Result<Option<AttemptRow>> {
    let chunk = s.chunk_size.max(1);
    let mut things: Vec<String> = ledger
        .next_page(&ws.batch, state::KEYED, &mut -1, chunk)?
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.thing_name)
        .collect();
    if things.is_empty() {
        let mut candidates: Vec<DeviceRow> = Vec::new();
        let mut cursor = -1;
        while candidates.len() < chunk {
            let Some(page) = ledger.next_page(&ws.batch, state::FAILED, &mut cursor, PAGE)? else {
                break;
            };
            candidates.extend(page.into_iter().filter(|r| {
                r.error_class.as_deref().is_some_and(crate::reconcile::is_retryable)
                    && (r.tries as u32) <= s.max_retries
            }));
        }
        candidates.truncate(chunk);
        let store = KeyStore::open(ws)?;
        let keys = store.get_many(&names(&candidates))?;
        let mut adopted = Vec::new();
        for r in &candidates {
            let Some(k) = keys.get(&r.thing_name) else {
                tracing::warn!(thing = %r.thing_name, "not retried: the key store holds no key for it");
                continue;
            };
            // A line that failed may still have made a certificate: look first.
            match lookup_registry(aws, &r.thing_name, &k.key, None).await {
                registered @ Verdict::Registered { .. } => adopted.push(outcome(&r.thing_name, registered)),
                Verdict::Failed { class, .. } if class == "unregistered" => things.push(r.thing_name.clone()),
                other => {
                    tracing::warn!(thing = %r.thing_name, verdict = ?other, "not retried: the registry could not confirm that it has no certificate")
                }
            }
        }
        if !adopted.is_empty() {
            tracing::info!(
                count = adopted.len(),
                "devices whose failed line had registered them after all"
            );
            ledger.record_outcomes(&ws.batch, &adopted)?;
        }
        if !things.is_empty() {
            tracing::info!(
                count = things.len(),
                attempt = number,
                "retrying devices that failed for a retryable reason"
            );
        }
    }
    if things.is_empty() {
        return Ok(None);
    }
    let key = input_key(s, &ws.batch, number);
    ledger.add_attempt(&ws.batch, number, &s.bucket, &key, &things)?;
    Ok(ledger.attempts(&ws.batch)?.into_iter().find(|a| a.attempt == number))
}

/// Stage, register and reconcile one attempt, from wherever it stopped.
/// While its task runs in AWS, the devices of earlier attempts are bundled.
#[allow(clippy::too_many_arguments)]
async fn run_attempt(
    ledger: &mut Ledger,
    ws: &Workspace,
    s: &Settings,
    aws: &Aws,
    template: &Template,
    mut attempt: AttemptRow,
    endpoint: &mut Option<String>,
    t: &mut Timings,
) -> Result<()> {
    let in_attempt: Vec<DeviceRow> = ledger.devices_of_attempt(&ws.batch, attempt.attempt)?;
    let things: Vec<String> = in_attempt.iter().map(|r| r.thing_name.clone()).collect();
    let keys = KeyStore::open(ws)?.get_many(&things)?;

    // Stage: lines in device order, kept in the workspace, then uploaded.
    let staged_path = ws.work().join(format!("attempt-{}.ndjson", attempt.attempt));
    if !attempt.uploaded {
        let started = Instant::now();
        let mut buf = Vec::new();
        let mut problems = Problems::default();
        // CACertificatePem is the CA that signed the devices, without the chain above it.
        let ca_pem = s
            .ca_chain_pem
            .as_deref()
            .and_then(|c| crate::crypto::parse_certificate_pem(c).ok())
            .map(|c| crate::crypto::to_pem("CERTIFICATE", &c.der));
        for r in &in_attempt {
            let sd = stored(r)?;
            let k = keys
                .get(&r.thing_name)
                .ok_or_else(|| Error::infra(format!("no key for `{}`", r.thing_name)))?;
            let cred = Credential {
                csr_pem: &k.csr_pem,
                certificate_pem: k.certificate_pem.as_deref(),
                ca_pem: ca_pem.as_deref(),
            };
            match registration_line(template, &sd, &cred, &s.parameters) {
                Ok(line) => {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
                Err(e) => problems.push(
                    Problem::new(e)
                        .file(r.file.clone())
                        .line(r.line as u64)
                        .device(r.thing_name.clone()),
                ),
            }
        }
        problems.into_result()?;
        write_durable(&staged_path, &buf, 0o600)
            .map_err(|e| Error::infra(format!("{}: {e}", staged_path.display())))?;
        crate::failpoint::hit("stage");
        let tkey = template_key(s, &ws.batch, attempt.attempt);
        crate::stage::upload(aws, &attempt.s3_bucket, &attempt.s3_key, &tkey, &s.template_body, buf).await?;
        crate::failpoint::hit("upload");
        ledger.set_uploaded(&ws.batch, attempt.attempt)?;
        attempt.uploaded = true;
        t.add("stage", started);
        tracing::info!(batch = %ws.batch, key = %attempt.s3_key, lines = in_attempt.len(), "staged");
    }

    // Register: one task per account at a time.
    let lines = in_attempt.len() as u64;
    let timeout = s
        .task_timeout_secs
        .map(Duration::from_secs)
        .unwrap_or_else(|| Duration::from_secs(600 + lines / 2));
    let deadline = Instant::now() + timeout;
    let started = Instant::now();
    if attempt.task_id.is_none() {
        // A crash may have come between the start call and storing its id.
        let found = crate::register::find_task_by_input(aws, &attempt.s3_bucket, &attempt.s3_key).await?;
        let id = match found {
            Some(found) => {
                tracing::info!(task_id = %found, "found the task this attempt started before a crash");
                found
            }
            None => {
                crate::register::wait_for_account(aws, deadline).await?;
                crate::failpoint::hit("before-start");
                let id =
                    crate::register::start(aws, &s.template_body, &attempt.s3_bucket, &attempt.s3_key, &s.role_arn)
                        .await?;
                tracing::info!(task_id = %id, attempt = attempt.attempt, lines, "bulk registration task started");
                id
            }
        };
        crate::failpoint::hit("after-start");
        ledger.set_task(&ws.batch, attempt.attempt, &id)?;
        ledger.set_state(&ws.batch, &things, state::SUBMITTED, None)?;
        attempt.task_id = Some(id);
    }
    let task_id = attempt.task_id.clone().expect("set above");
    // The task registers at AWS's pace: use the time to bundle the previous chunk.
    bundle_stage(ledger, ws, s, aws, endpoint, t).await?;
    if !attempt.task_status.as_deref().is_some_and(crate::register::is_terminal) {
        let end = crate::register::follow(aws, &task_id, lines, deadline).await?;
        crate::failpoint::hit("task-end");
        ledger.set_task_end(
            &ws.batch,
            attempt.attempt,
            &end.status,
            end.success,
            end.failure,
            end.message.as_deref(),
        )?;
        if end.success + end.failure != lines as i64 {
            tracing::warn!(
                task_id,
                success = end.success,
                failure = end.failure,
                lines,
                "the task's counts do not add up to the lines staged; unaccounted devices are checked one by one"
            );
        }
        tracing::info!(task_id, status = %end.status, success = end.success, failure = end.failure, "task ended");
    }
    t.add("register", started);

    // Reconcile, from the reports kept in the workspace.
    let started = Instant::now();
    let reports_dir = ws.reports_dir(&task_id);
    if !attempt.reports_done {
        crate::reports::fetch_all(aws, &task_id, &reports_dir).await?;
        crate::failpoint::hit("reports");
        ledger.set_reports_done(&ws.batch, attempt.attempt)?;
    }
    let fetched = started.elapsed();
    let (results, errors) = crate::reports::read_saved(&reports_dir)?;
    let read = started.elapsed();
    let staged: Vec<StagedDevice> = in_attempt
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(StagedDevice {
                index: i,
                thing_name: r.thing_name.clone(),
                key: keys
                    .get(&r.thing_name)
                    .ok_or_else(|| Error::infra(format!("no key for `{}` in the key store", r.thing_name)))?
                    .key
                    .clone(),
            })
        })
        .collect::<Result<_>>()?;
    let rec = reconcile(
        &staged,
        template.thing_resource.as_deref(),
        template.certificate_resource.as_deref(),
        &results,
        &errors,
    );
    for note in &rec.notes {
        tracing::warn!(task_id, "{note}");
    }
    if rec.unparsed > 0 || rec.unmatched > 0 {
        tracing::warn!(
            task_id,
            unparsed = rec.unparsed,
            unmatched = rec.unmatched,
            "report lines that belong to no device of this attempt (kept in {})",
            reports_dir.display()
        );
    }
    let mut outcomes = Vec::new();
    for (dev, verdict) in staged.iter().zip(rec.verdicts) {
        let verdict = match verdict {
            Verdict::NeedsCertificate { certificate_id } => fetch_certificate(aws, &certificate_id, &dev.key).await,
            Verdict::Unknown { hint } => lookup_registry(aws, &dev.thing_name, &dev.key, hint).await,
            v => v,
        };
        outcomes.push(outcome(&dev.thing_name, verdict));
    }
    let matched = started.elapsed();
    ledger.record_outcomes(&ws.batch, &outcomes)?;
    tracing::debug!(
        task_id,
        fetch_s = fetched.as_secs_f64(),
        read_s = (read - fetched).as_secs_f64(),
        match_s = (matched - read).as_secs_f64(),
        record_s = (started.elapsed() - matched).as_secs_f64(),
        "reconcile timings"
    );
    crate::failpoint::hit("reconciled");
    ledger.set_reconciled(&ws.batch, attempt.attempt)?;
    t.add("reconcile", started);
    Ok(())
}

fn outcome(thing: &str, verdict: Verdict) -> Outcome {
    let failed = |class: String, message: String| Outcome {
        thing_name: thing.to_string(),
        registered: false,
        certificate_id: None,
        certificate_pem: None,
        error_class: Some(class),
        error: Some(message),
    };
    match verdict {
        Verdict::Registered {
            certificate_id,
            certificate_pem,
        } => Outcome {
            thing_name: thing.to_string(),
            registered: true,
            certificate_id: Some(certificate_id),
            certificate_pem: Some(certificate_pem),
            error_class: None,
            error: None,
        },
        Verdict::Failed { class, message } => failed(class, message),
        Verdict::Unknown { hint } => failed(
            "unknown".into(),
            hint.unwrap_or_else(|| "no report line names this device and the registry could not be read".into()),
        ),
        Verdict::NeedsCertificate { certificate_id } => failed(
            "unknown".into(),
            format!("certificate {certificate_id} was never fetched"),
        ),
    }
}

/// Bundles every registered device that has none yet, a page at a time;
/// each page is durable (one syncfs) before the ledger says "bundled".
async fn bundle_stage(
    ledger: &mut Ledger,
    ws: &Workspace,
    s: &Settings,
    aws: &Aws,
    endpoint: &mut Option<String>,
    t: &mut Timings,
) -> Result<()> {
    if s.bundle_format == crate::bundle::BundleFormat::Tar {
        return Ok(()); // one archive at the end: archive_stage
    }
    let mut store: Option<KeyStore> = None;
    let mut cursor = -1;
    while let Some(rows) = ledger.next_page(&ws.batch, state::REGISTERED, &mut cursor, PAGE)? {
        let started = Instant::now();
        if endpoint.is_none() {
            *endpoint = Some(crate::sandbox_setup::data_endpoint(aws).await?);
        }
        let endpoint = endpoint.as_deref().expect("set above");
        if store.is_none() {
            store = Some(KeyStore::open(ws)?);
        }
        let keys = store.as_ref().expect("opened above").get_many(&names(&rows))?;
        let (inputs, mut failures) = bundle_inputs(&rows, &keys, s, ws, endpoint);
        // Checking each certificate against its key is CPU work: in parallel.
        let written: Vec<std::result::Result<(), String>> = inputs
            .par_iter()
            .map(|input| {
                write_bundle(ws, input).map(|_| {
                    crate::failpoint::hit("bundle");
                })
            })
            .collect();
        let done = sort_bundled(&inputs, written, &mut failures);
        crate::bundle::sync_bundles(ws)
            .map_err(|e| Error::infra(format!("syncing {}: {e}", ws.bundles().display())))?;
        crate::failpoint::hit("bundled");
        ledger.set_state(&ws.batch, &done, state::BUNDLED, None)?;
        ledger.record_outcomes(&ws.batch, &failures)?;
        t.add("bundle", started);
    }
    Ok(())
}

/// What each registered device's bundle is made of; devices the ledger
/// holds no certificate for, or the key store no key, are failures.
fn bundle_inputs<'a>(
    rows: &'a [DeviceRow],
    keys: &'a HashMap<String, Keyed>,
    s: &'a Settings,
    ws: &'a Workspace,
    endpoint: &'a str,
) -> (Vec<BundleInput<'a>>, Vec<Outcome>) {
    let mut inputs = Vec::new();
    let mut failures = Vec::new();
    for r in rows {
        let (Some(cert_id), Some(cert_pem)) = (&r.certificate_id, &r.certificate_pem) else {
            failures.push(bundle_failure(
                &r.thing_name,
                "registered, but the ledger holds no certificate".into(),
            ));
            continue;
        };
        let Some(k) = keys.get(&r.thing_name) else {
            failures.push(bundle_failure(
                &r.thing_name,
                "registered, but the key store holds no key for it".into(),
            ));
            continue;
        };
        inputs.push(BundleInput {
            thing_name: &r.thing_name,
            serial: &r.serial,
            certificate_pem: cert_pem,
            certificate_id: cert_id,
            key_pem: k.key_pem.as_ref().map(|s| s.0.as_str()),
            key: &k.key,
            key_type: &k.key_type,
            endpoint,
            batch: &ws.batch,
            // A JITP/JITR device presents its CA at first connect.
            chain_pem: if s.mode.registers() {
                None
            } else {
                s.ca_chain_pem.as_deref()
            },
            mode: s.mode.as_str(),
        });
    }
    (inputs, failures)
}

fn bundle_failure(thing: &str, message: String) -> Outcome {
    outcome(
        thing,
        Verdict::Failed {
            class: "bundle".into(),
            message,
        },
    )
}

/// The devices whose bundle was written; the others become failures.
fn sort_bundled(
    inputs: &[BundleInput<'_>],
    written: Vec<std::result::Result<(), String>>,
    failures: &mut Vec<Outcome>,
) -> Vec<String> {
    let mut done = Vec::new();
    for (input, w) in inputs.iter().zip(written) {
        match w {
            Ok(()) => done.push(input.thing_name.to_string()),
            Err(e) => {
                tracing::error!(thing = %input.thing_name, "{e}");
                failures.push(bundle_failure(input.thing_name, e));
            }
        }
    }
    done
}

/// The archive format: once every device has its outcome, all registered
/// devices go into one `bundles.tar`, a page at a time, synced once, before
/// the ledger says "bundled". A crash before that leaves them registered,
/// and the next pass writes the archive again from the start.
async fn archive_stage(
    ledger: &mut Ledger,
    ws: &Workspace,
    s: &Settings,
    aws: &Aws,
    endpoint: &mut Option<String>,
    t: &mut Timings,
) -> Result<()> {
    let counts = ledger.state_counts(&ws.batch)?;
    if counts.get(state::REGISTERED).copied().unwrap_or(0) == 0 {
        return Ok(());
    }
    if counts.get(state::BUNDLED).copied().unwrap_or(0) > 0 {
        return Err(Error::infra(format!(
            "{}: some devices are in {} already and others are not; the archive is written once per batch",
            ws.batch,
            crate::bundle::ARCHIVE_FILE
        )));
    }
    let started = Instant::now();
    if endpoint.is_none() {
        *endpoint = Some(crate::sandbox_setup::data_endpoint(aws).await?);
    }
    let endpoint = endpoint.as_deref().expect("set above");
    let io = |e: std::io::Error| Error::infra(format!("{}: {e}", ws.dir().join(crate::bundle::ARCHIVE_FILE).display()));
    let store = KeyStore::open(ws)?;
    let mut archive = crate::bundle::ArchiveWriter::create(ws).map_err(io)?;
    let mut failures = Vec::new();
    let mut cursor = -1;
    while let Some(rows) = ledger.next_page(&ws.batch, state::REGISTERED, &mut cursor, PAGE)? {
        let keys = store.get_many(&names(&rows))?;
        let (inputs, mut failed) = bundle_inputs(&rows, &keys, s, ws, endpoint);
        let written = archive.append_all(&inputs);
        sort_bundled(&inputs, written, &mut failed);
        failures.extend(failed);
    }
    crate::failpoint::hit("bundle");
    archive.finish().map_err(io)?;
    crate::failpoint::hit("bundled");
    // The failures leave "registered" first; everything still there is in the archive.
    ledger.record_outcomes(&ws.batch, &failures)?;
    ledger.move_state(&ws.batch, state::REGISTERED, state::BUNDLED)?;
    t.add("bundle", started);
    Ok(())
}

async fn fetch_certificate(aws: &Aws, id: &str, key: &KeyId) -> Verdict {
    match aws.iot.describe_certificate().certificate_id(id).send().await {
        Ok(d) => match d.certificate_description().and_then(|c| c.certificate_pem()) {
            Some(pem) => Verdict::of_certificate(pem, Some(id), key),
            None => Verdict::Failed {
                class: "verification".into(),
                message: format!("DescribeCertificate {id} returned no PEM"),
            },
        },
        Err(e) => Verdict::Unknown {
            hint: Some(format!("DescribeCertificate {id}: {}", describe(&e))),
        },
    }
}

/// For a device no report accounts for: is there an active certificate with
/// its key attached to its thing?
// TODO(unattached-certificates): a line that failed after creating its certificate but before attaching it leaves a certificate this lookup cannot see; finding it means listing every certificate in the account.
async fn lookup_registry(aws: &Aws, thing: &str, key: &KeyId, hint: Option<String>) -> Verdict {
    let principals = match aws.iot.list_thing_principals().thing_name(thing).send().await {
        Ok(p) => p.principals().to_vec(),
        Err(e) => {
            let text = describe(&e);
            if text.contains("ResourceNotFound") {
                return unregistered(thing, hint);
            }
            return Verdict::Unknown {
                hint: Some(format!("registry lookup failed: {text}")),
            };
        }
    };
    for arn in principals.iter().filter(|a| a.contains(":cert/")) {
        let id = arn.rsplit('/').next().unwrap_or(arn);
        let d = match aws.iot.describe_certificate().certificate_id(id).send().await {
            Ok(d) => d,
            Err(e) => {
                return Verdict::Unknown {
                    hint: Some(format!("registry lookup failed: {}", describe(&e))),
                }
            }
        };
        {
            let Some(desc) = d.certificate_description() else {
                continue;
            };
            let active = desc.status().map(|s| s.as_str() == "ACTIVE").unwrap_or(false);
            if let (true, Some(pem)) = (active, desc.certificate_pem()) {
                if let Ok((certificate_id, certificate_pem)) = verify_certificate(pem, Some(id), key) {
                    tracing::info!(thing, certificate_id, "found the device's certificate in the registry");
                    return Verdict::Registered {
                        certificate_id,
                        certificate_pem,
                    };
                }
            }
        }
    }
    unregistered(thing, hint)
}

/// The registry was read and holds no certificate of this device's key on its thing.
fn unregistered(thing: &str, hint: Option<String>) -> Verdict {
    let message = match hint {
        Some(h) => format!("{h} (the registry holds no certificate with this device's key on thing `{thing}`)"),
        None => format!(
            "no report line names this device and the registry holds no certificate with its key on thing `{thing}`"
        ),
    };
    Verdict::Failed {
        class: "unregistered".into(),
        message,
    }
}

/// results.csv, manifest.json and report.json, from the ledger, one row
/// at a time.
pub fn write_reports(
    ledger: &Ledger,
    ws: &Workspace,
    task_ids: &[String],
    t: &Timings,
    report_started: Option<Instant>,
) -> Result<Summary> {
    let io = |p: &std::path::Path, e: std::io::Error| Error::infra(format!("{}: {e}", p.display()));
    let results = ws.dir().join("results.csv");
    let file = crate::workspace::DurableFile::create(&results, 0o644).map_err(|e| io(&results, e))?;
    let mut w = csv::Writer::from_writer(file);
    let csv_err = |e: csv::Error| Error::infra(format!("{}: {e}", results.display()));
    w.write_record(["serial_number", "thing_name", "status", "certificate_id", "error"])
        .map_err(csv_err)?;
    // The archive stage wrote the manifest with the archive, from the hashes
    // it took while writing; the directory format is hashed here, in the
    // same pass over the ledger.
    let mpath = ws.dir().join(crate::bundle::MANIFEST_FILE);
    let archive = ws.dir().join(crate::bundle::ARCHIVE_FILE).exists();
    let mut manifest = if archive {
        None
    } else {
        Some(crate::bundle::ManifestWriter::create(ws, false).map_err(|e| io(&mpath, e))?)
    };
    let (mut devices, mut registered, mut failed, mut bundled) = (0, 0, 0, 0);
    ledger.each_device(&ws.batch, |r| {
        devices += 1;
        let status = match r.state.as_str() {
            state::BUNDLED => {
                registered += 1;
                bundled += 1;
                if let Some(m) = manifest.as_mut() {
                    m.add_bundle_dir(ws, &r.thing_name).map_err(|e| io(&mpath, e))?;
                }
                "registered"
            }
            state::REGISTERED => {
                registered += 1;
                "registered-not-bundled"
            }
            state::FAILED => {
                failed += 1;
                "failed"
            }
            other => other,
        };
        let error = match (&r.error_class, &r.error) {
            (Some(c), Some(e)) => format!("{c}: {e}"),
            (None, Some(e)) => e.clone(),
            _ => String::new(),
        };
        w.write_record([
            r.serial.as_str(),
            r.thing_name.as_str(),
            status,
            r.certificate_id.as_deref().unwrap_or(""),
            error.as_str(),
        ])
        .map_err(csv_err)
    })?;
    let settings: Settings = ledger
        .batch(&ws.batch)?
        .and_then(|b| serde_json::from_str(&b.settings).ok())
        .ok_or_else(|| Error::infra(format!("ledger: no settings for {}", ws.batch)))?;
    for p in &settings.skipped {
        w.write_record(["", "", "skipped", "", p.as_str()]).map_err(csv_err)?;
    }
    w.into_inner()
        .map_err(|e| Error::infra(format!("{}: {e}", results.display())))?
        .commit()
        .map_err(|e| io(&results, e))?;
    match manifest {
        Some(m) => m.finish().map_err(|e| io(&mpath, e))?,
        None if !mpath.exists() => crate::bundle::write_archive_manifest(ws).map_err(|e| io(&mpath, e))?,
        None => {}
    }

    // The report stage, up to report.json itself.
    let mut stage_seconds = t.0.clone();
    if let Some(started) = report_started {
        *stage_seconds.entry("report").or_default() += started.elapsed().as_secs_f64();
    }
    let report = serde_json::json!({
        "batch": ws.batch,
        "devices": devices,
        "registered": registered,
        "failed": failed,
        "bundled": bundled,
        "skipped": settings.skipped.len(),
        "skipped_rows": settings.skipped,
        "task_ids": task_ids,
        "attempts": ledger.attempts(&ws.batch)?,
        "stage_seconds": stage_seconds,
        "peak_rss_mib": peak_rss_mib(),
    });
    let rpath = ws.dir().join("report.json");
    write_durable(
        &rpath,
        format!("{}\n", serde_json::to_string_pretty(&report).expect("json")).as_bytes(),
        0o644,
    )
    .map_err(|e| io(&rpath, e))?;
    Ok(Summary {
        batch: ws.batch.clone(),
        dir: ws.dir(),
        devices,
        registered,
        failed,
        bundled,
        skipped: settings.skipped.len(),
        task_ids: task_ids.to_vec(),
        already_done: false,
        stage_seconds: BTreeMap::new(),
    })
}

/// The process's peak resident memory so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

/// The summary of a batch the ledger says is done, without touching anything.
pub fn finished_summary(ledger: &Ledger, ws: &Workspace) -> Result<Summary> {
    let counts = ledger.state_counts(&ws.batch)?;
    let count = |st: &str| counts.get(st).copied().unwrap_or(0);
    let attempts: Vec<AttemptRow> = ledger.attempts(&ws.batch)?;
    let bundled = count(state::BUNDLED);
    let registered = bundled + count(state::REGISTERED);
    let failed = count(state::FAILED);
    let skipped = ledger
        .batch(&ws.batch)?
        .and_then(|b| serde_json::from_str::<Settings>(&b.settings).ok())
        .map(|s| s.skipped.len())
        .unwrap_or(0);
    Ok(Summary {
        batch: ws.batch.clone(),
        dir: ws.dir(),
        devices: counts.values().sum(),
        registered,
        failed,
        bundled,
        skipped,
        task_ids: attempts.iter().filter_map(|a| a.task_id.clone()).collect(),
        already_done: true,
        stage_seconds: BTreeMap::new(),
    })
}

pub fn is_done(ledger: &Ledger, batch: &str) -> Result<bool> {
    Ok(ledger.batch(batch)?.is_some_and(|b| b.state == batch_state::DONE))
}
