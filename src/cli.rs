//! The `cosmicsync` command line: what it accepts (clap derive, so `--help` is generated
//! from these definitions) and which code runs each command.
//!
//! `start` hands over to `cosmicsync::boot`; every other command talks to a running node
//! through its control socket (`cosmicsync::control`) and never opens the node's
//! database, keys or files itself, apart from reading `node.json` to find the node's
//! pid. Nothing here may panic on user input: bad values are clap errors, failures are
//! `anyhow` errors that `main` prints.

mod cluster;
mod keys;
mod network;
mod node;
mod query;
mod recommend;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cosmicsync::config::{GlobalOptions, LogFormat, NodeArgs, defaults};
use uuid::Uuid;

/// Exit statuses beyond success (0) and failure (1).
pub mod exit {
    /// `stop`: the node was still running when the timeout passed.
    pub const TIMED_OUT: u8 = 2;
    /// `status` and the queries: no node runs on the data directory (as LSB `status`).
    pub const NOT_RUNNING: u8 = 3;
}

/// How long a query waits for the node's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const AFTER_HELP: &str = "\
Commands other than `start` find the node through <data-dir> (its control socket and
node.json), so give them the same --data-dir or COSMICSYNC_DATA_DIR as the node.

Exit status: 0 success; 1 failure, or `stop` found no node, or a recommendation run
failed; 2 usage error, or `stop` timed out; 3 no node is running (`status`, the queries,
`recommend run`).";

/// CosmicSyncCore: a peer-to-peer data-sync node for collaboration platforms.
#[derive(Debug, Parser)]
#[command(name = "cosmicsync", version, about, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts (before or after the command name).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Directory holding the node's data, keys, node.json, node.log and control socket [default: ./cosmicsync-data]
    #[arg(long, global = true, env = "COSMICSYNC_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Log format of a node started with `start` [default: term]
    #[arg(long, global = true, env = "COSMICSYNC_LOG_FORMAT", value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log level of a node started with `start` [default: info]
    #[arg(
        long,
        global = true,
        env = "COSMICSYNC_LOG_LEVEL",
        value_name = "LEVEL",
        value_parser = ["critical", "error", "warning", "warn", "info", "debug", "trace"],
    )]
    pub log_level: Option<String>,
}

impl GlobalArgs {
    /// The data directory commands other than `start` look in. (`start` resolves it with
    /// the rest of the config, where a `--config` file may also set it.)
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| defaults::DATA_DIR.into())
    }

    /// What boot code gets.
    pub fn options(&self) -> GlobalOptions {
        GlobalOptions {
            data_dir: self.data_dir.clone(),
            log_format: self.log_format,
            log_level: self.log_level.clone(),
        }
    }
}

/// The commands.
// Parsed once per process: the size of the `start` variant costs nothing worth a Box.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node on the data directory (in the foreground unless --detach)
    #[command(after_help = "Options may also come from COSMICSYNC_* environment variables or a TOML file given with \
                      --config; a flag beats the environment, which beats the file.")]
    Start(Box<StartArgs>),
    /// Stop the node running on the data directory and wait until it has exited
    #[command(after_help = "Exit status: 0 stopped; 1 no node was running; 2 still running after --timeout.")]
    Stop(StopArgs),
    /// Show whether a node runs on the data directory, and how it is
    #[command(after_help = "Exit status: 0 running; 3 not running.")]
    Status(StatusArgs),
    /// Read users from the running node
    #[command(subcommand)]
    Users(UsersCommand),
    /// Read profiles from the running node
    #[command(subcommand)]
    Profiles(ProfilesCommand),
    /// Read and list projects on the running node
    #[command(subcommand)]
    Projects(ProjectsCommand),
    /// Inspect the node's network
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Manage the data keys that seal sensitive fields at rest
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run the recommendation batch on the node
    #[command(subcommand)]
    Recommend(RecommendCommand),
    /// Inspect replication: peers, what each origin wrote, what waits, conflicts
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Run several nodes of one network on this host (to try replication out)
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Add a new data key and re-seal every existing row with it, showing progress
    #[command(after_help = "The node keeps serving meanwhile. If a rotation is unfinished (the node was stopped \
                      halfway), it is continued instead of adding another key; a node also resumes it by itself \
                      when it starts. Old keys stay in the key file: back the file up after rotating.\n\n\
                      Exit status: 0 done; 1 refused; 3 no node running.")]
    Rotate {
        /// Return once the key is in place, without waiting for the re-sealing
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the data keys and how many rows each seals
    #[command(after_help = "Exit status: 0 answered; 1 refused; 3 no node running.")]
    Status {
        /// Print as JSON
        #[arg(long)]
        json: bool,
    },
}

/// `cluster`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start N nodes on free loopback ports with one network key, node 1 the others'
    /// bootstrap peer; prints each node's API URL and how to stop them
    #[command(after_help = "Each node is an ordinary detached node in <dir>/node-<i>: manage it with \
                      `cosmicsync --data-dir <dir>/node-<i> …`. Starting again restarts the nodes the directory \
                      holds. Arguments after `--` go to every node's `start`.\n\
                      Exit status: 0 all started; 1 a node did not start.")]
    Start(ClusterStartArgs),
    /// Stop every node of a cluster directory
    Stop(ClusterDirArg),
}

/// `cluster stop`.
#[derive(Debug, Args)]
pub struct ClusterDirArg {
    /// The cluster's directory
    #[arg(long, value_name = "DIR", default_value = "./cosmicsync-cluster")]
    pub dir: PathBuf,
}

/// `cluster start`.
#[derive(Debug, Args)]
pub struct ClusterStartArgs {
    /// How many nodes, 1-32
    #[arg(long, short = 'n', value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub nodes: u16,
    #[command(flatten)]
    pub dir: ClusterDirArg,
    /// Extra `start` options for every node
    #[arg(last = true, value_name = "START-OPTIONS")]
    pub extra: Vec<String>,
}

/// `sync`.
#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Show replication per peer (connected, last reconciliation, changes sent and
    /// received) and per origin (writes held here), changes waiting for a dependency,
    /// open conflicts
    #[command(after_help = "Exit status: 0 shown; 3 no node is running.")]
    Status(JsonArg),
}

/// `recommend`.
#[derive(Debug, Subcommand)]
pub enum RecommendCommand {
    /// Compute every user's recommendations now (or follow the run going on) and wait for the end
    #[command(after_help = "Shows a progress bar when stdout is a terminal (not with --json).\n\
                      Exit status: 0 the run finished and its results are served; 1 it failed (the previous \
                      results stay in place); 3 no node is running.")]
    Run(RecommendRunArgs),
}

/// `recommend run`.
#[derive(Debug, Args)]
pub struct RecommendRunArgs {
    /// Print the finished run as JSON, and show no progress bar
    #[arg(long)]
    pub json: bool,
}

/// `start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Run in the background: return once the node is ready, with its output appended to <data-dir>/node.log
    #[arg(long)]
    pub detach: bool,

    #[command(flatten)]
    pub node: NodeArgs,
}

/// `stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds to wait for the node to exit
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the node's status report as JSON instead of a summary
    #[arg(long)]
    pub json: bool,
}

/// `users`.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Print a user's public record (no email) as JSON
    Get(IdArg),
}

/// `profiles`.
#[derive(Debug, Subcommand)]
pub enum ProfilesCommand {
    /// Print a profile as JSON
    Get(IdArg),
}

/// `projects`.
#[derive(Debug, Subcommand)]
pub enum ProjectsCommand {
    /// Print a project as JSON
    Get(IdArg),
    /// Print a page of projects, newest first, as JSON (`next_cursor` fetches the next page)
    List(ListArgs),
}

/// `network`.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Print the node's status as JSON; its `network` part is the peer-to-peer view
    Status,
    /// List the connected peers: id, address, direct or relayed, round-trip time, agent
    Peers(JsonArg),
    /// Look a peer up in the DHT and print its addresses and how long the lookup took
    FindPeer(FindPeerArgs),
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `network find-peer`.
#[derive(Debug, Args)]
pub struct FindPeerArgs {
    /// The peer id to look up (e.g. 12D3KooW…)
    #[arg(value_name = "PEER_ID")]
    pub peer_id: String,

    /// Print JSON instead of a summary
    #[arg(long)]
    pub json: bool,
}

/// A record's id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The record's id (a UUID)
    #[arg(value_name = "ID", value_parser = parse_uuid)]
    pub id: Uuid,
}

/// `projects list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only projects created by this user (a UUID)
    #[arg(long, value_name = "UUID", value_parser = parse_uuid)]
    pub creator: Option<Uuid>,

    /// Page size, 1-200 [default: 50]
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    /// `next_cursor` of the previous page
    #[arg(long, value_name = "CURSOR")]
    pub cursor: Option<String>,
}

/// A UUID, with an error message that says what was expected.
fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s.trim())
        .map_err(|e| format!("not a UUID ({e}); expected e.g. 0190c0de-7b3a-7c1e-9d2f-3a4b5c6d7e8f"))
}

/// Runs a parsed command line; `Ok` carries the exit status.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Cli { global, command } = cli;
    let data_dir = global.data_dir();
    match command {
        Command::Start(start) => match *start {
            StartArgs { detach: false, node } => {
                cosmicsync::boot::run_node(global.options(), node)?;
                Ok(ExitCode::SUCCESS)
            }
            StartArgs { detach: true, node } => node::start_detached(&global.options(), &node),
        },
        Command::Stop(StopArgs { timeout }) => node::stop(&data_dir, Duration::from_secs(timeout)),
        Command::Status(StatusArgs { json }) => query::status(&data_dir, json),
        Command::Users(UsersCommand::Get(IdArg { id })) => {
            query::print(&data_dir, cosmicsync::control::Request::GetUser { id })
        }
        Command::Profiles(ProfilesCommand::Get(IdArg { id })) => {
            query::print(&data_dir, cosmicsync::control::Request::GetProfile { id })
        }
        Command::Projects(ProjectsCommand::Get(IdArg { id })) => {
            query::print(&data_dir, cosmicsync::control::Request::GetProject { id })
        }
        Command::Projects(ProjectsCommand::List(ListArgs { creator, limit, cursor })) => {
            query::print(&data_dir, cosmicsync::control::Request::ListProjects { creator, limit, cursor })
        }
        Command::Network(NetworkCommand::Status) => {
            query::print(&data_dir, cosmicsync::control::Request::NetworkStatus)
        }
        Command::Keys(KeysCommand::Rotate { no_wait }) => keys::rotate(&data_dir, no_wait),
        Command::Keys(KeysCommand::Status { json }) => keys::status(&data_dir, json),
        Command::Recommend(RecommendCommand::Run(RecommendRunArgs { json })) => recommend::run(&data_dir, json),
        Command::Network(NetworkCommand::Peers(JsonArg { json })) => network::peers(&data_dir, json),
        Command::Sync(SyncCommand::Status(JsonArg { json })) => sync::status(&data_dir, json),
        Command::Cluster(ClusterCommand::Start(ClusterStartArgs { nodes, dir, extra })) => {
            cluster::start(&dir.dir, usize::from(nodes), &extra)
        }
        Command::Cluster(ClusterCommand::Stop(ClusterDirArg { dir })) => cluster::stop(&dir),
        Command::Network(NetworkCommand::FindPeer(FindPeerArgs { peer_id, json })) => {
            network::find_peer(&data_dir, peer_id, json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cosmicsync").chain(args.iter().copied()))
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_command() {
        for args in [&["--data-dir", "/d", "status"][..], &["status", "--data-dir", "/d"]] {
            let cli = parse(args).unwrap();
            assert_eq!(cli.global.data_dir(), PathBuf::from("/d"));
        }
        let cli = parse(&["start", "--detach", "--log-level", "debug", "--bcrypt-cost", "4"]).unwrap();
        assert_eq!(cli.global.options().log_level.as_deref(), Some("debug"));
        assert!(matches!(cli.command, Command::Start(ref s) if s.detach && s.node.bcrypt_cost == Some(4)));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["users", "get", "not-a-uuid"][..],
            &["projects", "list", "--creator", "42"],
            &["projects", "list", "--limit", "-1"],
            &["stop", "--timeout", "0"],
            &["status", "--log-level", "loud"],
            &["start", "--http-addr", "nowhere"],
        ] {
            let err = parse(args).err().unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let err = parse(&["users", "get", "not-a-uuid"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not a UUID"), "{err}");
    }

    #[test]
    fn recommend_run_parses() {
        let cli = parse(&["recommend", "run", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Recommend(RecommendCommand::Run(RecommendRunArgs { json: true }))));
        assert_eq!(parse(&["recommend"]).err().map(|e| e.exit_code()), Some(2));
    }

    #[test]
    fn ids_parse() {
        let id = Uuid::now_v7();
        let cli = parse(&["projects", "get", &id.to_string()]).unwrap();
        assert!(matches!(cli.command, Command::Projects(ProjectsCommand::Get(IdArg { id: got })) if got == id));
    }
}
