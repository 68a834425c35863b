//! `dvmm ctl`: a small client of the control API, in the spirit of `ch-remote`.

use anyhow::Result;
use dvmm_api::client::ApiClient;
use std::path::PathBuf;

/// `dvmm ctl`'s arguments.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The VM's API socket (its `--api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    action: CtlAction,
}

/// What to ask.
#[derive(clap::Subcommand, Debug, Clone, Copy)]
enum CtlAction {
    /// Whether the API answers, and dvmm's version.
    Ping,
    /// The VM's shape and state (JSON).
    Info,
    /// Stop every vCPU on every node; returns once they are stopped.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// End the VM (every node exits, status 130).
    Shutdown,
    /// Exit and DSM counters per node and vCPU (JSON).
    Counters,
}

fn pretty<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs `dvmm ctl`.
pub fn run(args: CtlArgs) -> Result<u8> {
    let c = ApiClient::new(&args.api_socket);
    match args.action {
        CtlAction::Ping => pretty(&c.ping()?)?,
        CtlAction::Info => pretty(&c.info()?)?,
        CtlAction::Counters => pretty(&c.counters()?)?,
        CtlAction::Pause => {
            c.pause()?;
            println!("paused");
        }
        CtlAction::Resume => {
            c.resume()?;
            println!("resumed");
        }
        CtlAction::Shutdown => {
            c.shutdown()?;
            println!("shutting down");
        }
    }
    Ok(0)
}
