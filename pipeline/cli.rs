//! The `provline` command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::aws::{Aws, Connection};
use crate::error::{exit, Error, Result};
use crate::keygen::KeyType;
use crate::ledger::Ledger;
use crate::run::{self, Mode, RunOptions, Settings};
use crate::sandbox_setup;
use crate::workspace::Workspace;

const EXIT_CODES: &str = "\
Exit codes:
  0  every device provisioned and bundled
  1  finished, but some devices failed (results.csv says why)
  2  input, configuration or usage rejected; nothing sent
  3  stopped by an infrastructure error (endpoint unreachable, task failed); state kept, run `provline resume`";

#[derive(Parser, Debug)]
#[command(name = "provline", version, about = "Provision IoT devices into AWS IoT Core straight off the factory line", after_help = EXIT_CODES)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` for nightly jobs.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, RUST_LOG syntax (e.g. `provline=debug`); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The whole pipeline for one batch: ingest, keygen, stage, register, reconcile, bundle, report.
    #[command(after_help = EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Continue unfinished batches of an output directory from where they stopped.
    #[command(after_help = EXIT_CODES)]
    Resume(ResumeArgs),
    /// Show the batches of an output directory and their devices' states.
    Status(StatusArgs),
    /// Check CSVs, CSRs and templates; send nothing.
    Lint(LintArgs),
    /// The factory CA: make or import it, register it with AWS IoT, show its state.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// JITR: activate the pending certificates of a batch (and only those), with their things.
    Approve(ApproveArgs),
    /// Connect with each bundle of a batch (TLS + MQTT CONNECT) and report which connect.
    Verify(VerifyArgs),
    /// The local AWS IoT + S3 stand-in.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

#[derive(Args, Debug, Clone)]
pub struct AwsArgs {
    /// Start the embedded sandbox (state in <out>/.sandbox) and use it as AWS.
    #[arg(long)]
    pub sandbox: bool,
    /// AWS region (default: from the profile or environment).
    #[arg(long)]
    pub region: Option<String>,
    /// AWS profile from ~/.aws/config (also AWS_PROFILE). `--profile` is the
    /// manufacturing profile.
    #[arg(long = "aws-profile", value_name = "NAME")]
    pub aws_profile: Option<String>,
    /// Endpoint URL for both IoT and S3 (also AWS_ENDPOINT_URL).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Sandbox only: report line format (lineNumber:1, offset:0, absent, legacy).
    #[arg(long, default_value = "lineNumber:1", hide = true)]
    pub sandbox_report_format: String,
    /// Sandbox only: lines a bulk task processes per second.
    #[arg(long, default_value_t = 2000.0, hide = true)]
    pub sandbox_lines_per_second: f64,
    /// Sandbox only: faults to inject, e.g. `throttle=0.1,5xx=0.05,fail-after-cert=0.02`.
    #[arg(long, hide = true)]
    pub sandbox_faults: Option<provline_sandbox::FaultPlan>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Manufacturing CSVs of the batch.
    #[arg(required = true)]
    pub csv: Vec<PathBuf>,
    /// Output directory: ledger, workspaces, bundles.
    #[arg(long, default_value = "provline-out")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = KeyType::EcP256)]
    pub key_type: KeyType,
    /// Bulk provisioning template (default: built-in thing + certificate from CSR + policy).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Manufacturing profile (TOML): columns, aliases, rules, attributes, thing name.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Thing name pattern (default: the profile's, `{serial_number}`); columns in
    /// braces, `|lower` or `|upper` to change case.
    #[arg(long)]
    pub thing_name: Option<String>,
    /// IoT policy the built-in template attaches.
    #[arg(long)]
    pub policy: Option<String>,
    /// S3 bucket for the registration file (in the task's region).
    #[arg(long)]
    pub bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(long, default_value = "provline")]
    pub prefix: String,
    /// IAM role that AWS IoT assumes to read the file and register things.
    #[arg(long)]
    pub role_arn: Option<String>,
    /// Ingest, validate and print the plan; generate and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Send the valid rows and report the rest (default: all or nothing).
    #[arg(long)]
    pub skip_invalid: bool,
    /// CSV delimiter (default: detected per file among `,` `;` and tab).
    #[arg(long, value_parser = parse_delimiter)]
    pub delimiter: Option<u8>,
    /// Seconds to follow a task before leaving it to `resume`.
    #[arg(long)]
    pub task_timeout: Option<u64>,
    /// Skip the pre-flight checks against the account (bucket, thing types, groups, policies).
    #[arg(long)]
    pub no_preflight: bool,
    /// Devices per bulk task; a larger batch registers chunk after chunk.
    #[arg(long, default_value_t = 10_000)]
    pub chunk_size: usize,
    /// Follow-up tasks for devices whose lines failed for a retryable reason.
    #[arg(long, default_value_t = 2)]
    pub max_retries: u32,
    /// How certificates are made: aws-csr (AWS signs CSRs), byoca (your CA signs,
    /// a bulk task registers), jitp or jitr (your CA signs, devices register at first connect).
    #[arg(long, value_enum, default_value_t = Mode::AwsCsr)]
    pub mode: Mode,
    /// The factory CA directory (from `provline ca init` or `ca import`), for byoca, jitp and jitr.
    #[arg(long, value_name = "DIR")]
    pub ca: Option<PathBuf>,
    /// Bundles as one directory per device, or one bundles.tar per batch (written once, one fsync).
    #[arg(long, value_enum, default_value_t = crate::bundle::BundleFormat::Dir)]
    pub bundle_format: crate::bundle::BundleFormat,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Make a new factory CA: ca.pem.crt and ca.pem.key (0600), path length 0.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = KeyType::EcP256)]
        key_type: KeyType,
        #[arg(long, default_value = "provline factory CA")]
        common_name: String,
        #[arg(long)]
        organization: Option<String>,
        /// Two-letter country code, e.g. DE.
        #[arg(long)]
        country: Option<String>,
        #[arg(long, default_value_t = 3650)]
        validity_days: u32,
    },
    /// Take an existing CA certificate and its key (PEM), with the chain above an intermediate.
    Import {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The certificates above an intermediate CA, nearest first.
        #[arg(long, value_name = "FILE")]
        chain: Option<PathBuf>,
    },
    /// Register the CA with AWS IoT (proof of possession with the registration code) and activate it.
    Register(CaRegisterArgs),
    /// What AWS IoT holds about the CA and the device certificates it signed.
    Status {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Where the embedded sandbox keeps its state (the same --out as `run`).
        #[arg(long, default_value = "provline-out")]
        out: PathBuf,
        #[command(flatten)]
        aws: AwsArgs,
    },
}

#[derive(Args, Debug)]
pub struct CaRegisterArgs {
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Register without a verification certificate (SNI_ONLY, for several accounts).
    #[arg(long)]
    pub sni_only: bool,
    /// Auto-registration without a template: unknown devices become pending (JITR).
    #[arg(long, conflicts_with_all = ["jitp_template", "jitp_template_name"])]
    pub jitr: bool,
    /// Auto-registration with this JITP template (JSON), run under --role-arn.
    #[arg(long, value_name = "FILE", conflicts_with = "jitp_template_name")]
    pub jitp_template: Option<PathBuf>,
    /// Auto-registration with an existing provisioning template of type JITP, by name.
    #[arg(long, value_name = "NAME")]
    pub jitp_template_name: Option<String>,
    /// The role JITP runs the template under (it must trust iot.amazonaws.com).
    #[arg(long)]
    pub role_arn: Option<String>,
    /// Where the embedded sandbox keeps its state (the same --out as `run`).
    #[arg(long, default_value = "provline-out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct ApproveArgs {
    /// The JITR batch whose pending certificates to activate.
    pub batch: String,
    #[arg(long, default_value = "provline-out")]
    pub out: PathBuf,
    /// Do it without asking.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The batch whose bundles to try.
    pub batch: String,
    #[arg(long, default_value = "provline-out")]
    pub out: PathBuf,
    /// Device endpoint HOST:PORT (default: each bundle's endpoint, port 8883).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// TLS server name (SNI) when it differs from the endpoint's host.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Trust this CA file for the server instead of the bundle's Amazon roots.
    #[arg(long, value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
    /// Connections per device: a JITP/JITR device is dropped at its first connect.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
    /// Devices connecting at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds to wait for the TLS handshake and the CONNACK.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The batch to resume (default: every unfinished batch).
    pub batch: Option<String>,
    #[arg(long, default_value = "provline-out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    pub batch: Option<String>,
    #[arg(long, default_value = "provline-out")]
    pub out: PathBuf,
    /// JSON on stdout, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LintArgs {
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Manufacturing profile (TOML) for CSVs; also checked itself.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    #[arg(long)]
    pub thing_name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Serve the sandbox on a loopback address until interrupted.
    Serve {
        #[arg(long, default_value = "127.0.0.1:4566")]
        addr: SocketAddr,
        /// Device endpoint (TLS + MQTT, like AWS IoT's ATS endpoint); port 0 picks one.
        #[arg(long, default_value = "127.0.0.1:8883")]
        device_addr: SocketAddr,
        /// State directory (kept across restarts); default: a temporary one.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Lines a bulk task processes per second.
        #[arg(long, default_value_t = 2000.0)]
        lines_per_second: f64,
        /// Report line format: lineNumber:1, lineNumber:0, offset:0, offset:1, absent, legacy.
        #[arg(long, default_value = "lineNumber:1")]
        report_format: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Faults to inject: throttle=SHARE, 5xx=SHARE, drop=SHARE, drop-response=SHARE,
        /// slow=FACTOR, fail-after-cert=SHARE, exit-after-lines=N (comma-separated);
        /// also settable at run time with PUT /_sandbox/faults.
        #[arg(long)]
        faults: Option<provline_sandbox::FaultPlan>,
    },
}

fn parse_delimiter(s: &str) -> std::result::Result<u8, String> {
    match s {
        "," | "comma" => Ok(b','),
        ";" | "semicolon" => Ok(b';'),
        "\\t" | "tab" | "\t" => Ok(b'\t'),
        other => Err(format!("unsupported delimiter `{other}` (use `,`, `;` or `tab`)")),
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Parses the arguments, runs the command, returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::REJECTED } else { exit::OK };
            let _ = e.print();
            return code;
        }
    };
    // The embedded sandbox logs what provline logs already; keep it to warnings
    // unless it is the command, or the user asks for it.
    let mut filter = cli.log.clone();
    if !matches!(cli.command, Command::Sandbox { .. }) && !filter.contains("provline_sandbox") {
        filter.push_str(",provline_sandbox=warn");
    }
    init_logging(cli.log_format, &filter);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("provline: cannot start the async runtime: {e}");
            return exit::INFRA;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("provline: {e}");
            e.exit_code()
        }
    }
}

async fn dispatch(command: Command) -> Result<i32> {
    match command {
        Command::Run(args) => run_command(*args).await,
        Command::Resume(args) => resume_command(args).await,
        Command::Status(args) => status_command(args),
        Command::Lint(args) => Ok(lint_command(args)),
        Command::Ca { command } => ca_command(command).await,
        Command::Approve(args) => approve_command(args).await,
        Command::Verify(args) => verify_command(args).await,
        Command::Sandbox { command } => sandbox_command(command).await,
    }
}

/// A sandbox started for one command, and the connection to use.
struct Endpoint {
    conn: Connection,
    sandbox: Option<provline_sandbox::Sandbox>,
}

impl Endpoint {
    async fn open(args: &AwsArgs, out: &Path) -> Result<Endpoint> {
        if !args.sandbox {
            return Ok(Endpoint {
                conn: Connection {
                    region: args.region.clone(),
                    profile: args.aws_profile.clone(),
                    endpoint_url: args.endpoint_url.clone(),
                    static_credentials: None,
                },
                sandbox: None,
            });
        }
        let report_format = args
            .sandbox_report_format
            .parse()
            .map_err(|e| Error::config(format!("--sandbox-report-format: {e}")))?;
        let config = provline_sandbox::Config {
            state_dir: Some(out.join(".sandbox")),
            lines_per_second: args.sandbox_lines_per_second,
            report_format,
            faults: args.sandbox_faults.clone().unwrap_or_default(),
            ..Default::default()
        };
        let sb = provline_sandbox::Sandbox::start(config)
            .await
            .map_err(|e| Error::infra(format!("cannot start the embedded sandbox: {e:#}")))?;
        Ok(Endpoint {
            conn: sandbox_setup::connection(&sb.endpoint_url()),
            sandbox: Some(sb),
        })
    }

    async fn close(self) {
        if let Some(sb) = self.sandbox {
            if let Err(e) = sb.shutdown().await {
                tracing::warn!("sandbox shutdown: {e:#}");
            }
        }
    }
}

fn print_summary(s: &run::Summary) {
    let mut err = std::io::stderr();
    if s.already_done {
        let _ = writeln!(
            err,
            "{}: already finished earlier ({} devices: {} registered, {} failed, {} bundled); nothing to do, nothing sent",
            s.batch, s.devices, s.registered, s.failed, s.bundled
        );
    } else {
        let _ = writeln!(
            err,
            "{}: {} devices, {} registered, {} failed, {} bundled ({})",
            s.batch,
            s.devices,
            s.registered,
            s.failed,
            s.bundled,
            if s.task_ids.is_empty() {
                "no bulk task: the devices register at first connect".to_string()
            } else {
                format!("task {}", s.task_ids.join(", "))
            }
        );
        if !s.stage_seconds.is_empty() {
            let stages: Vec<String> = run::STAGES
                .iter()
                .filter_map(|k| s.stage_seconds.get(k).map(|v| format!("{k} {v:.2}s")))
                .collect();
            let _ = writeln!(err, "time: {}", stages.join(", "));
        }
        if s.failed > 0 {
            let _ = writeln!(
                err,
                "see {} for why each failed device failed",
                s.dir.join("results.csv").display()
            );
        }
    }
    println!("{}", s.dir.display());
}

async fn run_command(args: RunArgs) -> Result<i32> {
    let sandbox = args.aws.sandbox;
    let opts = RunOptions {
        inputs: args.csv.clone(),
        out: args.out.clone(),
        key_type: args.key_type,
        template: args.template.clone(),
        profile: args.profile.clone(),
        thing_name: args.thing_name.clone(),
        policy: args.policy.clone(),
        bucket: args
            .bucket
            .clone()
            .or_else(|| sandbox.then(|| sandbox_setup::SANDBOX_BUCKET.to_string())),
        prefix: args.prefix.clone(),
        role_arn: args
            .role_arn
            .clone()
            .or_else(|| sandbox.then(sandbox_setup::sandbox_role_arn)),
        dry_run: args.dry_run,
        skip_invalid: args.skip_invalid,
        delimiter: args.delimiter,
        task_timeout: args.task_timeout.map(Duration::from_secs),
        chunk_size: args.chunk_size,
        max_retries: args.max_retries,
        mode: args.mode,
        ca_dir: args.ca.clone(),
        bundle_format: args.bundle_format,
    };
    let started = std::time::Instant::now();
    let prepared = run::prepare(&opts, sandbox)?;
    let ingest_seconds = started.elapsed().as_secs_f64();
    for p in &prepared.skipped.0 {
        tracing::warn!("skipped: {p}");
    }
    if opts.dry_run {
        let mut plan = run::plan(&prepared, &opts.out);
        let ledger_path = opts.out.join(run::LEDGER_FILE);
        if ledger_path.exists() {
            let ledger = Ledger::open(&ledger_path)?;
            plan["already_in_ledger"] = ledger.batch(&prepared.batch)?.is_some().into();
            plan["already_finished"] = run::is_done(&ledger, &prepared.batch)?.into();
        }
        println!("{}", serde_json::to_string_pretty(&plan).expect("json"));
        return Ok(exit::OK);
    }
    let registers = prepared.settings.mode.registers();
    if registers && prepared.settings.bucket.is_empty() {
        return Err(Error::config(
            "--bucket is required (the S3 bucket for the registration file, in the task's region)",
        ));
    }
    if registers && prepared.settings.role_arn.is_empty() {
        return Err(Error::config(
            "--role-arn is required (an IAM role that trusts iot.amazonaws.com and can read the bucket)",
        ));
    }
    let _lock = run::lock_out_dir(&opts.out)?;
    let mut ledger = Ledger::open(&opts.out.join(run::LEDGER_FILE))?;
    let ws = Workspace::new(&opts.out, &prepared.batch);
    if run::is_done(&ledger, &prepared.batch)? {
        let s = run::finished_summary(&ledger, &ws)?;
        print_summary(&s);
        return Ok(s.exit_code());
    }
    let endpoint = Endpoint::open(&args.aws, &opts.out).await?;
    let aws = Aws::connect(&endpoint.conn).await;
    if let Err(e) = aws.check_credentials().await {
        endpoint.close().await;
        return Err(e);
    }
    let fresh = ledger.batch(&prepared.batch)?.is_none();
    let checked = async {
        if sandbox {
            sandbox_setup::prepare_account(
                &aws,
                &prepared.settings.bucket,
                prepared.template.policy_name.as_deref(),
            )
            .await?;
        }
        if fresh {
            run::check_conflicts(&ledger, &prepared)?;
            let wanted = run::check_ca_for_mode(&aws, &prepared.settings).await?;
            run::check_subjects(&prepared, &wanted)?;
        }
        if fresh && registers && !args.no_preflight {
            crate::preflight::check(
                &aws,
                &prepared.template,
                &prepared.settings.bucket,
                &prepared.settings.role_arn,
                &prepared.devices,
                &prepared.settings.parameters,
            )
            .await?;
        }
        run::record_batch(&mut ledger, &prepared)
    }
    .await;
    let created = match checked {
        Ok(c) => c,
        Err(e) => {
            endpoint.close().await;
            return Err(e);
        }
    };
    if !created {
        tracing::info!(batch = %prepared.batch, "this batch was started before; continuing it");
    }
    // The ledger defines a batch it already holds (its S3 keys among them).
    let settings: Settings = match ledger.batch(&prepared.batch)? {
        Some(b) => {
            serde_json::from_str(&b.settings).map_err(|e| Error::infra(format!("ledger settings of {}: {e}", b.id)))?
        }
        None => prepared.settings.clone(),
    };
    drop(prepared);
    let result = run::continue_batch(&mut ledger, &ws, &settings, &aws, Some(ingest_seconds)).await;
    endpoint.close().await;
    let s = result?;
    print_summary(&s);
    Ok(s.exit_code())
}

async fn go(
    endpoint: &Endpoint,
    ledger: &mut Ledger,
    ws: &Workspace,
    settings: &Settings,
    sandbox: bool,
    ingest_seconds: Option<f64>,
) -> Result<run::Summary> {
    let aws = Aws::connect(&endpoint.conn).await;
    if sandbox {
        let template = crate::template::Template::check(&settings.template_source, &settings.template_body)
            .map_err(Error::Input)?;
        sandbox_setup::prepare_account(&aws, &settings.bucket, template.policy_name.as_deref()).await?;
    }
    run::continue_batch(ledger, ws, settings, &aws, ingest_seconds).await
}

/// A batch named by the directory `run` printed (`provline-out/batch-…`)
/// stands for that batch in the ledger beside it.
fn batch_by_path(batch: &mut String, out: &mut PathBuf) {
    let p = Path::new(batch.as_str());
    if p.components().count() < 2 || !p.is_dir() {
        return;
    }
    let (Some(parent), Some(name)) = (p.parent(), p.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    if parent.join(run::LEDGER_FILE).exists() {
        *out = parent.to_path_buf();
        *batch = name.to_string();
    }
}

async fn resume_command(mut args: ResumeArgs) -> Result<i32> {
    if let Some(b) = args.batch.as_mut() {
        batch_by_path(b, &mut args.out);
    }
    let _lock = run::lock_out_dir(&args.out)?;
    let ledger_path = args.out.join(run::LEDGER_FILE);
    if !ledger_path.exists() {
        return Err(Error::config(format!(
            "no ledger at {}: nothing to resume",
            ledger_path.display()
        )));
    }
    let mut ledger = Ledger::open(&ledger_path)?;
    let batches: Vec<_> = ledger
        .batches()?
        .into_iter()
        .filter(|b| args.batch.as_ref().is_none_or(|want| &b.id == want))
        .collect();
    if let Some(want) = &args.batch {
        if batches.is_empty() {
            return Err(Error::config(format!("no batch `{want}` in {}", ledger_path.display())));
        }
    }
    let open: Vec<_> = batches
        .into_iter()
        .filter(|b| b.state != crate::ledger::batch_state::DONE)
        .collect();
    if open.is_empty() {
        eprintln!("nothing to resume: every batch in {} is finished", args.out.display());
        return Ok(exit::OK);
    }
    let endpoint = Endpoint::open(&args.aws, &args.out).await?;
    if let Err(e) = Aws::connect(&endpoint.conn).await.check_credentials().await {
        endpoint.close().await;
        return Err(e);
    }
    let mut worst = exit::OK;
    let mut failure = None;
    for b in open {
        let settings: Settings =
            serde_json::from_str(&b.settings).map_err(|e| Error::infra(format!("ledger settings of {}: {e}", b.id)))?;
        let ws = Workspace::new(&args.out, &b.id);
        tracing::info!(batch = %b.id, "resuming");
        match go(&endpoint, &mut ledger, &ws, &settings, args.aws.sandbox, None).await {
            Ok(s) => {
                print_summary(&s);
                worst = worst.max(s.exit_code());
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    endpoint.close().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(worst),
    }
}

fn status_command(mut args: StatusArgs) -> Result<i32> {
    if let Some(b) = args.batch.as_mut() {
        batch_by_path(b, &mut args.out);
    }
    let ledger_path = args.out.join(run::LEDGER_FILE);
    if !ledger_path.exists() {
        return Err(Error::config(format!("no ledger at {}", ledger_path.display())));
    }
    let ledger = Ledger::open(&ledger_path)?;
    let mut out = Vec::new();
    let mut per_device = Vec::new();
    for b in ledger.batches()? {
        if args.batch.as_ref().is_some_and(|want| &b.id != want) {
            continue;
        }
        let counts = ledger.state_counts(&b.id)?;
        let attempts = ledger.attempts(&b.id)?;
        if args.batch.is_some() && args.json {
            // Every device's row, asked for by name: the one listing that is as long as the batch.
            per_device = ledger.devices(&b.id)?;
        }
        out.push(serde_json::json!({
            "batch": b.id, "state": b.state, "devices": counts.values().sum::<usize>(), "states": counts,
            "tasks": attempts.iter().map(|a| serde_json::json!({"attempt": a.attempt, "task_id": a.task_id, "status": a.task_status})).collect::<Vec<_>>(),
        }));
    }
    if let Some(want) = &args.batch {
        if out.is_empty() {
            return Err(Error::config(format!("no batch `{want}` in {}", ledger_path.display())));
        }
    }
    if args.json {
        let mut doc = serde_json::to_value(&out).expect("json");
        if args.batch.is_some() {
            doc = serde_json::json!({"batch": out[0], "devices": per_device});
        }
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    } else {
        println!(
            "{:<20} {:<6} {:>8}  {:<40} tasks",
            "batch", "state", "devices", "device states"
        );
        for b in &out {
            let states = b["states"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            let tasks = b["tasks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| {
                            format!(
                                "{}({})",
                                t["task_id"].as_str().unwrap_or("-"),
                                t["status"].as_str().unwrap_or("-")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            println!(
                "{:<20} {:<6} {:>8}  {:<40} {}",
                b["batch"].as_str().unwrap_or(""),
                b["state"].as_str().unwrap_or(""),
                b["devices"].as_u64().unwrap_or(0),
                states,
                tasks
            );
        }
        if !per_device.is_empty() {
            println!();
            println!(
                "{:<24} {:<24} {:<11} {:<13} error",
                "serial_number", "thing_name", "state", "certificate"
            );
            for d in &per_device {
                let cert = d
                    .certificate_id
                    .as_deref()
                    .map(|c| &c[..c.len().min(12)])
                    .unwrap_or("-");
                let err = match (&d.error_class, &d.error) {
                    (Some(c), Some(e)) => format!("{c}: {e}"),
                    _ => String::new(),
                };
                println!(
                    "{:<24} {:<24} {:<11} {:<13} {err}",
                    d.serial, d.thing_name, d.state, cert
                );
            }
        }
    }
    Ok(exit::OK)
}

fn lint_command(args: LintArgs) -> i32 {
    let mut bad = 0;
    let profile = match &args.profile {
        Some(p) => match crate::profile::Profile::load(p) {
            Ok(p) => {
                eprintln!("ok    {}: profile", args.profile.as_ref().expect("some").display());
                p
            }
            Err(e) => {
                eprintln!("error {e}");
                return exit::REJECTED;
            }
        },
        None => crate::profile::Profile::default(),
    };
    for f in &args.files {
        match crate::lint::lint_file(f, &profile, args.thing_name.as_deref()) {
            crate::lint::Verdict::Ok(what) => eprintln!("ok    {}: {what}", f.display()),
            crate::lint::Verdict::Bad(problems) => {
                bad += 1;
                eprintln!(
                    "error {}: {} problem{}",
                    f.display(),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
                eprint!("{problems}");
            }
        }
    }
    if bad == 0 {
        exit::OK
    } else {
        exit::REJECTED
    }
}

async fn sandbox_command(command: SandboxCommand) -> Result<i32> {
    match command {
        SandboxCommand::Serve {
            addr,
            device_addr,
            state,
            lines_per_second,
            report_format,
            seed,
            faults,
        } => {
            let config = provline_sandbox::Config {
                addr,
                device_addr,
                state_dir: state,
                lines_per_second,
                report_format: report_format
                    .parse()
                    .map_err(|e| Error::config(format!("--report-format: {e}")))?,
                seed,
                faults: faults.unwrap_or_default(),
                ..Default::default()
            };
            let sb = provline_sandbox::Sandbox::start(config)
                .await
                .map_err(|e| Error::infra(format!("cannot start the sandbox: {e:#}")))?;
            println!("{}", sb.endpoint_url());
            let ca_file = sb.state_dir().join("sandbox-ca.pem");
            std::fs::write(&ca_file, sb.ca_certificate_pem())
                .map_err(|e| Error::infra(format!("{}: {e}", ca_file.display())))?;
            eprintln!(
                "sandbox listening on {url}\n  device endpoint (TLS + MQTT): {device} (server name {name}, server CA {ca})\n  state: {state}\n  use: AWS_ACCESS_KEY_ID={ak} AWS_SECRET_ACCESS_KEY={sk} AWS_DEFAULT_REGION=us-east-1 aws --endpoint-url {url} iot list-things\n  stop with Ctrl-C",
                url = sb.endpoint_url(),
                device = sb.device_endpoint(),
                name = sb.device_server_name(),
                ca = ca_file.display(),
                state = sb.state_dir().display(),
                ak = provline_sandbox::ACCESS_KEY_ID,
                sk = provline_sandbox::SECRET_ACCESS_KEY,
            );
            let _ = std::io::stdout().flush();
            wait_for_signal().await;
            sb.shutdown()
                .await
                .map_err(|e| Error::infra(format!("sandbox shutdown: {e:#}")))?;
            Ok(exit::OK)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

async fn ca_command(command: CaCommand) -> Result<i32> {
    match command {
        CaCommand::Init {
            dir,
            key_type,
            common_name,
            organization,
            country,
            validity_days,
        } => {
            let ca = crate::ca::init(
                &dir,
                &crate::ca::InitOptions {
                    key_type,
                    common_name,
                    organization,
                    country,
                    validity_days,
                },
            )?;
            eprintln!(
                "made the CA `{}` in {} (id {}); register it with `provline ca register --dir {}`",
                ca.subject,
                dir.display(),
                ca.id,
                dir.display()
            );
            println!("{}", dir.join(crate::ca::CA_CERT_FILE).display());
            Ok(exit::OK)
        }
        CaCommand::Import { dir, cert, key, chain } => {
            let ca = crate::ca::import(&dir, &cert, &key, chain.as_deref())?;
            eprintln!(
                "imported the CA `{}` into {} (id {}, {} certificate{} above it)",
                ca.subject,
                dir.display(),
                ca.id,
                ca.chain.len(),
                if ca.chain.len() == 1 { "" } else { "s" }
            );
            println!("{}", dir.join(crate::ca::CA_CERT_FILE).display());
            Ok(exit::OK)
        }
        CaCommand::Register(args) => {
            let ca = crate::ca::load(&args.dir)?;
            let auto = match (&args.jitp_template, &args.jitp_template_name, args.jitr) {
                (Some(path), _, _) => {
                    let body = std::fs::read_to_string(path)
                        .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
                    serde_json::from_str::<serde_json::Value>(&body).map_err(|e| {
                        Error::from(
                            crate::error::Problem::new(format!("the JITP template is not valid JSON: {e}"))
                                .file(path.display().to_string())
                                .line(e.line() as u64)
                                .column_number(e.column() as u64),
                        )
                    })?;
                    if !body.contains("AWS::IoT::Certificate::Id") {
                        return Err(Error::config(format!(
                            "{}: a JITP template must take the certificate from {{\"Ref\": \"AWS::IoT::Certificate::Id\"}}",
                            path.display()
                        )));
                    }
                    let role_arn = match (&args.role_arn, args.aws.sandbox) {
                        (Some(r), _) => r.clone(),
                        (None, true) => sandbox_setup::sandbox_role_arn(),
                        (None, false) => {
                            return Err(Error::config(
                                "--jitp-template needs --role-arn: the IAM role JITP runs the template under",
                            ))
                        }
                    };
                    crate::ca_aws::AutoRegistration::JitpBody {
                        template_body: body,
                        role_arn,
                    }
                }
                (None, Some(name), _) => crate::ca_aws::AutoRegistration::JitpTemplate(name.clone()),
                (None, None, true) => crate::ca_aws::AutoRegistration::Jitr,
                (None, None, false) => crate::ca_aws::AutoRegistration::Off,
            };
            let endpoint = Endpoint::open(&args.aws, &args.out).await?;
            let aws = Aws::connect(&endpoint.conn).await;
            let result = async {
                aws.check_credentials().await?;
                if args.aws.sandbox {
                    sandbox_setup::prepare_account(
                        &aws,
                        sandbox_setup::SANDBOX_BUCKET,
                        Some(sandbox_setup::SANDBOX_POLICY),
                    )
                    .await?;
                }
                crate::ca_aws::register(
                    &aws,
                    &ca,
                    &crate::ca_aws::RegisterOptions {
                        sni_only: args.sni_only,
                        auto,
                    },
                )
                .await
            }
            .await;
            endpoint.close().await;
            let state = result?;
            eprintln!(
                "CA {} is {} in AWS IoT, auto-registration {}{}",
                state.certificate_id,
                state.status,
                state.auto_registration,
                if state.is_jitp() { " with a JITP template" } else { "" }
            );
            println!("{}", serde_json::to_string_pretty(&state).expect("json"));
            Ok(exit::OK)
        }
        CaCommand::Status {
            dir,
            out,
            aws: aws_args,
        } => {
            let ca = crate::ca::load(&dir)?;
            let endpoint = Endpoint::open(&aws_args, &out).await?;
            let aws = Aws::connect(&endpoint.conn).await;
            let result = crate::ca_aws::describe_ca(&aws, &ca.id).await;
            endpoint.close().await;
            match result? {
                Some(state) => {
                    println!("{}", serde_json::to_string_pretty(&state).expect("json"));
                    Ok(exit::OK)
                }
                None => {
                    eprintln!(
                        "CA {} (`{}`) is not registered in this account; `provline ca register --dir {}` registers it",
                        ca.id,
                        ca.subject,
                        dir.display()
                    );
                    Ok(exit::PARTIAL)
                }
            }
        }
    }
}

/// The embedded sandbox's device endpoint: (address, TLS server name).
fn sandbox_device(sb: &provline_sandbox::Sandbox) -> (String, String) {
    (sb.device_endpoint().to_string(), sb.device_server_name())
}

async fn approve_command(mut args: ApproveArgs) -> Result<i32> {
    batch_by_path(&mut args.batch, &mut args.out);
    let _lock = run::lock_out_dir(&args.out)?;
    let ledger_path = args.out.join(run::LEDGER_FILE);
    if !ledger_path.exists() {
        return Err(Error::config(format!("no ledger at {}", ledger_path.display())));
    }
    let ledger = Ledger::open(&ledger_path)?;
    let endpoint = Endpoint::open(&args.aws, &args.out).await?;
    let aws = Aws::connect(&endpoint.conn).await;
    let result = async {
        aws.check_credentials().await?;
        let (_, plan) = crate::approve::plan(&aws, &ledger, &args.batch).await?;
        let mut err = std::io::stderr();
        let _ = writeln!(
            err,
            "{}: {} pending certificate{} of this batch to activate, {} active already, {} not seen by AWS yet{}",
            args.batch,
            plan.activate.len(),
            if plan.activate.len() == 1 { "" } else { "s" },
            plan.active.len(),
            plan.not_seen.len(),
            if plan.other.is_empty() { String::new() } else { format!(", {} in another state", plan.other.len()) }
        );
        for (thing, status) in &plan.other {
            let _ = writeln!(err, "  {thing}: certificate is {status}; not touched");
        }
        if !plan.strangers.is_empty() {
            let _ = writeln!(
                err,
                "WARNING: {} pending certificate{} signed by CA {} belong{} to no device of this batch and will NOT be activated:",
                plan.strangers.len(),
                if plan.strangers.len() == 1 { "" } else { "s" },
                plan.ca_certificate_id,
                if plan.strangers.len() == 1 { "s" } else { "" }
            );
            for s in &plan.strangers {
                let _ = writeln!(err, "  {s}");
            }
        }
        if plan.activate.is_empty() {
            println!("{}", serde_json::json!({"batch": args.batch, "activated": [], "failed": [], "strangers": plan.strangers, "not_seen": plan.not_seen}));
            return Ok(exit::OK);
        }
        for a in plan.activate.iter().take(5) {
            let _ = writeln!(err, "  activate {} (certificate {}), attach policy {}", a.thing_name, &a.certificate_id[..12.min(a.certificate_id.len())], plan.policy.as_deref().unwrap_or("-"));
        }
        if plan.activate.len() > 5 {
            let _ = writeln!(err, "  ... and {} more", plan.activate.len() - 5);
        }
        if !args.yes {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                return Err(Error::config("not a terminal, so there is nobody to confirm: pass --yes to activate these certificates"));
            }
            let _ = write!(err, "Activate {} certificate{}? [y/N] ", plan.activate.len(), if plan.activate.len() == 1 { "" } else { "s" });
            let _ = err.flush();
            let mut answer = String::new();
            let _ = std::io::stdin().read_line(&mut answer);
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                let _ = writeln!(err, "nothing activated");
                return Ok(exit::OK);
            }
        }
        let (done, failed) = crate::approve::apply(&aws, &plan).await;
        let _ = writeln!(err, "{} activated, {} failed", done.len(), failed.len());
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "batch": args.batch,
                "activated": done,
                "failed": failed.iter().map(|(t, e)| serde_json::json!({"thing_name": t, "error": e})).collect::<Vec<_>>(),
                "strangers": plan.strangers,
                "not_seen": plan.not_seen,
            }))
            .expect("json")
        );
        Ok(if failed.is_empty() { exit::OK } else { exit::PARTIAL })
    }
    .await;
    endpoint.close().await;
    result
}

async fn verify_command(mut args: VerifyArgs) -> Result<i32> {
    batch_by_path(&mut args.batch, &mut args.out);
    let ledger_path = args.out.join(run::LEDGER_FILE);
    if !ledger_path.exists() {
        return Err(Error::config(format!("no ledger at {}", ledger_path.display())));
    }
    let ledger = Ledger::open(&ledger_path)?;
    if ledger.batch(&args.batch)?.is_none() {
        return Err(Error::config(format!(
            "no batch `{}` in {}",
            args.batch,
            ledger_path.display()
        )));
    }
    let ws = Workspace::new(&args.out, &args.batch);
    let dirs: Vec<PathBuf> = ledger
        .devices(&args.batch)?
        .iter()
        .filter(|r| r.state == crate::ledger::state::BUNDLED)
        .map(|r| ws.bundle_dir(&r.thing_name))
        .collect();
    if dirs.is_empty() {
        return Err(Error::config(format!("{} has no bundles to verify", args.batch)));
    }
    let server_roots_pem = match &args.server_ca {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| Error::config(format!("cannot read {}: {e}", p.display())))?)
        }
        None => None,
    };
    let mut opts = crate::verify::Options {
        address: args.endpoint.clone(),
        server_name: args.server_name.clone(),
        server_roots_pem,
        attempts: args.attempts,
        timeout: Duration::from_secs(args.timeout),
    };
    let endpoint = if args.aws.sandbox {
        let e = Endpoint::open(&args.aws, &args.out).await?;
        if let Some(sb) = &e.sandbox {
            let (addr, name) = sandbox_device(sb);
            opts.address.get_or_insert(addr);
            opts.server_name.get_or_insert(name);
            opts.server_roots_pem.get_or_insert(sb.ca_certificate_pem());
        }
        Some(e)
    } else {
        None
    };
    let results = crate::verify::verify_all(dirs, opts, args.concurrency).await;
    if let Some(e) = endpoint {
        e.close().await;
    }
    let connected = results.iter().filter(|r| r.connected).count();
    let after_drop = results.iter().filter(|r| r.connected && r.attempts.len() > 1).count();
    let mut err = std::io::stderr();
    let _ = writeln!(
        err,
        "{}: {connected} of {} bundles connected{}",
        args.batch,
        results.len(),
        if after_drop > 0 {
            format!(" ({after_drop} after the endpoint dropped their first connection, as JITP/JITR do)")
        } else {
            String::new()
        }
    );
    for r in results.iter().filter(|r| !r.connected).take(10) {
        let last = r.attempts.last().map(|a| a.to_string()).unwrap_or_default();
        let _ = writeln!(err, "  {}: {last} (after {} attempts)", r.thing_name, r.attempts.len());
    }
    let doc = serde_json::json!({"batch": args.batch, "connected": connected, "devices": results});
    let path = ws.dir().join("verify.json");
    crate::workspace::write_durable(
        &path,
        serde_json::to_string_pretty(&doc).expect("json").as_bytes(),
        0o644,
    )
    .map_err(|e| Error::infra(format!("{}: {e}", path.display())))?;
    println!("{}", path.display());
    Ok(if connected == results.len() {
        exit::OK
    } else {
        exit::PARTIAL
    })
}
