//! Helpers shared by the integration tests: run `dvmm` with a deadline.

#![allow(dead_code)]

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
    let mut child = Command::new(dvmm_bin())
        .args(args)
        .env("RUST_LOG", "info")
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

/// A host TAP device `dvmt<pid><tag>` with address 10.231.`subnet`.1/24 (the guest takes
/// .2), deleted on drop.
pub struct Tap {
    /// Its name.
    pub name: String,
    /// The host's address on it.
    pub host_ip: String,
    /// The address the guest should take.
    pub guest_ip: String,
}

impl Tap {
    /// Creates it (root; needs iproute2).
    pub fn new(tag: &str, subnet: u8) -> Tap {
        let name = format!("dvmt{}{tag}", std::process::id() % 100_000);
        let host_ip = format!("10.231.{subnet}.1");
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        Tap {
            name,
            host_ip,
            guest_ip: format!("10.231.{subnet}.2"),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
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
