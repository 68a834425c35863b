//! Helpers shared by the integration tests: run `dvmm` with a deadline.

#![allow(dead_code)]

pub mod faulty_link;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished `dvmm` run produced.
pub struct Run {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Guest console output.
    pub stdout: String,
    /// dvmm's own messages.
    pub stderr: String,
}

impl Run {
    /// Both streams, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Path of the dvmm binary under test.
pub fn dvmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dvmm")
}

/// Runs `dvmm` with `args`; kills it and panics if it runs longer than `limit`.
pub fn dvmm(args: &[&str], limit: Duration) -> Run {
    dvmm_env(args, &[], limit)
}

/// [`dvmm`] with extra environment variables.
pub fn dvmm_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let mut child = Command::new(dvmm_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dvmm");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_within(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    };
    assert!(
        status.is_some(),
        "dvmm {args:?} did not finish within {limit:?}\n{}",
        run.transcript()
    );
    run
}

/// Waits up to `limit` for `child` to end; `None` if it still runs (it is left running).
pub fn wait_within(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `dvmm run` on testos in idle mode (it halts after PASS instead of powering
/// off) with `args` added (e.g. `--cpus 2`, `--nodes 2`); stdout and stderr are piped.
pub fn spawn_idle(args: &[&str]) -> std::process::Child {
    let cmdline = format!("testos {}", dvmm_testos::CMDLINE_IDLE);
    Command::new(dvmm_bin())
        .args([
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--cmdline",
            &cmdline,
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dvmm")
}

/// A host TAP device `dvmt<pid><tag>` for a guest's card, bridged to a network
/// namespace of its own where the host's side lives at 10.231.`subnet`.1/24 (the guest
/// takes .2): the guest's traffic meets nothing of the host's own network. All of it is
/// deleted on drop.
pub struct Tap {
    /// The TAP's name (what `--net tap=` takes).
    pub name: String,
    /// The host side's address, in the namespace.
    pub host_ip: String,
    /// The address the guest should take.
    pub guest_ip: String,
    netns: String,
    bridge: String,
    veth: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Tap {
    /// Creates it (root; needs iproute2).
    pub fn new(tag: &str, subnet: u8) -> Tap {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let tap = Tap {
            name: format!("dvmt{id}"),
            host_ip: format!("10.231.{subnet}.1"),
            guest_ip: format!("10.231.{subnet}.2"),
            netns: format!("dvmm-{id}"),
            bridge: format!("dvmb{id}"),
            veth: format!("dvmv{id}"),
        };
        tap.remove();
        let peer = format!("dvmp{id}");
        let ns = tap.netns.as_str();
        ip(&["netns", "add", ns]);
        ip(&["tuntap", "add", "dev", &tap.name, "mode", "tap"]);
        ip(&["link", "add", &tap.bridge, "type", "bridge"]);
        ip(&[
            "link", "add", &tap.veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", ns]);
        for port in [&tap.name, &tap.veth] {
            ip(&["link", "set", port, "master", &tap.bridge]);
            ip(&["link", "set", port, "up"]);
        }
        ip(&["link", "set", &tap.bridge, "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", tap.host_ip),
            "dev",
            &peer,
        ]);
        ip(&["-n", ns, "link", "set", &peer, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        tap
    }

    /// A TCP listener on the host side's address (in the namespace; it stays there
    /// whichever thread uses it).
    pub fn listen(&self) -> std::net::TcpListener {
        use std::os::fd::AsRawFd;
        let ns = format!("/run/netns/{}", self.netns);
        let addr = self.host_ip.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("the namespace's file");
            // SAFETY: setns with a valid namespace fd moves only this short-lived
            // thread into the namespace; nothing else of the process changes.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind((addr.as_str(), 0)).expect("bind in the namespace")
        })
        .join()
        .expect("the listener's thread")
    }

    fn remove(&self) {
        for dev in [&self.name, &self.bridge, &self.veth] {
            let _ = Command::new("ip").args(["link", "del", dev]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Set once the VM has ended: host-side peers of a guest (TCP, console) stop waiting
/// then. Their clock cannot start when they are spawned: the boot may first wait its
/// turn behind other tests, and a guest that never connects must not hang anyone.
pub type Ended = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// Whether `flag` is set.
pub fn ended(flag: &Ended) -> bool {
    flag.load(std::sync::atomic::Ordering::SeqCst)
}

/// The next connection on `listener` (made non-blocking here), blocking with short
/// read and write time-outs so that its user can look at `vm_ended`; None once the VM
/// has ended without one.
pub fn accept_until(
    listener: &std::net::TcpListener,
    vm_ended: &Ended,
) -> Option<std::net::TcpStream> {
    listener.set_nonblocking(true).ok()?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok()?;
                s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
                s.set_write_timeout(Some(Duration::from_millis(200))).ok()?;
                return Some(s);
            }
            Err(_) if !ended(vm_ended) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
}

/// Writes all of `bytes` to a connection from [`accept_until`], riding out its write
/// time-outs (a guest whose TCP stack is emulated ACKs slowly: at 0.1 MiB/s a full
/// send buffer takes longer than one time-out to drain) until the VM has ended; false
/// if the connection failed or the VM ended first.
pub fn write_until(conn: &mut std::net::TcpStream, bytes: &[u8], vm_ended: &Ended) -> bool {
    use std::io::Write;
    let mut done = 0;
    while done < bytes.len() {
        match conn.write(&bytes[done..]) {
            Ok(0) => return false,
            Ok(n) => done += n,
            Err(e) if waiting(&e) && !ended(vm_ended) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Whether an I/O error is only the time-out that lets a peer look at its `Ended`.
pub fn waiting(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// Runs a guest-building script from the repository root; its stdout lines are paths.
pub fn script(args: &[&str]) -> Vec<PathBuf> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .args(args)
        .current_dir(root)
        .output()
        .expect("run a guest-building script");
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// Starts `dvmm node --cluster FILE --id ID` with piped output (read it with
/// [`read_all`] while it runs: a full pipe stalls the node).
pub fn spawn_node(cluster_file: &std::path::Path, id: &str) -> std::process::Child {
    Command::new(dvmm_bin())
        .args([
            "node",
            "--cluster",
            &cluster_file.to_string_lossy(),
            "--id",
            id,
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node")
}

/// Reads `r` to its end on a thread of its own; join it for the text.
pub fn read_all(r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut r = r;
        let _ = r.read_to_string(&mut s);
        s
    })
}
