//! The sandbox's whole IoT state, kept in memory and persisted as one JSON
//! file.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory)
//! and grouped: a caller that finds a newer snapshot already on disk returns
//! at once, so concurrent mutations share one write.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Version of the state file format.
const FORMAT_VERSION: u32 = 1;

/// Seconds since the Unix epoch, with millisecond precision, the way the
/// IoT API puts timestamps on the wire.
pub(crate) fn now() -> f64 {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (elapsed.as_millis() as f64) / 1000.0
}

/// Locks a mutex, ignoring poisoning (the data is plain and stays usable).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything the IoT side knows.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct State {
    #[serde(default)]
    pub format_version: u32,
    /// Counter behind every derived id (see [`crate::ids`]).
    #[serde(default)]
    pub next_id: u64,
    /// The sandbox CA. Holds a private key: never log it.
    pub ca: Option<CaRecord>,
    #[serde(default)]
    pub things: BTreeMap<String, Thing>,
    #[serde(default)]
    pub thing_types: BTreeMap<String, ThingType>,
    #[serde(default)]
    pub thing_groups: BTreeMap<String, ThingGroup>,
    #[serde(default)]
    pub billing_groups: BTreeMap<String, BillingGroup>,
    #[serde(default)]
    pub policies: BTreeMap<String, Policy>,
    /// Device certificates by certificate id.
    #[serde(default)]
    pub certificates: BTreeMap<String, Certificate>,
    /// Registered CA certificates by certificate id.
    #[serde(default)]
    pub ca_certificates: BTreeMap<String, CaCertificate>,
    /// Policy names attached to each target (a principal ARN).
    #[serde(default)]
    pub policy_attachments: BTreeMap<String, BTreeSet<String>>,
    /// Bulk registration tasks, oldest first.
    #[serde(default)]
    pub tasks: Vec<Task>,
    /// Successful StartThingRegistrationTask calls, ever.
    #[serde(default)]
    pub tasks_started: u64,
    /// Provisioning templates by name.
    #[serde(default)]
    pub provisioning_templates: BTreeMap<String, ProvisioningTemplate>,
    /// IAM roles by name.
    #[serde(default)]
    pub roles: BTreeMap<String, crate::iam::Role>,
}

impl State {
    /// Takes the next value of the id counter.
    pub fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The task with this id.
    pub fn task(&self, id: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.task_id == id)
    }

    /// The task with this id, for changing it.
    pub fn task_mut(&mut self, id: &str) -> Option<&mut Task> {
        self.tasks.iter_mut().find(|t| t.task_id == id)
    }
}

/// The sandbox CA's certificate and key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CaRecord {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl std::fmt::Debug for CaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRecord").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Thing {
    pub thing_name: String,
    pub thing_id: String,
    pub thing_arn: String,
    pub thing_type_name: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub billing_group_name: Option<String>,
    #[serde(default)]
    pub thing_groups: BTreeSet<String>,
    /// Principal ARNs attached to the thing.
    #[serde(default)]
    pub principals: BTreeSet<String>,
    pub creation_date: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ThingType {
    pub thing_type_name: String,
    pub thing_type_id: String,
    pub thing_type_arn: String,
    pub description: Option<String>,
    #[serde(default)]
    pub searchable_attributes: Vec<String>,
    #[serde(default)]
    pub deprecated: bool,
    pub deprecation_date: Option<f64>,
    pub creation_date: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ThingGroup {
    pub thing_group_name: String,
    pub thing_group_id: String,
    pub thing_group_arn: String,
    pub parent_group_name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub creation_date: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BillingGroup {
    pub billing_group_name: String,
    pub billing_group_id: String,
    pub billing_group_arn: String,
    pub description: Option<String>,
    pub version: i64,
    pub creation_date: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Policy {
    pub policy_name: String,
    pub policy_arn: String,
    pub policy_document: String,
    pub generation_id: String,
    pub creation_date: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Certificate {
    pub certificate_id: String,
    pub certificate_arn: String,
    pub certificate_pem: String,
    /// `ACTIVE`, `INACTIVE`, `REVOKED`, ... as on the wire.
    pub status: String,
    pub ca_certificate_id: Option<String>,
    pub creation_date: f64,
    pub last_modified_date: f64,
    pub not_before: f64,
    pub not_after: f64,
    pub generation_id: String,
    pub customer_version: i64,
    /// Creation order, for listing.
    pub seq: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CaCertificate {
    pub certificate_id: String,
    pub certificate_arn: String,
    pub certificate_pem: String,
    /// `ACTIVE` or `INACTIVE`.
    pub status: String,
    pub certificate_mode: String,
    pub auto_registration_status: String,
    pub creation_date: f64,
    pub last_modified_date: f64,
    pub not_before: f64,
    pub not_after: f64,
    pub generation_id: String,
    pub seq: u64,
    /// The JITP template of the CA, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_config: Option<RegistrationConfig>,
}

/// The `registrationConfig` of a CA certificate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RegistrationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_name: Option<String>,
}

/// A provisioning template (CreateProvisioningTemplate).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProvisioningTemplate {
    pub template_name: String,
    pub template_arn: String,
    pub description: Option<String>,
    pub template_body: String,
    pub enabled: bool,
    pub provisioning_role_arn: String,
    /// `FLEET_PROVISIONING` or `JITP`.
    #[serde(rename = "type")]
    pub template_type: String,
    /// As the caller gave it: `{targetArn, payloadVersion}`.
    pub pre_provisioning_hook: Option<serde_json::Value>,
    pub creation_date: f64,
    pub last_modified_date: f64,
}

/// Status of a bulk registration task, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TaskStatus {
    InProgress,
    Completed,
    Failed,
    Cancelled,
    Cancelling,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::InProgress => "InProgress",
            TaskStatus::Completed => "Completed",
            TaskStatus::Failed => "Failed",
            TaskStatus::Cancelled => "Cancelled",
            TaskStatus::Cancelling => "Cancelling",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        [
            TaskStatus::InProgress,
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
            TaskStatus::Cancelling,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }

    /// Whether the engine still has work to do for the task.
    pub fn is_running(self) -> bool {
        matches!(self, TaskStatus::InProgress | TaskStatus::Cancelling)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Task {
    pub task_id: String,
    pub creation_date: f64,
    pub last_modified_date: f64,
    pub template_body: String,
    pub input_file_bucket: String,
    pub input_file_key: String,
    pub role_arn: String,
    pub status: TaskStatus,
    pub message: Option<String>,
    /// Number of input lines, known once the input has been read.
    pub total_lines: Option<u64>,
    /// The outcome of every processed line, in input order.
    #[serde(default)]
    pub outcomes: Vec<LineOutcome>,
    /// Report object keys in [`crate::REPORTS_BUCKET`], once written.
    pub reports: Option<TaskReports>,
}

impl Task {
    pub fn success_count(&self) -> u64 {
        self.outcomes.iter().filter(|o| o.is_success()).count() as u64
    }

    pub fn failure_count(&self) -> u64 {
        self.outcomes.len() as u64 - self.success_count()
    }

    pub fn percentage_progress(&self) -> u64 {
        match self.total_lines {
            _ if self.status == TaskStatus::Completed => 100,
            Some(0) | None => 0,
            Some(total) => (self.outcomes.len() as u64 * 100 / total).min(100),
        }
    }
}

/// What happened to one input line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub(crate) enum LineOutcome {
    #[serde(rename_all = "camelCase")]
    Success {
        /// Index of the physical input line, counting from 0.
        line: u64,
        /// The certificate, when one was registered.
        certificate_id: Option<String>,
        /// Whether the certificate was issued from a CSR (the report then
        /// carries its PEM).
        issued_from_csr: bool,
        /// Logical resource name to ARN.
        resource_arns: BTreeMap<String, String>,
    },
    #[serde(rename_all = "camelCase")]
    Failure {
        line: u64,
        error_code: String,
        error_message: String,
        thing_name: Option<String>,
        /// The certificate a line failed by the fail-after-certificate fault
        /// created (and attached) before it was reported as failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        late_certificate_id: Option<String>,
    },
}

impl LineOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, LineOutcome::Success { .. })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TaskReports {
    pub results: Vec<String>,
    pub errors: Vec<String>,
}

/// Reads the state file, or returns an empty state when there is none.
pub(crate) fn load(path: &Path) -> anyhow::Result<State> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut state: State =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing sandbox state {}", path.display()))?;
    // State files from before the counter existed.
    state.tasks_started = state.tasks_started.max(state.tasks.len() as u64);
    if state.format_version > FORMAT_VERSION {
        anyhow::bail!(
            "sandbox state {} has format version {}, newer than this sandbox ({FORMAT_VERSION})",
            path.display(),
            state.format_version
        );
    }
    Ok(state)
}

/// Writes `bytes` to `path` atomically and durably, readable by the owner only.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The state behind a lock, with grouped persistence.
pub(crate) struct Store {
    state: RwLock<State>,
    /// Where to persist; `None` keeps the state in memory only.
    path: Option<PathBuf>,
    /// Bumped by every mutation.
    generation: AtomicU64,
    /// The generation last written to disk; held while writing.
    written: tokio::sync::Mutex<u64>,
}

impl Store {
    pub fn new(mut state: State, path: Option<PathBuf>) -> Store {
        state.format_version = FORMAT_VERSION;
        Store {
            state: RwLock::new(state),
            path,
            generation: AtomicU64::new(1),
            written: tokio::sync::Mutex::new(0),
        }
    }

    /// Runs `f` with shared access to the state.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let guard = self.state.read().unwrap_or_else(PoisonError::into_inner);
        f(&guard)
    }

    /// Runs `f` with exclusive access to the state and marks it changed.
    pub fn write<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = self.state.write().unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::SeqCst);
        f(&mut guard)
    }

    /// Makes every mutation made so far durable.
    pub async fn persist(&self) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let wanted = self.generation.load(Ordering::SeqCst);
        let mut written = self.written.lock().await;
        if *written >= wanted {
            return Ok(());
        }
        // The generation is bumped under the write lock, so reading it under
        // the read lock pairs it with exactly this snapshot.
        let (generation, bytes) =
            self.read(|state| (self.generation.load(Ordering::SeqCst), serde_json::to_vec(state)));
        let bytes = bytes.context("serialising the sandbox state")?;
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
            .await
            .context("the state writer panicked")?
            .with_context(|| format!("writing {}", path.display()))?;
        *written = generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn persists_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = Store::new(State::default(), Some(path.clone()));
        store.write(|s| s.next_id = 41);
        store.persist().await.unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.next_id, 41);
        assert_eq!(loaded.format_version, FORMAT_VERSION);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn missing_file_is_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = load(&dir.path().join("none.json")).unwrap();
        assert!(state.things.is_empty());
    }
}
