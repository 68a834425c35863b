//! `dvmm run --nodes K`: a whole cluster on this machine, one process per node.
//!
//! Picks free loopback ports and a random secret, writes a cluster file (mode 0600) into
//! a private temporary directory, starts `dvmm node --id i` for every node, and
//! supervises them: node 0 has the console; the run's exit code is node 0's; when any
//! node ends, the others get 5 s to follow before they are killed; every child also
//! dies with this process (PR_SET_PDEATHSIG), so none is left behind.

use dvmm_sync::MutexExt;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dvmm_cluster::{ClusterConfig, GuestSpec, NodeSpec};

use crate::RunArgs;

const NODE_RAM_ALIGN: u64 = 2 << 20;
/// How long the other nodes get to end after one of them ended cleanly (power-off).
const GRACE: Duration = Duration::from_secs(5);
/// ... and after one failed: a peer notices a dead node at once and a frozen one within
/// the transport's 2 s dead-peer timeout, so every node is gone within ~4 s.
const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// A signal's name, for "killed by signal 9 (SIGKILL)".
fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => "a signal",
    }
}

/// How a node process ended, in words, and the exit code that stands for it (a shell's
/// 128 + signal for a signal).
fn describe_end(st: std::process::ExitStatus) -> (String, i32) {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => (format!("exit {c}"), c),
        (None, Some(sig)) => (
            format!("killed by signal {sig} ({})", signal_name(sig)),
            128 + sig,
        ),
        _ => ("ended".to_string(), 1),
    }
}

fn random_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for the cluster secret")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Splits `total` into `k` shares, earlier shares getting the remainder.
fn split(total: u64, k: u64, align: u64) -> Vec<u64> {
    let base = total / k / align * align;
    let mut out = vec![base; k as usize];
    let rest = total - base * k;
    if let Some(last) = out.last_mut() {
        *last += rest;
    }
    out
}

/// The cluster file for `args`, checked as `dvmm node` will check it.
pub fn local_cluster(args: &RunArgs) -> Result<ClusterConfig> {
    let k = args.nodes;
    if k == 0 {
        bail!("--nodes must be at least 1");
    }
    // Checked before anything is started (ports, processes).
    if args.cpus > dvmm_layout::MAX_VCPUS {
        bail!(
            "--cpus {}: at most {} vCPUs are supported",
            args.cpus,
            dvmm_layout::MAX_VCPUS
        );
    }
    if args.cpus < k {
        bail!(
            "--nodes {k} needs at least {k} vCPUs (one per node); got --cpus {}",
            args.cpus
        );
    }
    if !args.memory.is_multiple_of(NODE_RAM_ALIGN) || args.memory / u64::from(k) < NODE_RAM_ALIGN {
        bail!("--memory must be a multiple of 2 MiB with at least 2 MiB per node for --nodes {k}");
    }
    let mut nodes = Vec::with_capacity(k as usize);
    let base = args.cpus / k;
    let extra = args.cpus % k;
    let mem = split(args.memory, u64::from(k), NODE_RAM_ALIGN);
    // Bind to learn free ports, holding every one until all are picked (a port let go
    // at once can be handed out again for the next node); the nodes take them after.
    let mut held = Vec::with_capacity(k as usize);
    for i in 0..k {
        let l = std::net::TcpListener::bind("127.0.0.1:0")
            .context("cannot find a free loopback port")?;
        nodes.push(NodeSpec {
            address: l.local_addr()?,
            vcpus: base + u32::from(i < extra),
            memory: mem[i as usize],
            hide_cpuid: args.hide_cpuid,
        });
        held.push(l);
    }
    drop(held);
    let cluster = ClusterConfig {
        secret: random_secret()?,
        insecure_transport: args.insecure_transport,
        guest: GuestSpec {
            kernel: std::fs::canonicalize(&args.kernel)
                .with_context(|| format!("cannot read kernel image {}", args.kernel.display()))?,
            initramfs: match &args.initramfs {
                Some(p) => Some(
                    std::fs::canonicalize(p)
                        .with_context(|| format!("cannot read initramfs {}", p.display()))?,
                ),
                None => None,
            },
            cmdline: args.cmdline.clone(),
        },
        // Absolute paths: the node processes need not share our working directory. A
        // path that cannot be resolved is left as given, for node 0 to report.
        disks: args
            .disks
            .iter()
            .map(|d| dvmm_cluster::DiskSpec {
                path: std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone()),
                ..d.clone()
            })
            .collect(),
        nets: args.nets.clone(),
        rng: args.rng,
        test_devices: args.test_devices,
        console: args.console.0.as_ref().map(|c| match c {
            // Absolute too (the file or socket need not exist yet: its directory must).
            dvmm_cluster::ConsoleSpec::File(p) => dvmm_cluster::ConsoleSpec::File(absolute(p)),
            dvmm_cluster::ConsoleSpec::Socket(p) => dvmm_cluster::ConsoleSpec::Socket(absolute(p)),
        }),
        nodes,
    };
    // The same checks as a hand-written cluster file gets.
    ClusterConfig::parse(
        &cluster.to_toml(),
        std::path::Path::new("(the local cluster)"),
    )
    .context("the local cluster's shape is not valid")
}

/// `p` made absolute against the current directory (without resolving links).
fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A private directory holding the cluster file, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where node `id` writes its part of the profile `output`.
fn node_profile(output: &std::path::Path, id: usize) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(format!(".node{id}"));
    PathBuf::from(p)
}

/// Node `id`'s part of the run report, in the launcher's private directory.
fn node_report(dir: &std::path::Path, id: usize) -> PathBuf {
    dir.join(format!("report.node{id}"))
}

/// Node `id`'s own API socket, in the launcher's private directory.
fn node_api_socket(dir: &std::path::Path, id: usize) -> PathBuf {
    dir.join(format!("api.node{id}"))
}

fn spawn_node(file: &std::path::Path, id: usize, args: &RunArgs) -> Result<Child> {
    let exe = std::env::current_exe().context("cannot find the dvmm executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--cluster")
        .arg(file)
        .arg("--id")
        .arg(id.to_string());
    if let Some(addr) = args.ops.metrics_addr {
        // Port 0 (any free port) stays 0 for every node.
        let port = match addr.port() {
            0 => 0,
            p => u16::try_from(usize::from(p) + id).with_context(|| {
                format!("--metrics-addr {addr}: no port {p}+{id} for node {id}")
            })?,
        };
        cmd.arg("--metrics-addr")
            .arg(std::net::SocketAddr::new(addr.ip(), port).to_string());
    }
    if args.ops.api_socket.is_some() {
        if let Some(dir) = file.parent() {
            cmd.arg("--api-socket").arg(node_api_socket(dir, id));
        }
    }
    if let Some(out) = &args.profile.profile {
        cmd.arg("--profile")
            .arg(node_profile(out, id))
            .arg("--profile-interval")
            .arg(args.profile.profile_interval.to_string());
    }
    if let Some(map) = &args.profile.system_map {
        cmd.arg("--system-map").arg(map);
    }
    if args.ops.report.is_some() {
        if let Some(dir) = file.parent() {
            cmd.arg("--report").arg(node_report(dir, id));
        }
    }
    if id != 0 {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
    }
    // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start node {id}"))
}

fn signal(children: &Mutex<Vec<Child>>, sig: i32) {
    for c in children.locked().iter() {
        // SAFETY: sending a signal to our own child (a stale pid at worst gets ESRCH,
        // since unreaped children keep their pid).
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
    }
}

/// Runs the cluster; returns node 0's exit code.
pub fn run_local_cluster(args: &RunArgs, set: libc::sigset_t) -> Result<u8> {
    let cluster = local_cluster(args)?;
    let api = args
        .ops
        .api_socket
        .as_deref()
        .map(dvmm_api::server::ApiListener::bind)
        .transpose()?;
    let dir = std::env::temp_dir().join(format!("dvmm-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = TempDir(dir);
    let file = dir.0.join("cluster.toml");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .with_context(|| format!("cannot write {}", file.display()))?;
        f.write_all(cluster.to_toml().as_bytes())?;
    }
    tracing::info!(
        nodes = cluster.nodes.len(),
        encrypted = !cluster.insecure_transport,
        "starting a local cluster"
    );

    let children = Arc::new(Mutex::new(Vec::new()));
    for id in 0..cluster.nodes.len() {
        match spawn_node(&file, id, args) {
            Ok(c) => children.locked().push(c),
            Err(e) => {
                signal(&children, libc::SIGKILL);
                return Err(e);
            }
        }
    }
    let _api = match api {
        Some(listener) => Some(
            listener.serve(Arc::new(crate::api_proxy::ClusterApi {
                nodes: (0..cluster.nodes.len())
                    .map(|i| node_api_socket(&dir.0, i))
                    .collect(),
            }))?,
        ),
        None => None,
    };
    {
        let children = children.clone();
        crate::on_signals(set, move |sig| {
            tracing::info!(signal = sig, "stopping the cluster");
            signal(&children, libc::SIGTERM);
        })?;
    }

    let n = cluster.nodes.len();
    let mut codes: Vec<Option<i32>> = vec![None; n];
    let mut how: Vec<String> = vec!["still running (killed)".to_string(); n];
    // When the first node ended, and how long the others get from then on.
    let mut first_end: Option<(Instant, Duration)> = None;
    loop {
        {
            let mut kids = children.locked();
            for (i, c) in kids.iter_mut().enumerate() {
                if codes[i].is_none() {
                    if let Ok(Some(st)) = c.try_wait() {
                        let (words, code) = describe_end(st);
                        if code != 0 {
                            tracing::warn!(node = i, "node ended: {words}");
                        }
                        how[i] = words;
                        codes[i] = Some(code);
                        let grace = if code == 0 { GRACE } else { FAILURE_GRACE };
                        match &mut first_end {
                            None => first_end = Some((Instant::now(), grace)),
                            Some((_, g)) => *g = (*g).min(grace),
                        }
                    }
                }
            }
        }
        if codes.iter().all(Option::is_some) {
            break;
        }
        if let Some((_, grace)) = first_end.filter(|(t, g)| t.elapsed() > *g) {
            tracing::warn!("nodes still running {grace:?} after one ended: killing them");
            signal(&children, libc::SIGKILL);
            for c in children.locked().iter_mut() {
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(out) = &args.profile.profile {
        merge_profiles(out, n);
    }
    if let Some(out) = &args.ops.report {
        let mut parts = Vec::new();
        for i in 0..n {
            let json = dvmm_node::report::json_path(&node_report(&dir.0, i));
            match dvmm_node::report::read_parts(&json) {
                Ok(p) => parts.extend(p),
                Err(e) => tracing::warn!(node = i, error = %e, "no report part from this node"),
            }
        }
        dvmm_node::write_report(out, &parts, args.profile.system_map.as_deref());
    }
    let code = codes[0].unwrap_or(1);
    if codes.iter().any(|c| *c != Some(0)) {
        let all: Vec<String> = how
            .iter()
            .enumerate()
            .map(|(i, h)| format!("node {i}: {h}"))
            .collect();
        eprintln!("dvmm: nodes ended: {}", all.join(", "));
    }
    if code == 0 {
        if let Some(i) = codes.iter().position(|c| c.is_some_and(|c| c != 0)) {
            eprintln!("dvmm: node {i} failed: {}", how[i]);
            return Ok(1);
        }
    }
    Ok(u8::try_from(code).unwrap_or(1))
}

/// Adds up the nodes' profiles into one for the whole guest.
fn merge_profiles(output: &std::path::Path, nodes: usize) {
    let reports: Vec<String> = (0..nodes)
        .filter_map(|i| std::fs::read_to_string(node_profile(output, i)).ok())
        .collect();
    if reports.len() != nodes {
        tracing::warn!(
            "only {} of {nodes} nodes wrote a profile; {} covers those",
            reports.len(),
            output.display()
        );
    }
    let rows = dvmm_vmm::profile::merge_reports(&reports);
    let title = format!(
        "dvmm guest profile: all {nodes} nodes (per node: {}.nodeN)",
        output.display()
    );
    match dvmm_vmm::profile::write_report(output, &dvmm_vmm::profile::format_report(&title, &rows))
    {
        Ok(()) => tracing::info!(path = %output.display(), "guest profile of the cluster written"),
        Err(e) => tracing::error!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{local_cluster, split};
    use crate::{ProfileArgs, RunArgs};

    #[test]
    fn a_local_cluster_gets_distinct_ports_and_a_valid_shape() {
        let args = RunArgs {
            kernel: std::env::current_exe().unwrap(),
            initramfs: None,
            cmdline: String::new(),
            cpus: 64,
            memory: 1 << 30,
            nodes: 64,
            insecure_transport: false,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            test_devices: false,
            hide_cpuid: Default::default(),
            console: crate::ConsoleArg(None),
            profile: ProfileArgs {
                profile: None,
                profile_interval: 2,
                system_map: None,
            },
            ops: Default::default(),
        };
        let c = local_cluster(&args).unwrap();
        let mut ports: Vec<u16> = c.nodes.iter().map(|n| n.address.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 64, "a port was handed out twice");
        assert_eq!(c.vcpus(), 64);
        assert_eq!(c.memory(), 1 << 30);
    }

    #[test]
    fn splits_memory_in_aligned_blocks() {
        assert_eq!(split(256 << 20, 2, 2 << 20), vec![128 << 20, 128 << 20]);
        assert_eq!(
            split(10 << 20, 4, 2 << 20),
            vec![2 << 20, 2 << 20, 2 << 20, 4 << 20]
        );
    }
}
