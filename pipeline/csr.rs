//! The policy for CSRs made on the device.
//!
//! A device-made CSR is normalised (BOM, CRLF, blank lines and the legacy
//! `NEW CERTIFICATE REQUEST` label are accepted), its signature is verified
//! (proof that the device holds the key), and its key must be one AWS IoT
//! accepts: RSA of at least 2048 bits, or EC on P-256, P-384 or P-521.

use x509_parser::prelude::*;

use crate::crypto::{to_pem, KeyId};

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_ED448: &str = "1.3.101.113";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";
const OID_SECP256K1: &str = "1.3.132.0.10";
const ECDSA_SIG_PREFIX: &str = "1.2.840.10045.4.";

/// What AWS accepts, said once so every rejection reads the same.
pub const ACCEPTED_KEYS: &str = "AWS IoT accepts RSA keys of at least 2048 bits or EC keys on P-256, P-384 or P-521";

/// A CSR that passed the policy, in the form that is sent.
#[derive(Clone, Debug)]
pub struct DeviceCsr {
    /// PEM with the standard label, LF line endings, final newline.
    pub pem: String,
    pub der: Vec<u8>,
    pub key: KeyId,
    /// `ec-p256`, `ec-p384`, `ec-p521` or `rsa-<bits>`.
    pub key_type: String,
    pub subject: String,
}

/// Checks one CSR given as PEM text. The error says what is wrong and what
/// would be right.
pub fn check_csr(text: &str) -> Result<DeviceCsr, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text).trim();
    if text.is_empty() {
        return Err("the CSR is empty".into());
    }
    if !text.contains("-----BEGIN") {
        if looks_like_path(text) {
            return Err(format!(
                "`{}` looks like a file path; the cell must hold the PEM text of the CSR itself (-----BEGIN CERTIFICATE REQUEST----- ...)",
                shorten(text)
            ));
        }
        return Err("not PEM: expected -----BEGIN CERTIFICATE REQUEST-----".into());
    }
    // The legacy label is the same DER under another name; pem parses either.
    let block =
        ::pem::parse(text.replace("\r\n", "\n").as_bytes()).map_err(|e| format!("the CSR PEM does not parse: {e}"))?;
    match block.tag() {
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => {}
        other => return Err(format!("the PEM block is `{other}`, expected `CERTIFICATE REQUEST`")),
    }
    let der = block.into_contents();
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| format!("the CSR is not valid DER PKCS#10: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes of trailing data after the CSR", rest.len()));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key = KeyId::from_spki(spki);
    let key_type = match key.algorithm.as_str() {
        OID_RSA => {
            let bits = spki
                .parsed()
                .map_err(|e| format!("the RSA public key does not parse: {e}"))?
                .key_size();
            if bits < 2048 {
                return Err(format!("RSA key of {bits} bits: {ACCEPTED_KEYS}"));
            }
            format!("rsa-{bits}")
        }
        OID_EC => match key.curve.as_deref() {
            Some(OID_P256) => "ec-p256".into(),
            Some(OID_P384) => "ec-p384".into(),
            Some(OID_P521) => "ec-p521".into(),
            Some(OID_SECP256K1) => return Err(format!("EC key on secp256k1: {ACCEPTED_KEYS}")),
            Some(other) => return Err(format!("EC key on curve {other}: {ACCEPTED_KEYS}")),
            None => {
                return Err(format!(
                    "EC key without a named curve (explicit parameters): {ACCEPTED_KEYS}"
                ))
            }
        },
        OID_ED25519 => return Err(format!("Ed25519 key: {ACCEPTED_KEYS}")),
        OID_ED448 => return Err(format!("Ed448 key: {ACCEPTED_KEYS}")),
        other => return Err(format!("key algorithm {other}: {ACCEPTED_KEYS}")),
    };
    let sig_alg = csr.signature_algorithm.algorithm.to_id_string();
    if sig_alg.starts_with(ECDSA_SIG_PREFIX) && csr.signature_algorithm.parameters.is_some() {
        return Err(
            "the ECDSA signature algorithm identifier carries parameters (an explicit NULL); RFC 5758 says they must be absent, and strict parsers such as AWS's reject it: re-create the CSR with a current library".into(),
        );
    }
    csr.verify_signature().map_err(|e| {
        format!("the CSR's signature does not verify ({e:?}): the request was not signed by the key it carries")
    })?;
    Ok(DeviceCsr {
        pem: to_pem("CERTIFICATE REQUEST", &der),
        subject: info.subject.to_string(),
        der,
        key,
        key_type,
    })
}

fn looks_like_path(text: &str) -> bool {
    !text.contains(char::is_whitespace)
        && (text.contains('/')
            || text.contains('\\')
            || [".csr", ".pem", ".der", ".req"]
                .iter()
                .any(|ext| text.to_ascii_lowercase().ends_with(ext)))
}

fn shorten(text: &str) -> String {
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_p256_and_reports_its_type() {
        let csr = check_csr(&csr_for(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap();
        assert_eq!(csr.key_type, "ec-p256");
        assert!(csr.pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"));
    }

    #[test]
    fn crlf_and_legacy_label_give_the_same_der() {
        let pem = csr_for(&rcgen::PKCS_ECDSA_P384_SHA384);
        let crlf = pem.replace('\n', "\r\n");
        let legacy = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        let a = check_csr(&pem).unwrap();
        let b = check_csr(&crlf).unwrap();
        let c = check_csr(&legacy).unwrap();
        assert_eq!(a.der, b.der);
        assert_eq!(a.der, c.der);
        assert_eq!(c.pem, a.pem);
    }

    #[test]
    fn rejects_ed25519_with_the_accepted_list() {
        let err = check_csr(&csr_for(&rcgen::PKCS_ED25519)).unwrap_err();
        assert!(err.starts_with("Ed25519 key"), "{err}");
        assert!(err.contains("RSA keys of at least 2048 bits"), "{err}");
    }

    /// Re-encodes a CSR with an explicit NULL in its ECDSA signature
    /// algorithm identifier, as some old libraries write it.
    fn with_explicit_null(pem_text: &str) -> String {
        let der = ::pem::parse(pem_text.as_bytes()).unwrap().into_contents();
        let ecdsa_sha256 = [0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
        let at = der
            .windows(ecdsa_sha256.len())
            .rposition(|w| w == ecdsa_sha256)
            .unwrap();
        let mut body = der[..at].to_vec();
        body.extend_from_slice(&[
            0x30, 0x0c, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x05, 0x00,
        ]);
        body.extend_from_slice(&der[at + ecdsa_sha256.len()..]);
        // Fix the outer SEQUENCE length (two bytes longer now).
        let (header, len) = match body[1] {
            0x81 => (3, body[2] as usize),
            0x82 => (4, u16::from_be_bytes([body[2], body[3]]) as usize),
            n => (2, n as usize),
        };
        let content = body[header..].to_vec();
        assert_eq!(content.len(), len + 2);
        let mut out = vec![0x30];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else if content.len() < 0x100 {
            out.extend_from_slice(&[0x81, content.len() as u8]);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&content);
        to_pem("CERTIFICATE REQUEST", &out)
    }

    #[test]
    fn an_explicit_null_in_the_ecdsa_identifier_gets_a_precise_verdict() {
        let odd = with_explicit_null(&csr_for(&rcgen::PKCS_ECDSA_P256_SHA256));
        let err = check_csr(&odd).unwrap_err();
        assert!(err.contains("explicit NULL") && err.contains("RFC 5758"), "{err}");
    }

    #[test]
    fn a_path_is_not_a_pem() {
        let err = check_csr("/var/lib/mes/SN1.csr").unwrap_err();
        assert!(err.contains("looks like a file path"), "{err}");
    }

    #[test]
    fn a_tampered_signature_fails() {
        let pem = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        let mut der = ::pem::parse(pem.as_bytes()).unwrap().into_contents();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let err = check_csr(&to_pem("CERTIFICATE REQUEST", &der)).unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }
}
