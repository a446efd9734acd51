// TEMPORARY minimal entry point (replaced by the CLI).
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[arg(long, global = true)]
    data_dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    Start(cosmicsync::config::NodeArgs),
}

fn main() {
    let cli = Cli::parse();
    let Cmd::Start(args) = cli.cmd;
    let global = cosmicsync::config::GlobalOptions { data_dir: cli.data_dir, ..Default::default() };
    if let Err(e) = cosmicsync::boot::run_node(global, args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
