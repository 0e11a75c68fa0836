//! The registry: validation rules and the operations on things, types,
//! groups, policies, certificates and their attachments, shared by the API
//! and the bulk task engine.

use std::collections::BTreeMap;

use crate::ca::{self, CertError, ParsedCertificate, SandboxCa};
use crate::ids;
use crate::state::{
    self, BillingGroup, CaCertificate, Certificate, Policy, ProvisioningTemplate, RegistrationConfig, State, Thing,
    ThingGroup, ThingType,
};
use crate::ACCOUNT_ID;

use super::template::Template;
use super::ApiError;

/// Most attributes a thing may carry.
pub(crate) const MAX_ATTRIBUTES: usize = 50;

/// What the registry needs to know about the sandbox.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub region: &'a str,
    pub seed: u64,
    pub ca: &'a SandboxCa,
}

impl Ctx<'_> {
    /// `arn:aws:iot:REGION:ACCOUNT:KIND/NAME`.
    pub fn arn(&self, kind: &str, name: &str) -> String {
        format!("arn:aws:iot:{}:{ACCOUNT_ID}:{kind}/{name}", self.region)
    }

    pub fn uuid(&self, state: &mut State, label: &str) -> String {
        ids::uuid(self.seed, label, state.take_id())
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')
}

/// Thing, thing type, thing group and billing group names:
/// `[a-zA-Z0-9:_-]{1,128}`.
pub(crate) fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(is_name_char) {
        return Err(ApiError::invalid(format!(
            "{kind} name `{name}` is not valid: it must be 1 to 128 characters from [a-zA-Z0-9:_-]"
        )));
    }
    Ok(())
}

pub(crate) fn validate_thing_name(name: &str) -> Result<(), ApiError> {
    validate_name("Thing", name)
}

/// Policy names: `[\w+=,.@-]{1,128}`.
pub(crate) fn validate_policy_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-'));
    if !ok {
        return Err(ApiError::invalid(format!(
            "Policy name `{name}` is not valid: it must be 1 to 128 characters from [a-zA-Z0-9_+=,.@-]"
        )));
    }
    Ok(())
}

/// Attribute names `[a-zA-Z0-9_.,@/:#-]+` (at most 128) and values
/// `[a-zA-Z0-9_.,@/:#=\[\]-]*` (at most 800).
pub(crate) fn validate_attributes(attributes: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let name_char = |c: char| c.is_ascii_alphanumeric() || "_.,@/:#-".contains(c);
    let value_char = |c: char| c.is_ascii_alphanumeric() || "_.,@/:#=[]-".contains(c);
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(ApiError::invalid(format!(
            "a thing may have at most {MAX_ATTRIBUTES} attributes, not {}",
            attributes.len()
        )));
    }
    for (name, value) in attributes {
        if name.is_empty() || name.len() > 128 || !name.chars().all(name_char) {
            return Err(ApiError::invalid(format!(
                "attribute name `{name}` is not valid: it must be 1 to 128 characters from [a-zA-Z0-9_.,@/:#-]"
            )));
        }
        if value.len() > 800 || !value.chars().all(value_char) {
            return Err(ApiError::invalid(format!(
                "value of attribute `{name}` is not valid: it must be at most 800 characters from [a-zA-Z0-9_.,@/:#=[]-]"
            )));
        }
    }
    Ok(())
}

/// Checks that a policy document is a JSON object.
pub(crate) fn validate_policy_document(document: &str) -> Result<(), ApiError> {
    match serde_json::from_str::<serde_json::Value>(document) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(ApiError::new(
            "MalformedPolicyException",
            "the policy document must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            "MalformedPolicyException",
            format!("the policy document is not valid JSON: {e}"),
        )),
    }
}

/// The certificate id in a certificate ARN.
pub(crate) fn cert_id_of_arn(arn: &str) -> Option<&str> {
    let (prefix, id) = arn.rsplit_once(":cert/")?;
    prefix.starts_with("arn:aws:iot:").then_some(id)
}

/// The configurable part of a thing.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ThingConfig {
    pub thing_type: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub billing_group: Option<String>,
}

/// Checks that a thing type may be given to a thing.
pub(crate) fn check_thing_type(state: &State, name: &str) -> Result<(), ApiError> {
    match state.thing_types.get(name) {
        None => Err(ApiError::not_found(format!("Thing Type {ACCOUNT_ID}:{name} not found"))),
        Some(t) if t.deprecated => Err(ApiError::invalid(format!(
            "Can not create new thing with deprecated thing type: {name}"
        ))),
        Some(_) => Ok(()),
    }
}

pub(crate) fn check_billing_group(state: &State, name: &str) -> Result<(), ApiError> {
    if state.billing_groups.contains_key(name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("Billing Group {name} not found")))
    }
}

pub(crate) fn check_thing_group(state: &State, name: &str) -> Result<(), ApiError> {
    if state.thing_groups.contains_key(name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("Thing Group {name} not found")))
    }
}

/// A new thing record (nothing checked).
pub(crate) fn new_thing(state: &mut State, ctx: Ctx<'_>, name: &str, config: ThingConfig) -> Thing {
    Thing {
        thing_name: name.to_owned(),
        thing_id: ctx.uuid(state, "thing"),
        thing_arn: ctx.arn("thing", name),
        thing_type_name: config.thing_type,
        attributes: config.attributes,
        version: 1,
        billing_group_name: config.billing_group,
        thing_groups: Default::default(),
        principals: Default::default(),
        creation_date: state::now(),
    }
}

/// CreateThing: idempotent for the same configuration, a conflict otherwise.
pub(crate) fn create_thing(
    state: &mut State,
    ctx: Ctx<'_>,
    name: &str,
    config: ThingConfig,
) -> Result<Thing, ApiError> {
    validate_thing_name(name)?;
    validate_attributes(&config.attributes)?;
    if let Some(existing) = state.things.get(name) {
        let same = existing.thing_type_name == config.thing_type
            && existing.attributes == config.attributes
            && existing.billing_group_name == config.billing_group;
        if same {
            return Ok(existing.clone());
        }
        return Err(ApiError::already_exists(
            format!("Thing {name} already exists in account with different attributes"),
            &existing.thing_id,
            &existing.thing_arn,
        ));
    }
    if let Some(t) = &config.thing_type {
        check_thing_type(state, t)?;
    }
    if let Some(b) = &config.billing_group {
        check_billing_group(state, b)?;
    }
    let thing = new_thing(state, ctx, name, config);
    state.things.insert(name.to_owned(), thing.clone());
    Ok(thing)
}

/// The fields of an UpdateThing call.
pub(crate) struct ThingUpdate {
    pub thing_type: Option<String>,
    pub remove_thing_type: bool,
    pub attributes: Option<BTreeMap<String, String>>,
    pub merge: bool,
    pub expected_version: Option<i64>,
}

pub(crate) fn update_thing(state: &mut State, name: &str, update: ThingUpdate) -> Result<(), ApiError> {
    if let Some(t) = &update.thing_type {
        check_thing_type(state, t)?;
    }
    if update.remove_thing_type && update.thing_type.is_some() {
        return Err(ApiError::invalid(
            "removeThingType cannot be combined with thingTypeName",
        ));
    }
    let thing = state
        .things
        .get_mut(name)
        .ok_or_else(|| ApiError::not_found(format!("Thing {name} cannot be found")))?;
    if let Some(expected) = update.expected_version {
        if expected != thing.version {
            return Err(ApiError::new(
                "VersionConflictException",
                format!(
                    "the expected version {expected} does not match the thing's version {}",
                    thing.version
                ),
            ));
        }
    }
    let mut attributes = thing.attributes.clone();
    if let Some(new) = update.attributes {
        if update.merge {
            for (k, v) in new {
                // An empty value removes the attribute.
                if v.is_empty() {
                    attributes.remove(&k);
                } else {
                    attributes.insert(k, v);
                }
            }
        } else {
            attributes = new;
        }
    }
    validate_attributes(&attributes)?;
    thing.attributes = attributes;
    if update.remove_thing_type {
        thing.thing_type_name = None;
    } else if update.thing_type.is_some() {
        thing.thing_type_name = update.thing_type;
    }
    thing.version += 1;
    Ok(())
}

pub(crate) fn delete_thing(state: &mut State, name: &str, expected_version: Option<i64>) -> Result<(), ApiError> {
    let Some(thing) = state.things.get(name) else {
        return Ok(());
    };
    if let Some(expected) = expected_version {
        if expected != thing.version {
            return Err(ApiError::new(
                "VersionConflictException",
                format!(
                    "the expected version {expected} does not match the thing's version {}",
                    thing.version
                ),
            ));
        }
    }
    if !thing.principals.is_empty() {
        return Err(ApiError::invalid(format!(
            "Cannot delete. Thing {name} is still attached to one or more principals"
        )));
    }
    state.things.remove(name);
    Ok(())
}

pub(crate) fn create_thing_type(
    state: &mut State,
    ctx: Ctx<'_>,
    name: &str,
    description: Option<String>,
    searchable_attributes: Vec<String>,
) -> Result<ThingType, ApiError> {
    validate_name("Thing type", name)?;
    if let Some(existing) = state.thing_types.get(name) {
        return Err(ApiError::already_exists(
            format!("Thing Type {name} already exists"),
            &existing.thing_type_id,
            &existing.thing_type_arn,
        ));
    }
    let thing_type = ThingType {
        thing_type_name: name.to_owned(),
        thing_type_id: ctx.uuid(state, "thing-type"),
        thing_type_arn: ctx.arn("thingtype", name),
        description,
        searchable_attributes,
        deprecated: false,
        deprecation_date: None,
        creation_date: state::now(),
    };
    state.thing_types.insert(name.to_owned(), thing_type.clone());
    Ok(thing_type)
}

pub(crate) fn create_thing_group(
    state: &mut State,
    ctx: Ctx<'_>,
    name: &str,
    parent: Option<String>,
    description: Option<String>,
    attributes: BTreeMap<String, String>,
) -> Result<ThingGroup, ApiError> {
    validate_name("Thing group", name)?;
    validate_attributes(&attributes)?;
    if let Some(existing) = state.thing_groups.get(name) {
        if existing.parent_group_name == parent
            && existing.description == description
            && existing.attributes == attributes
        {
            return Ok(existing.clone());
        }
        return Err(ApiError::already_exists(
            format!("Thing Group {name} already exists with different properties"),
            &existing.thing_group_id,
            &existing.thing_group_arn,
        ));
    }
    if let Some(p) = &parent {
        check_thing_group(state, p)?;
    }
    let group = ThingGroup {
        thing_group_name: name.to_owned(),
        thing_group_id: ctx.uuid(state, "thing-group"),
        thing_group_arn: ctx.arn("thinggroup", name),
        parent_group_name: parent,
        description,
        attributes,
        version: 1,
        creation_date: state::now(),
    };
    state.thing_groups.insert(name.to_owned(), group.clone());
    Ok(group)
}

pub(crate) fn create_billing_group(
    state: &mut State,
    ctx: Ctx<'_>,
    name: &str,
    description: Option<String>,
) -> Result<BillingGroup, ApiError> {
    validate_name("Billing group", name)?;
    if let Some(existing) = state.billing_groups.get(name) {
        if existing.description == description {
            return Ok(existing.clone());
        }
        return Err(ApiError::already_exists(
            format!("Billing Group {name} already exists with different properties"),
            &existing.billing_group_id,
            &existing.billing_group_arn,
        ));
    }
    let group = BillingGroup {
        billing_group_name: name.to_owned(),
        billing_group_id: ctx.uuid(state, "billing-group"),
        billing_group_arn: ctx.arn("billinggroup", name),
        description,
        version: 1,
        creation_date: state::now(),
    };
    state.billing_groups.insert(name.to_owned(), group.clone());
    Ok(group)
}

/// A new policy record (nothing checked).
pub(crate) fn new_policy(state: &mut State, ctx: Ctx<'_>, name: &str, document: &str) -> Policy {
    Policy {
        policy_name: name.to_owned(),
        policy_arn: ctx.arn("policy", name),
        policy_document: document.to_owned(),
        generation_id: hex::encode(&ids::derive(ctx.seed, "policy-generation", state.take_id())[..16]),
        creation_date: state::now(),
    }
}

pub(crate) fn create_policy(state: &mut State, ctx: Ctx<'_>, name: &str, document: &str) -> Result<Policy, ApiError> {
    validate_policy_name(name)?;
    validate_policy_document(document)?;
    if let Some(existing) = state.policies.get(name) {
        return Err(ApiError::already_exists(
            format!("Policy cannot be created - name already exists (name={name})"),
            name,
            &existing.policy_arn,
        ));
    }
    let policy = new_policy(state, ctx, name, document);
    state.policies.insert(name.to_owned(), policy.clone());
    Ok(policy)
}

pub(crate) fn delete_policy(state: &mut State, name: &str) -> Result<(), ApiError> {
    if !state.policies.contains_key(name) {
        return Err(ApiError::not_found(format!("Policy {name} not found")));
    }
    if state.policy_attachments.values().any(|p| p.contains(name)) {
        return Err(ApiError::new(
            "DeleteConflictException",
            format!("The policy {name} is attached to one or more principals"),
        ));
    }
    state.policies.remove(name);
    Ok(())
}

/// Maps a certificate error to the API error AWS IoT gives for it.
pub(crate) fn cert_error(e: CertError) -> ApiError {
    match e {
        CertError::Signing(_) => ApiError::internal(e.to_string()),
        CertError::BadCertificate(_) | CertError::BadSignature(_) => {
            ApiError::new("CertificateValidationException", e.to_string())
        }
        CertError::BadCsr(_) | CertError::BadKey(_) => ApiError::invalid(e.to_string()),
    }
}

/// A new certificate record (nothing checked).
pub(crate) fn new_certificate(
    state: &mut State,
    ctx: Ctx<'_>,
    parsed: &ParsedCertificate,
    status: &str,
    ca_certificate_id: Option<String>,
) -> Certificate {
    let now = state::now();
    let seq = state.take_id();
    Certificate {
        certificate_id: parsed.id.clone(),
        certificate_arn: ctx.arn("cert", &parsed.id),
        certificate_pem: parsed.pem.clone(),
        status: status.to_owned(),
        ca_certificate_id,
        creation_date: now,
        last_modified_date: now,
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        generation_id: hex::encode(&ids::derive(ctx.seed, "cert-generation", seq)[..16]),
        customer_version: 1,
        seq,
    }
}

/// CreateCertificateFromCsr: every call makes a new certificate.
pub(crate) fn create_certificate_from_csr(
    state: &mut State,
    ctx: Ctx<'_>,
    csr_pem: &str,
    active: bool,
) -> Result<Certificate, ApiError> {
    if csr_pem.is_empty() || csr_pem.len() > 4096 {
        return Err(ApiError::invalid(
            "certificateSigningRequest must be 1 to 4096 characters",
        ));
    }
    let csr = ca::verify_csr(csr_pem).map_err(cert_error)?;
    let serial = ids::serial(ctx.seed, "cert-serial", state.take_id());
    let parsed = ctx.ca.issue(&csr, serial).map_err(cert_error)?;
    let status = if active { "ACTIVE" } else { "INACTIVE" };
    let cert = new_certificate(state, ctx, &parsed, status, None);
    state.certificates.insert(cert.certificate_id.clone(), cert.clone());
    Ok(cert)
}

/// The registered CA that signed `cert`: the one given as `ca_pem` (which
/// must be registered), or any registered CA whose key verifies it.
pub(crate) fn find_issuing_ca(
    state: &State,
    cert: &ParsedCertificate,
    ca_pem: Option<&str>,
) -> Result<Option<String>, ApiError> {
    if let Some(ca_pem) = ca_pem {
        let ca_cert = ca::parse_certificate(ca_pem).map_err(cert_error)?;
        if !state.ca_certificates.contains_key(&ca_cert.id) {
            return Err(ApiError::new(
                "CertificateValidationException",
                format!("the CA certificate {} is not registered", ca_cert.id),
            ));
        }
        if !ca::is_signed_by(&cert.der, &ca_cert.der) {
            return Err(ApiError::new(
                "CertificateValidationException",
                "the certificate is not signed by the given CA certificate",
            ));
        }
        return Ok(Some(ca_cert.id));
    }
    let found = state.ca_certificates.values().find(|ca_record| {
        ca::parse_certificate(&ca_record.certificate_pem).is_ok_and(|ca_cert| ca::is_signed_by(&cert.der, &ca_cert.der))
    });
    Ok(found.map(|ca_record| ca_record.certificate_id.clone()))
}

/// Checks a status given for a registered certificate.
pub(crate) fn check_register_status(status: &str) -> Result<(), ApiError> {
    match status {
        "ACTIVE" | "INACTIVE" => Ok(()),
        other => Err(ApiError::invalid(format!(
            "status `{other}` is not valid for a registered certificate: use ACTIVE or INACTIVE"
        ))),
    }
}

/// RegisterCertificate (with a CA) and RegisterCertificateWithoutCA.
pub(crate) fn register_certificate(
    state: &mut State,
    ctx: Ctx<'_>,
    pem: &str,
    ca_pem: Option<&str>,
    status: &str,
    require_ca: bool,
) -> Result<Certificate, ApiError> {
    check_register_status(status)?;
    let parsed = ca::parse_certificate(pem).map_err(cert_error)?;
    if let Some(existing) = state.certificates.get(&parsed.id) {
        return Err(ApiError::already_exists(
            "The certificate is already provisioned or registered",
            &existing.certificate_id,
            &existing.certificate_arn,
        ));
    }
    let ca_id = if require_ca {
        let ca_id = find_issuing_ca(state, &parsed, ca_pem)?;
        if ca_id.is_none() {
            return Err(ApiError::new(
                "CertificateValidationException",
                "no registered CA certificate signed this certificate",
            ));
        }
        ca_id
    } else {
        None
    };
    let cert = new_certificate(state, ctx, &parsed, status, ca_id);
    state.certificates.insert(cert.certificate_id.clone(), cert.clone());
    Ok(cert)
}

pub(crate) fn certificate_mut<'s>(state: &'s mut State, id: &str) -> Result<&'s mut Certificate, ApiError> {
    state
        .certificates
        .get_mut(id)
        .ok_or_else(|| ApiError::not_found(format!("The certificate {id} does not exist")))
}

pub(crate) fn update_certificate(state: &mut State, id: &str, new_status: &str) -> Result<(), ApiError> {
    let cert = certificate_mut(state, id)?;
    match new_status {
        "ACTIVE" | "INACTIVE" | "REVOKED" => {}
        "PENDING_TRANSFER" | "PENDING_ACTIVATION" | "REGISTER_ACTIVE" | "REGISTER_INACTIVE" => {
            return Err(ApiError::invalid(format!(
                "the status of a certificate cannot be set to {new_status} with UpdateCertificate"
            )))
        }
        other => return Err(ApiError::invalid(format!("unknown certificate status `{other}`"))),
    }
    if cert.status == "REVOKED" && new_status != "REVOKED" {
        return Err(ApiError::new(
            "CertificateStateException",
            "a revoked certificate cannot change status",
        ));
    }
    if cert.status != new_status {
        cert.status = new_status.to_owned();
        cert.last_modified_date = state::now();
        cert.customer_version += 1;
    }
    Ok(())
}

pub(crate) fn delete_certificate(state: &mut State, id: &str, force: bool) -> Result<(), ApiError> {
    let cert = certificate_mut(state, id)?;
    if cert.status == "ACTIVE" {
        return Err(ApiError::new(
            "CertificateStateException",
            "Certificate must be deactivated (not ACTIVE) before deletion",
        ));
    }
    let arn = cert.certificate_arn.clone();
    if state.things.values().any(|t| t.principals.contains(&arn)) {
        return Err(ApiError::new(
            "DeleteConflictException",
            "Things must be detached before deletion",
        ));
    }
    let has_policies = state.policy_attachments.get(&arn).is_some_and(|p| !p.is_empty());
    if has_policies && !force {
        return Err(ApiError::new(
            "DeleteConflictException",
            "Certificate policies must be detached before deletion",
        ));
    }
    state.policy_attachments.remove(&arn);
    state.certificates.remove(id);
    Ok(())
}

/// Whether a principal ARN names something that exists. Certificate ARNs
/// must name a registered certificate; other principals are taken as given.
pub(crate) fn check_principal(state: &State, principal: &str) -> Result<(), ApiError> {
    match cert_id_of_arn(principal) {
        Some(id) if state.certificates.contains_key(id) => Ok(()),
        Some(id) => Err(ApiError::not_found(format!("The certificate {id} does not exist"))),
        None if principal.starts_with("arn:") || principal.contains(':') => Ok(()),
        None => Err(ApiError::invalid(format!("`{principal}` is not a principal ARN"))),
    }
}

pub(crate) fn attach_policy(state: &mut State, policy: &str, target: &str) -> Result<(), ApiError> {
    if !state.policies.contains_key(policy) {
        return Err(ApiError::not_found(format!("Policy {policy} not found")));
    }
    check_principal(state, target)?;
    state
        .policy_attachments
        .entry(target.to_owned())
        .or_default()
        .insert(policy.to_owned());
    Ok(())
}

pub(crate) fn detach_policy(state: &mut State, policy: &str, target: &str) -> Result<(), ApiError> {
    if !state.policies.contains_key(policy) {
        return Err(ApiError::not_found(format!("Policy {policy} not found")));
    }
    if let Some(policies) = state.policy_attachments.get_mut(target) {
        policies.remove(policy);
        if policies.is_empty() {
            state.policy_attachments.remove(target);
        }
    }
    Ok(())
}

pub(crate) fn attach_thing_principal(
    state: &mut State,
    thing: &str,
    principal: &str,
    exclusive: bool,
) -> Result<(), ApiError> {
    check_principal(state, principal)?;
    if !state.things.contains_key(thing) {
        return Err(ApiError::not_found(format!("Thing {thing} cannot be found")));
    }
    let elsewhere = state
        .things
        .values()
        .any(|t| t.thing_name != thing && t.principals.contains(principal));
    if exclusive && elsewhere {
        return Err(ApiError::invalid(format!(
            "the principal is already attached to another thing and cannot be attached exclusively to {thing}"
        )));
    }
    if let Some(t) = state.things.get_mut(thing) {
        t.principals.insert(principal.to_owned());
    }
    Ok(())
}

pub(crate) fn detach_thing_principal(state: &mut State, thing: &str, principal: &str) -> Result<(), ApiError> {
    let t = state
        .things
        .get_mut(thing)
        .ok_or_else(|| ApiError::not_found(format!("Thing {thing} cannot be found")))?;
    t.principals.remove(principal);
    Ok(())
}

pub(crate) fn add_thing_to_group(state: &mut State, thing: &str, group: &str) -> Result<(), ApiError> {
    check_thing_group(state, group)?;
    let t = state
        .things
        .get_mut(thing)
        .ok_or_else(|| ApiError::not_found(format!("Thing {thing} cannot be found")))?;
    t.thing_groups.insert(group.to_owned());
    Ok(())
}

/// The registration code for CA certificates (the verification
/// certificate's common name).
pub(crate) fn registration_code(seed: u64) -> String {
    hex::encode(ids::derive(seed, "registration-code", 0))
}

/// RegisterCACertificate.
pub(crate) fn register_ca_certificate(
    state: &mut State,
    ctx: Ctx<'_>,
    ca_pem: &str,
    verification_pem: Option<&str>,
    mode: &str,
    active: bool,
    auto_registration: bool,
    registration_config: Option<RegistrationConfig>,
) -> Result<CaCertificate, ApiError> {
    let parsed = ca::parse_certificate(ca_pem).map_err(cert_error)?;
    if !ca::is_ca_certificate(&parsed.der) {
        return Err(ApiError::new(
            "CertificateValidationException",
            "the certificate is not a CA certificate (basic constraints CA:TRUE)",
        ));
    }
    match mode {
        "DEFAULT" => {
            let Some(verification_pem) = verification_pem else {
                return Err(ApiError::invalid(
                    "a verification certificate is required to register a CA in DEFAULT mode",
                ));
            };
            let verification = ca::parse_certificate(verification_pem).map_err(cert_error)?;
            if !ca::is_signed_by(&verification.der, &parsed.der) {
                return Err(ApiError::new(
                    "CertificateValidationException",
                    "the verification certificate is not signed by the CA certificate",
                ));
            }
            if ca::common_name(&verification.der).as_deref() != Some(registration_code(ctx.seed).as_str()) {
                return Err(ApiError::new(
                    "RegistrationCodeValidationException",
                    "the common name of the verification certificate is not the registration code",
                ));
            }
        }
        "SNI_ONLY" if verification_pem.is_some_and(|v| !v.trim().is_empty()) => {
            return Err(ApiError::invalid(
                "a verification certificate must not be given to register a CA in SNI_ONLY mode",
            ));
        }
        "SNI_ONLY" => {}
        other => return Err(ApiError::invalid(format!("unknown certificate mode `{other}`"))),
    }
    let registration_config = registration_config
        .map(|config| check_registration_config(state, config))
        .transpose()?;
    if let Some(existing) = state.ca_certificates.get(&parsed.id) {
        return Err(ApiError::already_exists(
            "The CA certificate is already registered",
            &existing.certificate_id,
            &existing.certificate_arn,
        ));
    }
    let now = state::now();
    let seq = state.take_id();
    let record = CaCertificate {
        certificate_id: parsed.id.clone(),
        certificate_arn: ctx.arn("cacert", &parsed.id),
        certificate_pem: parsed.pem.clone(),
        status: if active { "ACTIVE" } else { "INACTIVE" }.to_owned(),
        certificate_mode: mode.to_owned(),
        auto_registration_status: if auto_registration { "ENABLE" } else { "DISABLE" }.to_owned(),
        creation_date: now,
        last_modified_date: now,
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        generation_id: hex::encode(&ids::derive(ctx.seed, "cacert-generation", seq)[..16]),
        seq,
        registration_config,
    };
    state.ca_certificates.insert(parsed.id, record.clone());
    Ok(record)
}

/// Most characters of a template body.
pub(crate) const MAX_TEMPLATE_BODY: usize = 10240;

/// Checks a template body: size and the static checks of the template engine.
pub(crate) fn check_template_body(body: &str) -> Result<(), ApiError> {
    if body.is_empty() || body.chars().count() > MAX_TEMPLATE_BODY {
        return Err(ApiError::invalid(format!(
            "templateBody must be 1 to {MAX_TEMPLATE_BODY} characters"
        )));
    }
    Template::parse(body).map_err(|e| ApiError::invalid(e.0))?;
    Ok(())
}

/// Checks a CA's `registrationConfig`: a valid inline template body, or the
/// name of a provisioning template of type JITP, not both. An empty config
/// (no field set) reads as none.
pub(crate) fn check_registration_config(
    state: &State,
    config: RegistrationConfig,
) -> Result<RegistrationConfig, ApiError> {
    let config = RegistrationConfig {
        template_body: config.template_body.filter(|b| !b.is_empty()),
        role_arn: config.role_arn.filter(|r| !r.is_empty()),
        template_name: config.template_name.filter(|n| !n.is_empty()),
    };
    match (&config.template_body, &config.template_name) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "registrationConfig takes a templateBody or a templateName, not both",
            ))
        }
        (Some(body), None) => check_template_body(body)?,
        (None, Some(name)) => match state.provisioning_templates.get(name) {
            None => return Err(ApiError::invalid(format!("The provisioning template {name} does not exist"))),
            Some(t) if t.template_type != "JITP" => {
                return Err(ApiError::invalid(format!(
                    "The provisioning template {name} is of type {}; a CA's registrationConfig needs a template of type JITP",
                    t.template_type
                )))
            }
            Some(_) => {}
        },
        (None, None) => {}
    }
    if let Some(role) = &config.role_arn {
        check_role_arn("roleArn", role)?;
    }
    Ok(config)
}

/// Checks that a role ARN looks like one: `arn:aws:iam::ACCOUNT:role/NAME`.
pub(crate) fn check_role_arn(field: &str, arn: &str) -> Result<(), ApiError> {
    let ok = arn.len() <= 2048
        && arn
            .strip_prefix("arn:aws:iam::")
            .and_then(|rest| rest.split_once(":role/"))
            .is_some_and(|(account, name)| {
                account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty()
            });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} `{arn}` is not the ARN of an IAM role"
        )))
    }
}

/// Provisioning template names: `[0-9A-Za-z_-]{1,36}`.
pub(crate) fn validate_template_name(name: &str) -> Result<(), ApiError> {
    let ok =
        !name.is_empty() && name.len() <= 36 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "template name `{name}` is not valid: it must be 1 to 36 characters from [0-9A-Za-z_-]"
        )))
    }
}

/// The fields of a CreateProvisioningTemplate call.
pub(crate) struct NewTemplate {
    pub name: String,
    pub description: Option<String>,
    pub body: String,
    pub enabled: bool,
    pub role_arn: String,
    pub template_type: String,
    pub pre_provisioning_hook: Option<serde_json::Value>,
}

pub(crate) fn create_provisioning_template(
    state: &mut State,
    ctx: Ctx<'_>,
    new: NewTemplate,
) -> Result<ProvisioningTemplate, ApiError> {
    validate_template_name(&new.name)?;
    if new.description.as_ref().is_some_and(|d| d.chars().count() > 500) {
        return Err(ApiError::invalid("description must be at most 500 characters"));
    }
    check_template_body(&new.body)?;
    check_role_arn("provisioningRoleArn", &new.role_arn)?;
    match new.template_type.as_str() {
        "FLEET_PROVISIONING" => {}
        "JITP" if new.pre_provisioning_hook.is_some() => {
            return Err(ApiError::invalid(
                "a pre-provisioning hook is only allowed in templates of type FLEET_PROVISIONING",
            ))
        }
        "JITP" => {}
        other => {
            return Err(ApiError::invalid(format!(
                "type must be FLEET_PROVISIONING or JITP, not `{other}`"
            )))
        }
    }
    if let Some(hook) = &new.pre_provisioning_hook {
        check_hook(hook)?;
    }
    let arn = ctx.arn("provisioningtemplate", &new.name);
    if state.provisioning_templates.contains_key(&new.name) {
        return Err(ApiError::already_exists(
            format!("The provisioning template {} already exists", new.name),
            &new.name,
            &arn,
        ));
    }
    let now = state::now();
    let template = ProvisioningTemplate {
        template_name: new.name.clone(),
        template_arn: arn,
        description: new.description,
        template_body: new.body,
        enabled: new.enabled,
        provisioning_role_arn: new.role_arn,
        template_type: new.template_type,
        pre_provisioning_hook: new.pre_provisioning_hook,
        creation_date: now,
        last_modified_date: now,
    };
    state.provisioning_templates.insert(new.name, template.clone());
    Ok(template)
}

/// A pre-provisioning hook: `{targetArn, payloadVersion?}`.
fn check_hook(hook: &serde_json::Value) -> Result<(), ApiError> {
    let target = hook
        .get("targetArn")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    if !target.starts_with("arn:aws:lambda:") {
        return Err(ApiError::invalid(
            "preProvisioningHook.targetArn must be the ARN of a Lambda function",
        ));
    }
    if let Some(version) = hook.get("payloadVersion") {
        let ok = version
            .as_str()
            .is_some_and(|v| (10..=32).contains(&v.len()) && v.chars().all(|c| c.is_ascii_digit() || c == '-'));
        if !ok {
            return Err(ApiError::invalid("preProvisioningHook.payloadVersion is not valid"));
        }
    }
    Ok(())
}

fn template_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("The provisioning template {name} does not exist"))
}

/// The fields of an UpdateProvisioningTemplate call.
#[derive(Default)]
pub(crate) struct TemplateUpdate {
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub default_version_id: Option<i64>,
    pub role_arn: Option<String>,
    pub pre_provisioning_hook: Option<serde_json::Value>,
    pub remove_pre_provisioning_hook: bool,
}

pub(crate) fn update_provisioning_template(
    state: &mut State,
    name: &str,
    update: TemplateUpdate,
) -> Result<(), ApiError> {
    let template = state
        .provisioning_templates
        .get_mut(name)
        .ok_or_else(|| template_not_found(name))?;
    if update.description.as_ref().is_some_and(|d| d.chars().count() > 500) {
        return Err(ApiError::invalid("description must be at most 500 characters"));
    }
    if let Some(version) = update.default_version_id {
        // The sandbox keeps one version per template.
        if version != 1 {
            return Err(ApiError::invalid(format!(
                "version {version} of the provisioning template {name} does not exist"
            )));
        }
    }
    if let Some(role) = &update.role_arn {
        check_role_arn("provisioningRoleArn", role)?;
    }
    if update.pre_provisioning_hook.is_some() && update.remove_pre_provisioning_hook {
        return Err(ApiError::invalid(
            "preProvisioningHook cannot be combined with removePreProvisioningHook",
        ));
    }
    if let Some(hook) = &update.pre_provisioning_hook {
        if template.template_type != "FLEET_PROVISIONING" {
            return Err(ApiError::invalid(
                "a pre-provisioning hook is only allowed in templates of type FLEET_PROVISIONING",
            ));
        }
        check_hook(hook)?;
    }
    if let Some(description) = update.description {
        template.description = Some(description);
    }
    if let Some(enabled) = update.enabled {
        template.enabled = enabled;
    }
    if let Some(role) = update.role_arn {
        template.provisioning_role_arn = role;
    }
    if update.remove_pre_provisioning_hook {
        template.pre_provisioning_hook = None;
    } else if let Some(hook) = update.pre_provisioning_hook {
        template.pre_provisioning_hook = Some(hook);
    }
    template.last_modified_date = state::now();
    Ok(())
}

pub(crate) fn delete_provisioning_template(state: &mut State, name: &str) -> Result<(), ApiError> {
    if !state.provisioning_templates.contains_key(name) {
        return Err(template_not_found(name));
    }
    let used_by = state.ca_certificates.values().find(|ca| {
        ca.registration_config
            .as_ref()
            .is_some_and(|c| c.template_name.as_deref() == Some(name))
    });
    if let Some(ca) = used_by {
        return Err(ApiError::new(
            "DeleteConflictException",
            format!(
                "The provisioning template {name} is used by the CA certificate {}",
                ca.certificate_id
            ),
        ));
    }
    state.provisioning_templates.remove(name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thing_names() {
        assert!(validate_thing_name("dev-1:a_b").is_ok());
        assert!(validate_thing_name(&"a".repeat(128)).is_ok());
        assert!(validate_thing_name(&"a".repeat(129)).is_err());
        assert!(validate_thing_name("").is_err());
        assert!(validate_thing_name("../../etc/passwd").is_err());
        assert!(validate_thing_name("caf\u{e9}").is_err());
        assert!(validate_thing_name("a b").is_err());
    }

    #[test]
    fn attributes() {
        let attrs = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(validate_attributes(&attrs("serial_no.v1", "SN-1:[x]=y/z#@,")).is_ok());
        assert!(validate_attributes(&attrs("k", "")).is_ok());
        assert!(validate_attributes(&attrs("k", "has space")).is_err());
        assert!(validate_attributes(&attrs("k=v", "x")).is_err());
        assert!(validate_attributes(&attrs("", "x")).is_err());
        assert!(validate_attributes(&attrs(&"k".repeat(129), "x")).is_err());
        assert!(validate_attributes(&attrs("k", &"v".repeat(800))).is_ok());
        assert!(validate_attributes(&attrs("k", &"v".repeat(801))).is_err());
        let many: BTreeMap<_, _> = (0..51).map(|i| (format!("a{i}"), "v".to_owned())).collect();
        assert!(validate_attributes(&many).is_err());
    }

    #[test]
    fn policy_names_and_documents() {
        assert!(validate_policy_name("device+policy=v1,a.b@c-d_e").is_ok());
        assert!(validate_policy_name("").is_err());
        assert!(validate_policy_name("a/b").is_err());
        assert!(validate_policy_document("{\"Version\":\"2012-10-17\"}").is_ok());
        assert_eq!(
            validate_policy_document("[]").unwrap_err().code,
            "MalformedPolicyException"
        );
    }

    #[test]
    fn cert_arns() {
        assert_eq!(
            cert_id_of_arn("arn:aws:iot:us-east-1:123456789012:cert/abc"),
            Some("abc")
        );
        assert_eq!(cert_id_of_arn("arn:aws:iot:us-east-1:123456789012:thing/abc"), None);
    }
}
