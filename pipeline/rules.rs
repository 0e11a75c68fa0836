//! AWS IoT's registry rules, checked locally so that a bulk task never fails
//! on line 8,000 for something we could have seen.

/// Thing names: 1 to 128 characters of `[a-zA-Z0-9:_-]`.
pub fn check_thing_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the thing name is empty; AWS IoT thing names are 1 to 128 characters of [a-zA-Z0-9:_-]".into());
    }
    let len = name.chars().count();
    if len > 128 {
        return Err(format!(
            "the thing name is {len} characters long; AWS IoT allows at most 128"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')))
    {
        return Err(format!(
            "the thing name `{}` contains {}; AWS IoT thing names allow only [a-zA-Z0-9:_-]",
            name.escape_debug(),
            describe_char(bad)
        ));
    }
    Ok(())
}

/// Attribute names: 1 to 128 characters of `[a-zA-Z0-9_.,@/:#-]`.
pub fn check_attribute_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > 128 {
        return Err(format!("attribute name `{name}` must be 1 to 128 characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.,@/:#-".contains(*c)))
    {
        return Err(format!(
            "attribute name `{}` contains {}; allowed are [a-zA-Z0-9_.,@/:#-]",
            name.escape_debug(),
            describe_char(bad)
        ));
    }
    Ok(())
}

/// Attribute values: at most 800 characters of `[a-zA-Z0-9_.,@/:#=\[\]-]`.
pub fn check_attribute_value(value: &str) -> Result<(), String> {
    let len = value.chars().count();
    if len > 800 {
        return Err(format!(
            "the value is {len} characters long; AWS IoT attribute values allow at most 800"
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.,@/:#=[]-".contains(*c)))
    {
        return Err(format!(
            "the value `{}` contains {}, which AWS IoT thing attribute values do not allow; allowed are letters, digits and _ . , @ / : # = [ ] -",
            value.escape_debug(),
            describe_char(bad)
        ));
    }
    Ok(())
}

fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".into(),
        '\t' => "a tab".into(),
        c if c.is_ascii_graphic() => format!("`{c}`"),
        c => format!("`{}` (U+{:04X})", c.escape_debug(), c as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thing_names() {
        assert!(check_thing_name("SN-0001:a_b").is_ok());
        let e = check_thing_name("../../etc/passwd").unwrap_err();
        assert!(e.contains("`.`"), "{e}");
        let e = check_thing_name("SNé1").unwrap_err();
        assert!(e.contains("U+00E9"), "{e}");
        let e = check_thing_name(&"S".repeat(141)).unwrap_err();
        assert!(e.contains("141 characters"), "{e}");
        assert!(check_thing_name(&"S".repeat(128)).is_ok());
    }

    #[test]
    fn attribute_values() {
        assert!(check_attribute_value("LOT-2026-11-A").is_ok());
        assert!(check_attribute_value("").is_ok());
        let e = check_attribute_value("LOT 2026").unwrap_err();
        assert!(e.contains("a space"), "{e}");
    }
}
