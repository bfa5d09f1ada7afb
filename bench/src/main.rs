//! idemq benchmarks: each prints its figures, measured against a baseline in
//! the same run. See README's "Benchmarks" section.

mod app;
mod chart;
mod claims;
mod cpu;
mod jetstream;
mod kafka;
mod key_memory;
mod mqtt;
mod naive;
mod pipeline;
mod post;
mod pubsub;
mod rabbitmq;
mod redis_admin;
mod zeromq;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "idemq-bench",
    about = "Measures what idemq's deduplication costs",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Without a subcommand: the pipeline benchmark (raw, idemq, naive, idemq-memory).
    #[command(flatten)]
    pipeline: pipeline::Args,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Claims per second from one Redis store, next to redis-benchmark SET.
    Claims(claims::Args),
    /// Redis memory per retained (completed) key.
    KeyMemory(key_memory::Args),
    /// Local demo: publishes messages with duplicates and shows each delivered once.
    Demo {
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        /// The sidecar binary (default: next to this one).
        #[arg(long)]
        sidecar_bin: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => pipeline::run(cli.pipeline).await,
        Some(Command::Claims(args)) => claims::run(args).await,
        Some(Command::KeyMemory(args)) => key_memory::run(args).await,
        Some(Command::Demo {
            messages,
            sidecar_bin,
        }) => pipeline::demo(messages, sidecar_bin).await,
    }
}
