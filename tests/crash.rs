//! Crash safety: a batch killed again and again at every stage, with the
//! sandbox restarted mid-task and faults injected, ends with every invariant
//! of design.md intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rcgen::PublicKeyData;

use crate::common::*;

const BUCKET: &str = "crash-bucket";
const POLICY: &str = "crash-device";
const ROLE: &str = "arn:aws:iam::123456789012:role/crash-registration";
/// Throttling and server errors on a share of calls, and lines that fail
/// after their certificate was made and attached.
const FAULTS: &str = "throttle=0.05,5xx=0.03,drop-response=0.01,fail-after-cert=0.02";

/// Turns the sandbox's faults off (for the final checks) and reads its stats.
fn calm(url: &str) -> serde_json::Value {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .put(format!("{url}/_sandbox/faults"))
            .body("")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        http.get(format!("{url}/_sandbox/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

/// The sandbox, always with the same seed.
struct Sandbox;

impl Sandbox {
    fn start(state: &Path, extra: &[&str]) -> Served {
        Sandbox::start_at(state, "127.0.0.1:0", extra)
    }

    fn start_at(state: &Path, addr: &str, extra: &[&str]) -> Served {
        let mut args = vec!["--seed", "7"];
        args.extend_from_slice(extra);
        Served::start(state, addr, &args)
    }
}

fn provline_against(url: &str) -> Command {
    let mut c = provline();
    c.env("AWS_ACCESS_KEY_ID", provline_sandbox::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", provline_sandbox::SECRET_ACCESS_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", url)
        .env_remove("AWS_PROFILE")
        .env_remove("PROVLINE_FAILPOINT");
    c
}

fn aws_for(url: &str) -> (tokio::runtime::Runtime, provline::aws::Aws) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let aws = rt.block_on(provline::aws::Aws::connect(&provline::sandbox_setup::connection(url)));
    (rt, aws)
}

fn prepare(url: &str) {
    let (rt, aws) = aws_for(url);
    rt.block_on(provline::sandbox_setup::prepare_account(&aws, BUCKET, Some(POLICY)))
        .unwrap();
}

struct Figures {
    devices: usize,
    things: usize,
    active_certificates: usize,
    devices_with_one_active_certificate: usize,
    orphans: usize,
    keys_registered_twice: usize,
    bundles_verified: usize,
    tasks_started: usize,
    attempts_in_report: usize,
}

/// Reads the registry and the bundles and checks every invariant.
fn check(url: &str, out: &Path, devices: usize) -> Figures {
    let (rt, aws) = aws_for(url);
    let batch = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("batch-"))
        .unwrap();
    // Keys held in bundles, by public key.
    let mut bundle_keys: HashMap<Vec<u8>, String> = HashMap::new();
    let mut bundles_verified = 0;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(batch.join("manifest.json")).unwrap()).unwrap();
    for f in manifest["files"].as_array().unwrap() {
        let bytes = std::fs::read(batch.join(f["path"].as_str().unwrap())).unwrap();
        assert_eq!(
            f["sha256"].as_str().unwrap(),
            provline::crypto::sha256_hex(&bytes),
            "{}",
            f["path"]
        );
    }
    for e in std::fs::read_dir(batch.join("bundles")).unwrap() {
        let dir = e.unwrap().path();
        if dir.file_name().unwrap().to_string_lossy().starts_with('.') {
            continue;
        }
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("private.pem.key")).unwrap()).unwrap();
        let cert =
            provline::crypto::parse_certificate_pem(&std::fs::read_to_string(dir.join("certificate.pem.crt")).unwrap())
                .unwrap();
        let held = provline::crypto::KeyId::from_spki_der(&key.subject_public_key_info()).unwrap();
        assert_eq!(held, cert.key, "{}: bundle key and certificate differ", dir.display());
        bundle_keys.insert(
            held.bits.clone(),
            dir.file_name().unwrap().to_string_lossy().into_owned(),
        );
        bundles_verified += 1;
    }
    rt.block_on(async {
        let mut things = Vec::new();
        let mut token = None;
        loop {
            let page = aws
                .iot
                .list_things()
                .max_results(250)
                .set_next_token(token)
                .send()
                .await
                .unwrap();
            things.extend(page.things().iter().filter_map(|t| t.thing_name().map(String::from)));
            token = page.next_token().map(String::from);
            if token.is_none() {
                break;
            }
        }
        let mut certs = Vec::new();
        let mut marker = None;
        loop {
            let page = aws
                .iot
                .list_certificates()
                .page_size(250)
                .set_marker(marker)
                .send()
                .await
                .unwrap();
            certs.extend(page.certificates().iter().map(|c| {
                (
                    c.certificate_id().unwrap().to_string(),
                    c.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                )
            }));
            marker = page.next_marker().map(String::from);
            if marker.is_none() {
                break;
            }
        }
        let mut per_key: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
        let mut active = 0;
        let mut orphans = 0;
        for (id, status) in &certs {
            let d = aws.iot.describe_certificate().certificate_id(id).send().await.unwrap();
            let info = provline::crypto::parse_certificate_pem(
                d.certificate_description().unwrap().certificate_pem().unwrap(),
            )
            .unwrap();
            *per_key.entry(info.key.bits.clone()).or_default() += 1;
            if status == "ACTIVE" {
                active += 1;
                if !bundle_keys.contains_key(&info.key.bits) {
                    orphans += 1;
                }
            }
        }
        let mut one_active = 0;
        for t in &things {
            let p = aws.iot.list_thing_principals().thing_name(t).send().await.unwrap();
            let mut n = 0;
            for arn in p.principals() {
                let id = arn.rsplit('/').next().unwrap();
                let d = aws.iot.describe_certificate().certificate_id(id).send().await.unwrap();
                if d.certificate_description().unwrap().status().map(|s| s.as_str()) == Some("ACTIVE") {
                    n += 1;
                }
            }
            if n == 1 {
                one_active += 1;
            }
        }
        let tasks = aws
            .iot
            .list_thing_registration_tasks()
            .max_results(250)
            .send()
            .await
            .unwrap()
            .task_ids()
            .len();
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(batch.join("report.json")).unwrap()).unwrap();
        Figures {
            devices,
            things: things.len(),
            active_certificates: active,
            devices_with_one_active_certificate: one_active,
            orphans,
            keys_registered_twice: per_key.values().filter(|n| **n > 1).count(),
            bundles_verified,
            tasks_started: tasks,
            attempts_in_report: report["attempts"].as_array().unwrap().len(),
        }
    })
}

fn crash_run(devices: usize, kills: usize, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("sandbox");
    let out = tmp.path().join("out");
    let input = write(tmp.path(), "crash.csv", &csv_rows("CR", devices));
    let speed = ["--lines-per-second", "200", "--faults", FAULTS];
    let mut sandbox = Sandbox::start(&state, &speed);
    let port = sandbox.url.rsplit(':').next().unwrap().to_string();
    let addr = format!("127.0.0.1:{port}");
    prepare(&sandbox.url);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Many small chunks, so that every stage comes round many times.
    let chunk = (devices / 40).max(1);
    let command = |first: bool| {
        let mut c = provline_against(&sandbox_url(&addr));
        if first {
            // Pre-flight is tested elsewhere; here it would only multiply the faults.
            c.args([
                "run",
                "--no-preflight",
                "--bucket",
                BUCKET,
                "--policy",
                POLICY,
                "--role-arn",
                ROLE,
                "--chunk-size",
            ])
            .arg(chunk.to_string())
            .arg("--out")
            .arg(&out)
            .arg(&input);
        } else {
            c.args(["resume", "--out"]).arg(&out);
        }
        c
    };
    // Points that come round once per attempt; keygen and persist come once
    // per batch and report once at its end, so they are hit on purpose.
    let per_attempt: Vec<&str> = provline::failpoint::POINTS
        .iter()
        .copied()
        .filter(|p| !["keygen", "persist", "report"].contains(p))
        .collect();
    let offset = rng.random_range(0..per_attempt.len());
    let mut hits: BTreeMap<String, usize> = BTreeMap::new();
    let mut random_kills = 0;
    let mut runs = 0;
    let mut restarted = false;
    let total = |h: &BTreeMap<String, usize>, r: usize| h.values().sum::<usize>() + r;
    while total(&hits, random_kills) < kills {
        runs += 1;
        assert!(runs < kills * 4, "the batch ended before {kills} kills");
        // `run` until the ledger holds the batch, `resume` after.
        let first = !recorded(&out);
        if !restarted && total(&hits, random_kills) >= kills / 2 {
            // The AWS side goes away in the middle of a task and comes back with its state.
            restarted = true;
            // It stops itself once that attempt is reconciled, so the batch goes on.
            let mut child = command(false)
                .env("PROVLINE_FAILPOINT", "reconciled:1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(150));
            drop(sandbox);
            std::thread::sleep(Duration::from_millis(300));
            sandbox = Sandbox::start_at(&state, &addr, &speed);
            child.wait().unwrap();
            continue;
        }
        if runs % 4 == 0 {
            // A SIGKILL at a random moment.
            let mut child = command(first)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(rng.random_range(20..600)));
            let finished = child.try_wait().unwrap().is_some();
            let _ = child.kill();
            let status = child.wait().unwrap();
            if !finished && status.code().is_none() {
                random_kills += 1;
            }
            continue;
        }
        let point = match (hits.contains_key("keygen"), hits.contains_key("persist")) {
            (false, _) => "keygen",
            (true, false) => "persist",
            _ => per_attempt[(runs + offset) % per_attempt.len()],
        };
        let nth = match point {
            "bundle" => rng.random_range(1..(chunk as u64).max(2)),
            "polling" => rng.random_range(1..3),
            _ => 1,
        };
        let mut cmd = command(first);
        cmd.env("PROVLINE_FAILPOINT", format!("{point}:{nth}"));
        let ran = run(&mut cmd);
        match ran.code {
            -1 => *hits.entry(point.to_string()).or_default() += 1,
            0 => panic!(
                "the batch finished after {} kills; failpoint {point} never came",
                total(&hits, random_kills)
            ),
            3 => {}
            other => panic!("unexpected exit {other}: {}", ran.stderr),
        }
    }
    // One last crash just before the reports, then resume until the batch ends.
    loop {
        let mut cmd = command(false);
        cmd.env("PROVLINE_FAILPOINT", "report");
        match run(&mut cmd).code {
            -1 => {
                *hits.entry("report".into()).or_default() += 1;
                break;
            }
            3 => continue, // an injected fault stopped it first
            other => panic!("the batch ended (exit {other}) without reaching the report failpoint"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ran = run(&mut command(false));
        if ran.code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "resume did not finish: {}", ran.stderr);
        assert_eq!(ran.code, 3, "resume: {}", ran.stderr);
    }
    let stats = calm(&sandbox.url);
    let f = check(&sandbox.url, &out, devices);
    eprintln!(
        "crash test: {} devices in chunks of {chunk}; {} aborts at failpoints {:?}; {random_kills} random SIGKILLs; 1 sandbox restart mid-task; faults injected in the last sandbox process {}\n  things {}, active certificates {}, devices with exactly one active certificate {}, orphans {}, keys registered twice {}, bundles verified {}, tasks started {}, attempts in report.json {}",
        f.devices, hits.values().sum::<usize>(), hits, stats["faults_injected"], f.things, f.active_certificates,
        f.devices_with_one_active_certificate, f.orphans, f.keys_registered_twice, f.bundles_verified, f.tasks_started, f.attempts_in_report
    );
    assert!(total(&hits, random_kills) >= kills);
    for p in provline::failpoint::POINTS {
        assert!(hits.contains_key(p), "failpoint {p} was never hit: {hits:?}");
    }
    assert_eq!(f.things, devices);
    assert_eq!(
        f.devices_with_one_active_certificate, devices,
        "every device has exactly one active certificate"
    );
    assert_eq!(f.active_certificates, devices);
    assert_eq!(f.orphans, 0, "every active certificate has its key in a bundle");
    assert_eq!(f.keys_registered_twice, 0, "no CSR registered twice");
    assert_eq!(f.bundles_verified, devices);
    assert_eq!(
        f.tasks_started, f.attempts_in_report,
        "every task started is an attempt report.json accounts for"
    );
}

fn recorded(out: &Path) -> bool {
    let ledger = out.join("ledger.sqlite");
    ledger.exists()
        && !provline::ledger::Ledger::open(&ledger)
            .unwrap()
            .batches()
            .unwrap()
            .is_empty()
}

fn sandbox_url(addr: &str) -> String {
    format!("http://{addr}")
}

#[test]
fn a_batch_survives_thirty_kills_at_every_stage() {
    crash_run(1000, 30, 20261203);
}

#[test]
#[ignore = "long: 120 kills on 4,000 devices"]
fn a_batch_survives_many_more_kills() {
    crash_run(4000, 120, 7);
}
