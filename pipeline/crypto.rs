//! Small helpers over certificates, CSRs and public keys.
//!
//! Keys are compared by what they are, not how they are spelled: two
//! SubjectPublicKeyInfo encodings of one key (an RSA key with or without the
//! explicit NULL parameter, say) have the same [`KeyId`].

use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

/// A public key's identity: its algorithm, its curve (EC), and its bits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub algorithm: String,
    pub curve: Option<String>,
    pub bits: Vec<u8>,
}

impl KeyId {
    /// Reads a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<KeyId, String> {
        let (_, spki) = SubjectPublicKeyInfo::from_der(der).map_err(|e| format!("not a SubjectPublicKeyInfo: {e}"))?;
        Ok(KeyId::from_spki(&spki))
    }

    pub fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> KeyId {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        KeyId {
            algorithm: spki.algorithm.algorithm.to_id_string(),
            curve,
            bits: spki.subject_public_key.data.to_vec(),
        }
    }

    /// A short, stable hex fingerprint, for ledgers and logs.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.algorithm.as_bytes());
        h.update([0]);
        h.update(self.curve.as_deref().unwrap_or("").as_bytes());
        h.update([0]);
        h.update(&self.bits);
        hex::encode(h.finalize())
    }
}

/// The AWS IoT certificate id: lowercase hex SHA-256 of the certificate's DER.
pub fn certificate_id(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A parsed certificate PEM: its DER and the identity of its public key.
pub struct CertInfo {
    pub der: Vec<u8>,
    pub id: String,
    pub key: KeyId,
    pub subject: String,
    pub issuer: String,
}

/// Parses one certificate from PEM text (the first CERTIFICATE block).
pub fn parse_certificate_pem(pem_text: &str) -> Result<CertInfo, String> {
    let block = ::pem::parse_many(pem_text.as_bytes())
        .map_err(|e| format!("certificate PEM does not parse: {e}"))?
        .into_iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or_else(|| "no CERTIFICATE block in the PEM".to_string())?;
    let der = block.into_contents();
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("certificate DER does not parse: {e}"))?;
    let key = KeyId::from_spki(cert.public_key());
    let subject = cert.subject().to_string();
    let issuer = cert.issuer().to_string();
    let id = certificate_id(&der);
    Ok(CertInfo {
        der,
        id,
        key,
        subject,
        issuer,
    })
}

/// PEM text with LF line endings only and exactly one final newline.
pub fn normalise_pem_text(text: &str) -> String {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = String::with_capacity(text.len() + 1);
    for line in text.lines() {
        let line = line.trim_end_matches('\r').trim();
        if line.is_empty() {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Encodes DER as PEM with LF line endings and a final newline.
pub fn to_pem(tag: &str, der: &[u8]) -> String {
    let p = ::pem::Pem::new(tag, der.to_vec());
    ::pem::encode_config(&p, ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF))
}

/// The key a CSR carries, without checking its signature (that was done
/// when it was made or ingested).
pub fn csr_key_id(pem_text: &str) -> Result<KeyId, String> {
    let block = ::pem::parse(pem_text.as_bytes()).map_err(|e| format!("CSR PEM: {e}"))?;
    let (_, csr) = X509CertificationRequest::from_der(block.contents()).map_err(|e| format!("CSR DER: {e}"))?;
    Ok(KeyId::from_spki(&csr.certification_request_info.subject_pki))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_strips_bom_crlf_and_blank_lines() {
        let t = "\u{feff}-----BEGIN X-----\r\n\r\nAAAA\r\n-----END X-----";
        assert_eq!(normalise_pem_text(t), "-----BEGIN X-----\nAAAA\n-----END X-----\n");
    }

    #[test]
    fn key_id_of_generated_key_matches_its_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = parse_certificate_pem(&cert.pem()).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        assert_eq!(info.key, KeyId::from_spki_der(&spki).unwrap());
        assert_eq!(info.id, certificate_id(cert.der()));
        assert_eq!(info.id.len(), 64);
    }
}
