//! Provisioning templates: static checks when a task starts, evaluation of
//! `Ref` and the intrinsic functions per input line, and extraction of the
//! three resource kinds (`AWS::IoT::Thing`, `AWS::IoT::Certificate`,
//! `AWS::IoT::Policy`) into plain specs.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// A template or line the sandbox cannot work with; the text is meant for
/// the API caller or the ERRORS report.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TemplateError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, TemplateError> {
    Err(TemplateError(message.into()))
}

/// Values of the pseudo parameters (`AWS::Region`, `AWS::AccountId`).
pub(crate) struct Pseudo<'a> {
    pub region: &'a str,
    pub account_id: &'a str,
}

impl Pseudo<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        match name {
            "AWS::Region" => Some(self.region),
            "AWS::AccountId" => Some(self.account_id),
            _ => None,
        }
    }
}

/// What to do with a property of a resource that already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Override {
    DoNothing,
    Replace,
    Fail,
    Merge,
}

impl Override {
    fn parse(s: &str) -> Option<Override> {
        match s.to_ascii_uppercase().as_str() {
            "DO_NOTHING" => Some(Override::DoNothing),
            "REPLACE" => Some(Override::Replace),
            "FAIL" => Some(Override::Fail),
            "MERGE" => Some(Override::Merge),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResourceType {
    Thing,
    Certificate,
    Policy,
}

impl ResourceType {
    fn parse(s: &str) -> Option<ResourceType> {
        match s {
            "AWS::IoT::Thing" => Some(ResourceType::Thing),
            "AWS::IoT::Certificate" => Some(ResourceType::Certificate),
            "AWS::IoT::Policy" => Some(ResourceType::Policy),
            _ => None,
        }
    }

    /// The override keys this type accepts, and whether `MERGE` is allowed.
    fn overridable(self) -> &'static [(&'static str, bool)] {
        match self {
            ResourceType::Thing => &[
                ("AttributePayload", true),
                ("ThingTypeName", false),
                ("ThingGroups", true),
            ],
            ResourceType::Certificate => &[("Status", false)],
            ResourceType::Policy => &[],
        }
    }
}

#[derive(Clone, Debug)]
struct ResourceDecl {
    logical_id: String,
    kind: ResourceType,
    properties: Value,
    overrides: BTreeMap<String, Override>,
}

/// A parsed and statically checked template.
#[derive(Clone, Debug)]
pub(crate) struct Template {
    /// Declared parameters and their defaults.
    parameters: BTreeMap<String, Option<String>>,
    mappings: Map<String, Value>,
    resources: Vec<ResourceDecl>,
}

/// A resource spec with the logical name it has in the template.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Named<T> {
    pub logical_id: String,
    pub spec: T,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ThingSpec {
    pub name: String,
    pub attributes: Option<BTreeMap<String, String>>,
    pub thing_type: Option<String>,
    pub groups: Option<Vec<String>>,
    pub billing_group: Option<String>,
    pub overrides: ThingOverrides,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ThingOverrides {
    pub attributes: Option<Override>,
    pub thing_type: Option<Override>,
    pub groups: Option<Override>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum CertSource {
    Csr(String),
    Pem { pem: String, ca_pem: Option<String> },
    Id(String),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CertSpec {
    pub source: CertSource,
    /// `ACTIVE` or `INACTIVE`.
    pub status: String,
    pub status_override: Option<Override>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum PolicySpec {
    Name(String),
    Document(String),
}

/// The resources of a template, evaluated for one line.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Resolved {
    pub thing: Option<Named<ThingSpec>>,
    pub certificate: Option<Named<CertSpec>>,
    pub policy: Option<Named<PolicySpec>>,
}

/// A JSON value as a string, the way template values are used.
fn scalar_string(value: &Value, what: &str) -> Result<String, TemplateError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => err(format!("{what} must be a string, not {}", kind_of(value))),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// If `value` is `{"Ref": ..}` or `{"Fn::X": ..}`, its name and argument.
fn as_intrinsic(value: &Value) -> Option<(&str, &Value)> {
    let object = value.as_object()?;
    if object.len() != 1 {
        return None;
    }
    let (name, arg) = object.iter().next()?;
    (name == "Ref" || name.starts_with("Fn::")).then_some((name.as_str(), arg))
}

const FUNCTIONS: &[&str] = &["Fn::Join", "Fn::Select", "Fn::Split", "Fn::Sub", "Fn::FindInMap"];

/// The `${Name}` references of a `Fn::Sub` string (`${!Name}` is a literal).
fn sub_references(text: &str) -> Result<Vec<&str>, TemplateError> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return err(format!("unterminated `${{` in Fn::Sub string `{text}`"));
        };
        let name = &after[..end];
        if !name.starts_with('!') {
            names.push(name.trim());
        }
        rest = &after[end + 1..];
    }
    Ok(names)
}

impl Template {
    /// Parses a template body and checks everything that does not depend on
    /// the input lines.
    pub fn parse(body: &str) -> Result<Template, TemplateError> {
        let root: Value = serde_json::from_str(body)
            .map_err(|e| TemplateError(format!("Template format error: JSON not well-formed: {e}")))?;
        let Value::Object(root) = root else {
            return err("Template format error: the template must be a JSON object");
        };

        let mut parameters = BTreeMap::new();
        if let Some(params) = root.get("Parameters") {
            let Value::Object(params) = params else {
                return err("Parameters must be an object");
            };
            for (name, decl) in params {
                let Value::Object(decl) = decl else {
                    return err(format!("parameter `{name}` must be an object"));
                };
                let default = match decl.get("Default") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(scalar_string(v, &format!("the Default of parameter `{name}`"))?),
                };
                parameters.insert(name.clone(), default);
            }
        }

        let mappings = match root.get("Mappings") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return err("Mappings must be an object"),
        };

        let Some(Value::Object(resource_map)) = root.get("Resources") else {
            return err("the template has no Resources object");
        };
        if resource_map.is_empty() {
            return err("the template's Resources object is empty");
        }
        let mut template = Template {
            parameters,
            mappings,
            resources: Vec::new(),
        };
        for (logical_id, decl) in resource_map {
            let resource = template.parse_resource(logical_id, decl)?;
            if template.resources.iter().any(|r| r.kind == resource.kind) {
                return err(format!(
                    "resource `{logical_id}` repeats a resource type; a template may hold one thing, one certificate and one policy"
                ));
            }
            template.resources.push(resource);
        }
        Ok(template)
    }

    fn parse_resource(&self, logical_id: &str, decl: &Value) -> Result<ResourceDecl, TemplateError> {
        let Value::Object(decl) = decl else {
            return err(format!("resource `{logical_id}` must be an object"));
        };
        let type_name = decl.get("Type").and_then(Value::as_str).unwrap_or_default();
        let Some(kind) = ResourceType::parse(type_name) else {
            return err(format!(
                "resource `{logical_id}` has unsupported Type `{type_name}`; expected AWS::IoT::Thing, AWS::IoT::Certificate or AWS::IoT::Policy"
            ));
        };
        let properties = match decl.get("Properties") {
            Some(Value::Object(p)) => Value::Object(p.clone()),
            None => Value::Object(Map::new()),
            Some(_) => return err(format!("the Properties of `{logical_id}` must be an object")),
        };
        self.check_references(&properties, logical_id)?;

        let mut overrides = BTreeMap::new();
        if let Some(settings) = decl.get("OverrideSettings") {
            let Value::Object(settings) = settings else {
                return err(format!("the OverrideSettings of `{logical_id}` must be an object"));
            };
            for (key, value) in settings {
                let Some(&(_, merge_ok)) = kind.overridable().iter().find(|(k, _)| k == key) else {
                    return err(format!("`{key}` cannot be overridden in resource `{logical_id}`"));
                };
                let setting = value.as_str().and_then(Override::parse);
                match setting {
                    Some(Override::Merge) if !merge_ok => {
                        return err(format!("MERGE is not valid for `{key}` in resource `{logical_id}`"))
                    }
                    Some(setting) => {
                        overrides.insert(key.clone(), setting);
                    }
                    None => {
                        return err(format!(
                            "override setting of `{key}` in `{logical_id}` must be DO_NOTHING, REPLACE, FAIL or MERGE"
                        ))
                    }
                }
            }
        }

        let has = |key: &str| properties.get(key).is_some();
        match kind {
            ResourceType::Thing if !has("ThingName") => {
                return err(format!("thing resource `{logical_id}` has no ThingName"));
            }
            ResourceType::Certificate => {
                let sources = ["CertificateSigningRequest", "CertificateId", "CertificatePem"]
                    .iter()
                    .filter(|k| has(k))
                    .count();
                if sources != 1 {
                    return err(format!(
                        "certificate resource `{logical_id}` needs exactly one of CertificateSigningRequest, CertificateId and CertificatePem"
                    ));
                }
            }
            ResourceType::Policy => {
                let named = match properties.get("PolicyName") {
                    Some(Value::String(s)) => !s.is_empty(),
                    Some(_) => true,
                    None => false,
                };
                let documented = has("PolicyDocument");
                if named == documented {
                    return err(if named {
                        "Invalid registration template. Both policyName and policyDocument are present in the Template."
                    } else {
                        "Invalid registration template. Neither policyName nor policyDocument is present in the Template."
                    });
                }
            }
            ResourceType::Thing => {}
        }
        Ok(ResourceDecl {
            logical_id: logical_id.to_owned(),
            kind,
            properties,
            overrides,
        })
    }

    fn is_known_name(&self, name: &str) -> bool {
        self.parameters.contains_key(name)
            || Pseudo {
                region: "",
                account_id: "",
            }
            .get(name)
            .is_some()
    }

    /// Checks that every `Ref` and `${..}` names a declared parameter and
    /// that only supported intrinsic functions are used.
    fn check_references(&self, value: &Value, logical_id: &str) -> Result<(), TemplateError> {
        if let Some((name, arg)) = as_intrinsic(value) {
            match name {
                "Ref" => {
                    let Value::String(target) = arg else {
                        return err(format!("a Ref in `{logical_id}` must name a parameter"));
                    };
                    if !self.is_known_name(target) {
                        return err(format!(
                            "Ref to `{target}` in resource `{logical_id}`, which Parameters does not declare"
                        ));
                    }
                    return Ok(());
                }
                "Fn::Sub" => {
                    let (text, vars) = match arg {
                        Value::String(text) => (text.as_str(), None),
                        Value::Array(items) if items.len() == 2 => match (&items[0], &items[1]) {
                            (Value::String(text), Value::Object(vars)) => (text.as_str(), Some(vars)),
                            _ => return err(format!("Fn::Sub in `{logical_id}` takes a string and a map")),
                        },
                        _ => return err(format!("Fn::Sub in `{logical_id}` takes a string or [string, map]")),
                    };
                    for name in sub_references(text)? {
                        let in_vars = vars.is_some_and(|v| v.contains_key(name));
                        if !in_vars && !self.is_known_name(name) {
                            return err(format!(
                                "Fn::Sub in resource `{logical_id}` refers to `{name}`, which Parameters does not declare"
                            ));
                        }
                    }
                    if let Some(vars) = vars {
                        for v in vars.values() {
                            self.check_references(v, logical_id)?;
                        }
                    }
                    return Ok(());
                }
                f if FUNCTIONS.contains(&f) => return self.check_references(arg, logical_id),
                f => {
                    return err(format!(
                        "unsupported intrinsic function `{f}` in resource `{logical_id}`"
                    ))
                }
            }
        }
        match value {
            Value::Array(items) => items.iter().try_for_each(|v| self.check_references(v, logical_id)),
            Value::Object(map) => map.values().try_for_each(|v| self.check_references(v, logical_id)),
            _ => Ok(()),
        }
    }

    /// The declared parameters that have no Default and that `line` gives
    /// no value for, in name order.
    pub fn missing_parameters(&self, line: &Map<String, Value>) -> Vec<String> {
        self.parameters
            .iter()
            .filter(|(name, default)| default.is_none() && line.get(*name).is_none_or(Value::is_null))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Evaluates the template for one input line (a JSON object of
    /// parameter values).
    pub fn resolve(&self, line: &Map<String, Value>, pseudo: &Pseudo<'_>) -> Result<Resolved, TemplateError> {
        let mut params: BTreeMap<&str, Option<String>> = BTreeMap::new();
        for (name, default) in &self.parameters {
            let value = match line.get(name) {
                None | Some(Value::Null) => default.clone(),
                Some(v) => Some(scalar_string(v, &format!("the value of parameter `{name}`"))?),
            };
            params.insert(name, value);
        }
        let eval = Evaluator {
            params: &params,
            mappings: &self.mappings,
            pseudo,
        };

        let mut resolved = Resolved::default();
        for resource in &self.resources {
            let properties = eval.eval(&resource.properties)?;
            let logical_id = resource.logical_id.clone();
            let get = |key: &str| properties.get(key).filter(|v| !v.is_null());
            let override_of = |key: &str| resource.overrides.get(key).copied();
            match resource.kind {
                ResourceType::Thing => {
                    let spec = thing_spec(&get, &override_of)?;
                    resolved.thing = Some(Named { logical_id, spec });
                }
                ResourceType::Certificate => {
                    let spec = cert_spec(&get, override_of("Status"))?;
                    resolved.certificate = Some(Named { logical_id, spec });
                }
                ResourceType::Policy => {
                    let spec = match (get("PolicyName"), get("PolicyDocument")) {
                        (Some(name), _) => PolicySpec::Name(scalar_string(name, "PolicyName")?),
                        (None, Some(Value::String(doc))) => PolicySpec::Document(doc.clone()),
                        (None, Some(doc @ Value::Object(_))) => PolicySpec::Document(doc.to_string()),
                        _ => return err("the policy has neither a PolicyName nor a PolicyDocument"),
                    };
                    if matches!(&spec, PolicySpec::Name(n) if n.is_empty()) {
                        return err("PolicyName is empty");
                    }
                    resolved.policy = Some(Named { logical_id, spec });
                }
            }
        }
        Ok(resolved)
    }
}

fn optional_name(value: Option<&Value>, what: &str) -> Result<Option<String>, TemplateError> {
    match value {
        None => Ok(None),
        Some(v) => {
            let s = scalar_string(v, what)?;
            Ok((!s.is_empty()).then_some(s))
        }
    }
}

fn thing_spec<'v>(
    get: &dyn Fn(&str) -> Option<&'v Value>,
    override_of: &dyn Fn(&str) -> Option<Override>,
) -> Result<ThingSpec, TemplateError> {
    let name = match get("ThingName") {
        Some(v) => scalar_string(v, "ThingName")?,
        None => return err("ThingName has no value"),
    };
    let attributes = match get("AttributePayload") {
        None => None,
        Some(Value::Object(map)) => {
            let mut attributes = BTreeMap::new();
            for (key, value) in map {
                attributes.insert(key.clone(), scalar_string(value, &format!("attribute `{key}`"))?);
            }
            Some(attributes)
        }
        Some(other) => return err(format!("AttributePayload must be an object, not {}", kind_of(other))),
    };
    let groups = match get("ThingGroups") {
        None => None,
        Some(Value::Array(items)) => {
            let mut groups = Vec::new();
            for item in items {
                let group = scalar_string(item, "a thing group name")?;
                if !group.is_empty() && !groups.contains(&group) {
                    groups.push(group);
                }
            }
            Some(groups)
        }
        Some(Value::String(group)) => Some(if group.is_empty() { vec![] } else { vec![group.clone()] }),
        Some(other) => return err(format!("ThingGroups must be a list, not {}", kind_of(other))),
    };
    Ok(ThingSpec {
        name,
        attributes,
        thing_type: optional_name(get("ThingTypeName"), "ThingTypeName")?,
        groups,
        billing_group: optional_name(get("BillingGroup"), "BillingGroup")?,
        overrides: ThingOverrides {
            attributes: override_of("AttributePayload"),
            thing_type: override_of("ThingTypeName"),
            groups: override_of("ThingGroups"),
        },
    })
}

fn cert_spec<'v>(
    get: &dyn Fn(&str) -> Option<&'v Value>,
    status_override: Option<Override>,
) -> Result<CertSpec, TemplateError> {
    let source = if let Some(csr) = get("CertificateSigningRequest") {
        CertSource::Csr(scalar_string(csr, "CertificateSigningRequest")?)
    } else if let Some(pem) = get("CertificatePem") {
        CertSource::Pem {
            pem: scalar_string(pem, "CertificatePem")?,
            ca_pem: optional_name(get("CACertificatePem"), "CACertificatePem")?,
        }
    } else if let Some(id) = get("CertificateId") {
        CertSource::Id(scalar_string(id, "CertificateId")?)
    } else {
        return err("the certificate has no CertificateSigningRequest, CertificatePem or CertificateId value");
    };
    let status = match get("Status") {
        None => "ACTIVE".to_owned(),
        Some(v) => {
            let status = scalar_string(v, "Status")?.to_ascii_uppercase();
            if status != "ACTIVE" && status != "INACTIVE" {
                return err(format!("certificate Status `{status}` must be ACTIVE or INACTIVE"));
            }
            status
        }
    };
    Ok(CertSpec {
        source,
        status,
        status_override,
    })
}

/// Evaluates intrinsic functions against one line's parameters.
struct Evaluator<'a> {
    params: &'a BTreeMap<&'a str, Option<String>>,
    mappings: &'a Map<String, Value>,
    pseudo: &'a Pseudo<'a>,
}

impl Evaluator<'_> {
    fn lookup(&self, name: &str) -> Result<String, TemplateError> {
        if let Some(value) = self.pseudo.get(name) {
            return Ok(value.to_owned());
        }
        match self.params.get(name) {
            Some(Some(value)) => Ok(value.clone()),
            Some(None) => err(format!(
                "parameter `{name}` has no value: the line does not give it and it has no Default"
            )),
            None => err(format!("`{name}` is not a declared parameter")),
        }
    }

    fn eval(&self, value: &Value) -> Result<Value, TemplateError> {
        if let Some((name, arg)) = as_intrinsic(value) {
            return self.intrinsic(name, arg);
        }
        match value {
            Value::Array(items) => Ok(Value::Array(
                items.iter().map(|v| self.eval(v)).collect::<Result<_, _>>()?,
            )),
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    out.insert(k.clone(), self.eval(v)?);
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }

    fn eval_string(&self, value: &Value, what: &str) -> Result<String, TemplateError> {
        scalar_string(&self.eval(value)?, what)
    }

    /// The two-or-more element argument list of a function.
    fn args<'v>(arg: &'v Value, function: &str, n: usize) -> Result<&'v [Value], TemplateError> {
        match arg {
            Value::Array(items) if items.len() == n => Ok(items),
            _ => err(format!("{function} takes a list of {n} arguments")),
        }
    }

    fn intrinsic(&self, name: &str, arg: &Value) -> Result<Value, TemplateError> {
        match name {
            "Ref" => {
                let target = arg
                    .as_str()
                    .ok_or_else(|| TemplateError("Ref must name a parameter".into()))?;
                Ok(Value::String(self.lookup(target)?))
            }
            "Fn::Join" => {
                let args = Self::args(arg, name, 2)?;
                let delimiter = self.eval_string(&args[0], "the Fn::Join delimiter")?;
                let Value::Array(items) = self.eval(&args[1])? else {
                    return err("Fn::Join needs a list of values to join");
                };
                let parts = items
                    .iter()
                    .map(|v| scalar_string(v, "a value joined by Fn::Join"))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Value::String(parts.join(&delimiter)))
            }
            "Fn::Select" => {
                let args = Self::args(arg, name, 2)?;
                let index = self.eval_string(&args[0], "the Fn::Select index")?;
                let index: usize = index
                    .trim()
                    .parse()
                    .map_err(|_| TemplateError(format!("Fn::Select index `{index}` is not a number")))?;
                let Value::Array(items) = self.eval(&args[1])? else {
                    return err("Fn::Select needs a list to select from");
                };
                match items.get(index) {
                    Some(Value::Null) => err(format!("Fn::Select picked a null value at index {index}")),
                    Some(v) => Ok(v.clone()),
                    None => err(format!(
                        "Fn::Select index {index} is out of range for a list of {}",
                        items.len()
                    )),
                }
            }
            "Fn::Split" => {
                let args = Self::args(arg, name, 2)?;
                let delimiter = self.eval_string(&args[0], "the Fn::Split delimiter")?;
                let source = self.eval_string(&args[1], "the string split by Fn::Split")?;
                if delimiter.is_empty() {
                    return err("the Fn::Split delimiter is empty");
                }
                Ok(Value::Array(
                    source
                        .split(delimiter.as_str())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                ))
            }
            "Fn::Sub" => {
                let (text, vars) = match arg {
                    Value::String(text) => (text.as_str(), None),
                    Value::Array(items) if items.len() == 2 => match (&items[0], &items[1]) {
                        (Value::String(text), Value::Object(vars)) => (text.as_str(), Some(vars)),
                        _ => return err("Fn::Sub takes a string and a map"),
                    },
                    _ => return err("Fn::Sub takes a string or [string, map]"),
                };
                self.substitute(text, vars).map(Value::String)
            }
            "Fn::FindInMap" => {
                let args = Self::args(arg, name, 3)?;
                let map_name = self.eval_string(&args[0], "the Fn::FindInMap map name")?;
                let top = self.eval_string(&args[1], "the Fn::FindInMap top-level key")?;
                let second = self.eval_string(&args[2], "the Fn::FindInMap second-level key")?;
                self.mappings
                    .get(&map_name)
                    .and_then(|m| m.get(&top))
                    .and_then(|m| m.get(&second))
                    .cloned()
                    .ok_or_else(|| TemplateError(format!("Fn::FindInMap found nothing at {map_name}.{top}.{second}")))
            }
            other => err(format!("unsupported intrinsic function `{other}`")),
        }
    }

    fn substitute(&self, text: &str, vars: Option<&Map<String, Value>>) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| TemplateError(format!("unterminated `${{` in Fn::Sub string `{text}`")))?;
            let name = &after[..end];
            if let Some(literal) = name.strip_prefix('!') {
                out.push_str("${");
                out.push_str(literal);
                out.push('}');
            } else {
                let name = name.trim();
                let value = match vars.and_then(|v| v.get(name)) {
                    Some(v) => self.eval_string(v, &format!("Fn::Sub variable `{name}`"))?,
                    None => self.lookup(name)?,
                };
                out.push_str(&value);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PSEUDO: Pseudo<'static> = Pseudo {
        region: "eu-west-1",
        account_id: "123456789012",
    };

    fn template(resources: Value) -> Value {
        json!({
            "Parameters": {
                "ThingName": {"Type": "String"},
                "Serial": {"Type": "String"},
                "Location": {"Type": "String", "Default": "WA"},
                "CSR": {"Type": "String"},
                "Parts": {"Type": "String", "Default": "a,b,c"}
            },
            "Mappings": {"Models": {"m1": {"type": "sensor"}}},
            "Resources": resources
        })
    }

    /// Evaluates `expr` as the ThingName of a thing resource.
    fn eval_name(expr: Value, line: Value) -> Result<String, TemplateError> {
        let body = template(json!({
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": expr}}
        }));
        let t = Template::parse(&body.to_string())?;
        let line = line.as_object().unwrap().clone();
        Ok(t.resolve(&line, &PSEUDO)?.thing.unwrap().spec.name)
    }

    #[test]
    fn ref_uses_line_then_default_then_fails() {
        let line = json!({"ThingName": "dev-1", "Location": ""});
        assert_eq!(eval_name(json!({"Ref": "ThingName"}), line.clone()).unwrap(), "dev-1");
        // A present key wins over the Default, even when empty.
        assert_eq!(eval_name(json!({"Ref": "Location"}), line.clone()).unwrap(), "");
        assert_eq!(eval_name(json!({"Ref": "Location"}), json!({})).unwrap(), "WA");
        let missing = eval_name(json!({"Ref": "Serial"}), line).unwrap_err();
        assert!(missing.0.contains("`Serial` has no value"), "{missing}");
        assert_eq!(
            eval_name(json!({"Ref": "ThingName"}), json!({"ThingName": 42})).unwrap(),
            "42"
        );
    }

    #[test]
    fn pseudo_parameters() {
        let name = eval_name(
            json!({"Fn::Join": ["-", [{"Ref": "AWS::Region"}, {"Ref": "AWS::AccountId"}]]}),
            json!({}),
        );
        assert_eq!(name.unwrap(), "eu-west-1-123456789012");
    }

    #[test]
    fn join_select_split() {
        let line = json!({"ThingName": "x"});
        let joined = json!({"Fn::Join": ["", ["a", {"Ref": "Location"}, "z"]]});
        assert_eq!(eval_name(joined, line.clone()).unwrap(), "aWAz");
        let selected = json!({"Fn::Select": ["1", {"Fn::Split": [",", {"Ref": "Parts"}]}]});
        assert_eq!(eval_name(selected, line.clone()).unwrap(), "b");
        let numeric_index = json!({"Fn::Select": [2, ["p", "q", "r"]]});
        assert_eq!(eval_name(numeric_index, line.clone()).unwrap(), "r");
        let out_of_range = json!({"Fn::Select": [5, ["p"]]});
        assert!(eval_name(out_of_range, line.clone())
            .unwrap_err()
            .0
            .contains("out of range"));
        let null = json!({"Fn::Select": [0, [null]]});
        assert!(eval_name(null, line).unwrap_err().0.contains("null"));
    }

    #[test]
    fn sub_and_find_in_map() {
        let line = json!({"Serial": "SN1"});
        let sub = json!({"Fn::Sub": "dev-${Serial}-${AWS::Region}-${!Literal}"});
        assert_eq!(eval_name(sub, line.clone()).unwrap(), "dev-SN1-eu-west-1-${Literal}");
        let sub_vars = json!({"Fn::Sub": ["${Prefix}-${Serial}", {"Prefix": {"Ref": "Location"}}]});
        assert_eq!(eval_name(sub_vars, line.clone()).unwrap(), "WA-SN1");
        let find = json!({"Fn::FindInMap": ["Models", "m1", "type"]});
        assert_eq!(eval_name(find, line.clone()).unwrap(), "sensor");
        let missing = json!({"Fn::FindInMap": ["Models", "m2", "type"]});
        assert!(eval_name(missing, line).unwrap_err().0.contains("found nothing"));
    }

    #[test]
    fn static_checks() {
        let parse = |resources: Value| Template::parse(&template(resources).to_string());
        let undeclared =
            parse(json!({"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "Lot"}}}}));
        assert!(undeclared.unwrap_err().0.contains("`Lot`"));
        let undeclared_sub =
            parse(json!({"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::Sub": "${Lot}"}}}}));
        assert!(undeclared_sub.unwrap_err().0.contains("`Lot`"));
        let unknown_fn =
            parse(json!({"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::If": []}}}}));
        assert!(unknown_fn.unwrap_err().0.contains("Fn::If"));
        let empty_policy = parse(json!({"policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": ""}}}));
        assert!(empty_policy
            .unwrap_err()
            .0
            .contains("Neither policyName nor policyDocument"));
        let bad_type = parse(json!({"x": {"Type": "AWS::IoT::Other"}}));
        assert!(bad_type.unwrap_err().0.contains("unsupported Type"));
        let merge_type = parse(
            json!({"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "a"}, "OverrideSettings": {"ThingTypeName": "MERGE"}}}),
        );
        assert!(merge_type.unwrap_err().0.contains("MERGE"));
        let two_certs = parse(json!({
            "a": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": "x"}},
            "b": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": "y"}}
        }));
        assert!(two_certs.is_err());
        let not_json = Template::parse("{'Resources': {}}").unwrap_err();
        assert!(not_json.0.contains("line 1 column 2"), "{not_json}");
    }

    #[test]
    fn extracts_resources() {
        let body = template(json!({
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {
                    "ThingName": {"Ref": "ThingName"},
                    "AttributePayload": {"serial": {"Ref": "Serial"}, "rev": 3},
                    "ThingTypeName": "sensor",
                    "ThingGroups": ["g1", {"Ref": "Location"}, ""],
                    "BillingGroup": ""
                },
                "OverrideSettings": {"AttributePayload": "MERGE", "ThingGroups": "do_nothing"}
            },
            "cert": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateSigningRequest": {"Ref": "CSR"}, "Status": "Active"}},
            "pol": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": "{\"Version\":\"2012-10-17\"}"}}
        }));
        let t = Template::parse(&body.to_string()).unwrap();
        let line = json!({"ThingName": "d1", "Serial": "S1", "CSR": "pem"});
        let r = t.resolve(line.as_object().unwrap(), &PSEUDO).unwrap();

        let thing = r.thing.unwrap();
        assert_eq!(thing.logical_id, "thing");
        assert_eq!(thing.spec.name, "d1");
        let attrs = thing.spec.attributes.unwrap();
        assert_eq!(attrs["serial"], "S1");
        assert_eq!(attrs["rev"], "3");
        assert_eq!(thing.spec.groups.unwrap(), vec!["g1", "WA"]);
        assert_eq!(thing.spec.thing_type.as_deref(), Some("sensor"));
        assert_eq!(thing.spec.billing_group, None);
        assert_eq!(thing.spec.overrides.attributes, Some(Override::Merge));
        assert_eq!(thing.spec.overrides.groups, Some(Override::DoNothing));
        assert_eq!(thing.spec.overrides.thing_type, None);

        let cert = r.certificate.unwrap();
        assert_eq!(cert.logical_id, "cert");
        assert_eq!(cert.spec.source, CertSource::Csr("pem".into()));
        assert_eq!(cert.spec.status, "ACTIVE");
        assert_eq!(
            r.policy.unwrap().spec,
            PolicySpec::Document("{\"Version\":\"2012-10-17\"}".into())
        );
    }

    #[test]
    fn bad_status_fails_the_line() {
        let body = template(json!({
            "cert": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": "x", "Status": "REVOKED"}}
        }));
        let t = Template::parse(&body.to_string()).unwrap();
        assert!(t
            .resolve(&Map::new(), &PSEUDO)
            .unwrap_err()
            .0
            .contains("ACTIVE or INACTIVE"));
    }
}
