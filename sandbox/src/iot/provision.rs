//! Provisioning one bulk input line: the resources a template resolved to
//! are checked against the registry first (a plan), and only a plan that
//! passed every check is applied, so a failing line leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::ca::{self, ParsedCertificate};
use crate::state::{self, State};

use super::registry::{self, Ctx, ThingConfig};
use super::template::{CertSource, CertSpec, Override, PolicySpec, Resolved, ThingSpec};
use super::ApiError;

/// What a provisioned line produced.
#[derive(Debug, PartialEq)]
pub(crate) struct Provisioned {
    /// Logical resource name to ARN.
    pub resource_arns: BTreeMap<String, String>,
    pub certificate_id: Option<String>,
    pub issued_from_csr: bool,
    /// Whether the line created its certificate (rather than naming one
    /// that was registered already).
    pub certificate_created: bool,
    /// Whether the certificate was attached to a thing.
    pub attached_to_thing: bool,
}

/// A prerequisite that does not exist fails a bulk line with this class.
fn registration_failure(e: ApiError) -> ApiError {
    match e.code {
        "ResourceNotFoundException" => ApiError::new("ResourceRegistrationFailureException", e.message),
        _ => e,
    }
}

struct ThingPlan {
    logical_id: String,
    name: String,
    config: ThingConfig,
    groups: BTreeSet<String>,
    /// Whether the thing exists already, and whether the plan changes it.
    existing: bool,
    changed: bool,
}

enum CertPlan {
    New {
        parsed: ParsedCertificate,
        status: String,
        ca_id: Option<String>,
        from_csr: bool,
    },
    Existing {
        id: String,
        new_status: Option<String>,
    },
}

struct PolicyPlan {
    logical_id: String,
    name: String,
    /// The document of a policy the line creates.
    create: Option<String>,
}

/// Decides a property of an existing resource by its override setting.
fn decide<T: PartialEq>(
    what: &str,
    resource: &str,
    existing: T,
    wanted: Option<T>,
    setting: Option<Override>,
    merge: impl FnOnce(T, T) -> T,
) -> Result<T, ApiError> {
    let Some(wanted) = wanted else {
        return Ok(existing);
    };
    if wanted == existing {
        return Ok(existing);
    }
    match setting {
        Some(Override::DoNothing) => Ok(existing),
        Some(Override::Replace) => Ok(wanted),
        Some(Override::Merge) => Ok(merge(existing, wanted)),
        Some(Override::Fail) => Err(ApiError::new(
            "ResourceAlreadyExistsException",
            format!(
                "{resource} already exists with a different {what}, and its override setting is FAIL (ResourceConflictsException)"
            ),
        )),
        None => Err(ApiError::new(
            "ResourceAlreadyExistsException",
            format!(
                "{resource} already exists with a different {what}, and the template has no override setting for it"
            ),
        )),
    }
}

fn plan_thing(state: &State, logical_id: &str, spec: &ThingSpec) -> Result<ThingPlan, ApiError> {
    registry::validate_thing_name(&spec.name)?;
    if let Some(attributes) = &spec.attributes {
        registry::validate_attributes(attributes)?;
    }
    if let Some(t) = &spec.thing_type {
        registry::check_thing_type(state, t).map_err(registration_failure)?;
    }
    for group in spec.groups.iter().flatten() {
        registry::check_thing_group(state, group).map_err(registration_failure)?;
    }
    if let Some(b) = &spec.billing_group {
        registry::check_billing_group(state, b).map_err(registration_failure)?;
    }
    let wanted_groups = spec.groups.as_ref().map(|g| g.iter().cloned().collect::<BTreeSet<_>>());

    let Some(existing) = state.things.get(&spec.name) else {
        return Ok(ThingPlan {
            logical_id: logical_id.to_owned(),
            name: spec.name.clone(),
            config: ThingConfig {
                thing_type: spec.thing_type.clone(),
                attributes: spec.attributes.clone().unwrap_or_default(),
                billing_group: spec.billing_group.clone(),
            },
            groups: wanted_groups.unwrap_or_default(),
            existing: false,
            changed: true,
        });
    };

    let resource = format!("Thing {}", spec.name);
    let attributes = decide(
        "AttributePayload",
        &resource,
        existing.attributes.clone(),
        spec.attributes.clone(),
        spec.overrides.attributes,
        |mut old, new| {
            old.extend(new);
            old
        },
    )?;
    registry::validate_attributes(&attributes)?;
    let thing_type = decide(
        "ThingTypeName",
        &resource,
        existing.thing_type_name.clone(),
        spec.thing_type.clone().map(Some),
        spec.overrides.thing_type,
        |_, new| new,
    )?;
    let groups = decide(
        "ThingGroups",
        &resource,
        existing.thing_groups.clone(),
        wanted_groups,
        spec.overrides.groups,
        |mut old, new| {
            old.extend(new);
            old
        },
    )?;
    let billing_group = match (&existing.billing_group_name, &spec.billing_group) {
        (Some(old), Some(new)) if old != new => {
            return Err(ApiError::new(
                "ResourceAlreadyExistsException",
                format!("{resource} already exists in billing group {old}, not {new}"),
            ))
        }
        (old, new) => old.clone().or_else(|| new.clone()),
    };
    let changed = attributes != existing.attributes
        || thing_type != existing.thing_type_name
        || groups != existing.thing_groups
        || billing_group != existing.billing_group_name;
    Ok(ThingPlan {
        logical_id: logical_id.to_owned(),
        name: spec.name.clone(),
        config: ThingConfig {
            thing_type,
            attributes,
            billing_group,
        },
        groups,
        existing: true,
        changed,
    })
}

/// The status an existing certificate ends with, by the override setting.
fn existing_cert_status(state: &State, id: &str, spec: &CertSpec) -> Result<Option<String>, ApiError> {
    let Some(cert) = state.certificates.get(id) else {
        return Err(ApiError::new(
            "ResourceRegistrationFailureException",
            format!("The certificate {id} does not exist"),
        ));
    };
    let status = decide(
        "Status",
        &format!("Certificate {id}"),
        cert.status.clone(),
        Some(spec.status.clone()),
        spec.status_override,
        |_, new| new,
    )?;
    if status == cert.status {
        return Ok(None);
    }
    if cert.status == "REVOKED" {
        return Err(ApiError::new(
            "CertificateStateException",
            format!("the certificate {id} is revoked and cannot change status"),
        ));
    }
    Ok(Some(status))
}

fn plan_certificate(state: &State, ctx: Ctx<'_>, spec: &CertSpec, serial: [u8; 16]) -> Result<CertPlan, ApiError> {
    match &spec.source {
        CertSource::Csr(pem) => {
            if pem.is_empty() || pem.len() > 4096 {
                return Err(ApiError::invalid(
                    "the certificate signing request must be 1 to 4096 characters",
                ));
            }
            let csr = ca::verify_csr(pem).map_err(registry::cert_error)?;
            let parsed = ctx.ca.issue(&csr, serial).map_err(registry::cert_error)?;
            Ok(CertPlan::New {
                parsed,
                status: spec.status.clone(),
                ca_id: None,
                from_csr: true,
            })
        }
        CertSource::Pem { pem, ca_pem } => {
            let parsed = ca::parse_certificate(pem).map_err(registry::cert_error)?;
            if state.certificates.contains_key(&parsed.id) {
                let new_status = existing_cert_status(state, &parsed.id, spec)?;
                return Ok(CertPlan::Existing {
                    id: parsed.id,
                    new_status,
                });
            }
            let ca_id = registry::find_issuing_ca(state, &parsed, ca_pem.as_deref())?;
            Ok(CertPlan::New {
                parsed,
                status: spec.status.clone(),
                ca_id,
                from_csr: false,
            })
        }
        CertSource::Id(id) => {
            let id = id.trim_start_matches("0x").to_ascii_lowercase();
            let new_status = existing_cert_status(state, &id, spec)?;
            Ok(CertPlan::Existing { id, new_status })
        }
    }
}

fn plan_policy(state: &State, logical_id: &str, spec: &PolicySpec) -> Result<PolicyPlan, ApiError> {
    match spec {
        PolicySpec::Name(name) => {
            registry::validate_policy_name(name)?;
            if !state.policies.contains_key(name) {
                return Err(ApiError::new(
                    "ResourceRegistrationFailureException",
                    format!("Policy {name} not found"),
                ));
            }
            Ok(PolicyPlan {
                logical_id: logical_id.to_owned(),
                name: name.clone(),
                create: None,
            })
        }
        PolicySpec::Document(document) => {
            registry::validate_policy_document(document)?;
            // An unnamed policy is named by the hash of its document.
            let name = hex::encode(Sha256::digest(document.as_bytes()));
            let create = (!state.policies.contains_key(&name)).then(|| document.clone());
            Ok(PolicyPlan {
                logical_id: logical_id.to_owned(),
                name,
                create,
            })
        }
    }
}

/// Checks every resource of the line and, when all pass, creates them and
/// attaches them to each other.
pub(crate) fn provision(
    state: &mut State,
    ctx: Ctx<'_>,
    resolved: &Resolved,
    serial: [u8; 16],
) -> Result<Provisioned, ApiError> {
    // Cheap checks first; the certificate (which may be signed) last.
    let thing = resolved
        .thing
        .as_ref()
        .map(|t| plan_thing(state, &t.logical_id, &t.spec))
        .transpose()?;
    let policy = resolved
        .policy
        .as_ref()
        .map(|p| plan_policy(state, &p.logical_id, &p.spec))
        .transpose()?;
    let certificate = resolved
        .certificate
        .as_ref()
        .map(|c| Ok::<_, ApiError>((c.logical_id.clone(), plan_certificate(state, ctx, &c.spec, serial)?)))
        .transpose()?;

    Ok(apply(state, ctx, thing, policy, certificate))
}

fn apply(
    state: &mut State,
    ctx: Ctx<'_>,
    thing: Option<ThingPlan>,
    policy: Option<PolicyPlan>,
    certificate: Option<(String, CertPlan)>,
) -> Provisioned {
    let mut provisioned = Provisioned {
        resource_arns: BTreeMap::new(),
        certificate_id: None,
        issued_from_csr: false,
        certificate_created: false,
        attached_to_thing: false,
    };

    let policy_name = policy.map(|plan| {
        if let Some(document) = &plan.create {
            let record = registry::new_policy(state, ctx, &plan.name, document);
            state.policies.insert(plan.name.clone(), record);
        }
        provisioned
            .resource_arns
            .insert(plan.logical_id, ctx.arn("policy", &plan.name));
        plan.name
    });

    let cert_arn = certificate.map(|(logical_id, plan)| {
        let id = match plan {
            CertPlan::New {
                parsed,
                status,
                ca_id,
                from_csr,
            } => {
                let record = registry::new_certificate(state, ctx, &parsed, &status, ca_id);
                state.certificates.insert(parsed.id.clone(), record);
                provisioned.issued_from_csr = from_csr;
                provisioned.certificate_created = true;
                parsed.id
            }
            CertPlan::Existing { id, new_status } => {
                if let (Some(status), Some(cert)) = (new_status, state.certificates.get_mut(&id)) {
                    cert.status = status;
                    cert.last_modified_date = state::now();
                    cert.customer_version += 1;
                }
                id
            }
        };
        let arn = ctx.arn("cert", &id);
        provisioned.resource_arns.insert(logical_id, arn.clone());
        provisioned.certificate_id = Some(id);
        arn
    });

    if let (Some(policy), Some(cert_arn)) = (&policy_name, &cert_arn) {
        state
            .policy_attachments
            .entry(cert_arn.clone())
            .or_default()
            .insert(policy.clone());
    }

    if let Some(plan) = thing {
        let record = if plan.existing {
            state.things.get_mut(&plan.name)
        } else {
            let record = registry::new_thing(state, ctx, &plan.name, plan.config.clone());
            state.things.insert(plan.name.clone(), record);
            state.things.get_mut(&plan.name)
        };
        if let Some(record) = record {
            if plan.existing && plan.changed {
                record.attributes = plan.config.attributes;
                record.thing_type_name = plan.config.thing_type;
                record.billing_group_name = plan.config.billing_group;
                record.version += 1;
            }
            record.thing_groups = plan.groups;
            if let Some(arn) = &cert_arn {
                record.principals.insert(arn.clone());
                provisioned.attached_to_thing = true;
            }
            provisioned
                .resource_arns
                .insert(plan.logical_id, record.thing_arn.clone());
        }
    }
    provisioned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::SandboxCa;
    use crate::iot::template::{Named, ThingOverrides};

    fn thing(name: &str, attrs: &[(&str, &str)], overrides: ThingOverrides) -> Named<ThingSpec> {
        Named {
            logical_id: "thing".into(),
            spec: ThingSpec {
                name: name.into(),
                attributes: Some(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                thing_type: None,
                groups: None,
                billing_group: None,
                overrides,
            },
        }
    }

    fn csr_cert() -> Named<CertSpec> {
        let (_, csr) = crate::ca::tests::p256_csr();
        Named {
            logical_id: "cert".into(),
            spec: CertSpec {
                source: CertSource::Csr(csr),
                status: "ACTIVE".into(),
                status_override: None,
            },
        }
    }

    #[test]
    fn creates_and_attaches_everything() {
        let mut state = State::default();
        let ca = SandboxCa::load_or_create(&mut state).unwrap();
        let ctx = Ctx {
            region: "us-east-1",
            seed: 1,
            ca: &ca,
        };
        let policy = registry::new_policy(&mut state, ctx, "p", "{}");
        state.policies.insert("p".into(), policy);
        let resolved = Resolved {
            thing: Some(thing("d1", &[("serial", "S1")], Default::default())),
            certificate: Some(csr_cert()),
            policy: Some(Named {
                logical_id: "policy".into(),
                spec: PolicySpec::Name("p".into()),
            }),
        };
        let out = provision(&mut state, ctx, &resolved, [1; 16]).unwrap();
        let cert_id = out.certificate_id.clone().unwrap();
        let cert_arn = format!("arn:aws:iot:us-east-1:123456789012:cert/{cert_id}");
        assert_eq!(
            out.resource_arns["thing"],
            "arn:aws:iot:us-east-1:123456789012:thing/d1"
        );
        assert_eq!(out.resource_arns["cert"], cert_arn);
        assert_eq!(
            out.resource_arns["policy"],
            "arn:aws:iot:us-east-1:123456789012:policy/p"
        );
        assert!(out.issued_from_csr);
        assert!(out.certificate_created && out.attached_to_thing);
        assert!(state.things["d1"].principals.contains(&cert_arn));
        assert!(state.policy_attachments[&cert_arn].contains("p"));
        assert_eq!(state.certificates[&cert_id].status, "ACTIVE");
    }

    #[test]
    fn failing_line_leaves_nothing_behind() {
        let mut state = State::default();
        let ca = SandboxCa::load_or_create(&mut state).unwrap();
        let ctx = Ctx {
            region: "us-east-1",
            seed: 1,
            ca: &ca,
        };
        let mut bad_type = thing("d1", &[], Default::default());
        bad_type.spec.thing_type = Some("missing".into());
        let resolved = Resolved {
            thing: Some(bad_type),
            certificate: Some(csr_cert()),
            policy: None,
        };
        let e = provision(&mut state, ctx, &resolved, [1; 16]).unwrap_err();
        assert_eq!(e.code, "ResourceRegistrationFailureException");
        assert_eq!(e.message, "Thing Type 123456789012:missing not found");
        assert!(state.certificates.is_empty() && state.things.is_empty());

        let unknown_policy = Resolved {
            thing: None,
            certificate: Some(csr_cert()),
            policy: Some(Named {
                logical_id: "policy".into(),
                spec: PolicySpec::Name("nope".into()),
            }),
        };
        assert!(provision(&mut state, ctx, &unknown_policy, [1; 16]).is_err());
        assert!(state.certificates.is_empty());
    }

    #[test]
    fn override_settings_for_existing_things() {
        let mut state = State::default();
        let ca = SandboxCa::load_or_create(&mut state).unwrap();
        let ctx = Ctx {
            region: "us-east-1",
            seed: 1,
            ca: &ca,
        };
        let first = Resolved {
            thing: Some(thing("d1", &[("a", "1")], Default::default())),
            ..Default::default()
        };
        provision(&mut state, ctx, &first, [1; 16]).unwrap();

        // Same configuration: fine without override settings.
        provision(&mut state, ctx, &first, [1; 16]).unwrap();
        assert_eq!(state.things["d1"].version, 1);

        // Different, no settings: conflict.
        let changed = Resolved {
            thing: Some(thing("d1", &[("b", "2")], Default::default())),
            ..Default::default()
        };
        let e = provision(&mut state, ctx, &changed, [1; 16]).unwrap_err();
        assert_eq!(e.code, "ResourceAlreadyExistsException", "{e}");

        let with = |o: Override| ThingOverrides {
            attributes: Some(o),
            ..Default::default()
        };
        let fail = Resolved {
            thing: Some(thing("d1", &[("b", "2")], with(Override::Fail))),
            ..Default::default()
        };
        assert!(provision(&mut state, ctx, &fail, [1; 16])
            .unwrap_err()
            .message
            .contains("FAIL"));

        let keep = Resolved {
            thing: Some(thing("d1", &[("b", "2")], with(Override::DoNothing))),
            ..Default::default()
        };
        provision(&mut state, ctx, &keep, [1; 16]).unwrap();
        assert_eq!(
            state.things["d1"].attributes,
            BTreeMap::from([("a".into(), "1".into())])
        );

        let merge = Resolved {
            thing: Some(thing("d1", &[("b", "2")], with(Override::Merge))),
            ..Default::default()
        };
        provision(&mut state, ctx, &merge, [1; 16]).unwrap();
        assert_eq!(state.things["d1"].attributes.len(), 2);
        assert_eq!(state.things["d1"].version, 2);

        let replace = Resolved {
            thing: Some(thing("d1", &[("c", "3")], with(Override::Replace))),
            ..Default::default()
        };
        provision(&mut state, ctx, &replace, [1; 16]).unwrap();
        assert_eq!(
            state.things["d1"].attributes,
            BTreeMap::from([("c".into(), "3".into())])
        );
    }

    #[test]
    fn unnamed_policy_is_named_by_its_hash() {
        let mut state = State::default();
        let ca = SandboxCa::load_or_create(&mut state).unwrap();
        let ctx = Ctx {
            region: "us-east-1",
            seed: 1,
            ca: &ca,
        };
        let doc = "{\"Version\":\"2012-10-17\",\"Statement\":[]}";
        let resolved = Resolved {
            policy: Some(Named {
                logical_id: "policy".into(),
                spec: PolicySpec::Document(doc.into()),
            }),
            ..Default::default()
        };
        let out = provision(&mut state, ctx, &resolved, [1; 16]).unwrap();
        let name = hex::encode(Sha256::digest(doc.as_bytes()));
        assert!(out.resource_arns["policy"].ends_with(&name));
        assert_eq!(state.policies[&name].policy_document, doc);
    }
}
