//! idemq benchmarks: each prints its figures, measured against a baseline in
//! the same run. See README's "Benchmarks" section.

mod claims;
mod key_memory;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "idemq-bench",
    about = "Measures what idemq's deduplication costs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Claims per second from one Redis store, next to redis-benchmark SET.
    Claims(claims::Args),
    /// Redis memory per retained (completed) key.
    KeyMemory(key_memory::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Claims(args) => claims::run(args).await,
        Command::KeyMemory(args) => key_memory::run(args).await,
    }
}
