//! `provline lint`: check CSVs, CSRs and templates; send nothing.

use std::path::Path;

use crate::csr::check_csr;
use crate::error::{Problem, Problems};
use crate::ingest::{ingest, IngestOptions};
use crate::profile::{NamePattern, Profile};
use crate::template::Template;

/// What one file turned out to be.
pub enum Verdict {
    Ok(String),
    Bad(Problems),
}

pub fn lint_file(path: &Path, profile: &Profile, thing_name: Option<&str>) -> Verdict {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return Verdict::Bad(Problems(vec![Problem::new(format!("cannot read: {e}")).file(name)])),
    };
    let text = String::from_utf8_lossy(&bytes);
    if ext == "csv" || ext == "tsv" {
        let pattern = match NamePattern::parse(thing_name.unwrap_or(&profile.thing_name)) {
            Ok(p) => p,
            Err(e) => return Verdict::Bad(Problems(vec![Problem::new(e.to_string())])),
        };
        let body = crate::template::builtin_for(
            "lint",
            &profile.attributes,
            profile.thing_type.as_deref(),
            &profile.thing_groups,
            crate::template::CertificateSource::Csr,
        );
        let attrs = Template::check("built-in template", &body)
            .map(|t| t.attribute_columns(&profile.parameters))
            .unwrap_or_default();
        let opts = IngestOptions {
            profile,
            pattern: &pattern,
            attribute_columns: &attrs,
            skip_invalid: false,
            delimiter: profile.delimiter,
            template_columns: &Default::default(),
            spool_dir: None,
        };
        return match ingest(&[path.to_path_buf()], &opts) {
            Ok(i) => {
                let csrs = i.devices.with_device_csr();
                Verdict::Ok(format!("{} devices ({} with a device CSR)", i.devices.len(), csrs))
            }
            Err(crate::error::Error::Input(p)) => Verdict::Bad(p),
            Err(e) => Verdict::Bad(Problems(vec![Problem::new(e.to_string()).file(name)])),
        };
    }
    if ["csr", "req", "pem"].contains(&ext.as_str())
        || text
            .trim_start_matches('\u{feff}')
            .trim_start()
            .starts_with("-----BEGIN")
    {
        return match check_csr(&text) {
            Ok(c) => Verdict::Ok(format!("CSR, {} key, subject {}", c.key_type, c.subject)),
            Err(e) => Verdict::Bad(Problems(vec![Problem::new(e).file(name)])),
        };
    }
    match Template::check(&name, &text) {
        Ok(t) => Verdict::Ok(format!(
            "template, parameters {}",
            t.parameters.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
        Err(p) => Verdict::Bad(p),
    }
}
