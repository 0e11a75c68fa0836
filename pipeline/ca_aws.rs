//! The factory CA in AWS IoT: registration with proof of possession,
//! auto-registration for JITP and JITR, and what the account holds.

use aws_sdk_iot::types::{AutoRegistrationStatus, CaCertificateStatus, CertificateMode, RegistrationConfig};
use rcgen::DnType;

use crate::aws::{describe, Aws};
use crate::ca::FactoryCa;
use crate::error::{Error, Result};
use crate::keygen::KeyType;

/// How the CA provisions devices that connect with a certificate it signed
/// and that AWS does not know yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutoRegistration {
    /// Devices are registered by provline (`byoca`) or not at all.
    Off,
    /// JITR: unknown certificates become PENDING_ACTIVATION, for `provline approve`.
    Jitr,
    /// JITP with the template given inline, run under `role_arn`.
    JitpBody { template_body: String, role_arn: String },
    /// JITP with a provisioning template of type JITP, by name.
    JitpTemplate(String),
}

#[derive(Clone, Debug)]
pub struct RegisterOptions {
    /// SNI_ONLY: no verification certificate (multi-account registration).
    pub sni_only: bool,
    pub auto: AutoRegistration,
}

/// What AWS holds about the CA.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaState {
    pub certificate_id: String,
    pub certificate_arn: String,
    pub status: String,
    pub auto_registration: String,
    pub certificate_mode: String,
    /// The JITP template: inline body, or the body of the named template.
    pub template_body: Option<String>,
    pub template_name: Option<String>,
    pub role_arn: Option<String>,
    /// Device certificates the CA has in the account, by status.
    pub certificates: std::collections::BTreeMap<String, u64>,
}

impl CaState {
    pub fn auto_registration_on(&self) -> bool {
        self.auto_registration == "ENABLE"
    }

    /// JITP: auto-registration with a template.
    pub fn is_jitp(&self) -> bool {
        self.auto_registration_on() && self.template_body.is_some()
    }
}

fn config_of(auto: &AutoRegistration) -> Option<RegistrationConfig> {
    match auto {
        AutoRegistration::JitpBody {
            template_body,
            role_arn,
        } => Some(
            RegistrationConfig::builder()
                .template_body(template_body)
                .role_arn(role_arn)
                .build(),
        ),
        AutoRegistration::JitpTemplate(name) => Some(RegistrationConfig::builder().template_name(name).build()),
        _ => None,
    }
}

/// Registers the CA (or brings an existing registration to the asked-for
/// settings) and activates it. Idempotent: a second call changes only what
/// differs.
pub async fn register(aws: &Aws, ca: &FactoryCa, opts: &RegisterOptions) -> Result<CaState> {
    let auto_on = opts.auto != AutoRegistration::Off;
    if let Some(existing) = describe_ca(aws, &ca.id).await? {
        tracing::info!(ca = %ca.id, status = %existing.status, "the CA is registered already; updating its settings");
        let mut req = aws
            .iot
            .update_ca_certificate()
            .certificate_id(&ca.id)
            .new_status(CaCertificateStatus::Active)
            .new_auto_registration_status(if auto_on {
                AutoRegistrationStatus::Enable
            } else {
                AutoRegistrationStatus::Disable
            });
        match config_of(&opts.auto) {
            Some(c) => req = req.registration_config(c),
            None if existing.template_body.is_some() || existing.template_name.is_some() => {
                req = req.remove_auto_registration(true)
            }
            None => {}
        }
        req.send()
            .await
            .map_err(|e| Error::infra(format!("UpdateCACertificate {}: {}", ca.id, describe(&e))))?;
    } else {
        let mut req = aws
            .iot
            .register_ca_certificate()
            .ca_certificate(&ca.cert_pem)
            .set_as_active(true)
            .allow_auto_registration(auto_on);
        if opts.sni_only {
            req = req.certificate_mode(CertificateMode::SniOnly);
        } else {
            let code = aws
                .iot
                .get_registration_code()
                .send()
                .await
                .map_err(|e| Error::infra(format!("GetRegistrationCode: {}", describe(&e))))?
                .registration_code()
                .map(String::from)
                .ok_or_else(|| Error::infra("GetRegistrationCode returned no code"))?;
            req = req.verification_certificate(verification_certificate(ca, &code)?);
        }
        if let Some(c) = config_of(&opts.auto) {
            req = req.registration_config(c);
        }
        let out = req
            .send()
            .await
            .map_err(|e| Error::infra(format!("RegisterCACertificate `{}`: {}", ca.subject, describe(&e))))?;
        tracing::info!(ca = out.certificate_id().unwrap_or_default(), "CA registered");
    }
    describe_ca(aws, &ca.id)
        .await?
        .ok_or_else(|| Error::infra(format!("the CA {} is not in the account after registering it", ca.id)))
}

/// The proof of possession AWS asks for: a certificate whose CN is the
/// account's registration code, signed by the CA. Its key is thrown away.
fn verification_certificate(ca: &FactoryCa, code: &str) -> Result<String> {
    let key = KeyType::EcP256
        .generate()
        .map_err(|e| Error::infra(format!("verification key: {e}")))?;
    ca.sign_device(&key, &[(DnType::CommonName, code.to_string())], 1)
        .map_err(|e| Error::infra(format!("signing the verification certificate: {e}")))
}

/// What AWS holds about the CA with this id, or None when it is not registered.
pub async fn describe_ca(aws: &Aws, id: &str) -> Result<Option<CaState>> {
    let out = match aws.iot.describe_ca_certificate().certificate_id(id).send().await {
        Ok(o) => o,
        Err(e) => {
            let text = describe(&e);
            if text.contains("ResourceNotFound") {
                return Ok(None);
            }
            return Err(Error::infra(format!("DescribeCACertificate {id}: {text}")));
        }
    };
    let d = out
        .certificate_description()
        .ok_or_else(|| Error::infra(format!("DescribeCACertificate {id} returned no description")))?;
    let rc = out.registration_config();
    let template_name = rc.and_then(|r| r.template_name()).map(String::from);
    let mut template_body = rc.and_then(|r| r.template_body()).map(String::from);
    if template_body.is_none() {
        if let Some(name) = &template_name {
            let t = aws
                .iot
                .describe_provisioning_template()
                .template_name(name)
                .send()
                .await
                .map_err(|e| Error::infra(format!("DescribeProvisioningTemplate {name}: {}", describe(&e))))?;
            template_body = t.template_body().map(String::from);
        }
    }
    let mut certificates = std::collections::BTreeMap::new();
    for c in list_certificates_by_ca(aws, id).await? {
        *certificates.entry(c.1).or_insert(0) += 1;
    }
    Ok(Some(CaState {
        certificate_id: d.certificate_id().unwrap_or(id).to_string(),
        certificate_arn: d.certificate_arn().unwrap_or_default().to_string(),
        status: d.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
        auto_registration: d
            .auto_registration_status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| "DISABLE".into()),
        certificate_mode: d
            .certificate_mode()
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| "DEFAULT".into()),
        template_body,
        template_name,
        role_arn: rc.and_then(|r| r.role_arn()).map(String::from),
        certificates,
    }))
}

/// Every device certificate AWS holds for the CA: (id, status, arn).
pub async fn list_certificates_by_ca(aws: &Aws, ca_id: &str) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let page = aws
            .iot
            .list_certificates_by_ca()
            .ca_certificate_id(ca_id)
            .page_size(250)
            .set_marker(marker.clone())
            .send()
            .await
            .map_err(|e| Error::infra(format!("ListCertificatesByCA {ca_id}: {}", describe(&e))))?;
        for c in page.certificates() {
            out.push((
                c.certificate_id().unwrap_or_default().to_string(),
                c.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                c.certificate_arn().unwrap_or_default().to_string(),
            ));
        }
        match page.next_marker() {
            Some(m) if !m.is_empty() && Some(m) != marker.as_deref() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    Ok(out)
}
