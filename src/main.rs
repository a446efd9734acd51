//! The `cosmicsync` binary: parses the command line and runs one command (see `cli`).
//!
//! `main` is a plain function, not `#[actix::main]`: `start` builds its own actix System
//! inside `cosmicsync::boot::run_node`, after the logger, so the logger outlives the
//! runtime. Errors are printed once, here, with their causes; nothing below may exit the
//! process itself.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // Usage errors and --help/--version are handled by clap (exit 2 and 0).
    let cli = cli::Cli::parse();
    // Test builds only (`--features failpoints`): arm the fail points named in FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
