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
    };
    (ingest(std::slice::from_ref(&p), &opts).unwrap().devices, p)
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
            };
            ingest(std::slice::from_ref(&path), &opts).unwrap().devices.len()
        })
    });
    g.finish();
}

fn bench_keygen(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let n = 2_000;
    let (devs, _) = devices(n, dir.path());
    let mut g = c.benchmark_group("keygen-ec-p256");
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    g.bench_function("primitive: rcgen key + CSR + PEMs in a rayon loop", |b| {
        b.iter(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                    params
                        .distinguished_name
                        .push(rcgen::DnType::CommonName, format!("BN{i:08}"));
                    let csr = params.serialize_request(&key).unwrap();
                    csr.pem().unwrap().len() + key.serialize_pem().len()
                })
                .sum::<usize>()
        })
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
                    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                    params
                        .distinguished_name
                        .push(rcgen::DnType::CommonName, format!("BN{i:08}"));
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
    bench_reconcile
);
criterion_main!(benches);
