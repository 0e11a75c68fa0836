//! Keygen: a key pair and a CSR per device, in parallel.
//!
//! Rows that carry a device-made CSR get no key: their CSR (already checked
//! at ingest) is used as it is.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};

use crate::crypto::KeyId;
use crate::ingest::Device;

/// The key types provline generates. All are accepted by AWS IoT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    #[default]
    #[value(name = "ec-p256")]
    EcP256,
    #[value(name = "ec-p384")]
    EcP384,
    #[value(name = "rsa-2048")]
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[value(name = "rsa-3072")]
    #[serde(rename = "rsa-3072")]
    Rsa3072,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
        }
    }

    pub fn generate(self) -> Result<KeyPair, rcgen::Error> {
        match self {
            KeyType::EcP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
            KeyType::Rsa3072 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ec-p256" => Ok(KeyType::EcP256),
            "ec-p384" => Ok(KeyType::EcP384),
            "rsa-2048" => Ok(KeyType::Rsa2048),
            "rsa-3072" => Ok(KeyType::Rsa3072),
            other => Err(format!(
                "unknown key type `{other}` (ec-p256, ec-p384, rsa-2048, rsa-3072)"
            )),
        }
    }
}

/// A private key in PEM form. It prints as `<private key>` so it cannot reach
/// a log line by accident.
#[derive(Clone)]
pub struct SecretPem(pub String);

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<private key>")
    }
}

/// What keygen made (or took) for one device.
#[derive(Clone, Debug)]
pub struct Keyed {
    /// None for a device-made CSR: the key never left the device.
    pub key_pem: Option<SecretPem>,
    /// Empty when the factory CA signed the certificate (no CSR is sent).
    pub csr_pem: String,
    /// The device certificate signed by the factory CA (own-CA modes).
    pub certificate_pem: Option<String>,
    pub key: KeyId,
    pub key_type: String,
}

/// One key pair and a CSR whose subject CN is the thing name.
pub fn generate_one(thing_name: &str, key_type: KeyType) -> Result<Keyed, rcgen::Error> {
    let key = key_type.generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, thing_name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    let spki = key.subject_public_key_info();
    Ok(Keyed {
        key_pem: Some(SecretPem(key.serialize_pem())),
        csr_pem: csr.pem()?,
        certificate_pem: None,
        key: KeyId::from_spki_der(&spki).map_err(|_| rcgen::Error::CouldNotParseKeyPair)?,
        key_type: key_type.as_str().to_string(),
    })
}

/// The factory CA and how its device certificates look, for the own-CA modes.
pub struct Signer<'a> {
    pub ca: &'a crate::ca::FactoryCa,
    pub spec: &'a crate::profile::CertificateSpec,
}

/// A key pair and a certificate signed by the factory CA; no CSR is made.
pub fn generate_signed(d: &Device, key_type: KeyType, signer: &Signer<'_>) -> Result<Keyed, String> {
    let subject = signer.spec.subject_for(&d.thing_name, &d.values)?;
    let days = signer.spec.validity_days;
    match &d.csr {
        Some(csr) => {
            let req = rcgen::CertificateSigningRequestParams::from_pem(&csr.pem)
                .map_err(|e| format!("the device CSR does not parse: {e}"))?;
            let pem = signer.ca.sign_device(&req.public_key, &subject, days)?;
            Ok(Keyed {
                key_pem: None,
                csr_pem: String::new(),
                certificate_pem: Some(pem),
                key: csr.key.clone(),
                key_type: csr.key_type.clone(),
            })
        }
        None => {
            let key = key_type.generate().map_err(|e| e.to_string())?;
            let pem = signer.ca.sign_device(&key, &subject, days)?;
            let spki = key.subject_public_key_info();
            Ok(Keyed {
                key_pem: Some(SecretPem(key.serialize_pem())),
                csr_pem: String::new(),
                certificate_pem: Some(pem),
                key: KeyId::from_spki_der(&spki)?,
                key_type: key_type.as_str().to_string(),
            })
        }
    }
}

/// Keys for every device, in parallel on rayon's pool, in device order;
/// with a signer, each also gets its certificate from the factory CA.
pub fn generate_all(devices: &[Device], key_type: KeyType, signer: Option<&Signer<'_>>) -> Vec<Result<Keyed, String>> {
    devices
        .par_iter()
        .map(|d| match (signer, &d.csr) {
            (Some(s), _) => generate_signed(d, key_type, s)
                .map_err(|e| format!("signing a certificate for `{}` failed: {e}", d.thing_name)),
            (None, Some(csr)) => Ok(Keyed {
                key_pem: None,
                csr_pem: csr.pem.clone(),
                certificate_pem: None,
                key: csr.key.clone(),
                key_type: csr.key_type.clone(),
            }),
            (None, None) => generate_one(&d.thing_name, key_type)
                .map_err(|e| format!("key generation failed for `{}`: {e}", d.thing_name)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_the_thing_name_and_the_key() {
        let k = generate_one("SN-1", KeyType::EcP256).unwrap();
        let checked = crate::csr::check_csr(&k.csr_pem).unwrap();
        assert_eq!(checked.key, k.key);
        assert_eq!(checked.subject, "CN=SN-1");
        assert_eq!(format!("{:?}", k.key_pem.unwrap()), "<private key>");
    }
}
