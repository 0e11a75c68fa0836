//! End-to-end tests of the device endpoint: devices with certificates of
//! their maker's CA connect over TLS (tokio-rustls) and speak MQTT, the CA
//! is registered through aws-sdk-iot.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_iot::types::{
    AutoRegistrationStatus, CaCertificateStatus, CertificateMode, CertificateStatus, RegistrationConfig, TemplateType,
};
use rcgen::{DnType, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::device::mqtt::{self, client};
use crate::sdk_tests::{cert_id, iot_client, register_ca, TestCa, JITP_TEMPLATE, ROLE_ARN};
use crate::{Config, Sandbox};

/// What a device saw after sending CONNECT.
#[derive(Debug, PartialEq)]
enum Seen {
    /// These bytes came back (a CONNACK, then whatever was asked for).
    Answer(Vec<u8>),
    /// The connection was closed without an answer.
    Dropped,
}

fn der_of(pem_text: &str) -> CertificateDer<'static> {
    CertificateDer::from(pem::parse(pem_text).unwrap().into_contents())
}

/// Always presents one certificate chain.
#[derive(Debug)]
struct Identity(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS client trusting the sandbox CA only, presenting `chain` (PEMs,
/// leaf first) with `key`, or no certificate.
fn tls_client(sandbox: &Sandbox, identity: Option<(&[&str], &KeyPair)>) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der_of(&sandbox.ca_certificate_pem())).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((chain, key)) => {
            let chain = chain.iter().map(|pem| der_of(pem)).collect();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let key = provider.key_provider.load_private_key(key).unwrap();
            // Not with_client_auth_cert: its consistency check goes through
            // webpki, which refuses X.509 v1 certificates.
            let identity = Arc::new(rustls::sign::CertifiedKey::new(chain, key));
            builder.with_client_cert_resolver(Arc::new(Identity(identity)))
        }
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects as a device, sends `packets` (CONNECT first) and reads for a
/// while: what came back, or that the connection was dropped.
async fn device_session(
    sandbox: &Sandbox,
    server_name: &str,
    identity: Option<(&[&str], &KeyPair)>,
    packets: &[Vec<u8>],
    expected_len: usize,
) -> Seen {
    let tcp = tokio::net::TcpStream::connect(sandbox.device_endpoint()).await.unwrap();
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let Ok(mut tls) = tls_client(sandbox, identity).connect(name, tcp).await else {
        return Seen::Dropped;
    };
    for packet in packets {
        if tls.write_all(packet).await.is_err() || tls.flush().await.is_err() {
            return Seen::Dropped;
        }
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while answer.len() < expected_len {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer and no close within 5 s; got {answer:?}"),
        }
    }
    if answer.is_empty() {
        Seen::Dropped
    } else {
        Seen::Answer(answer)
    }
}

/// Connects with MQTT 3.1.1 and answers what came back for CONNECT.
async fn connect(sandbox: &Sandbox, cert_pem: &str, key: &KeyPair) -> Seen {
    let server_name = sandbox.device_server_name();
    let packets = [client::connect(mqtt::LEVEL_3_1_1, "dev", 30)];
    device_session(sandbox, &server_name, Some((&[cert_pem], key)), &packets, 4).await
}

const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

fn device_stats(sandbox: &Sandbox) -> Value {
    sandbox.stats()["device"].clone()
}

/// Waits for the device stats to satisfy `check` (the server counts a
/// refusal just after closing).
async fn stats_eventually(sandbox: &Sandbox, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let stats = device_stats(sandbox);
        if check(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("device stats never matched: {}", device_stats(sandbox));
}

async fn certificate_status(iot: &aws_sdk_iot::Client, id: &str) -> CertificateStatus {
    let described = iot.describe_certificate().certificate_id(id).send().await.unwrap();
    described.certificate_description().unwrap().status().unwrap().clone()
}

#[tokio::test]
async fn jitp_provisions_on_the_first_connect() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    let ca = TestCa::new("maker CA");
    let config = RegistrationConfig::builder()
        .template_body(JITP_TEMPLATE)
        .role_arn(ROLE_ARN)
        .build();
    let ca_id = register_ca(&iot, &ca, Some(config)).await;
    let (cert, key) = ca.sign(&[
        (DnType::CountryName, "DE"),
        (DnType::CommonName, "dev-jitp-1"),
        (DnType::CustomDnType(vec![2, 5, 4, 5]), "SN-0001"),
    ]);
    let id = cert_id(&cert);

    // The first connect provisions the device and is dropped.
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    let thing = iot.describe_thing().thing_name("dev-jitp-1").send().await.unwrap();
    let attributes = thing.attributes().unwrap();
    assert_eq!(attributes.get("country").map(String::as_str), Some("DE"));
    assert_eq!(attributes.get("serial").map(String::as_str), Some("SN-0001"));
    let described = iot.describe_certificate().certificate_id(&id).send().await.unwrap();
    let description = described.certificate_description().unwrap();
    assert_eq!(description.status(), Some(&CertificateStatus::Active));
    assert_eq!(description.ca_certificate_id(), Some(ca_id.as_str()));
    let arn = description.certificate_arn().unwrap().to_owned();
    let principals = iot
        .list_thing_principals()
        .thing_name("dev-jitp-1")
        .send()
        .await
        .unwrap();
    assert_eq!(principals.principals(), std::slice::from_ref(&arn));
    let policies = iot.list_attached_policies().target(&arn).send().await.unwrap();
    assert_eq!(policies.policies().len(), 1);
    let stats = stats_eventually(&sandbox, |s| {
        s["jitp_provisioned"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    assert_eq!(stats["jitp_provisioned"][0]["certificate_id"], id.as_str());
    assert_eq!(stats["jitp_provisioned"][0]["thing_name"], "dev-jitp-1");
    assert_eq!(stats["connections_refused"]["jitp_provisioned"], 1);

    // The second connect gets CONNACK; MQTT 3.1.1 and 5 both work.
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Answer(CONNACK.to_vec()));
    let server_name = sandbox.device_server_name();
    let packets = [
        client::connect(mqtt::LEVEL_5, "dev-jitp-1", 30),
        client::publish(true, 1, 7, "dt/dev-jitp-1", b"{}"),
        client::PINGREQ.to_vec(),
    ];
    let seen = device_session(&sandbox, &server_name, Some((&[&cert], &key)), &packets, 11).await;
    assert_eq!(
        seen,
        Seen::Answer(vec![0x20, 0x03, 0x00, 0x00, 0x00, 0x40, 0x02, 0x00, 0x07, 0xd0, 0x00])
    );
    let stats = device_stats(&sandbox);
    assert_eq!(stats["connections_accepted"][id.as_str()], 2);
    assert_eq!(stats["messages_published"][id.as_str()], 1);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn jitp_with_a_named_template_on_an_sni_only_ca() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    iot.create_provisioning_template()
        .template_name("jitp")
        .template_body(JITP_TEMPLATE)
        .provisioning_role_arn(ROLE_ARN)
        .r#type(TemplateType::Jitp)
        .send()
        .await
        .unwrap();
    let ca = TestCa::new("SNI CA");
    iot.register_ca_certificate()
        .ca_certificate(&ca.pem)
        .certificate_mode(CertificateMode::SniOnly)
        .set_as_active(true)
        .allow_auto_registration(true)
        .registration_config(RegistrationConfig::builder().template_name("jitp").build())
        .send()
        .await
        .unwrap();
    let (cert, key) = ca.sign(&[(DnType::CountryName, "FR"), (DnType::CommonName, "dev-sni")]);
    // The device presents its CA certificate too, as older AWS samples do.
    let server_name = sandbox.device_server_name();
    let packets = [client::connect(mqtt::LEVEL_3_1_1, "dev-sni", 30)];
    let first = device_session(&sandbox, &server_name, Some((&[&cert, &ca.pem], &key)), &packets, 4).await;
    assert_eq!(first, Seen::Dropped);
    let thing = iot.describe_thing().thing_name("dev-sni").send().await.unwrap();
    let attributes = thing.attributes().unwrap();
    assert_eq!(attributes.get("country").map(String::as_str), Some("FR"));
    // The serial number parameter has a Default.
    assert_eq!(attributes.get("serial").map(String::as_str), Some("none"));
    let listed = iot
        .list_certificates_by_ca()
        .ca_certificate_id(cert_id(&ca.pem))
        .send()
        .await
        .unwrap();
    let summary = &listed.certificates()[0];
    assert_eq!(summary.status(), Some(&CertificateStatus::Active));
    assert_eq!(summary.certificate_mode(), Some(&CertificateMode::SniOnly));
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Answer(CONNACK.to_vec()));
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn jitr_registers_pending_until_activated() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    let ca = TestCa::new("JITR CA");
    let ca_id = register_ca(&iot, &ca, None).await;
    let (cert, key) = ca.sign(&[(DnType::CommonName, "dev-jitr")]);
    let id = cert_id(&cert);

    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    let listed = iot
        .list_certificates_by_ca()
        .ca_certificate_id(&ca_id)
        .send()
        .await
        .unwrap();
    let ids: Vec<&str> = listed
        .certificates()
        .iter()
        .map(|c| c.certificate_id().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    assert_eq!(
        listed.certificates()[0].status(),
        Some(&CertificateStatus::PendingActivation)
    );
    // No template: nothing else was made.
    assert!(iot.list_things().send().await.unwrap().things().is_empty());

    // Still pending: dropped again, and still pending.
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    assert_eq!(
        certificate_status(&iot, &id).await,
        CertificateStatus::PendingActivation
    );

    iot.update_certificate()
        .certificate_id(&id)
        .new_status(CertificateStatus::Active)
        .send()
        .await
        .unwrap();
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Answer(CONNACK.to_vec()));
    let stats = stats_eventually(&sandbox, |s| s["connections_refused"]["certificate_not_active"] == 1).await;
    assert_eq!(stats["connections_refused"]["jitr_registered"], 1);
    assert_eq!(stats["jitr_registered"][0]["certificate_id"], id.as_str());
    assert_eq!(stats["jitr_registered"][0]["ca_certificate_id"], ca_id.as_str());
    assert_eq!(stats["connections_accepted"][id.as_str()], 1);

    // A deactivated CA keeps even active certificates out.
    iot.update_ca_certificate()
        .certificate_id(&ca_id)
        .new_status(CaCertificateStatus::Inactive)
        .send()
        .await
        .unwrap();
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn jitp_without_a_subject_field_leaves_the_certificate_pending() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    let ca = TestCa::new("maker CA");
    let config = RegistrationConfig::builder()
        .template_body(JITP_TEMPLATE)
        .role_arn(ROLE_ARN)
        .build();
    let ca_id = register_ca(&iot, &ca, Some(config)).await;
    // The template declares Country, without a Default.
    let (cert, key) = ca.sign(&[(DnType::CommonName, "dev-no-country")]);
    let id = cert_id(&cert);

    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    assert_eq!(
        certificate_status(&iot, &id).await,
        CertificateStatus::PendingActivation
    );
    assert!(iot.list_things().send().await.unwrap().things().is_empty());
    assert!(iot.list_policies().send().await.unwrap().policies().is_empty());
    let stats = stats_eventually(&sandbox, |s| {
        s["jitp_failures"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let failure = &stats["jitp_failures"][0];
    assert_eq!(failure["certificate_id"], id.as_str());
    assert_eq!(failure["ca_certificate_id"], ca_id.as_str());
    let message = failure["message"].as_str().unwrap();
    assert!(message.contains("AWS::IoT::Certificate::Country"), "{message}");

    // It stays pending on the next connect; nothing is provisioned then.
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    assert_eq!(
        certificate_status(&iot, &id).await,
        CertificateStatus::PendingActivation
    );
    assert!(iot.list_things().send().await.unwrap().things().is_empty());
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_inactive_and_closed_cas_are_dropped() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);

    // A CA nobody registered.
    let stranger = TestCa::new("stranger");
    let (cert, key) = stranger.sign(&[(DnType::CommonName, "dev-x")]);
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);

    // A CA registered without auto-registration.
    let closed = TestCa::new("closed");
    let code = iot.get_registration_code().send().await.unwrap();
    let code = code.registration_code().unwrap().to_owned();
    iot.register_ca_certificate()
        .ca_certificate(&closed.pem)
        .verification_certificate(closed.verification(&code))
        .set_as_active(true)
        .send()
        .await
        .unwrap();
    let (closed_cert, closed_key) = closed.sign(&[(DnType::CommonName, "dev-y")]);
    assert_eq!(connect(&sandbox, &closed_cert, &closed_key).await, Seen::Dropped);

    // A CA with auto-registration that is not active.
    let inactive = TestCa::new("inactive");
    let inactive_id = register_ca(&iot, &inactive, None).await;
    iot.update_ca_certificate()
        .certificate_id(&inactive_id)
        .new_status(CaCertificateStatus::Inactive)
        .new_auto_registration_status(AutoRegistrationStatus::Enable)
        .send()
        .await
        .unwrap();
    let (inactive_cert, inactive_key) = inactive.sign(&[(DnType::CommonName, "dev-z")]);
    assert_eq!(connect(&sandbox, &inactive_cert, &inactive_key).await, Seen::Dropped);

    // None of them registered anything.
    assert!(iot.list_certificates().send().await.unwrap().certificates().is_empty());
    let stats = stats_eventually(&sandbox, |s| s["connections_refused"]["ca_inactive"] == 1).await;
    assert_eq!(stats["connections_refused"]["unknown_ca"], 1);
    assert_eq!(stats["connections_refused"]["auto_registration_disabled"], 1);

    // No client certificate fails the handshake.
    let server_name = sandbox.device_server_name();
    let packets = [client::connect(mqtt::LEVEL_3_1_1, "anon", 30)];
    assert_eq!(
        device_session(&sandbox, &server_name, None, &packets, 4).await,
        Seen::Dropped
    );
    stats_eventually(&sandbox, |s| s["tls_handshake_failures"] == 1).await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn sandbox_issued_certificates_connect_while_active() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    let (key, csr) = crate::ca::tests::p256_csr();
    let created = iot
        .create_certificate_from_csr()
        .certificate_signing_request(csr)
        .set_as_active(true)
        .send()
        .await
        .unwrap();
    let pem = created.certificate_pem().unwrap().to_owned();
    let id = created.certificate_id().unwrap().to_owned();
    assert_eq!(connect(&sandbox, &pem, &key).await, Seen::Answer(CONNACK.to_vec()));
    // The certificate also names localhost and 127.0.0.1.
    let packets = [client::connect(mqtt::LEVEL_3_1_1, "dev", 30)];
    for name in ["localhost", "127.0.0.1"] {
        let seen = device_session(&sandbox, name, Some((&[&pem], &key)), &packets, 4).await;
        assert_eq!(seen, Seen::Answer(CONNACK.to_vec()), "{name}");
    }
    iot.update_certificate()
        .certificate_id(&id)
        .new_status(CertificateStatus::Inactive)
        .send()
        .await
        .unwrap();
    assert_eq!(connect(&sandbox, &pem, &key).await, Seen::Dropped);
    let stats = stats_eventually(&sandbox, |s| s["connections_refused"]["certificate_not_active"] == 1).await;
    assert_eq!(stats["connections_accepted"][id.as_str()], 3);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn device_endpoint_is_advertised_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::default()
    };
    let sandbox = Sandbox::start(config.clone()).await.unwrap();
    let iot = iot_client(&sandbox);
    let url = format!("{}/_sandbox/device-endpoint", sandbox.endpoint_url());
    let reply = crate::e2e_tests::send("GET", &url, &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let advertised = reply.json();
    assert_eq!(advertised["address"], sandbox.device_endpoint().to_string());
    let ats = iot
        .describe_endpoint()
        .endpoint_type("iot:Data-ATS")
        .send()
        .await
        .unwrap();
    assert_eq!(advertised["serverName"], ats.endpoint_address().unwrap());
    assert_eq!(sandbox.device_server_name(), ats.endpoint_address().unwrap());
    assert_ne!(sandbox.device_endpoint().port(), 0);

    let ca = TestCa::new("maker CA");
    register_ca(&iot, &ca, None).await;
    let (cert, key) = ca.sign(&[(DnType::CommonName, "dev-r")]);
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    iot.update_certificate()
        .certificate_id(cert_id(&cert))
        .new_status(CertificateStatus::Active)
        .send()
        .await
        .unwrap();
    sandbox.shutdown().await.unwrap();

    let sandbox = Sandbox::start(config).await.unwrap();
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Answer(CONNACK.to_vec()));
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn x509_v1_device_certificates_are_provisioned_and_connect() {
    use x509_parser::prelude::{FromDer as _, X509Certificate, X509Version};

    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    let ca = TestCa::new("openssl-style CA");
    let config = RegistrationConfig::builder()
        .template_body(JITP_TEMPLATE)
        .role_arn(ROLE_ARN)
        .build();
    let ca_id = register_ca(&iot, &ca, Some(config)).await;
    let (cert, key) = ca.sign_v1(&[(DnType::CountryName, "IT"), (DnType::CommonName, "dev-v1")]);
    let der = pem::parse(&cert).unwrap().into_contents();
    let (_, parsed) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(parsed.version(), X509Version::V1);

    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Dropped);
    let thing = iot.describe_thing().thing_name("dev-v1").send().await.unwrap();
    assert_eq!(
        thing.attributes().unwrap().get("country").map(String::as_str),
        Some("IT")
    );
    let described = iot
        .describe_certificate()
        .certificate_id(cert_id(&cert))
        .send()
        .await
        .unwrap();
    let description = described.certificate_description().unwrap();
    assert_eq!(description.status(), Some(&CertificateStatus::Active));
    assert_eq!(description.ca_certificate_id(), Some(ca_id.as_str()));
    assert_eq!(connect(&sandbox, &cert, &key).await, Seen::Answer(CONNACK.to_vec()));
    sandbox.shutdown().await.unwrap();
}
