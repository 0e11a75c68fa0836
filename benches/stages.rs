//! Per-stage throughput, each beside the bare primitive it wraps, measured in
//! the same run so that the ratio means something on a noisy machine.
//!
//! `cargo bench --bench stages`; criterion prints elements/s per benchmark.
//! `cargo bench --profile dev --bench stages` reuses the test build (every
//! crate at opt-level 2) instead of a 16-minute release build.

use std::collections::BTreeSet;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rayon::prelude::*;

use provline::ingest::{ingest, Device, IngestOptions};
use provline::keygen::{generate_all, KeyType};
use provline::profile::{NamePattern, Profile};

fn csv(n: usize) -> String {
    let mut s = String::from("serial_number,model,mac_address,hardware_revision,lot\n");
    for i in 0..n {
        s.push_str(&format!(
            "BN{i:08},TH-100,A4:CF:12:{:02X}:{:02X}:{:02X},r2,LOT-A\n",
            i >> 16 & 255,
            i >> 8 & 255,
            i & 255
        ));
    }
    s
}

fn devices(n: usize, dir: &std::path::Path) -> (Vec<Device>, PathBuf) {
    let p = dir.join(format!("bench-{n}.csv"));
    std::fs::write(&p, csv(n)).unwrap();
    let profile = Profile::default();
    let no_columns = BTreeSet::new();
    let pattern = NamePattern::parse("{serial_number}").unwrap();
    let attrs: BTreeSet<String> = ["model", "mac_address", "lot"].into_iter().map(String::from).collect();
    let opts = IngestOptions {
        profile: &profile,
        pattern: &pattern,
        attribute_columns: &attrs,
        skip_invalid: false,
        delimiter: None,
        template_columns: &no_columns,
        spool_dir: None,
    };
    let spool = ingest(std::slice::from_ref(&p), &opts).unwrap().devices;
    (spool.iter().map(|d| d.unwrap()).collect(), p)
}

fn bench_ingest(c: &mut Criterion) {
    for n in [100_000, 1_000_000] {
        bench_ingest_rows(c, n);
    }
}

fn bench_ingest_rows(c: &mut Criterion, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = devices(10, dir.path());
    std::fs::write(&path, csv(n)).unwrap();
    let profile = Profile::default();
    let no_columns = BTreeSet::new();
    let pattern = NamePattern::parse("{serial_number}").unwrap();
    let attrs: BTreeSet<String> = ["model", "mac_address", "lot"].into_iter().map(String::from).collect();
    let mut g = c.benchmark_group(format!("ingest-{n}"));
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    g.bench_function("primitive: csv crate read of every record", |b| {
        b.iter(|| {
            let mut r = csv::Reader::from_path(&path).unwrap();
            r.records().map(|x| x.unwrap().len()).sum::<usize>()
        })
    });
    g.bench_function("stage: ingest with every check", |b| {
        b.iter(|| {
            let opts = IngestOptions {
                profile: &profile,
                pattern: &pattern,
                attribute_columns: &attrs,
                skip_invalid: false,
                delimiter: None,
                template_columns: &no_columns,
                spool_dir: None,
            };
            ingest(std::slice::from_ref(&path), &opts).unwrap().devices.len()
        })
    });
    g.finish();
}

/// A fresh P-256 key, and certificate parameters with the bench's CN.
fn bare_key(i: usize) -> (rcgen::KeyPair, rcgen::CertificateParams) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("BN{i:08}"));
    (key, params)
}

/// The keygen primitive: rcgen key + CSR + PEMs for `n` devices in a plain rayon loop.
fn bare_keygen(n: usize) -> usize {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let (key, params) = bare_key(i);
            let csr = params.serialize_request(&key).unwrap();
            csr.pem().unwrap().len() + key.serialize_pem().len()
        })
        .sum::<usize>()
}

fn bench_keygen(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let n = 2_000;
    let (devs, _) = devices(n, dir.path());
    let mut g = c.benchmark_group("keygen-ec-p256");
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    g.bench_function("primitive: rcgen key + CSR + PEMs in a rayon loop", |b| {
        b.iter(|| bare_keygen(n))
    });
    g.bench_function("stage: generate_all", |b| {
        b.iter_batched(
            || (),
            |_| generate_all(&devs, KeyType::EcP256, None).len(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_own_ca_signing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let n = 2_000;
    let (devs, _) = devices(n, dir.path());
    let ca = provline::ca::init(
        &dir.path().join("ca"),
        &provline::ca::InitOptions {
            key_type: KeyType::EcP256,
            common_name: "bench CA".into(),
            organization: None,
            country: None,
            validity_days: 3650,
        },
    )
    .unwrap();
    let spec = provline::profile::CertificateSpec::default();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca/ca.pem.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).unwrap();
    let mut g = c.benchmark_group("own-ca-ec-p256");
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    g.bench_function("primitive: rcgen key + CA signature + PEMs in a rayon loop", |b| {
        b.iter(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let (key, params) = bare_key(i);
                    let cert = params.signed_by(&key, &issuer).unwrap();
                    cert.pem().len() + key.serialize_pem().len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("stage: generate_all with the factory CA", |b| {
        let signer = provline::keygen::Signer { ca: &ca, spec: &spec };
        b.iter_batched(
            || (),
            |_| generate_all(&devs, KeyType::EcP256, Some(&signer)).len(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Signed bundles for `n` devices: (thing, serial, key PEM, key id, certificate PEM, id).
type Material = Vec<(String, String, String, provline::crypto::KeyId, String, String)>;

fn bundle_material(n: usize, dir: &std::path::Path) -> Material {
    let (devs, _) = devices(n, dir);
    let ca = provline::ca::init(
        &dir.join("bundle-ca"),
        &provline::ca::InitOptions {
            key_type: KeyType::EcP256,
            common_name: "bench CA".into(),
            organization: None,
            country: None,
            validity_days: 3650,
        },
    )
    .unwrap();
    let spec = provline::profile::CertificateSpec::default();
    let signer = provline::keygen::Signer { ca: &ca, spec: &spec };
    devs.iter()
        .zip(generate_all(&devs, KeyType::EcP256, Some(&signer)))
        .map(|(d, k)| {
            let k = k.unwrap();
            let cert = k.certificate_pem.unwrap();
            let id = provline::crypto::parse_certificate_pem(&cert).unwrap().id;
            (
                d.thing_name.clone(),
                d.serial.clone(),
                k.key_pem.unwrap().0,
                k.key,
                cert,
                id,
            )
        })
        .collect()
}

fn input<'a>(
    m: &'a (String, String, String, provline::crypto::KeyId, String, String),
) -> provline::bundle::BundleInput<'a> {
    provline::bundle::BundleInput {
        thing_name: &m.0,
        serial: &m.1,
        certificate_pem: &m.4,
        certificate_id: &m.5,
        key_pem: Some(&m.2),
        key: &m.3,
        key_type: "ec-p256",
        endpoint: "example-ats.iot.eu-west-1.amazonaws.com",
        batch: "batch-000000000000",
        chain_pem: None,
        mode: "aws-csr",
    }
}

fn bench_bundle(c: &mut Criterion) {
    use provline::bundle::{bundle_files, sync_bundles, write_bundle, ArchiveWriter};
    let dir = tempfile::tempdir().unwrap();
    let n = 2_000;
    let material = bundle_material(n, dir.path());
    let files: Vec<Vec<provline::bundle::BundleFile>> =
        material.iter().map(|m| bundle_files(&input(m)).unwrap()).collect();
    let bytes: u64 = files.iter().flatten().map(|f| f.1.len() as u64).sum();
    let mut round = 0;
    let mut g = c.benchmark_group("bundle");
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    g.bench_function("primitive: plain writes of the same files, one syncfs", |b| {
        b.iter(|| {
            round += 1;
            let root = dir.path().join(format!("plain-{round}"));
            for (m, fs_) in material.iter().zip(&files) {
                let d = root.join(&m.0);
                std::fs::create_dir_all(&d).unwrap();
                for (name, data, _) in fs_ {
                    std::fs::write(d.join(name), data).unwrap();
                }
            }
            let f = std::fs::File::open(&root).unwrap();
            f.sync_all().unwrap();
            unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
        })
    });
    g.bench_function(
        "stage: directory per device (checked, tmp + rename, rayon), one syncfs",
        |b| {
            b.iter(|| {
                round += 1;
                let ws =
                    provline::workspace::Workspace::new(&dir.path().join(format!("dir-{round}")), "batch-000000000000");
                ws.create().unwrap();
                material.par_iter().for_each(|m| {
                    write_bundle(&ws, &input(m)).unwrap();
                });
                sync_bundles(&ws).unwrap();
            })
        },
    );
    g.bench_function("primitive: one file of the same bytes, one fsync", |b| {
        b.iter(|| {
            round += 1;
            let p = dir.path().join(format!("one-{round}.bin"));
            let mut w = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
            for fs_ in &files {
                for (_, data, _) in fs_ {
                    std::io::Write::write_all(&mut w, data).unwrap();
                }
            }
            w.into_inner().unwrap().sync_all().unwrap();
        })
    });
    g.bench_function("stage: one tar archive (checked), one fsync", |b| {
        b.iter(|| {
            round += 1;
            let ws =
                provline::workspace::Workspace::new(&dir.path().join(format!("tar-{round}")), "batch-000000000000");
            ws.create().unwrap();
            let mut a = ArchiveWriter::create(&ws).unwrap();
            let inputs: Vec<_> = material.iter().map(input).collect();
            assert!(a.append_all(&inputs).iter().all(|r| r.is_ok()));
            a.finish().unwrap();
        })
    });
    g.finish();
    eprintln!("bundle: {n} devices, {bytes} bytes of bundle files");
}

fn bench_stage(c: &mut Criterion) {
    use provline::stage::{registration_line, Credential, StoredDevice};
    let dir = tempfile::tempdir().unwrap();
    let n = 10_000;
    let (devs, _) = devices(n, dir.path());
    let keys = generate_all(&devs[..1], KeyType::EcP256, None);
    let csr = keys[0].as_ref().unwrap().csr_pem.clone();
    let body = provline::template::builtin("p");
    let t = provline::template::Template::check("built-in", &body).unwrap();
    let stored: Vec<StoredDevice> = devs
        .iter()
        .map(|d| StoredDevice {
            serial: d.serial.clone(),
            thing_name: d.thing_name.clone(),
            values: d.values.clone(),
            device_csr: None,
        })
        .collect();
    let mapping = Default::default();
    let cred = Credential {
        csr_pem: &csr,
        certificate_pem: None,
        ca_pem: None,
    };
    let bytes: usize = stored
        .iter()
        .map(|d| registration_line(&t, d, &cred, &mapping).unwrap().len() + 1)
        .sum();
    for (label, tp) in [
        ("lines", Throughput::Elements(n as u64)),
        ("bytes", Throughput::Bytes(bytes as u64)),
    ] {
        let mut g = c.benchmark_group(format!("stage-{label}"));
        g.sample_size(10).throughput(tp);
        g.bench_function("primitive: serde_json of the same fields", |b| {
            b.iter(|| {
                let mut buf = Vec::with_capacity(bytes);
                for d in &stored {
                    let mut m = serde_json::Map::new();
                    m.insert("ThingName".into(), d.thing_name.clone().into());
                    for (k, v) in &d.values {
                        m.insert(k.clone(), v.clone().into());
                    }
                    m.insert("CSR".into(), csr.clone().into());
                    serde_json::to_writer(&mut buf, &m).unwrap();
                    buf.push(b'\n');
                }
                buf.len()
            })
        });
        g.bench_function("stage: registration_line with every limit checked", |b| {
            b.iter(|| {
                let mut buf = Vec::with_capacity(bytes);
                for d in &stored {
                    buf.extend_from_slice(registration_line(&t, d, &cred, &mapping).unwrap().as_bytes());
                    buf.push(b'\n');
                }
                buf.len()
            })
        });
        g.finish();
    }
}

/// A whole batch through the built binary and the embedded sandbox (ingest,
/// keygen, stage, register, reconcile, bundle, report), beside the keygen
/// primitive for as many devices.
fn bench_end_to_end(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let n = 1_000;
    let input = dir.path().join("e2e.csv");
    std::fs::write(&input, csv(n)).unwrap();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_provline"));
    let mut g = c.benchmark_group("end-to-end");
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    g.bench_function("primitive: rcgen key + CSR + PEMs in a rayon loop", |b| {
        b.iter(|| bare_keygen(n))
    });
    if !bin.exists() {
        eprintln!(
            "end-to-end: {} is not built (cargo build first); skipped",
            bin.display()
        );
        g.finish();
        return;
    }
    let mut round = 0;
    for format in ["dir", "tar"] {
        g.bench_function(format!("stage: provline run --sandbox, {format} bundles"), |b| {
            b.iter(|| {
                round += 1;
                let out = dir.path().join(format!("out-{round}"));
                let st = std::process::Command::new(&bin)
                    .args([
                        "--log",
                        "error",
                        "run",
                        "--sandbox",
                        "--sandbox-lines-per-second",
                        "0",
                        "--bundle-format",
                        format,
                        "--out",
                    ])
                    .arg(&out)
                    .arg(&input)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(st.success());
                std::fs::remove_dir_all(&out).unwrap();
            })
        });
    }
    g.finish();
}

fn bench_reconcile(c: &mut Criterion) {
    use provline::reconcile::{reconcile, StagedDevice};
    let n = 2_000;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(vec![])
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
    let mut staged = Vec::new();
    let mut lines = Vec::new();
    for i in 0..n {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let name = format!("R{i:06}");
        let id = provline::crypto::certificate_id(cert.der());
        staged.push(StagedDevice {
            index: i,
            thing_name: name.clone(),
            key: provline::crypto::KeyId::from_spki_der(&spki).unwrap(),
        });
        lines.push(serde_json::json!({"response": {"CertificatePem": cert.pem(), "ResourceArns": {"thing": format!("arn:aws:iot:r:1:thing/{name}"), "certificate": format!("arn:aws:iot:r:1:cert/{id}")}}, "lineNumber": i + 1}).to_string());
    }
    let mut g = c.benchmark_group("reconcile");
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    g.bench_function("primitive: parse every line and certificate", |b| {
        b.iter(|| {
            lines
                .iter()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    provline::crypto::parse_certificate_pem(v["response"]["CertificatePem"].as_str().unwrap())
                        .unwrap()
                        .id
                        .len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("stage: reconcile", |b| {
        b.iter(|| {
            reconcile(&staged, Some("thing"), Some("certificate"), &lines, &[])
                .verdicts
                .len()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_ingest,
    bench_keygen,
    bench_own_ca_signing,
    bench_stage,
    bench_bundle,
    bench_reconcile,
    bench_end_to_end
);
criterion_main!(benches);
