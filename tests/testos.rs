//! Boots the test guest (guests/testos) on dvmm and checks its verdict.
//!
//! testos fails (and dvmm exits non-zero) if any IPI, NMI, timer, IOAPIC-routed UART
//! interrupt, user-mode round trip or AP start-up misbehaves on any CPU.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::dvmm;

const LIMIT: Duration = Duration::from_secs(240);

/// One testos guest at a time. Its checks hand values between spinning vCPUs, so a
/// handoff waits until the host schedules the next vCPU: with two 4-vCPU guests side by
/// side on a 2-core host (cargo's parallel tests), litmus-iriw's 2000 handoffs took
/// 115 s instead of 8 s and tripped the guest's 120 s watchdog.
static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_guest_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn boot_testos(cpus: u32, extra_cmdline: &str) {
    let _alone = one_guest_at_a_time();
    let cpus_s = cpus.to_string();
    // Fewer ticket-lock rounds: with more vCPUs than host cores, a ticket lock hands
    // over only as fast as the host schedules the next waiter.
    let cmdline = format!("testos testos.iters.spinlock=2000 {extra_cmdline}");
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--cpus",
            &cpus_s,
            "--memory",
            "256M",
            "--cmdline",
            &cmdline,
        ],
        LIMIT,
    );
    let t = run.transcript();
    assert!(run.stdout.contains(dvmm_testos::PASS_LINE), "no PASS\n{t}");
    assert!(!run.stdout.contains("FAIL"), "a check failed\n{t}");
    assert_eq!(run.code, Some(0), "dvmm must exit 0 on power-off\n{t}");
    assert!(
        run.stdout.contains(&format!("cpus={cpus}")),
        "guest did not see {cpus} CPUs\n{t}"
    );
    // Every CPU passes every check, exactly once.
    for cpu in 0..cpus {
        for check in dvmm_testos::CHECKS {
            let line = format!("testos: cpu {cpu}: {check} ok");
            let n = run.stdout.lines().filter(|l| l.starts_with(&line)).count();
            assert_eq!(n, 1, "cpu {cpu}: '{check} ok' seen {n} times\n{t}");
        }
    }
}

#[test]
fn testos_1_vcpu() {
    boot_testos(1, "");
}

#[test]
fn testos_2_vcpus() {
    boot_testos(2, "");
}

#[test]
fn testos_4_vcpus() {
    boot_testos(4, "");
}

#[test]
fn testos_4_vcpus_xapic_mmio() {
    boot_testos(4, "xapic");
}

/// The watchdog judges progress, not the run's length: with 4 vCPUs on the host's
/// cores, 4,000 litmus-iriw writes take longer than a 6 s watchdog (the run ~20 s), yet
/// every wait ends well within it, so the run passes.
#[test]
fn watchdog_judges_progress_not_length() {
    boot_testos(4, "testos.watchdog=6 testos.iters.litmus-iriw=4000");
}

#[test]
fn testos_failure_is_a_nonzero_exit() {
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--cmdline",
            &format!("testos {}", dvmm_testos::CMDLINE_FAIL),
        ],
        LIMIT,
    );
    let t = run.transcript();
    assert!(run.stdout.contains(dvmm_testos::FAIL_PREFIX), "{t}");
    assert!(!run.stdout.contains(dvmm_testos::PASS_LINE), "{t}");
    assert_eq!(
        run.code,
        Some(3),
        "a guest failure reported by pvpanic exits 3\n{t}"
    );
}

/// Ctrl-C (SIGINT) and SIGTERM stop a running VM cleanly: exit 130, every thread ends,
/// the terminal is left alone, no panic.
#[test]
fn signals_stop_the_vm_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::time::Instant;

    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut child = common::spawn_idle(&["--cpus", "2"]);
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let line = lines
                .next()
                .expect("guest output ended early")
                .expect("read");
            seen.push(line.clone());
            if line.starts_with(dvmm_testos::IDLE_LINE) {
                break;
            }
            assert!(start.elapsed() < LIMIT, "no idle line: {seen:?}");
        }
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        let stopped = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(5),
                "dvmm did not stop within 5 s of signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert_eq!(status.code(), Some(130), "signal {signal}\n{stderr}");
        assert!(stderr.contains("stopped"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A guest that prints nothing for a while gets a progress line on stderr saying what
/// its vCPUs do (here: testos idles with every vCPU halted after PASS).
#[test]
fn a_silent_guest_gets_a_progress_line() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let _alone = one_guest_at_a_time();
    let cmdline = format!("testos {}", dvmm_testos::CMDLINE_IDLE);
    let mut child = Command::new(common::dvmm_bin())
        .args(["run", "--kernel", dvmm_testos::TESTOS_ELF, "--cpus", "2"])
        .args(["--cmdline", &cmdline])
        .env("DVMM_QUIET_NOTE_SECS", "2")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dvmm");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let note = loop {
        match rx.recv_timeout(LIMIT) {
            Ok(l) if l.contains("the guest has printed nothing for") => break l,
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("no progress line within {LIMIT:?}: {seen:#?}");
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    // Counts of the 2 vCPUs by what they do (a timer tick may find one running).
    let counts: Vec<u32> = note
        .split("vCPUs:")
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 4, "{note}");
    assert_eq!(counts.iter().sum::<u32>(), 2, "{note}");
    assert!(note.contains("halted"), "{note}");
}
