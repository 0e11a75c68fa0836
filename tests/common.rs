//! Helpers shared by the integration tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn provline() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_provline"));
    c.env_remove("RUST_LOG").env("NO_COLOR", "1");
    c
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Ran {
    let Output { status, stdout, stderr } = cmd.output().expect("provline runs");
    Ran {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A manufacturing CSV with `n` valid devices.
pub fn csv_rows(prefix: &str, n: usize) -> String {
    let mut s = String::from("serial_number,model,mac_address,hardware_revision,lot\n");
    for i in 1..=n {
        s.push_str(&format!(
            "{prefix}{i:06},TH-100,A4:CF:12:00:{:02X}:{:02X},r2,LOT-A\n",
            i / 256,
            i % 256
        ));
    }
    s
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn has_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A CSR made by openssl for a key of the given kind (`-newkey` argument).
pub fn openssl_csr(dir: &Path, name: &str, newkey: &[&str], cn: &str) -> String {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let out = Command::new("openssl")
        .args(["req", "-new", "-nodes"])
        .args(newkey)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(["-subj", &format!("/CN={cn}")])
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(csr).unwrap()
}

/// Quotes a value for a CSV cell.
pub fn cell(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

/// Validates a JSON file against one of our schemas with Python's
/// `jsonschema`, an implementation we did not write. Returns false (and says
/// so) when it is not installed outside CI.
pub fn validate_schema(schema: &str, file: &Path) -> bool {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(schema);
    let probe = Command::new("python3").args(["-c", "import jsonschema"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 -m jsonschema is required in CI"
        );
        eprintln!("python jsonschema not found: schema check skipped");
        return false;
    }
    let code =
        "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[2])), json.load(open(sys.argv[1])))";
    let out = Command::new("python3")
        .args(["-c", code])
        .arg(&schema)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} does not match {}: {}",
        file.display(),
        schema.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Starts the embedded sandbox on the state kept in `state` (an output
/// directory's `.sandbox`), with a client for it.
pub async fn sandbox_on(state: &Path) -> (provline_sandbox::Sandbox, provline::aws::Aws) {
    let sb = provline_sandbox::Sandbox::start(provline_sandbox::Config {
        state_dir: Some(state.to_path_buf()),
        ..Default::default()
    })
    .await
    .unwrap();
    let aws = provline::aws::Aws::connect(&provline::sandbox_setup::connection(&sb.endpoint_url())).await;
    (sb, aws)
}

/// `provline sandbox serve` in a child process, killed when dropped.
pub struct Served {
    pub child: Child,
    pub url: String,
}

impl Served {
    /// Starts it on `addr` (port 0 picks one) and reads the URL it prints first.
    pub fn start(state: &Path, addr: &str, extra: &[&str]) -> Served {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--state".as_ref(), state.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        Served::spawn(addr, &args)
    }

    /// Starts one whose state lives in memory only (nothing persisted).
    pub fn start_in_memory(addr: &str, extra: &[&str]) -> Served {
        let args: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
        Served::spawn(addr, &args)
    }

    fn spawn(addr: &str, extra: &[&std::ffi::OsStr]) -> Served {
        let mut child = provline()
            .args(["sandbox", "serve", "--device-addr", "127.0.0.1:0", "--addr", addr])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_string();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "serve prints its endpoint URL first: {url:?}"
        );
        Served { child, url }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes one message with `mosquitto_pub` (a client we did not write)
/// through a served sandbox's device endpoint, with a bundle's certificate and
/// key; returns its output, or None when mosquitto_pub is not installed
/// outside CI.
pub fn mosquitto_pub(state: &Path, bundle: &Path) -> Option<String> {
    if Command::new("mosquitto_pub").arg("--help").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "mosquitto_pub is required in CI");
        eprintln!("mosquitto_pub not found: skipped");
        return None;
    }
    let served = Served::start(state, "127.0.0.1:0", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep: serde_json::Value = rt.block_on(async {
        reqwest::get(format!("{}/_sandbox/device-endpoint", served.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let (host, port) = ep["address"].as_str().unwrap().rsplit_once(':').unwrap();
    let out = Command::new("mosquitto_pub")
        .args(["-h", host, "-p", port, "--cafile"])
        .arg(state.join("sandbox-ca.pem"))
        .arg("--cert")
        .arg(bundle.join("certificate.pem.crt"))
        .arg("--key")
        .arg(bundle.join("private.pem.key"))
        .args(["-t", "devices/test", "-m", "hello", "-q", "1", "-d"])
        .output()
        .unwrap();
    drop(served);
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
