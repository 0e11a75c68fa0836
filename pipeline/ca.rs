//! The factory's own CA: made here (`ca init`) or brought (`ca import`),
//! registered with AWS IoT (`ca register`), and used to sign device
//! certificates for the `byoca`, `jitp` and `jitr` modes.
//!
//! A CA directory holds `ca.pem.crt` (the CA that signs devices), `ca.pem.key`
//! (0600) and, for an intermediate CA, `chain.pem.crt` with the certificates
//! above it, nearest first.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::crypto::{certificate_id, to_pem, KeyId};
use crate::error::{Error, Result};
use crate::keygen::KeyType;
use crate::workspace::write_durable;

pub const CA_CERT_FILE: &str = "ca.pem.crt";
pub const CA_KEY_FILE: &str = "ca.pem.key";
pub const CHAIN_FILE: &str = "chain.pem.crt";

/// The subject fields JITP reads from a certificate, by the parameter name
/// AWS gives them (`AWS::IoT::Certificate::<name>`), with their OIDs and the
/// attribute name a profile's `[certificate.subject]` uses for them.
pub const SUBJECT_PARAMETERS: [(&str, &[u64], &str); 7] = [
    ("Country", &[2, 5, 4, 6], "C"),
    ("Organization", &[2, 5, 4, 10], "O"),
    ("OrganizationalUnit", &[2, 5, 4, 11], "OU"),
    ("DistinguishedNameQualifier", &[2, 5, 4, 46], "dnQualifier"),
    ("StateName", &[2, 5, 4, 8], "ST"),
    ("CommonName", &[2, 5, 4, 3], "CN"),
    ("SerialNumber", &[2, 5, 4, 5], "serialNumber"),
];

/// What `ca init` makes.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub key_type: KeyType,
    pub common_name: String,
    pub organization: Option<String>,
    pub country: Option<String>,
    pub validity_days: u32,
}

/// A CA that can sign device certificates.
pub struct FactoryCa {
    pub dir: PathBuf,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    /// Certificates above this CA, nearest first (empty for a root).
    pub chain: Vec<String>,
    /// SHA-256 of the CA certificate's DER: its id in AWS IoT.
    pub id: String,
    pub subject: String,
    pub not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for FactoryCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FactoryCa")
            .field("dir", &self.dir)
            .field("id", &self.id)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    // Positive and at most 20 octets, as RFC 5280 asks: 16 random bytes with
    // the top bit clear and a non-zero first byte (so DER keeps all 16).
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 0x01;
    }
    SerialNumber::from_slice(&bytes)
}

fn cfg(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::config(format!("{}: {e}", path.display()))
}

/// Makes a new CA in `dir`: a self-signed root allowed to sign end-entity
/// certificates only (path length 0), key usage keyCertSign + cRLSign.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<FactoryCa> {
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() || dir.join(CA_CERT_FILE).exists() {
        return Err(Error::config(format!(
            "{} already holds a CA; provline never overwrites a CA key (remove the directory first, or use another --dir)",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| cfg(dir, e))?;
    let key = opts
        .key_type
        .generate()
        .map_err(|e| Error::infra(format!("CA key generation failed: {e}")))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| Error::infra(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    if let Some(c) = &opts.country {
        if c.len() != 2 || !c.chars().all(|ch| ch.is_ascii_uppercase()) {
            return Err(Error::config(format!(
                "--country `{c}` must be a two-letter ISO 3166 code in capitals, such as DE"
            )));
        }
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString(c.as_str().try_into().map_err(|_| Error::config("country"))?),
        );
    }
    if let Some(o) = &opts.organization {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    dn.push(DnType::CommonName, opts.common_name.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(opts.validity_days.into());
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::infra(format!("signing the CA certificate: {e}")))?;
    write_durable(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(|e| cfg(&key_path, e))?;
    let cert_path = dir.join(CA_CERT_FILE);
    write_durable(&cert_path, cert.pem().as_bytes(), 0o644).map_err(|e| cfg(&cert_path, e))?;
    load(dir)
}

fn pem_blocks(path: &Path, text: &str, tag: &str) -> Result<Vec<Vec<u8>>> {
    let blocks = ::pem::parse_many(text.as_bytes()).map_err(|e| cfg(path, format!("not PEM: {e}")))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == tag)
        .map(|b| b.into_contents())
        .collect())
}

fn parse_cert<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| cfg(path, format!("the certificate does not parse: {e}")))
}

/// Checks that a certificate can act as a device-issuing CA.
fn check_is_ca(path: &Path, cert: &X509Certificate<'_>) -> Result<()> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| cfg(path, format!("basicConstraints: {e}")))?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(cfg(
            path,
            format!(
                "`{}` is not a CA certificate (basicConstraints CA:TRUE is missing); AWS IoT registers only CA certificates",
                cert.subject()
            ),
        ));
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(cfg(
                path,
                "the CA certificate's key usage lacks keyCertSign, so it cannot sign device certificates",
            ));
        }
    }
    Ok(())
}

/// Takes an existing CA (certificate, key and, for an intermediate, the chain
/// above it) into `dir`, after checking that they belong together.
pub fn import(dir: &Path, cert: &Path, key: &Path, chain: Option<&Path>) -> Result<FactoryCa> {
    if dir.join(CA_KEY_FILE).exists() {
        return Err(Error::config(format!(
            "{} already holds a CA; import into an empty directory",
            dir.display()
        )));
    }
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| cfg(p, e));
    let cert_text = read(cert)?;
    let mut ders = pem_blocks(cert, &cert_text, "CERTIFICATE")?;
    if ders.is_empty() {
        return Err(cfg(cert, "no CERTIFICATE block"));
    }
    // A file with the CA first and its issuers after it is accepted as both.
    let mut chain_ders = ders.split_off(1);
    if let Some(chain) = chain {
        let t = read(chain)?;
        chain_ders.extend(pem_blocks(chain, &t, "CERTIFICATE")?);
    }
    let ca_der = ders.remove(0);
    let ca = parse_cert(cert, &ca_der)?;
    check_is_ca(cert, &ca)?;
    let key_text = read(key)?;
    let kp = KeyPair::from_pem(&key_text).map_err(|e| {
        cfg(
            key,
            format!("the key does not parse ({e}); give an unencrypted PKCS#8 or SEC1 PEM key"),
        )
    })?;
    let held = KeyId::from_spki_der(&kp.subject_public_key_info()).map_err(|e| cfg(key, e))?;
    if held != KeyId::from_spki(ca.public_key()) {
        return Err(cfg(
            key,
            format!("this key does not belong to the CA certificate {}", cert.display()),
        ));
    }
    // Each certificate must be signed by the next one.
    let mut below = ca.clone();
    let mut below_name = cert.display().to_string();
    for (i, der) in chain_ders.iter().enumerate() {
        let p = chain.unwrap_or(cert);
        let up = parse_cert(p, der)?;
        check_is_ca(p, &up)?;
        if below.verify_signature(Some(up.public_key())).is_err() {
            return Err(cfg(
                p,
                format!(
                    "chain certificate {} (`{}`) did not sign `{}` ({below_name}); order the chain from the CA's issuer up to the root",
                    i + 1,
                    up.subject(),
                    below.subject()
                ),
            ));
        }
        below_name = format!("chain certificate {}", i + 1);
        below = up;
    }
    std::fs::create_dir_all(dir).map_err(|e| cfg(dir, e))?;
    let kp_path = dir.join(CA_KEY_FILE);
    write_durable(&kp_path, kp.serialize_pem().as_bytes(), 0o600).map_err(|e| cfg(&kp_path, e))?;
    let cp = dir.join(CA_CERT_FILE);
    write_durable(&cp, to_pem("CERTIFICATE", &ca_der).as_bytes(), 0o644).map_err(|e| cfg(&cp, e))?;
    if !chain_ders.is_empty() {
        let text: String = chain_ders.iter().map(|d| to_pem("CERTIFICATE", d)).collect();
        let chp = dir.join(CHAIN_FILE);
        write_durable(&chp, text.as_bytes(), 0o644).map_err(|e| cfg(&chp, e))?;
    }
    load(dir)
}

/// Loads the CA kept in `dir`.
pub fn load(dir: &Path) -> Result<FactoryCa> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_text = std::fs::read_to_string(&cert_path).map_err(|e| {
        cfg(
            &cert_path,
            format!(
                "{e}; make a CA with `provline ca init --dir {}` or bring one with `provline ca import`",
                dir.display()
            ),
        )
    })?;
    let key_text = std::fs::read_to_string(&key_path).map_err(|e| cfg(&key_path, e))?;
    let der = pem_blocks(&cert_path, &cert_text, "CERTIFICATE")?
        .into_iter()
        .next()
        .ok_or_else(|| cfg(&cert_path, "no CERTIFICATE block"))?;
    let parsed = parse_cert(&cert_path, &der)?;
    check_is_ca(&cert_path, &parsed)?;
    let subject = parsed.subject().to_string();
    let not_after = parsed.validity().not_after.to_datetime();
    let kp = KeyPair::from_pem(&key_text).map_err(|e| cfg(&key_path, e))?;
    let held = KeyId::from_spki_der(&kp.subject_public_key_info()).map_err(|e| cfg(&key_path, e))?;
    if held != KeyId::from_spki(parsed.public_key()) {
        return Err(cfg(
            &key_path,
            format!("the key does not belong to {}", cert_path.display()),
        ));
    }
    let chain_path = dir.join(CHAIN_FILE);
    let chain = match std::fs::read_to_string(&chain_path) {
        Ok(t) => pem_blocks(&chain_path, &t, "CERTIFICATE")?
            .iter()
            .map(|d| to_pem("CERTIFICATE", d))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(cfg(&chain_path, e)),
    };
    let issuer = Issuer::from_ca_cert_der(&der.clone().into(), kp)
        .map_err(|e| cfg(&cert_path, format!("cannot sign with this CA: {e}")))?;
    Ok(FactoryCa {
        dir: dir.to_path_buf(),
        cert_pem: to_pem("CERTIFICATE", &der),
        id: certificate_id(&der),
        cert_der: der,
        chain,
        subject,
        not_after,
        issuer,
    })
}

/// One subject field of a device certificate: its attribute type and value.
pub type SubjectField = (DnType, String);

impl FactoryCa {
    /// The CA and everything above it, leaf-most first, as PEM.
    pub fn chain_pem(&self) -> String {
        let mut s = self.cert_pem.clone();
        for c in &self.chain {
            s.push_str(c);
        }
        s
    }

    /// Signs a device certificate for `public_key` with the given subject,
    /// valid from an hour ago for `validity_days` (but never past the CA).
    pub fn sign_device(
        &self,
        public_key: &impl PublicKeyData,
        subject: &[SubjectField],
        validity_days: u32,
    ) -> std::result::Result<String, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        for (ty, v) in subject {
            if *ty == DnType::CountryName {
                let p = v
                    .as_str()
                    .try_into()
                    .map_err(|_| format!("country `{v}` is not a PrintableString"))?;
                dn.push(ty.clone(), DnValue::PrintableString(p));
            } else {
                dn.push(ty.clone(), v.as_str());
            }
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = (now + Duration::days(validity_days.into())).min(self.not_after);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(public_key, &self.issuer).map_err(|e| e.to_string())?;
        Ok(cert.pem())
    }
}

/// The `AWS::IoT::Certificate::*` parameters a JITP template reads, with
/// whether each has a Default (then a missing subject field is not fatal).
pub fn template_subject_parameters(template_body: &str) -> Result<Vec<(String, bool)>> {
    let v: serde_json::Value = serde_json::from_str(template_body)
        .map_err(|e| Error::config(format!("the CA's provisioning template is not JSON: {e}")))?;
    let mut out = Vec::new();
    if let Some(params) = v.get("Parameters").and_then(|p| p.as_object()) {
        for (name, decl) in params {
            if let Some(field) = name.strip_prefix("AWS::IoT::Certificate::") {
                if field == "Id" {
                    continue;
                }
                out.push((field.to_string(), decl.get("Default").is_some()));
            }
        }
    }
    Ok(out)
}

/// Checks that a certificate's subject has every field the template reads
/// without a Default; returns the missing ones.
pub fn missing_subject_fields(cert_pem: &str, wanted: &[(String, bool)]) -> std::result::Result<Vec<String>, String> {
    let info = crate::crypto::parse_certificate_pem(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&info.der).map_err(|e| e.to_string())?;
    let mut missing = Vec::new();
    for (field, has_default) in wanted {
        if *has_default {
            continue;
        }
        let Some((_, oid, _)) = SUBJECT_PARAMETERS.iter().find(|(n, _, _)| n == field) else {
            missing.push(format!("{field} (AWS fills no such certificate field)"));
            continue;
        };
        let present = cert.subject().iter_attributes().any(|a| {
            a.attr_type().iter().is_some_and(|arcs| arcs.eq(oid.iter().copied()))
                && a.as_str().is_ok_and(|s| !s.is_empty())
        });
        if !present {
            missing.push(field.clone());
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> InitOptions {
        InitOptions {
            key_type: KeyType::EcP256,
            common_name: "Acme Line 3 CA".into(),
            organization: Some("Acme".into()),
            country: Some("DE".into()),
            validity_days: 3650,
        }
    }

    #[test]
    fn init_makes_a_constrained_ca_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), &opts()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (_, c) = X509Certificate::from_der(&ca.cert_der).unwrap();
        let bc = c.basic_constraints().unwrap().unwrap().value.clone();
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        assert!(c.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(ca.subject, "C=DE, O=Acme, CN=Acme Line 3 CA");
        assert!(init(dir.path(), &opts())
            .unwrap_err()
            .to_string()
            .contains("already holds a CA"));
    }

    #[test]
    fn device_certificates_verify_and_have_positive_serials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), &opts()).unwrap();
        let key = KeyType::EcP256.generate().unwrap();
        let subject = vec![
            (DnType::CountryName, "DE".to_string()),
            (DnType::CommonName, "SN-1".to_string()),
            (DnType::CustomDnType(vec![2, 5, 4, 5]), "0001".to_string()),
        ];
        let pem = ca.sign_device(&key, &subject, 365).unwrap();
        let info = crate::crypto::parse_certificate_pem(&pem).unwrap();
        let (_, c) = X509Certificate::from_der(&info.der).unwrap();
        let (_, issuer) = X509Certificate::from_der(&ca.cert_der).unwrap();
        assert!(c.verify_signature(Some(issuer.public_key())).is_ok());
        let serial = c.raw_serial();
        assert!(serial.len() <= 20 && serial[0] & 0x80 == 0 && serial[0] != 0);
        assert_eq!(info.subject, "C=DE, CN=SN-1, serialNumber=0001");
        let wanted = vec![
            ("Country".to_string(), false),
            ("SerialNumber".to_string(), false),
            ("Organization".to_string(), false),
            ("StateName".to_string(), true),
        ];
        assert_eq!(
            missing_subject_fields(&pem, &wanted).unwrap(),
            vec!["Organization".to_string()]
        );
    }

    #[test]
    fn import_refuses_a_key_of_another_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(a.path(), &opts()).unwrap();
        init(b.path(), &opts()).unwrap();
        let target = tempfile::tempdir().unwrap();
        let err = import(
            &target.path().join("ca"),
            &a.path().join(CA_CERT_FILE),
            &b.path().join(CA_KEY_FILE),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not belong to the CA certificate"), "{err}");
        let ok = import(
            &target.path().join("ca"),
            &a.path().join(CA_CERT_FILE),
            &a.path().join(CA_KEY_FILE),
            None,
        )
        .unwrap();
        assert_eq!(ok.id, load(a.path()).unwrap().id);
    }

    #[test]
    fn import_takes_an_intermediate_with_its_chain_and_refuses_a_wrong_one() {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |cn: &str, issuer: Option<&Issuer<'_, KeyPair>>| {
            let key = KeyType::EcP256.generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = match issuer {
                Some(i) => p.signed_by(&key, i).unwrap(),
                None => p.self_signed(&key).unwrap(),
            };
            (cert.pem(), key)
        };
        let (root_pem, root_key) = mk("Corp Root", None);
        let root = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let (int_pem, int_key) = mk("Corp Line CA", Some(&root));
        let (other_pem, _) = mk("Someone Else", None);
        let w = |n: &str, t: &str| {
            let p = tmp.path().join(n);
            std::fs::write(&p, t).unwrap();
            p
        };
        let (ic, ik, rc, oc) = (
            w("int.crt", &int_pem),
            w("int.key", &int_key.serialize_pem()),
            w("root.crt", &root_pem),
            w("other.crt", &other_pem),
        );
        let err = import(&tmp.path().join("bad"), &ic, &ik, Some(&oc))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not sign"), "{err}");
        let ca = import(&tmp.path().join("good"), &ic, &ik, Some(&rc)).unwrap();
        assert_eq!(ca.chain.len(), 1);
        assert_eq!(ca.chain_pem().matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(ca.subject, "CN=Corp Line CA");
        let device = KeyType::EcP256.generate().unwrap();
        let pem = ca
            .sign_device(&device, &[(DnType::CommonName, "SN-9".into())], 10)
            .unwrap();
        assert!(crate::crypto::parse_certificate_pem(&pem)
            .unwrap()
            .issuer
            .contains("Corp Line CA"));
    }
}
