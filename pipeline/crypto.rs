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

/// The public key an EC private key in PKCS#8 carries beside its scalar
/// (ECPrivateKey's `[1] publicKey`), with the curve the key names. None
/// when the key is not EC or carries no public key. Reading it costs a DER walk; deriving the public
/// key from the scalar costs a scalar multiplication, as much as making
/// the key did.
pub fn pkcs8_ec_public_key(pkcs8_der: &[u8]) -> Option<KeyId> {
    use x509_parser::der_parser::asn1_rs::Class;
    const EC_PUBLIC_KEY: [u8; 7] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    fn tlvs(mut i: &[u8]) -> Option<Vec<(Class, u32, &[u8])>> {
        let mut out = Vec::new();
        while !i.is_empty() {
            let (rest, h) = x509_parser::der_parser::der::der_read_element_header(i).ok()?;
            let n = h.length().definite().ok()?;
            if rest.len() < n {
                return None;
            }
            out.push((h.class(), h.tag().0, &rest[..n]));
            i = &rest[n..];
        }
        Some(out)
    }
    let universal = |item: &(Class, u32, &'_ [u8]), tag: u32| item.0 == Class::Universal && item.1 == tag;
    let top = tlvs(pkcs8_der)?;
    let info = tlvs(top.first().filter(|t| universal(t, 16))?.2)?;
    let algorithm = tlvs(info.get(1).filter(|t| universal(t, 16))?.2)?;
    if algorithm.first().filter(|t| universal(t, 6))?.2 != EC_PUBLIC_KEY {
        return None;
    }
    let curve = x509_parser::der_parser::asn1_rs::Oid::new(algorithm.get(1).filter(|t| universal(t, 6))?.2.into());
    let ec = tlvs(info.get(2).filter(|t| universal(t, 4))?.2)?;
    let fields = tlvs(ec.first().filter(|t| universal(t, 16))?.2)?;
    let public = fields.iter().find(|f| f.0 == Class::ContextSpecific && f.1 == 1)?;
    let bits = tlvs(public.2)?;
    let data = bits.first().filter(|t| universal(t, 3))?.2;
    // A BIT STRING's first octet counts the unused bits: none for a point.
    match data.split_first() {
        Some((0, point)) if !point.is_empty() => Some(KeyId {
            algorithm: "1.2.840.10045.2.1".into(),
            curve: Some(curve.to_id_string()),
            bits: point.to_vec(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_key_inside_an_ec_private_key_is_the_key_pairs() {
        use rcgen::PublicKeyData;
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let other = rcgen::KeyPair::generate_for(alg).unwrap();
            let spki = KeyId::from_spki_der(&kp.subject_public_key_info()).unwrap();
            assert_eq!(pkcs8_ec_public_key(&kp.serialize_der()), Some(spki.clone()));
            assert_ne!(pkcs8_ec_public_key(&other.serialize_der()), Some(spki));
        }
        assert_eq!(pkcs8_ec_public_key(b"\x30\x03\x02\x01\x00"), None);
    }

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
