//! `provline verify`: connect with each bundle the way the device will (TLS
//! with its certificate and key, then MQTT CONNECT) and report which connect.
//!
//! Only CONNECT and CONNACK are spoken, by hand: the point is to see what the
//! endpoint does with the credential, and a full MQTT client would hide a
//! dropped first connection (JITP, JITR) behind its own reconnect logic. The
//! TCP address and the TLS server name are separate so that the same code
//! reaches a real ATS endpoint and the sandbox's loopback listener.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bundle::{CERT_FILE, DEVICE_FILE, KEY_FILE, ROOT_CA1_FILE, ROOT_CA3_FILE};

/// How to reach the endpoint, when the bundles' own endpoint is not the one.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// HOST:PORT to connect to; None uses each bundle's endpoint and port.
    pub address: Option<String>,
    /// TLS server name; None uses the host of the address.
    pub server_name: Option<String>,
    /// PEM of the CAs to trust for the server; None uses the bundle's Amazon roots.
    pub server_roots_pem: Option<String>,
    pub attempts: u32,
    pub timeout: Duration,
}

/// What one connection came to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Attempt {
    /// CONNACK with return code 0.
    Connected,
    /// CONNACK with a refusal code.
    Refused { code: u8 },
    /// The endpoint closed the connection before CONNACK: what AWS does to an
    /// unknown certificate of an auto-registering CA, and to an inactive one.
    Dropped,
    /// The TLS handshake failed.
    Tls { message: String },
    /// Anything else: no bundle, no route, timeout.
    Error { message: String },
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Connected => f.write_str("connected (CONNACK accepted)"),
            Attempt::Refused { code } => write!(f, "refused: CONNACK return code {code}"),
            Attempt::Dropped => f.write_str(
                "the endpoint closed the connection before CONNACK (unknown, pending or inactive certificate)",
            ),
            Attempt::Tls { message } => write!(f, "TLS handshake failed: {message}"),
            Attempt::Error { message } => f.write_str(message),
        }
    }
}

/// One device's verdict, all its attempts in order.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceResult {
    pub thing_name: String,
    pub connected: bool,
    pub attempts: Vec<Attempt>,
}

#[derive(serde::Deserialize)]
struct DeviceJson {
    thing_name: String,
    client_id: String,
    endpoint: String,
    port: u16,
}

/// Tries one bundle up to `opts.attempts` times, stopping at the first CONNACK.
pub async fn verify_bundle(dir: &Path, opts: &Options) -> DeviceResult {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut attempts = Vec::new();
    let config = match load(dir, opts) {
        Ok(c) => c,
        Err(message) => {
            return DeviceResult {
                thing_name: name,
                connected: false,
                attempts: vec![Attempt::Error { message }],
            }
        }
    };
    let (device, tls, address, server_name) = config;
    let mut delay = Duration::from_millis(100);
    for i in 0..opts.attempts.max(1) {
        if i > 0 {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        let a = match tokio::time::timeout(
            opts.timeout,
            connect_once(&tls, &address, server_name.clone(), &device.client_id),
        )
        .await
        {
            Ok(a) => a,
            Err(_) => Attempt::Error {
                message: format!("no answer within {} s", opts.timeout.as_secs()),
            },
        };
        let done = matches!(a, Attempt::Connected | Attempt::Refused { .. } | Attempt::Tls { .. });
        attempts.push(a);
        if done {
            break;
        }
    }
    DeviceResult {
        thing_name: device.thing_name,
        connected: attempts.last() == Some(&Attempt::Connected),
        attempts,
    }
}

type Loaded = (DeviceJson, Arc<rustls::ClientConfig>, String, ServerName<'static>);

fn load(dir: &Path, opts: &Options) -> Result<Loaded, String> {
    let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()));
    let device: DeviceJson =
        serde_json::from_slice(&read(DEVICE_FILE)?).map_err(|e| format!("{}: {e}", dir.join(DEVICE_FILE).display()))?;
    let key_path = dir.join(KEY_FILE);
    if !key_path.exists() {
        return Err(format!(
            "{}: no private key in the bundle (the key stays on the device); verify on the device itself",
            dir.display()
        ));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(CERT_FILE)?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", dir.join(CERT_FILE).display()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(KEY_FILE)?).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let root_pems: Vec<Vec<u8>> = match &opts.server_roots_pem {
        Some(p) => vec![p.as_bytes().to_vec()],
        None => vec![read(ROOT_CA1_FILE)?, read(ROOT_CA3_FILE)?],
    };
    for pem in root_pems {
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("server CA: {e}"))?;
            roots.add(c).map_err(|e| format!("server CA: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("{}: the certificate and key do not go together: {e}", dir.display()))?;
    // AWS IoT takes MQTT on 8883 with the ALPN name below or none; send it so
    // that port 443 works as well.
    tls.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    let address = opts
        .address
        .clone()
        .unwrap_or_else(|| format!("{}:{}", device.endpoint, device.port));
    let host = match &opts.server_name {
        Some(n) => n.clone(),
        None if opts.address.is_some() => address.rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default(),
        None => device.endpoint.clone(),
    };
    let server_name = ServerName::try_from(host.clone()).map_err(|e| format!("server name `{host}`: {e}"))?;
    Ok((device, Arc::new(tls), address, server_name))
}

async fn connect_once(
    tls: &Arc<rustls::ClientConfig>,
    address: &str,
    server_name: ServerName<'static>,
    client_id: &str,
) -> Attempt {
    let tcp = match tokio::net::TcpStream::connect(address).await {
        Ok(t) => t,
        Err(e) => {
            return Attempt::Error {
                message: format!("cannot reach {address}: {e}"),
            }
        }
    };
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let mut stream = match connector.connect(server_name, tcp).await {
        Ok(s) => s,
        Err(e) if is_closed(&e) => return Attempt::Dropped,
        Err(e) => return Attempt::Tls { message: e.to_string() },
    };
    if let Err(e) = stream.write_all(&connect_packet(client_id, 30)).await {
        return if is_closed(&e) {
            Attempt::Dropped
        } else {
            Attempt::Error { message: e.to_string() }
        };
    }
    let mut head = [0u8; 4];
    match stream.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if is_closed(&e) => return Attempt::Dropped,
        Err(e) => return Attempt::Error { message: e.to_string() },
    }
    if head[0] != 0x20 || head[1] != 0x02 {
        return Attempt::Error {
            message: format!("expected CONNACK, got bytes {:02x} {:02x}", head[0], head[1]),
        };
    }
    let code = head[3];
    // A clean goodbye, so the endpoint logs no lost connection.
    let _ = stream.write_all(&[0xe0, 0x00]).await;
    let _ = stream.shutdown().await;
    if code == 0 {
        Attempt::Connected
    } else {
        Attempt::Refused { code }
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    ) || e.to_string().contains("close_notify")
        || e.to_string().contains("peer closed")
}

/// MQTT 3.1.1 CONNECT with a clean session and no credentials: the client
/// certificate is the credential.
pub fn connect_packet(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02]);
    body.extend_from_slice(&keep_alive_secs.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

/// Verifies every bundle in `dirs`, `concurrency` at a time, in order.
pub async fn verify_all(dirs: Vec<PathBuf>, opts: Options, concurrency: usize) -> Vec<DeviceResult> {
    let opts = Arc::new(opts);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::new();
    for dir in dirs {
        let opts = opts.clone();
        let sem = sem.clone();
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("never closed");
            verify_bundle(&dir, &opts).await
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        match h.await {
            Ok(r) => out.push(r),
            Err(e) => out.push(DeviceResult {
                thing_name: String::new(),
                connected: false,
                attempts: vec![Attempt::Error { message: e.to_string() }],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packet_is_mqtt_311() {
        let p = connect_packet("SN-1", 30);
        assert_eq!(p[0], 0x10);
        assert_eq!(p[1] as usize, p.len() - 2);
        assert_eq!(&p[2..10], &[0, 4, b'M', b'Q', b'T', b'T', 4, 2]);
        assert_eq!(&p[10..12], &[0, 30]);
        assert_eq!(&p[12..14], &[0, 4]);
        assert_eq!(&p[14..], b"SN-1");
        let long = connect_packet(&"x".repeat(200), 30);
        assert_eq!(&long[1..3], &[(212 % 128) as u8 | 0x80, 1]);
        assert_eq!(
            Attempt::Refused { code: 5 }.to_string(),
            "refused: CONNACK return code 5"
        );
    }
}
