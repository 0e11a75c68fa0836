//! Pre-flight against the account, before anything is uploaded: the bucket
//! exists (in the task's region), and every thing type, thing group, billing
//! group and policy that any line names exists. Each distinct name is checked
//! once; a missing one is reported with the lines that use it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::aws::{describe, Aws};
use crate::error::{Error, Problem, Problems, Result};
use crate::ingest::Spool;
use crate::stage::{registration_line, Credential, StoredDevice};
use crate::template::Template;

/// A device as pre-flight sees it: its row and where it came from.
fn row_of(d: crate::ingest::Device) -> (StoredDevice, std::sync::Arc<str>, u64) {
    (
        StoredDevice {
            serial: d.serial,
            thing_name: d.thing_name,
            values: d.values,
            device_csr: None,
        },
        d.file,
        d.line,
    )
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

/// Where a name is used: how many rows, and the file and line of the first
/// few (all that a message shows, however large the batch).
#[derive(Default)]
struct UseList {
    count: usize,
    first: Vec<(String, u64)>,
}

const SHOWN: usize = 10;

type Uses = BTreeMap<(Kind, String), UseList>;

/// Every (kind, name) the lines use, with the rows that use it.
fn names_used(template: &Template, rows: &Spool, mapping: &BTreeMap<String, String>) -> Result<Uses> {
    let body: Value = serde_json::from_str(&template.body).map_err(|e| Error::Other(e.into()))?;
    let resources = &body["Resources"];
    let thing = template.thing_resource.as_ref().map(|r| &resources[r]["Properties"]);
    let policy = template.policy_resource.as_ref().map(|r| &resources[r]["Properties"]);
    let mut used: Uses = BTreeMap::new();
    for row in rows.iter() {
        let (device, file, line_no) = row_of(row?);
        let cred = Credential {
            csr_pem: "",
            certificate_pem: Some(""),
            ca_pem: Some(""),
        };
        let text = registration_line(template, &device, &cred, mapping).map_err(Error::config)?;
        let line: serde_json::Map<String, Value> = serde_json::from_str(&text).map_err(|e| Error::Other(e.into()))?;
        let mut add = |kind: Kind, v: &Value| {
            if let Some(name) = resolve(v, &line, &template.parameters).filter(|n| !n.is_empty()) {
                let u = used.entry((kind, name)).or_default();
                u.count += 1;
                if u.first.len() < SHOWN {
                    u.first.push((file.to_string(), line_no));
                }
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

/// Whether a role trust policy lets AWS IoT assume the role: an Allow
/// statement for `sts:AssumeRole` with the service principal
/// `iot.amazonaws.com`.
pub fn trusts_iot(document: &str) -> std::result::Result<bool, String> {
    let decoded = percent_encoding::percent_decode_str(document)
        .decode_utf8()
        .map_err(|e| format!("the trust policy is not UTF-8: {e}"))?;
    let v: Value = serde_json::from_str(&decoded).map_err(|e| format!("the trust policy is not JSON: {e}"))?;
    let as_list = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        }
    };
    let statements = match &v["Statement"] {
        Value::Array(a) => a.clone(),
        Value::Object(_) => vec![v["Statement"].clone()],
        _ => Vec::new(),
    };
    Ok(statements.iter().any(|st| {
        st["Effect"] == "Allow"
            && as_list(&st["Action"])
                .iter()
                .any(|a| a == "sts:AssumeRole" || a == "sts:*" || a == "*")
            && as_list(&st["Principal"]["Service"])
                .iter()
                .any(|s| s == "iot.amazonaws.com")
    }))
}

/// The role the task runs under: it must exist and trust AWS IoT. When IAM
/// cannot be read with these credentials, that is said and the check skipped.
async fn check_role(aws: &Aws, role_arn: &str, problems: &mut Problems) {
    let Some(name) = role_arn.split(":role/").nth(1).and_then(|p| p.rsplit('/').next()) else {
        problems.push(Problem::new(format!(
            "`{role_arn}` is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
        )));
        return;
    };
    match aws.iam.get_role().role_name(name).send().await {
        Ok(out) => {
            let doc = out.role().and_then(|r| r.assume_role_policy_document()).unwrap_or("");
            match trusts_iot(doc) {
                Ok(true) => {}
                Ok(false) => problems.push(Problem::new(format!(
                    "role `{name}` does not trust AWS IoT: its trust policy needs an Allow statement for sts:AssumeRole with the service principal iot.amazonaws.com, or the task cannot start"
                ))),
                Err(e) => problems.push(Problem::new(format!("role `{name}`: {e}"))),
            }
        }
        Err(e) => {
            let text = describe_iam(&e);
            if text.contains("NoSuchEntity") {
                problems.push(Problem::new(format!(
                    "role `{name}` ({role_arn}) does not exist; create a role that trusts iot.amazonaws.com and may read the bucket, or name another with --role-arn"
                )));
            } else {
                tracing::warn!(role = %role_arn, "cannot read the role from IAM ({text}); its trust policy is not checked");
            }
        }
    }
}

fn describe_iam<E, R>(err: &aws_sdk_iam::error::SdkError<E, R>) -> String
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        aws_sdk_iam::error::SdkError::ServiceError(se) => format!(
            "{}: {}",
            se.err().code().unwrap_or("error"),
            se.err().message().unwrap_or("no message")
        ),
        other => format!("{}", aws_smithy_types::error::display::DisplayErrorContext(other)),
    }
}

/// Runs every check and reports every problem at once.
pub async fn check(
    aws: &Aws,
    template: &Template,
    bucket: &str,
    role_arn: &str,
    rows: &Spool,
    mapping: &BTreeMap<String, String>,
) -> Result<()> {
    let mut problems = Problems::default();
    check_role(aws, role_arn, &mut problems).await;
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
                let shown: Vec<String> = lines.first.iter().map(|(f, l)| format!("{f}:{l}")).collect();
                let more = if lines.count > SHOWN {
                    format!(" and {} more", lines.count - SHOWN)
                } else {
                    String::new()
                };
                let fix = if lines.count == rows.len() {
                    "Create it first, or name another in the template or profile (or with --policy)"
                } else {
                    "Create it first, or correct the rows"
                };
                problems.push(Problem::new(format!(
                    "{} `{name}` does not exist in the account; {} line{} use{} it: {}{more}. {fix}",
                    kind.noun(),
                    lines.count,
                    if lines.count == 1 { "" } else { "s" },
                    if lines.count == 1 { "s" } else { "" },
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
// TODO(preflight-scale): one ListThingPrincipals per device, 16 at a time, is 0.7 s for 10,000 devices against the sandbox but hours for a million against an account's API rate; a large batch needs a listing of the account's things instead.
async fn existing_things(aws: &Aws, rows: &Spool, problems: &mut Problems) -> Result<()> {
    const AT_ONCE: usize = 16;
    let mut found: Vec<(crate::ingest::Device, usize)> = Vec::new();
    let mut all = rows.iter();
    loop {
        let chunk: Vec<crate::ingest::Device> = all.by_ref().take(AT_ONCE).collect::<Result<_>>()?;
        if chunk.is_empty() {
            break;
        }
        let mut set = tokio::task::JoinSet::new();
        for (i, row) in chunk.iter().enumerate() {
            let aws = aws.clone();
            let name = row.thing_name.clone();
            set.spawn(async move {
                let r = aws.iot.list_thing_principals().thing_name(&name).send().await;
                (
                    i,
                    r.map(|p| p.principals().iter().filter(|a| a.contains(":cert/")).count())
                        .map_err(|e| describe(&e)),
                )
            });
        }
        let mut hits = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|e| Error::Other(e.into()))?;
            match r {
                Ok(0) => {}
                Ok(n) => hits.push((i, n)),
                Err(text) if text.contains("ResourceNotFound") => {}
                Err(text) => return Err(Error::infra(format!("checking whether things exist: {text}"))),
            }
        }
        hits.sort();
        let mut chunk: Vec<Option<crate::ingest::Device>> = chunk.into_iter().map(Some).collect();
        for (i, n) in hits {
            if let Some(d) = chunk[i].take() {
                found.push((d, n));
            }
        }
    }
    for (row, n) in found {
        problems.push(
            Problem::new(format!(
                "thing `{}` already exists in the account with {n} certificate{} attached; registering it again would give it another. Remove the row, or retire the old certificate first (--no-preflight skips this check)",
                row.thing_name,
                if n == 1 { "" } else { "s" }
            ))
            .file(row.file.to_string())
            .line(row.line)
            .device(row.thing_name.clone()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_policy_must_name_iot_as_service() {
        let iot = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":["lambda.amazonaws.com","iot.amazonaws.com"]},"Action":"sts:AssumeRole"}]}"#;
        assert_eq!(trusts_iot(iot), Ok(true));
        let encoded = percent_encoding::utf8_percent_encode(iot, percent_encoding::NON_ALPHANUMERIC).to_string();
        assert_eq!(trusts_iot(&encoded), Ok(true), "IAM returns the document URL-encoded");
        let lambda = r#"{"Statement":{"Effect":"Allow","Principal":{"Service":"lambda.amazonaws.com"},"Action":"sts:AssumeRole"}}"#;
        assert_eq!(trusts_iot(lambda), Ok(false));
        let denied =
            r#"{"Statement":{"Effect":"Deny","Principal":{"Service":"iot.amazonaws.com"},"Action":"sts:AssumeRole"}}"#;
        assert_eq!(trusts_iot(denied), Ok(false));
        assert!(trusts_iot("{").is_err());
    }
}
