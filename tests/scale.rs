//! The scale run: `cargo test --workspace -- --ignored scale --nocapture`
//! pushes PROVLINE_SCALE_DEVICES (default 1,000,000) EC P-256 devices through
//! `provline run --sandbox` (ingest, keygen, persist, stage, register in the
//! sandbox, reconcile, one bundles.tar, report) and prints devices per second
//! per stage and the peak resident memory of the provline process.

use crate::common::{provline, run, write};

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

fn peak_rss_of_children_mib() -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

#[test]
#[ignore = "minutes long; run on purpose"]
fn scale_run() {
    let n: usize = std::env::var("PROVLINE_SCALE_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let chunk = (n / 10).clamp(1_000, 100_000).to_string();
    let keep = std::env::var_os("PROVLINE_SCALE_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let root = keep
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root).unwrap();
    let input = write(&root, "scale.csv", &rows(n));
    let out = root.join("out");
    let started = std::time::Instant::now();
    let r = run(provline()
        .args(["--log", "warn", "run", "--sandbox", "--sandbox-lines-per-second", "0"])
        .args(["--bundle-format", "tar", "--chunk-size", &chunk, "--out"])
        .arg(&out)
        .arg(&input));
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dir = std::path::PathBuf::from(r.stdout.trim());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["bundled"], n as u64);
    eprintln!(
        "scale run: {n} devices in {wall:.1} s wall, peak RSS {:.0} MiB",
        peak_rss_of_children_mib()
    );
    if let Some(stages) = report["stage_seconds"].as_object() {
        for (stage, secs) in stages {
            let s = secs.as_f64().unwrap_or(0.0);
            eprintln!("  {stage:<10} {s:>8.2} s  {:>10.0} devices/s", n as f64 / s.max(1e-9));
        }
    }
}
