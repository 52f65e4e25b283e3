//! `grok-worker`: owns one shard of one model replica.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "grok-worker",
    version,
    about = "grok-cluster worker: one shard of one replica"
)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("grok-worker: distributed serving is not available in this build; use `grokctl generate` for single-process generation");
    std::process::exit(2);
}
