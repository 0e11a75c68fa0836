//! The own-CA modes end to end through the sandbox: byoca (one bulk task,
//! nothing signed by AWS), jitp (first connect provisions, second is
//! accepted) and jitr (first connect leaves the certificate pending, approve
//! activates exactly the batch). Certificates are checked with openssl.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{csv_rows, has_openssl, mosquitto_pub, provline, run, sandbox_on, write, Ran};

/// One connection with mosquitto_pub must get CONNACK 0 and a PUBACK.
fn mosquitto_connects(out: &Path, bundle: &Path) {
    if let Some(o) = mosquitto_pub(&out.join(".sandbox"), bundle) {
        assert!(o.contains("received CONNACK (0)"), "{o}");
        assert!(o.contains("received PUBACK"), "{o}");
    }
}

const DEVICES: usize = 100;

fn ca_init(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    let r = run(provline().args(["ca", "init", "--dir"]).arg(&ca).args([
        "--common-name",
        "Line 3 CA",
        "--organization",
        "Acme",
        "--country",
        "DE",
    ]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    ca
}

fn ca_register(ca: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let r = run(provline()
        .args(["ca", "register", "--sandbox", "--dir"])
        .arg(ca)
        .arg("--out")
        .arg(out)
        .args(extra));
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

fn run_mode(dir: &Path, out: &Path, ca: &Path, mode: &str, extra: &[&str]) -> (Ran, PathBuf) {
    let csv = write(
        dir,
        "batch.csv",
        &csv_rows(&format!("{}-", mode.to_uppercase()), DEVICES),
    );
    let r = run(provline()
        .args(["run", "--sandbox", "--mode", mode, "--ca"])
        .arg(ca)
        .arg("--out")
        .arg(out)
        .arg(&csv)
        .args(extra));
    let batch_dir = PathBuf::from(r.stdout.trim());
    (r, batch_dir)
}

fn bundles(batch_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(batch_dir.join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v
}

/// `openssl verify` of every bundle's device certificate against the CA.
fn openssl_verify_all(ca: &Path, batch_dir: &Path) {
    if !has_openssl() {
        assert!(std::env::var_os("CI").is_none(), "openssl is required in CI");
        return;
    }
    for b in bundles(batch_dir) {
        let cert = b.join("certificate.pem.crt");
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
            .arg(ca.join("ca.pem.crt"))
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK"),
            "{}: {}{}",
            cert.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn report(batch_dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(batch_dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn byoca_registers_a_hundred_own_certificates_in_one_bulk_task() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ca = ca_init(dir.path());
    let state = ca_register(&ca, &out, &[]);
    assert_eq!(state["status"], "ACTIVE");
    assert_eq!(state["auto_registration"], "DISABLE");
    let (r, batch_dir) = run_mode(dir.path(), &out, &ca, "byoca", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report(&batch_dir);
    assert_eq!(rep["task_ids"].as_array().unwrap().len(), 1, "{rep}");
    assert_eq!(rep["devices"], DEVICES as u64);
    assert_eq!(rep["bundled"], DEVICES as u64);
    let b = bundles(&batch_dir);
    assert_eq!(b.len(), DEVICES);
    // The registered certificate is the one provline signed: issuer is the
    // factory CA, and it is a single certificate (byoca needs no chain).
    let pem = std::fs::read_to_string(b[0].join("certificate.pem.crt")).unwrap();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1);
    let info = provline::crypto::parse_certificate_pem(&pem).unwrap();
    assert_eq!(info.issuer, "C=DE, O=Acme, CN=Line 3 CA");
    assert!(info.subject.starts_with("CN=BYOCA-000001"), "{}", info.subject);
    openssl_verify_all(&ca, &batch_dir);
    // AWS holds them under the CA: ListCertificatesByCA sees all of them active.
    let status = run(provline()
        .args(["ca", "status", "--sandbox", "--dir"])
        .arg(&ca)
        .arg("--out")
        .arg(&out));
    assert_eq!(status.code, 0, "{}", status.stderr);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["certificates"]["ACTIVE"], DEVICES as u64, "{s}");
    mosquitto_connects(&out, &b[0]);
}

#[test]
fn own_ca_modes_refuse_an_unregistered_ca_before_signing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ca = ca_init(dir.path());
    let (r, _) = run_mode(dir.path(), &out, &ca, "jitr", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is not registered in this account"), "{}", r.stderr);
    assert!(r.stderr.contains("provline ca register"), "{}", r.stderr);
    assert!(!out.join("ledger.sqlite").exists() || !r.stdout.contains("bundles"));
    // A registered CA without auto-registration is not a JITR CA.
    ca_register(&ca, &out, &[]);
    let (r, _) = run_mode(dir.path(), &out, &ca, "jitr", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("auto-registration off"), "{}", r.stderr);
    // Mode without CA, CA without mode.
    let csv = write(dir.path(), "b.csv", &csv_rows("X-", 2));
    let r = run(provline()
        .args(["run", "--sandbox", "--mode", "byoca"])
        .arg(&csv)
        .arg("--out")
        .arg(&out));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("give --ca DIR"), "{}", r.stderr);
}

fn jitp_template(dir: &Path, with_country: bool) -> PathBuf {
    let mut params = serde_json::json!({
        "AWS::IoT::Certificate::CommonName": {"Type": "String"},
        "AWS::IoT::Certificate::SerialNumber": {"Type": "String"},
        "AWS::IoT::Certificate::Id": {"Type": "String"}
    });
    if with_country {
        params["AWS::IoT::Certificate::Country"] = serde_json::json!({"Type": "String"});
    }
    let mut attrs = serde_json::json!({"serial": {"Ref": "AWS::IoT::Certificate::SerialNumber"}});
    if with_country {
        attrs["country"] = serde_json::json!({"Ref": "AWS::IoT::Certificate::Country"});
    }
    let t = serde_json::json!({
        "Parameters": params,
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
                "AttributePayload": attrs},
                "OverrideSettings": {"AttributePayload": "MERGE"}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "provline-sandbox-device"}}
        }
    });
    write(
        dir,
        if with_country { "jitp-c.json" } else { "jitp.json" },
        &t.to_string(),
    )
}

fn verify(out: &Path, batch: &str) -> (Ran, serde_json::Value) {
    let r = run(provline().args(["verify", "--sandbox", batch, "--out"]).arg(out));
    let doc = std::fs::read_to_string(out.join(batch).join("verify.json"))
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (r, doc)
}

fn batch_name(batch_dir: &Path) -> String {
    batch_dir.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn jitp_bundles_provision_themselves_at_first_connect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ca = ca_init(dir.path());
    // A template reading Country from a subject without C= would never activate:
    // refused before anything is shipped.
    let with_c = jitp_template(dir.path(), true);
    ca_register(&ca, &out, &["--jitp-template", with_c.to_str().unwrap()]);
    let (r, batch_dir) = run_mode(dir.path(), &out, &ca, "jitp", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("AWS::IoT::Certificate::Country"), "{}", r.stderr);
    assert!(r.stderr.contains("add C to [certificate.subject]"), "{}", r.stderr);
    assert!(r.stderr.contains("batch.csv:2"), "names the row: {}", r.stderr);
    assert!(!batch_dir.join("bundles").join("JITP-000001").exists());
    let ledger = provline::ledger::Ledger::open(&out.join("ledger.sqlite")).unwrap();
    assert!(ledger.batches().unwrap().is_empty(), "a refused batch is not recorded");
    drop(ledger);

    // The same CA with a template that reads only what the subject has.
    let t = jitp_template(dir.path(), false);
    let state = ca_register(&ca, &out, &["--jitp-template", t.to_str().unwrap()]);
    assert_eq!(state["auto_registration"], "ENABLE");
    // The refusal recorded nothing, so this run starts the batch afresh.
    let out2 = out.clone();
    let (r, batch_dir) = run_mode(dir.path(), &out2, &ca, "jitp", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report(&batch_dir);
    assert_eq!(
        rep["task_ids"].as_array().unwrap().len(),
        0,
        "JITP registers nothing up front"
    );
    let b = bundles(&batch_dir);
    assert_eq!(b.len(), DEVICES);
    let pem = std::fs::read_to_string(b[0].join("certificate.pem.crt")).unwrap();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "leaf, then the CA");
    openssl_verify_all(&ca, &batch_dir);

    let (r, doc) = verify(&out2, &batch_name(&batch_dir));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(doc["connected"], DEVICES as u64, "{}", r.stderr);
    for d in doc["devices"].as_array().unwrap() {
        let a = d["attempts"].as_array().unwrap();
        assert_eq!(a.len(), 2, "{d}");
        assert_eq!(a[0]["result"], "dropped", "first connect provisions and drops: {d}");
        assert_eq!(a[1]["result"], "connected", "{d}");
    }
    let status = run(provline()
        .args(["ca", "status", "--sandbox", "--dir"])
        .arg(&ca)
        .arg("--out")
        .arg(&out2));
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["certificates"]["ACTIVE"], DEVICES as u64, "{s}");
    // Each thing exists with the attribute the template took from the subject.
    let things = crate::own_ca::describe_thing(&out2, "JITP-000042");
    assert_eq!(things["attributes"]["serial"], "JITP-000042", "{things}");
    mosquitto_connects(&out2, &b[41]);
}

#[test]
fn jitr_devices_wait_for_approve_which_activates_exactly_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ca = ca_init(dir.path());
    ca_register(&ca, &out, &["--jitr"]);
    let (r, batch_dir) = run_mode(dir.path(), &out, &ca, "jitr", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    openssl_verify_all(&ca, &batch_dir);
    let batch = batch_name(&batch_dir);

    // First connect: dropped, and pending from then on.
    let (r, doc) = verify(&out, &batch);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(doc["connected"], 0);
    // A stranger signed by the same CA connects too.
    let stranger = dir.path().join("stranger");
    make_stranger_bundle(&ca, &b0(&batch_dir), &stranger);
    let (r, _) = verify_dir(&out, &stranger);
    assert!(r.contains("dropped"), "{r}");
    let s = ca_status(&ca, &out);
    assert_eq!(s["certificates"]["PENDING_ACTIVATION"], DEVICES as u64 + 1, "{s}");

    // Without --yes and without a terminal, nothing happens.
    let r = run(provline()
        .args(["approve", &batch, "--sandbox", "--out"])
        .arg(&out)
        .stdin(std::process::Stdio::null()));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("pass --yes"), "{}", r.stderr);
    assert!(r.stderr.contains("WARNING: 1 pending certificate"), "{}", r.stderr);

    let r = run(provline()
        .args(["approve", &batch, "--sandbox", "--yes", "--out"])
        .arg(&out));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["activated"].as_array().unwrap().len(), DEVICES);
    assert_eq!(doc["strangers"].as_array().unwrap().len(), 1);
    let s = ca_status(&ca, &out);
    assert_eq!(s["certificates"]["ACTIVE"], DEVICES as u64, "{s}");
    assert_eq!(
        s["certificates"]["PENDING_ACTIVATION"], 1,
        "the stranger stays pending: {s}"
    );
    let t = describe_thing(&out, "JITR-000007");
    assert_eq!(t["attributes"]["model"], "TH-100", "{t}");

    let (r, doc) = verify(&out, &batch);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(doc["connected"], DEVICES as u64);
    // A second approve finds nothing left to do; it is given the batch
    // directory that `run` printed, without --out.
    let r = run(provline().arg("approve").arg(&batch_dir).args(["--sandbox", "--yes"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("0 pending certificates of this batch"),
        "{}",
        r.stderr
    );
    mosquitto_connects(&out, &b0(&batch_dir));
}

fn b0(batch_dir: &Path) -> PathBuf {
    bundles(batch_dir).remove(0)
}

fn ca_status(ca: &Path, out: &Path) -> serde_json::Value {
    let status = run(provline()
        .args(["ca", "status", "--sandbox", "--dir"])
        .arg(ca)
        .arg("--out")
        .arg(out));
    assert_eq!(status.code, 0, "{}", status.stderr);
    serde_json::from_str(&status.stdout).unwrap()
}

/// A bundle for a device that is in no batch, signed by the same CA.
fn make_stranger_bundle(ca_dir: &Path, like: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    let ca = provline::ca::load(ca_dir).unwrap();
    let key = provline::keygen::KeyType::EcP256.generate().unwrap();
    let cert = ca
        .sign_device(&key, &[(rcgen::DnType::CommonName, "STRANGER-1".to_string())], 30)
        .unwrap();
    std::fs::write(dest.join("certificate.pem.crt"), cert + &ca.cert_pem).unwrap();
    std::fs::write(dest.join("private.pem.key"), key.serialize_pem()).unwrap();
    for f in ["AmazonRootCA1.pem", "AmazonRootCA3.pem"] {
        std::fs::copy(like.join(f), dest.join(f)).unwrap();
    }
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(like.join("device.json")).unwrap()).unwrap();
    d["thing_name"] = "STRANGER-1".into();
    d["client_id"] = "STRANGER-1".into();
    std::fs::write(dest.join("device.json"), d.to_string()).unwrap();
}

/// Connects one bundle directory through the embedded sandbox of `out`.
fn verify_dir(out: &Path, bundle: &Path) -> (String, ()) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (sb, _) = sandbox_on(&out.join(".sandbox")).await;
        let opts = provline::verify::Options {
            address: Some(sb.device_endpoint().to_string()),
            server_name: Some(sb.device_server_name()),
            server_roots_pem: Some(sb.ca_certificate_pem()),
            attempts: 1,
            timeout: std::time::Duration::from_secs(10),
        };
        let r = provline::verify::verify_bundle(bundle, &opts).await;
        sb.shutdown().await.unwrap();
        (serde_json::to_string(&r).unwrap(), ())
    })
}

pub fn describe_thing(out: &Path, thing: &str) -> serde_json::Value {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (sb, aws) = sandbox_on(&out.join(".sandbox")).await;
        let t = aws.iot.describe_thing().thing_name(thing).send().await.unwrap();
        let attrs: serde_json::Map<String, serde_json::Value> = t
            .attributes()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect())
            .unwrap_or_default();
        sb.shutdown().await.unwrap();
        serde_json::json!({"thing_name": t.thing_name(), "attributes": attrs})
    })
}

#[test]
fn an_sni_only_ca_with_a_named_jitp_template_provisions_too() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ca = ca_init(dir.path());
    let body = std::fs::read_to_string(jitp_template(dir.path(), false)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (sb, aws) = sandbox_on(&out.join(".sandbox")).await;
        provline::sandbox_setup::prepare_account(&aws, "provline-sandbox", Some("provline-sandbox-device"))
            .await
            .unwrap();
        aws.iot
            .create_provisioning_template()
            .template_name("line3-jitp")
            .template_body(body)
            .enabled(true)
            .provisioning_role_arn(provline::sandbox_setup::sandbox_role_arn())
            .r#type(aws_sdk_iot::types::TemplateType::Jitp)
            .send()
            .await
            .unwrap();
        sb.shutdown().await.unwrap();
    });
    let state = ca_register(&ca, &out, &["--sni-only", "--jitp-template-name", "line3-jitp"]);
    assert_eq!(state["certificate_mode"], "SNI_ONLY", "{state}");
    assert_eq!(state["template_name"], "line3-jitp");
    assert!(state["template_body"]
        .as_str()
        .unwrap()
        .contains("AWS::IoT::Certificate::Id"));
    let csv = write(dir.path(), "few.csv", &csv_rows("SNI-", 3));
    let r = run(provline()
        .args(["run", "--sandbox", "--mode", "jitp", "--ca"])
        .arg(&ca)
        .arg("--out")
        .arg(&out)
        .arg(&csv));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let batch_dir = PathBuf::from(r.stdout.trim());
    let (r, doc) = verify(&out, &batch_name(&batch_dir));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(doc["connected"], 3);
}
