//! `provline approve`: the JITR approval step. AWS holds the certificates of
//! devices that connected once as PENDING_ACTIVATION; this activates exactly
//! those that belong to the batch (by certificate id, against the ledger),
//! gives each its thing, policy and principal, and reports any stranger the
//! same CA signed without activating it.
//!
//! Order per device: thing, policy, principal, and only then the certificate
//! turns ACTIVE. A crash part-way leaves it pending with idempotent steps
//! done, and the next `approve` finishes it.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_iot::types::{AttributePayload, CertificateStatus};

use crate::aws::{describe, Aws};
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::run::{Mode, Settings};
use crate::stage::StoredDevice;
use crate::template::Template;

/// One device to activate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Activation {
    pub thing_name: String,
    pub certificate_id: String,
    pub certificate_arn: String,
    pub attributes: BTreeMap<String, String>,
}

/// What `approve` found and would do.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Plan {
    pub ca_certificate_id: String,
    pub policy: Option<String>,
    pub thing_type: Option<String>,
    /// Pending certificates of this batch: to activate.
    pub activate: Vec<Activation>,
    /// Pending certificates of the CA that are not in this batch: never activated.
    pub strangers: Vec<String>,
    /// Devices of the batch whose certificate is active already.
    pub active: Vec<String>,
    /// Devices of the batch AWS has not seen yet (they have not connected).
    pub not_seen: Vec<String>,
    /// Devices of the batch whose certificate AWS holds in another state.
    pub other: Vec<(String, String)>,
}

/// Reads the ledger and the account and works out what to do.
pub async fn plan(aws: &Aws, ledger: &Ledger, batch: &str) -> Result<(Settings, Plan)> {
    let b = ledger
        .batch(batch)?
        .ok_or_else(|| Error::config(format!("no batch `{batch}` in this ledger")))?;
    let settings: Settings =
        serde_json::from_str(&b.settings).map_err(|e| Error::infra(format!("ledger settings of {batch}: {e}")))?;
    if settings.mode != Mode::Jitr {
        return Err(Error::config(format!(
            "{batch} is a {} batch; `approve` is for JITR batches (`provline run --mode jitr`)",
            settings.mode.as_str()
        )));
    }
    let ca_id = settings
        .ca_id
        .clone()
        .ok_or_else(|| Error::infra(format!("{batch}: the ledger names no CA")))?;
    let template = Template::check(&settings.template_source, &settings.template_body).map_err(Error::Input)?;
    let body: serde_json::Value = serde_json::from_str(&settings.template_body).map_err(|e| Error::Other(e.into()))?;
    let thing_type = template
        .thing_resource
        .as_ref()
        .and_then(|r| body["Resources"][r]["Properties"]["ThingTypeName"].as_str())
        .map(String::from);
    let rows = ledger.devices(batch)?;
    let ours: HashMap<String, &crate::ledger::DeviceRow> = rows
        .iter()
        .filter_map(|r| r.certificate_id.clone().map(|c| (c.to_ascii_lowercase(), r)))
        .collect();
    let held = crate::ca_aws::list_certificates_by_ca(aws, &ca_id).await?;
    let mut plan = Plan {
        ca_certificate_id: ca_id,
        policy: template.policy_name.clone(),
        thing_type,
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    for (id, status, arn) in held {
        let id_l = id.to_ascii_lowercase();
        match ours.get(&id_l) {
            Some(row) => {
                seen.insert(id_l);
                match status.as_str() {
                    "PENDING_ACTIVATION" => {
                        let sd: StoredDevice = serde_json::from_str(&row.record)
                            .map_err(|e| Error::infra(format!("ledger record of `{}`: {e}", row.thing_name)))?;
                        let attributes = template
                            .attribute_params
                            .iter()
                            .filter_map(|(attr, param)| {
                                let col = template.column_of(param, &settings.parameters);
                                sd.values
                                    .get(&col)
                                    .filter(|v| !v.is_empty())
                                    .map(|v| (attr.clone(), v.clone()))
                            })
                            .collect();
                        plan.activate.push(Activation {
                            thing_name: row.thing_name.clone(),
                            certificate_id: id,
                            certificate_arn: arn,
                            attributes,
                        });
                    }
                    "ACTIVE" => plan.active.push(row.thing_name.clone()),
                    other => plan.other.push((row.thing_name.clone(), other.to_string())),
                }
            }
            None if status == "PENDING_ACTIVATION" => plan.strangers.push(id),
            None => {}
        }
    }
    for (id, row) in &ours {
        if !seen.contains(id) {
            plan.not_seen.push(row.thing_name.clone());
        }
    }
    plan.not_seen.sort();
    plan.activate.sort_by(|a, b| a.thing_name.cmp(&b.thing_name));
    Ok((settings, plan))
}

/// Carries the plan out; returns the devices activated and the failures.
pub async fn apply(aws: &Aws, plan: &Plan) -> (Vec<String>, Vec<(String, String)>) {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for a in &plan.activate {
        match activate(aws, plan, a).await {
            Ok(()) => {
                tracing::info!(thing = %a.thing_name, certificate = %a.certificate_id, "activated");
                done.push(a.thing_name.clone());
            }
            Err(e) => {
                tracing::error!(thing = %a.thing_name, "{e}");
                failed.push((a.thing_name.clone(), e));
            }
        }
    }
    (done, failed)
}

async fn activate(aws: &Aws, plan: &Plan, a: &Activation) -> std::result::Result<(), String> {
    let exists = match aws.iot.describe_thing().thing_name(&a.thing_name).send().await {
        Ok(_) => true,
        Err(e) if describe(&e).contains("ResourceNotFound") => false,
        Err(e) => return Err(format!("DescribeThing: {}", describe(&e))),
    };
    let payload = AttributePayload::builder()
        .set_attributes(Some(a.attributes.clone().into_iter().collect()))
        .merge(true)
        .build();
    if exists {
        if !a.attributes.is_empty() {
            aws.iot
                .update_thing()
                .thing_name(&a.thing_name)
                .attribute_payload(payload)
                .send()
                .await
                .map_err(|e| format!("UpdateThing: {}", describe(&e)))?;
        }
    } else {
        aws.iot
            .create_thing()
            .thing_name(&a.thing_name)
            .attribute_payload(payload)
            .set_thing_type_name(plan.thing_type.clone())
            .send()
            .await
            .map_err(|e| format!("CreateThing: {}", describe(&e)))?;
    }
    if let Some(policy) = &plan.policy {
        aws.iot
            .attach_policy()
            .policy_name(policy)
            .target(&a.certificate_arn)
            .send()
            .await
            .map_err(|e| format!("AttachPolicy {policy}: {}", describe(&e)))?;
    }
    aws.iot
        .attach_thing_principal()
        .thing_name(&a.thing_name)
        .principal(&a.certificate_arn)
        .send()
        .await
        .map_err(|e| format!("AttachThingPrincipal: {}", describe(&e)))?;
    aws.iot
        .update_certificate()
        .certificate_id(&a.certificate_id)
        .new_status(CertificateStatus::Active)
        .send()
        .await
        .map_err(|e| format!("UpdateCertificate ACTIVE: {}", describe(&e)))?;
    Ok(())
}
