//! `dvmm`: the command line.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dvmm_layout::cpu_features::CpuFeatures;
use dvmm_vmm::{Vm, VmConfig, VmControl, VmOutcome};

mod api_proxy;
mod cluster;
mod ctl;
mod top;

/// dvmm: a distributed virtual machine monitor.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest. The serial console is this terminal; exits 0 when the guest powers
    /// off, 2 when it resets, 3 when it panics, 1 on errors, 130 when interrupted. With
    /// `--nodes K`, starts K node processes on this machine that run the guest together.
    Run(RunArgs),
    /// Run one node of a multi-host cluster described by a cluster file.
    Node(NodeArgs),
    /// Ask a running VM's control API (its --api-socket) for its state or to act.
    Ctl(ctl::CtlArgs),
    /// A live view of a running VM (its --api-socket): exits, faults, links, hot pages.
    Top(top::TopArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kernel image: a Linux bzImage, or an ELF with a PVH entry note.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial RAM filesystem (cpio archive).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM, e.g. 256M, 2G (suffixes K, M, G, T; binary units).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Number of dvmm nodes (processes on this machine, talking over loopback TCP)
    /// that run the guest together: vCPUs and RAM are split between them in blocks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    /// Authenticate node-to-node traffic but do not encrypt it (trusted fabrics only).
    #[arg(long)]
    insecure_transport: bool,
    /// A disk image for the guest, as a virtio-blk device (repeatable; the guest sees
    /// them as /dev/vda, /dev/vdb, ... in this order). The image is locked while the VM
    /// runs.
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on][,node=N]", value_parser = parse_disk)]
    disks: Vec<dvmm_cluster::DiskSpec>,
    /// A network card for the guest, as a virtio-net device on an existing host TAP
    /// device (repeatable; default MACs 52:54:00:d7:00:NN, NN the card's index).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,node=N]", value_parser = parse_net)]
    nets: Vec<dvmm_cluster::NetSpec>,
    /// A virtio-rng device: the guest's hwrng, fed by the host's /dev/urandom.
    #[arg(long)]
    rng: bool,
    /// The devices test suites written for QEMU use (kvm-unit-tests): fw_cfg at
    /// 0x510, isa-debug-exit at 0xf4 (a write of V ends the run with exit status
    /// 2V+1), pc-testdev at 0xe0 and its IRQ lines at 0x2000. Not for ordinary guests.
    #[arg(long)]
    test_devices: bool,
    /// CPU features the guest must not see, by their /proc/cpuinfo names (e.g.
    /// `avx2,sse4_2`): a common baseline for hosts that differ. (Features some node
    /// lacks are hidden anyway.)
    #[arg(long, value_name = "FEATURE[,FEATURE...]", value_parser = parse_cpu_features, default_value = "")]
    hide_cpuid: CpuFeatures,
    /// A virtio-console, the guest's /dev/hvc0 (the serial console stays this
    /// terminal): its output appended to a file, or a Unix socket to connect to
    /// (e.g. `socat - UNIX-CONNECT:PATH`).
    #[arg(long, value_name = "off|file=PATH|socket=PATH", value_parser = parse_console, default_value = "off")]
    console: ConsoleArg,
    #[command(flatten)]
    profile: ProfileArgs,
    #[command(flatten)]
    ops: OpsArgs,
}

/// `--console`'s value: none, or where the virtio-console goes.
#[derive(Clone, Debug)]
struct ConsoleArg(Option<dvmm_cluster::ConsoleSpec>);

/// How a running VM is operated: its control API, metrics and end-of-run report.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OpsArgs {
    /// Serve the control API (HTTP over a Unix socket, docs/API.md) at PATH; the path
    /// must not exist; the socket is made readable by its owner only.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, or PORT alone for
    /// 127.0.0.1:PORT; with --nodes K, node i uses PORT+i).
    #[arg(long, value_name = "HOST:PORT", value_parser = dvmm_api::metrics::parse_addr)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// When the VM ends, write a summary to FILE (and its data to FILE.json): time
    /// waited on remote memory, the pages several nodes fault on, traffic per link,
    /// exits, the profile's top entries, suggestions.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

/// The guest profiler's options.
#[derive(clap::Args, Debug, Clone)]
pub struct ProfileArgs {
    /// Sample every vCPU's RIP and write a flat profile by symbol to FILE when the VM
    /// ends (with --nodes K: FILE for the whole guest, FILE.nodeI per node).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Milliseconds between two samples of one vCPU.
    #[arg(long, value_name = "MS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1000))]
    profile_interval: u64,
    /// The guest's symbols (a kernel's System.map, or `nm` of an ELF image), to name
    /// kernel addresses in the profile and pages in the report.
    #[arg(long, value_name = "FILE")]
    system_map: Option<PathBuf>,
}

impl ProfileArgs {
    fn config(&self) -> Option<dvmm_vmm::profile::ProfileConfig> {
        self.profile
            .as_ref()
            .map(|output| dvmm_vmm::profile::ProfileConfig {
                output: output.clone(),
                interval: std::time::Duration::from_millis(self.profile_interval),
                system_map: self.system_map.clone(),
            })
    }
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// The cluster file (TOML): nodes, their addresses, vCPUs and memory, the secret.
    #[arg(long)]
    cluster: PathBuf,
    /// This node's index in the cluster file (0 runs the devices and the boot vCPU).
    #[arg(long)]
    id: usize,
    #[command(flatten)]
    profile: ProfileArgs,
    #[command(flatten)]
    ops: OpsArgs,
}

/// Parses a `--hide-cpuid` list.
fn parse_cpu_features(s: &str) -> Result<CpuFeatures, String> {
    let names: Vec<&str> = s.split(',').filter(|n| !n.trim().is_empty()).collect();
    CpuFeatures::from_names(&names).map_err(|e| e.to_string())
}

/// Parses a `--disk` value.
fn parse_disk(s: &str) -> Result<dvmm_cluster::DiskSpec, String> {
    dvmm_cluster::DiskSpec::parse_option(s)
}

/// Parses a `--net` value.
fn parse_net(s: &str) -> Result<dvmm_cluster::NetSpec, String> {
    dvmm_cluster::NetSpec::parse_option(s)
}

/// Parses a `--console` value.
fn parse_console(s: &str) -> Result<ConsoleArg, String> {
    dvmm_cluster::ConsoleSpec::parse_option(s).map(ConsoleArg)
}

/// Parses sizes like `4096`, `256M`, `1G`, `512MiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    dvmm_cluster::config::parse_size(s)
}

/// Guest console output: straight to stdout, flushed at once (a prompt has no newline).
struct ConsoleOut;

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Puts the terminal into raw mode and restores it on drop. Ctrl-C, Ctrl-Z and Ctrl-\\
/// go to the guest (its shell's foreground program gets them); [`EscapeFilter`]'s
/// Ctrl-A x stops dvmm. (vmm-sys-util's `Terminal` does not fit: its raw mode leaves
/// IXON and ICRNL on, so Ctrl-S/Ctrl-Q and a bare CR never reach the guest, and its
/// canonical mode sets fixed flags instead of restoring the user's own settings.)
struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    fn enable() -> RawTerminal {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawTerminal { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawTerminal { saved: None };
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN | libc::ISIG);
            t.c_iflag &= !(libc::ICRNL | libc::IXON);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawTerminal { saved: Some(saved) }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restores the attributes read in `enable`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts
/// later; [`on_signals`] then consumes them. Must run before any thread is started.
fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: plain signal-mask manipulation on a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGINT/SIGTERM");
        }
        Ok(set)
    }
}

/// Calls `action` (on a thread of its own) for every blocked stop signal that arrives.
fn on_signals(set: libc::sigset_t, action: impl Fn(i32) + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on the blocked set built by `block_stop_signals`.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r == 0 {
                action(sig);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Wires the terminal to a running VM: signals stop it, stdin feeds its console.
fn attach_console(
    set: libc::sigset_t,
    input: Option<dvmm_vmm::ConsoleInput>,
    control: Arc<VmControl>,
) -> Result<Option<RawTerminal>> {
    let stop_control = control.clone();
    on_signals(set, move |sig| {
        tracing::info!(signal = sig, "stopping the VM");
        control.finish(VmOutcome::Stopped);
    })?;
    let Some(input) = input else {
        return Ok(None);
    };
    let raw = RawTerminal::enable();
    let interactive = raw.saved.is_some();
    if interactive {
        eprintln!(
            "dvmm: the console is this terminal; Ctrl-A x stops the VM, Ctrl-A Ctrl-A sends Ctrl-A"
        );
    }
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut escape = EscapeFilter::default();
            let mut stdin = std::io::stdin().lock();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let (bytes, stop) = if interactive {
                    escape.filter(&buf[..n])
                } else {
                    (buf[..n].to_vec(), false)
                };
                if stop {
                    tracing::info!("Ctrl-A x: stopping the VM");
                    stop_control.finish(VmOutcome::Stopped);
                    break;
                }
                if !input.feed(&bytes) {
                    break;
                }
            }
        })
        .context("cannot start the console input thread")?;
    Ok(Some(raw))
}

/// The console's escape: Ctrl-A x stops dvmm, Ctrl-A Ctrl-A is one Ctrl-A for the guest,
/// Ctrl-A and anything else passes both bytes on (as QEMU's `-serial stdio` does).
#[derive(Default)]
struct EscapeFilter {
    after_ctrl_a: bool,
}

impl EscapeFilter {
    const CTRL_A: u8 = 0x01;

    /// The bytes for the guest, and whether the user asked to stop.
    fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if std::mem::take(&mut self.after_ctrl_a) {
                match b {
                    b'x' | b'X' => return (out, true),
                    Self::CTRL_A => out.push(Self::CTRL_A),
                    other => out.extend_from_slice(&[Self::CTRL_A, other]),
                }
            } else if b == Self::CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

fn exit_code(outcome: VmOutcome) -> u8 {
    let _ = std::io::stdout().flush();
    match outcome {
        VmOutcome::PowerOff => {
            tracing::info!("guest powered off");
            0
        }
        VmOutcome::Reset(why) => {
            eprintln!("dvmm: guest reset: {why}");
            2
        }
        VmOutcome::Panic(line) => {
            if line.is_empty() {
                eprintln!("dvmm: the guest reported a panic (pvpanic)");
            } else {
                eprintln!("dvmm: the guest reported a panic (pvpanic): {line}");
            }
            3
        }
        VmOutcome::DebugExit(v) => {
            // QEMU's isa-debug-exit convention, which test runners expect.
            let status = (v.wrapping_shl(1) | 1) & 0xff;
            tracing::info!(
                value = v,
                status,
                "the guest ended the VM through isa-debug-exit"
            );
            u8::try_from(status).unwrap_or(1)
        }
        VmOutcome::Stopped => {
            eprintln!("dvmm: stopped");
            130
        }
        VmOutcome::Failed(why) => {
            eprintln!("dvmm: {why}");
            1
        }
    }
}

fn run(args: RunArgs, set: libc::sigset_t) -> Result<u8> {
    if args.nodes > 1 {
        return cluster::run_local_cluster(&args, set);
    }
    if let Some(d) = args.disks.iter().find(|d| d.node != 0) {
        bail!(
            "--disk {}: node={} but this VM has one node (node 0)",
            d.path.display(),
            d.node
        );
    }
    if let Some(n) = args.nets.iter().find(|n| n.node != 0) {
        bail!(
            "--net tap={}: node={} but this VM has one node (node 0)",
            n.tap,
            n.node
        );
    }
    // The socket first: a path in use fails before the guest is loaded.
    let api = args
        .ops
        .api_socket
        .as_deref()
        .map(dvmm_api::server::ApiListener::bind)
        .transpose()?;
    let cfg = VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        vcpus: args.cpus,
        memory: args.memory,
        profile: args.profile.config(),
        disks: dvmm_node::disks_config(&args.disks),
        nets: dvmm_node::nets_config(&args.nets),
        rng: args.rng,
        console: args.console.0.as_ref().map(dvmm_node::console_backend),
        test_devices: args.test_devices,
        hide_cpu: args.hide_cpuid,
        cpu: None,
        clock: Default::default(),
        timer_pacing: dvmm_node::timer_pacing_from_env()?,
    };
    let metrics = args
        .ops
        .metrics_addr
        .map(dvmm_api::metrics::MetricsListener::bind)
        .transpose()?;
    let vm = Vm::build(&cfg, Box::new(ConsoleOut))?;
    let view = std::sync::Arc::new(dvmm_node::view::NodeView::single(&cfg, &vm));
    let _metrics = metrics
        .map(|l| dvmm_node::api::serve_metrics(l, view.clone()))
        .transpose()?;
    let _api = api
        .map(|l| dvmm_node::api::serve_single(l, view.clone()))
        .transpose()?;
    let _raw = attach_console(set, vm.console_input(), vm.control())?;
    let started = std::time::Instant::now();
    let outcome = vm.run()?;
    if let Some(path) = &args.ops.report {
        let part = view.report(started.elapsed(), &outcome);
        dvmm_node::write_report(path, &[part], args.profile.system_map.as_deref());
    }
    Ok(exit_code(outcome))
}

fn node(args: NodeArgs, set: libc::sigset_t) -> Result<u8> {
    let cluster = dvmm_cluster::ClusterConfig::load(&args.cluster)?;
    let mut raw = None;
    let mut attach_err = None;
    let outcome = dvmm_node::run_node(
        &cluster,
        args.id,
        args.profile.config(),
        Box::new(ConsoleOut),
        &dvmm_node::Outputs {
            api_socket: args.ops.api_socket.clone(),
            metrics_addr: args.ops.metrics_addr,
            report: args.ops.report.clone(),
            symbols: args.profile.system_map.clone(),
        },
        |input, control| match attach_console(set, input, control) {
            Ok(r) => raw = r,
            Err(e) => attach_err = Some(e),
        },
    )?;
    drop(raw);
    if let Some(e) = attach_err {
        return Err(e);
    }
    Ok(exit_code(outcome))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        // A client: Ctrl-C ends it as usual.
        Command::Ctl(args) => ctl::run(args),
        Command::Top(args) => top::run(args),
        Command::Run(args) => block_stop_signals().and_then(|set| run(args, set)),
        Command::Node(args) => block_stop_signals().and_then(|set| node(args, set)),
    };
    // The process ends here without dropping its devices: the console socket it made
    // goes now.
    dvmm_virtio::console::remove_created_sockets();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Our error messages usually quote their cause already; add only what is new.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("dvmm: error: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EscapeFilter;

    #[test]
    fn ctrl_a_x_stops_and_everything_else_reaches_the_guest() {
        let mut f = EscapeFilter::default();
        assert_eq!(
            f.filter(b"ls\x03\r"),
            (b"ls\x03\r".to_vec(), false),
            "Ctrl-C is the guest's"
        );
        assert_eq!(f.filter(b"a\x01\x01b"), (b"a\x01b".to_vec(), false));
        assert_eq!(f.filter(b"\x01q"), (b"\x01q".to_vec(), false));
        // An escape split across two reads.
        assert_eq!(f.filter(b"echo\x01"), (b"echo".to_vec(), false));
        assert_eq!(f.filter(b"x"), (Vec::new(), true));
    }
}
