//! Tests of a running sandbox through the real AWS SDK clients.

use aws_sdk_iam::error::ProvideErrorMetadata as _;
use aws_sdk_iot::types::{
    AutoRegistrationStatus, CaCertificateStatus, CertificateMode, CertificateStatus, RegistrationConfig, TemplateType,
};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::{Config, Sandbox};

/// The role the JITP templates of the tests name.
pub(crate) const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/provline-jitp";

/// A JITP template that names the thing by the certificate's common name
/// and records its country and serial number as attributes.
pub(crate) const JITP_TEMPLATE: &str = r#"{
  "Parameters": {
    "AWS::IoT::Certificate::CommonName": {"Type": "String"},
    "AWS::IoT::Certificate::Country": {"Type": "String"},
    "AWS::IoT::Certificate::SerialNumber": {"Type": "String", "Default": "none"},
    "AWS::IoT::Certificate::Id": {"Type": "String"}
  },
  "Resources": {
    "thing": {"Type": "AWS::IoT::Thing", "Properties": {
      "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
      "AttributePayload": {"country": {"Ref": "AWS::IoT::Certificate::Country"},
                           "serial": {"Ref": "AWS::IoT::Certificate::SerialNumber"}}}},
    "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
      "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
    "policy": {"Type": "AWS::IoT::Policy", "Properties": {
      "PolicyDocument": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"iot:Connect\",\"Resource\":\"*\"}]}"}}
  }
}"#;

/// A CA of the tests' own (P-256), as a device maker would have.
pub(crate) struct TestCa {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "device maker");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for a fresh key with this subject: its PEM and the key.
    pub fn sign(&self, subject: &[(DnType, &str)]) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for (kind, value) in subject {
            dn.push(kind.clone(), *value);
        }
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key)
    }

    /// An X.509 v1 certificate (no version field, no extensions), as
    /// `openssl x509 -req` makes them: its PEM and the key.
    pub fn sign_v1(&self, subject: &[(DnType, &str)]) -> (String, KeyPair) {
        use x509_parser::prelude::{FromDer as _, X509Certificate};

        fn der(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            match content.len() {
                n if n < 0x80 => out.push(n as u8),
                n if n <= 0xff => out.extend([0x81, n as u8]),
                n => out.extend([0x82, (n >> 8) as u8, n as u8]),
            }
            out.extend_from_slice(content);
            out
        }

        // The subject and key, from a throwaway certificate.
        let (template, key) = self.sign(subject);
        let template_der = pem::parse(&template).unwrap().into_contents();
        let (_, template) = X509Certificate::from_der(&template_der).unwrap();
        let ca_der = pem::parse(&self.pem).unwrap().into_contents();
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        let ecdsa_sha256 = der(0x30, &der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]));
        let validity = [der(0x17, b"250101000000Z"), der(0x17, b"491231235959Z")].concat();
        let tbs = der(
            0x30,
            &[
                der(0x02, &[0x01, 0x23, 0x45, 0x67]),
                ecdsa_sha256.clone(),
                ca.subject().as_raw().to_vec(),
                der(0x30, &validity),
                template.subject().as_raw().to_vec(),
                template.public_key().raw.to_vec(),
            ]
            .concat(),
        );
        let ca_key = KeyPair::from_pem(&self.key_pem).unwrap();
        let signature = rcgen::SigningKey::sign(&ca_key, &tbs).unwrap();
        let cert = der(
            0x30,
            &[tbs, ecdsa_sha256, der(0x03, &[&[0u8][..], &signature].concat())].concat(),
        );
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert));
        (pem, key)
    }

    /// The verification certificate for a registration code.
    pub fn verification(&self, code: &str) -> String {
        self.sign(&[(DnType::CommonName, code)]).0
    }
}

/// The certificate id (SHA-256 of the DER) of a certificate PEM.
pub(crate) fn cert_id(pem: &str) -> String {
    crate::ca::parse_certificate(pem).unwrap().id
}

/// Registers `ca` in DEFAULT mode, active, with auto-registration and the
/// registration config given; answers its certificate id.
pub(crate) async fn register_ca(iot: &aws_sdk_iot::Client, ca: &TestCa, config: Option<RegistrationConfig>) -> String {
    let code = iot.get_registration_code().send().await.unwrap();
    let registered = iot
        .register_ca_certificate()
        .ca_certificate(&ca.pem)
        .verification_certificate(ca.verification(code.registration_code().unwrap()))
        .set_as_active(true)
        .allow_auto_registration(true)
        .set_registration_config(config)
        .send()
        .await
        .unwrap();
    registered.certificate_id().unwrap().to_owned()
}

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
    let calls = &sandbox.stats()["iam_calls"];
    assert_eq!(calls["CreateRole"], 4);
    assert_eq!(calls["GetRole"], 3);
    assert_eq!(calls["ListRoles"], 3);
    assert_eq!(calls["DeleteRole"], 1);
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

#[tokio::test]
async fn own_ca_registration_through_the_sdk() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    let ca = TestCa::new("maker CA 1");
    let code = iot.get_registration_code().send().await.unwrap();
    let code = code.registration_code().unwrap().to_owned();

    // DEFAULT mode needs a verification certificate with the code, signed by the CA.
    let no_verification = iot
        .register_ca_certificate()
        .ca_certificate(&ca.pem)
        .send()
        .await
        .unwrap_err();
    assert!(no_verification
        .as_service_error()
        .unwrap()
        .is_invalid_request_exception());
    let wrong_code = iot
        .register_ca_certificate()
        .ca_certificate(&ca.pem)
        .verification_certificate(ca.verification("not-the-code"))
        .send()
        .await
        .unwrap_err();
    assert!(wrong_code
        .as_service_error()
        .unwrap()
        .is_registration_code_validation_exception());
    let other = TestCa::new("someone else");
    let wrong_signer = iot
        .register_ca_certificate()
        .ca_certificate(&ca.pem)
        .verification_certificate(other.verification(&code))
        .send()
        .await
        .unwrap_err();
    assert!(wrong_signer
        .as_service_error()
        .unwrap()
        .is_certificate_validation_exception());
    let bad_template = iot
        .register_ca_certificate()
        .ca_certificate(&ca.pem)
        .verification_certificate(ca.verification(&code))
        .registration_config(RegistrationConfig::builder().template_body("{not json").build())
        .send()
        .await
        .unwrap_err();
    assert!(bad_template.as_service_error().unwrap().is_invalid_request_exception());

    let config = RegistrationConfig::builder()
        .template_body(JITP_TEMPLATE)
        .role_arn(ROLE_ARN)
        .build();
    let ca_id = register_ca(&iot, &ca, Some(config)).await;
    assert_eq!(ca_id, cert_id(&ca.pem));
    let described = iot
        .describe_ca_certificate()
        .certificate_id(&ca_id)
        .send()
        .await
        .unwrap();
    let description = described.certificate_description().unwrap();
    assert_eq!(description.status(), Some(&CaCertificateStatus::Active));
    assert_eq!(
        description.auto_registration_status(),
        Some(&AutoRegistrationStatus::Enable)
    );
    assert_eq!(description.certificate_mode(), Some(&CertificateMode::Default));
    let config = described.registration_config().unwrap();
    assert_eq!(config.template_body(), Some(JITP_TEMPLATE));
    assert_eq!(config.role_arn(), Some(ROLE_ARN));
    assert_eq!(config.template_name(), None);

    // SNI_ONLY needs no verification certificate, and refuses one.
    let sni = TestCa::new("maker CA 2");
    let with_verification = iot
        .register_ca_certificate()
        .ca_certificate(&sni.pem)
        .verification_certificate(sni.verification(&code))
        .certificate_mode(CertificateMode::SniOnly)
        .send()
        .await
        .unwrap_err();
    assert!(with_verification
        .as_service_error()
        .unwrap()
        .is_invalid_request_exception());
    let sni_id = iot
        .register_ca_certificate()
        .ca_certificate(&sni.pem)
        .certificate_mode(CertificateMode::SniOnly)
        .send()
        .await
        .unwrap()
        .certificate_id()
        .unwrap()
        .to_owned();
    let described = iot
        .describe_ca_certificate()
        .certificate_id(&sni_id)
        .send()
        .await
        .unwrap();
    let description = described.certificate_description().unwrap();
    assert_eq!(description.certificate_mode(), Some(&CertificateMode::SniOnly));
    assert_eq!(description.status(), Some(&CaCertificateStatus::Inactive));
    assert_eq!(
        description.auto_registration_status(),
        Some(&AutoRegistrationStatus::Disable)
    );
    assert!(described.registration_config().is_none());

    // Provisioning templates: a CA may only name one of type JITP.
    for (name, kind) in [("fleet", TemplateType::FleetProvisioning), ("jitp", TemplateType::Jitp)] {
        let created = iot
            .create_provisioning_template()
            .template_name(name)
            .template_body(JITP_TEMPLATE)
            .provisioning_role_arn(ROLE_ARN)
            .r#type(kind)
            .enabled(true)
            .send()
            .await
            .unwrap();
        assert_eq!(
            created.template_arn(),
            Some(format!("arn:aws:iot:us-east-1:123456789012:provisioningtemplate/{name}").as_str())
        );
        assert_eq!(created.default_version_id(), Some(1));
    }
    let by_name = |name: &str| RegistrationConfig::builder().template_name(name).build();
    let fleet = iot
        .update_ca_certificate()
        .certificate_id(&sni_id)
        .registration_config(by_name("fleet"))
        .send()
        .await
        .unwrap_err();
    assert!(fleet.as_service_error().unwrap().is_invalid_request_exception());
    let missing = iot
        .update_ca_certificate()
        .certificate_id(&sni_id)
        .registration_config(by_name("absent"))
        .send()
        .await
        .unwrap_err();
    assert!(missing.as_service_error().unwrap().is_invalid_request_exception());
    iot.update_ca_certificate()
        .certificate_id(&sni_id)
        .new_status(CaCertificateStatus::Active)
        .new_auto_registration_status(AutoRegistrationStatus::Enable)
        .registration_config(by_name("jitp"))
        .send()
        .await
        .unwrap();
    let described = iot
        .describe_ca_certificate()
        .certificate_id(&sni_id)
        .send()
        .await
        .unwrap();
    assert_eq!(described.registration_config().unwrap().template_name(), Some("jitp"));
    let description = described.certificate_description().unwrap();
    assert_eq!(description.status(), Some(&CaCertificateStatus::Active));
    assert_eq!(
        description.auto_registration_status(),
        Some(&AutoRegistrationStatus::Enable)
    );

    // A template in use cannot be deleted.
    let in_use = iot
        .delete_provisioning_template()
        .template_name("jitp")
        .send()
        .await
        .unwrap_err();
    assert!(in_use.as_service_error().unwrap().is_delete_conflict_exception());
    iot.update_ca_certificate()
        .certificate_id(&sni_id)
        .remove_auto_registration(true)
        .new_auto_registration_status(AutoRegistrationStatus::Disable)
        .send()
        .await
        .unwrap();
    let described = iot
        .describe_ca_certificate()
        .certificate_id(&sni_id)
        .send()
        .await
        .unwrap();
    assert!(described.registration_config().is_none());
    assert_eq!(
        described.certificate_description().unwrap().auto_registration_status(),
        Some(&AutoRegistrationStatus::Disable)
    );
    iot.delete_provisioning_template()
        .template_name("jitp")
        .send()
        .await
        .unwrap();
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn provisioning_templates_through_the_sdk() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    iot.create_provisioning_template()
        .template_name("jitp-1")
        .description("first")
        .template_body(JITP_TEMPLATE)
        .provisioning_role_arn(ROLE_ARN)
        .r#type(TemplateType::Jitp)
        .send()
        .await
        .unwrap();
    let described = iot
        .describe_provisioning_template()
        .template_name("jitp-1")
        .send()
        .await
        .unwrap();
    assert_eq!(described.template_name(), Some("jitp-1"));
    assert_eq!(described.template_body(), Some(JITP_TEMPLATE));
    assert_eq!(described.r#type(), Some(&TemplateType::Jitp));
    assert_eq!(described.enabled(), Some(false));
    assert_eq!(described.description(), Some("first"));
    assert_eq!(described.provisioning_role_arn(), Some(ROLE_ARN));
    assert_eq!(described.default_version_id(), Some(1));

    let again = iot
        .create_provisioning_template()
        .template_name("jitp-1")
        .template_body(JITP_TEMPLATE)
        .provisioning_role_arn(ROLE_ARN)
        .send()
        .await
        .unwrap_err();
    assert!(again.as_service_error().unwrap().is_resource_already_exists_exception());
    for (name, body, role) in [
        ("bad name!", JITP_TEMPLATE, ROLE_ARN),
        ("bad-body", "{}", ROLE_ARN),
        ("bad-role", JITP_TEMPLATE, "not-an-arn"),
    ] {
        let refused = iot
            .create_provisioning_template()
            .template_name(name)
            .template_body(body)
            .provisioning_role_arn(role)
            .send()
            .await
            .unwrap_err();
        assert!(
            refused.as_service_error().unwrap().is_invalid_request_exception(),
            "{name}"
        );
    }

    // The default type is FLEET_PROVISIONING.
    iot.create_provisioning_template()
        .template_name("fleet-1")
        .template_body(JITP_TEMPLATE)
        .provisioning_role_arn(ROLE_ARN)
        .enabled(true)
        .send()
        .await
        .unwrap();
    let listed = iot.list_provisioning_templates().send().await.unwrap();
    let summary: Vec<(&str, Option<&TemplateType>, Option<bool>)> = listed
        .templates()
        .iter()
        .map(|t| (t.template_name().unwrap(), t.r#type(), t.enabled()))
        .collect();
    assert_eq!(
        summary,
        [
            ("fleet-1", Some(&TemplateType::FleetProvisioning), Some(true)),
            ("jitp-1", Some(&TemplateType::Jitp), Some(false)),
        ]
    );
    let paged = iot.list_provisioning_templates().max_results(1).send().await.unwrap();
    assert_eq!(paged.templates().len(), 1);
    assert!(paged.next_token().is_some());

    iot.update_provisioning_template()
        .template_name("jitp-1")
        .description("second")
        .enabled(true)
        .send()
        .await
        .unwrap();
    let described = iot
        .describe_provisioning_template()
        .template_name("jitp-1")
        .send()
        .await
        .unwrap();
    assert_eq!(described.description(), Some("second"));
    assert_eq!(described.enabled(), Some(true));
    let missing = iot
        .update_provisioning_template()
        .template_name("nope")
        .enabled(true)
        .send()
        .await
        .unwrap_err();
    assert!(missing.as_service_error().unwrap().is_resource_not_found_exception());

    iot.delete_provisioning_template()
        .template_name("jitp-1")
        .send()
        .await
        .unwrap();
    let gone = iot
        .describe_provisioning_template()
        .template_name("jitp-1")
        .send()
        .await
        .unwrap_err();
    assert!(gone.as_service_error().unwrap().is_resource_not_found_exception());
    assert_eq!(status_of(&gone), 404);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn certificates_by_ca_through_the_sdk() {
    let sandbox = Sandbox::start(Config::default()).await.unwrap();
    let iot = iot_client(&sandbox);
    let ca = TestCa::new("maker CA");
    let ca_id = register_ca(&iot, &ca, None).await;
    let other = TestCa::new("other CA");
    let other_id = register_ca(&iot, &other, None).await;

    let mut ids = Vec::new();
    for name in ["dev-1", "dev-2", "dev-3"] {
        let (pem, _) = ca.sign(&[(DnType::CommonName, name)]);
        let registered = iot
            .register_certificate()
            .certificate_pem(&pem)
            .ca_certificate_pem(&ca.pem)
            .status(CertificateStatus::Inactive)
            .send()
            .await
            .unwrap();
        ids.push(registered.certificate_id().unwrap().to_owned());
    }
    let listed = iot
        .list_certificates_by_ca()
        .ca_certificate_id(&ca_id)
        .ascending_order(true)
        .send()
        .await
        .unwrap();
    let listed_ids: Vec<&str> = listed
        .certificates()
        .iter()
        .map(|c| c.certificate_id().unwrap())
        .collect();
    assert_eq!(listed_ids, ids);
    let first = &listed.certificates()[0];
    assert_eq!(first.status(), Some(&CertificateStatus::Inactive));
    assert_eq!(first.certificate_mode(), Some(&CertificateMode::Default));
    assert_eq!(
        first.certificate_arn(),
        Some(format!("arn:aws:iot:us-east-1:123456789012:cert/{}", ids[0]).as_str())
    );
    assert!(first.creation_date().is_some());
    assert!(listed.next_marker().is_none());

    // Newest first by default, in pages.
    let page = iot
        .list_certificates_by_ca()
        .ca_certificate_id(&ca_id)
        .page_size(2)
        .send()
        .await
        .unwrap();
    let page_ids: Vec<&str> = page
        .certificates()
        .iter()
        .map(|c| c.certificate_id().unwrap())
        .collect();
    assert_eq!(page_ids, [ids[2].as_str(), ids[1].as_str()]);
    let rest = iot
        .list_certificates_by_ca()
        .ca_certificate_id(&ca_id)
        .page_size(2)
        .marker(page.next_marker().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(rest.certificates().len(), 1);
    assert_eq!(rest.certificates()[0].certificate_id(), Some(ids[0].as_str()));

    let none = iot
        .list_certificates_by_ca()
        .ca_certificate_id(&other_id)
        .send()
        .await
        .unwrap();
    assert!(none.certificates().is_empty());
    let described = iot.describe_certificate().certificate_id(&ids[0]).send().await.unwrap();
    assert_eq!(
        described.certificate_description().unwrap().ca_certificate_id(),
        Some(ca_id.as_str())
    );
    sandbox.shutdown().await.unwrap();
}
