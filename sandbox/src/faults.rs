//! Faults injected into IoT requests and bulk tasks, for reliability tests.
//!
//! Two mechanisms share this module:
//!
//! - armed faults ([`crate::Sandbox::inject_fault`]): the next `n` requests
//!   matching a prefix fail in a chosen way;
//! - a [`FaultPlan`] (from [`crate::Config::faults`], replaced at run time
//!   through `PUT /_sandbox/faults`): shares of all IoT calls fail, bulk
//!   tasks run slower, some lines fail after their certificate was made, and
//!   the process may exit abruptly in the middle of a task.
//!
//! Every random choice is a hash of the configured seed and a counter (see
//! [`crate::ids`]), so a run with the same seed, plan and calls injects the
//! same faults.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::ids;
use crate::state::lock;
use crate::ConfigError;

/// The exit status of a sandbox process stopped by
/// [`FaultPlan::exit_after_lines`].
pub const FAULT_EXIT_CODE: i32 = 86;

/// A fault the sandbox can inject into IoT requests; see
/// [`crate::Sandbox::inject_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 400 with `ThrottlingException` ("Rate exceeded"); the request
    /// is not carried out.
    Throttling,
    /// HTTP 503 with `ServiceUnavailableException`; not carried out.
    ServiceUnavailable,
    /// HTTP 500 with `InternalFailureException`; not carried out.
    InternalFailure,
    /// The connection is closed before the request is carried out.
    DropConnection,
    /// The request is carried out, then the connection is closed without
    /// the response (the client cannot know that it succeeded).
    DropResponse,
}

impl Fault {
    /// The key this fault is counted under in `faults_injected` of the stats.
    fn stat_key(self) -> &'static str {
        match self {
            Fault::Throttling => "throttle",
            Fault::ServiceUnavailable | Fault::InternalFailure => "5xx",
            Fault::DropConnection => "drop",
            Fault::DropResponse => "drop_response",
        }
    }
}

/// Keys of `faults_injected` in the stats, in order.
const STAT_KEYS: [&str; 5] = ["throttle", "5xx", "drop", "drop_response", "fail_after_cert"];

/// Faults applied to a share of everything the sandbox does.
///
/// The four call shares (`throttle_share`, `error_share`, `drop_share`,
/// `drop_response_share`) apply to IoT control-plane calls only, never to S3
/// or the `/_sandbox/` admin endpoint; they are disjoint, so they must add
/// up to at most 1. Which calls fail is drawn from the seed and a count of
/// the calls since the plan was set.
///
/// # Syntax of [`FromStr`]
///
/// Comma-separated `KEY=VALUE` pairs, any subset, in any order; the empty
/// string (or `none`) is no faults. [`fmt::Display`] writes the same syntax
/// back, leaving out what is off:
///
/// ```text
/// throttle=0.1,5xx=0.05,drop=0.02,drop-response=0.01,slow=4,fail-after-cert=0.02,exit-after-lines=500
/// ```
///
/// | key                | field                          | value          |
/// |--------------------|--------------------------------|----------------|
/// | `throttle`         | `throttle_share`               | share, 0 to 1  |
/// | `5xx`              | `error_share`                  | share, 0 to 1  |
/// | `drop`             | `drop_share`                   | share, 0 to 1  |
/// | `drop-response`    | `drop_response_share`          | share, 0 to 1  |
/// | `slow`             | `slow_factor`                  | 1 or more      |
/// | `fail-after-cert`  | `fail_after_certificate_share` | share, 0 to 1  |
/// | `exit-after-lines` | `exit_after_lines`             | 1 or more      |
///
/// As JSON (the admin endpoint) a plan is an object with the field names;
/// missing fields take their defaults and unknown ones are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Share of IoT calls answered HTTP 400 `ThrottlingException`
    /// ("Rate exceeded"), without being carried out.
    pub throttle_share: f64,
    /// Share of IoT calls answered HTTP 500 `InternalFailureException` or
    /// 503 `ServiceUnavailableException` (half each), without being carried
    /// out.
    pub error_share: f64,
    /// Share of IoT calls whose connection is closed without a response,
    /// before the call is carried out.
    pub drop_share: f64,
    /// Share of IoT calls that are carried out, after which the connection is
    /// closed before the response.
    pub drop_response_share: f64,
    /// Bulk tasks run this many times slower: the configured lines per
    /// second are divided by it, and an unlimited task pauses after each
    /// batch for `slow_factor - 1` times the batch's work. 1 is full speed.
    pub slow_factor: f64,
    /// Share of bulk-task lines that create their certificate and attach it
    /// to their thing, and are then reported in ERRORS as
    /// `InternalFailureException: ...`, as if they had failed late. The
    /// certificate stays ACTIVE (or whatever the template says) and
    /// attached. Only lines that create a new certificate and have a thing
    /// can be chosen; the choice is a hash of the seed, the task id and the
    /// line, so a resumed task chooses alike. The stats list the chosen
    /// lines.
    pub fail_after_certificate_share: f64,
    /// When running tasks have processed this many lines in total since the
    /// process started, the sandbox persists its state and the process
    /// exits at once with status [`FAULT_EXIT_CODE`] (86), as a crash would.
    /// Lines processed before the plan was set count too.
    pub exit_after_lines: Option<u64>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            throttle_share: 0.0,
            error_share: 0.0,
            drop_share: 0.0,
            drop_response_share: 0.0,
            slow_factor: 1.0,
            fail_after_certificate_share: 0.0,
            exit_after_lines: None,
        }
    }
}

/// The keys of the text syntax, in the order [`fmt::Display`] writes them.
const KEYS: [&str; 7] = [
    "throttle",
    "5xx",
    "drop",
    "drop-response",
    "slow",
    "fail-after-cert",
    "exit-after-lines",
];

fn valid_keys() -> String {
    KEYS.join(", ")
}

impl FaultPlan {
    /// Whether the plan injects nothing at all.
    pub fn is_none(&self) -> bool {
        *self == FaultPlan::default()
    }

    /// Checks every value's range, naming the text key of a bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shares = [
            ("throttle", self.throttle_share),
            ("5xx", self.error_share),
            ("drop", self.drop_share),
            ("drop-response", self.drop_response_share),
            ("fail-after-cert", self.fail_after_certificate_share),
        ];
        for (key, share) in shares {
            if !(0.0..=1.0).contains(&share) {
                return Err(ConfigError::new(format!(
                    "fault `{key}` must be a share from 0 to 1, not {share}"
                )));
            }
        }
        let calls = self.throttle_share + self.error_share + self.drop_share + self.drop_response_share;
        // A little slack for shares like 0.1 + 0.2 + 0.7.
        if calls > 1.0 + 1e-9 {
            return Err(ConfigError::new(format!(
                "faults `throttle`, `5xx`, `drop` and `drop-response` apply to disjoint shares of the calls \
                 and must add up to at most 1, not {calls}"
            )));
        }
        if !(self.slow_factor.is_finite() && self.slow_factor >= 1.0) {
            return Err(ConfigError::new(format!(
                "fault `slow` must be a finite factor of 1 or more, not {}",
                self.slow_factor
            )));
        }
        if self.exit_after_lines == Some(0) {
            return Err(ConfigError::new(
                "fault `exit-after-lines` must be a whole number of 1 or more, not 0".to_owned(),
            ));
        }
        Ok(())
    }

    /// Parses the JSON form (see the type's documentation) and validates it.
    pub fn from_json(json: &str) -> Result<FaultPlan, ConfigError> {
        let plan: FaultPlan = serde_json::from_str(json)
            .map_err(|e| ConfigError::new(format!("the fault plan is not valid JSON: {e}")))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Parses either form: JSON when it starts with `{`, else the text syntax.
    pub fn parse_any(input: &str) -> Result<FaultPlan, ConfigError> {
        if input.trim_start().starts_with('{') {
            FaultPlan::from_json(input)
        } else {
            input.parse()
        }
    }

    /// The effective lines per second of a task configured for `configured`
    /// (0 or infinite: unlimited, which stays unlimited).
    pub(crate) fn task_rate(&self, configured: f64) -> f64 {
        if configured.is_finite() && configured > 0.0 {
            configured / self.slow_factor
        } else {
            configured
        }
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let defaults = FaultPlan::default();
        let mut parts = Vec::new();
        let mut share = |key: &str, value: f64, default: f64| {
            if value != default {
                parts.push(format!("{key}={value}"));
            }
        };
        share("throttle", self.throttle_share, defaults.throttle_share);
        share("5xx", self.error_share, defaults.error_share);
        share("drop", self.drop_share, defaults.drop_share);
        share("drop-response", self.drop_response_share, defaults.drop_response_share);
        share("slow", self.slow_factor, defaults.slow_factor);
        share(
            "fail-after-cert",
            self.fail_after_certificate_share,
            defaults.fail_after_certificate_share,
        );
        if let Some(lines) = self.exit_after_lines {
            parts.push(format!("exit-after-lines={lines}"));
        }
        f.write_str(&parts.join(","))
    }
}

impl FromStr for FaultPlan {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut plan = FaultPlan::default();
        let trimmed = s.trim();
        if trimmed.is_empty() || trimmed.eq_ignore_ascii_case("none") {
            return Ok(plan);
        }
        let mut seen: Vec<String> = Vec::new();
        for part in trimmed.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(ConfigError::new(format!(
                    "empty entry in fault plan `{s}`: expected KEY=VALUE pairs separated by commas"
                )));
            }
            let Some((key, value)) = part.split_once('=') else {
                return Err(ConfigError::new(format!(
                    "fault `{part}` has no value: expected KEY=VALUE, where KEY is one of {}",
                    valid_keys()
                )));
            };
            let (raw_key, value) = (key.trim(), value.trim());
            let key = raw_key.to_ascii_lowercase().replace('_', "-");
            if !KEYS.contains(&key.as_str()) {
                return Err(ConfigError::new(format!(
                    "unknown fault `{raw_key}` in `{s}`: valid keys are {}",
                    valid_keys()
                )));
            }
            if seen.contains(&key) {
                return Err(ConfigError::new(format!("fault `{key}` is given twice in `{s}`")));
            }
            let number = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| ConfigError::new(format!("fault `{key}` needs a number, not `{value}`")))
            };
            match key.as_str() {
                "throttle" => plan.throttle_share = number()?,
                "5xx" => plan.error_share = number()?,
                "drop" => plan.drop_share = number()?,
                "drop-response" => plan.drop_response_share = number()?,
                "slow" => plan.slow_factor = number()?,
                "fail-after-cert" => plan.fail_after_certificate_share = number()?,
                "exit-after-lines" => {
                    plan.exit_after_lines = Some(value.parse::<u64>().map_err(|_| {
                        ConfigError::new(format!(
                            "fault `exit-after-lines` needs a whole number of 1 or more, not `{value}`"
                        ))
                    })?)
                }
                _ => unreachable!("every key of KEYS is handled"),
            }
            seen.push(key);
        }
        plan.validate()?;
        Ok(plan)
    }
}

/// A uniform number in `[0, 1)` from the first 8 bytes of a hash.
fn unit(bytes: &[u8; 32]) -> f64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    (u64::from_le_bytes(word) >> 11) as f64 / (1u64 << 53) as f64
}

/// Which fault, if any, call number `n` under `plan` gets.
fn draw_call_fault(plan: &FaultPlan, seed: u64, n: u64) -> Option<Fault> {
    let bytes = ids::derive(seed, "fault/call", n);
    let u = unit(&bytes);
    let mut bound = plan.throttle_share;
    if u < bound {
        return Some(Fault::Throttling);
    }
    bound += plan.error_share;
    if u < bound {
        return Some(if bytes[8] & 1 == 0 {
            Fault::InternalFailure
        } else {
            Fault::ServiceUnavailable
        });
    }
    bound += plan.drop_share;
    if u < bound {
        return Some(Fault::DropConnection);
    }
    bound += plan.drop_response_share;
    if u < bound {
        return Some(Fault::DropResponse);
    }
    None
}

/// Whether line `line` of task `task_id` fails after its certificate was
/// made, for a line that could (it created a certificate for a thing).
pub(crate) fn fails_after_certificate(share: f64, seed: u64, task_id: &str, line: u64) -> bool {
    share > 0.0 && unit(&ids::derive(seed, &format!("fault/fail-after-cert/{task_id}"), line)) < share
}

/// Whether the process must exit now: `limit` is the plan's
/// `exit_after_lines`, `processed` the task lines processed since the
/// process started, `exited` whether the exit already happened (or is under
/// way) in this process.
pub(crate) fn exit_due(limit: Option<u64>, processed: u64, exited: bool) -> bool {
    !exited && limit.is_some_and(|limit| processed >= limit)
}

/// How many more lines a task may process before the exit point: `None`
/// when there is none. A batch is cut to this so that exactly `limit` lines
/// are persisted when the process exits.
pub(crate) fn lines_before_exit(limit: Option<u64>, processed: u64, exited: bool) -> Option<u64> {
    match limit {
        Some(limit) if !exited => Some(limit.saturating_sub(processed)),
        _ => None,
    }
}

/// One armed fault.
#[derive(Debug)]
struct Armed {
    /// Matches requests whose `METHOD /path` starts with this.
    prefix: String,
    fault: Fault,
    remaining: usize,
}

/// The faults of a running sandbox, and what they did.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    seed: u64,
    armed: Mutex<Vec<Armed>>,
    plan: RwLock<FaultPlan>,
    /// IoT calls drawn for since the plan was set.
    draws: AtomicU64,
    /// IoT calls received, by operation.
    calls: Mutex<BTreeMap<&'static str, u64>>,
    /// Faults injected, by stats key.
    injected: Mutex<BTreeMap<&'static str, u64>>,
    /// Task lines processed since the process started.
    lines_processed: AtomicU64,
    /// Whether the exit of `exit_after_lines` has started.
    exited: AtomicBool,
}

impl Faults {
    pub fn new(seed: u64, plan: FaultPlan) -> Faults {
        Faults {
            seed,
            plan: RwLock::new(plan),
            ..Faults::default()
        }
    }

    pub fn arm(&self, prefix: &str, fault: Fault, times: usize) {
        if times > 0 {
            lock(&self.armed).push(Armed {
                prefix: prefix.to_owned(),
                fault,
                remaining: times,
            });
        }
    }

    /// Takes the armed fault for a request, if one is armed for it.
    pub fn take(&self, method: &str, path: &str) -> Option<Fault> {
        let request = format!("{method} {path}");
        let mut armed = lock(&self.armed);
        let index = armed.iter().position(|a| request.starts_with(&a.prefix))?;
        let fault = armed[index].fault;
        armed[index].remaining -= 1;
        if armed[index].remaining == 0 {
            armed.remove(index);
        }
        Some(fault)
    }

    /// Counts an IoT call to `operation` and picks its fault: an armed one
    /// first, else one drawn under the plan. The fault is counted too.
    pub fn for_call(&self, operation: &'static str, method: &str, path: &str) -> Option<Fault> {
        *lock(&self.calls).entry(operation).or_default() += 1;
        let fault = self.take(method, path).or_else(|| {
            let plan = self.plan();
            let calls = plan.throttle_share + plan.error_share + plan.drop_share + plan.drop_response_share;
            if calls <= 0.0 {
                return None;
            }
            let n = self.draws.fetch_add(1, Ordering::Relaxed);
            draw_call_fault(&plan, self.seed, n)
        });
        if let Some(fault) = fault {
            self.count_injected(fault.stat_key());
        }
        fault
    }

    fn count_injected(&self, key: &'static str) {
        *lock(&self.injected).entry(key).or_default() += 1;
    }

    /// Counts a line failed by `fail_after_certificate_share`.
    pub fn count_fail_after_cert(&self) {
        self.count_injected("fail_after_cert");
    }

    /// The plan in force.
    pub fn plan(&self) -> FaultPlan {
        self.plan
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the plan; the draws of the call shares start over.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.write().unwrap_or_else(std::sync::PoisonError::into_inner) = plan;
        self.draws.store(0, Ordering::Relaxed);
    }

    /// How many lines the next batch of a task may take at most.
    pub fn lines_before_exit(&self) -> Option<u64> {
        lines_before_exit(
            self.plan().exit_after_lines,
            self.lines_processed.load(Ordering::SeqCst),
            self.exited.load(Ordering::SeqCst),
        )
    }

    /// Counts `n` processed task lines.
    pub fn count_lines(&self, n: u64) {
        self.lines_processed.fetch_add(n, Ordering::SeqCst);
    }

    /// Whether the process must exit now; `true` at most once per process.
    pub fn take_exit(&self) -> bool {
        let due = exit_due(
            self.plan().exit_after_lines,
            self.lines_processed.load(Ordering::SeqCst),
            self.exited.load(Ordering::SeqCst),
        );
        due && !self.exited.swap(true, Ordering::SeqCst)
    }

    /// The per-process part of the stats.
    pub fn stats(&self) -> (serde_json::Value, serde_json::Value, u64) {
        let calls = serde_json::json!(*lock(&self.calls));
        let injected = lock(&self.injected);
        let injected: serde_json::Map<String, serde_json::Value> = STAT_KEYS
            .iter()
            .map(|key| ((*key).to_owned(), injected.get(key).copied().unwrap_or(0).into()))
            .collect();
        (
            calls,
            serde_json::Value::Object(injected),
            self.lines_processed.load(Ordering::SeqCst),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fire_the_given_number_of_times() {
        let faults = Faults::default();
        faults.arm("POST /thing-registration-tasks", Fault::Throttling, 2);
        faults.arm("", Fault::DropResponse, 1);
        assert_eq!(faults.take("GET", "/things/x"), Some(Fault::DropResponse));
        assert_eq!(faults.take("GET", "/things/x"), None);
        assert_eq!(
            faults.take("POST", "/thing-registration-tasks"),
            Some(Fault::Throttling)
        );
        assert_eq!(
            faults.take("POST", "/thing-registration-tasks"),
            Some(Fault::Throttling)
        );
        assert_eq!(faults.take("POST", "/thing-registration-tasks"), None);
    }

    const FULL: &str =
        "throttle=0.1,5xx=0.05,drop=0.02,drop-response=0.01,slow=4,fail-after-cert=0.02,exit-after-lines=500";

    #[test]
    fn plan_syntax_round_trips() {
        let plan: FaultPlan = FULL.parse().unwrap();
        assert_eq!(
            plan,
            FaultPlan {
                throttle_share: 0.1,
                error_share: 0.05,
                drop_share: 0.02,
                drop_response_share: 0.01,
                slow_factor: 4.0,
                fail_after_certificate_share: 0.02,
                exit_after_lines: Some(500),
            }
        );
        assert_eq!(plan.to_string(), FULL);
        assert_eq!(plan.to_string().parse::<FaultPlan>().unwrap(), plan);

        for s in ["", "  ", "none"] {
            let none: FaultPlan = s.parse().unwrap();
            assert!(none.is_none());
            assert_eq!(none, FaultPlan::default());
        }
        assert_eq!(FaultPlan::default().to_string(), "");

        // Any subset, any order, loose spelling.
        let some: FaultPlan = " slow = 2.5 , THROTTLE=1, drop_response=0 ".parse().unwrap();
        assert_eq!(
            some,
            FaultPlan {
                throttle_share: 1.0,
                slow_factor: 2.5,
                ..FaultPlan::default()
            }
        );
        assert_eq!(some.to_string(), "throttle=1,slow=2.5");
        assert_eq!(
            "exit-after-lines=7".parse::<FaultPlan>().unwrap().exit_after_lines,
            Some(7)
        );

        // The JSON form round-trips too, and fills in what is missing.
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(FaultPlan::from_json(&json).unwrap(), plan);
        assert_eq!(FaultPlan::parse_any(&json).unwrap(), plan);
        assert_eq!(FaultPlan::parse_any(FULL).unwrap(), plan);
        assert_eq!(
            FaultPlan::from_json(r#"{"drop_share": 0.5}"#).unwrap(),
            FaultPlan {
                drop_share: 0.5,
                ..FaultPlan::default()
            }
        );
    }

    #[test]
    fn plan_errors_name_the_key() {
        let error = |s: &str| s.parse::<FaultPlan>().unwrap_err().to_string();
        let unknown = error("throttle=0.1,jitter=3");
        assert!(unknown.contains("`jitter`"), "{unknown}");
        for key in KEYS {
            assert!(unknown.contains(key), "{unknown} lists {key}");
        }
        assert!(error("throttle").contains("`throttle`"));
        assert!(error("throttle").contains("KEY=VALUE"));
        assert!(error("throttle=lots").contains("`throttle` needs a number"));
        assert!(error("throttle=NaN").contains("`throttle`"));
        assert!(error("5xx=1.5").contains("`5xx` must be a share from 0 to 1"));
        assert!(error("drop=-0.1").contains("`drop`"));
        assert!(error("fail-after-cert=2").contains("`fail-after-cert`"));
        assert!(error("throttle=0.6,5xx=0.6").contains("at most 1"));
        assert!(error("slow=0.5").contains("`slow`"));
        assert!(error("slow=inf").contains("`slow`"));
        assert!(error("exit-after-lines=0").contains("`exit-after-lines`"));
        assert!(error("exit-after-lines=1.5").contains("`exit-after-lines`"));
        assert!(error("drop=0.1,drop=0.2").contains("twice"));
        assert!(error("drop=0.1,,slow=2").contains("empty entry"));

        let json = FaultPlan::from_json(r#"{"throttle": 0.1}"#).unwrap_err().to_string();
        assert!(json.contains("throttle"), "{json}");
        let range = FaultPlan::from_json(r#"{"slow_factor": 0}"#).unwrap_err().to_string();
        assert!(range.contains("`slow`"), "{range}");
    }

    #[test]
    fn call_shares_are_reproducible_and_about_right() {
        let plan: FaultPlan = "throttle=0.1,5xx=0.2,drop=0.05,drop-response=0.05".parse().unwrap();
        let run = |seed| (0..10_000).map(|n| draw_call_fault(&plan, seed, n)).collect::<Vec<_>>();
        let first = run(3);
        assert_eq!(first, run(3), "same seed, same faults");
        assert_ne!(first, run(4));
        let share = |wanted: &[Fault]| {
            first.iter().filter(|f| f.is_some_and(|f| wanted.contains(&f))).count() as f64 / 10_000.0
        };
        assert!((share(&[Fault::Throttling]) - 0.1).abs() < 0.02);
        assert!((share(&[Fault::InternalFailure, Fault::ServiceUnavailable]) - 0.2).abs() < 0.02);
        assert!(share(&[Fault::InternalFailure]) > 0.07 && share(&[Fault::ServiceUnavailable]) > 0.07);
        assert!((share(&[Fault::DropConnection]) - 0.05).abs() < 0.015);
        assert!((share(&[Fault::DropResponse]) - 0.05).abs() < 0.015);

        let all: FaultPlan = "throttle=1".parse().unwrap();
        assert!((0..1000).all(|n| draw_call_fault(&all, 9, n) == Some(Fault::Throttling)));
        let none = FaultPlan::default();
        assert!((0..1000).all(|n| draw_call_fault(&none, 9, n).is_none()));
    }

    #[test]
    fn call_faults_are_counted() {
        let faults = Faults::new(0, "5xx=1".parse().unwrap());
        faults.arm("GET /things", Fault::DropResponse, 1);
        assert_eq!(
            faults.for_call("ListThings", "GET", "/things"),
            Some(Fault::DropResponse)
        );
        assert!(matches!(
            faults.for_call("ListThings", "GET", "/things"),
            Some(Fault::InternalFailure | Fault::ServiceUnavailable)
        ));
        faults.set_plan(FaultPlan::default());
        assert_eq!(faults.for_call("DescribeThing", "GET", "/things/x"), None);
        let (calls, injected, _) = faults.stats();
        assert_eq!(calls, serde_json::json!({"ListThings": 2, "DescribeThing": 1}));
        assert_eq!(
            injected,
            serde_json::json!({"throttle": 0, "5xx": 1, "drop": 0, "drop_response": 1, "fail_after_cert": 0})
        );
    }

    #[test]
    fn fail_after_certificate_choice() {
        let chosen = |share| {
            (0..10_000)
                .filter(|&line| fails_after_certificate(share, 1, "task-a", line))
                .count()
        };
        assert_eq!(chosen(0.0), 0);
        assert_eq!(chosen(1.0), 10_000);
        let some = chosen(0.02);
        assert!((150..=250).contains(&some), "{some} of 10000");
        assert_eq!(
            fails_after_certificate(0.5, 1, "task-a", 17),
            fails_after_certificate(0.5, 1, "task-a", 17)
        );
        let a: Vec<bool> = (0..64).map(|l| fails_after_certificate(0.5, 1, "task-a", l)).collect();
        let b: Vec<bool> = (0..64).map(|l| fails_after_certificate(0.5, 1, "task-b", l)).collect();
        assert_ne!(a, b, "another task (a retry) draws anew");
    }

    #[test]
    fn exit_decision() {
        assert!(!exit_due(None, 1_000_000, false));
        assert!(!exit_due(Some(500), 499, false));
        assert!(exit_due(Some(500), 500, false));
        assert!(exit_due(Some(500), 700, false), "a plan set late fires at once");
        assert!(!exit_due(Some(500), 500, true), "only once per process");

        assert_eq!(lines_before_exit(None, 10, false), None);
        assert_eq!(lines_before_exit(Some(500), 480, false), Some(20));
        assert_eq!(lines_before_exit(Some(500), 700, false), Some(0));
        assert_eq!(lines_before_exit(Some(500), 10, true), None);

        let faults = Faults::new(0, "exit-after-lines=5".parse().unwrap());
        assert_eq!(faults.lines_before_exit(), Some(5));
        faults.count_lines(4);
        assert!(!faults.take_exit());
        assert_eq!(faults.lines_before_exit(), Some(1));
        faults.count_lines(1);
        assert!(faults.take_exit());
        assert!(!faults.take_exit(), "at most once");
        assert_eq!(faults.lines_before_exit(), None);
    }
}
