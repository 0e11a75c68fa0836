//! Runs a sandbox until Ctrl-C, for pointing the AWS CLI or any other client
//! at it.
//!
//! ```text
//! cargo run -p provline-sandbox --example serve -- [STATE_DIR] [PORT] [DEVICE_PORT]
//! ```
//!
//! Set `PROVLINE_SANDBOX_REPORT_FORMAT` (for example `offset:0,legacy`),
//! `PROVLINE_SANDBOX_LINES_PER_SECOND` and `PROVLINE_SANDBOX_FAULTS` (for
//! example `throttle=0.1,5xx=0.05,slow=4`) to try other behaviours. The
//! fault plan can also be changed while it runs:
//!
//! ```text
//! curl -X PUT --data 'drop=0.05,fail-after-cert=0.02' http://127.0.0.1:PORT/_sandbox/faults
//! curl http://127.0.0.1:PORT/_sandbox/stats
//! ```

use provline_sandbox::{Config, Sandbox, ACCESS_KEY_ID, SECRET_ACCESS_KEY};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut config = Config {
        state_dir: args.next().map(Into::into),
        ..Config::default()
    };
    if let Some(port) = args.next() {
        config.addr.set_port(port.parse()?);
    }
    if let Some(port) = args.next() {
        config.device_addr.set_port(port.parse()?);
    }
    if let Ok(format) = std::env::var("PROVLINE_SANDBOX_REPORT_FORMAT") {
        config.report_format = format.parse()?;
    }
    if let Ok(rate) = std::env::var("PROVLINE_SANDBOX_LINES_PER_SECOND") {
        config.lines_per_second = rate.parse()?;
    }
    if let Ok(faults) = std::env::var("PROVLINE_SANDBOX_FAULTS") {
        config.faults = faults.parse()?;
    }

    let sandbox = Sandbox::start(config).await?;
    println!("endpoint: {}", sandbox.endpoint_url());
    println!("state dir: {}", sandbox.state_dir().display());
    let ca_file = sandbox.state_dir().join("sandbox-ca.pem");
    std::fs::write(&ca_file, sandbox.ca_certificate_pem())?;
    println!(
        "device endpoint: {} (server name {}, CA file {})",
        sandbox.device_endpoint(),
        sandbox.device_server_name(),
        ca_file.display()
    );
    println!(
        "AWS_ACCESS_KEY_ID={ACCESS_KEY_ID} AWS_SECRET_ACCESS_KEY={SECRET_ACCESS_KEY} AWS_DEFAULT_REGION=us-east-1 aws --endpoint-url {} ...",
        sandbox.endpoint_url()
    );
    tokio::signal::ctrl_c().await?;
    sandbox.shutdown().await
}
