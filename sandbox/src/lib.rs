//! A local stand-in for the parts of AWS IoT Core and S3 that device
//! provisioning uses.
//!
//! The sandbox speaks the real wire protocols on one loopback endpoint, so the
//! unmodified `aws-sdk-iot` / `aws-sdk-s3` clients and the AWS CLI talk to it
//! through an endpoint URL:
//!
//! - requests signed for the `iot` (or `execute-api`) service go to an
//!   emulation of the IoT control plane: the registry (things, thing types,
//!   thing groups, billing groups, policies, certificates and their
//!   attachments) and bulk registration (`StartThingRegistrationTask` and its
//!   family), including per-line failures, one task at a time, and report
//!   files in S3 behind pre-signed links;
//! - requests signed for `iam` go to a small IAM emulation (query protocol,
//!   XML answers): `CreateRole`, `GetRole`, `DeleteRole`, `ListRoles`;
//! - everything else goes to an S3 implementation (`s3s` over `s3s-fs`)
//!   whose objects are plain files under `<state_dir>/s3/<bucket>/<key>`.
//!
//! Certificates are signed by the sandbox's own CA (P-256, made once per
//! state directory). All state lives in `<state_dir>/iot-state.json`, so a
//! sandbox can be stopped and started again, and a bulk task that was running
//! resumes where its persisted progress says.
//!
//! # What it implements
//!
//! - Bulk registration: `StartThingRegistrationTask`,
//!   `DescribeThingRegistrationTask`, `ListThingRegistrationTasks`,
//!   `StopThingRegistrationTask`, `ListThingRegistrationTaskReports`.
//! - Things: `CreateThing`, `DescribeThing`, `ListThings`, `UpdateThing`,
//!   `DeleteThing`, `AttachThingPrincipal`, `DetachThingPrincipal`,
//!   `ListThingPrincipals`, `ListPrincipalThings`, `ListThingGroupsForThing`.
//! - Types and groups: `CreateThingType`, `DescribeThingType`,
//!   `ListThingTypes`, `DeprecateThingType`, `CreateThingGroup`,
//!   `DescribeThingGroup`, `ListThingGroups`, `AddThingToThingGroup`,
//!   `CreateBillingGroup`, `DescribeBillingGroup`.
//! - Policies: `CreatePolicy`, `GetPolicy`, `ListPolicies`, `DeletePolicy`,
//!   `AttachPolicy`, `DetachPolicy`, `ListAttachedPolicies`,
//!   `ListTargetsForPolicy`.
//! - Certificates: `CreateCertificateFromCsr`, `DescribeCertificate`,
//!   `ListCertificates`, `UpdateCertificate`, `DeleteCertificate`,
//!   `RegisterCertificate`, `RegisterCertificateWithoutCA`,
//!   `GetRegistrationCode`, `RegisterCACertificate` (with
//!   `registrationConfig`), `DescribeCACertificate`, `ListCACertificates`,
//!   `UpdateCACertificate`, `ListCertificatesByCA`.
//! - Provisioning templates: `CreateProvisioningTemplate`,
//!   `DescribeProvisioningTemplate`, `ListProvisioningTemplates`,
//!   `UpdateProvisioningTemplate`, `DeleteProvisioningTemplate` (one version
//!   each). A CA's `registrationConfig.templateName` must name a template of
//!   type `JITP`.
//! - `DescribeEndpoint` (`iot:Data`, `iot:Data-ATS`,
//!   `iot:CredentialProvider`, `iot:Jobs`).
//!
//! Any other IoT call gets HTTP 404 with the error type
//! `UnknownOperationException`. S3 is whatever `s3s-fs` implements.
//!
//! # The device endpoint
//!
//! A second loopback listener ([`Sandbox::device_endpoint`],
//! [`Config::device_addr`]) behaves like AWS IoT's ATS data endpoint: TLS
//! with a server certificate from the sandbox CA ([`Sandbox::ca_certificate_pem`])
//! for the `iot:Data-ATS` address ([`Sandbox::device_server_name`]),
//! `localhost` and `127.0.0.1`, and a mandatory client certificate, judged
//! against the registry after the handshake:
//!
//! - registered and ACTIVE (and its CA, if any, ACTIVE): an MQTT 3.1.1 / 5
//!   session (CONNACK, PUBACK, SUBACK, PINGRESP; messages are not routed);
//! - unknown, signed by a registered ACTIVE CA with auto-registration ENABLE
//!   and a JITP template (`registrationConfig.templateBody`, or a JITP
//!   provisioning template by name): the template runs with the
//!   `AWS::IoT::Certificate::*` parameters of the certificate's subject and
//!   its `::Id`, the certificate ends ACTIVE, and the connection is dropped;
//!   if the subject lacks a declared parameter without Default, the
//!   certificate stays PENDING_ACTIVATION and nothing else is made;
//! - the same without a template (JITR): registered PENDING_ACTIVATION under
//!   its CA, dropped;
//! - anything else: dropped.
//!
//! The `device` part of [`Sandbox::stats`] counts what happened.
//!
//! # Faults and the admin endpoint
//!
//! For crash-safety tests the sandbox can misbehave on purpose: a
//! [`FaultPlan`] (in [`Config::faults`], syntax on the type) throttles a
//! share of IoT calls, answers 5xx, drops connections before or after doing
//! the call, slows bulk tasks down, fails chosen lines after their
//! certificate was created, and exits the process abruptly in the middle of
//! a task ([`FAULT_EXIT_CODE`]). [`Sandbox::inject_fault`] arms single
//! faults for chosen requests.
//!
//! Requests under `/_sandbox/` (no signature needed) reach a small admin
//! endpoint on the same listener:
//!
//! - `GET /_sandbox/faults`: the plan in force, as JSON;
//! - `PUT /_sandbox/faults`: replaces it; the body is the text syntax or
//!   JSON (an empty body is no faults); answers the new plan;
//! - `GET /_sandbox/stats`: what [`Sandbox::stats`] returns;
//! - `GET /_sandbox/device-endpoint`: `{"address": "127.0.0.1:PORT",
//!   "serverName": "<the iot:Data-ATS address>"}`.
//!
//! Where AWS leaves behaviour undocumented (the report line format above
//! all), [`ReportFormat`] selects which plausible variant the sandbox
//! produces, so that clients can be tested against each of them.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let sandbox = provline_sandbox::Sandbox::start(Default::default()).await?;
//! println!("AWS_ENDPOINT_URL={}", sandbox.endpoint_url());
//! sandbox.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod admin;
mod ca;
mod device;
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod e2e_tests;
mod faults;
mod iam;
mod ids;
mod iot;
mod s3;
#[cfg(test)]
mod sdk_tests;
mod server;
mod state;

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

pub use faults::{Fault, FaultPlan, FAULT_EXIT_CODE};
use tokio::task::JoinHandle;

/// The access key id clients must sign with (any other key `K` is accepted
/// by the S3 side with the secret `K`; the IoT side checks no signatures).
pub const ACCESS_KEY_ID: &str = "sandbox";
/// The secret access key that goes with [`ACCESS_KEY_ID`].
pub const SECRET_ACCESS_KEY: &str = "sandbox";
/// The AWS account id the sandbox pretends to be.
pub const ACCOUNT_ID: &str = "123456789012";
/// The bucket that bulk registration task reports are written to.
pub const REPORTS_BUCKET: &str = "aws-iot-bulk-reports";

/// Name of the state file inside the state directory.
const STATE_FILE: &str = "iot-state.json";

/// The key that names the input line in a bulk task report line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineKey {
    /// `"lineNumber": N`, the form one AWS sample reads.
    LineNumber,
    /// `"offset": N`, a form no known source uses, for robustness tests.
    Offset,
    /// No line identifier at all.
    Absent,
}

impl LineKey {
    /// The JSON key written into report lines, if any.
    pub fn json_key(&self) -> Option<&'static str> {
        match self {
            LineKey::LineNumber => Some("lineNumber"),
            LineKey::Offset => Some("offset"),
            LineKey::Absent => None,
        }
    }
}

impl fmt::Display for LineKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json_key().unwrap_or("absent"))
    }
}

impl FromStr for LineKey {
    type Err = ConfigError;

    /// Parses `lineNumber`, `offset` or `absent` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "linenumber" | "line-number" | "line_number" => Ok(LineKey::LineNumber),
            "offset" => Ok(LineKey::Offset),
            "absent" | "none" => Ok(LineKey::Absent),
            _ => Err(ConfigError::new(format!(
                "unknown line key `{s}`: expected `lineNumber`, `offset` or `absent`"
            ))),
        }
    }
}

/// The shape of the RESULTS and ERRORS report lines of bulk tasks.
///
/// AWS documents none of it; each field picks one plausible variant.
///
/// # Syntax of [`FromStr`]
///
/// `KEY[:BASE][,legacy]` or just `legacy`, where `KEY` is a [`LineKey`]
/// (`lineNumber`, `offset`, `absent`) and `BASE` is `0` or `1` (default 1):
///
/// - `lineNumber:1` — the default: `"lineNumber": 1` for the first line;
/// - `offset:0` — `"offset": 0` for the first line;
/// - `absent` — no line identifier in either report;
/// - `legacy` — like `lineNumber:1`, but ERRORS lines in the legacy form
///   `{"thingName", "errorCode", "errorMessage"}` (which has no line key);
/// - `offset:0,legacy` — combinations work as expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportFormat {
    /// Which key identifies the input line.
    pub line_key: LineKey,
    /// Number of the first input line: 0 or 1.
    pub base: u32,
    /// Write ERRORS lines as `{thingName, errorCode, errorMessage}`.
    pub legacy_errors: bool,
}

impl Default for ReportFormat {
    fn default() -> Self {
        ReportFormat {
            line_key: LineKey::LineNumber,
            base: 1,
            legacy_errors: false,
        }
    }
}

impl fmt::Display for ReportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_key {
            LineKey::Absent => write!(f, "absent")?,
            ref key => write!(f, "{key}:{}", self.base)?,
        }
        if self.legacy_errors {
            write!(f, ",legacy")?;
        }
        Ok(())
    }
}

impl FromStr for ReportFormat {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut format = ReportFormat::default();
        for (i, part) in s.split(',').map(str::trim).enumerate() {
            if part.eq_ignore_ascii_case("legacy") {
                format.legacy_errors = true;
                continue;
            }
            if i > 0 {
                return Err(ConfigError::new(format!(
                    "unexpected `{part}` in report format `{s}`: only `legacy` may follow the key"
                )));
            }
            let (key, base) = match part.split_once(':') {
                Some((key, base)) => (key, Some(base)),
                None => (part, None),
            };
            format.line_key = key.parse()?;
            if let Some(base) = base {
                format.base = match base {
                    "0" => 0,
                    "1" => 1,
                    _ => {
                        return Err(ConfigError::new(format!(
                            "line base `{base}` in report format `{s}` must be 0 or 1"
                        )))
                    }
                };
            }
        }
        Ok(format)
    }
}

/// A configuration value that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(message: String) -> Self {
        ConfigError(message)
    }
}

/// How to run a sandbox.
///
/// Every field parses from a command-line string with [`FromStr`]: `addr`
/// and `device_addr` as `127.0.0.1:4566`, `lines_per_second` as a number or `inf`,
/// `report_format` with the syntax documented on [`ReportFormat`] and
/// `faults` with the syntax documented on [`FaultPlan`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port.
    pub addr: SocketAddr,
    /// Directory for all state (S3 objects, the IoT registry, the CA). `None`
    /// makes a private temporary directory that is removed when the sandbox
    /// is dropped.
    pub state_dir: Option<PathBuf>,
    /// The region the sandbox claims to be in (ARNs, endpoints).
    pub region: String,
    /// How many input lines a bulk task processes per second; 0 or infinity
    /// means as fast as possible.
    pub lines_per_second: f64,
    /// The shape of bulk task report lines.
    pub report_format: ReportFormat,
    /// Seed for everything the sandbox makes up: task ids, thing ids,
    /// certificate serial numbers.
    pub seed: u64,
    /// Lifetime of the pre-signed report links, in seconds.
    pub report_link_ttl_secs: u64,
    /// Faults to inject from the start (none by default); replaceable at
    /// run time with [`Sandbox::set_faults`] or `PUT /_sandbox/faults`.
    pub faults: FaultPlan,
    /// Address of the device endpoint (TLS, MQTT); port 0 picks a free port.
    pub device_addr: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir: None,
            region: "us-east-1".to_owned(),
            lines_per_second: 2000.0,
            report_format: ReportFormat::default(),
            seed: 0,
            report_link_ttl_secs: 3600,
            faults: FaultPlan::default(),
            device_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// What every part of a running sandbox shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) endpoint_url: String,
    pub(crate) s3_root: PathBuf,
    pub(crate) store: state::Store,
    pub(crate) ca: ca::SandboxCa,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) faults: faults::Faults,
    /// Background bulk-task engines, awaited on shutdown.
    pub(crate) engines: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Where the device endpoint listens, and the name its certificate is for.
    pub(crate) device_addr: SocketAddr,
    pub(crate) device_server_name: String,
    pub(crate) device_stats: device::DeviceStats,
    /// IAM calls received, by action, in this process.
    pub(crate) iam_calls: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// A running sandbox. Dropping it stops the server without waiting; call
/// [`Sandbox::shutdown`] to stop cleanly and persist everything.
pub struct Sandbox {
    shared: Arc<Shared>,
    state_dir: PathBuf,
    shutdown_tx: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    device_server: Option<JoinHandle<()>>,
    /// Keeps a private state directory alive; declared last so it is removed
    /// after everything else has been dropped.
    _temp_dir: Option<tempfile::TempDir>,
}

impl Sandbox {
    /// Binds the listener, loads the state found in the state directory (if
    /// any), resumes an unfinished bulk task and spawns the server on the
    /// current tokio runtime.
    pub async fn start(config: Config) -> anyhow::Result<Sandbox> {
        config.faults.validate().context("invalid fault plan")?;
        let (state_dir, temp_dir) = match &config.state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("provline-sandbox-")
                    .tempdir()
                    .context("creating a temporary state directory")?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };

        // A private directory cannot be restarted from, so it is not persisted.
        let state_path = config.state_dir.as_ref().map(|_| state_dir.join(STATE_FILE));
        let mut state = match &state_path {
            Some(path) => state::load(path)?,
            None => state::State::default(),
        };
        let ca = ca::SandboxCa::load_or_create(&mut state)?;

        let s3_root = state_dir.join("s3");
        let reports_dir = s3_root.join(REPORTS_BUCKET);
        std::fs::create_dir_all(&reports_dir).with_context(|| format!("creating {}", reports_dir.display()))?;

        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let local = reachable(listener.local_addr().context("reading the bound address")?);
        let endpoint_url = format!("http://{local}");
        let device_listener = tokio::net::TcpListener::bind(config.device_addr)
            .await
            .with_context(|| format!("binding the device endpoint {}", config.device_addr))?;
        let device_addr = reachable(
            device_listener
                .local_addr()
                .context("reading the device endpoint's address")?,
        );
        let device_tls = device::tls_config(&ca, &config.region).context("setting up the device endpoint's TLS")?;
        let device_server_name = iot::data_ats_address(&config.region);

        if !config.faults.is_none() {
            tracing::warn!(faults = %config.faults, "sandbox fault plan in force");
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let faults = faults::Faults::new(config.seed, config.faults.clone());
        let shared = Arc::new(Shared {
            config,
            endpoint_url,
            s3_root: s3_root.clone(),
            store: state::Store::new(state, state_path),
            ca,
            shutdown: shutdown_rx,
            faults,
            engines: std::sync::Mutex::new(Vec::new()),
            device_addr,
            device_server_name,
            device_stats: device::DeviceStats::default(),
            iam_calls: Default::default(),
        });
        shared.store.persist().await?;

        let s3 = s3::service(&s3_root)?;
        iot::task::resume_unfinished(&shared);
        let server = tokio::spawn(server::serve(listener, shared.clone(), s3));
        let device_server = tokio::spawn(device::serve(device_listener, shared.clone(), device_tls));
        tracing::info!(
            endpoint = %shared.endpoint_url,
            device_endpoint = %device_addr,
            state_dir = %state_dir.display(),
            "sandbox started"
        );

        Ok(Sandbox {
            shared,
            state_dir,
            shutdown_tx,
            server: Some(server),
            device_server: Some(device_server),
            _temp_dir: temp_dir,
        })
    }

    /// The endpoint URL for clients, such as `http://127.0.0.1:40123`.
    pub fn endpoint_url(&self) -> String {
        self.shared.endpoint_url.clone()
    }

    /// The address of the device endpoint: TLS with a mandatory client
    /// certificate, then MQTT 3.1.1 or 5, like AWS IoT's ATS data endpoint.
    /// Its server certificate is signed by the CA of
    /// [`Sandbox::ca_certificate_pem`] and names
    /// [`Sandbox::device_server_name`], `localhost` and `127.0.0.1`.
    pub fn device_endpoint(&self) -> SocketAddr {
        self.shared.device_addr
    }

    /// The `iot:Data-ATS` address DescribeEndpoint answers, which is the
    /// server name (SNI, certificate check) for the device endpoint.
    pub fn device_server_name(&self) -> String {
        self.shared.device_server_name.clone()
    }

    /// The PEM of the sandbox CA that signs device certificates.
    pub fn ca_certificate_pem(&self) -> String {
        self.shared.ca.certificate_pem().to_owned()
    }

    /// The directory holding the sandbox's state.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Makes the next `times` IoT requests whose `METHOD /path` starts with
    /// `request_prefix` fail with `fault` (an empty prefix matches every
    /// request). For example `("POST /thing-registration-tasks",
    /// Fault::DropResponse, 1)` starts a task but loses the answer, and
    /// `("GET /thing-registration-tasks/", Fault::Throttling, 3)` throttles
    /// the next three Describe or ListReports calls.
    pub fn inject_fault(&self, request_prefix: &str, fault: Fault, times: usize) {
        self.shared.faults.arm(request_prefix, fault, times);
    }

    /// The fault plan in force.
    pub fn faults(&self) -> FaultPlan {
        self.shared.faults.plan()
    }

    /// Replaces the fault plan, as `PUT /_sandbox/faults` does.
    pub fn set_faults(&self, plan: FaultPlan) -> Result<(), ConfigError> {
        plan.validate()?;
        tracing::info!(faults = %plan, "sandbox fault plan replaced");
        self.shared.faults.set_plan(plan);
        Ok(())
    }

    /// What the sandbox has done, as `GET /_sandbox/stats` answers it:
    ///
    /// ```json
    /// {
    ///   "tasks_started": 3,
    ///   "calls": {"StartThingRegistrationTask": 3, "DescribeThingRegistrationTask": 41},
    ///   "faults_injected": {"throttle": 4, "5xx": 2, "drop": 1, "drop_response": 1, "fail_after_cert": 2},
    ///   "lines_processed": 1200,
    ///   "fail_after_cert_lines": [
    ///     {"task_id": "..", "line_index": 17, "thing_name": "dev-17", "certificate_id": ".."}
    ///   ],
    ///   "iam_calls": {"GetRole": 1, "CreateRole": 1},
    ///   "device": {
    ///     "connections_accepted": {"<certificate id>": 2},
    ///     "connections_refused": {"jitp_provisioned": 1, "certificate_not_active": 1},
    ///     "messages_published": {"<certificate id>": 5},
    ///     "tls_handshake_failures": 0,
    ///     "jitr_registered": [{"certificate_id": "..", "ca_certificate_id": ".."}],
    ///     "jitp_provisioned": [{"certificate_id": "..", "ca_certificate_id": "..", "thing_name": "dev-1"}],
    ///     "jitp_failures": [{"certificate_id": "..", "ca_certificate_id": "..", "message": ".."}]
    ///   }
    /// }
    /// ```
    ///
    /// `tasks_started` (successful `StartThingRegistrationTask` calls) and
    /// `fail_after_cert_lines` (every line failed by
    /// [`FaultPlan::fail_after_certificate_share`]; `line_index` counts
    /// physical input lines from 0) come from the persisted state and survive
    /// restarts. The rest counts this process only: `calls` every IoT call
    /// received by operation name (faulted ones included), `faults_injected`
    /// both planned and armed faults, `lines_processed` the task lines that
    /// [`FaultPlan::exit_after_lines`] counts, `iam_calls` the IAM calls
    /// by action (IAM is never faulted), and `device` the device
    /// endpoint: CONNACKs by certificate id, dropped connections by reason
    /// (`bad_certificate`, `certificate_not_active`, `certificate_expired`,
    /// `unknown_ca`, `ca_inactive`, `auto_registration_disabled`,
    /// `jitr_registered`, `jitp_provisioned`, `jitp_failed`), PUBLISH packets
    /// by certificate id, failed handshakes, and each auto-registration.
    pub fn stats(&self) -> serde_json::Value {
        admin::stats(&self.shared)
    }

    /// Stops accepting requests, lets open connections finish, stops the bulk
    /// task engine where it is and persists the state.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown_tx.send(true);
        if let Some(server) = self.server.take() {
            server.await.context("the sandbox server panicked")?;
        }
        if let Some(device_server) = self.device_server.take() {
            device_server.await.context("the device endpoint panicked")?;
        }
        let engines = std::mem::take(&mut *state::lock(&self.shared.engines));
        for engine in engines {
            engine.await.context("a bulk task engine panicked")?;
        }
        self.shared.store.persist().await?;
        tracing::info!(endpoint = %self.shared.endpoint_url, "sandbox stopped");
        Ok(())
    }
}

/// The address clients use for a bound one: loopback for an unspecified IP.
fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        // Listening on every interface; clients still reach it on loopback.
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("endpoint_url", &self.shared.endpoint_url)
            .field("device_endpoint", &self.shared.device_addr)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_format_syntax() {
        let parse = |s: &str| s.parse::<ReportFormat>().unwrap();
        assert_eq!(parse("lineNumber:1"), ReportFormat::default());
        assert_eq!(
            parse("offset:0"),
            ReportFormat {
                line_key: LineKey::Offset,
                base: 0,
                legacy_errors: false
            }
        );
        assert_eq!(parse("absent").line_key, LineKey::Absent);
        assert_eq!(
            parse("legacy"),
            ReportFormat {
                legacy_errors: true,
                ..ReportFormat::default()
            }
        );
        assert_eq!(
            parse("offset:0,legacy"),
            ReportFormat {
                line_key: LineKey::Offset,
                base: 0,
                legacy_errors: true
            }
        );
        assert!("lineNumber:2".parse::<ReportFormat>().is_err());
        assert!("line".parse::<ReportFormat>().is_err());
        assert!("legacy,offset".parse::<ReportFormat>().is_err());
        for s in ["lineNumber:1", "offset:0", "absent", "lineNumber:0,legacy"] {
            assert_eq!(parse(s).to_string(), s);
        }
    }
}
