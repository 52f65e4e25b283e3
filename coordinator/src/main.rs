//! `grok-coordinator`: the cluster coordinator process.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "grok-coordinator",
    version,
    about = "grok-cluster coordinator: membership, placement and the engine loop"
)]
struct Args {}

fn main() {
    let _ = Args::parse();
    grok_coordinator::logging::init(false, "info");
    eprintln!("grok-coordinator: distributed serving is not available in this build; use `grokctl generate` for single-process generation");
    std::process::exit(2);
}
