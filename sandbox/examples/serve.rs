//! Runs a sandbox until Ctrl-C, for pointing the AWS CLI or any other client
//! at it.
//!
//! ```text
//! cargo run -p provline-sandbox --example serve -- [STATE_DIR] [PORT]
//! ```
//!
//! Set `PROVLINE_SANDBOX_REPORT_FORMAT` (for example `offset:0,legacy`) and
//! `PROVLINE_SANDBOX_LINES_PER_SECOND` to try other behaviours.

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
    if let Ok(format) = std::env::var("PROVLINE_SANDBOX_REPORT_FORMAT") {
        config.report_format = format.parse()?;
    }
    if let Ok(rate) = std::env::var("PROVLINE_SANDBOX_LINES_PER_SECOND") {
        config.lines_per_second = rate.parse()?;
    }

    let sandbox = Sandbox::start(config).await?;
    println!("endpoint: {}", sandbox.endpoint_url());
    println!("state dir: {}", sandbox.state_dir().display());
    println!(
        "AWS_ACCESS_KEY_ID={ACCESS_KEY_ID} AWS_SECRET_ACCESS_KEY={SECRET_ACCESS_KEY} AWS_DEFAULT_REGION=us-east-1 aws --endpoint-url {} ...",
        sandbox.endpoint_url()
    );
    tokio::signal::ctrl_c().await?;
    sandbox.shutdown().await
}
