//! Register: start the bulk task (one per account at a time) and follow it
//! to its end with backoff and a progress bar.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use aws_sdk_iot::config::retry::RetryConfig;
use aws_sdk_iot::types::Status;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::aws::{describe, is_service_side, Aws};
use crate::error::{Error, Result};

/// What the task said when it ended.
#[derive(Clone, Debug)]
pub struct TaskEnd {
    pub status: String,
    pub success: i64,
    pub failure: i64,
    pub message: Option<String>,
}

/// Status values after which a task changes no more.
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "Completed" | "Failed" | "Cancelled")
}

fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(10));
    let capped = exp.min(max);
    // Full jitter keeps several provline processes from polling in step.
    let jitter = rand::random::<f64>() * 0.5 + 0.5;
    capped.mul_f64(jitter)
}

/// Task ids that are running (InProgress or Cancelling) in the account.
pub async fn running_tasks(aws: &Aws) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for status in [Status::InProgress, Status::Cancelling] {
        let mut token = None;
        loop {
            let out = aws
                .iot
                .list_thing_registration_tasks()
                .status(status.clone())
                .max_results(250)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| Error::infra(format!("listing registration tasks: {}", describe(&e))))?;
            ids.extend(out.task_ids().iter().cloned());
            token = out.next_token().map(String::from);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(ids)
}

/// Finds a task started for `input_key` (a crash between the start call and
/// storing its id). Looks through the most recent tasks only.
pub async fn find_task_by_input(aws: &Aws, bucket: &str, input_key: &str) -> Result<Option<String>> {
    let mut token = None;
    for _page in 0..8 {
        let out = aws
            .iot
            .list_thing_registration_tasks()
            .max_results(250)
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(|e| Error::infra(format!("listing registration tasks: {}", describe(&e))))?;
        for id in out.task_ids() {
            let d = aws
                .iot
                .describe_thing_registration_task()
                .task_id(id)
                .send()
                .await
                .map_err(|e| Error::infra(format!("describing task {id}: {}", describe(&e))))?;
            if d.input_file_key() == Some(input_key) && d.input_file_bucket() == Some(bucket) {
                return Ok(Some(id.clone()));
            }
        }
        token = out.next_token().map(String::from);
        if token.is_none() {
            break;
        }
    }
    Ok(None)
}

/// Waits until no other bulk task runs in the account, up to `deadline`.
pub async fn wait_for_account(aws: &Aws, deadline: Instant) -> Result<()> {
    let mut n = 0;
    loop {
        let running = running_tasks(aws).await?;
        if running.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::infra(format!(
                "another bulk registration task is still running in this account ({}); AWS allows one at a time. Run `provline resume` when it has ended",
                running.join(", ")
            )));
        }
        tracing::info!(tasks = ?running, "another bulk task is running in the account; waiting");
        tokio::time::sleep(backoff(n, Duration::from_secs(2), Duration::from_secs(30))).await;
        n += 1;
    }
}

/// Starts the task, exactly once.
///
/// StartThingRegistrationTask is not idempotent: a retry after a lost
/// response would start a second task on the same lines and give every
/// device a second certificate. So the SDK's own retries are off for this
/// call, and after any failure the task is first looked for by its input
/// key; only when there is none is the call made again. A 4xx while another
/// task is listed as running means "account busy", whatever its message says.
pub async fn start(aws: &Aws, template: &str, bucket: &str, key: &str, role_arn: &str) -> Result<String> {
    let mut tries = 0u32;
    loop {
        tries += 1;
        let out = aws
            .iot
            .start_thing_registration_task()
            .template_body(template)
            .input_file_bucket(bucket)
            .input_file_key(key)
            .role_arn(role_arn)
            .customize()
            .config_override(aws_sdk_iot::config::Builder::default().retry_config(RetryConfig::disabled()))
            .send()
            .await;
        let err = match out {
            Ok(o) => {
                return o
                    .task_id()
                    .map(String::from)
                    .ok_or_else(|| Error::infra("StartThingRegistrationTask returned no task id"))
            }
            Err(e) => e,
        };
        let text = describe(&err);
        // Whatever went wrong, the call may have been carried out.
        if let Some(id) = find_task_by_input(aws, bucket, key).await? {
            tracing::info!(task_id = %id, error = %text, "the start call failed, but its task exists; following it");
            return Ok(id);
        }
        if is_service_side(&err) {
            if tries >= 6 {
                return Err(Error::infra(format!(
                    "StartThingRegistrationTask failed {tries} times: {text}"
                )));
            }
            tracing::warn!(error = %text, tries, "StartThingRegistrationTask failed; no task was started; trying again");
            tokio::time::sleep(backoff(tries, Duration::from_millis(500), Duration::from_secs(20))).await;
            continue;
        }
        let running = running_tasks(aws).await.unwrap_or_default();
        if !running.is_empty() {
            return Err(Error::infra(format!(
                "the account is busy with task {} ({text}); run `provline resume` later",
                running.join(", ")
            )));
        }
        return Err(Error::config(format!("StartThingRegistrationTask was refused: {text}")));
    }
}

/// Polls until the task ends or `deadline` passes.
pub async fn follow(aws: &Aws, task_id: &str, lines: u64, deadline: Instant) -> Result<TaskEnd> {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} registering {msg} [{bar:30}] {pos}% ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{lines} devices, task {task_id}"));
    let mut n = 0u32;
    let mut last_progress = -1;
    let result = loop {
        let d = match aws.iot.describe_thing_registration_task().task_id(task_id).send().await {
            Ok(d) => d,
            Err(e) if is_service_side(&e) && Instant::now() < deadline => {
                tracing::warn!(task_id, error = %describe(&e), "describing the task failed; retrying");
                tokio::time::sleep(backoff(n, Duration::from_millis(500), Duration::from_secs(10))).await;
                n += 1;
                continue;
            }
            Err(e) => break Err(Error::infra(format!("describing task {task_id}: {}", describe(&e)))),
        };
        crate::failpoint::hit("polling");
        let status = d.status().map(|s| s.as_str().to_string()).unwrap_or_default();
        let progress = d.percentage_progress();
        bar.set_position(progress.clamp(0, 100) as u64);
        if progress != last_progress {
            tracing::debug!(task_id, status, progress, "task progress");
            last_progress = progress;
            n = 0;
        }
        if is_terminal(&status) {
            break Ok(TaskEnd {
                status,
                success: d.success_count() as i64,
                failure: d.failure_count() as i64,
                message: d.message().map(String::from),
            });
        }
        if Instant::now() >= deadline {
            break Err(Error::infra(format!(
                "task {task_id} is still {status} at {progress}% after the deadline; its id is kept, run `provline resume` to go on waiting"
            )));
        }
        tokio::time::sleep(backoff(n, Duration::from_millis(200), Duration::from_secs(5))).await;
        n += 1;
    };
    bar.finish_and_clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_three_statuses_are_terminal() {
        for s in ["Completed", "Failed", "Cancelled"] {
            assert!(is_terminal(s));
        }
        for s in ["InProgress", "Cancelling", "Paused", ""] {
            assert!(!is_terminal(s));
        }
    }

    #[test]
    fn backoff_is_capped() {
        let max = Duration::from_secs(5);
        for i in 0..40 {
            assert!(backoff(i, Duration::from_millis(200), max) <= max);
        }
    }
}
