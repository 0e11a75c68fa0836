//! What `--sandbox` fills in: the embedded sandbox's account, bucket, role
//! and policy, so a newcomer can run the main job with no AWS at all.

use crate::aws::{describe, Aws, Connection};
use crate::error::{Error, Result};

pub const SANDBOX_BUCKET: &str = "provline-sandbox";
pub const SANDBOX_POLICY: &str = "provline-sandbox-device";
pub const SANDBOX_REGION: &str = "us-east-1";

pub fn sandbox_role_arn() -> String {
    format!(
        "arn:aws:iam::{}:role/provline-sandbox-registration",
        provline_sandbox::ACCOUNT_ID
    )
}

pub fn connection(endpoint_url: &str) -> Connection {
    Connection {
        region: Some(SANDBOX_REGION.to_string()),
        profile: None,
        endpoint_url: Some(endpoint_url.to_string()),
        static_credentials: Some((
            provline_sandbox::ACCESS_KEY_ID.to_string(),
            provline_sandbox::SECRET_ACCESS_KEY.to_string(),
        )),
    }
}

/// Creates the bucket and the device policy when the sandbox lacks them.
pub async fn prepare_account(aws: &Aws, bucket: &str, policy: Option<&str>) -> Result<()> {
    if aws.s3.head_bucket().bucket(bucket).send().await.is_err() {
        aws.s3.create_bucket().bucket(bucket).send().await.map_err(|e| {
            Error::infra(format!(
                "creating the sandbox bucket {bucket}: {}",
                crate::stage::s3_describe(&e)
            ))
        })?;
    }
    let role = "provline-sandbox-registration";
    if aws.iam.get_role().role_name(role).send().await.is_err() {
        let trust = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"}, "Action": "sts:AssumeRole"}]
        });
        aws.iam
            .create_role()
            .role_name(role)
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .map_err(|e| Error::infra(format!("creating the sandbox role {role}: {e}")))?;
    }
    if let Some(policy) = policy {
        if aws.iot.get_policy().policy_name(policy).send().await.is_err() {
            let doc = serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
                    {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": "arn:aws:iot:*:*:topic/devices/${iot:Connection.Thing.ThingName}/*"},
                    {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": "arn:aws:iot:*:*:topicfilter/devices/${iot:Connection.Thing.ThingName}/*"}
                ]
            });
            aws.iot
                .create_policy()
                .policy_name(policy)
                .policy_document(doc.to_string())
                .send()
                .await
                .map_err(|e| Error::infra(format!("creating the sandbox policy {policy}: {}", describe(&e))))?;
        }
    }
    Ok(())
}

/// The account's ATS data endpoint, for device.json.
pub async fn data_endpoint(aws: &Aws) -> Result<String> {
    let out = aws
        .iot
        .describe_endpoint()
        .endpoint_type("iot:Data-ATS")
        .send()
        .await
        .map_err(|e| Error::infra(format!("DescribeEndpoint iot:Data-ATS: {}", describe(&e))))?;
    out.endpoint_address()
        .map(String::from)
        .ok_or_else(|| Error::infra("DescribeEndpoint returned no address"))
}
