//! Conformance with clients we did not write: the AWS CLI against
//! `provline sandbox serve`, and our S3 calls against moto's server.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn serve(state: &Path, extra: &[&str]) -> Served {
    Served::start(state, "127.0.0.1:0", extra)
}

fn aws_cli_available() -> bool {
    Command::new("aws")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn aws(url: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new("aws")
        .args(["--endpoint-url", url, "--output", "json"])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", provline_sandbox::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", provline_sandbox::SECRET_ACCESS_KEY)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("aws runs");
    assert!(
        out.status.success(),
        "aws {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("aws {args:?} printed non-JSON ({e}): {text}"))
    }
}

/// The README's by-hand bulk registration, with the real AWS CLI.
#[test]
fn aws_cli_runs_a_whole_bulk_registration() {
    if !aws_cli_available() {
        if std::env::var_os("CI").is_some() {
            panic!("the AWS CLI is required in CI (.ci/run installs it)");
        }
        eprintln!("aws CLI not found: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(&tmp.path().join("state"), &["--lines-per-second", "50"]);
    let url = server.url.as_str();
    aws(url, &["s3api", "create-bucket", "--bucket", "cli-bucket"]);
    let mut lines = String::new();
    for i in 0..3 {
        let k = provline::keygen::generate_one(&format!("CLI-{i}"), provline::keygen::KeyType::EcP256).unwrap();
        lines.push_str(&serde_json::json!({"ThingName": format!("CLI-{i}"), "CSR": k.csr_pem}).to_string());
        lines.push('\n');
    }
    let input = write(tmp.path(), "lines.ndjson", &lines);
    aws(
        url,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "cli-bucket",
            "--key",
            "bulk/lines.ndjson",
            "--body",
            input.to_str().unwrap(),
        ],
    );
    let listed = aws(url, &["s3api", "list-objects-v2", "--bucket", "cli-bucket"]);
    assert_eq!(listed["Contents"][0]["Key"], "bulk/lines.ndjson");
    let mut tv: serde_json::Value = serde_json::from_str(&provline::template::builtin("cli-policy")).unwrap();
    for (param, default) in [("Model", "M"), ("Lot", "L"), ("MacAddress", "")] {
        tv["Parameters"][param]["Default"] = default.into();
    }
    let template = write(tmp.path(), "template.json", &tv.to_string());
    aws(
        url,
        &[
            "iot",
            "create-policy",
            "--policy-name",
            "cli-policy",
            "--policy-document",
            "{\"Version\":\"2012-10-17\",\"Statement\":[]}",
        ],
    );
    let started = aws(
        url,
        &[
            "iot",
            "start-thing-registration-task",
            "--template-body",
            &format!("file://{}", template.display()),
            "--input-file-bucket",
            "cli-bucket",
            "--input-file-key",
            "bulk/lines.ndjson",
            "--role-arn",
            "arn:aws:iam::123456789012:role/cli-role",
        ],
    );
    let task = started["taskId"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let described = loop {
        let d = aws(url, &["iot", "describe-thing-registration-task", "--task-id", &task]);
        if d["status"] == "Completed" || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(described["status"], "Completed", "{described}");
    assert_eq!(described["successCount"], 3, "{described}");
    assert_eq!(described["percentageProgress"], 100);
    let tasks = aws(url, &["iot", "list-thing-registration-tasks"]);
    assert!(tasks["taskIds"].as_array().unwrap().iter().any(|t| t == task.as_str()));
    let reports = aws(
        url,
        &[
            "iot",
            "list-thing-registration-task-reports",
            "--task-id",
            &task,
            "--report-type",
            "RESULTS",
        ],
    );
    assert_eq!(reports["reportType"], "RESULTS");
    let link = reports["resourceLinks"][0].as_str().unwrap().to_string();
    assert!(link.contains("X-Amz-Signature="), "a pre-signed link: {link}");
    // Downloaded by link, with no signing, as AWS's samples do.
    let body = reqwest::blocking_get(&link);
    assert_eq!(body.lines().count(), 3, "{body}");
    let first: serde_json::Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    let cert_arn = first["response"]["ResourceArns"]["certificate"].as_str().unwrap();
    let cert_id = cert_arn.rsplit('/').next().unwrap();
    let thing = aws(url, &["iot", "describe-thing", "--thing-name", "CLI-0"]);
    assert_eq!(thing["thingName"], "CLI-0");
    assert_eq!(thing["attributes"]["model"], "M");
    let cert = aws(url, &["iot", "describe-certificate", "--certificate-id", cert_id]);
    assert_eq!(cert["certificateDescription"]["status"], "ACTIVE");
    assert_eq!(cert["certificateDescription"]["certificateId"], cert_id);
    let principals = aws(url, &["iot", "list-thing-principals", "--thing-name", "CLI-0"]);
    assert_eq!(principals["principals"].as_array().unwrap().len(), 1);
    let endpoint = aws(url, &["iot", "describe-endpoint", "--endpoint-type", "iot:Data-ATS"]);
    assert!(endpoint["endpointAddress"].as_str().unwrap().contains("-ats.iot."));
}

mod reqwest {
    /// A plain unsigned GET, the way AWS's samples fetch report links.
    pub fn blocking_get(url: &str) -> String {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let resp = ::reqwest::get(url).await.unwrap();
            assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
            resp.text().await.unwrap()
        })
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The S3 calls the pipeline makes, against moto's server: our S3 code is
/// checked against an implementation we did not write.
#[test]
fn pipeline_s3_calls_work_against_moto() {
    let Ok(moto) = Command::new("moto_server").arg("--help").output() else {
        if std::env::var_os("CI").is_some() {
            panic!("moto_server is required in CI (.ci/run installs moto[server])");
        }
        eprintln!("moto_server not found: skipped");
        return;
    };
    assert!(moto.status.success());
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Served {
        child,
        url: String::new(),
    };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = provline::aws::Connection {
            region: Some("us-east-1".into()),
            profile: None,
            endpoint_url: Some(url.clone()),
            static_credentials: Some(("test".into(), "test".into())),
        };
        let aws = provline::aws::Aws::connect(&conn).await;
        provline::sandbox_setup::prepare_account(&aws, "moto-bucket", None)
            .await
            .unwrap();
        // Twice: the second finds the bucket and does nothing.
        provline::sandbox_setup::prepare_account(&aws, "moto-bucket", None)
            .await
            .unwrap();
        let lines = b"{\"ThingName\":\"M-1\",\"CSR\":\"x\"}\n".to_vec();
        provline::stage::upload(
            &aws,
            "moto-bucket",
            "p/b/attempt-1/registration.ndjson",
            "p/b/attempt-1/template.json",
            "{}",
            lines.clone(),
        )
        .await
        .unwrap();
        let got = aws
            .s3
            .get_object()
            .bucket("moto-bucket")
            .key("p/b/attempt-1/registration.ndjson")
            .send()
            .await
            .unwrap();
        assert_eq!(got.body.collect().await.unwrap().into_bytes().to_vec(), lines);
        let t = aws
            .s3
            .get_object()
            .bucket("moto-bucket")
            .key("p/b/attempt-1/template.json")
            .send()
            .await
            .unwrap();
        assert_eq!(t.body.collect().await.unwrap().into_bytes().as_ref(), b"{}");
    });
}

/// The same rows sent from a second output directory (another ledger) to the
/// same account: refused before anything is sent, never mixed up with the
/// first run's task.
#[test]
fn a_second_ledger_cannot_register_the_same_things_again() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(&tmp.path().join("state"), &[]);
    let input = write(tmp.path(), "twice.csv", &csv_rows("TW", 4));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let aws = provline::aws::Aws::connect(&provline::sandbox_setup::connection(&server.url)).await;
        provline::sandbox_setup::prepare_account(&aws, "twice", Some("twice-policy"))
            .await
            .unwrap();
    });
    let go = |out: &str| {
        run(provline()
            .env("AWS_ACCESS_KEY_ID", provline_sandbox::ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", provline_sandbox::SECRET_ACCESS_KEY)
            .env("AWS_REGION", "us-east-1")
            .args([
                "run",
                "--endpoint-url",
                &server.url,
                "--bucket",
                "twice",
                "--policy",
                "twice-policy",
            ])
            .args(["--role-arn", &provline::sandbox_setup::sandbox_role_arn(), "--out"])
            .arg(tmp.path().join(out))
            .arg(&input))
    };
    let first = go("out-1");
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = go("out-2");
    assert_eq!(second.code, 2, "{}", second.stderr);
    assert!(
        second
            .stderr
            .contains("thing `TW000001` already exists in the account with 1 certificate attached"),
        "{}",
        second.stderr
    );
    assert!(
        !tmp.path().join("out-2/ledger.sqlite").exists() || {
            let l = provline::ledger::Ledger::open(&tmp.path().join("out-2/ledger.sqlite")).unwrap();
            l.batches().unwrap().is_empty()
        }
    );
}

#[test]
fn missing_credentials_are_a_configuration_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "c.csv", &csv_rows("NC", 1));
    let ran = run(provline()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", tmp.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", tmp.path().join("none"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args([
            "run",
            "--endpoint-url",
            "http://127.0.0.1:9",
            "--region",
            "us-east-1",
            "--bucket",
            "b",
            "--policy",
            "p",
        ])
        .args(["--role-arn", "arn:aws:iam::123456789012:role/r", "--out"])
        .arg(tmp.path().join("out"))
        .arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("no AWS credentials found"), "{}", ran.stderr);
}
