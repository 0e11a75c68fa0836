//! End-to-end tests of a running sandbox, over plain HTTP/1.1 on loopback.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{Config, Fault, FaultPlan, LineKey, ReportFormat, Sandbox, FAULT_EXIT_CODE, REPORTS_BUCKET};

/// What routes a request to the IoT side (the signature is not checked).
const IOT_AUTH: &str =
    "AWS4-HMAC-SHA256 Credential=sandbox/20260101/us-east-1/iot/aws4_request, SignedHeaders=host, Signature=00";

pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request; `url` is an absolute `http://host:port/path?query`.
pub(crate) async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    try_send(method, url, headers, body)
        .await
        .expect("the connection closed without a response")
}

/// Like [`send`], but `None` when the connection closes without a response.
async fn try_send(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Option<Reply> {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, target) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();

    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Some(Reply { status, headers, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

async fn iot(sandbox: &Sandbox, method: &str, path: &str, body: Value) -> Reply {
    let url = format!("{}{path}", sandbox.endpoint_url());
    send(method, &url, &[("Authorization", IOT_AUTH)], &body.to_string()).await
}

/// Puts an object straight into the S3 directory.
fn put_object(sandbox: &Sandbox, bucket: &str, key: &str, content: &str) {
    crate::s3::write_object(&sandbox.state_dir().join("s3"), bucket, key, content.as_bytes()).unwrap();
}

fn csr() -> String {
    crate::ca::tests::p256_csr().1
}

const TEMPLATE: &str = r#"{
  "Parameters": {"ThingName": {"Type": "String"}, "CSR": {"Type": "String"}},
  "Resources": {
    "device": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "ThingName"}},
               "OverrideSettings": {"AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "DO_NOTHING"}},
    "cert": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateSigningRequest": {"Ref": "CSR"}, "Status": "ACTIVE"}},
    "pol": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "device-policy"}}
  }
}"#;

fn lines(count: usize, prefix: &str) -> String {
    let csr = csr();
    (0..count)
        .map(|i| json!({"ThingName": format!("{prefix}-{i}"), "CSR": csr}).to_string() + "\n")
        .collect()
}

async fn start_task(sandbox: &Sandbox, key: &str) -> Reply {
    let body = json!({
        "templateBody": TEMPLATE,
        "inputFileBucket": "staging",
        "inputFileKey": key,
        "roleArn": "arn:aws:iam::123456789012:role/provisioning",
    });
    iot(sandbox, "POST", "/thing-registration-tasks", body).await
}

async fn describe(sandbox: &Sandbox, task_id: &str) -> Value {
    iot(
        sandbox,
        "GET",
        &format!("/thing-registration-tasks/{task_id}"),
        json!({}),
    )
    .await
    .json()
}

async fn wait_for_status(sandbox: &Sandbox, task_id: &str, wanted: &str) -> Value {
    for _ in 0..400 {
        let task = describe(sandbox, task_id).await;
        if task["status"] == wanted {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("task {task_id} never reached {wanted}");
}

async fn create_policy(sandbox: &Sandbox) {
    let doc = json!({"policyDocument": "{\"Version\":\"2012-10-17\",\"Statement\":[]}"});
    assert_eq!(iot(sandbox, "POST", "/policies/device-policy", doc).await.status, 200);
}

/// Downloads every report file of one type through its pre-signed links.
async fn report(sandbox: &Sandbox, task_id: &str, kind: &str) -> Vec<Value> {
    let path = format!("/thing-registration-tasks/{task_id}/reports?reportType={kind}");
    let links = iot(sandbox, "GET", &path, json!({})).await.json();
    let mut out = Vec::new();
    for link in links["resourceLinks"].as_array().unwrap() {
        let reply = send("GET", link.as_str().unwrap(), &[], "").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        out.extend(reply.body.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
    }
    out
}

#[tokio::test]
async fn restart_keeps_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::default()
    };

    let sandbox = Sandbox::start(config.clone()).await.unwrap();
    let ca = sandbox.ca_certificate_pem();
    let created = iot(
        &sandbox,
        "POST",
        "/things/kept",
        json!({"attributePayload": {"attributes": {"a": "1"}}}),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let thing_id = created.json()["thingId"].clone();
    sandbox.shutdown().await.unwrap();

    let sandbox = Sandbox::start(config).await.unwrap();
    let described = iot(&sandbox, "GET", "/things/kept", json!({})).await;
    assert_eq!(described.status, 200);
    assert_eq!(described.json()["thingId"], thing_id);
    assert_eq!(described.json()["attributes"], json!({"a": "1"}));
    assert_eq!(sandbox.ca_certificate_pem(), ca);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn errors_carry_the_modelled_type_and_status() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let missing = iot(&sandbox, "GET", "/things/nope", json!({})).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("x-amzn-errortype"), Some("ResourceNotFoundException"));
    assert!(missing.json()["message"].as_str().unwrap().contains("nope"));

    assert_eq!(iot(&sandbox, "POST", "/things/t1", json!({})).await.status, 200);
    assert_eq!(iot(&sandbox, "POST", "/things/t1", json!({})).await.status, 200);
    let conflict = iot(
        &sandbox,
        "POST",
        "/things/t1",
        json!({"attributePayload": {"attributes": {"a": "b"}}}),
    )
    .await;
    assert_eq!(conflict.status, 409);
    assert_eq!(
        conflict.header("x-amzn-errortype"),
        Some("ResourceAlreadyExistsException")
    );
    assert!(conflict.json()["resourceArn"].as_str().unwrap().ends_with(":thing/t1"));

    let bad = iot(&sandbox, "POST", "/things/a%20b", json!({})).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.header("x-amzn-errortype"), Some("InvalidRequestException"));
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn certificates_from_csrs_and_attachments() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    create_policy(&sandbox).await;
    assert_eq!(iot(&sandbox, "POST", "/things/d1", json!({})).await.status, 200);
    let csr = csr();
    let first = iot(
        &sandbox,
        "POST",
        "/certificates?setAsActive=true",
        json!({"certificateSigningRequest": csr}),
    )
    .await;
    let second = iot(
        &sandbox,
        "POST",
        "/certificates",
        json!({"certificateSigningRequest": csr}),
    )
    .await;
    let (first, second) = (first.json(), second.json());
    assert_ne!(
        first["certificateId"], second["certificateId"],
        "a CSR used twice gives two certificates"
    );
    let arn = first["certificateArn"].as_str().unwrap().to_owned();
    let id = first["certificateId"].as_str().unwrap();

    let described = iot(&sandbox, "GET", &format!("/certificates/{id}"), json!({}))
        .await
        .json();
    assert_eq!(described["certificateDescription"]["status"], "ACTIVE");
    assert_eq!(
        described["certificateDescription"]["validity"]["notAfter"],
        json!(2_524_607_999.0)
    );

    let encoded = arn.replace(':', "%3A").replace('/', "%2F");
    assert_eq!(
        iot(
            &sandbox,
            "PUT",
            "/target-policies/device-policy",
            json!({"target": arn})
        )
        .await
        .status,
        200
    );
    let attached = iot(&sandbox, "POST", &format!("/attached-policies/{encoded}"), json!({}))
        .await
        .json();
    assert_eq!(attached["policies"][0]["policyName"], "device-policy");

    let url = format!("{}/things/d1/principals", sandbox.endpoint_url());
    let headers = [("Authorization", IOT_AUTH), ("x-amzn-principal", arn.as_str())];
    assert_eq!(send("PUT", &url, &headers, "").await.status, 200);
    let principals = iot(&sandbox, "GET", "/things/d1/principals", json!({})).await.json();
    assert_eq!(principals["principals"], json!([arn]));

    let deactivate = iot(
        &sandbox,
        "PUT",
        &format!("/certificates/{id}?newStatus=INACTIVE"),
        json!({}),
    )
    .await;
    assert_eq!(deactivate.status, 200);
    let in_use = iot(&sandbox, "DELETE", &format!("/certificates/{id}"), json!({})).await;
    assert_eq!(in_use.header("x-amzn-errortype"), Some("DeleteConflictException"));
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn bulk_task_end_to_end() {
    let config = Config {
        lines_per_second: 100.0,
        report_format: ReportFormat {
            line_key: LineKey::Offset,
            base: 0,
            legacy_errors: false,
        },
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    create_policy(&sandbox).await;
    let mut input = lines(2, "ok");
    input.push_str("not json\n\n");
    input.push_str(&json!({"ThingName": "bad name", "CSR": csr()}).to_string());
    input.push('\n');
    input.push_str(&lines(30, "more"));
    put_object(&sandbox, "staging", "in/batch.ndjson", &input);

    let missing = start_task(&sandbox, "in/none.ndjson").await;
    assert_eq!(missing.header("x-amzn-errortype"), Some("InvalidRequestException"));

    let started = start_task(&sandbox, "in/batch.ndjson").await;
    assert_eq!(started.status, 200, "{}", started.body);
    let task_id = started.json()["taskId"].as_str().unwrap().to_owned();
    assert_eq!(task_id.len(), 36);

    let busy = start_task(&sandbox, "in/batch.ndjson").await;
    assert_eq!(busy.status, 400);
    assert!(busy.json()["message"].as_str().unwrap().contains("already running"));
    let running = iot(
        &sandbox,
        "GET",
        "/thing-registration-tasks/x/reports?reportType=RESULTS",
        json!({}),
    )
    .await;
    assert_eq!(running.header("x-amzn-errortype"), Some("InvalidRequestException"));
    let links = iot(
        &sandbox,
        "GET",
        &format!("/thing-registration-tasks/{task_id}/reports?reportType=RESULTS"),
        json!({}),
    )
    .await;
    assert_eq!(
        links.json()["resourceLinks"],
        json!([]),
        "no links before the task ends"
    );

    let task = wait_for_status(&sandbox, &task_id, "Completed").await;
    assert_eq!(task["successCount"], 32);
    assert_eq!(task["failureCount"], 2);
    assert_eq!(task["percentageProgress"], 100);

    let results = report(&sandbox, &task_id, "RESULTS").await;
    assert_eq!(results.len(), 32);
    assert_eq!(results[0]["offset"], 0);
    assert_eq!(results[2]["offset"], 5, "physical line numbers, blank lines counted");
    let arns = &results[0]["response"]["ResourceArns"];
    assert_eq!(arns["device"], "arn:aws:iot:us-east-1:123456789012:thing/ok-0");
    assert!(arns["pol"].as_str().unwrap().ends_with(":policy/device-policy"));
    let pem = results[0]["response"]["CertificatePem"].as_str().unwrap();
    let parsed = crate::ca::parse_certificate(pem).unwrap();
    assert!(arns["cert"].as_str().unwrap().ends_with(&parsed.id));

    let errors = report(&sandbox, &task_id, "ERRORS").await;
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["offset"], 2);
    assert!(errors[0]["errorMessage"]
        .as_str()
        .unwrap()
        .starts_with("InvalidRequestException"));
    assert_eq!(errors[1]["offset"], 4);

    let listed = iot(&sandbox, "GET", "/thing-registration-tasks?status=Completed", json!({}))
        .await
        .json();
    assert_eq!(listed["taskIds"], json!([task_id]));
    let described = iot(&sandbox, "GET", "/things/more-29/principals", json!({}))
        .await
        .json();
    assert_eq!(described["principals"].as_array().unwrap().len(), 1);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn stop_goes_through_cancelling() {
    let config = Config {
        lines_per_second: 20.0,
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    create_policy(&sandbox).await;
    put_object(&sandbox, "staging", "in.ndjson", &lines(100, "c"));
    let task_id = start_task(&sandbox, "in.ndjson").await.json()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stop = iot(
        &sandbox,
        "PUT",
        &format!("/thing-registration-tasks/{task_id}/cancel"),
        json!({}),
    )
    .await;
    assert_eq!(stop.status, 200, "{}", stop.body);
    assert_eq!(describe(&sandbox, &task_id).await["status"], "Cancelling");
    let task = wait_for_status(&sandbox, &task_id, "Cancelled").await;
    let done = task["successCount"].as_u64().unwrap();
    assert!(done > 0 && done < 100, "{task}");
    assert_eq!(report(&sandbox, &task_id, "RESULTS").await.len() as u64, done);

    // A new task may start once the old one has ended.
    assert_eq!(start_task(&sandbox, "in.ndjson").await.status, 200);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_sandbox_resumes_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: Some(dir.path().to_owned()),
        lines_per_second: 40.0,
        ..Config::default()
    };
    let sandbox = Sandbox::start(config.clone()).await.unwrap();
    create_policy(&sandbox).await;
    put_object(&sandbox, "staging", "in.ndjson", &lines(40, "r"));
    let task_id = start_task(&sandbox, "in.ndjson").await.json()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(400)).await;
    sandbox.shutdown().await.unwrap();

    let state = crate::state::load(&dir.path().join(crate::STATE_FILE)).unwrap();
    let before = state.task(&task_id).unwrap().outcomes.len();
    assert!(before > 0 && before < 40, "{before} lines before the restart");

    let sandbox = Sandbox::start(config).await.unwrap();
    let task = wait_for_status(&sandbox, &task_id, "Completed").await;
    assert_eq!(task["successCount"], 40);
    let results = report(&sandbox, &task_id, "RESULTS").await;
    let numbers: Vec<u64> = results.iter().map(|r| r["lineNumber"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=40).collect::<Vec<_>>(), "every line once, in input order");
    let things = iot(&sandbox, "GET", "/things?maxResults=250", json!({})).await.json();
    assert_eq!(things["things"].as_array().unwrap().len(), 40);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn report_links_expire() {
    let config = Config {
        report_link_ttl_secs: 1,
        lines_per_second: 0.0,
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    create_policy(&sandbox).await;
    put_object(&sandbox, "staging", "in.ndjson", &lines(1, "e"));
    let task_id = start_task(&sandbox, "in.ndjson").await.json()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_status(&sandbox, &task_id, "Completed").await;
    let path = format!("/thing-registration-tasks/{task_id}/reports?reportType=RESULTS");
    let links = iot(&sandbox, "GET", &path, json!({})).await.json();
    let link = links["resourceLinks"][0].as_str().unwrap().to_owned();
    assert!(link.contains(&format!("/{REPORTS_BUCKET}/{task_id}/results-0001.json?")));
    assert_eq!(send("GET", &link, &[], "").await.status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(send("GET", &link, &[], "").await.status, 403);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn injected_faults() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    create_policy(&sandbox).await;
    put_object(&sandbox, "staging", "in.ndjson", &lines(1, "f"));

    sandbox.inject_fault("POST /thing-registration-tasks", Fault::Throttling, 1);
    let throttled = start_task(&sandbox, "in.ndjson").await;
    assert_eq!(throttled.status, 400);
    assert_eq!(throttled.header("x-amzn-errortype"), Some("ThrottlingException"));

    sandbox.inject_fault("GET /things/", Fault::ServiceUnavailable, 1);
    assert_eq!(iot(&sandbox, "GET", "/things/x", json!({})).await.status, 503);
    assert_eq!(iot(&sandbox, "GET", "/things/x", json!({})).await.status, 404);

    // The task starts, but its id never reaches the client.
    sandbox.inject_fault("POST /thing-registration-tasks", Fault::DropResponse, 1);
    let body = json!({
        "templateBody": TEMPLATE,
        "inputFileBucket": "staging",
        "inputFileKey": "in.ndjson",
        "roleArn": "arn:aws:iam::123456789012:role/provisioning",
    });
    let url = format!("{}/thing-registration-tasks", sandbox.endpoint_url());
    let lost = try_send("POST", &url, &[("Authorization", IOT_AUTH)], &body.to_string()).await;
    assert!(lost.is_none());
    let listed = iot(&sandbox, "GET", "/thing-registration-tasks", json!({}))
        .await
        .json();
    assert_eq!(listed["taskIds"].as_array().unwrap().len(), 1);

    sandbox.inject_fault("", Fault::DropConnection, 1);
    assert!(try_send(
        "GET",
        &format!("{}/things", sandbox.endpoint_url()),
        &[("Authorization", IOT_AUTH)],
        ""
    )
    .await
    .is_none());
    sandbox.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Fault plans and the admin endpoint

async fn admin(sandbox: &Sandbox, method: &str, path: &str, body: &str) -> Reply {
    send(method, &format!("{}{path}", sandbox.endpoint_url()), &[], body).await
}

fn plan(spec: &str) -> FaultPlan {
    spec.parse().unwrap()
}

#[tokio::test]
async fn planned_call_faults() {
    let config = Config {
        faults: plan("throttle=1"),
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    for _ in 0..5 {
        let throttled = iot(&sandbox, "POST", "/things/t1", json!({})).await;
        assert_eq!(throttled.status, 400);
        assert_eq!(throttled.header("x-amzn-errortype"), Some("ThrottlingException"));
        assert_eq!(throttled.json()["message"], "Rate exceeded");
    }
    // Neither S3 nor the admin endpoint is throttled.
    // (S3 refuses the unsigned request itself: AccessDenied, not throttling.)
    put_object(&sandbox, "staging", "k", "v");
    let s3 = send("GET", &format!("{}/staging/k", sandbox.endpoint_url()), &[], "").await;
    assert_eq!(s3.status, 403, "{}", s3.body);
    assert!(s3.body.contains("AccessDenied"), "{}", s3.body);
    assert_eq!(s3.header("x-amzn-errortype"), None);
    assert_eq!(admin(&sandbox, "GET", "/_sandbox/stats", "").await.status, 200);

    sandbox.set_faults(FaultPlan::default()).unwrap();
    let missing = iot(&sandbox, "GET", "/things/t1", json!({})).await;
    assert_eq!(missing.status, 404, "a throttled call is not carried out");

    sandbox.set_faults(plan("5xx=1")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let failed = iot(&sandbox, "GET", "/things", json!({})).await;
        let kind = failed.header("x-amzn-errortype").unwrap().to_owned();
        match failed.status {
            500 => assert_eq!(kind, "InternalFailureException"),
            503 => assert_eq!(kind, "ServiceUnavailableException"),
            other => panic!("status {other}"),
        }
        seen.insert(failed.status);
    }
    assert_eq!(seen.len(), 2, "both 500 and 503");

    let url = format!("{}/things/t2", sandbox.endpoint_url());
    sandbox.set_faults(plan("drop=1")).unwrap();
    assert!(try_send("POST", &url, &[("Authorization", IOT_AUTH)], "{}")
        .await
        .is_none());
    sandbox.set_faults(plan("drop-response=1")).unwrap();
    assert!(try_send("POST", &url, &[("Authorization", IOT_AUTH)], "{}")
        .await
        .is_none());
    sandbox.set_faults(FaultPlan::default()).unwrap();
    assert_eq!(
        iot(&sandbox, "GET", "/things/t2", json!({})).await.status,
        200,
        "a dropped response's call was carried out"
    );

    let stats = sandbox.stats();
    assert_eq!(
        stats["faults_injected"],
        json!({"throttle": 5, "5xx": 20, "drop": 1, "drop_response": 1, "fail_after_cert": 0})
    );
    assert_eq!(stats["calls"]["CreateThing"], 7);
    assert_eq!(stats["calls"]["ListThings"], 20);
    assert_eq!(stats["calls"]["DescribeThing"], 2);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn call_shares_are_reproducible() {
    let run = || async {
        let config = Config {
            seed: 42,
            faults: plan("throttle=0.3,5xx=0.2"),
            ..Config::default()
        };
        let sandbox = Sandbox::start(config).await.unwrap();
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(iot(&sandbox, "GET", "/things", json!({})).await.status);
        }
        sandbox.shutdown().await.unwrap();
        statuses
    };
    let first = run().await;
    assert_eq!(first, run().await);
    assert!(first.contains(&200) && first.contains(&400) && first.iter().any(|s| *s >= 500));
}

#[tokio::test]
async fn fail_after_certificate_leaves_attached_certificates() {
    let config = Config {
        lines_per_second: 0.0,
        faults: plan("fail-after-cert=0.5"),
        seed: 5,
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    create_policy(&sandbox).await;
    let mut input = lines(40, "late");
    input.push_str("not json\n");
    put_object(&sandbox, "staging", "in.ndjson", &input);
    let task_id = start_task(&sandbox, "in.ndjson").await.json()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = wait_for_status(&sandbox, &task_id, "Completed").await;

    let stats = sandbox.stats();
    let late = stats["fail_after_cert_lines"].as_array().unwrap().clone();
    assert!(
        late.len() > 5 && late.len() < 35,
        "{} of 40 lines failed late",
        late.len()
    );
    assert_eq!(stats["faults_injected"]["fail_after_cert"], late.len());
    assert_eq!(task["failureCount"], late.len() + 1, "the chosen lines and the bad one");
    assert_eq!(task["successCount"], 40 - late.len());

    let errors = report(&sandbox, &task_id, "ERRORS").await;
    let late_errors: Vec<&Value> = errors
        .iter()
        .filter(|e| {
            e["errorMessage"]
                .as_str()
                .unwrap()
                .starts_with("InternalFailureException: ")
        })
        .collect();
    assert_eq!(late_errors.len(), late.len());
    for (error, record) in late_errors.iter().zip(&late) {
        assert_eq!(record["task_id"], task_id.as_str());
        assert_eq!(error["lineNumber"], record["line_index"].as_u64().unwrap() + 1);
        let thing = record["thing_name"].as_str().unwrap();
        let certificate_id = record["certificate_id"].as_str().unwrap();

        let cert = iot(&sandbox, "GET", &format!("/certificates/{certificate_id}"), json!({})).await;
        assert_eq!(cert.status, 200);
        assert_eq!(cert.json()["certificateDescription"]["status"], "ACTIVE");
        let principals = iot(&sandbox, "GET", &format!("/things/{thing}/principals"), json!({}))
            .await
            .json();
        let arn = cert.json()["certificateDescription"]["certificateArn"].clone();
        assert_eq!(
            principals["principals"],
            json!([arn]),
            "the certificate is attached to {thing}"
        );
    }
    let results = report(&sandbox, &task_id, "RESULTS").await;
    assert_eq!(results.len(), 40 - late.len());

    // Report downloads are S3: a fully throttled IoT side does not touch them.
    let path = format!("/thing-registration-tasks/{task_id}/reports?reportType=RESULTS");
    let links = iot(&sandbox, "GET", &path, json!({})).await.json();
    sandbox.set_faults(plan("throttle=0.5,drop=0.5")).unwrap();
    let link = links["resourceLinks"][0].as_str().unwrap();
    for _ in 0..5 {
        assert_eq!(send("GET", link, &[], "").await.status, 200);
    }
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn slow_factor_changes_a_running_task() {
    let config = Config {
        lines_per_second: 1000.0,
        faults: plan("slow=1000"),
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    create_policy(&sandbox).await;
    put_object(&sandbox, "staging", "in.ndjson", &lines(50, "s"));
    let task_id = start_task(&sandbox, "in.ndjson").await.json()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slow = describe(&sandbox, &task_id).await;
    assert!(slow["successCount"].as_u64().unwrap() <= 1, "one line a second: {slow}");

    let reply = admin(&sandbox, "PUT", "/_sandbox/faults", "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let task = wait_for_status(&sandbox, &task_id, "Completed").await;
    assert_eq!(task["successCount"], 50);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_endpoint_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: Some(dir.path().to_owned()),
        lines_per_second: 0.0,
        ..Config::default()
    };
    let sandbox = Sandbox::start(config.clone()).await.unwrap();

    let none = admin(&sandbox, "GET", "/_sandbox/faults", "").await;
    assert_eq!(none.status, 200);
    assert_eq!(none.header("content-type"), Some("application/json"));
    assert_eq!(
        serde_json::from_value::<FaultPlan>(none.json()).unwrap(),
        FaultPlan::default()
    );

    let spec = "throttle=0.1,5xx=0.05,drop=0.02,drop-response=0.01,slow=4,fail-after-cert=0.02,exit-after-lines=500";
    let put = admin(&sandbox, "PUT", "/_sandbox/faults", spec).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.header("x-sandbox-faults"), Some(spec));
    let got = admin(&sandbox, "GET", "/_sandbox/faults", "").await;
    assert_eq!(
        got.json(),
        json!({
            "throttle_share": 0.1,
            "error_share": 0.05,
            "drop_share": 0.02,
            "drop_response_share": 0.01,
            "slow_factor": 4.0,
            "fail_after_certificate_share": 0.02,
            "exit_after_lines": 500,
        })
    );
    assert_eq!(sandbox.faults(), plan(spec));

    // JSON works too; what is left out is off.
    let put = admin(&sandbox, "PUT", "/_sandbox/faults", r#"{"drop_share": 0.25}"#).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.header("x-sandbox-faults"), Some("drop=0.25"));
    assert_eq!(
        serde_json::from_value::<FaultPlan>(admin(&sandbox, "GET", "/_sandbox/faults", "").await.json()).unwrap(),
        plan("drop=0.25")
    );

    // A bad plan is refused and the old one stays.
    let bad = admin(&sandbox, "PUT", "/_sandbox/faults", "throttle=0.1,jitter=2").await;
    assert_eq!(bad.status, 400);
    let message = bad.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("`jitter`") && message.contains("exit-after-lines"),
        "{message}"
    );
    let bad_json = admin(&sandbox, "PUT", "/_sandbox/faults", r#"{"drop_share": 2}"#).await;
    assert_eq!(bad_json.status, 400);
    assert_eq!(sandbox.faults(), plan("drop=0.25"));

    assert_eq!(admin(&sandbox, "POST", "/_sandbox/faults", "").await.status, 405);
    assert_eq!(admin(&sandbox, "PUT", "/_sandbox/stats", "").await.status, 405);
    assert_eq!(admin(&sandbox, "GET", "/_sandbox/nothing", "").await.status, 404);
    assert_eq!(admin(&sandbox, "PUT", "/_sandbox/faults", "none").await.status, 200);
    assert!(sandbox.faults().is_none());

    // Stats: one task, some calls.
    create_policy(&sandbox).await;
    put_object(&sandbox, "staging", "in.ndjson", &lines(3, "a"));
    let task_id = start_task(&sandbox, "in.ndjson").await.json()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_status(&sandbox, &task_id, "Completed").await;
    let stats = admin(&sandbox, "GET", "/_sandbox/stats", "").await.json();
    assert_eq!(stats["tasks_started"], 1);
    assert_eq!(stats["calls"]["StartThingRegistrationTask"], 1);
    assert_eq!(stats["calls"]["CreatePolicy"], 1);
    assert!(stats["calls"]["DescribeThingRegistrationTask"].as_u64().unwrap() >= 1);
    assert_eq!(
        stats["faults_injected"],
        json!({"throttle": 0, "5xx": 0, "drop": 0, "drop_response": 0, "fail_after_cert": 0})
    );
    assert_eq!(stats["lines_processed"], 3);
    assert_eq!(stats["fail_after_cert_lines"], json!([]));
    assert_eq!(sandbox.stats(), stats);
    sandbox.shutdown().await.unwrap();

    // tasks_started survives a restart; the rest is per process.
    let sandbox = Sandbox::start(config).await.unwrap();
    let stats = admin(&sandbox, "GET", "/_sandbox/stats", "").await.json();
    assert_eq!(stats["tasks_started"], 1);
    assert_eq!(stats["calls"], json!({}));
    assert_eq!(stats["lines_processed"], 0);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_routed_operation_is_named() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let requests = [
        ("POST", "/thing-registration-tasks"),
        ("GET", "/thing-registration-tasks"),
        ("GET", "/thing-registration-tasks/x"),
        ("PUT", "/thing-registration-tasks/x/cancel"),
        ("GET", "/thing-registration-tasks/x/reports"),
        ("GET", "/endpoint"),
        ("GET", "/things"),
        ("POST", "/things/x"),
        ("GET", "/things/x"),
        ("PATCH", "/things/x"),
        ("PUT", "/things/x/principals"),
        ("DELETE", "/things/x/principals"),
        ("GET", "/things/x/principals"),
        ("GET", "/things/x/thing-groups"),
        ("DELETE", "/things/x"),
        ("GET", "/principals/things"),
        ("GET", "/thing-types"),
        ("POST", "/thing-types/x"),
        ("GET", "/thing-types/x"),
        ("POST", "/thing-types/x/deprecate"),
        ("GET", "/thing-groups"),
        ("PUT", "/thing-groups/addThingToThingGroup"),
        ("POST", "/thing-groups/x"),
        ("GET", "/thing-groups/x"),
        ("POST", "/billing-groups/x"),
        ("GET", "/billing-groups/x"),
        ("GET", "/policies"),
        ("POST", "/policies/x"),
        ("GET", "/policies/x"),
        ("PUT", "/target-policies/x"),
        ("POST", "/target-policies/x"),
        ("POST", "/attached-policies/x"),
        ("POST", "/policy-targets/x"),
        ("DELETE", "/policies/x"),
        ("POST", "/certificates"),
        ("GET", "/certificates"),
        ("GET", "/certificates/x"),
        ("PUT", "/certificates/x"),
        ("DELETE", "/certificates/x"),
        ("POST", "/certificate/register"),
        ("POST", "/certificate/register-no-ca"),
        ("GET", "/registrationcode"),
        ("POST", "/cacertificate"),
        ("GET", "/cacertificates"),
        ("GET", "/cacertificate/x"),
        ("PUT", "/cacertificate/x"),
        ("GET", "/certificates-by-ca/x"),
        ("POST", "/provisioning-templates"),
        ("GET", "/provisioning-templates"),
        ("GET", "/provisioning-templates/x"),
        ("PATCH", "/provisioning-templates/x"),
        ("DELETE", "/provisioning-templates/x"),
    ];
    for (method, path) in requests {
        let reply = iot(&sandbox, method, path, json!({})).await;
        assert_ne!(
            reply.header("x-amzn-errortype"),
            Some("UnknownOperationException"),
            "{method} {path}"
        );
    }
    let calls = sandbox.stats()["calls"].as_object().unwrap().clone();
    assert_eq!(calls.len(), requests.len(), "one name each: {calls:?}");
    assert!(calls.values().all(|n| *n == 1));
    assert!(!calls.contains_key("UnknownOperation"));

    let unknown = iot(&sandbox, "GET", "/nothing", json!({})).await;
    assert_eq!(unknown.header("x-amzn-errortype"), Some("UnknownOperationException"));
    assert_eq!(sandbox.stats()["calls"]["UnknownOperation"], 1);
    sandbox.shutdown().await.unwrap();
}

/// Environment variable that makes [`exit_after_lines_child`] run: the
/// state directory to use.
const EXIT_CHILD_ENV: &str = "PROVLINE_SANDBOX_EXIT_CHILD_STATE";
const EXIT_LINES: usize = 7;
const EXIT_TOTAL: usize = 20;

/// The child of [`exit_after_lines_exits_and_resumes`]: a sandbox whose task
/// is cut short by the process exit. Does nothing when run on its own.
#[tokio::test]
#[ignore = "run by exit_after_lines_exits_and_resumes in a child process"]
async fn exit_after_lines_child() {
    let Some(dir) = std::env::var_os(EXIT_CHILD_ENV) else {
        return;
    };
    let config = Config {
        state_dir: Some(dir.into()),
        lines_per_second: 0.0,
        faults: plan(&format!("exit-after-lines={EXIT_LINES}")),
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    create_policy(&sandbox).await;
    put_object(&sandbox, "staging", "in.ndjson", &lines(EXIT_TOTAL, "x"));
    let started = start_task(&sandbox, "in.ndjson").await;
    assert_eq!(started.status, 200, "{}", started.body);
    tokio::time::sleep(Duration::from_secs(30)).await;
    panic!("the sandbox did not exit");
}

#[tokio::test]
async fn exit_after_lines_exits_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["e2e_tests::exit_after_lines_child", "--exact", "--ignored", "--quiet"])
        .env(EXIT_CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::null());
    let status = tokio::task::spawn_blocking(move || child.status())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(FAULT_EXIT_CODE));

    let state = crate::state::load(&dir.path().join(crate::STATE_FILE)).unwrap();
    let task = &state.tasks[0];
    assert_eq!(task.status, crate::state::TaskStatus::InProgress);
    assert_eq!(
        task.outcomes.len(),
        EXIT_LINES,
        "exactly the lines before the exit were persisted"
    );
    assert!(task.reports.is_none());

    // Restarted without the fault, the task resumes and ends.
    let config = Config {
        state_dir: Some(dir.path().to_owned()),
        lines_per_second: 0.0,
        ..Config::default()
    };
    let sandbox = Sandbox::start(config).await.unwrap();
    let done = wait_for_status(&sandbox, &task.task_id, "Completed").await;
    assert_eq!(done["successCount"], EXIT_TOTAL);
    let stats = sandbox.stats();
    assert_eq!(stats["tasks_started"], 1);
    assert_eq!(stats["lines_processed"], EXIT_TOTAL - EXIT_LINES);
    sandbox.shutdown().await.unwrap();
}
