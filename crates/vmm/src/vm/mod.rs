//! Builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! Threads: one per vCPU (runs the guest, handles its exits), one timer thread (LAPIC
//! timers and the PIT), and the caller's thread, which waits for the outcome and then
//! stops the others. Console input is fed by the caller through [`ConsoleInput`].

use dvmm_sync::MutexExt;
use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dvmm_boot::loader::{BootSpec, EntryKind};
use dvmm_boot::topology::Topology;
use dvmm_devices::bus::Bus;
use dvmm_devices::serial::Serial;
use dvmm_devices::sink::Sink;
use dvmm_devices::VmEventSink;
use dvmm_irq::clock::{Clock, MonotonicClock, TscMap};
use dvmm_irq::ioapic::IoApic;
use dvmm_irq::lapic::Lapic;
use dvmm_irq::pit::Pit;
use dvmm_layout as layout;
use dvmm_layout::cpu_features::{CpuFeatures, CpuModel};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::control::{VmControl, VmOutcome};
use crate::cpuid;
use crate::device_space::{DeviceSpace, RemoteIo};
use crate::host::HostKvm;
use crate::irqchip::timers::TimerService;
use crate::irqchip::{InterruptHub, VcpuHandle};
use crate::memory::GuestRam;
use crate::syscall_completion::SyscallCompletion;
use crate::vcpu::{self, VcpuEnv};
use crate::VmmError;

mod config;
mod devices;
mod host_setup;
mod service_threads;

use devices::{add, attach_devices};
use dvmm_hypervisor::kvm::KvmVcpu;
use host_setup::{align_clocks, host_syscall, route_msrs_to_userspace};
use service_threads::{
    quiet_note_every, spawn_sampler, spawn_stall_watch, ConsoleWatch, Profiling, WatchedConsole,
};

pub use config::{
    ClockAlign, DiskConfig, HostTsc, NetConfig, Placement, VmConfig, DEFAULT_TIMER_PACING,
};

/// Feeds console input to the guest's serial port.
#[derive(Clone)]
pub struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
    control: Arc<VmControl>,
}

impl ConsoleInput {
    /// Queues all of `bytes`, waiting for FIFO room as the guest drains it. Returns
    /// false if the VM stopped first.
    pub fn feed(&self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.control.stopping() {
                return false;
            }
            let n = self.serial.locked().enqueue_input(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        true
    }
}

/// A VM ready to run.
pub struct Vm {
    // `vcpus` and `vm` before `ram`: KVM's memory slots point into it.
    vcpus: Vec<VcpuFd>,
    /// Shared only with `LiveVm`s, which hold it weakly (the VM's clock).
    vm: Arc<VmFd>,
    handles: Vec<Arc<VcpuHandle>>,
    env: Arc<VcpuEnv>,
    pit: Arc<Mutex<Pit>>,
    boot: Option<dvmm_boot::cpu::CpuBootState>,
    console: Option<ConsoleInput>,
    /// When the guest last wrote to the console (only the node with the devices).
    console_watch: Option<Arc<ConsoleWatch>>,
    ram: Arc<GuestRam>,
    profiling: Option<Profiling>,
    /// The virtio transports this node serves (for their end-of-run lines).
    virtio: Vec<devices::SharedVirtio>,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// A VM built up to the point where it needs its path to guest memory: KVM's VM and
/// vCPUs, the loaded guest, the interrupt hub, and the buses with what needs no memory
/// access. [`Parts::assemble`] adds the devices and the vCPUs' environment.
struct Parts {
    // `vcpus` and `vm` before `ram`: KVM's memory slots point into it.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    handles: Vec<Arc<VcpuHandle>>,
    hub: Arc<InterruptHub>,
    timers: Arc<TimerService>,
    control: Arc<VmControl>,
    events: Arc<dyn VmEventSink>,
    pit: Arc<Mutex<Pit>>,
    pio: Bus,
    mmio: Bus,
    console_out: Box<dyn Write + Send>,
    has_devices: bool,
    node: usize,
    /// Where unclaimed accesses go (nodes other than node 0).
    remote_io: Option<Arc<dyn RemoteIo>>,
    /// The other nodes, for node 0's stand-ins of PCI functions served elsewhere.
    link: Option<Arc<dyn RemoteIo>>,
    ram: Arc<GuestRam>,
    clock: Arc<dyn Clock>,
    syscalls: Arc<SyscallCompletion>,
    profiling: Option<Profiling>,
    emulated_kernel: bool,
    virtio: Vec<devices::VirtioSlot>,
    gate: Arc<crate::run_gate::RunGate>,
    boot: Option<dvmm_boot::cpu::CpuBootState>,
}

impl Parts {
    /// The runnable VM, whose devices and vCPUs reach guest memory through `guest`.
    fn assemble(self, guest: Arc<dyn crate::guest_access::GuestAccess>) -> Result<Vm, VmmError> {
        let Parts {
            vcpus,
            vm,
            handles,
            hub,
            timers,
            control,
            events,
            pit,
            mut pio,
            mut mmio,
            console_out,
            has_devices,
            node,
            remote_io,
            link,
            ram,
            clock,
            syscalls,
            profiling,
            emulated_kernel,
            virtio,
            gate,
            boot,
        } = self;
        let mut console_watch = None;
        let (mut pci, virtio) = if has_devices || virtio.iter().any(devices::VirtioSlot::here) {
            let (bus, served) = devices::pci_bus(node, &hub, guest.clone(), link.as_ref(), virtio)?;
            (Some(bus), served)
        } else {
            (None, Vec::new())
        };
        let console = if has_devices {
            let watch = Arc::new(ConsoleWatch {
                started: Instant::now(),
                last_ms: AtomicU64::new(0),
            });
            console_watch = Some(watch.clone());
            let serial = attach_devices(
                &mut pio,
                &mut mmio,
                &hub,
                &pit,
                &clock,
                &timers,
                events,
                Box::new(WatchedConsole {
                    out: console_out,
                    watch,
                }),
                guest.clone(),
                pci.take().unwrap_or_default(),
            )?;
            Some(ConsoleInput {
                serial,
                control: control.clone(),
            })
        } else {
            None
        };
        let env = Arc::new(VcpuEnv {
            hub,
            // The node with the devices answers what none of them claims itself (as a
            // single node does); only the others forward.
            devices: DeviceSpace::new(pio, mmio, pci.map(Arc::new), remote_io),
            ram: ram.clone(),
            guest,
            clock,
            control,
            syscalls,
            sampler: profiling.as_ref().map(|p| p.sampler.clone()),
            emulated_kernel,
            gate,
        });
        Ok(Vm {
            vcpus,
            vm: Arc::new(vm),
            handles,
            env,
            pit,
            boot,
            console,
            console_watch,
            ram,
            profiling,
            virtio,
        })
    }
}

/// A cluster node's VM before its guest memory is shared: it gives what the DSM needs
/// (RAM, the shadow page tables, the kick hooks) but cannot run, and has no devices yet.
/// [`UnsharedVm::share`] builds the devices and the vCPUs' environment on the DSM's
/// access path and makes it a [`Vm`]: no device or vCPU of a cluster node exists
/// before the DSM does, and none ever holds another path to guest memory.
pub struct UnsharedVm(Parts);

impl UnsharedVm {
    /// Guest RAM.
    pub fn ram(&self) -> Arc<GuestRam> {
        self.0.ram.clone()
    }

    /// The VM's end state.
    pub fn control(&self) -> Arc<VmControl> {
        self.0.control.clone()
    }

    /// Has every kick of this VM's vCPUs ask `deferral` before it signals.
    pub fn defer_kicks(&self, deferral: crate::kick::KickDeferral) {
        for h in &self.0.handles {
            h.kicker.set_deferral(deferral.clone());
        }
    }

    /// Sends the kick signal to the vCPU thread with kernel id `tid` (completing a kick
    /// whose signal was held back, see [`UnsharedVm::defer_kicks`]).
    pub fn signal_kick_fn(&self) -> impl Fn(i32) + Send + Sync + 'static {
        let handles = self.0.handles.clone();
        move |tid| {
            for h in handles.iter().filter(|h| h.kicker.thread_id() == tid) {
                h.kicker.signal();
            }
        }
    }

    /// Builds the devices and the vCPUs' environment with `dsm` as the VMM's own path to
    /// guest memory (devices' DMA, emulation): the VM may run.
    pub fn share(self, dsm: Arc<dyn crate::guest_access::GuestAccess>) -> Result<Vm, VmmError> {
        self.0.assemble(dsm)
    }

    /// On hosts whose KVM shadows guest page tables: what keeps those shadows correct
    /// when the DSM takes page tables away from this node (see [`crate::shadow_mmu`]).
    pub fn shadow_page_tables(
        &self,
    ) -> Result<Option<crate::shadow_mmu::ShadowPageTables>, VmmError> {
        if !HostKvm::detect().shadow_paging {
            return Ok(None);
        }
        use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
        // SAFETY: the VM fd is open for as long as `self`, beyond this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.0.vm.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(VmmError::DuplicateVmFd)?;
        let kvm = Kvm::new().map_err(|source| VmmError::KvmUnavailable { source })?;
        // SAFETY: `fd` is a fresh duplicate of this VM's fd, handed over to the new VmFd
        // and used by nothing else.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(fd.into_raw_fd()) }
            .map_err(kvm_err("duplicating the VM fd"))?;
        let phys_end = (4u64 << 30).max(dvmm_layout::ram_offset_to_gpa(self.0.ram.size()));
        crate::shadow_mmu::ShadowPageTables::new(
            vm,
            phys_end,
            self.0.handles.clone(),
            self.0.gate.clone(),
        )
        .map(Some)
        .map_err(VmmError::ShadowPageTables)
    }
}

impl Vm {
    /// Creates a single-node VM: memory, vCPUs, devices, and the loaded guest.
    pub fn build(cfg: &VmConfig, console_out: Box<dyn Write + Send>) -> Result<Vm, VmmError> {
        let parts = Vm::build_parts(cfg, None, console_out)?;
        let local = Arc::new(crate::guest_access::LocalAccess(parts.ram.clone()));
        parts.assemble(local)
    }

    /// The CPU this host offers a guest (see [`cpuid::offer`]): what a node tells its
    /// peers when it joins a cluster.
    pub fn offered_cpu(hide: &CpuFeatures) -> Result<CpuModel, VmmError> {
        let kvm = Kvm::new().map_err(|source| VmmError::KvmUnavailable { source })?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("reading supported CPUID"))?;
        Ok(cpuid::offer(
            supported.as_slice(),
            HostKvm::detect().emulates_guest_kernel(),
            hide,
        ))
    }

    /// This host's TSC as KVM gives it to a guest: its frequency (a throwaway vCPU) and
    /// whether guest code sees the TSC offsets dvmm sets (a probe VM).
    pub fn host_tsc() -> Result<HostTsc, VmmError> {
        let kvm = Kvm::new().map_err(|source| VmmError::KvmUnavailable { source })?;
        let vm = kvm.create_vm().map_err(kvm_err("creating a VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("creating a vCPU"))?;
        let khz = vcpu
            .get_tsc_khz()
            .map_err(kvm_err("reading the TSC frequency"))?;
        let offsets_apply = match crate::syscall_completion::probe::tsc_offset_applies() {
            Ok(a) => a,
            Err(e) => {
                // A PVM host lets guest code read the host's TSC; hardware KVM does not.
                let a = !HostKvm::detect().emulates_guest_kernel();
                tracing::warn!(error = %e, "the TSC probe failed; assuming guest code {} TSC offsets", if a { "sees" } else { "does not see" });
                a
            }
        };
        Ok(HostTsc { khz, offsets_apply })
    }

    /// Creates node `placement.node`'s part of a cluster VM: only its own vCPUs, and
    /// only node 0 gets the devices and starts the boot vCPU. (Every node loads the guest
    /// image the same way, so their RAM starts identical.) It cannot run until its
    /// memory is shared ([`UnsharedVm::share`]).
    pub fn build_node(
        cfg: &VmConfig,
        placement: Placement,
        console_out: Box<dyn Write + Send>,
    ) -> Result<UnsharedVm, VmmError> {
        Vm::build_parts(cfg, Some(placement), console_out).map(UnsharedVm)
    }

    fn build_parts(
        cfg: &VmConfig,
        placement: Option<Placement>,
        console_out: Box<dyn Write + Send>,
    ) -> Result<Parts, VmmError> {
        let topology = match &placement {
            Some(p) => Topology::from_nodes(&p.shares)?,
            None => Topology::uniform(cfg.vcpus, cfg.memory, 1)?,
        };
        let node = placement.as_ref().map_or(0, |p| p.node);
        let local = topology
            .nodes
            .get(node)
            .map(|n| n.vcpus.clone())
            .ok_or(VmmError::NoSuchNode { node })?;
        let total_vcpus = topology.vcpus;
        // Read the symbols first: a bad --system-map should fail before the guest runs.
        let profiling = match &cfg.profile {
            Some(p) => Some(Profiling {
                symbols: p
                    .system_map
                    .as_deref()
                    .map(crate::profile::SymbolTable::load)
                    .transpose()?,
                sampler: Arc::new(crate::profile::Sampler::new(p.interval)),
                title: format!(
                    "dvmm guest profile: node {node}, vCPUs {}..{}, a sample every {:?} per vCPU",
                    local.start,
                    local.end.saturating_sub(1),
                    p.interval
                ),
                config: p.clone(),
            }),
            None => None,
        };
        // Devices next: a missing, unwritable or busy image, a missing TAP or a taken
        // socket path fails before the guest runs.
        let virtio = devices::open_virtio(cfg, node)?;
        let host = HostKvm::detect();
        if host.emulates_guest_kernel() {
            tracing::info!(
                "this host's KVM has no VT-x/AMD-V (software PVM): guest kernel code is emulated; \
                 hiding CX16/XSAVE/AVX from the guest and unpacking bzImage kernels in dvmm"
            );
        }
        let kvm = Kvm::new().map_err(|source| VmmError::KvmUnavailable { source })?;
        let ram = Arc::new(GuestRam::new(topology.memory)?);
        let vm = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
        // Intel VT-x needs three pages for the real-mode TSS; put them in the MMIO hole.
        let _ = vm.set_tss_address(0xfffb_d000);
        for (slot, (range, host_addr)) in ram.kvm_slots().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: range.start,
                memory_size: range.len,
                userspace_addr: host_addr,
                flags: 0,
            };
            // SAFETY: the region lies in view A of `ram`, which outlives the VM (see the
            // field order of `Vm`; `ram` is also held by the vCPU environment).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("registering guest RAM"))?;
        }
        let syscalls = Arc::new(SyscallCompletion::new(host_syscall()));
        route_msrs_to_userspace(&vm, syscalls.active())?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("reading supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(local.len());
        for i in local.clone() {
            vcpus.push(
                vm.create_vcpu(u64::from(i))
                    .map_err(kvm_err("creating a vCPU"))?,
            );
        }
        align_clocks(&vm, &vcpus, cfg.clock)?;
        let offered = cpuid::offer(
            supported.as_slice(),
            host.emulates_guest_kernel(),
            &cfg.hide_cpu,
        );
        let shown = match cfg.cpu {
            Some(agreed) => {
                let extra = agreed.features.minus(&offered.features);
                if agreed.vendor != offered.vendor || !extra.is_empty() {
                    return Err(VmmError::CpuNotOffered(format!(
                        "agreed: {agreed} with {}; this host: {offered}",
                        extra.names().join(", ")
                    )));
                }
                agreed
            }
            None => offered,
        };
        let tsc_khz = vcpus[0]
            .get_tsc_khz()
            .map_err(kvm_err("reading the TSC frequency"))?;
        let mut phys_addr_bits = cpuid::DEFAULT_PHYS_ADDR_BITS;
        for (i, v) in local.clone().zip(&vcpus) {
            let mut entries = cpuid::vcpu_cpuid(
                supported.as_slice(),
                i,
                total_vcpus,
                tsc_khz,
                host.emulates_guest_kernel(),
            );
            cpuid::restrict_to(&mut entries, &shown);
            phys_addr_bits = cpuid::phys_addr_bits(&entries);
            let table = cpuid::to_kvm(&entries).map_err(VmmError::CpuidTable)?;
            v.set_cpuid2(&table).map_err(kvm_err("setting CPUID"))?;
        }

        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock);
        let now = clock.now_ns();
        let tsc = TscMap {
            tsc_khz: u64::from(tsc_khz),
            base_ns: now,
            ref_tsc: dvmm_hypervisor::kvm::guest_tsc(&vcpus[0]).unwrap_or(0),
        };

        let cmdline = match dvmm_boot::identify::kernel_os(&cfg.kernel) {
            dvmm_boot::identify::KernelOs::Linux => {
                let (c, added) =
                    crate::cmdline::for_linux(&cfg.cmdline, host.emulates_guest_kernel());
                for a in added {
                    tracing::info!(
                        "adding '{}' to the kernel command line: {}",
                        a.option,
                        a.reason
                    );
                }
                c
            }
            dvmm_boot::identify::KernelOs::Other => cfg.cmdline.clone(),
        };
        let spec = BootSpec {
            kernel: &cfg.kernel,
            initramfs: cfg.initramfs.as_deref(),
            cmdline: &cmdline,
            topology: &topology,
            // The kernel's own decompressor would run emulated here: unpack it natively.
            extract_payload: host.emulates_guest_kernel(),
        };
        let loaded = dvmm_boot::loader::load(ram.memory(), &spec)?;
        tracing::info!(
            entry = match loaded.entry {
                EntryKind::LinuxBzImage64 => "Linux 64-bit boot protocol",
                EntryKind::Pvh => "PVH",
                EntryKind::Multiboot => "Multiboot",
            },
            rip = format_args!("{:#x}", loaded.cpu.rip),
            "kernel loaded"
        );

        let pacing = cfg.timer_pacing.unwrap_or(if host.emulates_guest_kernel() {
            DEFAULT_TIMER_PACING
        } else {
            0
        });
        if pacing != 0 {
            tracing::info!(
                "pacing timer interrupts: a vCPU's next timer interrupt comes no sooner than \
                 {pacing}x the time its guest took to handle the last one (at most {} ms), \
                 as guest kernel code is slow here (DVMM_TIMER_PACING=0 turns this off)",
                dvmm_irq::lapic::MAX_TIMER_PACING_GAP_NS / 1_000_000
            );
        }
        let handles: Vec<Arc<VcpuHandle>> = local
            .clone()
            .map(|i| {
                let mut lapic = Lapic::new(i, i == 0, tsc);
                lapic.set_timer_pacing(pacing);
                lapic.set_phys_addr_bits(phys_addr_bits);
                Arc::new(VcpuHandle::new(i, lapic))
            })
            .collect();
        let timers = Arc::new(TimerService::new());
        let has_devices = node == 0;
        let hub = Arc::new(InterruptHub::new(
            handles.clone(),
            local.start,
            total_vcpus,
            has_devices.then(|| IoApic::new(layout::IOAPIC_ID)),
            timers.clone(),
            placement.as_ref().map(|p| p.remote_irq.clone()),
        ));
        let control = placement
            .as_ref()
            .map_or_else(|| Arc::new(VmControl::new()), |p| p.control.clone());
        let events: Arc<dyn VmEventSink> = control.clone();
        let pit = Arc::new(Mutex::new(Pit::new(now)));

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        // Port 0x80 is only a delay: every node answers it locally.
        add(&mut pio, Sink, u64::from(layout::POST_PORT), 1)?;
        if has_devices && cfg.test_devices {
            devices::attach_test_devices(&mut pio, &mut mmio, &hub, events.clone(), &topology)?;
            tracing::info!(
                "test devices on: fw_cfg at 0x510, isa-debug-exit at 0xf4, pc-testdev at 0xe0, \
                 0x2000 and 0xff000000"
            );
        }
        Ok(Parts {
            vcpus,
            vm,
            handles,
            hub,
            timers,
            control,
            events,
            pit,
            pio,
            mmio,
            console_out,
            has_devices,
            node,
            remote_io: placement
                .as_ref()
                .filter(|_| !has_devices)
                .map(|p| p.remote_io.clone()),
            link: placement.as_ref().map(|p| p.remote_io.clone()),
            ram,
            clock,
            syscalls,
            profiling,
            emulated_kernel: host.emulates_guest_kernel(),
            virtio,
            gate: Arc::new(crate::run_gate::RunGate::default()),
            boot: local.contains(&0).then_some(loaded.cpu),
        })
    }

    /// The VM's end-state, e.g. to stop it from a signal handler thread.
    pub fn control(&self) -> Arc<VmControl> {
        self.env.control.clone()
    }

    /// A handle for the control API: counters, pause, resume, stop.
    pub fn live(&self) -> crate::live::LiveVm {
        crate::live::LiveVm::new(
            self.env.control.clone(),
            self.handles.clone(),
            Arc::downgrade(&self.vm),
        )
    }

    /// The interrupt hub (for the node runtime's dispatcher).
    pub fn hub(&self) -> Arc<InterruptHub> {
        self.env.hub.clone()
    }

    /// This node's devices (handles sharing the device maps), for serving accesses
    /// forwarded from other nodes.
    pub fn devices(&self) -> DeviceSpace {
        self.env.devices.clone()
    }

    /// Guest RAM.
    pub fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    /// A handle to type into the guest's console.
    pub fn console_input(&self) -> Option<ConsoleInput> {
        self.console.clone()
    }

    /// Adds what the guest's console said last to how it ended: the kernel's panic line
    /// for a panic, and a reset right after Linux's panic banner is reported as the panic
    /// it was (`panic=-1`, see [`crate::cmdline`]).
    fn explain(&self, outcome: VmOutcome) -> VmOutcome {
        let Some(console) = &self.console else {
            return outcome;
        };
        let tail = console.serial.locked().tail();
        let lines = tail.last_lines(40);
        let panic_line = lines
            .iter()
            .rev()
            .find(|l| l.contains("Kernel panic - not syncing"))
            .cloned();
        match outcome {
            VmOutcome::Panic(l) if l.is_empty() => VmOutcome::Panic(
                panic_line
                    .or_else(|| {
                        lines
                            .iter()
                            .rev()
                            .find(|l| l.to_ascii_lowercase().contains("panic"))
                            .cloned()
                    })
                    .unwrap_or_default(),
            ),
            VmOutcome::Reset(why) => match panic_line {
                Some(p) => VmOutcome::Panic(p),
                None => VmOutcome::Reset(why),
            },
            other => other,
        }
    }

    /// Waits for the outcome; while the guest prints nothing for a long time, says every
    /// so often what its vCPUs do (a boot of emulated kernel code can be silent for
    /// minutes, and a silent hang should not look like one).
    fn wait_noting_silence(&self) -> VmOutcome {
        let Some(watch) = &self.console_watch else {
            return self.env.control.wait();
        };
        use crate::irqchip::Activity;
        let every = quiet_note_every();
        let mut noted = Duration::ZERO;
        loop {
            if let Some(o) = self.env.control.wait_timeout(Duration::from_secs(1)) {
                return o;
            }
            let quiet = watch.quiet_for();
            if quiet < noted {
                noted = Duration::ZERO; // it printed since
            }
            if quiet >= noted + every {
                noted = quiet;
                let mut counts = [0usize; 4];
                for h in &self.handles {
                    counts[h.activity() as usize] += 1;
                }
                tracing::info!(
                    "the guest has printed nothing for {} s; this node's vCPUs: {} running, \
                     {} halted, {} waiting for SIPI, {} in a device access on node 0{}",
                    quiet.as_secs(),
                    counts[Activity::Running as usize],
                    counts[Activity::Halted as usize],
                    counts[Activity::WaitingForSipi as usize],
                    counts[Activity::RemoteIo as usize],
                    if self.env.emulated_kernel {
                        " (guest kernel code is emulated on this host: a boot takes minutes)"
                    } else {
                        ""
                    }
                );
            }
        }
    }

    /// Runs the guest until it powers off, resets, panics, fails or is stopped.
    pub fn run(mut self) -> Result<VmOutcome, VmmError> {
        crate::kick::install_handler();
        let timers = self.env.hub.timers().clone();
        let timer_thread = {
            let hub = self.env.hub.clone();
            let pit = self.pit.clone();
            let clock = self.env.clock.clone();
            let timers = timers.clone();
            std::thread::Builder::new()
                .name("timers".into())
                .spawn(move || timers.run(&*hub, &pit, clock.as_ref()))
                .map_err(VmmError::Thread)?
        };
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for (i, fd) in self.vcpus.drain(..).enumerate() {
            let handle = self.handles[i].clone();
            let env = self.env.clone();
            let boot = if i == 0 { self.boot } else { None };
            match std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run(KvmVcpu::new(fd), handle, env, boot))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.env.control.finish(VmOutcome::Failed(format!(
                        "cannot start vCPU thread {i}: {e}"
                    )));
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        let stall_thread = if self.env.emulated_kernel {
            Some(spawn_stall_watch(
                self.handles.clone(),
                self.env.control.clone(),
            )?)
        } else {
            None
        };
        let sampler_thread = match &self.profiling {
            Some(p) => Some(spawn_sampler(
                p.sampler.clone(),
                self.handles.clone(),
                self.env.control.clone(),
            )?),
            None => None,
        };
        let outcome = self.explain(self.wait_noting_silence());
        for h in &self.handles {
            // Taking the LAPIC lock orders this wake-up after any check the vCPU made.
            drop(h.lock());
            h.notify();
        }
        for t in threads {
            let _ = t.join();
        }
        timers.stop();
        let _ = timer_thread.join();
        if let Some(t) = sampler_thread {
            let _ = t.join();
        }
        if let Some(t) = stall_thread {
            let _ = t.join();
        }
        if let Some(p) = &self.profiling {
            p.write()?;
        }
        if let Some(line) = self.env.syscalls.summary() {
            tracing::info!("{line}");
        }
        for device in &self.virtio {
            if let Some(line) = device.locked().summary() {
                tracing::info!("{line}");
            }
        }
        if let Some(e) = spawn_error {
            return Err(VmmError::Thread(e));
        }
        Ok(outcome)
    }
}
