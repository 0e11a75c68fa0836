//! What AWS IoT decides when a device presents a client certificate on the
//! data endpoint: let a registered, active certificate in; register an
//! unknown one signed by a CA with auto-registration (JITR), and provision
//! it with the CA's template if it has one (JITP); refuse everything else.

use serde_json::{Map, Value};

use crate::ca::{self, ParsedCertificate};
use crate::state::{self, State};
use crate::{ids, Shared, ACCOUNT_ID};

use super::provision::provision;
use super::registry::{self, Ctx};
use super::template::{CertSource, Override, Pseudo, Template};

/// Prefix of the certificate-derived template parameters.
const PARAMETER_PREFIX: &str = "AWS::IoT::Certificate::";

/// The verdict on a connection.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Admission {
    /// Registered and ACTIVE, and so is its CA if it has one: speak MQTT.
    Accept,
    /// Close the connection without an MQTT answer.
    Drop(Refusal),
}

/// Why a connection is dropped after the handshake.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Refusal {
    /// The certificate cannot be parsed or has a key AWS IoT refuses.
    BadCertificate(String),
    /// Registered, but not ACTIVE (PENDING_ACTIVATION, INACTIVE, REVOKED..).
    NotActive(String),
    /// Outside its validity period.
    Expired,
    /// No registered CA signed it.
    UnknownCa,
    /// The certificate's CA is registered but INACTIVE.
    CaInactive(String),
    /// The CA is active, but auto-registration is off.
    AutoRegistrationDisabled(String),
    /// JITR: registered as PENDING_ACTIVATION under the CA.
    Registered { ca_certificate_id: String },
    /// JITP: provisioned with the CA's template, now ACTIVE.
    Provisioned {
        ca_certificate_id: String,
        thing_name: Option<String>,
    },
    /// JITP failed; the certificate stays PENDING_ACTIVATION.
    ProvisioningFailed { ca_certificate_id: String, message: String },
}

impl Refusal {
    /// The key under which the stats count it.
    pub fn key(&self) -> &'static str {
        match self {
            Refusal::BadCertificate(_) => "bad_certificate",
            Refusal::NotActive(_) => "certificate_not_active",
            Refusal::Expired => "certificate_expired",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::CaInactive(_) => "ca_inactive",
            Refusal::AutoRegistrationDisabled(_) => "auto_registration_disabled",
            Refusal::Registered { .. } => "jitr_registered",
            Refusal::Provisioned { .. } => "jitp_provisioned",
            Refusal::ProvisioningFailed { .. } => "jitp_failed",
        }
    }
}

/// Decides on a connection presenting `leaf` (DER) and, optionally, more
/// certificates of its chain; registers or provisions the certificate when
/// auto-registration says so, and persists that.
pub(crate) async fn admit(shared: &Shared, leaf: &[u8], chain: &[Vec<u8>]) -> (String, Admission) {
    let id = ca::certificate_id(leaf);
    let parsed = match ca::parse_certificate_der(leaf) {
        Ok(parsed) => parsed,
        Err(e) => return (id, Admission::Drop(Refusal::BadCertificate(e.to_string()))),
    };
    let now = state::now();
    let in_validity = parsed.not_before <= now && now <= parsed.not_after;
    let known = shared.store.read(|state| known_verdict(state, &id));
    if let Some(admission) = known {
        return match admission {
            Admission::Accept if !in_validity => (id, Admission::Drop(Refusal::Expired)),
            admission => (id, admission),
        };
    }
    if !in_validity {
        return (id, Admission::Drop(Refusal::Expired));
    }
    let ctx = Ctx {
        region: &shared.config.region,
        seed: shared.config.seed,
        ca: &shared.ca,
    };
    let refusal = shared.store.write(|state| register_unknown(state, ctx, &parsed, chain));
    if matches!(
        refusal,
        Refusal::Registered { .. } | Refusal::Provisioned { .. } | Refusal::ProvisioningFailed { .. }
    ) {
        if let Err(e) = shared.store.persist().await {
            tracing::warn!(error = %format!("{e:#}"), "the sandbox could not persist an auto-registration");
        }
    }
    (id, Admission::Drop(refusal))
}

/// The verdict on a registered certificate, `None` for an unknown one.
fn known_verdict(state: &State, id: &str) -> Option<Admission> {
    let cert = state.certificates.get(id)?;
    if cert.status != "ACTIVE" {
        return Some(Admission::Drop(Refusal::NotActive(cert.status.clone())));
    }
    if let Some(ca_id) = &cert.ca_certificate_id {
        if state.ca_certificates.get(ca_id).is_some_and(|ca| ca.status != "ACTIVE") {
            return Some(Admission::Drop(Refusal::CaInactive(ca_id.clone())));
        }
    }
    Some(Admission::Accept)
}

/// The registered CA that signed `parsed`: a presented chain certificate
/// that is registered and signed it, else any registered CA that did.
fn issuing_ca(state: &State, parsed: &ParsedCertificate, chain: &[Vec<u8>]) -> Option<String> {
    let presented = chain.iter().find_map(|der| {
        let id = ca::certificate_id(der);
        (state.ca_certificates.contains_key(&id) && ca::is_signed_by(&parsed.der, der)).then_some(id)
    });
    presented.or_else(|| registry::find_issuing_ca(state, parsed, None).ok().flatten())
}

/// JITR and JITP for a certificate the registry does not know.
fn register_unknown(state: &mut State, ctx: Ctx<'_>, parsed: &ParsedCertificate, chain: &[Vec<u8>]) -> Refusal {
    // Another connection may have registered it meanwhile.
    if let Some(Admission::Drop(refusal)) = known_verdict(state, &parsed.id) {
        return refusal;
    }
    let Some(ca_id) = issuing_ca(state, parsed, chain) else {
        return Refusal::UnknownCa;
    };
    let Some(ca_record) = state.ca_certificates.get(&ca_id) else {
        return Refusal::UnknownCa;
    };
    if ca_record.status != "ACTIVE" {
        return Refusal::CaInactive(ca_id);
    }
    if ca_record.auto_registration_status != "ENABLE" {
        return Refusal::AutoRegistrationDisabled(ca_id);
    }
    let config = ca_record.registration_config.clone().unwrap_or_default();

    let record = registry::new_certificate(state, ctx, parsed, "PENDING_ACTIVATION", Some(ca_id.clone()));
    state.certificates.insert(parsed.id.clone(), record);
    tracing::info!(certificate_id = %parsed.id, ca_certificate_id = %ca_id, "certificate registered as PENDING_ACTIVATION on first connect");

    let body = match (config.template_body, config.template_name) {
        (Some(body), _) => body,
        (None, Some(name)) => match state.provisioning_templates.get(&name) {
            Some(template) => template.template_body.clone(),
            None => {
                return failed(
                    parsed,
                    ca_id,
                    format!("the CA's provisioning template {name} does not exist"),
                )
            }
        },
        (None, None) => {
            return Refusal::Registered {
                ca_certificate_id: ca_id,
            }
        }
    };
    match run_template(state, ctx, &body, parsed) {
        Ok(thing_name) => {
            tracing::info!(certificate_id = %parsed.id, ca_certificate_id = %ca_id, thing = ?thing_name, "certificate provisioned just in time");
            Refusal::Provisioned {
                ca_certificate_id: ca_id,
                thing_name,
            }
        }
        Err(message) => failed(parsed, ca_id, message),
    }
}

fn failed(parsed: &ParsedCertificate, ca_id: String, message: String) -> Refusal {
    tracing::warn!(certificate_id = %parsed.id, ca_certificate_id = %ca_id, %message, "just-in-time provisioning failed; the certificate stays PENDING_ACTIVATION");
    Refusal::ProvisioningFailed {
        ca_certificate_id: ca_id,
        message,
    }
}

/// The parameters AWS fills in from a certificate for its JITP template.
pub(crate) fn certificate_parameters(parsed: &ParsedCertificate) -> Map<String, Value> {
    let mut line: Map<String, Value> = ca::subject_parameters(&parsed.der)
        .into_iter()
        .map(|(name, value)| (format!("{PARAMETER_PREFIX}{name}"), Value::String(value)))
        .collect();
    line.insert(format!("{PARAMETER_PREFIX}Id"), Value::String(parsed.id.clone()));
    line
}

/// Runs a JITP template for a certificate registered PENDING_ACTIVATION;
/// answers the thing it made, if any. On failure nothing but the pending
/// certificate is left.
fn run_template(
    state: &mut State,
    ctx: Ctx<'_>,
    body: &str,
    parsed: &ParsedCertificate,
) -> Result<Option<String>, String> {
    let template = Template::parse(body).map_err(|e| format!("the CA's template is not valid: {e}"))?;
    let line = certificate_parameters(parsed);
    let missing = template.missing_parameters(&line);
    if !missing.is_empty() {
        return Err(format!(
            "the certificate has no value for the template parameter(s) {} and they have no Default",
            missing.join(", ")
        ));
    }
    let pseudo = Pseudo {
        region: ctx.region,
        account_id: ACCOUNT_ID,
    };
    let mut resolved = template.resolve(&line, &pseudo).map_err(|e| e.to_string())?;
    // The certificate being provisioned leaves PENDING_ACTIVATION for the
    // template's status (ACTIVE unless it says otherwise).
    if let Some(cert) = &mut resolved.certificate {
        let is_this = matches!(&cert.spec.source, CertSource::Id(id) if id.eq_ignore_ascii_case(&parsed.id));
        if is_this && cert.spec.status_override.is_none() {
            cert.spec.status_override = Some(Override::Replace);
        }
    }
    let serial = ids::serial(ctx.seed, "cert-serial", state.take_id());
    provision(state, ctx, &resolved, serial).map_err(|e| e.to_string())?;
    Ok(resolved.thing.map(|t| t.spec.name))
}
