//! Pre-flight against the account, before anything is uploaded: the bucket
//! exists (in the task's region), and every thing type, thing group, billing
//! group and policy that any line names exists. Each distinct name is checked
//! once; a missing one is reported with the lines that use it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::aws::{describe, Aws};
use crate::error::{Error, Problem, Problems, Result};
use crate::stage::{registration_line, Credential, StoredDevice};
use crate::template::Template;

/// A device as pre-flight sees it: its row and where it came from.
pub struct Row<'a> {
    pub device: StoredDevice,
    pub file: &'a str,
    pub line: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ThingType,
    ThingGroup,
    BillingGroup,
    Policy,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::ThingType => "thing type",
            Kind::ThingGroup => "thing group",
            Kind::BillingGroup => "billing group",
            Kind::Policy => "policy",
        }
    }
}

/// Resolves a template value for one line: a literal, or a `Ref` to a parameter.
fn resolve(
    v: &Value,
    line: &serde_json::Map<String, Value>,
    defaults: &BTreeMap<String, Option<String>>,
) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => {
            let p = o.get("Ref")?.as_str()?;
            line.get(p)
                .and_then(Value::as_str)
                .map(String::from)
                .or_else(|| defaults.get(p).cloned().flatten())
        }
        _ => None,
    }
}

/// Where a name is used: file and line of each row.
type Uses = BTreeMap<(Kind, String), Vec<(String, u64)>>;

/// Every (kind, name) the lines use, with the rows that use it.
fn names_used(template: &Template, rows: &[Row<'_>], mapping: &BTreeMap<String, String>) -> Result<Uses> {
    let body: Value = serde_json::from_str(&template.body).map_err(|e| Error::Other(e.into()))?;
    let resources = &body["Resources"];
    let thing = template.thing_resource.as_ref().map(|r| &resources[r]["Properties"]);
    let policy = template.policy_resource.as_ref().map(|r| &resources[r]["Properties"]);
    let mut used: Uses = BTreeMap::new();
    for row in rows {
        let cred = Credential {
            csr_pem: "",
            certificate_pem: Some(""),
            ca_pem: Some(""),
        };
        let text = registration_line(template, &row.device, &cred, mapping).map_err(Error::config)?;
        let line: serde_json::Map<String, Value> = serde_json::from_str(&text).map_err(|e| Error::Other(e.into()))?;
        let mut add = |kind: Kind, v: &Value| {
            if let Some(name) = resolve(v, &line, &template.parameters).filter(|n| !n.is_empty()) {
                used.entry((kind, name))
                    .or_default()
                    .push((row.file.to_string(), row.line));
            }
        };
        if let Some(t) = thing {
            if let Some(v) = t.get("ThingTypeName") {
                add(Kind::ThingType, v);
            }
            if let Some(Value::Array(groups)) = t.get("ThingGroups") {
                for g in groups {
                    add(Kind::ThingGroup, g);
                }
            }
            if let Some(v) = t.get("BillingGroup") {
                add(Kind::BillingGroup, v);
            }
        }
        if let Some(v) = policy.and_then(|p| p.get("PolicyName")) {
            add(Kind::Policy, v);
        }
    }
    Ok(used)
}

/// Runs every check and reports every problem at once.
// TODO(iam): the role is not checked (exists, trusts iot.amazonaws.com, can read the bucket): provline has no IAM client and the sandbox no IAM.
pub async fn check(
    aws: &Aws,
    template: &Template,
    bucket: &str,
    rows: &[Row<'_>],
    mapping: &BTreeMap<String, String>,
) -> Result<()> {
    let mut problems = Problems::default();
    match aws.s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => {
            if let Ok(loc) = aws.s3.get_bucket_location().bucket(bucket).send().await {
                let region = loc
                    .location_constraint()
                    .map(|c| c.as_str().to_string())
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| "us-east-1".to_string());
                if region != aws.region {
                    problems.push(Problem::new(format!(
                        "bucket `{bucket}` is in {region}, but the task runs in {}; AWS IoT reads the registration file only from a bucket in the task's region",
                        aws.region
                    )));
                }
            }
        }
        Err(e) => {
            let text = crate::stage::s3_describe(&e);
            if text.contains("NotFound") || text.contains("NoSuchBucket") || text.contains("404") {
                problems.push(Problem::new(format!(
                    "bucket `{bucket}` does not exist (or is not visible to these credentials); create it in {} or name another with --bucket",
                    aws.region
                )));
            } else {
                return Err(Error::infra(format!("checking bucket `{bucket}`: {text}")));
            }
        }
    }
    let used = names_used(template, rows, mapping)?;
    for ((kind, name), lines) in &used {
        let found = match kind {
            Kind::ThingType => aws
                .iot
                .describe_thing_type()
                .thing_type_name(name)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e)),
            Kind::ThingGroup => aws
                .iot
                .describe_thing_group()
                .thing_group_name(name)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e)),
            Kind::BillingGroup => aws
                .iot
                .describe_billing_group()
                .billing_group_name(name)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e)),
            Kind::Policy => aws
                .iot
                .get_policy()
                .policy_name(name)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e)),
        };
        match found {
            Ok(()) => {}
            Err(text) if text.contains("ResourceNotFound") => {
                let shown: Vec<String> = lines.iter().take(10).map(|(f, l)| format!("{f}:{l}")).collect();
                let more = if lines.len() > 10 {
                    format!(" and {} more", lines.len() - 10)
                } else {
                    String::new()
                };
                let fix = if lines.len() == rows.len() {
                    "Create it first, or name another in the template or profile (or with --policy)"
                } else {
                    "Create it first, or correct the rows"
                };
                problems.push(Problem::new(format!(
                    "{} `{name}` does not exist in the account; {} line{} use{} it: {}{more}. {fix}",
                    kind.noun(),
                    lines.len(),
                    if lines.len() == 1 { "" } else { "s" },
                    if lines.len() == 1 { "s" } else { "" },
                    shown.join(", ")
                )));
            }
            Err(text) => return Err(Error::infra(format!("checking {} `{name}`: {text}", kind.noun()))),
        }
    }
    existing_things(aws, rows, &mut problems).await?;
    tracing::info!(
        checked = used.len() + 1,
        problems = problems.len(),
        "pre-flight against the account"
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Input(problems))
    }
}

/// Things that already exist with a certificate attached: registering them
/// again would give each a second certificate.
async fn existing_things(aws: &Aws, rows: &[Row<'_>], problems: &mut Problems) -> Result<()> {
    const AT_ONCE: usize = 16;
    let mut found: Vec<(usize, usize)> = Vec::new();
    for (chunk_no, chunk) in rows.chunks(AT_ONCE).enumerate() {
        let mut set = tokio::task::JoinSet::new();
        for (i, row) in chunk.iter().enumerate() {
            let aws = aws.clone();
            let name = row.device.thing_name.clone();
            set.spawn(async move {
                let r = aws.iot.list_thing_principals().thing_name(&name).send().await;
                (
                    i,
                    r.map(|p| p.principals().iter().filter(|a| a.contains(":cert/")).count())
                        .map_err(|e| describe(&e)),
                )
            });
        }
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|e| Error::Other(e.into()))?;
            match r {
                Ok(0) => {}
                Ok(n) => found.push((chunk_no * AT_ONCE + i, n)),
                Err(text) if text.contains("ResourceNotFound") => {}
                Err(text) => return Err(Error::infra(format!("checking whether things exist: {text}"))),
            }
        }
    }
    found.sort();
    for (i, n) in found {
        let row = &rows[i];
        problems.push(
            Problem::new(format!(
                "thing `{}` already exists in the account with {n} certificate{} attached; registering it again would give it another. Remove the row, or retire the old certificate first (--no-preflight skips this check)",
                row.device.thing_name,
                if n == 1 { "" } else { "s" }
            ))
            .file(row.file.to_string())
            .line(row.line)
            .device(row.device.thing_name.clone()),
        );
    }
    Ok(())
}
