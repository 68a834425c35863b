//! The VM's helper threads and what they watch: the console's last output, the guest
//! profiler's sampler, and the stall watch of emulated-kernel hosts.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control::VmControl;
use crate::irqchip::VcpuHandle;
use crate::VmmError;

/// When the guest last printed something on its console.
pub(super) struct ConsoleWatch {
    pub(super) started: Instant,
    pub(super) last_ms: AtomicU64,
}

impl ConsoleWatch {
    pub(super) fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// The console output, noting when the guest last wrote to it.
pub(super) struct WatchedConsole {
    pub(super) out: Box<dyn Write + Send>,
    pub(super) watch: Arc<ConsoleWatch>,
}

impl Write for WatchedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let ms = u64::try_from(self.watch.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.watch.last_ms.store(ms, Ordering::Relaxed);
        self.out.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// How long the guest may print nothing before dvmm says what its vCPUs are doing
/// (and again each time as long again passes); `DVMM_QUIET_NOTE_SECS` changes it.
pub(super) fn quiet_note_every() -> Duration {
    std::env::var("DVMM_QUIET_NOTE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s: &u64| s > 0)
        .map_or(Duration::from_secs(30), Duration::from_secs)
}

/// A profiled run: where the report goes and how to name what it found.
pub(super) struct Profiling {
    pub(super) config: crate::profile::ProfileConfig,
    pub(super) symbols: Option<crate::profile::SymbolTable>,
    pub(super) sampler: Arc<crate::profile::Sampler>,
    pub(super) title: String,
}

impl Profiling {
    pub(super) fn write(&self) -> Result<(), VmmError> {
        let (profile, lstar) = self.sampler.result();
        let slide = crate::profile::kaslr_slide(self.symbols.as_ref(), lstar);
        let rows = profile.by_name(self.symbols.as_ref(), slide);
        let mut title = self.title.clone();
        if slide != 0 {
            title.push_str(&format!(" (KASLR slide {slide:#x})"));
        }
        crate::profile::write_report(
            &self.config.output,
            &crate::profile::format_report(&title, &rows),
        )?;
        tracing::info!(
            path = %self.config.output.display(),
            samples = profile.total(),
            "guest profile written"
        );
        Ok(())
    }
}

/// The profiler's sampler thread: every interval, a running vCPU is asked for its RIP;
/// one that is halted or waiting is counted as such without being disturbed.
pub(super) fn spawn_sampler(
    sampler: Arc<crate::profile::Sampler>,
    handles: Vec<Arc<VcpuHandle>>,
    control: Arc<VmControl>,
) -> Result<JoinHandle<()>, VmmError> {
    use crate::irqchip::Activity;
    use crate::profile::Sample;
    std::thread::Builder::new()
        .name("profiler".into())
        .spawn(move || {
            let mut idle = crate::profile::Profile::default();
            while !control.stopping() {
                std::thread::sleep(sampler.interval);
                for h in &handles {
                    match h.activity() {
                        Activity::Running => h.request_sample(),
                        Activity::Halted => idle.add(Sample::Halted),
                        Activity::WaitingForSipi => idle.add(Sample::WaitingForSipi),
                        Activity::RemoteIo => idle.add(Sample::RemoteIo),
                    }
                }
            }
            sampler.collect(&idle);
        })
        .map_err(VmmError::Thread)
}

/// How long a running vCPU may stay inside `KVM_RUN` without an exit before the stall
/// watch kicks it (emulated-kernel hosts).
pub(super) const STALL_KICK: std::time::Duration = std::time::Duration::from_millis(20);

/// Where KVM emulates guest kernel code, some instructions (a `vmcall` at CPL0) are
/// retried inside `KVM_RUN` forever with no exit; only a kick brings the vCPU out,
/// where dvmm can complete them (`hypercall::StuckHypercall`). A guest with timer
/// ticks exits often enough by itself; this thread kicks a running vCPU that has not
/// exited for [`STALL_KICK`], so that one without (a test kernel in a `vmcall` loop)
/// does not hang.
pub(super) fn spawn_stall_watch(
    handles: Vec<Arc<VcpuHandle>>,
    control: Arc<VmControl>,
) -> Result<JoinHandle<()>, VmmError> {
    use crate::irqchip::Activity;
    std::thread::Builder::new()
        .name("stall-watch".into())
        .spawn(move || {
            let mut seen: Vec<u64> = handles.iter().map(|h| h.exits()).collect();
            while !control.stopping() {
                std::thread::sleep(STALL_KICK);
                for (h, last) in handles.iter().zip(seen.iter_mut()) {
                    let now = h.exits();
                    if now == *last && h.activity() == Activity::Running {
                        h.kicker.kick();
                    }
                    *last = now;
                }
            }
        })
        .map_err(VmmError::Thread)
}
