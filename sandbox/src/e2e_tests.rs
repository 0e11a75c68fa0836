//! End-to-end tests of a running sandbox, over plain HTTP/1.1 on loopback.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{Config, Fault, LineKey, ReportFormat, Sandbox, REPORTS_BUCKET};

/// What routes a request to the IoT side (the signature is not checked).
const IOT_AUTH: &str =
    "AWS4-HMAC-SHA256 Credential=sandbox/20260101/us-east-1/iot/aws4_request, SignedHeaders=host, Signature=00";

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
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
async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
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
