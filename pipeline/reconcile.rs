//! Reconcile: turn the RESULTS and ERRORS reports of a task into one verdict
//! per staged device, verified.
//!
//! AWS does not document the report format, so this joins by identity, not
//! position: a RESULTS line belongs to the device whose thing name is the last
//! segment of its thing ARN, and its certificate must carry that device's own
//! public key. Keys may be PascalCase or camelCase; the line id may be
//! `lineNumber`, `offset` or absent, 0- or 1-based. ERRORS lines that carry
//! only a number are placed only when exactly one base fits; otherwise the
//! device's outcome is "unknown" and the registry decides.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use crate::crypto::{normalise_pem_text, parse_certificate_pem, KeyId};

/// A device as it was staged: its position in the registration file.
#[derive(Clone, Debug)]
pub struct StagedDevice {
    pub index: usize,
    pub thing_name: String,
    pub key: KeyId,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Registered, with a certificate that carries the device's key.
    Registered {
        certificate_id: String,
        certificate_pem: String,
    },
    /// RESULTS names the device but holds no certificate PEM: fetch it by id.
    NeedsCertificate {
        certificate_id: String,
    },
    Failed {
        class: String,
        message: String,
    },
    /// No report line could be tied to the device.
    Unknown {
        hint: Option<String>,
    },
}

impl Verdict {
    /// Registered when the certificate carries the device's key (and the id
    /// AWS gave it), a verification failure otherwise.
    pub fn of_certificate(pem: &str, arn_id: Option<&str>, key: &KeyId) -> Verdict {
        match verify_certificate(pem, arn_id, key) {
            Ok((certificate_id, certificate_pem)) => Verdict::Registered {
                certificate_id,
                certificate_pem,
            },
            Err(message) => Verdict::Failed {
                class: "verification".into(),
                message,
            },
        }
    }
}

#[derive(Debug, Default)]
pub struct Reconciled {
    pub verdicts: Vec<Verdict>,
    /// Lines that were not JSON objects.
    pub unparsed: usize,
    /// RESULTS lines whose thing is not in this attempt.
    pub unmatched: usize,
    pub notes: Vec<String>,
}

/// Sorts an error text into a small set of classes; the raw text is kept beside it.
pub fn classify(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("throttl") || m.contains("rate exceeded") || m.contains("requestlimitexceeded") {
        "throttled"
    } else if m.contains("internalfailure")
        || m.contains("internal error")
        || m.contains("serviceunavailable")
        || m.contains("internalserver")
    {
        "internal"
    } else if m.contains("unauthorized") || m.contains("accessdenied") || m.contains("not authorized") {
        "unauthorized"
    } else if m.contains("alreadyexists") || m.contains("already exists") || m.contains("conflict") {
        "conflict"
    } else if m.contains("not found") || m.contains("notfound") || m.contains("does not exist") {
        "not-found"
    } else if m.contains("invalidrequest") || m.contains("invalid") {
        "invalid-request"
    } else {
        "other"
    }
}

/// Whether a class is worth a retry in a follow-up task.
/// `unregistered` means the registry was read and holds nothing for the
/// device, so a new line cannot give it a second certificate.
pub fn is_retryable(class: &str) -> bool {
    matches!(class, "throttled" | "internal" | "unregistered")
}

fn get<'a>(v: &'a Value, pascal: &str) -> Option<&'a Value> {
    let mut camel = pascal.to_string();
    if let Some(first) = camel.get(0..1) {
        camel.replace_range(0..1, &first.to_ascii_lowercase());
    }
    v.get(pascal).or_else(|| v.get(&camel))
}

fn line_number(v: &Value) -> Option<i64> {
    ["lineNumber", "LineNumber", "offset", "Offset", "line"]
        .iter()
        .find_map(|k| v.get(*k))
        .and_then(|n| n.as_i64().or_else(|| n.as_str().and_then(|s| s.parse().ok())))
}

fn last_segment(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// Checks a certificate against the device's key and the id AWS gave it.
pub fn verify_certificate(pem_text: &str, arn_id: Option<&str>, key: &KeyId) -> Result<(String, String), String> {
    let pem = normalise_pem_text(pem_text);
    let info = parse_certificate_pem(&pem)?;
    if let Some(id) = arn_id {
        if !id.eq_ignore_ascii_case(&info.id) {
            return Err(format!(
                "the certificate's SHA-256 is {} but its ARN says {id}",
                info.id
            ));
        }
    }
    if &info.key != key {
        return Err("the certificate's public key is not the device's key".into());
    }
    Ok((info.id, pem))
}

/// Reconciles one attempt's reports against the devices it staged.
pub fn reconcile(
    staged: &[StagedDevice],
    thing_resource: Option<&str>,
    certificate_resource: Option<&str>,
    results: &[String],
    errors: &[String],
) -> Reconciled {
    let mut out = Reconciled {
        verdicts: vec![Verdict::Unknown { hint: None }; staged.len()],
        ..Default::default()
    };
    let by_name: HashMap<&str, usize> = staged.iter().map(|d| (d.thing_name.as_str(), d.index)).collect();
    let mut accounted: BTreeSet<usize> = BTreeSet::new();
    // (reported number, true index) pairs from RESULTS, to learn the base.
    let mut known_numbers: Vec<(i64, usize)> = Vec::new();

    for raw in results.iter().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<Value>(raw) else {
            out.unparsed += 1;
            continue;
        };
        if !v.is_object() {
            out.unparsed += 1;
            continue;
        }
        let resp = get(&v, "Response").unwrap_or(&v);
        let arns = get(resp, "ResourceArns");
        let pick = |logical: Option<&str>, marker: &str| -> Option<String> {
            let arns = arns?;
            logical
                .and_then(|l| arns.get(l))
                .and_then(Value::as_str)
                .or_else(|| {
                    arns.as_object()?
                        .values()
                        .filter_map(Value::as_str)
                        .find(|a| a.contains(marker))
                })
                .map(String::from)
        };
        let thing_arn = pick(thing_resource, ":thing/");
        let cert_arn = pick(certificate_resource, ":cert/");
        let Some(index) = thing_arn.as_deref().and_then(|a| by_name.get(last_segment(a)).copied()) else {
            out.unmatched += 1;
            continue;
        };
        if let Some(n) = line_number(&v) {
            known_numbers.push((n, index));
        }
        accounted.insert(index);
        let cert_id = cert_arn.as_deref().map(last_segment).map(String::from);
        let pem = get(resp, "CertificatePem").and_then(Value::as_str);
        out.verdicts[index] = match (pem, cert_id) {
            (Some(pem), id) => Verdict::of_certificate(pem, id.as_deref(), &staged[index].key),
            (None, Some(id)) => Verdict::NeedsCertificate { certificate_id: id },
            (None, None) => Verdict::Unknown {
                hint: Some("the RESULTS line names the thing but neither a certificate nor its ARN".into()),
            },
        };
    }

    // ERRORS: named lines first, then numbered ones.
    let mut numbered: Vec<(i64, String)> = Vec::new();
    let mut anonymous: Vec<String> = Vec::new();
    for raw in errors.iter().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<Value>(raw) else {
            out.unparsed += 1;
            continue;
        };
        let message = ["errorMessage", "ErrorMessage", "message", "Message"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .unwrap_or("")
            .to_string();
        let code = ["errorCode", "ErrorCode"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str));
        let full = match code {
            Some(c) if !message.contains(c) => format!("{c}: {message}"),
            _ => message,
        };
        let named = ["thingName", "ThingName"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .and_then(|n| by_name.get(n).copied());
        if let Some(index) = named {
            if accounted.insert(index) {
                out.verdicts[index] = Verdict::Failed {
                    class: classify(&full).into(),
                    message: full,
                };
            }
        } else if let Some(n) = line_number(&v) {
            numbered.push((n, full));
        } else {
            anonymous.push(full);
        }
    }
    if !anonymous.is_empty() {
        let open: Vec<usize> = (0..staged.len()).filter(|i| !accounted.contains(i)).collect();
        let classes: BTreeSet<&str> = anonymous.iter().map(|m| classify(m)).collect();
        let summary = format!(
            "one of {} ERRORS line(s) that name no device, e.g. \"{}\"",
            anonymous.len(),
            anonymous[0]
        );
        out.notes.push(format!(
            "{} ERRORS line(s) carry neither a thing name nor a line number",
            anonymous.len()
        ));
        // As many anonymous errors as unaccounted devices, all of one class that
        // a retry would not cure: those devices failed, though not which way.
        let single = classes.iter().next().copied().filter(|_| classes.len() == 1);
        match single {
            Some(class) if open.len() == anonymous.len() && numbered.is_empty() && !is_retryable(class) => {
                for i in open {
                    out.verdicts[i] = Verdict::Failed {
                        class: class.into(),
                        message: summary.clone(),
                    };
                    accounted.insert(i);
                }
            }
            _ => {
                for i in open {
                    out.verdicts[i] = Verdict::Unknown {
                        hint: Some(summary.clone()),
                    };
                }
            }
        }
    }
    if !numbered.is_empty() {
        let open: BTreeSet<usize> = (0..staged.len()).filter(|i| !accounted.contains(i)).collect();
        let fits = |base: i64| -> bool {
            let mut seen = BTreeSet::new();
            numbered.iter().all(|(n, _)| {
                let i = n - base;
                i >= 0 && open.contains(&(i as usize)) && seen.insert(i)
            })
        };
        // RESULTS lines that carried numbers tell the base outright.
        let learned: BTreeSet<i64> = known_numbers.iter().map(|(n, i)| n - *i as i64).collect();
        let base = if learned.len() == 1 {
            learned
                .iter()
                .next()
                .copied()
                .filter(|b| (*b == 0 || *b == 1) && fits(*b))
        } else {
            match (fits(0), fits(1)) {
                (true, false) => Some(0),
                (false, true) => Some(1),
                _ => None,
            }
        };
        match base {
            Some(b) => {
                for (n, msg) in numbered {
                    let i = (n - b) as usize;
                    out.verdicts[i] = Verdict::Failed {
                        class: classify(&msg).into(),
                        message: msg,
                    };
                    accounted.insert(i);
                }
            }
            None => {
                let sample = numbered.first().map(|(_, m)| m.clone());
                out.notes.push(format!(
                    "{} ERRORS line(s) carry only a line number and no base (0 or 1) maps them one-to-one onto the unaccounted devices; those devices are checked in the registry",
                    numbered.len()
                ));
                for i in &open {
                    out.verdicts[*i] = Verdict::Unknown { hint: sample.clone() };
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(i: usize, name: &str) -> (StagedDevice, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        (
            StagedDevice {
                index: i,
                thing_name: name.into(),
                key: KeyId::from_spki_der(&spki).unwrap(),
            },
            key,
        )
    }

    fn cert_for(key: &rcgen::KeyPair) -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .self_signed(&ca_key)
            .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
        let cert = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .signed_by(key, &issuer)
            .unwrap();
        (cert.pem(), crate::crypto::certificate_id(cert.der()))
    }

    fn result_line(name: &str, pem: &str, id: &str, key: &str, n: i64) -> String {
        serde_json::json!({"response": {"CertificatePem": pem, "ResourceArns": {
            "thing": format!("arn:aws:iot:us-east-1:1:thing/{name}"),
            "certificate": format!("arn:aws:iot:us-east-1:1:cert/{id}")}}, key: n})
        .to_string()
    }

    #[test]
    fn results_are_joined_by_name_and_key_in_any_order() {
        let (a, ka) = device(0, "A");
        let (b, kb) = device(1, "B");
        let (pa, ia) = cert_for(&ka);
        let (pb, ib) = cert_for(&kb);
        let results = vec![
            result_line("B", &pb, &ib, "offset", 1),
            result_line("A", &pa, &ia, "offset", 0),
        ];
        let r = reconcile(&[a, b], Some("thing"), Some("certificate"), &results, &[]);
        assert!(matches!(&r.verdicts[0], Verdict::Registered { certificate_id, .. } if *certificate_id == ia));
        assert!(matches!(&r.verdicts[1], Verdict::Registered { certificate_id, .. } if *certificate_id == ib));
    }

    #[test]
    fn a_certificate_with_another_key_is_a_failure() {
        let (a, _ka) = device(0, "A");
        let (_b, kb) = device(1, "B");
        let (pb, ib) = cert_for(&kb);
        let r = reconcile(
            &[a],
            Some("thing"),
            Some("certificate"),
            &[result_line("A", &pb, &ib, "lineNumber", 1)],
            &[],
        );
        assert!(matches!(&r.verdicts[0], Verdict::Failed { class, .. } if class == "verification"));
    }

    #[test]
    fn numbered_errors_use_the_base_learned_from_results() {
        let (a, ka) = device(0, "A");
        let (b, _) = device(1, "B");
        let (c, _) = device(2, "C");
        let (pa, ia) = cert_for(&ka);
        // 1-based: A is line 1, C (index 2) is line 3; B has no line at all.
        let errors = vec![r#"{"errorMessage": "InvalidRequestException: bad csr", "lineNumber": 3}"#.to_string()];
        let r = reconcile(
            &[a, b, c],
            Some("thing"),
            Some("certificate"),
            &[result_line("A", &pa, &ia, "lineNumber", 1)],
            &errors,
        );
        assert!(matches!(&r.verdicts[2], Verdict::Failed { class, .. } if class == "invalid-request"));
        assert_eq!(r.verdicts[1], Verdict::Unknown { hint: None });
    }

    #[test]
    fn ambiguous_numbers_leave_devices_unknown() {
        let (a, _) = device(0, "A");
        let (b, _) = device(1, "B");
        let errors = vec![r#"{"errorMessage": "x", "lineNumber": 1}"#.to_string()];
        let r = reconcile(&[a, b], Some("thing"), Some("certificate"), &[], &errors);
        assert!(matches!(r.verdicts[0], Verdict::Unknown { .. }));
        assert!(matches!(r.verdicts[1], Verdict::Unknown { .. }));
        assert_eq!(r.notes.len(), 1);
    }

    #[test]
    fn legacy_errors_and_camel_case_results() {
        let (a, ka) = device(0, "A");
        let (b, _) = device(1, "B");
        let (pa, ia) = cert_for(&ka);
        let camel = serde_json::json!({"response": {"certificatePem": pa, "resourceArns": {
            "myThing": "arn:aws:iot:r:1:thing/A", "myCert": format!("arn:aws:iot:r:1:cert/{ia}")}}})
        .to_string();
        let errors = vec![r#"{"thingName": "B", "errorCode": "ResourceRegistrationFailureException", "errorMessage": "Thing Type 1:x not found"}"#.to_string(), "garbage".to_string()];
        let r = reconcile(&[a, b], Some("myThing"), Some("myCert"), &[camel], &errors);
        assert!(matches!(r.verdicts[0], Verdict::Registered { .. }));
        assert!(matches!(&r.verdicts[1], Verdict::Failed { class, .. } if class == "not-found"));
        assert_eq!(r.unparsed, 1);
    }

    #[test]
    fn classes() {
        assert_eq!(classify("ThrottlingException: Rate exceeded"), "throttled");
        assert_eq!(classify("InternalFailureException"), "internal");
        assert_eq!(classify("something new"), "other");
        assert!(is_retryable("throttled") && !is_retryable("invalid-request"));
    }
}
