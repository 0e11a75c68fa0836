//! Provisioning templates: the built-in bulk template, the local check that
//! runs before anything is sent, and how template parameters are filled from
//! a device's row.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::error::{Problem, Problems};

/// AWS's limit on `templateBody`.
pub const MAX_TEMPLATE_CHARS: usize = 10240;

const RESOURCE_TYPES: [&str; 3] = ["AWS::IoT::Thing", "AWS::IoT::Certificate", "AWS::IoT::Policy"];
const PSEUDO_PARAMS: [&str; 2] = ["AWS::Region", "AWS::AccountId"];
const FUNCTIONS: [&str; 5] = ["Fn::Join", "Fn::Select", "Fn::Split", "Fn::Sub", "Fn::FindInMap"];

/// The built-in bulk template: a thing with the profile's attributes (and
/// thing type and groups, when it names them), a certificate from the CSR,
/// and a named policy. `OverrideSettings` are explicit because AWS does not
/// document what happens without them.
pub fn builtin_for(
    policy_name: &str,
    attributes: &[String],
    thing_type: Option<&str>,
    thing_groups: &[String],
    source: CertificateSource,
) -> String {
    let mut params = serde_json::Map::new();
    params.insert("ThingName".into(), serde_json::json!({"Type": "String"}));
    let mut payload = serde_json::Map::new();
    for a in attributes {
        let p = param_for_column(a);
        params.insert(p.clone(), serde_json::json!({"Type": "String"}));
        payload.insert(a.clone(), serde_json::json!({"Ref": p}));
    }
    let certificate = match source {
        CertificateSource::Csr => {
            params.insert("CSR".into(), serde_json::json!({"Type": "String"}));
            serde_json::json!({"CertificateSigningRequest": {"Ref": "CSR"}, "Status": "ACTIVE"})
        }
        CertificateSource::OwnCa => {
            params.insert("CertificatePem".into(), serde_json::json!({"Type": "String"}));
            params.insert("CACertificatePem".into(), serde_json::json!({"Type": "String"}));
            serde_json::json!({
                "CertificatePem": {"Ref": "CertificatePem"},
                "CACertificatePem": {"Ref": "CACertificatePem"},
                "Status": "ACTIVE"
            })
        }
    };
    let mut thing = serde_json::json!({
        "ThingName": {"Ref": "ThingName"},
        "AttributePayload": payload,
    });
    if let Some(t) = thing_type {
        thing["ThingTypeName"] = t.into();
    }
    if !thing_groups.is_empty() {
        thing["ThingGroups"] = thing_groups.into();
    }
    let t = serde_json::json!({
        "Parameters": params,
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": thing,
                "OverrideSettings": {
                    "AttributePayload": "MERGE",
                    "ThingTypeName": "DO_NOTHING",
                    "ThingGroups": "DO_NOTHING"
                }
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": certificate,
                "OverrideSettings": {"Status": "DO_NOTHING"}
            },
            "policy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {"PolicyName": policy_name}
            }
        }
    });
    serde_json::to_string_pretty(&t).expect("a JSON value serialises")
}

/// Where the bulk task gets each device's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateSource {
    /// AWS signs the device's CSR.
    Csr,
    /// provline signed it with the factory CA; AWS registers it as it is.
    OwnCa,
}

/// The built-in template of the default profile.
pub fn builtin(policy_name: &str) -> String {
    let p = crate::profile::Profile::default();
    builtin_for(policy_name, &p.attributes, None, &[], CertificateSource::Csr)
}

/// The template parameter for a column: `mac_address` -> `MacAddress`.
pub fn param_for_column(column: &str) -> String {
    column
        .split('_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// A template that passed the check, with what the pipeline needs to know of it.
#[derive(Clone, Debug)]
pub struct Template {
    pub body: String,
    /// Declared parameters and their defaults.
    pub parameters: BTreeMap<String, Option<String>>,
    /// Logical names of the resources, by type.
    pub thing_resource: Option<String>,
    pub certificate_resource: Option<String>,
    pub policy_resource: Option<String>,
    /// The parameter that feeds `ThingName`, when it is a plain `Ref`.
    pub thing_name_param: Option<String>,
    /// The parameter that feeds `CertificateSigningRequest`.
    pub csr_param: Option<String>,
    /// The parameters that feed `CertificatePem` and `CACertificatePem`
    /// (a certificate signed by the factory CA, mode byoca).
    pub cert_pem_param: Option<String>,
    pub ca_pem_param: Option<String>,
    /// Attribute name -> parameter, for attributes given by `Ref`.
    pub attribute_params: BTreeMap<String, String>,
    /// The policy name, when it is a literal.
    pub policy_name: Option<String>,
}

impl Template {
    /// Checks a template body. `source` names it in messages.
    pub fn check(source: &str, body: &str) -> Result<Template, Problems> {
        let mut problems = Problems::default();
        let at = || Problem::new("").file(source.to_string());
        let chars = body.chars().count();
        if chars > MAX_TEMPLATE_CHARS {
            problems.push(Problem {
                message: format!(
                    "the template is {chars} characters; AWS allows at most {MAX_TEMPLATE_CHARS} in templateBody"
                ),
                ..at()
            });
        }
        let json: Value = match serde_json::from_str(body) {
            Ok(v) => v,
            Err(e) => {
                let hint = if body.trim_start().starts_with("{'") || e.to_string().contains("key must be a string") {
                    " (JSON needs double quotes around keys and strings; this looks like a Python dict)"
                } else {
                    ""
                };
                problems.push(Problem {
                    message: format!("the template is not valid JSON: {e}{hint}"),
                    ..at().line(e.line() as u64).column_number(e.column() as u64)
                });
                return Err(problems);
            }
        };
        let Some(top) = json.as_object() else {
            problems.push(Problem {
                message: "the template must be a JSON object with `Parameters` and `Resources`".into(),
                ..at()
            });
            return Err(problems);
        };
        for key in top.keys() {
            if !["Parameters", "Resources", "Mappings"].contains(&key.as_str()) {
                problems.push(Problem {
                    message: format!(
                        "unknown top-level section `{key}`; a bulk template has `Parameters`, `Resources` and optionally `Mappings`"
                    ),
                    ..at()
                });
            }
        }
        let mut parameters = BTreeMap::new();
        match top.get("Parameters") {
            None => {}
            Some(Value::Object(params)) => {
                for (name, decl) in params {
                    let ty = decl.get("Type").and_then(Value::as_str);
                    if ty != Some("String") {
                        problems.push(Problem {
                            message: format!(
                                "parameter `{name}` has Type {}; bulk templates support only \"String\"",
                                ty.map(|t| format!("\"{t}\"")).unwrap_or_else(|| "missing".into())
                            ),
                            ..at()
                        });
                    }
                    let default = match decl.get("Default") {
                        None => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(other) => {
                            problems.push(Problem {
                                message: format!(
                                    "parameter `{name}` has a non-string Default {other}; write it as a JSON string"
                                ),
                                ..at()
                            });
                            None
                        }
                    };
                    parameters.insert(name.clone(), default);
                }
            }
            Some(_) => problems.push(Problem {
                message: "`Parameters` must be an object".into(),
                ..at()
            }),
        }
        let mappings = top.get("Mappings").cloned().unwrap_or(Value::Null);

        let mut t = Template {
            body: body.to_string(),
            parameters,
            thing_resource: None,
            certificate_resource: None,
            policy_resource: None,
            thing_name_param: None,
            csr_param: None,
            cert_pem_param: None,
            ca_pem_param: None,
            attribute_params: BTreeMap::new(),
            policy_name: None,
        };
        let resources = match top.get("Resources") {
            Some(Value::Object(r)) if !r.is_empty() => r,
            _ => {
                problems.push(Problem {
                    message:
                        "`Resources` is missing or empty; a bulk template needs at least a thing and a certificate"
                            .into(),
                    ..at()
                });
                return Err(problems);
            }
        };
        for (logical, res) in resources {
            let ty = res.get("Type").and_then(Value::as_str).unwrap_or("");
            let props = res.get("Properties").and_then(Value::as_object);
            let here = |msg: String| Problem {
                message: format!("resource `{logical}`: {msg}"),
                ..at()
            };
            if !RESOURCE_TYPES.contains(&ty) {
                problems.push(here(format!("Type `{ty}` is not one of {}", RESOURCE_TYPES.join(", "))));
                continue;
            }
            let Some(props) = props else {
                problems.push(here("has no `Properties` object".into()));
                continue;
            };
            let mut once = |slot: &mut Option<String>, kind: &str| {
                if let Some(prev) = slot {
                    problems.push(here(format!(
                        "a second {kind} resource (the first is `{prev}`); provline registers one per device"
                    )));
                } else {
                    *slot = Some(logical.clone());
                }
            };
            match ty {
                "AWS::IoT::Thing" => {
                    once(&mut t.thing_resource, "thing");
                    match props.get("ThingName") {
                        None => problems.push(here("a thing needs `ThingName`".into())),
                        Some(v) => t.thing_name_param = plain_ref(v),
                    }
                    if let Some(Value::Object(attrs)) = props.get("AttributePayload") {
                        for (attr, v) in attrs {
                            if let Err(e) = crate::rules::check_attribute_name(attr) {
                                problems.push(here(e));
                            }
                            if let Some(p) = plain_ref(v) {
                                t.attribute_params.insert(attr.clone(), p);
                            }
                        }
                    }
                    if res.get("OverrideSettings").is_none() {
                        problems.push(here(
                            "a thing resource needs explicit `OverrideSettings` (AWS does not document what happens to an existing thing without them), e.g. {\"AttributePayload\": \"MERGE\", \"ThingTypeName\": \"DO_NOTHING\", \"ThingGroups\": \"DO_NOTHING\"}".into(),
                        ));
                    }
                }
                "AWS::IoT::Certificate" => {
                    once(&mut t.certificate_resource, "certificate");
                    let ways: Vec<&str> = ["CertificateSigningRequest", "CertificateId", "CertificatePem"]
                        .into_iter()
                        .filter(|k| props.contains_key(*k))
                        .collect();
                    if ways.len() != 1 {
                        problems.push(here(format!(
                            "give the certificate in exactly one way (CertificateSigningRequest, CertificateId, or CertificatePem with CACertificatePem); found {}",
                            if ways.is_empty() { "none".to_string() } else { ways.join(" and ") }
                        )));
                    }
                    if let Some(v) = props.get("CertificateSigningRequest") {
                        t.csr_param = plain_ref(v);
                    }
                    if let Some(v) = props.get("CertificatePem") {
                        t.cert_pem_param = plain_ref(v);
                    }
                    if let Some(v) = props.get("CACertificatePem") {
                        t.ca_pem_param = plain_ref(v);
                        if !props.contains_key("CertificatePem") {
                            problems.push(here("`CACertificatePem` goes with `CertificatePem`".into()));
                        }
                    }
                    if let Some(status) = props.get("Status") {
                        match status.as_str() {
                            Some("ACTIVE") | Some("INACTIVE") => {}
                            _ => problems.push(here(format!(
                                "Status {status} must be \"ACTIVE\" or \"INACTIVE\" (upper case)"
                            ))),
                        }
                    }
                }
                "AWS::IoT::Policy" => {
                    once(&mut t.policy_resource, "policy");
                    let name = props.get("PolicyName");
                    let doc = props.get("PolicyDocument");
                    match (name, doc) {
                        (Some(_), Some(_)) => problems.push(here(
                            "give `PolicyName` or `PolicyDocument`, not both".into(),
                        )),
                        (None, None) => problems.push(here(
                            "a policy needs a non-empty `PolicyName` or a `PolicyDocument`".into(),
                        )),
                        (Some(Value::String(s)), None) if s.trim().is_empty() => problems.push(here(
                            "`PolicyName` is empty; name an existing IoT policy here, or give a `PolicyDocument` instead (--policy NAME sets it only in the built-in template)".into(),
                        )),
                        (Some(Value::String(s)), None) => t.policy_name = Some(s.clone()),
                        (None, Some(Value::String(s))) if s.trim().is_empty() => problems.push(here(
                            "`PolicyDocument` is empty".into(),
                        )),
                        _ => {}
                    }
                }
                _ => unreachable!("checked against RESOURCE_TYPES above"),
            }
        }
        if t.thing_resource.is_none() {
            problems.push(Problem {
                message: "no AWS::IoT::Thing resource; provline registers a thing per device".into(),
                ..at()
            });
        }
        if t.certificate_resource.is_none() {
            problems.push(Problem {
                message: "no AWS::IoT::Certificate resource; provline registers a certificate per device".into(),
                ..at()
            });
        }
        // Every reference must resolve.
        let mut refs = Vec::new();
        collect_refs(&json["Resources"], "Resources", &mut refs);
        for (path, r) in refs {
            match r {
                Reference::Param(name) => {
                    if !t.parameters.contains_key(&name) && !PSEUDO_PARAMS.contains(&name.as_str()) {
                        let (line, col) = locate_ref(body, &name).unwrap_or((0, 0));
                        let mut p = Problem {
                            message: format!(
                                "`Ref` to `{name}` at {path}, but `Parameters` does not declare `{name}`; declare it (\"{name}\": {{\"Type\": \"String\"}}) or fix the name"
                            ),
                            ..at()
                        };
                        if line > 0 {
                            p = p.line(line).column_number(col);
                        }
                        problems.push(p);
                    }
                }
                Reference::Unknown(f) => problems.push(Problem {
                    message: format!(
                        "`{f}` at {path} is not a function AWS documents for provisioning templates (use Ref, {})",
                        FUNCTIONS.join(", ")
                    ),
                    ..at()
                }),
                Reference::Map(map) => {
                    if mappings.get(&map).is_none() {
                        problems.push(Problem {
                            message: format!(
                                "Fn::FindInMap at {path} names mapping `{map}`, which `Mappings` does not have"
                            ),
                            ..at()
                        });
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(t)
        } else {
            Err(problems)
        }
    }

    /// Columns whose values become attributes, by the parameter mapping.
    pub fn attribute_columns(&self, mapping: &BTreeMap<String, String>) -> BTreeSet<String> {
        self.attribute_params
            .values()
            .map(|p| self.column_of(p, mapping))
            .collect()
    }

    /// Parameters that no column, default or generated value will fill.
    pub fn unfilled_parameters(
        &self,
        columns: &BTreeSet<String>,
        optional: &BTreeSet<String>,
        mapping: &BTreeMap<String, String>,
    ) -> Vec<String> {
        self.parameters
            .iter()
            .filter(|(name, default)| {
                let column = self.column_of(name, mapping);
                default.is_none()
                    && !self.is_generated(name)
                    && !columns.contains(&column)
                    && !optional.contains(&column)
            })
            .map(|(n, _)| n.clone())
            .collect()
    }
}

impl Template {
    /// Whether provline fills the parameter itself (thing name, CSR, certificates).
    pub fn is_generated(&self, param: &str) -> bool {
        [
            &self.thing_name_param,
            &self.csr_param,
            &self.cert_pem_param,
            &self.ca_pem_param,
        ]
        .iter()
        .any(|p| p.as_deref() == Some(param))
    }

    /// The column a parameter reads: the profile's `[parameters]` entry, else by name.
    pub fn column_of(&self, param: &str, mapping: &BTreeMap<String, String>) -> String {
        mapping.get(param).cloned().unwrap_or_else(|| column_for_param(param))
    }
}

/// The CSV column a template parameter reads: `MacAddress` -> `mac_address`.
pub fn column_for_param(param: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = param.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev_lower = i > 0 && (chars[i - 1].is_ascii_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            let prev_upper = i > 0 && chars[i - 1].is_ascii_uppercase();
            if i > 0 && (prev_lower || (prev_upper && next_lower)) {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn plain_ref(v: &Value) -> Option<String> {
    v.as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("Ref"))
        .and_then(Value::as_str)
        .map(String::from)
}

enum Reference {
    Param(String),
    Map(String),
    Unknown(String),
}

fn collect_refs(v: &Value, path: &str, out: &mut Vec<(String, Reference)>) {
    match v {
        Value::Object(o) => {
            if o.len() == 1 {
                let (k, arg) = o.iter().next().expect("one entry");
                if k == "Ref" {
                    if let Some(name) = arg.as_str() {
                        out.push((path.to_string(), Reference::Param(name.to_string())));
                    }
                    return;
                }
                if k == "Fn::Sub" {
                    if let Some(s) = arg.as_str() {
                        for name in sub_vars(s) {
                            out.push((path.to_string(), Reference::Param(name)));
                        }
                        return;
                    }
                }
                if k == "Fn::FindInMap" {
                    if let Some(map) = arg.get(0).and_then(Value::as_str) {
                        out.push((path.to_string(), Reference::Map(map.to_string())));
                    }
                }
                if k.starts_with("Fn::") && !FUNCTIONS.contains(&k.as_str()) {
                    out.push((path.to_string(), Reference::Unknown(k.clone())));
                    return;
                }
            }
            for (k, child) in o {
                collect_refs(child, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                collect_refs(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn sub_vars(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        match after.find('}') {
            Some(j) => {
                let name = &after[..j];
                if !name.starts_with('!') {
                    out.push(name.to_string());
                }
                rest = &after[j + 1..];
            }
            None => break,
        }
    }
    out
}

/// Line and column (1-based) of `"Ref": "<name>"` in the body.
fn locate_ref(body: &str, name: &str) -> Option<(u64, u64)> {
    let mut search = 0;
    while let Some(i) = body[search..].find("\"Ref\"") {
        let start = search + i;
        let rest = body[start + 5..].trim_start();
        if let Some(rest) = rest.strip_prefix(':') {
            let rest = rest.trim_start();
            if let Some(rest) = rest.strip_prefix('"') {
                if rest.starts_with(name) && rest[name.len()..].starts_with('"') {
                    let before = &body[..start];
                    let line = before.matches('\n').count() as u64 + 1;
                    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) as u64 + 1;
                    return Some((line, col));
                }
            }
        }
        search = start + 5;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_passes_its_own_check() {
        let t = Template::check("builtin", &builtin("p")).unwrap();
        assert_eq!(t.thing_name_param.as_deref(), Some("ThingName"));
        assert_eq!(t.csr_param.as_deref(), Some("CSR"));
        assert_eq!(t.policy_name.as_deref(), Some("p"));
        assert_eq!(
            t.attribute_columns(&BTreeMap::new()),
            ["lot", "mac_address", "model"].into_iter().map(String::from).collect()
        );
    }

    #[test]
    fn param_names_map_to_columns() {
        assert_eq!(column_for_param("MacAddress"), "mac_address");
        assert_eq!(column_for_param("SerialNumber"), "serial_number");
        assert_eq!(column_for_param("CSR"), "csr");
        assert_eq!(column_for_param("lot"), "lot");
        assert_eq!(column_for_param("HWRevision"), "hw_revision");
    }

    #[test]
    fn not_json_names_line_and_column() {
        let err = Template::check("t.txt", "{'Parameters': {}}").unwrap_err();
        let p = &err.0[0];
        assert_eq!((p.line, p.column_number), (Some(1), Some(2)));
    }

    #[test]
    fn undeclared_ref_is_located() {
        let body = builtin("p").replace("\"Ref\": \"Lot\"", "\"Ref\": \"Batch\"");
        let err = Template::check("t.json", &body).unwrap_err();
        let p = err.0.iter().find(|p| p.message.contains("`Batch`")).unwrap();
        assert!(p.line.unwrap() > 1);
        assert!(
            p.message.contains("Resources.thing.Properties.AttributePayload.lot"),
            "{}",
            p.message
        );
    }

    #[test]
    fn empty_policy_name_is_rejected() {
        let err = Template::check("t.json", &builtin("")).unwrap_err();
        assert!(err.0.iter().any(|p| p.message.contains("`PolicyName` is empty")));
    }
}
