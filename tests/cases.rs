//! Inputs that broke other tools (../shared/cases), on fixtures of our own.

use std::path::Path;

use crate::common::*;

const HEADER: &str = "serial_number,model,mac_address,hardware_revision,lot";

/// Runs the pipeline on one CSV against the embedded sandbox.
fn run_csv(dir: &Path, name: &str, text: &str) -> (Ran, std::path::PathBuf) {
    let input = write(dir, name, text);
    let out = dir.join(format!("out-{name}"));
    (
        run(provline().args(["run", "--sandbox", "--out"]).arg(&out).arg(&input)),
        out,
    )
}

fn rejected(ran: &Ran, out: &Path) {
    assert_eq!(ran.code, 2, "expected exit 2 (rejected), stderr:\n{}", ran.stderr);
    assert!(
        !out.join("ledger.sqlite").exists(),
        "nothing may be recorded or sent for rejected input"
    );
}

#[test]
fn bom_is_not_part_of_the_first_header() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("\u{feff}{HEADER}\nBM000001,TH-100,A4:CF:12:00:00:01,r2,LOT-A\n");
    let (ran, _) = run_csv(tmp.path(), "bom.csv", &text);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let rows = std::fs::read_to_string(Path::new(ran.stdout.trim()).join("results.csv")).unwrap();
    assert!(rows.contains("BM000001,BM000001,registered"), "{rows}");
}

#[test]
fn crlf_leaves_no_carriage_return_in_any_value() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "{HEADER}\r\nCR000001,TH-100,A4:CF:12:00:00:01,r2,LOT-A\r\nCR000002,TH-100,A4:CF:12:00:00:02,r2,LOT-A\r\n"
    );
    let input = write(tmp.path(), "crlf.csv", &text);
    let ran = run(provline().args(["run", "--sandbox", "--dry-run"]).arg(&input));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(!ran.stdout.contains("\\r"), "{}", ran.stdout);
    let (ran, _) = run_csv(tmp.path(), "crlf.csv", &text);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let staged = std::fs::read_to_string(Path::new(ran.stdout.trim()).join("work/attempt-1.ndjson")).unwrap();
    assert!(!staged.contains("\\r"), "a \\r reached a registration line");
    assert!(staged.contains("\"Lot\":\"LOT-A\""));
}

#[test]
fn header_spaces_are_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    let text =
        "serial_number, model, mac_address, hardware_revision, lot\nHS000001,TH-100,A4:CF:12:00:00:01,r2,LOT-A\n";
    let input = write(tmp.path(), "hs.csv", text);
    let ran = run(provline().args(["run", "--sandbox", "--dry-run"]).arg(&input));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let (ran, _) = run_csv(tmp.path(), "hs.csv", text);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let staged = std::fs::read_to_string(Path::new(ran.stdout.trim()).join("work/attempt-1.ndjson")).unwrap();
    assert!(
        staged.contains("\"Model\":\"TH-100\""),
        "the trimmed `model` column was read: {staged}"
    );
}

#[test]
fn a_short_row_names_file_line_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{HEADER}\nSR000001,TH-100,A4:CF:12:00:00:01,r2,LOT-A\nSR000002,TH-100\nSR000003,TH-100,A4:CF:12:00:00:03,r2,LOT-A\n");
    let (ran, out) = run_csv(tmp.path(), "short.csv", &text);
    rejected(&ran, &out);
    assert!(ran.stderr.contains("short.csv:3"), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("expected 5 fields (as in the header), found 2"),
        "{}",
        ran.stderr
    );
}

#[test]
fn a_duplicate_serial_names_both_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{HEADER}\nDS000001,TH-100,A4:CF:12:00:00:01,r2,LOT-A\nDS000002,TH-100,A4:CF:12:00:00:02,r2,LOT-A\nDS000001,TH-100,A4:CF:12:00:00:99,r2,LOT-A\n");
    let (ran, out) = run_csv(tmp.path(), "dup.csv", &text);
    rejected(&ran, &out);
    assert!(
        ran.stderr.contains("dup.csv:2") && ran.stderr.contains("dup.csv:4"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("duplicate serial number `DS000001`"),
        "{}",
        ran.stderr
    );
}

#[test]
fn names_that_collide_after_lower_casing_are_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{HEADER}\nab-01,TH-100,,r2,L1\nAB-01,TH-100,,r2,L1\n");
    let input = write(tmp.path(), "case.csv", &text);
    let ran = run(provline()
        .args(["run", "--sandbox", "--dry-run", "--thing-name", "{serial_number|lower}"])
        .arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("duplicate thing name `ab-01`"), "{}", ran.stderr);
}

#[test]
fn an_attribute_with_spaces_is_rejected_before_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{HEADER}\nAS000001,TH-100,A4:CF:12:00:00:01,r2,LOT-2026-11-A\nAS000002,TH-100,A4:CF:12:00:00:02,r2,LOT 2026 11 A\n");
    let (ran, out) = run_csv(tmp.path(), "attr.csv", &text);
    rejected(&ran, &out);
    assert!(ran.stderr.contains("attr.csv:3, column `lot`"), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("a space") && ran.stderr.contains("allowed are"),
        "{}",
        ran.stderr
    );
}

#[test]
fn bad_thing_names_each_get_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let long = format!("S{}", "9".repeat(140));
    let text = format!(
        "{HEADER}\n../../etc/passwd,TH-100,,r2,L1\nSNé001,TH-100,,r2,L1\n{long},TH-100,,r2,L1\nOK-1,TH-100,,r2,L1\n"
    );
    let (ran, out) = run_csv(tmp.path(), "names.csv", &text);
    rejected(&ran, &out);
    assert!(
        ran.stderr.contains("names.csv:2") && ran.stderr.contains("contains `.`"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("names.csv:3") && ran.stderr.contains("U+00E9"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("names.csv:4") && ran.stderr.contains("141 characters"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("(3 problems)"),
        "every problem is listed: {}",
        ran.stderr
    );
    assert!(!tmp.path().join("etc").exists());
}

#[test]
fn skip_invalid_sends_the_valid_rows_and_reports_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{HEADER}\nSK000001,TH-100,A4:CF:12:00:00:01,r2,LOT-A\nSK000002,TH-100,A4:CF:12:00:00:02,r2,LOT B\nSK000003,TH-100,A4:CF:12:00:00:03,r2,LOT-A\n");
    let input = write(tmp.path(), "skip.csv", &text);
    let out = tmp.path().join("out");
    let ran = run(provline()
        .args(["run", "--sandbox", "--skip-invalid", "--out"])
        .arg(&out)
        .arg(&input));
    assert_eq!(ran.code, 1, "skipped rows make the batch partial: {}", ran.stderr);
    assert!(ran.stderr.contains("skip.csv:3"), "{}", ran.stderr);
    let rows = std::fs::read_to_string(Path::new(ran.stdout.trim()).join("results.csv")).unwrap();
    assert!(
        rows.contains("SK000001,SK000001,registered") && rows.contains("SK000003,SK000003,registered"),
        "{rows}"
    );
}

#[test]
fn semicolon_and_quoted_fields_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "serial_number;model;lot\nSC000001;\"TH-100\";LOT-A\n\nSC000002;TH-100;LOT-A\n";
    let input = write(tmp.path(), "semi.csv", text);
    let ran = run(provline().args(["run", "--sandbox", "--dry-run"]).arg(&input));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let plan: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(plan["devices"], 2);
    assert_eq!(plan["inputs"][0]["delimiter"], ";");
}

#[test]
fn csr_policy_through_lint() {
    if !has_openssl() {
        eprintln!("openssl not found: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p256 = openssl_csr(
        d,
        "p256",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "a",
    );
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (
            "p384.csr",
            openssl_csr(
                d,
                "p384",
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
                "a",
            ),
            None,
        ),
        ("crlf.csr", p256.replace('\n', "\r\n"), None),
        (
            "legacy.csr",
            p256.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
            None,
        ),
        (
            "rsa2048.csr",
            openssl_csr(d, "rsa2048", &["-newkey", "rsa:2048"], "a"),
            None,
        ),
        (
            "rsa1024.csr",
            openssl_csr(d, "rsa1024", &["-newkey", "rsa:1024"], "a"),
            Some("RSA key of 1024 bits"),
        ),
        (
            "ed25519.csr",
            openssl_csr(d, "ed", &["-newkey", "ed25519"], "a"),
            Some("Ed25519 key"),
        ),
        (
            "k1.csr",
            openssl_csr(
                d,
                "k1",
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
                "a",
            ),
            Some("secp256k1"),
        ),
    ];
    for (name, text, bad) in cases {
        let f = write(d, name, &text);
        let ran = run(provline().arg("lint").arg(&f));
        match bad {
            None => assert_eq!(ran.code, 0, "{name}: {}", ran.stderr),
            Some(why) => {
                assert_eq!(ran.code, 2, "{name}: {}", ran.stderr);
                assert!(ran.stderr.contains(why), "{name}: {}", ran.stderr);
                assert!(
                    ran.stderr.contains("P-256, P-384 or P-521"),
                    "{name} says what would be right: {}",
                    ran.stderr
                );
            }
        }
    }
}

#[test]
fn device_csr_rows_with_a_bad_key_are_rejected_with_their_line() {
    if !has_openssl() {
        eprintln!("openssl not found: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let good = openssl_csr(
        tmp.path(),
        "g",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "g",
    );
    let weak = openssl_csr(tmp.path(), "w", &["-newkey", "rsa:1024"], "w");
    let text = format!(
        "serial_number,model,csr\nDC-1,TH-200,{}\nDC-2,TH-200,{}\nDC-3,TH-200,/mnt/mes/DC-3.csr\n",
        cell(&good),
        cell(&weak)
    );
    let (ran, out) = run_csv(tmp.path(), "dcsr.csv", &text);
    rejected(&ran, &out);
    // The first CSR spans lines 2-8, so DC-2 starts further down; the message names where it starts.
    assert!(
        ran.stderr.contains("column `csr`: RSA key of 1024 bits"),
        "{}",
        ran.stderr
    );
    assert!(ran.stderr.contains("looks like a file path"), "{}", ran.stderr);
}

#[test]
fn template_cases_are_rejected_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let builtin = provline::template::builtin("factory-device");
    let input = write(tmp.path(), "ok.csv", &csv_rows("TP", 2));
    let cases = [
        (
            "empty-policy.json",
            builtin.replace("\"factory-device\"", "\"\""),
            "`PolicyName` is empty",
        ),
        (
            "repr.txt",
            "{'Parameters': {'ThingName': {'Type': 'String'}}}".to_string(),
            "not valid JSON",
        ),
        (
            "undeclared.json",
            builtin.replace("\"Ref\": \"Lot\"", "\"Ref\": \"Batch\""),
            "`Ref` to `Batch`",
        ),
    ];
    for (name, body, why) in cases {
        let t = write(tmp.path(), name, &body);
        let out = tmp.path().join(format!("out-{name}"));
        let ran = run(provline()
            .args(["run", "--sandbox", "--out"])
            .arg(&out)
            .arg("--template")
            .arg(&t)
            .arg(&input));
        rejected(&ran, &out);
        assert!(ran.stderr.contains(why), "{name}: {}", ran.stderr);
        let lint = run(provline().arg("lint").arg(&t));
        assert_eq!(lint.code, 2, "{name}: {}", lint.stderr);
        assert!(lint.stderr.contains(why));
    }
    let repr = run(provline().arg("lint").arg(tmp.path().join("repr.txt")));
    assert!(
        repr.stderr.contains("repr.txt:1:2"),
        "line and column of the JSON error: {}",
        repr.stderr
    );
    let undeclared = run(provline().arg("lint").arg(tmp.path().join("undeclared.json")));
    assert!(
        undeclared
            .stderr
            .contains("Resources.thing.Properties.AttributePayload.lot"),
        "{}",
        undeclared.stderr
    );
}

#[test]
fn no_policy_without_the_sandbox_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "ok.csv", &csv_rows("NP", 1));
    let ran = run(provline().arg("run").arg("--dry-run").arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("--policy"), "{}", ran.stderr);
}

#[test]
fn crlf_files_report_the_lines_an_editor_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{HEADER}\r\nCL000001,TH-100,A4:CF:12:00:00:01,r2,LOT-A\r\nCL000002,TH-100\r\nCL000001,TH-100,A4:CF:12:00:00:03,r2,LOT-A\r\n");
    let (ran, out) = run_csv(tmp.path(), "crlf-bad.csv", &text);
    rejected(&ran, &out);
    assert!(
        ran.stderr.contains("crlf-bad.csv:3: expected 5 fields"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("crlf-bad.csv:2") && ran.stderr.contains("crlf-bad.csv:4"),
        "{}",
        ran.stderr
    );
}

#[test]
fn a_misspelt_column_is_named_with_the_right_spelling() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "serial_number,model,mac_adress,lot\nMS000001,TH-100,A4:CF:12:00:00:01,LOT-A\n";
    let (ran, out) = run_csv(tmp.path(), "typo.csv", text);
    rejected(&ran, &out);
    assert!(
        ran.stderr
            .contains("unknown column `mac_adress`: did you mean `mac_address`?"),
        "{}",
        ran.stderr
    );
}

#[test]
fn a_wrong_delimiter_is_suggested() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "semi.csv", "serial_number;model\nWD1;TH-100\n");
    let ran = run(provline()
        .args(["run", "--sandbox", "--dry-run", "--delimiter", ","])
        .arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("is the delimiter right?"), "{}", ran.stderr);
}

#[test]
fn a_profile_maps_an_mes_export() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = write(
        tmp.path(),
        "mes.toml",
        r#"
thing_name = "line-a-{serial_number|lower}"
attributes = ["model", "mac_address", "site"]

[columns.serial_number]
aliases = ["SN", "Serial No."]
pattern = "[A-Z]{2}[0-9]{4}"

[columns.model]
normalise = "upper"
allowed = ["TH-100", "TH-200"]

[columns.mac_address]
aliases = ["MAC"]
separator = "-"

[columns.site]
required = true
"#,
    );
    let good = write(
        tmp.path(),
        "mes.csv",
        "Serial No.;Model;MAC;site\nAB0001;th-100;a4cf12000001;SEA\nAB0002;TH-200;A4:CF:12:00:00:02;SEA\n",
    );
    let ran = run(provline()
        .args(["run", "--sandbox", "--dry-run", "--profile"])
        .arg(&profile)
        .arg(&good));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let plan: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(plan["sample"][0]["thing_name"], "line-a-ab0001");
    assert_eq!(
        plan["template_parameters"],
        serde_json::json!(["CSR", "MacAddress", "Model", "Site", "ThingName"])
    );
    let out = tmp.path().join("out");
    let ran = run(provline()
        .args(["run", "--sandbox", "--profile"])
        .arg(&profile)
        .arg("--out")
        .arg(&out)
        .arg(&good));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let staged = std::fs::read_to_string(Path::new(ran.stdout.trim()).join("work/attempt-1.ndjson")).unwrap();
    assert!(
        staged.contains("\"MacAddress\":\"A4-CF-12-00-00-01\"") && staged.contains("\"Model\":\"TH-100\""),
        "{staged}"
    );

    let bad = write(
        tmp.path(),
        "bad.csv",
        "SN,model,site\nAB0003,TH-300,SEA\nab04,TH-100,\n",
    );
    let ran = run(provline()
        .args(["run", "--sandbox", "--dry-run", "--profile"])
        .arg(&profile)
        .arg(&bad));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains("bad.csv:2, column `model`: `TH-300` is not an allowed value; allowed are `TH-100`, `TH-200`"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr
            .contains("bad.csv:3, column `serial_number`: `ab04` does not match"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr
            .contains("bad.csv:3, column `site`: a value is required here"),
        "{}",
        ran.stderr
    );

    let typo = write(tmp.path(), "typo.toml", "[columns.lot]\nalowed = [\"A\"]\n");
    let ran = run(provline().args(["lint", "--profile"]).arg(&typo).arg(&good));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains("unknown key `alowed` in [columns.lot]; did you mean `allowed`?"),
        "{}",
        ran.stderr
    );
}

#[test]
fn a_thing_name_pattern_with_a_bad_character_is_one_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "ok.csv", &csv_rows("PT", 3));
    let ran = run(provline()
        .args(["run", "--sandbox", "--dry-run", "--thing-name", "x/{serial_number}"])
        .arg(&input));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("the text `x/` contains `/`"), "{}", ran.stderr);
    assert_eq!(ran.stderr.matches("contains").count(), 1, "{}", ran.stderr);
}
