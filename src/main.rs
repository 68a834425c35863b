//! `dvmm`: the command line.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dvmm_vmm::{Vm, VmConfig, VmControl, VmOutcome};

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
    /// off, 2 when it resets, 3 when it panics, 1 on errors, 130 when interrupted.
    Run(RunArgs),
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
}

/// Parses sizes like `4096`, `256M`, `1G`, `512MiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use e.g. 256M or 2G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("'{s}' has an unknown unit; use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
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

/// Puts the terminal into raw mode (keeping Ctrl-C as a signal) and restores it on drop.
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
            t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
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

/// Blocks SIGINT and SIGTERM in every thread and turns them into a clean stop.
fn stop_on_signals(control: Arc<VmControl>) -> Result<()> {
    // SAFETY: plain signal-mask manipulation on a sigset_t we own, done before any other
    // thread exists so that all threads inherit the mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGINT/SIGTERM");
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on the blocked set built above.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r == 0 {
                tracing::info!(signal = sig, "stopping the VM");
                control.finish(VmOutcome::Stopped);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn run(args: RunArgs) -> Result<u8> {
    let cfg = VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        vcpus: args.cpus,
        memory: args.memory,
    };
    let out: Box<dyn Write + Send> = Box::new(ConsoleOut);
    let vm = Vm::build(&cfg, out)?;
    stop_on_signals(vm.control())?;
    let _raw = RawTerminal::enable();
    let input = vm.console_input();
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || !input.feed(&buf[..n]) {
                    break;
                }
            }
        })
        .context("cannot start the console input thread")?;
    let outcome = vm.run()?;
    let _ = std::io::stdout().flush();
    Ok(match outcome {
        VmOutcome::PowerOff => {
            tracing::info!("guest powered off");
            0
        }
        VmOutcome::Reset(why) => {
            eprintln!("dvmm: guest reset: {why}");
            2
        }
        VmOutcome::Panic => {
            eprintln!("dvmm: the guest reported a panic (pvpanic)");
            3
        }
        VmOutcome::Stopped => {
            eprintln!("dvmm: stopped");
            130
        }
        VmOutcome::Failed(why) => {
            eprintln!("dvmm: {why}");
            1
        }
    })
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
        Command::Run(args) => run(args),
    };
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
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
