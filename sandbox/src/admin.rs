//! The admin endpoint under `/_sandbox/`: the fault plan and the stats.
//!
//! It needs no signature and is never subject to injected faults.
//!
//! - `GET /_sandbox/faults`: the plan in force as JSON (the fields of
//!   [`FaultPlan`]); the `x-sandbox-faults` header has it in the text syntax.
//! - `PUT /_sandbox/faults`: replaces the plan; the body is the text syntax
//!   or JSON (a body starting with `{`), empty for no faults. Answers like
//!   GET, with the new plan; a bad plan is HTTP 400 `{"message": ..}`.
//! - `GET /_sandbox/stats`: [`stats`].
//! - `GET /_sandbox/device-endpoint`: `{"address": "127.0.0.1:PORT",
//!   "serverName": "<the iot:Data-ATS address>"}`.

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use s3s::Body;
use serde_json::{json, Value};

use crate::state::LineOutcome;
use crate::{FaultPlan, Shared};

/// The path prefix of the admin endpoint.
pub(crate) const PREFIX: &str = "/_sandbox/";

/// Largest admin request body read.
const MAX_BODY: usize = 64 * 1024;

/// Whether a request path is for the admin endpoint.
pub(crate) fn is_admin(path: &str) -> bool {
    path.starts_with(PREFIX) || path == PREFIX.trim_end_matches('/')
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({ "message": message.into() }))
}

fn plan_response(plan: &FaultPlan) -> Response<Body> {
    let body = serde_json::to_value(plan).unwrap_or(Value::Null);
    let mut response = json_response(StatusCode::OK, &body);
    if let Ok(text) = HeaderValue::from_str(&plan.to_string()) {
        response.headers_mut().insert("x-sandbox-faults", text);
    }
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this admin path allows {allow} only"),
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Handles one admin request.
pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    match (path.as_str(), method) {
        ("/_sandbox/faults", Method::GET) => plan_response(&shared.faults.plan()),
        ("/_sandbox/faults", Method::PUT) => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")),
            };
            let Ok(text) = std::str::from_utf8(&body) else {
                return error(StatusCode::BAD_REQUEST, "the fault plan is not valid UTF-8");
            };
            match FaultPlan::parse_any(text) {
                Ok(plan) => {
                    tracing::info!(faults = %plan, "sandbox fault plan replaced through the admin endpoint");
                    shared.faults.set_plan(plan.clone());
                    plan_response(&plan)
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        ("/_sandbox/faults", _) => method_not_allowed("GET, PUT"),
        ("/_sandbox/stats", Method::GET) => json_response(StatusCode::OK, &stats(shared)),
        ("/_sandbox/stats", _) => method_not_allowed("GET"),
        ("/_sandbox/device-endpoint", Method::GET) => json_response(
            StatusCode::OK,
            &json!({
                "address": shared.device_addr.to_string(),
                "serverName": shared.device_server_name,
            }),
        ),
        ("/_sandbox/device-endpoint", _) => method_not_allowed("GET"),
        _ => error(
            StatusCode::NOT_FOUND,
            format!(
                "no admin resource at {}: there are GET and PUT /_sandbox/faults, GET /_sandbox/stats and GET /_sandbox/device-endpoint",
                req.uri().path()
            ),
        ),
    }
}

/// The stats of a sandbox; see [`crate::Sandbox::stats`].
pub(crate) fn stats(shared: &Shared) -> Value {
    let (tasks_started, late) = shared.store.read(|state| {
        let late: Vec<Value> = state
            .tasks
            .iter()
            .flat_map(|task| {
                task.outcomes.iter().filter_map(move |outcome| match outcome {
                    LineOutcome::Failure {
                        line,
                        thing_name,
                        late_certificate_id: Some(certificate_id),
                        ..
                    } => Some(json!({
                        "task_id": task.task_id,
                        "line_index": line,
                        "thing_name": thing_name,
                        "certificate_id": certificate_id,
                    })),
                    _ => None,
                })
            })
            .collect();
        (state.tasks_started, late)
    });
    let (calls, injected, lines_processed) = shared.faults.stats();
    json!({
        "tasks_started": tasks_started,
        "calls": calls,
        "faults_injected": injected,
        "lines_processed": lines_processed,
        "fail_after_cert_lines": late,
        "iam_calls": *crate::state::lock(&shared.iam_calls),
        "device": shared.device_stats.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_paths() {
        assert!(is_admin("/_sandbox/faults"));
        assert!(is_admin("/_sandbox/stats"));
        assert!(is_admin("/_sandbox"));
        assert!(!is_admin("/_sandboxes/x"));
        assert!(!is_admin("/things/_sandbox"));
    }
}
