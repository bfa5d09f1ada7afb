//! `idemq-operator`: run the controller, print the CRD, or inject the sidecar offline.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use idemq_operator::crd::IdempotentConsumer;
use idemq_operator::{inject, labels};
use kube::CustomResourceExt;

#[derive(Parser)]
#[command(
    name = "idemq-operator",
    version,
    about = "The idemq Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(run::Args),
    /// Print the IdempotentConsumer CRD as YAML.
    Crd,
    /// Print a workload with the sidecar injected, and the objects the policy implies.
    Inject {
        /// The IdempotentConsumer (YAML).
        #[arg(long)]
        policy: PathBuf,
        /// The Deployment or StatefulSet (YAML); `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        workload: PathBuf,
        /// Sidecar image when the policy names none.
        #[arg(long, env = "IDEMQ_SIDECAR_IMAGE", default_value = labels::DEFAULT_SIDECAR_IMAGE)]
        sidecar_image: String,
    },
}

mod run;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run::main(args),
        Command::Crd => {
            print!("{}", crd_yaml());
            Ok(())
        }
        Command::Inject {
            policy,
            workload,
            sidecar_image,
        } => {
            let policy = std::fs::read_to_string(&policy)
                .with_context(|| format!("read {}", policy.display()))?;
            let workload = if workload.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("read standard input")?;
                text
            } else {
                std::fs::read_to_string(&workload)
                    .with_context(|| format!("read {}", workload.display()))?
            };
            print!("{}", inject::inject(&policy, &workload, &sidecar_image)?);
            Ok(())
        }
    }
}

fn crd_yaml() -> String {
    serde_yaml::to_string(&IdempotentConsumer::crd()).expect("the CRD always serializes")
}
