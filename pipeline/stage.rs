//! Stage: the registration lines for `StartThingRegistrationTask` (one JSON
//! object per line, every template parameter present) and their upload.

use std::collections::BTreeMap;

use aws_sdk_s3::primitives::ByteStream;

use crate::aws::Aws;
use crate::error::{Error, Result};
use crate::template::{column_for_param, Template};

/// AWS's per-line limit for the input file (2019 figure), and RegisterThing's
/// limits per parameter, which probably apply to bulk lines too.
pub const MAX_LINE_BYTES: usize = 256 * 1024;
pub const MAX_KEY_CHARS: usize = 2048;
pub const MAX_VALUE_CHARS: usize = 4096;

/// What the ledger keeps of a device's row, enough to stage it again.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StoredDevice {
    pub serial: String,
    pub thing_name: String,
    pub values: BTreeMap<String, String>,
    /// A CSR made on the device, normalised.
    pub device_csr: Option<String>,
}

/// What the registration line carries of the device's credentials.
#[derive(Clone, Copy, Debug)]
pub struct Credential<'a> {
    pub csr_pem: &'a str,
    /// The device certificate signed by the factory CA (byoca).
    pub certificate_pem: Option<&'a str>,
    pub ca_pem: Option<&'a str>,
}

/// One registration line for a device. `mapping` is the profile's
/// `[parameters]`: template parameter -> column.
pub fn registration_line(
    template: &Template,
    device: &StoredDevice,
    cred: &Credential<'_>,
    mapping: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut line = serde_json::Map::new();
    let is = |p: &str, slot: &Option<String>| slot.as_deref() == Some(p);
    for (param, default) in &template.parameters {
        let value = if is(param, &template.thing_name_param) {
            Some(device.thing_name.clone())
        } else if is(param, &template.csr_param) {
            Some(cred.csr_pem.to_string())
        } else if is(param, &template.cert_pem_param) {
            Some(
                cred.certificate_pem
                    .ok_or("the template takes a CertificatePem, but no certificate was signed for this device (use --mode byoca --ca DIR)")?
                    .to_string(),
            )
        } else if is(param, &template.ca_pem_param) {
            Some(
                cred.ca_pem
                    .ok_or("the template takes a CACertificatePem, but no factory CA is in use (--ca DIR)")?
                    .to_string(),
            )
        } else if let Some(v) = mapping
            .get(param)
            .and_then(|c| device.values.get(c))
            .or_else(|| device.values.get(&column_for_param(param)))
            .or_else(|| device.values.get(param))
        {
            Some(v.clone())
        } else if default.is_some() {
            None // absent: AWS applies the template's Default
        } else {
            Some(String::new()) // an optional column this input does not have
        };
        if let Some(v) = value {
            if param.chars().count() > MAX_KEY_CHARS {
                return Err(format!(
                    "parameter name `{param}` is longer than {MAX_KEY_CHARS} characters"
                ));
            }
            if v.chars().count() > MAX_VALUE_CHARS {
                return Err(format!(
                    "the value for `{param}` is {} characters; the limit is {MAX_VALUE_CHARS}",
                    v.chars().count()
                ));
            }
            line.insert(param.clone(), serde_json::Value::String(v));
        }
    }
    let text = serde_json::to_string(&line).map_err(|e| e.to_string())?;
    if text.len() > MAX_LINE_BYTES {
        return Err(format!(
            "the registration line is {} bytes; AWS allows {MAX_LINE_BYTES}",
            text.len()
        ));
    }
    Ok(text)
}

/// Uploads the template and the registration file.
pub async fn upload(
    aws: &Aws,
    bucket: &str,
    key: &str,
    template_key: &str,
    template: &str,
    lines: Vec<u8>,
) -> Result<()> {
    aws.s3
        .put_object()
        .bucket(bucket)
        .key(template_key)
        .content_type("application/json")
        .body(ByteStream::from(template.as_bytes().to_vec()))
        .send()
        .await
        .map_err(|e| {
            Error::infra(format!(
                "uploading the template to s3://{bucket}/{template_key}: {}",
                s3_describe(&e)
            ))
        })?;
    aws.s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .content_type("application/x-ndjson")
        .body(ByteStream::from(lines))
        .send()
        .await
        .map_err(|e| {
            Error::infra(format!(
                "uploading the registration file to s3://{bucket}/{key}: {}",
                s3_describe(&e)
            ))
        })?;
    Ok(())
}

pub fn s3_describe<E, R>(err: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_s3::error::SdkError;
    match err {
        SdkError::ServiceError(se) => format!(
            "{}: {}",
            se.err().code().unwrap_or("error"),
            se.err().message().unwrap_or("no message")
        ),
        SdkError::DispatchFailure(_) => format!(
            "cannot reach the endpoint: {}",
            aws_smithy_types::error::display::DisplayErrorContext(err)
        ),
        other => format!("{}", aws_smithy_types::error::display::DisplayErrorContext(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_present_and_defaults_stay_absent() {
        let body = r#"{"Parameters": {"ThingName": {"Type": "String"}, "CSR": {"Type": "String"},
            "Model": {"Type": "String"}, "MacAddress": {"Type": "String"}, "Site": {"Type": "String", "Default": "WA"}},
            "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "ThingName"},
            "AttributePayload": {"model": {"Ref": "Model"}, "site": {"Ref": "Site"}, "mac": {"Ref": "MacAddress"}}},
            "OverrideSettings": {"AttributePayload": "MERGE"}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateSigningRequest": {"Ref": "CSR"}, "Status": "ACTIVE"}}}}"#;
        let t = Template::check("t", body).unwrap();
        let d = StoredDevice {
            serial: "SN1".into(),
            thing_name: "SN1".into(),
            values: [("model".to_string(), "TH-100".to_string())].into_iter().collect(),
            device_csr: None,
        };
        let cred = Credential {
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAA\n-----END CERTIFICATE REQUEST-----\n",
            certificate_pem: None,
            ca_pem: None,
        };
        let line = registration_line(&t, &d, &cred, &BTreeMap::new()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ThingName"], "SN1");
        assert_eq!(v["Model"], "TH-100");
        assert_eq!(v["MacAddress"], "");
        assert!(v.get("Site").is_none());
        assert!(v["CSR"].as_str().unwrap().contains('\n'));
        assert!(!line.contains('\n'), "one physical line");
    }

    #[test]
    fn profile_parameters_map_a_template_parameter_to_any_column() {
        let body = r#"{"Parameters": {"ThingName": {"Type": "String"}, "Location": {"Type": "String"}, "CSR": {"Type": "String"}},
          "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "ThingName"},
            "AttributePayload": {"where": {"Ref": "Location"}}}, "OverrideSettings": {"AttributePayload": "MERGE"}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateSigningRequest": {"Ref": "CSR"}, "Status": "ACTIVE"}}}}"#;
        let t = Template::check("t", body).unwrap();
        let d = StoredDevice {
            serial: "SN1".into(),
            thing_name: "SN1".into(),
            values: [("site".to_string(), "MUC".to_string())].into_iter().collect(),
            device_csr: None,
        };
        let mapping: BTreeMap<String, String> = [("Location".to_string(), "site".to_string())].into_iter().collect();
        let cred = Credential {
            csr_pem: "x",
            certificate_pem: None,
            ca_pem: None,
        };
        let v: serde_json::Value = serde_json::from_str(&registration_line(&t, &d, &cred, &mapping).unwrap()).unwrap();
        assert_eq!(v["Location"], "MUC");
        assert_eq!(
            t.attribute_columns(&mapping),
            ["site".to_string()].into_iter().collect()
        );
        let unfilled = t.unfilled_parameters(
            &["site".to_string()].into_iter().collect(),
            &Default::default(),
            &BTreeMap::new(),
        );
        assert_eq!(
            unfilled,
            vec!["Location".to_string()],
            "without the mapping nothing fills it"
        );
        assert!(t
            .unfilled_parameters(
                &["site".to_string()].into_iter().collect(),
                &Default::default(),
                &mapping
            )
            .is_empty());
    }
}
