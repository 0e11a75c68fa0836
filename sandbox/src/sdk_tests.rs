//! Tests of a running sandbox through the real AWS SDK clients.

use aws_sdk_iam::error::ProvideErrorMetadata as _;

use crate::{Config, Sandbox};

const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"iot.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

fn credentials() -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(crate::ACCESS_KEY_ID, crate::SECRET_ACCESS_KEY, None, None, "sandbox")
}

/// An IAM client for the sandbox (IAM signs for us-east-1).
pub(crate) fn iam_client(sandbox: &Sandbox) -> aws_sdk_iam::Client {
    let config = aws_sdk_iam::Config::builder()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new("us-east-1"))
        .credentials_provider(credentials())
        .endpoint_url(sandbox.endpoint_url())
        .build();
    aws_sdk_iam::Client::from_conf(config)
}

/// An IoT client for the sandbox.
#[allow(dead_code)] // used by the IoT tests that follow
pub(crate) fn iot_client(sandbox: &Sandbox) -> aws_sdk_iot::Client {
    let config = aws_sdk_iot::Config::builder()
        .behavior_version(aws_sdk_iot::config::BehaviorVersion::latest())
        .region(aws_sdk_iot::config::Region::new("us-east-1"))
        .credentials_provider(credentials())
        .endpoint_url(sandbox.endpoint_url())
        .build();
    aws_sdk_iot::Client::from_conf(config)
}

/// The HTTP status of an SDK error's raw response.
pub(crate) fn status_of<E>(e: &aws_sdk_iam::error::SdkError<E>) -> u16 {
    e.raw_response().map(|r| r.status().as_u16()).unwrap_or_default()
}

#[tokio::test]
async fn iam_roles_through_the_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::default()
    };
    let sandbox = Sandbox::start(config.clone()).await.unwrap();
    let iam = iam_client(&sandbox);

    let created = iam
        .create_role()
        .role_name("provline-provisioning")
        .path("/service-role/")
        .description("bulk registration")
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .unwrap();
    let role = created.role().unwrap();
    assert_eq!(
        role.arn(),
        "arn:aws:iam::123456789012:role/service-role/provline-provisioning"
    );
    assert_eq!(role.path(), "/service-role/");
    assert_eq!(role.role_name(), "provline-provisioning");
    assert!(role.role_id().starts_with("AROA") && role.role_id().len() == 21);
    let role_id = role.role_id().to_owned();

    let got = iam.get_role().role_name("provline-provisioning").send().await.unwrap();
    let role = got.role().unwrap();
    assert_eq!(role.role_id(), role_id);
    assert_eq!(role.description(), Some("bulk registration"));
    assert_eq!(role.max_session_duration(), Some(3600));
    // IAM URL-encodes the document, and the SDK does not decode it.
    let encoded = role.assume_role_policy_document().unwrap();
    assert!(encoded.starts_with("%7B%22Version%22"), "{encoded}");
    let decoded = percent_encoding::percent_decode_str(encoded).decode_utf8().unwrap();
    assert_eq!(decoded, TRUST);
    let age = aws_smithy_types::DateTime::from(std::time::SystemTime::now()).secs() - role.create_date().secs();
    assert!((0..60).contains(&age), "created {age} s ago");

    let again = iam
        .create_role()
        .role_name("provline-provisioning")
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .unwrap_err();
    assert!(again.as_service_error().unwrap().is_entity_already_exists_exception());
    assert_eq!(status_of(&again), 409);

    let malformed = iam
        .create_role()
        .role_name("other")
        .assume_role_policy_document("not json")
        .send()
        .await
        .unwrap_err();
    assert!(malformed
        .as_service_error()
        .unwrap()
        .is_malformed_policy_document_exception());
    assert_eq!(status_of(&malformed), 400);

    let missing = iam.get_role().role_name("nope").send().await.unwrap_err();
    let service = missing.as_service_error().unwrap();
    assert!(service.is_no_such_entity_exception());
    assert_eq!(service.message(), Some("The role with name nope cannot be found."));
    assert_eq!(status_of(&missing), 404);

    iam.create_role()
        .role_name("second")
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .unwrap();
    let listed = iam.list_roles().send().await.unwrap();
    let names: Vec<&str> = listed.roles().iter().map(|r| r.role_name()).collect();
    assert_eq!(names, ["provline-provisioning", "second"]);
    assert!(!listed.is_truncated());
    let paged = iam.list_roles().max_items(1).send().await.unwrap();
    assert!(paged.is_truncated());
    assert_eq!(paged.marker(), Some("second"));
    let scoped = iam.list_roles().path_prefix("/service-role/").send().await.unwrap();
    assert_eq!(scoped.roles().len(), 1);

    iam.delete_role().role_name("second").send().await.unwrap();
    let deleted = iam.get_role().role_name("second").send().await.unwrap_err();
    assert_eq!(deleted.code(), Some("NoSuchEntity"));
    sandbox.shutdown().await.unwrap();

    // Roles are kept across a restart.
    let sandbox = Sandbox::start(config).await.unwrap();
    let got = iam_client(&sandbox)
        .get_role()
        .role_name("provline-provisioning")
        .send()
        .await
        .unwrap();
    assert_eq!(got.role().unwrap().role_id(), role_id);
    let listed = iam_client(&sandbox).list_roles().send().await.unwrap();
    assert_eq!(listed.roles().len(), 1);
    sandbox.shutdown().await.unwrap();
}
