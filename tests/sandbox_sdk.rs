//! The sandbox driven by the real aws-sdk-iot and aws-sdk-s3 clients, and the
//! pipeline's reconciliation against every report format the sandbox makes.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;

use crate::common::*;

async fn sandbox(config: provline_sandbox::Config) -> (provline_sandbox::Sandbox, provline::aws::Aws) {
    let sb = provline_sandbox::Sandbox::start(config).await.unwrap();
    let aws = provline::aws::Aws::connect(&provline::sandbox_setup::connection(&sb.endpoint_url())).await;
    (sb, aws)
}

fn csr_line(thing: &str) -> String {
    let k = provline::keygen::generate_one(thing, provline::keygen::KeyType::EcP256).unwrap();
    serde_json::json!({"ThingName": thing, "CSR": k.csr_pem}).to_string()
}

const TEMPLATE: &str = r#"{"Parameters": {"ThingName": {"Type": "String"}, "CSR": {"Type": "String"}},
 "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "ThingName"}}, "OverrideSettings": {"AttributePayload": "MERGE"}},
  "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateSigningRequest": {"Ref": "CSR"}, "Status": "ACTIVE"}}}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_task_through_the_sdk_one_at_a_time() {
    let (sb, aws) = sandbox(provline_sandbox::Config {
        lines_per_second: 20.0,
        ..Default::default()
    })
    .await;
    aws.s3.create_bucket().bucket("bucket-one").send().await.unwrap();
    let lines: Vec<String> = (0..30).map(|i| csr_line(&format!("SDK-{i}"))).collect();
    let mut body = lines.join("\n");
    body.push_str("\nnot json\n");
    aws.s3
        .put_object()
        .bucket("bucket-one")
        .key("in/a.ndjson")
        .body(ByteStream::from(body.into_bytes()))
        .send()
        .await
        .unwrap();
    let got = aws
        .s3
        .get_object()
        .bucket("bucket-one")
        .key("in/a.ndjson")
        .send()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&got.body.collect().await.unwrap().into_bytes()).contains("\"ThingName\":\"SDK-0\"")
    );
    let role = "arn:aws:iam::123456789012:role/provline-test";
    let id = aws
        .iot
        .start_thing_registration_task()
        .template_body(TEMPLATE)
        .input_file_bucket("bucket-one")
        .input_file_key("in/a.ndjson")
        .role_arn(role)
        .send()
        .await
        .unwrap()
        .task_id()
        .unwrap()
        .to_string();
    // One task per account: a second start is refused with a typed error.
    let second = aws
        .iot
        .start_thing_registration_task()
        .template_body(TEMPLATE)
        .input_file_bucket("bucket-one")
        .input_file_key("in/a.ndjson")
        .role_arn(role)
        .send()
        .await;
    let err = second.expect_err("a second task while one runs");
    assert!(
        err.as_service_error().is_some_and(|e| e.is_invalid_request_exception()),
        "{err:?}"
    );
    let running = provline::register::running_tasks(&aws).await.unwrap();
    assert_eq!(running, vec![id.clone()]);
    let end = provline::register::follow(
        &aws,
        &id,
        31,
        std::time::Instant::now() + std::time::Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!((end.status.as_str(), end.success, end.failure), ("Completed", 30, 1));
    let d = aws
        .iot
        .describe_thing_registration_task()
        .task_id(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(d.percentage_progress(), 100);
    assert_eq!(d.input_file_key(), Some("in/a.ndjson"));
    let dir = tempfile::tempdir().unwrap();
    provline::reports::fetch_all(&aws, &id, dir.path()).await.unwrap();
    let (results, errors) = provline::reports::read_saved(dir.path()).unwrap();
    assert_eq!(results.len(), 30);
    assert_eq!(errors.len(), 1);
    // Registry calls on what the task made.
    let thing = aws.iot.describe_thing().thing_name("SDK-7").send().await.unwrap();
    assert_eq!(thing.thing_name(), Some("SDK-7"));
    let principals = aws
        .iot
        .list_thing_principals()
        .thing_name("SDK-7")
        .send()
        .await
        .unwrap();
    assert_eq!(principals.principals().len(), 1);
    let cert_id = principals.principals()[0].rsplit('/').next().unwrap().to_string();
    let c = aws
        .iot
        .describe_certificate()
        .certificate_id(&cert_id)
        .send()
        .await
        .unwrap();
    let desc = c.certificate_description().unwrap();
    assert_eq!(desc.status().map(|s| s.as_str()), Some("ACTIVE"));
    let info = provline::crypto::parse_certificate_pem(desc.certificate_pem().unwrap()).unwrap();
    assert_eq!(info.id, cert_id, "certificate id = SHA-256 of the DER");
    let missing = aws
        .iot
        .describe_thing()
        .thing_name("nope")
        .send()
        .await
        .expect_err("no such thing");
    assert!(
        missing
            .as_service_error()
            .is_some_and(|e| e.is_resource_not_found_exception()),
        "{missing:?}"
    );
    sb.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || provline_sandbox::Config {
        state_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let (sb, aws) = sandbox(cfg()).await;
    aws.iot.create_thing().thing_name("kept").send().await.unwrap();
    let ca = sb.ca_certificate_pem();
    sb.shutdown().await.unwrap();
    let (sb, aws) = sandbox(cfg()).await;
    assert_eq!(
        aws.iot
            .describe_thing()
            .thing_name("kept")
            .send()
            .await
            .unwrap()
            .thing_name(),
        Some("kept")
    );
    assert_eq!(sb.ca_certificate_pem(), ca, "the CA is kept too");
    sb.shutdown().await.unwrap();
}

/// Gives the embedded sandbox account of `out` a thing type before a run.
fn with_thing_type(out: &Path, name: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (sb, aws) = sandbox(provline_sandbox::Config {
            state_dir: Some(out.join(".sandbox")),
            ..Default::default()
        })
        .await;
        aws.iot.create_thing_type().thing_type_name(name).send().await.unwrap();
        sb.shutdown().await.unwrap();
    });
}

/// A template whose thing type comes from a column, so chosen rows fail on their own.
fn typed_template() -> String {
    let mut t: serde_json::Value =
        serde_json::from_str(&provline::template::builtin("provline-sandbox-device")).unwrap();
    t["Parameters"]["ThingType"] = serde_json::json!({"Type": "String"});
    t["Resources"]["thing"]["Properties"]["ThingTypeName"] = serde_json::json!({"Ref": "ThingType"});
    t.to_string()
}

fn run_with_format(dir: &Path, format: &str) -> (Ran, std::path::PathBuf) {
    let t = write(dir, "typed.json", &typed_template());
    let mut csv = String::from("serial_number,model,lot,thing_type\n");
    for i in 1..=12 {
        // Rows 4 and 9 name a thing type that does not exist (pre-flight is
        // skipped so that the lines reach the task and fail there).
        let ty = if i == 4 || i == 9 { "no-such-type" } else { "sensor" };
        csv.push_str(&format!("RF{i:04},TH-100,LOT-A,{ty}\n"));
    }
    let input = write(dir, "rf.csv", &csv);
    let out = dir.join(format!("out-{}", format.replace([':', ','], "_")));
    // The account has the thing type `sensor` before the run.
    with_thing_type(&out, "sensor");
    let ran = run(provline()
        .args([
            "run",
            "--sandbox",
            "--no-preflight",
            "--sandbox-report-format",
            format,
            "--out",
        ])
        .arg(&out)
        .arg("--template")
        .arg(&t)
        .arg(&input));
    (ran, out)
}

#[test]
fn every_report_format_reconciles_device_by_device() {
    let tmp = tempfile::tempdir().unwrap();
    for format in [
        "lineNumber:1",
        "lineNumber:0",
        "offset:0",
        "offset:1",
        "absent",
        "legacy",
    ] {
        let (ran, _out) = run_with_format(tmp.path(), format);
        assert_eq!(ran.code, 1, "{format}: a partial batch exits 1: {}", ran.stderr);
        let dir = std::path::PathBuf::from(ran.stdout.trim());
        let mut r = csv::Reader::from_path(dir.join("results.csv")).unwrap();
        let rows: Vec<std::collections::BTreeMap<String, String>> = r.deserialize().map(|x| x.unwrap()).collect();
        assert_eq!(rows.len(), 12);
        for row in &rows {
            let bad = row["serial_number"] == "RF0004" || row["serial_number"] == "RF0009";
            if bad {
                assert_eq!(row["status"], "failed", "{format}: {row:?}");
                assert!(row["error"].starts_with("not-found"), "{format}: {row:?}");
                assert!(row["error"].contains("no-such-type"), "{format}: {row:?}");
            } else {
                assert_eq!(row["status"], "registered", "{format}: {row:?}");
            }
        }
        let bundles = std::fs::read_dir(dir.join("bundles"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count();
        assert_eq!(bundles, 10, "{format}");
    }
}

#[test]
fn preflight_catches_a_missing_thing_type_before_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let t = write(tmp.path(), "typed.json", &typed_template());
    let mut csv = String::from("serial_number,model,lot,thing_type\n");
    for i in 1..=500 {
        let ty = if i == 100 || i == 250 { "ghost-type" } else { "sensor" };
        csv.push_str(&format!("PF{i:04},TH-100,LOT-A,{ty}\n"));
    }
    let input = write(tmp.path(), "pf.csv", &csv);
    let out = tmp.path().join("out");
    with_thing_type(&out, "sensor");
    let ran = run(provline()
        .args(["run", "--sandbox", "--out"])
        .arg(&out)
        .arg("--template")
        .arg(&t)
        .arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("thing type `ghost-type` does not exist"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("2 lines use it") && ran.stderr.contains("pf.csv:101") && ran.stderr.contains("pf.csv:251"),
        "{}",
        ran.stderr
    );
    assert!(!ran.stderr.contains("`sensor`"), "the existing type is not reported");
    // Nothing was uploaded and no batch was recorded.
    let bucket_dir = out.join(".sandbox/s3/provline-sandbox");
    let objects = std::fs::read_dir(&bucket_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(objects, 0, "nothing may be uploaded before pre-flight passes");
    let ledger = provline::ledger::Ledger::open(&out.join("ledger.sqlite")).unwrap();
    assert!(ledger.batches().unwrap().is_empty());
}

#[test]
fn preflight_refuses_a_missing_role_and_one_that_does_not_trust_iot() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "r.csv", &crate::common::csv_rows("ROLE-", 5));
    let out = tmp.path().join("out");
    let ran = run(provline()
        .args([
            "run",
            "--sandbox",
            "--role-arn",
            "arn:aws:iam::123456789012:role/nobody",
            "--out",
        ])
        .arg(&out)
        .arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("role `nobody`") && ran.stderr.contains("does not exist"),
        "{}",
        ran.stderr
    );
    // A role that trusts Lambda, not IoT.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (sb, aws) = sandbox(provline_sandbox::Config {
            state_dir: Some(out.join(".sandbox")),
            ..Default::default()
        })
        .await;
        aws.iam
            .create_role()
            .role_name("lambda-only")
            .assume_role_policy_document(
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"lambda.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
            )
            .send()
            .await
            .unwrap();
        sb.shutdown().await.unwrap();
    });
    let ran = run(provline()
        .args([
            "run",
            "--sandbox",
            "--role-arn",
            "arn:aws:iam::123456789012:role/lambda-only",
            "--out",
        ])
        .arg(&out)
        .arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("does not trust AWS IoT"), "{}", ran.stderr);
    let ledger = provline::ledger::Ledger::open(&out.join("ledger.sqlite")).unwrap();
    assert!(ledger.batches().unwrap().is_empty(), "nothing recorded, nothing sent");
}
