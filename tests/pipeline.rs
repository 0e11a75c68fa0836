//! The bulk pipeline end to end, through the built binary and the embedded sandbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::PublicKeyData;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use crate::common::*;

fn pem_der(text: &str) -> Vec<u8> {
    ::pem::parse(text.as_bytes()).unwrap().into_contents()
}

/// The CA and the registry, read by opening the sandbox's state after the run.
struct Registry {
    ca_pem: String,
    tasks: usize,
    principals: BTreeMap<String, Vec<String>>,
}

fn registry(state: &Path, things: &[String]) -> Registry {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (sb, aws) = sandbox_on(state).await;
        let tasks = aws
            .iot
            .list_thing_registration_tasks()
            .send()
            .await
            .unwrap()
            .task_ids()
            .len();
        let mut principals = BTreeMap::new();
        for t in things {
            let p = aws.iot.list_thing_principals().thing_name(t).send().await.unwrap();
            principals.insert(t.clone(), p.principals().to_vec());
        }
        let ca_pem = sb.ca_certificate_pem();
        sb.shutdown().await.unwrap();
        Registry {
            ca_pem,
            tasks,
            principals,
        }
    })
}

fn batch_dir(stdout: &str) -> PathBuf {
    PathBuf::from(stdout.lines().last().expect("the batch directory is printed").trim())
}

fn results(dir: &Path) -> Vec<BTreeMap<String, String>> {
    let mut r = csv::Reader::from_path(dir.join("results.csv")).unwrap();
    r.deserialize().map(|x| x.unwrap()).collect()
}

#[test]
fn two_hundred_devices_end_to_end_with_verified_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ran = run(provline()
        .args(["run", "--sandbox", "--out"])
        .arg(&out)
        .arg(fixture("batch-200.csv")));
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    let dir = batch_dir(&ran.stdout);
    assert!(dir.starts_with(&out));

    let rows = results(&dir);
    assert_eq!(rows.len(), 200);
    assert_eq!(rows.iter().filter(|r| r["status"] == "registered").count(), 200);
    let things: Vec<String> = rows.iter().map(|r| r["thing_name"].clone()).collect();
    assert_eq!(things[0], "TH100-000001");

    let reg = registry(&out.join(".sandbox"), &things);
    assert_eq!(reg.tasks, 1, "one bulk task for one batch");
    let ca_der = pem_der(&reg.ca_pem);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();

    for row in &rows {
        let thing = &row["thing_name"];
        let b = dir.join("bundles").join(thing);
        let cert_pem = std::fs::read_to_string(b.join("certificate.pem.crt")).unwrap();
        let key_pem = std::fs::read_to_string(b.join("private.pem.key")).unwrap();
        for text in [&cert_pem, &key_pem] {
            assert!(
                !text.contains('\r') && text.ends_with('\n'),
                "{thing}: PEM must be LF-only with a final newline"
            );
        }
        let der = pem_der(&cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        cert.verify_signature(Some(ca.public_key()))
            .expect("the certificate chains to the sandbox CA");
        let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice(),
            "{thing}: certificate and key match"
        );
        let id = hex::encode(Sha256::digest(&der));
        assert_eq!(row["certificate_id"], id);
        let device: serde_json::Value = serde_json::from_slice(&std::fs::read(b.join("device.json")).unwrap()).unwrap();
        assert_eq!(device["thing_name"], thing.as_str());
        assert_eq!(device["client_id"], thing.as_str());
        assert_eq!(device["port"], 8883);
        assert_eq!(device["certificate_id"], id.as_str());
        assert_eq!(device["key_type"], "ec-p256");
        assert!(device["endpoint"].as_str().unwrap().contains("-ats.iot."));
        let ca1 = std::fs::read_to_string(b.join("AmazonRootCA1.pem")).unwrap();
        let root_der = pem_der(&ca1);
        let (_, root) = X509Certificate::from_der(&root_der).unwrap();
        assert!(root.subject().to_string().contains("Amazon Root CA 1"));
        assert!(b.join("AmazonRootCA3.pem").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(b.join("private.pem.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // Exactly one certificate on the thing, and it is this one.
        let p = &reg.principals[thing];
        assert_eq!(p.len(), 1, "{thing}: {p:?}");
        assert!(p[0].ends_with(&format!("cert/{id}")));
    }

    // Manifest: every bundle file, with the right checksum.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 200 * 5);
    for f in files {
        let bytes = std::fs::read(dir.join(f["path"].as_str().unwrap())).unwrap();
        assert_eq!(f["sha256"].as_str().unwrap(), hex::encode(Sha256::digest(&bytes)));
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        (
            report["devices"].as_u64(),
            report["registered"].as_u64(),
            report["failed"].as_u64(),
            report["bundled"].as_u64()
        ),
        (Some(200), Some(200), Some(0), Some(200))
    );
    assert_eq!(report["task_ids"].as_array().unwrap().len(), 1);
    // Every stage is timed, the report's own included, and the peak memory is stated.
    let timed: std::collections::BTreeSet<&str> = report["stage_seconds"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(timed, provline::run::STAGES.into_iter().collect());
    assert!(report["peak_rss_mib"].as_f64().unwrap() > 1.0, "{report}");
    validate_schema("manifest.schema.json", &dir.join("manifest.json"));
    validate_schema("report.schema.json", &dir.join("report.json"));
    validate_schema(
        "device.schema.json",
        &dir.join("bundles").join(&things[0]).join("device.json"),
    );

    // No device private key in the logs, S3 or the registry (the sandbox's
    // state holds its own CA key, which is not a device's).
    assert!(!ran.stderr.contains("PRIVATE KEY"));
    let needles: Vec<String> = rows
        .iter()
        .map(|r| {
            let k =
                std::fs::read_to_string(dir.join("bundles").join(&r["thing_name"]).join("private.pem.key")).unwrap();
            k.lines().nth(1).unwrap().to_string()
        })
        .collect();
    assert!(
        !grep_tree(&out.join(".sandbox"), &needles),
        "a device private key reached the sandbox's S3 or registry"
    );
    // Keys live in the batch's key store (0600, in the 0700 work directory), never in the ledger.
    for f in ["ledger.sqlite", "ledger.sqlite-wal"] {
        let bytes = std::fs::read(out.join(f)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !needles.iter().any(|n| text.contains(n.as_str())),
            "a device private key reached {f}"
        );
    }
    let key_store = std::fs::metadata(dir.join("work/keys.sqlite")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_store.permissions()) & 0o777,
        0o600
    );

    // The same check with real openssl, so we are not only checking ourselves.
    if has_openssl() {
        let ca_file = tmp.path().join("sandbox-ca.pem");
        std::fs::write(&ca_file, &reg.ca_pem).unwrap();
        for row in rows.iter().step_by(10) {
            let b = dir.join("bundles").join(&row["thing_name"]);
            let cert_pub = Command::new("openssl")
                .args(["x509", "-noout", "-pubkey", "-in"])
                .arg(b.join("certificate.pem.crt"))
                .output()
                .unwrap();
            let key_pub = Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(b.join("private.pem.key"))
                .output()
                .unwrap();
            assert!(cert_pub.status.success() && key_pub.status.success());
            assert_eq!(
                cert_pub.stdout, key_pub.stdout,
                "openssl: {} key and certificate differ",
                row["thing_name"]
            );
            let verify = Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(&ca_file)
                .arg(b.join("certificate.pem.crt"))
                .output()
                .unwrap();
            assert!(
                verify.status.success(),
                "openssl verify: {}",
                String::from_utf8_lossy(&verify.stdout)
            );
            let fp = Command::new("openssl")
                .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
                .arg(b.join("certificate.pem.crt"))
                .output()
                .unwrap();
            let fp = String::from_utf8_lossy(&fp.stdout)
                .trim()
                .rsplit('=')
                .next()
                .unwrap()
                .replace(':', "")
                .to_lowercase();
            assert_eq!(fp, row["certificate_id"]);
        }
    } else {
        eprintln!("openssl not found: skipped the openssl cross-check");
    }

    // Invariant 3: re-running the finished batch changes nothing and says so.
    let again = run(provline()
        .args(["run", "--sandbox", "--out"])
        .arg(&out)
        .arg(fixture("batch-200.csv")));
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stderr.contains("already finished"), "{}", again.stderr);
    let reg2 = registry(&out.join(".sandbox"), &things[..3]);
    assert_eq!(reg2.tasks, 1, "a re-run started no task");
}

fn grep_tree(dir: &Path, needles: &[String]) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    rd.filter_map(|e| e.ok()).any(|e| {
        let p = e.path();
        if p.is_dir() {
            grep_tree(&p, needles)
        } else {
            let text = std::fs::read(&p)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            needles.iter().any(|n| text.contains(n.as_str()))
        }
    })
}

#[test]
fn device_csrs_get_no_key_and_their_own_key_is_registered() {
    if !has_openssl() {
        eprintln!("openssl not found: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut csv = String::from("serial_number,model,csr\n");
    let mut keys = Vec::new();
    for i in 0..3 {
        let csr = openssl_csr(
            tmp.path(),
            &format!("d{i}"),
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            &format!("LINE-A-{i}"),
        );
        let csr = if i == 1 { csr.replace('\n', "\r\n") } else { csr };
        csv.push_str(&format!("DEV-{i},TH-200,{}\n", cell(&csr)));
        keys.push(tmp.path().join(format!("d{i}.key")));
    }
    let input = write(tmp.path(), "device-csr.csv", &csv);
    let out = tmp.path().join("out");
    let ran = run(provline().args(["run", "--sandbox", "--out"]).arg(&out).arg(&input));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let dir = batch_dir(&ran.stdout);
    for (i, key) in keys.iter().enumerate() {
        let b = dir.join("bundles").join(format!("DEV-{i}"));
        assert!(
            !b.join("private.pem.key").exists(),
            "no private key for a device-made CSR"
        );
        let cert_pub = Command::new("openssl")
            .args(["x509", "-noout", "-pubkey", "-in"])
            .arg(b.join("certificate.pem.crt"))
            .output()
            .unwrap();
        let key_pub = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(key)
            .output()
            .unwrap();
        assert_eq!(
            cert_pub.stdout, key_pub.stdout,
            "DEV-{i}: the device's own key is registered"
        );
        let device: serde_json::Value = serde_json::from_slice(&std::fs::read(b.join("device.json")).unwrap()).unwrap();
        assert_eq!(device["private_key_on_device"], true);
    }
    assert!(!out.join("keys").exists());

    // A later batch of the same ledger that sends DEV-1's CSR (here with LF
    // line ends) for a new serial is refused before anything is sent.
    let reused = std::fs::read_to_string(tmp.path().join("d1.csr")).unwrap();
    let fresh = openssl_csr(
        tmp.path(),
        "d9",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "LINE-B-9",
    );
    let second = write(
        tmp.path(),
        "second.csv",
        &format!(
            "serial_number,model,csr\nDEV-9,TH-200,{}\nDEV-10,TH-200,{}\n",
            cell(&fresh),
            cell(&reused)
        ),
    );
    let again = run(provline().args(["run", "--sandbox", "--out"]).arg(&out).arg(&second));
    assert_eq!(again.code, 2, "{}", again.stderr);
    // DEV-10's row starts on the line after DEV-9's multi-line CSR cell.
    let line = 3 + fresh.matches('\n').count();
    assert!(
        again.stderr.contains(&format!("second.csv:{line}"))
            && again.stderr.contains("already registered for thing `DEV-1`"),
        "{}",
        again.stderr
    );
    assert!(!again.stderr.contains("second.csv:2"), "{}", again.stderr);
}

#[test]
fn dry_run_prints_the_plan_and_sends_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ran = run(provline()
        .args(["run", "--sandbox", "--dry-run", "--out"])
        .arg(&out)
        .arg(fixture("batch-200.csv")));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let plan: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(plan["devices"], 200);
    assert_eq!(plan["keys_to_generate"], 200);
    assert_eq!(plan["sample"][0]["thing_name"], "TH100-000001");
    assert!(!out.exists(), "a dry run writes nothing");
}

#[test]
fn rsa_and_p384_keys_and_a_thing_name_pattern() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "b.csv", &csv_rows("AB", 3));
    for (kt, expect) in [("ec-p384", "1.3.132.0.34"), ("rsa-2048", "")] {
        let out = tmp.path().join(format!("out-{kt}"));
        let ran = run(provline()
            .args([
                "run",
                "--sandbox",
                "--key-type",
                kt,
                "--thing-name",
                "line-a-{serial_number|lower}",
                "--out",
            ])
            .arg(&out)
            .arg(&input));
        assert_eq!(ran.code, 0, "{kt}: {}", ran.stderr);
        let dir = batch_dir(&ran.stdout);
        let b = dir.join("bundles").join("line-a-ab000001");
        let cert =
            provline::crypto::parse_certificate_pem(&std::fs::read_to_string(b.join("certificate.pem.crt")).unwrap())
                .unwrap();
        if expect.is_empty() {
            assert_eq!(cert.key.algorithm, "1.2.840.113549.1.1.1");
        } else {
            assert_eq!(cert.key.curve.as_deref(), Some(expect));
        }
        let device: serde_json::Value = serde_json::from_slice(&std::fs::read(b.join("device.json")).unwrap()).unwrap();
        assert_eq!(device["key_type"], kt);
    }
}

#[test]
fn a_changed_row_for_a_provisioned_serial_is_a_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let first = write(tmp.path(), "a.csv", &csv_rows("CF", 2));
    let ran = run(provline().args(["run", "--sandbox", "--out"]).arg(&out).arg(&first));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let changed = write(tmp.path(), "b.csv", &csv_rows("CF", 3).replace("LOT-A", "LOT-B"));
    let ran = run(provline().args(["run", "--sandbox", "--out"]).arg(&out).arg(&changed));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("CF000001") && ran.stderr.contains("different data"),
        "{}",
        ran.stderr
    );
    assert!(ran.stderr.contains("b.csv:2"), "{}", ran.stderr);
}

#[test]
fn a_batch_larger_than_a_chunk_registers_chunk_after_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ran = run(provline()
        .args(["run", "--sandbox", "--chunk-size", "60", "--out"])
        .arg(&out)
        .arg(fixture("batch-200.csv")));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let dir = batch_dir(&ran.stdout);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let attempts = report["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4, "200 devices in chunks of 60");
    let lines: Vec<u64> = attempts.iter().map(|a| a["lines"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![60, 60, 60, 20]);
    assert_eq!(report["bundled"], 200);
    let reg = registry(
        &out.join(".sandbox"),
        &["TH100-000001".to_string(), "TH100-000200".to_string()],
    );
    assert_eq!(reg.tasks, 4);
    assert!(reg.principals.values().all(|p| p.len() == 1));
}

#[test]
fn the_archive_format_writes_one_tar_that_gnu_tar_reads_and_the_manifest_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ran = run(provline()
        .args([
            "run",
            "--sandbox",
            "--bundle-format",
            "tar",
            "--chunk-size",
            "80",
            "--out",
        ])
        .arg(&out)
        .arg(fixture("batch-200.csv")));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let dir = batch_dir(&ran.stdout);
    let archive = dir.join("bundles.tar");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
        0o600,
        "the archive holds private keys"
    );
    let device_dirs = std::fs::read_dir(dir.join("bundles"))
        .map(|d| d.filter(|e| e.as_ref().unwrap().path().is_dir()).count())
        .unwrap_or(0);
    assert_eq!(device_dirs, 0, "no per-device directories in the archive format");
    // GNU tar, not our code, reads it back.
    let x = tmp.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["archive"], "bundles.tar");
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 200 * 5, "five files per device");
    for f in files {
        let bytes = std::fs::read(x.join(f["path"].as_str().unwrap())).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), f["sha256"].as_str().unwrap());
    }
    validate_schema("manifest.schema.json", &dir.join("manifest.json"));
    // The extracted bundle is a real one: certificate and key belong together.
    let b = x.join("bundles/TH100-000123");
    let cert = std::fs::read_to_string(b.join("certificate.pem.crt")).unwrap();
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(b.join("private.pem.key")).unwrap()).unwrap();
    let info = provline::crypto::parse_certificate_pem(&cert).unwrap();
    assert_eq!(
        info.key,
        provline::crypto::KeyId::from_spki_der(&key.subject_public_key_info()).unwrap()
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["bundled"], 200);
    assert_eq!(report["attempts"].as_array().unwrap().len(), 3);
}

#[test]
fn a_crash_while_the_archive_is_written_is_finished_by_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for point in ["bundle", "bundled"] {
        let ran = run(provline()
            .env("PROVLINE_FAILPOINT", format!("{point}:1"))
            .args(["run", "--sandbox", "--bundle-format", "tar", "--out"])
            .arg(&out)
            .arg(fixture("batch-200.csv")));
        assert_ne!(ran.code, 0, "the failpoint aborts the run");
        let ran = run(provline().args(["resume", "--sandbox", "--out"]).arg(&out));
        assert_eq!(ran.code, 0, "{}", ran.stderr);
        let dir = batch_dir(&ran.stdout);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(
            manifest["files"].as_array().unwrap().len(),
            1000,
            "after a crash at {point}"
        );
        assert!(!dir.join(".bundles.tar.tmp").exists());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
