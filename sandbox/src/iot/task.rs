//! The bulk registration task engine.
//!
//! One task runs at a time, in a tokio background task. It reads the input
//! object from the S3 files on disk and provisions its lines in input order
//! at the configured rate, a batch per tick, recording each line's outcome
//! in the persisted task. A sandbox restarted on the same state directory
//! resumes a running task after the last persisted line. When the task ends,
//! its RESULTS and ERRORS reports are written to [`REPORTS_BUCKET`], split
//! into files of [`LINES_PER_REPORT_FILE`] lines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::state::{self, LineOutcome, State, Task, TaskReports, TaskStatus};
use crate::{faults, ids, s3, ReportFormat, Shared, ACCOUNT_ID, FAULT_EXIT_CODE, REPORTS_BUCKET};

use super::provision::provision;
use super::registry::Ctx;
use super::template::{Pseudo, Template};
use super::ApiError;

/// Lines per report object.
pub(crate) const LINES_PER_REPORT_FILE: usize = 1000;
/// Most lines processed between two looks at the clock and the task status.
const MAX_BATCH: u64 = 200;
/// Longest input line AWS accepts.
const MAX_LINE_BYTES: usize = 256 * 1024;
/// Shortest time between two persisted progress steps.
const MIN_PERSIST_INTERVAL: Duration = Duration::from_millis(200);
/// How long a stopped task stays `Cancelling` before it is `Cancelled`.
const CANCEL_DELAY: Duration = Duration::from_millis(500);

/// The fields of StartThingRegistrationTask.
pub(crate) struct StartRequest {
    pub template_body: String,
    pub input_file_bucket: String,
    pub input_file_key: String,
    pub role_arn: String,
}

fn check_length(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(ApiError::invalid(format!(
            "{field} must be {min} to {max} characters long, not {len}"
        )));
    }
    Ok(())
}

/// StartThingRegistrationTask: validates, records the task and starts it.
pub(crate) async fn start(shared: &Arc<Shared>, request: StartRequest) -> Result<String, ApiError> {
    check_length("templateBody", &request.template_body, 0, 10240)?;
    check_length("inputFileBucket", &request.input_file_bucket, 3, 256)?;
    check_length("inputFileKey", &request.input_file_key, 1, 1024)?;
    check_length("roleArn", &request.role_arn, 20, 2048)?;
    let bucket_ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if !request.input_file_bucket.chars().all(bucket_ok) {
        return Err(ApiError::invalid("inputFileBucket must match [a-zA-Z0-9._-]+"));
    }
    // The model's pattern [a-zA-Z0-9!_.*'()-\/]+ (')' to '/' is a range).
    let key_ok = |c: char| c.is_ascii_alphanumeric() || "!_.*'()+,-/".contains(c);
    if !request.input_file_key.chars().all(key_ok) {
        return Err(ApiError::invalid("inputFileKey must match [a-zA-Z0-9!_.*'()-\\/]+"));
    }
    Template::parse(&request.template_body)
        .map_err(|e| ApiError::invalid(format!("Invalid registration template. {e}")))?;
    let object = s3::object_path(&shared.s3_root, &request.input_file_bucket, &request.input_file_key);
    if !object.is_some_and(|path| path.is_file()) {
        return Err(ApiError::invalid(format!(
            "the input file s3://{}/{} does not exist or cannot be read",
            request.input_file_bucket, request.input_file_key
        )));
    }

    let seed = shared.config.seed;
    let task_id = shared.store.write(|state| {
        if let Some(running) = state.tasks.iter().find(|t| t.status.is_running()) {
            return Err(ApiError::invalid(format!(
                "a thing registration task is already running in this account ({}); only one may run at a time",
                running.task_id
            )));
        }
        let task_id = ids::uuid(seed, "task", state.take_id());
        let now = state::now();
        state.tasks.push(Task {
            task_id: task_id.clone(),
            creation_date: now,
            last_modified_date: now,
            template_body: request.template_body,
            input_file_bucket: request.input_file_bucket,
            input_file_key: request.input_file_key,
            role_arn: request.role_arn,
            status: TaskStatus::InProgress,
            message: None,
            total_lines: None,
            outcomes: Vec::new(),
            reports: None,
        });
        state.tasks_started += 1;
        Ok(task_id)
    })?;
    commit(shared).await?;
    spawn_engine(shared, task_id.clone());
    tracing::info!(%task_id, "thing registration task started");
    Ok(task_id)
}

/// StopThingRegistrationTask: the engine notices `Cancelling` at its next
/// batch, writes the reports of what it did and ends in `Cancelled`.
pub(crate) async fn stop(shared: &Arc<Shared>, task_id: &str) -> Result<(), ApiError> {
    shared.store.write(|state| {
        let task = state
            .task_mut(task_id)
            .ok_or_else(|| ApiError::not_found(format!("Task {task_id} not found")))?;
        match task.status {
            TaskStatus::InProgress => {
                task.status = TaskStatus::Cancelling;
                task.last_modified_date = state::now();
                Ok(())
            }
            TaskStatus::Cancelling => Ok(()),
            other => Err(ApiError::invalid(format!(
                "Task {task_id} cannot be stopped: its status is {}",
                other.as_str()
            ))),
        }
    })?;
    commit(shared).await
}

/// Persists the state, as an API error if that fails.
pub(crate) async fn commit(shared: &Shared) -> Result<(), ApiError> {
    shared
        .store
        .persist()
        .await
        .map_err(|e| ApiError::internal(format!("the sandbox could not persist its state: {e:#}")))
}

/// Starts the engine of every task a previous run left unfinished.
pub(crate) fn resume_unfinished(shared: &Arc<Shared>) {
    let running: Vec<String> = shared.store.read(|state| {
        state
            .tasks
            .iter()
            .filter(|t| t.status.is_running())
            .map(|t| t.task_id.clone())
            .collect()
    });
    for task_id in running {
        tracing::info!(%task_id, "resuming thing registration task");
        spawn_engine(shared, task_id);
    }
}

fn spawn_engine(shared: &Arc<Shared>, task_id: String) {
    let handle = tokio::spawn(run(shared.clone(), task_id));
    let mut engines = state::lock(&shared.engines);
    engines.retain(|h| !h.is_finished());
    engines.push(handle);
}

async fn run(shared: Arc<Shared>, task_id: String) {
    if let Err(e) = drive(&shared, &task_id).await {
        tracing::error!(%task_id, error = %format!("{e:#}"), "thing registration task engine failed");
    }
}

/// An input line: its index in the file (from 0) and its text.
type Line = (u64, String);

/// Reads the input object and cuts it into non-blank lines.
async fn read_input(shared: &Shared, bucket: &str, key: &str) -> Result<Vec<Line>, String> {
    let path = s3::object_path(&shared.s3_root, bucket, key)
        .ok_or_else(|| format!("the input file name s3://{bucket}/{key} is not valid"))?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| format!("the input file s3://{bucket}/{key} cannot be read: {e}"))?;
    Ok(bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            (i as u64, String::from_utf8_lossy(line).into_owned())
        })
        .collect())
}

/// Runs a task until it ends or the sandbox shuts down.
async fn drive(shared: &Arc<Shared>, task_id: &str) -> anyhow::Result<()> {
    let Some((body, bucket, key)) = shared.store.read(|state| {
        state.task(task_id).map(|t| {
            (
                t.template_body.clone(),
                t.input_file_bucket.clone(),
                t.input_file_key.clone(),
            )
        })
    }) else {
        return Ok(());
    };
    let lines = match read_input(shared, &bucket, &key).await {
        Ok(lines) => lines,
        Err(message) => return finish(shared, task_id, TaskStatus::Failed, message).await,
    };
    let template = match Template::parse(&body) {
        Ok(template) => template,
        Err(e) => {
            let message = format!("Invalid registration template. {e}");
            return finish(shared, task_id, TaskStatus::Failed, message).await;
        }
    };
    let total = lines.len() as u64;
    shared.store.write(|state| {
        if let Some(task) = state.task_mut(task_id) {
            task.total_lines = Some(total);
        }
    });

    let mut shutdown = shared.shutdown.clone();
    // The rate follows the fault plan's slow factor, which may change at
    // any time; NaN differs from every rate, so the first pass sets it.
    let mut rate = f64::NAN;
    let mut started = Instant::now();
    let mut done_here = 0u64;
    let mut last_persist = Instant::now();
    let mut persist_every = MIN_PERSIST_INTERVAL;
    loop {
        if *shutdown.borrow() {
            shared.store.persist().await?;
            return Ok(());
        }
        let Some((status, next)) = shared
            .store
            .read(|state| state.task(task_id).map(|t| (t.status, t.outcomes.len() as u64)))
        else {
            return Ok(());
        };
        match status {
            TaskStatus::Cancelling => {
                // Cancelling is observable for a moment, as a real stop would be.
                tokio::select! {
                    _ = tokio::time::sleep(CANCEL_DELAY) => {}
                    _ = shutdown.changed() => continue,
                }
                let message = format!("Task cancelled after {next} of {total} lines");
                return finish(shared, task_id, TaskStatus::Cancelled, message).await;
            }
            TaskStatus::InProgress if next >= total => {
                let message = shared.store.read(|state| {
                    let failed = state.task(task_id).map_or(0, Task::failure_count);
                    format!(
                        "Task completed: {total} lines processed, {} succeeded, {failed} failed",
                        total - failed
                    )
                });
                return finish(shared, task_id, TaskStatus::Completed, message).await;
            }
            TaskStatus::InProgress => {}
            _ => return Ok(()),
        }
        // A plan set after its exit point had passed.
        if shared.faults.take_exit() {
            exit_abruptly(shared).await;
        }

        let plan = shared.faults.plan();
        let wanted = plan.task_rate(shared.config.lines_per_second);
        if wanted != rate {
            rate = wanted;
            started = Instant::now();
            done_here = 0;
        }
        let limited = rate.is_finite() && rate > 0.0;
        let budget = if limited {
            let due = ((started.elapsed().as_secs_f64() * rate) as u64).saturating_sub(done_here);
            if due == 0 {
                let next_due = (done_here + 1) as f64 / rate - started.elapsed().as_secs_f64();
                let wait = Duration::from_secs_f64(next_due.clamp(0.001, 0.05));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            due.min(MAX_BATCH)
        } else {
            MAX_BATCH
        };
        // Stop exactly at the exit point, so that the state persisted before
        // the exit holds that many lines.
        let budget = budget.min(shared.faults.lines_before_exit().unwrap_or(u64::MAX));

        let end = (next + budget).min(total);
        let batch = &lines[next as usize..end as usize];
        let share = plan.fail_after_certificate_share;
        let t0 = Instant::now();
        let failed_late = shared
            .store
            .write(|state| process_batch(state, shared, task_id, &template, batch, share));
        let worked = t0.elapsed();
        done_here += end - next;
        shared.faults.count_lines(end - next);
        for _ in 0..failed_late {
            shared.faults.count_fail_after_cert();
        }
        if shared.faults.take_exit() {
            exit_abruptly(shared).await;
        }
        if !limited && plan.slow_factor > 1.0 {
            // Unlimited, a task is as slow as its work; make it that much slower.
            let pause = worked.mul_f64(plan.slow_factor - 1.0);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }

        if last_persist.elapsed() >= persist_every {
            let t0 = Instant::now();
            shared.store.persist().await?;
            // Persisting a big state must not eat the task's time.
            persist_every = MIN_PERSIST_INTERVAL.max(t0.elapsed() * 2);
            last_persist = Instant::now();
        }
        tokio::task::yield_now().await;
    }
}

/// The [`FaultPlan::exit_after_lines`](crate::FaultPlan) fault: persists
/// the state and ends the process on the spot, as a crash would (no
/// reports, no clean shutdown).
async fn exit_abruptly(shared: &Shared) {
    tracing::warn!(
        status = FAULT_EXIT_CODE,
        "exit-after-lines fault: the sandbox process exits now, in the middle of its task"
    );
    if let Err(e) = shared.store.persist().await {
        tracing::error!(error = %format!("{e:#}"), "persisting the state before the injected exit failed");
    }
    std::process::exit(FAULT_EXIT_CODE);
}

/// Processes a batch of lines; returns how many failed late on purpose
/// (`fail_after_cert` is the plan's share of such lines).
fn process_batch(
    state: &mut State,
    shared: &Shared,
    task_id: &str,
    template: &Template,
    batch: &[Line],
    fail_after_cert: f64,
) -> u64 {
    let ctx = Ctx {
        region: &shared.config.region,
        seed: shared.config.seed,
        ca: &shared.ca,
    };
    let mut failed_late = 0;
    for (index, text) in batch {
        let outcome = process_line(state, ctx, template, task_id, *index, text, fail_after_cert);
        if matches!(
            outcome,
            LineOutcome::Failure {
                late_certificate_id: Some(_),
                ..
            }
        ) {
            failed_late += 1;
        }
        if let Some(task) = state.task_mut(task_id) {
            task.outcomes.push(outcome);
            task.last_modified_date = state::now();
        }
    }
    failed_late
}

/// Provisions one line; every failure is the line's own, except those the
/// fail-after-certificate fault (`fail_after_cert`, a share) chooses.
fn process_line(
    state: &mut State,
    ctx: Ctx<'_>,
    template: &Template,
    task_id: &str,
    line: u64,
    text: &str,
    fail_after_cert: f64,
) -> LineOutcome {
    let failure = |e: ApiError, thing_name: Option<String>| LineOutcome::Failure {
        line,
        error_code: e.code.to_owned(),
        error_message: e.message,
        thing_name,
        late_certificate_id: None,
    };
    if text.len() > MAX_LINE_BYTES {
        return failure(ApiError::invalid("the line is longer than 256 KiB"), None);
    }
    let params: Map<String, Value> = match serde_json::from_str(text) {
        Ok(Value::Object(params)) => params,
        Ok(_) => return failure(ApiError::invalid("the line is not a JSON object"), None),
        Err(e) => return failure(ApiError::invalid(format!("the line is not valid JSON: {e}")), None),
    };
    let guessed_name = params.get("ThingName").and_then(Value::as_str).map(str::to_owned);
    let pseudo = Pseudo {
        region: ctx.region,
        account_id: ACCOUNT_ID,
    };
    let resolved = match template.resolve(&params, &pseudo) {
        Ok(resolved) => resolved,
        Err(e) => return failure(ApiError::invalid(e.0), guessed_name),
    };
    let thing_name = resolved.thing.as_ref().map(|t| t.spec.name.clone()).or(guessed_name);
    // Derived from the task and the line, so a resumed task signs alike.
    let serial = ids::serial(ctx.seed, &format!("task/{task_id}"), line);
    match provision(state, ctx, &resolved, serial) {
        // The nasty case: everything was made and attached, yet the line
        // reads as failed.
        Ok(p)
            if p.certificate_created
                && p.attached_to_thing
                && faults::fails_after_certificate(fail_after_cert, ctx.seed, task_id, line) =>
        {
            LineOutcome::Failure {
                line,
                error_code: "InternalFailureException".to_owned(),
                error_message: "An internal failure occurred while registering the thing".to_owned(),
                thing_name,
                late_certificate_id: p.certificate_id,
            }
        }
        Ok(p) => LineOutcome::Success {
            line,
            certificate_id: p.certificate_id,
            issued_from_csr: p.issued_from_csr,
            resource_arns: p.resource_arns,
        },
        Err(e) => failure(e, thing_name),
    }
}

/// Writes the reports and moves the task to its final status.
async fn finish(shared: &Arc<Shared>, task_id: &str, status: TaskStatus, message: String) -> anyhow::Result<()> {
    let format = &shared.config.report_format;
    let (results, errors) = shared.store.read(|state| match state.task(task_id) {
        Some(task) => render_reports(state, task, format),
        None => (Vec::new(), Vec::new()),
    });
    let root = shared.s3_root.clone();
    let id = task_id.to_owned();
    let reports = tokio::task::spawn_blocking(move || write_reports(&root, &id, &results, &errors)).await??;

    shared.store.write(|state| {
        if let Some(task) = state.task_mut(task_id) {
            task.status = status;
            task.message = Some(message);
            task.reports = Some(reports);
            task.last_modified_date = state::now();
        }
    });
    shared.store.persist().await?;
    tracing::info!(%task_id, status = status.as_str(), "thing registration task ended");
    Ok(())
}

/// The RESULTS and ERRORS report lines of a task, in input order.
pub(crate) fn render_reports(state: &State, task: &Task, format: &ReportFormat) -> (Vec<String>, Vec<String>) {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for outcome in &task.outcomes {
        match outcome {
            LineOutcome::Success { .. } => results.push(result_line(state, outcome, format)),
            LineOutcome::Failure { .. } => errors.push(error_line(outcome, format)),
        }
    }
    (results, errors)
}

fn with_line_key(mut line: Map<String, Value>, index: u64, format: &ReportFormat) -> String {
    if let Some(key) = format.line_key.json_key() {
        line.insert(key.to_owned(), json!(index + u64::from(format.base)));
    }
    Value::Object(line).to_string()
}

/// `{"response": {"CertificatePem": .., "ResourceArns": {..}}, "<lineKey>": N}`.
pub(crate) fn result_line(state: &State, outcome: &LineOutcome, format: &ReportFormat) -> String {
    let LineOutcome::Success {
        line,
        certificate_id,
        issued_from_csr,
        resource_arns,
    } = outcome
    else {
        return String::new();
    };
    let mut response = Map::new();
    let pem = certificate_id
        .as_ref()
        .filter(|_| *issued_from_csr)
        .and_then(|id| state.certificates.get(id))
        .map(|c| c.certificate_pem.clone());
    if let Some(pem) = pem {
        response.insert("CertificatePem".to_owned(), json!(pem));
    }
    response.insert("ResourceArns".to_owned(), json!(resource_arns));
    let mut out = Map::new();
    out.insert("response".to_owned(), Value::Object(response));
    with_line_key(out, *line, format)
}

/// `{"errorMessage": "<code>: <message>", "<lineKey>": N}`, or the legacy
/// `{"thingName", "errorCode", "errorMessage"}`.
pub(crate) fn error_line(outcome: &LineOutcome, format: &ReportFormat) -> String {
    let LineOutcome::Failure {
        line,
        error_code,
        error_message,
        thing_name,
        ..
    } = outcome
    else {
        return String::new();
    };
    if format.legacy_errors {
        return json!({
            "thingName": thing_name,
            "errorCode": error_code,
            "errorMessage": error_message,
        })
        .to_string();
    }
    let mut out = Map::new();
    out.insert(
        "errorMessage".to_owned(),
        json!(format!("{error_code}: {error_message}")),
    );
    with_line_key(out, *line, format)
}

/// Writes report objects (at least one per kind, possibly empty) and
/// returns their keys.
fn write_reports(
    root: &std::path::Path,
    task_id: &str,
    results: &[String],
    errors: &[String],
) -> anyhow::Result<TaskReports> {
    let mut reports = TaskReports::default();
    for (kind, lines, keys) in [
        ("results", results, &mut reports.results),
        ("errors", errors, &mut reports.errors),
    ] {
        let chunks: Vec<&[String]> = if lines.is_empty() {
            vec![&[]]
        } else {
            lines.chunks(LINES_PER_REPORT_FILE).collect()
        };
        for (n, chunk) in chunks.iter().enumerate() {
            let key = format!("{task_id}/{kind}-{:04}.json", n + 1);
            let mut body = String::new();
            for line in *chunk {
                body.push_str(line);
                body.push('\n');
            }
            s3::write_object(root, REPORTS_BUCKET, &key, body.as_bytes())?;
            keys.push(key);
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LineKey;
    use std::collections::BTreeMap;

    fn success() -> LineOutcome {
        LineOutcome::Success {
            line: 0,
            certificate_id: None,
            issued_from_csr: false,
            resource_arns: BTreeMap::from([("thing".to_owned(), "arn:aws:iot:r:a:thing/t".to_owned())]),
        }
    }

    fn failure() -> LineOutcome {
        LineOutcome::Failure {
            line: 4,
            error_code: "InvalidRequestException".into(),
            error_message: "bad".into(),
            thing_name: Some("t".into()),
            late_certificate_id: None,
        }
    }

    fn parse(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn report_line_shapes() {
        let state = State::default();
        let default = ReportFormat::default();
        assert_eq!(
            parse(&result_line(&state, &success(), &default)),
            json!({"response": {"ResourceArns": {"thing": "arn:aws:iot:r:a:thing/t"}}, "lineNumber": 1})
        );
        assert_eq!(
            parse(&error_line(&failure(), &default)),
            json!({"errorMessage": "InvalidRequestException: bad", "lineNumber": 5})
        );

        let offset0 = ReportFormat {
            line_key: LineKey::Offset,
            base: 0,
            legacy_errors: false,
        };
        assert_eq!(parse(&result_line(&state, &success(), &offset0))["offset"], json!(0));
        assert_eq!(parse(&error_line(&failure(), &offset0))["offset"], json!(4));

        let absent = ReportFormat {
            line_key: LineKey::Absent,
            ..default.clone()
        };
        let line = parse(&result_line(&state, &success(), &absent));
        assert_eq!(line.as_object().unwrap().len(), 1);

        let legacy = ReportFormat {
            legacy_errors: true,
            ..default
        };
        assert_eq!(
            parse(&error_line(&failure(), &legacy)),
            json!({"thingName": "t", "errorCode": "InvalidRequestException", "errorMessage": "bad"})
        );
    }

    #[test]
    fn reports_split_every_thousand_lines() {
        let dir = tempfile::tempdir().unwrap();
        let results: Vec<String> = (0..2500).map(|i| format!("{{\"n\":{i}}}")).collect();
        let reports = write_reports(dir.path(), "t1", &results, &[]).unwrap();
        assert_eq!(
            reports.results,
            ["t1/results-0001.json", "t1/results-0002.json", "t1/results-0003.json"]
        );
        assert_eq!(reports.errors, ["t1/errors-0001.json"]);
        let last = std::fs::read_to_string(dir.path().join(REPORTS_BUCKET).join("t1/results-0003.json")).unwrap();
        assert_eq!(last.lines().count(), 500);
        let empty = std::fs::read_to_string(dir.path().join(REPORTS_BUCKET).join("t1/errors-0001.json")).unwrap();
        assert!(empty.is_empty());
    }
}
