//! How a factory's manufacturing export maps onto provline.
//!
//! The default profile has the columns `serial_number` and `model` (required),
//! `mac_address`, `hardware_revision`, `lot` and `csr` (optional). Header
//! names are matched after trimming surrounding spaces and ignoring case, and
//! each column may have aliases (`SN`, `Serial No.`).

use std::collections::BTreeMap;

use crate::error::{Error, Problem, Problems, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// Free text, trimmed.
    Text,
    /// A MAC address, normalised to upper case with `:` separators.
    Mac,
    /// A PEM CSR made on the device.
    Csr,
}

/// How a value is rewritten before it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Normalise {
    #[default]
    None,
    Upper,
    Lower,
}

#[derive(Clone, Debug)]
pub struct ColumnRule {
    pub name: String,
    pub aliases: Vec<String>,
    pub required: bool,
    pub kind: ColumnKind,
    pub normalise: Normalise,
    /// The whole (normalised) value must match.
    pub pattern: Option<regex::Regex>,
    pub min_length: Option<usize>,
    pub max_length: Option<usize>,
    /// When not empty, the value must be one of these.
    pub allowed: Vec<String>,
    /// For MAC addresses: the separator written between pairs.
    pub separator: char,
}

impl ColumnRule {
    fn new(name: &str, aliases: &[&str], required: bool, kind: ColumnKind) -> ColumnRule {
        ColumnRule {
            name: name.into(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            required,
            kind,
            normalise: Normalise::None,
            pattern: None,
            min_length: None,
            max_length: None,
            allowed: Vec::new(),
            separator: ':',
        }
    }

    /// Normalises a trimmed value and checks it against the rule.
    pub fn apply(&self, raw: &str) -> Result<String, String> {
        let mut v = match self.normalise {
            Normalise::None => raw.to_string(),
            Normalise::Upper => raw.to_uppercase(),
            Normalise::Lower => raw.to_lowercase(),
        };
        if v.is_empty() {
            return Ok(v);
        }
        if self.kind == ColumnKind::Mac {
            v = normalise_mac(&v, self.separator).ok_or_else(|| {
                format!(
                    "`{}` is not a MAC address; expected six hex pairs such as A4{s}CF{s}12{s}00{s}00{s}01",
                    raw.escape_debug(),
                    s = self.separator
                )
            })?;
        }
        let len = v.chars().count();
        if let Some(min) = self.min_length.filter(|m| len < *m) {
            return Err(format!(
                "`{}` is {len} characters; at least {min} are required",
                v.escape_debug()
            ));
        }
        if let Some(max) = self.max_length.filter(|m| len > *m) {
            return Err(format!(
                "`{}` is {len} characters; at most {max} are allowed",
                v.escape_debug()
            ));
        }
        if !self.allowed.is_empty() && !self.allowed.contains(&v) {
            return Err(format!(
                "`{}` is not an allowed value; allowed are {}",
                v.escape_debug(),
                self.allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(re) = &self.pattern {
            if !re.is_match(&v) {
                return Err(format!(
                    "`{}` does not match the profile's pattern `{}`",
                    v.escape_debug(),
                    re.as_str()
                ));
            }
        }
        Ok(v)
    }
}

#[derive(Clone, Debug)]
pub struct Profile {
    pub columns: Vec<ColumnRule>,
    /// The thing name pattern: literal text and `{column}` or
    /// `{column|lower}` / `{column|upper}` placeholders.
    pub thing_name: String,
    /// Columns that the built-in template makes thing attributes.
    pub attributes: Vec<String>,
    /// Thing type, thing groups and policy for the built-in template.
    pub thing_type: Option<String>,
    pub thing_groups: Vec<String>,
    pub policy: Option<String>,
    /// The CSV delimiter; None detects it per file.
    pub delimiter: Option<u8>,
    /// Template parameter -> the column that fills it, where the name alone
    /// does not say (`MacAddress` reads `mac_address` without an entry here).
    pub parameters: BTreeMap<String, String>,
    /// Device certificates signed by the factory CA (byoca, jitp, jitr).
    pub certificate: CertificateSpec,
}

/// What a device certificate from the factory CA looks like.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CertificateSpec {
    pub validity_days: u32,
    /// Subject attributes in order (`C`, `O`, `CN`, ...) with their text,
    /// which may hold `{thing_name}` and `{column}` placeholders.
    pub subject: Vec<(String, String)>,
}

impl Default for CertificateSpec {
    fn default() -> Self {
        CertificateSpec {
            validity_days: 7300,
            subject: vec![
                ("CN".into(), "{thing_name}".into()),
                ("serialNumber".into(), "{serial_number}".into()),
            ],
        }
    }
}

/// Subject attribute names a profile may use, with their rcgen types.
pub fn subject_attribute(name: &str) -> Option<rcgen::DnType> {
    use rcgen::DnType;
    Some(match name {
        "C" => DnType::CountryName,
        "ST" => DnType::StateOrProvinceName,
        "L" => DnType::LocalityName,
        "O" => DnType::OrganizationName,
        "OU" => DnType::OrganizationalUnitName,
        "CN" => DnType::CommonName,
        "serialNumber" => DnType::CustomDnType(vec![2, 5, 4, 5]),
        "dnQualifier" => DnType::CustomDnType(vec![2, 5, 4, 46]),
        _ => return None,
    })
}

const SUBJECT_KEYS: [&str; 8] = ["C", "ST", "L", "O", "OU", "CN", "serialNumber", "dnQualifier"];

impl CertificateSpec {
    /// The subject for one device; an attribute whose text comes out empty is left out.
    pub fn subject_for(
        &self,
        thing_name: &str,
        values: &BTreeMap<String, String>,
    ) -> std::result::Result<Vec<crate::ca::SubjectField>, String> {
        let mut out = Vec::new();
        for (attr, text) in &self.subject {
            let ty = subject_attribute(attr).ok_or_else(|| format!("unknown subject attribute `{attr}`"))?;
            let value = fill(text, |name| {
                if name == "thing_name" {
                    Some(thing_name.to_string())
                } else {
                    values.get(name).cloned()
                }
            })?;
            if !value.is_empty() {
                out.push((ty, value));
            }
        }
        Ok(out)
    }
}

/// Replaces `{name}` placeholders; a name with no value is an error.
fn fill(text: &str, value_of: impl Fn(&str) -> Option<String>) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("`{text}`: `{{` is never closed"))?
            + open;
        let name = rest[open + 1..close].trim();
        match value_of(name) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!(
                    "`{text}` names `{name}`, which is neither `thing_name` nor a column of this row"
                ))
            }
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Default for Profile {
    fn default() -> Self {
        let col = ColumnRule::new;
        Profile {
            columns: vec![
                col(
                    "serial_number",
                    &["sn", "serial", "serial no.", "serial no", "serialnumber"],
                    true,
                    ColumnKind::Text,
                ),
                col("model", &[], true, ColumnKind::Text),
                col("mac_address", &["mac"], false, ColumnKind::Mac),
                col("hardware_revision", &["hw_rev"], false, ColumnKind::Text),
                col("lot", &[], false, ColumnKind::Text),
                col("csr", &[], false, ColumnKind::Csr),
            ],
            thing_name: "{serial_number}".into(),
            attributes: vec!["model".into(), "mac_address".into(), "lot".into()],
            thing_type: None,
            thing_groups: Vec::new(),
            policy: None,
            delimiter: None,
            parameters: BTreeMap::new(),
            certificate: CertificateSpec::default(),
        }
    }
}

impl Profile {
    /// The profile column a header names, if any.
    pub fn column_for_header(&self, header: &str) -> Option<&ColumnRule> {
        let h = header.trim();
        self.columns
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(h) || c.aliases.iter().any(|a| a.eq_ignore_ascii_case(h)))
    }

    pub fn rule(&self, name: &str) -> Option<&ColumnRule> {
        self.columns.iter().find(|c| c.name == name)
    }
}

const TOP_KEYS: [&str; 9] = [
    "thing_name",
    "parameters",
    "certificate",
    "attributes",
    "thing_type",
    "thing_groups",
    "policy",
    "delimiter",
    "columns",
];
const COLUMN_KEYS: [&str; 9] = [
    "aliases",
    "required",
    "kind",
    "normalise",
    "pattern",
    "min_length",
    "max_length",
    "allowed",
    "separator",
];

fn nearest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(word, k), *k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

fn unknown_key(file: &str, at: &str, key: &str, known: &[&str]) -> Problem {
    let hint = match nearest(key, known) {
        Some(k) => format!("; did you mean `{k}`?"),
        None => format!("; known keys are {}", known.join(", ")),
    };
    Problem::new(format!("unknown key `{key}`{at}{hint}")).file(file.to_string())
}

impl Profile {
    /// Reads a profile (TOML) on top of the default one: columns named in it
    /// replace or add to the default columns; other keys replace the default.
    pub fn load(path: &std::path::Path) -> Result<Profile> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::config(format!("cannot read the profile {file}: {e}")))?;
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, col) = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    (
                        before.matches('\n').count() as u64 + 1,
                        before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) as u64 + 1,
                    )
                })
                .unwrap_or((0, 0));
            let mut p = Problem::new(format!("the profile is not valid TOML: {}", e.message())).file(file.clone());
            if line > 0 {
                p = p.line(line).column_number(col);
            }
            Error::from(p)
        })?;
        let mut problems = Problems::default();
        let mut profile = Profile::default();
        let bad = |problems: &mut Problems, what: String| problems.push(Problem::new(what).file(file.clone()));
        let strings = |v: &toml::Value| -> Option<Vec<String>> {
            v.as_array()?.iter().map(|x| x.as_str().map(String::from)).collect()
        };
        for (key, value) in &doc {
            match key.as_str() {
                "thing_name" => match value.as_str() {
                    Some(s) => profile.thing_name = s.to_string(),
                    None => bad(
                        &mut problems,
                        "`thing_name` must be a string such as \"{serial_number}\"".into(),
                    ),
                },
                "attributes" => match strings(value) {
                    Some(v) => profile.attributes = v,
                    None => bad(&mut problems, "`attributes` must be a list of column names".into()),
                },
                "thing_type" => profile.thing_type = value.as_str().map(String::from),
                "thing_groups" => match strings(value) {
                    Some(v) => profile.thing_groups = v,
                    None => bad(&mut problems, "`thing_groups` must be a list of names".into()),
                },
                "policy" => profile.policy = value.as_str().map(String::from),
                "delimiter" => match value.as_str() {
                    Some(",") => profile.delimiter = Some(b','),
                    Some(";") => profile.delimiter = Some(b';'),
                    Some("\t") | Some("tab") => profile.delimiter = Some(b'\t'),
                    _ => bad(&mut problems, "`delimiter` must be \",\", \";\" or \"tab\"".into()),
                },
                "columns" => {
                    let Some(cols) = value.as_table() else {
                        bad(
                            &mut problems,
                            "`columns` must be a table of [columns.NAME] sections".into(),
                        );
                        continue;
                    };
                    for (name, spec) in cols {
                        let Some(spec) = spec.as_table() else {
                            bad(&mut problems, format!("[columns.{name}] must be a table"));
                            continue;
                        };
                        let mut rule = profile
                            .rule(name)
                            .cloned()
                            .unwrap_or_else(|| ColumnRule::new(name, &[], false, ColumnKind::Text));
                        for (k, v) in spec {
                            let at = format!(" in [columns.{name}]");
                            match k.as_str() {
                                "aliases" => match strings(v) {
                                    Some(a) => rule.aliases = a,
                                    None => bad(&mut problems, format!("`aliases`{at} must be a list of header names")),
                                },
                                "required" => match v.as_bool() {
                                    Some(b) => rule.required = b,
                                    None => bad(&mut problems, format!("`required`{at} must be true or false")),
                                },
                                "kind" => match v.as_str() {
                                    Some("text") => rule.kind = ColumnKind::Text,
                                    Some("mac") => rule.kind = ColumnKind::Mac,
                                    Some("csr") => rule.kind = ColumnKind::Csr,
                                    _ => bad(
                                        &mut problems,
                                        format!("`kind`{at} must be \"text\", \"mac\" or \"csr\""),
                                    ),
                                },
                                "normalise" => match v.as_str() {
                                    Some("none") => rule.normalise = Normalise::None,
                                    Some("upper") => rule.normalise = Normalise::Upper,
                                    Some("lower") => rule.normalise = Normalise::Lower,
                                    _ => bad(
                                        &mut problems,
                                        format!("`normalise`{at} must be \"none\", \"upper\" or \"lower\""),
                                    ),
                                },
                                "pattern" => match v.as_str().map(|p| regex::Regex::new(&format!("^(?:{p})$"))) {
                                    Some(Ok(re)) => rule.pattern = Some(re),
                                    Some(Err(e)) => bad(
                                        &mut problems,
                                        format!("`pattern`{at} is not a valid regular expression: {e}"),
                                    ),
                                    None => bad(&mut problems, format!("`pattern`{at} must be a string")),
                                },
                                "min_length" | "max_length" => match v.as_integer().filter(|n| *n >= 0) {
                                    Some(n) if k == "min_length" => rule.min_length = Some(n as usize),
                                    Some(n) => rule.max_length = Some(n as usize),
                                    None => bad(&mut problems, format!("`{k}`{at} must be a whole number")),
                                },
                                "allowed" => match strings(v) {
                                    Some(a) => rule.allowed = a,
                                    None => bad(&mut problems, format!("`allowed`{at} must be a list of strings")),
                                },
                                "separator" => match v.as_str().filter(|s| [":", "-", "."].contains(s)) {
                                    Some(sep) => rule.separator = sep.chars().next().expect("one char"),
                                    None => {
                                        bad(&mut problems, format!("`separator`{at} must be \":\", \"-\" or \".\""))
                                    }
                                },
                                other => problems.push(unknown_key(&file, &at, other, &COLUMN_KEYS)),
                            }
                        }
                        match profile.columns.iter_mut().find(|c| c.name == *name) {
                            Some(c) => *c = rule,
                            None => profile.columns.push(rule),
                        }
                    }
                }
                "parameters" => match value.as_table() {
                    Some(t) => {
                        for (param, column) in t {
                            match column.as_str() {
                                Some(c) => {
                                    profile.parameters.insert(param.clone(), c.to_string());
                                }
                                None => bad(
                                    &mut problems,
                                    format!("[parameters] `{param}` must name a column, e.g. {param} = \"site\""),
                                ),
                            }
                        }
                    }
                    None => bad(
                        &mut problems,
                        "`parameters` must be a table of template parameter = \"column\"".into(),
                    ),
                },
                "certificate" => {
                    let Some(t) = value.as_table() else {
                        bad(&mut problems, "`certificate` must be a [certificate] section".into());
                        continue;
                    };
                    for (k, v) in t {
                        match k.as_str() {
                            "validity_days" => match v.as_integer().filter(|n| (1..=36500).contains(n)) {
                                Some(n) => profile.certificate.validity_days = n as u32,
                                None => bad(
                                    &mut problems,
                                    "`validity_days` in [certificate] must be a whole number of days from 1 to 36500".into(),
                                ),
                            },
                            "subject" => match v.as_table() {
                                Some(subject) => {
                                    profile.certificate.subject.clear();
                                    for (attr, text) in subject {
                                        if subject_attribute(attr).is_none() {
                                            problems.push(unknown_key(
                                                &file,
                                                " in [certificate.subject]",
                                                attr,
                                                &SUBJECT_KEYS,
                                            ));
                                            continue;
                                        }
                                        match text.as_str() {
                                            Some(t) => profile.certificate.subject.push((attr.clone(), t.to_string())),
                                            None => bad(
                                                &mut problems,
                                                format!("[certificate.subject] `{attr}` must be a string"),
                                            ),
                                        }
                                    }
                                }
                                None => bad(
                                    &mut problems,
                                    "`subject` in [certificate] must be a table such as { CN = \"{thing_name}\", O = \"Acme\" }".into(),
                                ),
                            },
                            other => problems.push(unknown_key(
                                &file,
                                " in [certificate]",
                                other,
                                &["validity_days", "subject"],
                            )),
                        }
                    }
                }
                other => problems.push(unknown_key(&file, "", other, &TOP_KEYS)),
            }
        }
        for (param, column) in &profile.parameters {
            if profile.rule(column).is_none() {
                bad(
                    &mut problems,
                    format!("[parameters] `{param}` reads column `{column}`, which the profile does not have; add a [columns.{column}] section"),
                );
            }
        }
        for (attr, text) in &profile.certificate.subject {
            let mut rest = text.as_str();
            while let Some(open) = rest.find('{') {
                let Some(close) = rest[open..].find('}').map(|c| c + open) else {
                    bad(
                        &mut problems,
                        format!("[certificate.subject] {attr} = `{text}`: `{{` is never closed"),
                    );
                    break;
                };
                let name = rest[open + 1..close].trim();
                if name != "thing_name" && profile.rule(name).is_none() {
                    bad(
                        &mut problems,
                        format!("[certificate.subject] {attr} = `{text}` names `{name}`, which is neither `thing_name` nor a column of the profile"),
                    );
                }
                rest = &rest[close + 1..];
            }
            if attr == "C" && !text.contains('{') && (text.len() != 2 || !text.chars().all(|c| c.is_ascii_uppercase()))
            {
                bad(
                    &mut problems,
                    format!("[certificate.subject] C = `{text}` must be a two-letter ISO 3166 country code in capitals, such as \"DE\""),
                );
            }
        }
        for a in &profile.attributes {
            if profile.rule(a).is_none() {
                bad(
                    &mut problems,
                    format!("attribute `{a}` is not a column of the profile; add a [columns.{a}] section"),
                );
            }
            if let Err(e) = crate::rules::check_attribute_name(a) {
                bad(&mut problems, e);
            }
        }
        if profile.thing_type.is_none() && profile.attributes.len() > 3 {
            bad(&mut problems, format!(
                "{} attributes without a thing type: AWS IoT allows 3 attributes on a thing without a type (50 with one); set `thing_type` or name at most 3",
                profile.attributes.len()
            ));
        }
        if profile.attributes.len() > 50 {
            bad(
                &mut problems,
                format!(
                    "{} attributes: AWS IoT allows at most 50 on a thing",
                    profile.attributes.len()
                ),
            );
        }
        NamePattern::parse(&profile.thing_name)?;
        problems.into_result()?;
        Ok(profile)
    }
}

/// A compiled thing name pattern.
#[derive(Clone, Debug)]
pub struct NamePattern {
    parts: Vec<Part>,
}

#[derive(Clone, Debug)]
enum Part {
    Literal(String),
    Column { name: String, case: Case },
}

#[derive(Clone, Copy, Debug)]
enum Case {
    AsIs,
    Lower,
    Upper,
}

impl NamePattern {
    pub fn parse(pattern: &str) -> Result<NamePattern> {
        let mut parts = Vec::new();
        let mut rest = pattern;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| {
                Error::config(format!(
                    "thing name pattern `{pattern}`: `{{` at byte {} is never closed",
                    pattern.len() - rest.len() + open
                ))
            })? + open;
            let inner = &rest[open + 1..close];
            let (name, case) = match inner.split_once('|') {
                None => (inner, Case::AsIs),
                Some((n, "lower")) => (n, Case::Lower),
                Some((n, "upper")) => (n, Case::Upper),
                Some((_, other)) => {
                    return Err(Error::config(format!(
                        "thing name pattern `{pattern}`: unknown modifier `{other}` (use `lower` or `upper`)"
                    )))
                }
            };
            if name.is_empty() {
                return Err(Error::config(format!(
                    "thing name pattern `{pattern}`: empty `{{}}`; name a column, e.g. {{serial_number}}"
                )));
            }
            parts.push(Part::Column {
                name: name.trim().to_string(),
                case,
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        for p in &parts {
            if let Part::Literal(l) = p {
                if let Some(bad) = l
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')))
                {
                    return Err(Error::config(format!(
                        "thing name pattern `{pattern}`: the text `{l}` contains `{}`, which thing names do not allow (only [a-zA-Z0-9:_-])",
                        bad.escape_debug()
                    )));
                }
            }
        }
        if !parts.iter().any(|p| matches!(p, Part::Column { .. })) {
            return Err(Error::config(format!(
                "thing name pattern `{pattern}` names no column, so every device would get the same name; use e.g. {{serial_number}}"
            )));
        }
        Ok(NamePattern { parts })
    }

    /// The columns the pattern reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column { name, .. } => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    pub fn render(&self, value_of: impl Fn(&str) -> Option<String>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Column { name, case } => {
                    let v = value_of(name).unwrap_or_default();
                    match case {
                        Case::AsIs => out.push_str(&v),
                        Case::Lower => out.push_str(&v.to_lowercase()),
                        Case::Upper => out.push_str(&v.to_uppercase()),
                    }
                }
            }
        }
        out
    }
}

/// Normalises a MAC address to `AA:BB:CC:DD:EE:FF` (with `sep` between the
/// pairs), from `:`, `-`, `.` or no separators.
pub fn normalise_mac(raw: &str, sep: char) -> Option<String> {
    let hex: String = raw.chars().filter(|c| !matches!(c, ':' | '-' | '.')).collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let up = hex.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..6).map(|i| &up[i * 2..i * 2 + 2]).collect();
    Some(pairs.join(&sep.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_renders_columns_and_case() {
        let p = NamePattern::parse("line-a-{serial_number|lower}").unwrap();
        let name = p.render(|c| (c == "serial_number").then(|| "AB-01".to_string()));
        assert_eq!(name, "line-a-ab-01");
        assert_eq!(p.columns().collect::<Vec<_>>(), vec!["serial_number"]);
    }

    #[test]
    fn pattern_without_a_column_is_refused() {
        assert!(NamePattern::parse("fixed").is_err());
        assert!(NamePattern::parse("{serial").is_err());
    }

    #[test]
    fn mac_forms_normalise_to_one() {
        assert_eq!(
            normalise_mac("a4-cf-12-00-00-01", ':').as_deref(),
            Some("A4:CF:12:00:00:01")
        );
        assert_eq!(normalise_mac("a4cf12000001", '-').as_deref(), Some("A4-CF-12-00-00-01"));
        assert_eq!(normalise_mac("a4:cf:12:00:00", ':'), None);
    }

    fn load(text: &str) -> Result<Profile> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, text).unwrap();
        Profile::load(&p)
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        let err = load("thing_nme = \"{serial_number}\"\n[columns.lot]\nrequird = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown key `thing_nme`; did you mean `thing_name`?"),
            "{err}"
        );
        assert!(
            err.contains("unknown key `requird` in [columns.lot]; did you mean `required`?"),
            "{err}"
        );
    }

    #[test]
    fn column_rules_normalise_and_check() {
        let p = load(
            "[columns.model]\nallowed = [\"TH-100\", \"TH-200\"]\nnormalise = \"upper\"\n[columns.mac_address]\nseparator = \"-\"\n[columns.site]\npattern = \"[A-Z]{3}\"\nrequired = true\n",
        )
        .unwrap();
        assert_eq!(p.rule("model").unwrap().apply("th-100").unwrap(), "TH-100");
        assert!(p
            .rule("model")
            .unwrap()
            .apply("TH-300")
            .unwrap_err()
            .contains("allowed are `TH-100`, `TH-200`"));
        assert_eq!(
            p.rule("mac_address").unwrap().apply("a4cf12000001").unwrap(),
            "A4-CF-12-00-00-01"
        );
        assert!(p.rule("site").unwrap().apply("SEAT").unwrap_err().contains("pattern"));
        assert!(p.rule("site").unwrap().required);
    }

    #[test]
    fn too_many_attributes_without_a_type() {
        let err = load("attributes = [\"model\", \"lot\", \"mac_address\", \"hardware_revision\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 attributes without a thing type"), "{err}");
        assert!(load(
            "thing_type = \"sensor\"\nattributes = [\"model\", \"lot\", \"mac_address\", \"hardware_revision\"]\n"
        )
        .is_ok());
    }

    #[test]
    fn toml_errors_name_the_line() {
        let err = load("thing_name = \"x\"\nattributes = [\n").unwrap_err();
        let Error::Input(p) = err else { panic!("{err}") };
        assert_eq!(p.0[0].line, Some(2), "the unclosed list starts on line 2");
    }

    #[test]
    fn headers_match_aliases_ignoring_case_and_spaces() {
        let p = Profile::default();
        assert_eq!(p.column_for_header(" Serial No. ").unwrap().name, "serial_number");
        assert_eq!(p.column_for_header("MODEL").unwrap().name, "model");
        assert!(p.column_for_header("colour").is_none());
    }
}
