//! The scale run: `cargo test --workspace -- --ignored scale --nocapture`
//! pushes PROVLINE_SCALE_DEVICES (default 1,000,000) EC P-256 devices through
//! `provline run` against a sandbox served in its own process (ingest,
//! keygen, persist, stage, register in the sandbox, reconcile, one
//! bundles.tar, report) and prints devices per second per stage and the peak
//! resident memory of provline, and of the sandbox beside it.

use crate::common::{provline, run, write, Served};

fn rows(n: usize) -> String {
    let mut s = String::from("serial_number,model,mac_address,lot\n");
    for i in 0..n {
        s.push_str(&format!(
            "SC{i:08},TH-100,A4:CF:12:{:02X}:{:02X}:{:02X},LOT-A\n",
            i >> 16 & 255,
            i >> 8 & 255,
            i & 255
        ));
    }
    s
}

/// A process's peak resident memory (VmHWM) in MiB, while it still runs.
fn peak_rss_of_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| k / 1024.0)
        .unwrap_or(f64::NAN)
}

#[test]
#[ignore = "minutes long; run on purpose"]
fn scale_run() {
    let n: usize = std::env::var("PROVLINE_SCALE_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let keep = std::env::var_os("PROVLINE_SCALE_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let root = keep
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root).unwrap();
    let input = write(&root, "scale.csv", &rows(n));
    let out = root.join("out");
    // The sandbox runs in its own process, so that provline's peak memory is
    // provline's alone: the sandbox keeps its whole registry in memory. It
    // persists nothing either: writing its whole state after every task
    // would make the sandbox, not provline, the subject of the run.
    let served = Served::start_in_memory("127.0.0.1:0", &["--lines-per-second", "0"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let aws = provline::aws::Aws::connect(&provline::sandbox_setup::connection(&served.url)).await;
        provline::sandbox_setup::prepare_account(&aws, "scale", Some("scale-policy"))
            .await
            .unwrap();
    });
    let started = std::time::Instant::now();
    let r = run(provline()
        .env("AWS_ACCESS_KEY_ID", provline_sandbox::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", provline_sandbox::SECRET_ACCESS_KEY)
        .env("AWS_REGION", "us-east-1")
        .args(["--log", "warn", "run", "--endpoint-url", &served.url])
        .args(["--bucket", "scale", "--policy", "scale-policy", "--role-arn"])
        .arg(provline::sandbox_setup::sandbox_role_arn())
        // Pre-flight asks the account about every thing, one call each:
        // that is the account's pace, not provline's.
        .args(["--no-preflight", "--bundle-format", "tar", "--out"])
        .arg(&out)
        .arg(&input));
    let wall = started.elapsed().as_secs_f64();
    let sandbox_rss = peak_rss_of_mib(served.child.id());
    drop(served);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dir = std::path::PathBuf::from(r.stdout.trim());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["bundled"], n as u64);
    eprintln!(
        "scale run: {n} devices in {wall:.1} s wall; peak RSS of provline {} MiB (the sandbox process: {sandbox_rss:.0} MiB)",
        report["peak_rss_mib"]
    );
    if let Some(stages) = report["stage_seconds"].as_object() {
        for (stage, secs) in stages {
            let s = secs.as_f64().unwrap_or(0.0);
            eprintln!("  {stage:<10} {s:>8.2} s  {:>10.0} devices/s", n as f64 / s.max(1e-9));
        }
    }
}
