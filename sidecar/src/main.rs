//! `idemq-sidecar`: run the sidecar, or check a configuration file.
//!
//! Exit codes: 0 clean shutdown, 1 runtime failure, 64 unusable configuration
//! (so a crash-looping pod says at a glance that its config is wrong).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idemq_sidecar::config::Config;
use idemq_sidecar::run::{self, Listeners};
use idemq_sidecar::secrets::{ProcessEnv, Secrets};
use tokio_util::sync::CancellationToken;

const EX_CONFIG: u8 = 64;

// Every delivery allocates a few buffers on whichever runtime thread polls
// it; glibc's malloc serialises those threads on its arena locks.
#[global_allocator]
// Its options are set at build time, in .cargo/config.toml.
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "idemq-sidecar",
    version,
    about = "Makes a message consumer idempotent"
)]
struct Cli {
    /// The configuration file (YAML).
    #[arg(long, env = "IDEMQ_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "IDEMQ_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit; names every bad field.
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::from_file(file) {
            Ok(config) => {
                for warning in config.warnings() {
                    println!("{}: warning: {warning}", file.display());
                }
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(EX_CONFIG)
            }
        };
    }
    init_logging(&cli.log_format);
    let Some(path) = cli.config else {
        eprintln!("no configuration: pass --config FILE or set IDEMQ_CONFIG");
        return ExitCode::from(EX_CONFIG);
    };
    let config = match Config::from_file(&path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "unusable configuration");
            return ExitCode::from(EX_CONFIG);
        }
    };
    for warning in config.warnings() {
        tracing::warn!(field = %warning.field, "{}", warning.message);
    }
    let secrets = match Secrets::resolve(&config, &ProcessEnv) {
        Ok(secrets) => secrets,
        Err(e) => {
            tracing::error!(error = %e, "unusable secrets");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, secrets)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "sidecar failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, secrets: Secrets) -> anyhow::Result<()> {
    // Several crates link rustls with different crypto backends (amqps://,
    // rediss://); pick one for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = run::open_store(&config, &secrets)?;
    let listeners = Listeners::bind(&config).await?;
    let grace = config.shutdown_grace;
    tracing::info!(consumer = %config.consumer, mode = ?config.mode, "idemq sidecar starting");
    let shutdown = CancellationToken::new();
    let mut sidecar = tokio::spawn(run::run(
        config,
        secrets,
        store,
        listeners,
        shutdown.clone(),
    ));
    tokio::select! {
        finished = &mut sidecar => return finished?,
        _ = terminated() => {}
    }
    tracing::info!(grace = ?grace, "shutting down: draining in-flight work");
    shutdown.cancel();
    match tokio::time::timeout(grace, sidecar).await {
        Ok(finished) => finished?,
        Err(_) => anyhow::bail!("in-flight work did not drain within {grace:?}"),
    }
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDEMQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
