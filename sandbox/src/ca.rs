//! The sandbox CA, and the X.509 checks AWS IoT applies to CSRs and
//! certificates.
//!
//! Device certificates look like those AWS IoT issues: subject
//! `CN=AWS IoT Certificate`, valid until 2049-12-31T23:59:59Z, a positive
//! random serial, and the CSR's own public key. The certificate id is the
//! lowercase hex SHA-256 of the DER.

use anyhow::Context as _;
use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo as Spki};

use crate::state::{CaRecord, State};

/// Why a CSR or certificate was refused. The text is meant for API callers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CertError {
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("the certificate is not valid: {0}")]
    BadCertificate(String),
    #[error("the key is not valid: {0}")]
    BadKey(String),
    #[error("the signature does not verify: {0}")]
    BadSignature(String),
    #[error("signing the certificate failed: {0}")]
    Signing(String),
}

/// 2049-12-31T23:59:59Z, the end of validity of AWS-issued certificates.
fn aws_not_after() -> OffsetDateTime {
    // 2524607999 is 2049-12-31T23:59:59Z.
    OffsetDateTime::from_unix_timestamp(2_524_607_999).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The CA that signs device certificates made from CSRs.
pub(crate) struct SandboxCa {
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl SandboxCa {
    /// Loads the CA kept in the state, or makes one and stores it there.
    pub fn load_or_create(state: &mut State) -> anyhow::Result<SandboxCa> {
        if let Some(record) = &state.ca {
            let key =
                KeyPair::from_pem(&record.private_key_pem).context("reading the sandbox CA key from the state")?;
            let issuer = Issuer::from_ca_cert_pem(&record.certificate_pem, key)
                .context("reading the sandbox CA certificate from the state")?;
            return Ok(SandboxCa {
                certificate_pem: record.certificate_pem.clone(),
                issuer,
            });
        }

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the sandbox CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "provline sandbox");
        dn.push(DnType::CommonName, "provline sandbox device CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = aws_not_after() + time::Duration::days(3653);
        let serial = crate::ids::serial(state.take_id(), "ca-serial", 0);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let certificate = params.self_signed(&key).context("signing the sandbox CA certificate")?;

        let record = CaRecord {
            certificate_pem: certificate.pem(),
            private_key_pem: key.serialize_pem(),
        };
        state.ca = Some(record.clone());
        Ok(SandboxCa {
            certificate_pem: record.certificate_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// Issues a device certificate for a verified CSR.
    pub fn issue(&self, csr: &VerifiedCsr, serial: [u8; 16]) -> Result<ParsedCertificate, CertError> {
        let spki = SubjectPublicKeyInfo::from_der(&csr.spki_der).map_err(|e| CertError::BadKey(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "AWS IoT Certificate");
        params.distinguished_name = dn;
        // Whole seconds, so notBefore reads the same in DER and in the API.
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::nanoseconds(i64::from(now.nanosecond()));
        params.not_after = aws_not_after();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(&spki, &self.issuer)
            .map_err(|e| CertError::Signing(e.to_string()))?;
        parse_certificate(&certificate.pem())
    }
}

/// A TLS server certificate and its key, as DER.
pub(crate) struct ServerCertificate {
    pub certificate_der: Vec<u8>,
    /// PKCS#8.
    pub private_key_der: Vec<u8>,
}

impl SandboxCa {
    /// Issues a server certificate for a fresh P-256 key, valid for a year,
    /// for these subject alternative names (an IP address string becomes an
    /// IP SAN); the first name is also the common name.
    pub fn issue_server_certificate(&self, names: &[String]) -> anyhow::Result<ServerCertificate> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the server key")?;
        let mut params = CertificateParams::new(names.to_vec()).context("the server certificate names")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "provline sandbox");
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let nanos = now.unix_timestamp_nanos() as u64;
        params.serial_number = Some(SerialNumber::from_slice(&crate::ids::serial(nanos, "server-serial", 0)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .context("signing the server certificate")?;
        Ok(ServerCertificate {
            certificate_der: certificate.der().to_vec(),
            private_key_der: key.serialize_der(),
        })
    }
}

/// A CSR whose signature verified and whose key AWS IoT accepts.
pub(crate) struct VerifiedCsr {
    /// The DER of its SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
}

/// Decodes the first PEM block of `text` whose label is one of `labels`.
fn decode_pem(text: &str, labels: &[&str]) -> Result<Vec<u8>, String> {
    let pem = pem::parse(text.replace("\r\n", "\n")).map_err(|e| format!("no PEM block: {e}"))?;
    if !labels.contains(&pem.tag()) {
        return Err(format!("unexpected PEM label `{}`", pem.tag()));
    }
    Ok(pem.into_contents())
}

/// Parses a CSR, checks its key and verifies its signature (proof of
/// possession of the private key).
pub(crate) fn verify_csr(pem: &str) -> Result<VerifiedCsr, CertError> {
    let der = decode_pem(pem, &["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"]).map_err(CertError::BadCsr)?;
    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CertError::BadCsr(format!("cannot parse the DER: {e}")))?;
    if !rest.is_empty() {
        return Err(CertError::BadCsr("trailing bytes after the DER".to_owned()));
    }
    let info = &csr.certification_request_info;
    check_key(&info.subject_pki)?;
    verify_signature(
        &info.subject_pki,
        &csr.signature_algorithm,
        &csr.signature_value.data,
        info.raw,
    )?;
    Ok(VerifiedCsr {
        spki_der: info.subject_pki.raw.to_vec(),
    })
}

/// A certificate as the registry records it.
#[derive(Clone, Debug)]
pub(crate) struct ParsedCertificate {
    /// Normalised PEM (LF line ends, standard label).
    pub pem: String,
    pub der: Vec<u8>,
    /// Lowercase hex SHA-256 of the DER.
    pub id: String,
    pub not_before: f64,
    pub not_after: f64,
}

/// The certificate id AWS IoT gives a certificate.
pub(crate) fn certificate_id(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses a certificate PEM and checks its key.
pub(crate) fn parse_certificate(pem: &str) -> Result<ParsedCertificate, CertError> {
    let der = decode_pem(pem, &["CERTIFICATE"]).map_err(CertError::BadCertificate)?;
    parse_certificate_der(&der)
}

/// Parses a certificate DER and checks its key.
pub(crate) fn parse_certificate_der(der: &[u8]) -> Result<ParsedCertificate, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::BadCertificate(format!("cannot parse the DER: {e}")))?;
    if !rest.is_empty() {
        return Err(CertError::BadCertificate("trailing bytes after the DER".to_owned()));
    }
    check_key(cert.public_key())?;
    let validity = cert.validity();
    let parsed = ParsedCertificate {
        pem: to_pem("CERTIFICATE", der),
        id: certificate_id(der),
        not_before: validity.not_before.timestamp() as f64,
        not_after: validity.not_after.timestamp() as f64,
        der: der.to_vec(),
    };
    Ok(parsed)
}

/// Whether `cert_der` carries a valid signature made by the key of `ca_der`.
pub(crate) fn is_signed_by(cert_der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok((_, cert)), Ok((_, ca))) = (X509Certificate::from_der(cert_der), X509Certificate::from_der(ca_der)) else {
        return false;
    };
    cert.issuer() == ca.subject()
        && verify_signature(
            ca.public_key(),
            &cert.signature_algorithm,
            &cert.signature_value.data,
            cert.tbs_certificate.as_ref(),
        )
        .is_ok()
}

/// Whether `cert_der` is self-signed and says it is a CA.
pub(crate) fn is_ca_certificate(cert_der: &[u8]) -> bool {
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return false;
    };
    cert.is_ca()
}

/// The common name of a certificate's subject, if it has one.
pub(crate) fn common_name(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The subject attributes JITP turns into `AWS::IoT::Certificate::*`
/// parameters, by the name after that prefix (`Country`, `Organization`,
/// `OrganizationalUnit`, `DistinguishedNameQualifier`, `StateName`,
/// `CommonName`, `SerialNumber`). The first value of each attribute counts;
/// the issuer, the extensions and the certificate's own serial number do not.
pub(crate) fn subject_parameters(cert_der: &[u8]) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return out;
    };
    for attribute in cert.subject().iter_attributes() {
        let name = match attribute.attr_type().to_id_string().as_str() {
            "2.5.4.6" => "Country",
            "2.5.4.10" => "Organization",
            "2.5.4.11" => "OrganizationalUnit",
            "2.5.4.46" => "DistinguishedNameQualifier",
            "2.5.4.8" => "StateName",
            "2.5.4.3" => "CommonName",
            "2.5.4.5" => "SerialNumber",
            _ => continue,
        };
        if let Ok(value) = attribute.as_str() {
            out.entry(name).or_insert_with(|| value.to_owned());
        }
    }
    out
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";

/// The curve OID of an EC key, as a dotted string.
fn ec_curve(algorithm: &AlgorithmIdentifier<'_>) -> Option<String> {
    let params = algorithm.parameters.as_ref()?;
    params.as_oid().ok().map(|oid| oid.to_id_string())
}

/// Accepts RSA keys of at least 2048 bits and EC keys on P-256, P-384 and
/// P-521, as AWS IoT does; refuses everything else (Ed25519, secp256k1...).
fn check_key(spki: &Spki<'_>) -> Result<(), CertError> {
    const ALLOWED: &str = "AWS IoT accepts RSA keys of at least 2048 bits and EC keys on P-256, P-384 or P-521";
    match spki.algorithm.algorithm.to_id_string().as_str() {
        OID_RSA_ENCRYPTION => {
            let bits = spki
                .parsed()
                .map_err(|e| CertError::BadKey(format!("cannot parse the RSA key: {e}")))?
                .key_size();
            if bits < 2048 {
                return Err(CertError::BadKey(format!("RSA key of {bits} bits; {ALLOWED}")));
            }
            Ok(())
        }
        OID_EC_PUBLIC_KEY => match ec_curve(&spki.algorithm).as_deref() {
            Some(OID_P256 | OID_P384 | OID_P521) => Ok(()),
            Some(curve) => Err(CertError::BadKey(format!("EC key on curve {curve}; {ALLOWED}"))),
            None => Err(CertError::BadKey(format!("EC key without a named curve; {ALLOWED}"))),
        },
        "1.3.101.112" => Err(CertError::BadKey(format!("Ed25519 key; {ALLOWED}"))),
        other => Err(CertError::BadKey(format!("key of algorithm {other}; {ALLOWED}"))),
    }
}

/// Verifies `signature` over `message` with the key in `spki`.
fn verify_signature(
    spki: &Spki<'_>,
    algorithm: &AlgorithmIdentifier<'_>,
    signature: &[u8],
    message: &[u8],
) -> Result<(), CertError> {
    use aws_lc_rs::signature as sig;

    let sig_oid = algorithm.algorithm.to_id_string();
    let curve = ec_curve(&spki.algorithm);
    let verifier: &dyn sig::VerificationAlgorithm = match (sig_oid.as_str(), curve.as_deref()) {
        ("1.2.840.113549.1.1.11", _) => &sig::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.12", _) => &sig::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.13", _) => &sig::RSA_PKCS1_2048_8192_SHA512,
        ("1.2.840.10045.4.3.2", Some(OID_P256)) => &sig::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some(OID_P256)) => &sig::ECDSA_P256_SHA384_ASN1,
        ("1.2.840.10045.4.3.4", Some(OID_P256)) => &sig::ECDSA_P256_SHA512_ASN1,
        ("1.2.840.10045.4.3.2", Some(OID_P384)) => &sig::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some(OID_P384)) => &sig::ECDSA_P384_SHA384_ASN1,
        ("1.2.840.10045.4.3.4", Some(OID_P384)) => &sig::ECDSA_P384_SHA512_ASN1,
        ("1.2.840.10045.4.3.2", Some(OID_P521)) => &sig::ECDSA_P521_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some(OID_P521)) => &sig::ECDSA_P521_SHA384_ASN1,
        ("1.2.840.10045.4.3.4", Some(OID_P521)) => &sig::ECDSA_P521_SHA512_ASN1,
        (oid, _) => {
            return Err(CertError::BadSignature(format!(
                "unsupported signature algorithm {oid}"
            )))
        }
    };
    sig::UnparsedPublicKey::new(verifier, &spki.subject_public_key.data)
        .verify(message, signature)
        .map_err(|_| CertError::BadSignature("signature check failed".to_owned()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh P-256 key and its CSR PEM.
    pub(crate) fn p256_csr() -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        (key, csr)
    }

    #[test]
    fn issues_aws_like_certificates() {
        let mut state = State::default();
        let ca = SandboxCa::load_or_create(&mut state).unwrap();
        let (key, csr) = p256_csr();
        let verified = verify_csr(&csr).unwrap();
        let issued = ca.issue(&verified, crate::ids::serial(1, "t", 1)).unwrap();

        let (_, cert) = X509Certificate::from_der(&issued.der).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=AWS IoT Certificate");
        assert_eq!(cert.validity().not_after.timestamp(), 2_524_607_999);
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw());
        assert_eq!(issued.id, hex::encode(Sha256::digest(&issued.der)));
        let ca_der = decode_pem(ca.certificate_pem(), &["CERTIFICATE"]).unwrap();
        assert!(is_signed_by(&issued.der, &ca_der));
        assert!(is_ca_certificate(&ca_der));

        // The CA survives a round trip through the state.
        let again = SandboxCa::load_or_create(&mut state).unwrap();
        assert_eq!(again.certificate_pem(), ca.certificate_pem());
    }

    #[test]
    fn verifies_other_accepted_keys() {
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ECDSA_P521_SHA512] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            assert!(verify_csr(&csr).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn refuses_ed25519_and_tampered_csrs() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert!(matches!(verify_csr(&csr), Err(CertError::BadKey(_))));

        let (_, csr) = p256_csr();
        let mut der = decode_pem(&csr, &["CERTIFICATE REQUEST"]).unwrap();
        let last = der.len() - 10;
        der[last] ^= 0x01;
        let tampered = to_pem("CERTIFICATE REQUEST", &der);
        assert!(verify_csr(&tampered).is_err());
        assert!(verify_csr("not a csr").is_err());
    }

    #[test]
    fn subject_parameters_come_from_the_subject() {
        let mut state = State::default();
        let ca = SandboxCa::load_or_create(&mut state).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "DE");
        dn.push(DnType::OrganizationName, "Maker");
        dn.push(DnType::OrganizationalUnitName, "Line 3");
        dn.push(DnType::StateOrProvinceName, "Bavaria");
        dn.push(DnType::LocalityName, "Munich");
        dn.push(DnType::CommonName, "dev-7");
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 5]), "SN-0007");
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 46]), "q1");
        params.distinguished_name = dn;
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let found = subject_parameters(cert.der());
        let expected: BTreeMap<&str, String> = [
            ("Country", "DE"),
            ("Organization", "Maker"),
            ("OrganizationalUnit", "Line 3"),
            ("StateName", "Bavaria"),
            ("CommonName", "dev-7"),
            ("SerialNumber", "SN-0007"),
            ("DistinguishedNameQualifier", "q1"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        assert_eq!(found, expected);
        assert!(subject_parameters(b"not a certificate").is_empty());
    }

    #[test]
    fn server_certificates_name_the_endpoint() {
        let mut state = State::default();
        let ca = SandboxCa::load_or_create(&mut state).unwrap();
        let names = ["a-ats.iot.us-east-1.localhost", "localhost", "127.0.0.1"].map(str::to_owned);
        let server = ca.issue_server_certificate(&names).unwrap();
        let (_, cert) = X509Certificate::from_der(&server.certificate_der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let rendered: Vec<String> = san.value.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            rendered,
            [
                "DNSName(a-ats.iot.us-east-1.localhost)",
                "DNSName(localhost)",
                "IPAddress(7f:00:00:01)"
            ]
        );
        let ca_der = decode_pem(ca.certificate_pem(), &["CERTIFICATE"]).unwrap();
        assert!(is_signed_by(&server.certificate_der, &ca_der));
        assert!(!cert.is_ca());
    }

    #[test]
    fn accepts_crlf_and_legacy_label() {
        let (_, csr) = p256_csr();
        assert!(verify_csr(&csr.replace('\n', "\r\n")).is_ok());
        let legacy = csr.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        assert!(verify_csr(&legacy).is_ok());
    }
}
