//! The device endpoint: a TLS listener that behaves like AWS IoT's ATS data
//! endpoint towards a device that connects with a client certificate.
//!
//! The server certificate is issued by the sandbox CA for the `iot:Data-ATS`
//! address DescribeEndpoint answers, `localhost` and `127.0.0.1`. A client
//! certificate is mandatory, but which ones are trusted changes at run time
//! (CAs are registered through the API), so the handshake accepts any
//! well-formed chain (checking only the handshake signature) and the
//! registry decides afterwards ([`crate::iot::admission`]): a registered,
//! active certificate gets an MQTT session; JITR and JITP register or
//! provision an unknown certificate signed by a CA with auto-registration and
//! drop the connection, as AWS does on the first connect; anything else is
//! dropped.
//!
//! The MQTT side is a minimal broker: CONNECT → CONNACK, PUBLISH QoS 1 →
//! PUBACK (QoS 2 → PUBREC, PUBREL → PUBCOMP), SUBSCRIBE → SUBACK (QoS 2 is
//! granted as 1, as AWS IoT does), UNSUBSCRIBE → UNSUBACK, PINGREQ →
//! PINGRESP, DISCONNECT closes. Messages are counted, not delivered. TLS SNI
//! is not checked.

pub(crate) mod mqtt;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::ca::SandboxCa;
use crate::iot::admission::{self, Admission, Refusal};
use crate::state::lock;
use crate::Shared;

use mqtt::{MqttError, Packet};

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an admitted client gets to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The names the server certificate is valid for.
pub(crate) fn server_names(region: &str) -> Vec<String> {
    vec![
        crate::iot::data_ats_address(region),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ]
}

/// The TLS configuration of the endpoint, with a fresh server certificate.
pub(crate) fn tls_config(ca: &SandboxCa, region: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = ca.issue_server_certificate(&server_names(region))?;
    let verifier = Arc::new(AnyClientCertificate {
        provider: provider.clone(),
    });
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.private_key_der));
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("the TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![CertificateDer::from(server.certificate_der)], key)
        .context("the device endpoint's server certificate")?;
    Ok(Arc::new(config))
}

/// Requires a client certificate and accepts any well-formed chain; the
/// registry decides on it after the handshake.
#[derive(Debug)]
struct AnyClientCertificate {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        for der in std::iter::once(end_entity).chain(intermediates) {
            match X509Certificate::from_der(der.as_ref()) {
                Ok(([], _)) => {}
                _ => return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)),
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 schemes do not fix the curve: any algorithm of the scheme
        // that verifies with the certificate's key will do.
        let (_, key) = public_key(cert)?;
        let algorithms = self
            .provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == dss.scheme)
            .map(|(_, algorithms)| *algorithms)
            .ok_or(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ))?;
        if algorithms
            .iter()
            .any(|algorithm| algorithm.verify_signature(&key, message, dss.signature()).is_ok())
        {
            Ok(HandshakeSignatureValid::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature,
            ))
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let (spki, _) = public_key(cert)?;
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki),
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The SubjectPublicKeyInfo DER of a certificate and the key bits in it.
///
/// The handshake signature is checked against the key alone, not through
/// webpki's certificate parser, which refuses the X.509 v1 certificates that
/// `openssl x509 -req` makes (and AWS IoT accepts).
fn public_key(cert: &CertificateDer<'_>) -> Result<(Vec<u8>, Vec<u8>), rustls::Error> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let spki = parsed.public_key();
    Ok((spki.raw.to_vec(), spki.subject_public_key.data.to_vec()))
}

/// What the device endpoint has done in this process.
#[derive(Default)]
pub(crate) struct DeviceStats(Mutex<Counters>);

#[derive(Default)]
struct Counters {
    accepted: BTreeMap<String, u64>,
    refused: BTreeMap<&'static str, u64>,
    published: BTreeMap<String, u64>,
    handshake_failures: u64,
    jitr_registered: Vec<Value>,
    jitp_provisioned: Vec<Value>,
    jitp_failures: Vec<Value>,
}

impl DeviceStats {
    fn accepted(&self, certificate_id: &str) {
        *lock(&self.0).accepted.entry(certificate_id.to_owned()).or_default() += 1;
    }

    fn published(&self, certificate_id: &str) {
        *lock(&self.0).published.entry(certificate_id.to_owned()).or_default() += 1;
    }

    fn handshake_failed(&self) {
        lock(&self.0).handshake_failures += 1;
    }

    fn refused(&self, certificate_id: &str, refusal: &Refusal) {
        let mut counters = lock(&self.0);
        *counters.refused.entry(refusal.key()).or_default() += 1;
        match refusal {
            Refusal::Registered { ca_certificate_id } => counters.jitr_registered.push(json!({
                "certificate_id": certificate_id,
                "ca_certificate_id": ca_certificate_id,
            })),
            Refusal::Provisioned {
                ca_certificate_id,
                thing_name,
            } => counters.jitp_provisioned.push(json!({
                "certificate_id": certificate_id,
                "ca_certificate_id": ca_certificate_id,
                "thing_name": thing_name,
            })),
            Refusal::ProvisioningFailed {
                ca_certificate_id,
                message,
            } => counters.jitp_failures.push(json!({
                "certificate_id": certificate_id,
                "ca_certificate_id": ca_certificate_id,
                "message": message,
            })),
            _ => {}
        }
    }

    /// The `device` part of the sandbox stats.
    pub(crate) fn to_json(&self) -> Value {
        let counters = lock(&self.0);
        json!({
            "connections_accepted": counters.accepted,
            "connections_refused": counters.refused,
            "messages_published": counters.published,
            "tls_handshake_failures": counters.handshake_failures,
            "jitr_registered": counters.jitr_registered,
            "jitp_provisioned": counters.jitp_provisioned,
            "jitp_failures": counters.jitp_failures,
        })
    }
}

/// Accepts device connections until shutdown, then closes them.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, tls: Arc<ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let mut shutdown = shared.shutdown.clone();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::server::stopped(&mut shutdown) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "device endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connections.spawn(connection(stream, peer, shared.clone(), acceptor.clone()));
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    // Device sessions are long-lived: they end with the sandbox.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, acceptor: TlsAcceptor) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "device TLS handshake failed");
            shared.device_stats.handshake_failed();
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "device TLS handshake timed out");
            shared.device_stats.handshake_failed();
            return;
        }
    };
    let (certificates, server_name) = {
        let (_, conn) = tls.get_ref();
        let certificates: Vec<Vec<u8>> = conn
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect();
        (certificates, conn.server_name().map(str::to_owned))
    };
    let Some((leaf, chain)) = certificates.split_first() else {
        return;
    };
    let (certificate_id, verdict) = admission::admit(&shared, leaf, chain).await;
    match verdict {
        Admission::Accept => {
            tracing::debug!(%peer, %certificate_id, sni = ?server_name, "device admitted");
            let mut stop = shared.shutdown.clone();
            let result = tokio::select! {
                result = session(tls, &shared.device_stats, &certificate_id) => result,
                () = crate::server::stopped(&mut stop) => Ok(()),
            };
            if let Err(e) = result {
                tracing::debug!(%peer, %certificate_id, error = %e, "MQTT session ended with an error");
            }
        }
        Admission::Drop(refusal) => {
            tracing::debug!(%peer, %certificate_id, sni = ?server_name, ?refusal, "device connection dropped");
            shared.device_stats.refused(&certificate_id, &refusal);
        }
    }
}

/// Reads one frame, within `limit` if there is one.
async fn read_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Option<Duration>,
) -> Result<Option<(u8, Vec<u8>)>, MqttError> {
    match limit {
        None => mqtt::read_frame(stream).await,
        Some(limit) => tokio::time::timeout(limit, mqtt::read_frame(stream))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the client went silent"))?,
    }
}

/// An MQTT session of an admitted device.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    stats: &DeviceStats,
    certificate_id: &str,
) -> Result<(), MqttError> {
    let Some((first, body)) = read_within(&mut stream, Some(CONNECT_TIMEOUT)).await? else {
        return Ok(());
    };
    let Packet::Connect {
        level,
        client_id,
        keep_alive,
    } = mqtt::parse(first, &body, false)?
    else {
        return Err(MqttError::Malformed("the first packet is not CONNECT".to_owned()));
    };
    if !matches!(level, mqtt::LEVEL_3_1 | mqtt::LEVEL_3_1_1 | mqtt::LEVEL_5) {
        stream
            .write_all(&mqtt::connack(false, mqtt::UNACCEPTABLE_PROTOCOL_VERSION))
            .await?;
        stream.flush().await?;
        return Ok(());
    }
    let v5 = level == mqtt::LEVEL_5;
    stats.accepted(certificate_id);
    stream.write_all(&mqtt::connack(v5, 0)).await?;
    stream.flush().await?;
    tracing::debug!(%certificate_id, %client_id, level, keep_alive, "MQTT connection accepted");

    // A client silent for one and a half keep-alive periods is gone.
    let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    loop {
        let Some((first, body)) = read_within(&mut stream, idle).await? else {
            return Ok(());
        };
        let reply = match mqtt::parse(first, &body, v5)? {
            Packet::Publish {
                qos, packet_id, topic, ..
            } => {
                stats.published(certificate_id);
                tracing::trace!(%certificate_id, %topic, qos, "PUBLISH");
                match (qos, packet_id) {
                    (1, Some(id)) => Some(mqtt::ack(mqtt::PUBACK, id)),
                    (2, Some(id)) => Some(mqtt::ack(mqtt::PUBREC, id)),
                    _ => None,
                }
            }
            Packet::PubRel(id) => Some(mqtt::ack(mqtt::PUBCOMP, id)),
            Packet::Subscribe { packet_id, filters } => {
                let granted: Vec<u8> = filters.iter().map(|(_, qos)| (*qos).min(1)).collect();
                Some(mqtt::suback(v5, packet_id, &granted))
            }
            Packet::Unsubscribe { packet_id, filters } => Some(mqtt::unsuback(v5, packet_id, filters.len())),
            Packet::PingReq => Some(mqtt::PINGRESP.to_vec()),
            Packet::Disconnect => {
                let _ = stream.shutdown().await;
                return Ok(());
            }
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => None,
            Packet::Connect { .. } => return Err(MqttError::Malformed("a second CONNECT".to_owned())),
        };
        if let Some(reply) = reply {
            stream.write_all(&reply).await?;
            stream.flush().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mqtt::client;
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// Runs a session over an in-memory pipe and answers what it wrote.
    async fn run(input: Vec<u8>) -> (Vec<u8>, DeviceStats) {
        let (mut client_end, server_end) = tokio::io::duplex(64 * 1024);
        let stats = DeviceStats::default();
        client_end.write_all(&input).await.unwrap();
        client_end.shutdown().await.unwrap();
        session(server_end, &stats, "c1").await.unwrap();
        let mut out = Vec::new();
        client_end.read_to_end(&mut out).await.unwrap();
        (out, stats)
    }

    #[tokio::test]
    async fn mqtt_3_1_1_session() {
        let mut input = client::connect(mqtt::LEVEL_3_1_1, "dev", 60);
        input.extend(client::publish(false, 1, 5, "t", b"hi"));
        input.extend(client::publish(false, 0, 0, "t", b"hi"));
        input.extend(client::subscribe(false, 6, &[("t/#", 2)]));
        input.extend(client::PINGREQ);
        input.extend(client::DISCONNECT);
        let (out, stats) = run(input).await;
        let mut expected = vec![0x20, 0x02, 0x00, 0x00];
        expected.extend([0x40, 0x02, 0x00, 0x05]);
        expected.extend([0x90, 0x03, 0x00, 0x06, 0x01]);
        expected.extend([0xd0, 0x00]);
        assert_eq!(out, expected);
        let json = stats.to_json();
        assert_eq!(json["connections_accepted"]["c1"], 1);
        assert_eq!(json["messages_published"]["c1"], 2);
    }

    #[tokio::test]
    async fn mqtt_5_session() {
        let mut input = client::connect(mqtt::LEVEL_5, "dev", 0);
        input.extend(client::publish(true, 1, 9, "t", b"x"));
        input.extend(client::publish(true, 2, 10, "t", b"x"));
        input.extend([0x62, 0x02, 0x00, 0x0a]);
        let (out, _) = run(input).await;
        let mut expected = vec![0x20, 0x03, 0x00, 0x00, 0x00];
        expected.extend([0x40, 0x02, 0x00, 0x09]);
        expected.extend([0x50, 0x02, 0x00, 0x0a]);
        expected.extend([0x70, 0x02, 0x00, 0x0a]);
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn refuses_other_first_packets_and_versions() {
        let (mut client_end, server_end) = tokio::io::duplex(1024);
        client_end.write_all(&client::PINGREQ).await.unwrap();
        let stats = DeviceStats::default();
        assert!(session(server_end, &stats, "c1").await.is_err());
        assert!(stats.to_json()["connections_accepted"].as_object().unwrap().is_empty());

        let (out, stats) = run(client::connect(6, "dev", 0)).await;
        assert_eq!(out, [0x20, 0x02, 0x00, 0x01]);
        assert!(stats.to_json()["connections_accepted"].as_object().unwrap().is_empty());
    }
}
