//! How a factory's manufacturing export maps onto provline.
//!
//! The default profile has the columns `serial_number` and `model` (required),
//! `mac_address`, `hardware_revision`, `lot` and `csr` (optional). Header
//! names are matched after trimming surrounding spaces and ignoring case, and
//! each column may have aliases (`SN`, `Serial No.`).

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// Free text, trimmed.
    Text,
    /// A MAC address, normalised to upper case with `:` separators.
    Mac,
    /// A PEM CSR made on the device.
    Csr,
}

#[derive(Clone, Debug)]
pub struct ColumnRule {
    pub name: String,
    pub aliases: Vec<String>,
    pub required: bool,
    pub kind: ColumnKind,
}

#[derive(Clone, Debug)]
pub struct Profile {
    pub columns: Vec<ColumnRule>,
    /// The thing name pattern: literal text and `{column}` or
    /// `{column|lower}` / `{column|upper}` placeholders.
    pub thing_name: String,
}

impl Default for Profile {
    fn default() -> Self {
        let col = |name: &str, aliases: &[&str], required, kind| ColumnRule {
            name: name.into(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            required,
            kind,
        };
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

/// Normalises a MAC address to `AA:BB:CC:DD:EE:FF`, from `:`, `-`, `.` or no separators.
pub fn normalise_mac(raw: &str) -> Option<String> {
    let hex: String = raw.chars().filter(|c| !matches!(c, ':' | '-' | '.')).collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let up = hex.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..6).map(|i| &up[i * 2..i * 2 + 2]).collect();
    Some(pairs.join(":"))
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
        assert_eq!(normalise_mac("a4-cf-12-00-00-01").as_deref(), Some("A4:CF:12:00:00:01"));
        assert_eq!(normalise_mac("a4cf12000001").as_deref(), Some("A4:CF:12:00:00:01"));
        assert_eq!(normalise_mac("a4:cf:12:00:00"), None);
    }

    #[test]
    fn headers_match_aliases_ignoring_case_and_spaces() {
        let p = Profile::default();
        assert_eq!(p.column_for_header(" Serial No. ").unwrap().name, "serial_number");
        assert_eq!(p.column_for_header("MODEL").unwrap().name, "model");
        assert!(p.column_for_header("colour").is_none());
    }
}
