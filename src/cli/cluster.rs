//! `cluster start` and `cluster stop`: an N-node network on this host, for trying
//! replication out. Each node is this binary started with `start --detach` on its own
//! data directory (`<dir>/node-<i>`), on free loopback ports, with one network key
//! (`<dir>/network.key`); node 1 is every other node's bootstrap peer.
//!
//! Nothing here talks to a node beyond reading its node.json: the nodes are ordinary
//! nodes, managed afterwards like any other (`--data-dir <dir>/node-<i> status`, …).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail};
use cosmicsync::boot::read_node_info;

/// Where a cluster's nodes keep their data.
fn node_dir(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node-{i}"))
}

/// The nodes a cluster directory holds, in order.
fn node_dirs(dir: &Path) -> Vec<PathBuf> {
    (1..).map(|i| node_dir(dir, i)).take_while(|d| d.is_dir()).collect()
}

/// Runs this binary with `args` (its output passes through); fails if it fails.
fn run_self(args: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let status = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("cannot run cosmicsync")?;
    if !status.success() {
        bail!("`cosmicsync {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cluster start`: starts `nodes` nodes (or the ones a directory already holds).
pub fn start(dir: &Path, nodes: usize, extra: &[String]) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let key = dir.join("network.key");
    cosmicsync::replication::netkey::load(&key, true)
        .with_context(|| format!("cannot create the network key {}", key.display()))?;
    let nodes = nodes.max(node_dirs(&dir).len());
    let mut bootstrap: Option<String> = None;
    let mut urls = Vec::with_capacity(nodes);
    for i in 1..=nodes {
        let data = node_dir(&dir, i);
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data.display().to_string(),
            "start".into(),
            "--detach".into(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--p2p-listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--p2p-listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--network-key-file".into(),
            key.display().to_string(),
        ];
        if let Some(b) = &bootstrap {
            args.extend(["--bootstrap".into(), b.clone()]);
        }
        args.extend(extra.iter().cloned());
        run_self(&args).with_context(|| format!("node {i} did not start; see {}", data.join("node.log").display()))?;
        let info = read_node_info(&data).with_context(|| format!("node {i} wrote no node.json"))?;
        if bootstrap.is_none() {
            let tcp =
                info.p2p_addrs.iter().find(|a| a.contains("/tcp/")).context("node 1 listens on no TCP address")?;
            bootstrap = Some(format!("{tcp}/p2p/{}", info.peer_id));
        }
        urls.push((i, info.api_url, info.tls_cert));
    }
    println!("{nodes} nodes of one network (key {}):", key.display());
    for (i, url, cert) in &urls {
        println!("  node {i}: {url}   (certificate {})", cert.display());
    }
    println!("each node: cosmicsync --data-dir {}/node-<i> status | sync status | stop", dir.display());
    println!("stop them all: cosmicsync cluster stop --dir {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `cluster stop`: stops every node of the directory that runs.
pub fn stop(dir: &Path) -> anyhow::Result<ExitCode> {
    let dirs = node_dirs(dir);
    if dirs.is_empty() {
        bail!("{} holds no cluster (no node-1 directory)", dir.display());
    }
    let mut failed = false;
    for data in dirs {
        if read_node_info(&data).is_none() {
            continue;
        }
        let args = vec!["--data-dir".to_owned(), data.display().to_string(), "stop".into()];
        if let Err(e) = run_self(&args) {
            eprintln!("error: {e:#}");
            failed = true;
        } else {
            println!("stopped {}", data.display());
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
