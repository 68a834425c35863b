//! The run loop against a scripted vCPU ([`dvmm_hypervisor::fake`]): exit dispatch,
//! interrupt injection and the interrupt window, HLT wake-ups, INIT/SIPI, MSRs and the
//! hub's routing of IPIs, with no `/dev/kvm`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_devices::bus::{Bus, BusDevice};
use dvmm_hypervisor::fake::{Event, FakeLog, FakeVcpu, Step};
use dvmm_hypervisor::VmExit;
use dvmm_irq::clock::{FakeClock, TscMap};
use dvmm_irq::lapic::Lapic;
use dvmm_irq::msg::{DeliveryMode, InterruptMessage, TriggerMode};
use dvmm_layout::LAPIC_ADDR;

use super::*;
use crate::irqchip::timers::TimerService;
use crate::syscall_completion::{HostSyscall, SyscallCompletion};

/// Accesses as (offset, bytes, write).
type AccessLog = Arc<Mutex<Vec<(u64, Vec<u8>, bool)>>>;

/// Records every access and answers reads with 0x5a.
#[derive(Default)]
struct Recorder(AccessLog);

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
        self.0.lock().unwrap().push((offset, data.to_vec(), false));
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().push((offset, data.to_vec(), true));
    }
}

/// A VM of `n` vCPUs around the run loop: no KVM, a recorder at ports 0x80..0x84.
struct Rig {
    env: Arc<VcpuEnv>,
    handles: Vec<Arc<VcpuHandle>>,
    port_log: AccessLog,
}

const SVR: u64 = 0xf0;

fn rig(n: u32) -> Rig {
    rig_on(n, false)
}

/// A rig on a host whose KVM emulates guest kernel code (`emulated_kernel`).
fn rig_on(n: u32, emulated_kernel: bool) -> Rig {
    crate::kick::install_handler();
    let tsc = TscMap {
        tsc_khz: 1_000_000,
        base_ns: 0,
        ref_tsc: 0,
    };
    let handles: Vec<Arc<VcpuHandle>> = (0..n)
        .map(|i| {
            let mut lapic = Lapic::new(i, i == 0, tsc);
            // Software-enable the LAPIC, as every guest does first.
            lapic.mmio_write(SVR, 0x1ff, 0);
            Arc::new(VcpuHandle::new(i, lapic))
        })
        .collect();
    let hub = Arc::new(InterruptHub::new(
        handles.clone(),
        0,
        n,
        None,
        Arc::new(TimerService::new()),
        None,
    ));
    let recorder = Recorder::default();
    let port_log = recorder.0.clone();
    let mut pio = Bus::new();
    pio.insert(Arc::new(Mutex::new(recorder)), 0x80, 4).unwrap();
    let ram = Arc::new(GuestRam::new(dvmm_layout::MIN_MEMORY).unwrap());
    let env = Arc::new(VcpuEnv {
        hub,
        devices: DeviceSpace::new(pio, Bus::new(), None, None),
        guest: Arc::new(crate::guest_access::LocalAccess(ram.clone())),
        ram,
        clock: Arc::new(FakeClock::new(1_000)),
        control: Arc::new(VmControl::new()),
        syscalls: Arc::new(SyscallCompletion::new(HostSyscall {
            syscall_stays_at_cpl3: false,
            int_n_raises_ud: false,
        })),
        sampler: None,
        emulated_kernel,
        gate: Arc::new(crate::run_gate::RunGate::default()),
    });
    Rig {
        env,
        handles,
        port_log,
    }
}

impl Rig {
    /// A fake that powers the VM off when its script is done.
    fn fake(&self, script: Vec<Step>) -> FakeVcpu {
        let control = self.env.control.clone();
        FakeVcpu::new(script).at_end(move || control.finish(VmOutcome::PowerOff))
    }

    /// Runs vCPU `index` on its own thread until the loop returns (at most 10 s);
    /// returns how the VM ended.
    fn run(&self, index: usize, vcpu: FakeVcpu, boot: Option<CpuBootState>) -> VmOutcome {
        let (handle, env) = (self.handles[index].clone(), self.env.clone());
        let t = std::thread::spawn(move || run(vcpu, handle, env, boot));
        let outcome = self.env.control.wait_timeout(Duration::from_secs(10));
        let outcome = outcome.expect("the run loop did not end the VM within 10 s");
        t.join().expect("the vCPU thread panicked");
        outcome
    }

    /// Stops the VM as `Vm::run` does: the outcome, then a wake-up for every vCPU.
    fn stop(&self) {
        self.env.control.finish(VmOutcome::Stopped);
        for h in &self.handles {
            drop(h.lock());
            h.notify();
        }
    }

    fn deliver(&self, msg: InterruptMessage) {
        self.env.hub.deliver(&msg, None);
    }
}

fn message(delivery: DeliveryMode, vector: u8, apic_id: u32) -> InterruptMessage {
    InterruptMessage {
        delivery,
        trigger: if delivery == DeliveryMode::Init {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        },
        level: true,
        ..InterruptMessage::fixed(vector, apic_id)
    }
}

fn io(port: u16, size: u8, count: u32, write: bool) -> VmExit {
    VmExit::Io {
        port,
        size,
        count,
        write,
    }
}

/// Waits (at most 5 s) until vCPU `i`'s thread is in `activity`.
fn wait_for(rig: &Rig, i: usize, activity: Activity) {
    let start = std::time::Instant::now();
    while rig.handles[i].activity() != activity {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "vCPU {i} never became {activity:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn runs(log: &FakeLog) -> Vec<(usize, bool)> {
    log.events()
        .iter()
        .filter_map(|e| match e {
            Event::Run { step, window } => Some((*step, *window)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_boot_state_is_loaded_and_port_io_reaches_the_device() {
    let rig = rig(1);
    let boot = dvmm_boot::loader::ap_sipi_state(0x12);
    let fake = rig.fake(vec![
        Step::exit(io(0x81, 1, 1, true)).data(&[0x33]),
        Step::exit(io(0x80, 2, 1, false)),
    ]);
    let log = fake.log();
    let state = fake.state();
    assert_eq!(rig.run(0, fake, Some(boot)), VmOutcome::PowerOff);
    assert_eq!(state.lock().unwrap().sregs.cs.selector, boot.cs.selector);
    assert_eq!(state.lock().unwrap().regs.rip, boot.rip);
    assert_eq!(
        *rig.port_log.lock().unwrap(),
        vec![(1, vec![0x33], true), (0, vec![0x5a, 0x5a], false)]
    );
    // The read's answer went back into the exit's data.
    assert!(log.events().contains(&Event::Data(vec![0x5a, 0x5a])));
}

#[test]
fn string_io_is_split_into_accesses_of_its_size() {
    let rig = rig(1);
    let fake = rig.fake(vec![
        Step::exit(io(0x80, 2, 3, true)).data(&[1, 2, 3, 4, 5, 6])
    ]);
    assert_eq!(
        rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0))),
        VmOutcome::PowerOff
    );
    assert_eq!(
        *rig.port_log.lock().unwrap(),
        vec![
            (0, vec![1, 2], true),
            (0, vec![3, 4], true),
            (0, vec![5, 6], true)
        ]
    );
}

#[test]
fn an_interrupt_waits_for_the_window_then_is_injected_once() {
    let rig = rig(1);
    let hub = rig.env.hub.clone();
    let fake = rig.fake(vec![
        // The guest runs with IF clear; meanwhile a device raises vector 0x40.
        Step::exit(io(0x80, 1, 1, false))
            .interrupts(false, false)
            .after(move || hub.deliver(&InterruptMessage::fixed(0x40, 0), None)),
        Step::exit(VmExit::IrqWindowOpen),
        Step::exit(io(0x80, 1, 1, false)),
    ]);
    let log = fake.log();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    // Entry 1 asks for the window (the vector is pending, IF was clear); once it opens,
    // the vector is injected before entry 2, which asks for nothing more.
    assert_eq!(runs(&log), vec![(0, false), (1, true), (2, false)]);
    assert_eq!(log.injected(), vec![0x40]);
    let events = log.events();
    let inject = events.iter().position(|e| *e == Event::Inject(0x40));
    let run2 = events.iter().position(|e| {
        *e == Event::Run {
            step: 2,
            window: false,
        }
    });
    assert!(inject < run2, "{events:?}");
    assert_eq!(rig.handles[0].lock().pending_vector(), None, "acknowledged");
}

#[test]
fn an_interrupt_waits_while_kvm_still_holds_an_nmi() {
    let rig = rig(1);
    let hub = rig.env.hub.clone();
    let fake = rig.fake(vec![
        // The guest's NMI handler runs: KVM holds the second NMI until it returns, and
        // a device raises 0x44 (kvm-unit-tests' "multiple nmi").
        Step::exit(io(0x80, 1, 1, false))
            .state(|st| st.events.nmi.pending = 1)
            .after(move || {
                hub.deliver(&message(DeliveryMode::Nmi, 0, 0), None);
                hub.deliver(&InterruptMessage::fixed(0x44, 0), None);
            }),
        // The handler returned and KVM delivered the NMI.
        Step::exit(io(0x80, 1, 1, false)).state(|st| st.events.nmi.pending = 0),
        Step::exit(io(0x80, 1, 1, false)),
    ]);
    let log = fake.log();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    let events = log.events();
    let at = |e: &Event| events.iter().position(|x| x == e).unwrap();
    let (nmi, inject) = (at(&Event::Nmi), at(&Event::Inject(0x44)));
    let run = |step| at(&Event::Run { step, window: true });
    assert!(nmi < run(1), "the NMI goes to KVM at once: {events:?}");
    assert!(
        run(1) < inject,
        "0x44 waits while KVM holds the NMI: {events:?}"
    );
    assert!(
        inject
            < at(&Event::Run {
                step: 2,
                window: false
            }),
        "{events:?}"
    );
}

#[test]
fn a_tsc_deadline_already_past_interrupts_before_the_next_instruction() {
    let rig = rig(1);
    let lvt = Step::exit(VmExit::Mmio {
        addr: LAPIC_ADDR + 0x320,
        len: 4,
        write: true,
    })
    .data(&0x400efu32.to_le_bytes()); // TSC-deadline mode, vector 0xef
    let fake = rig.fake(vec![
        lvt,
        Step::exit(VmExit::WrMsr {
            index: dvmm_irq::lapic::MSR_IA32_TSC_DEADLINE,
            data: 1,
        }),
        Step::exit(io(0x80, 1, 1, false)),
    ]);
    let log = fake.log();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    let events = log.events();
    let inject = events.iter().position(|e| *e == Event::Inject(0xef));
    let after_wrmsr = events.iter().position(|e| {
        *e == Event::Run {
            step: 2,
            window: false,
        }
    });
    assert!(inject.is_some() && inject < after_wrmsr, "{events:?}");
}

#[test]
fn hlt_sleeps_until_an_interrupt_then_injects_it() {
    let rig = rig(1);
    let fake = rig.fake(vec![Step::exit(VmExit::Hlt), Step::exit(VmExit::Hlt)]);
    let log = fake.log();
    let (handle, env) = (rig.handles[0].clone(), rig.env.clone());
    let t = std::thread::spawn(move || {
        run(fake, handle, env, Some(dvmm_boot::loader::ap_sipi_state(0)))
    });
    wait_for(&rig, 0, Activity::Halted);
    assert_eq!(runs(&log), vec![(0, false)], "halted after the first entry");
    rig.deliver(InterruptMessage::fixed(0x41, 0));
    // It wakes, takes the vector and halts again at the second HLT.
    let start = std::time::Instant::now();
    while runs(&log).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "did not wake");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(log.injected(), vec![0x41]);
    rig.stop();
    t.join().unwrap();
}

#[test]
fn hlt_with_interrupts_off_wakes_for_an_nmi_only() {
    let rig = rig(1);
    let fake = rig.fake(vec![
        Step::exit(VmExit::Hlt).interrupts(false, false),
        Step::exit(VmExit::Hlt).interrupts(false, false),
    ]);
    let log = fake.log();
    let (handle, env) = (rig.handles[0].clone(), rig.env.clone());
    let t = std::thread::spawn(move || {
        run(fake, handle, env, Some(dvmm_boot::loader::ap_sipi_state(0)))
    });
    wait_for(&rig, 0, Activity::Halted);
    rig.deliver(InterruptMessage::fixed(0x42, 0));
    // A maskable interrupt does not end a HLT executed with IF clear (it stays pending).
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.handles[0].activity(), Activity::Halted);
    assert_eq!(runs(&log).len(), 1);
    rig.deliver(message(DeliveryMode::Nmi, 0, 0));
    let start = std::time::Instant::now();
    while !log.events().contains(&Event::Nmi) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the NMI did not wake it"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(log.injected().is_empty(), "IF is clear: nothing injected");
    rig.stop();
    t.join().unwrap();
    assert_eq!(rig.handles[0].lock().pending_vector(), Some(0x42));
}

#[test]
fn an_ap_waits_for_init_and_sipi_and_starts_at_the_vector() {
    let rig = rig(2);
    let fake = rig.fake(vec![Step::exit(io(0x80, 1, 1, false))]);
    let log = fake.log();
    let state = fake.state();
    let (handle, env) = (rig.handles[1].clone(), rig.env.clone());
    let t = std::thread::spawn(move || run(fake, handle, env, None));
    wait_for(&rig, 1, Activity::WaitingForSipi);
    rig.deliver(message(DeliveryMode::Init, 0, 1));
    rig.deliver(message(DeliveryMode::StartUp, 0x9a, 1));
    let outcome = rig.env.control.wait_timeout(Duration::from_secs(10));
    t.join().unwrap();
    assert_eq!(outcome, Some(VmOutcome::PowerOff));
    let sipi = dvmm_boot::loader::ap_sipi_state(0x9a);
    assert_eq!(state.lock().unwrap().sregs.cs.selector, sipi.cs.selector);
    assert_eq!(state.lock().unwrap().sregs.cs.base, sipi.cs.base);
    assert_eq!(runs(&log), vec![(0, false)]);
}

#[test]
fn init_while_running_sends_the_vcpu_back_to_wait_for_sipi() {
    let rig = rig(1);
    let hub = rig.env.hub.clone();
    let fake = rig.fake(vec![
        Step::exit(io(0x80, 1, 1, false)).after(move || {
            hub.deliver(&message(DeliveryMode::Init, 0, 0), None);
            hub.deliver(&message(DeliveryMode::StartUp, 0x10, 0), None);
        }),
        Step::exit(io(0x80, 1, 1, false)),
    ]);
    let log = fake.log();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0x20)));
    let cs: Vec<u16> = log
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::SetSregs { cs } => Some(*cs),
            _ => None,
        })
        .collect();
    let at = |v| dvmm_boot::loader::ap_sipi_state(v).cs.selector;
    assert_eq!(cs, vec![at(0x20), at(0x10)], "boot state, then the SIPI's");
}

#[test]
fn msr_exits_are_answered_by_the_lapic_or_refused() {
    let rig = rig(1);
    let fake = rig.fake(vec![
        Step::exit(VmExit::RdMsr {
            index: dvmm_irq::lapic::MSR_IA32_APIC_BASE,
        }),
        Step::exit(VmExit::RdMsr { index: 0x1234 }),
        Step::exit(VmExit::WrMsr {
            index: 0x1234,
            data: 1,
        }),
    ]);
    let log = fake.log();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    let answers: Vec<Option<u64>> = log
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Msr(a) => Some(*a),
            _ => None,
        })
        .collect();
    // APIC base: the default address, enabled, BSP.
    assert_eq!(answers, vec![Some(LAPIC_ADDR | 0x900), None, None]);
}

#[test]
fn an_icr_write_sends_an_ipi_to_the_other_vcpu() {
    let rig = rig(2);
    let icr = |offset: u64, value: u32| {
        Step::exit(VmExit::Mmio {
            addr: LAPIC_ADDR + offset,
            len: 4,
            write: true,
        })
        .data(&value.to_le_bytes())
    };
    let fake = rig.fake(vec![icr(0x310, 1 << 24), icr(0x300, 0x4051)]);
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    assert_eq!(rig.handles[1].lock().pending_vector(), Some(0x51));
    assert_eq!(rig.handles[0].lock().pending_vector(), None);
}

/// Identity-maps the first 2 MiB with 4-level tables at 0x10000; returns CR3.
fn identity_tables(rig: &Rig) -> u64 {
    let entry = |at: u64, value: u64| rig.env.guest.write(at, &value.to_le_bytes()).unwrap();
    entry(0x10000, 0x11000 | 3);
    entry(0x11000, 0x12000 | 3);
    entry(0x12000, 0x83); // 2 MiB page at 0, present + writable
    0x10000
}

/// Two kicks at a `vmcall` at 0x5000 (this host's KVM never completes it) in long mode
/// at CPL0, with the registers `regs` sets.
fn stuck_at_vmcall(cr3: u64, regs: impl FnOnce(&mut kvm_regs) + Send + 'static) -> Vec<Step> {
    let stuck = move |st: &mut dvmm_hypervisor::fake::FakeState| {
        st.regs.rip = 0x5000;
        regs(&mut st.regs);
        st.sregs.cr3 = cr3;
        st.sregs.cs.l = 1;
        st.sregs.cs.dpl = 0;
    };
    vec![
        Step::exit(VmExit::Interrupted).state(stuck),
        Step::exit(VmExit::Interrupted),
    ]
}

#[test]
fn a_stuck_send_ipi_hypercall_reaches_its_targets_and_answers_the_count() {
    let rig = rig_on(3, true);
    let cr3 = identity_tables(&rig);
    rig.env.guest.write(0x5000, &[0x0f, 0x01, 0xc1]).unwrap(); // vmcall
                                                               // KVM_HC_SEND_IPI: bits 0 and 1 from APIC id 1, fixed vector 0x45.
    let fake = rig.fake(stuck_at_vmcall(cr3, |r| {
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi) = (10, 0b11, 0, 1, 0x45);
    }));
    let state = fake.state();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    assert_eq!(rig.handles[1].lock().pending_vector(), Some(0x45));
    assert_eq!(rig.handles[2].lock().pending_vector(), Some(0x45));
    assert_eq!(rig.handles[0].lock().pending_vector(), None);
    let regs = state.lock().unwrap().regs;
    assert_eq!(
        (regs.rax, regs.rip),
        (2, 0x5003),
        "two delivered, RIP past the vmcall"
    );
}

#[test]
fn a_stuck_unknown_hypercall_gets_enosys_and_a_user_mode_one_is_left_alone() {
    let rig = rig_on(1, true);
    let cr3 = identity_tables(&rig);
    rig.env.guest.write(0x5000, &[0x0f, 0x01, 0xd9]).unwrap(); // vmmcall
    let fake = rig.fake(stuck_at_vmcall(cr3, |r| r.rax = 99));
    let state = fake.state();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    let regs = state.lock().unwrap().regs;
    assert_eq!(regs.rax as i64, crate::hypercall::KVM_ENOSYS);
    assert_eq!(regs.rip, 0x5003);

    let rig = rig_on(1, true);
    let cr3 = identity_tables(&rig);
    rig.env.guest.write(0x5000, &[0x0f, 0x01, 0xc1]).unwrap();
    let mut script = stuck_at_vmcall(cr3, |r| r.rax = 10);
    script[1] = Step::exit(VmExit::Interrupted).state(|st| st.sregs.cs.dpl = 3);
    let fake = rig.fake(script);
    let state = fake.state();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    assert_eq!(
        state.lock().unwrap().regs.rip,
        0x5000,
        "CPL3: not a hypercall to answer"
    );
}

#[test]
fn an_mmio_exit_on_ram_is_done_through_guest_memory() {
    let rig = rig(1);
    rig.env.guest.write(0x2000, &[1, 2, 3, 4]).unwrap();
    let fake = rig.fake(vec![
        Step::exit(VmExit::Mmio {
            addr: 0x2000,
            len: 4,
            write: false,
        }),
        Step::exit(VmExit::Mmio {
            addr: 0x3000,
            len: 2,
            write: true,
        })
        .data(&[9, 9]),
    ]);
    let log = fake.log();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    assert!(log.events().contains(&Event::Data(vec![1, 2, 3, 4])));
    let mut b = [0u8; 2];
    rig.env.guest.read(0x3000, &mut b).unwrap();
    assert_eq!(b, [9, 9]);
}

#[test]
fn a_triple_fault_resets_and_an_unknown_exit_fails_the_vm() {
    let rig1 = rig(1);
    let fake = rig1.fake(vec![Step::exit(VmExit::Shutdown)]);
    let outcome = rig1.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    assert!(
        matches!(&outcome, VmOutcome::Reset(m) if m.contains("vCPU 0 triple-faulted")),
        "{outcome:?}"
    );
    let rig2 = rig(1);
    let fake = rig2.fake(vec![Step::exit(VmExit::Unknown(99))]);
    let outcome = rig2.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    assert_eq!(
        outcome,
        VmOutcome::Failed("vCPU 0: unexpected KVM exit reason 99".into())
    );
}

#[test]
fn a_stop_request_ends_a_halted_vcpu() {
    let rig = rig(1);
    let fake = FakeVcpu::new([Step::exit(VmExit::Hlt)]);
    let (handle, env) = (rig.handles[0].clone(), rig.env.clone());
    let t = std::thread::spawn(move || {
        run(fake, handle, env, Some(dvmm_boot::loader::ap_sipi_state(0)))
    });
    wait_for(&rig, 0, Activity::Halted);
    rig.stop();
    t.join().unwrap();
    assert!(rig.handles[0].is_quiet());
}

#[test]
fn cr8_and_the_lapic_tpr_follow_each_other() {
    let rig = rig(1);
    // A TPR the guest set through the LAPIC reaches CR8 at the next entry.
    rig.handles[0].lock().set_tpr(0x35);
    let handle = rig.handles[0].clone();
    let seen = Arc::new(Mutex::new(None));
    let seen_in_step = seen.clone();
    let fake = rig.fake(vec![
        Step::exit(io(0x80, 1, 1, true)),
        Step::exit(io(0x80, 1, 1, true)).cr8(0xc),
        Step::exit(io(0x80, 1, 1, true)).after(move || {
            *seen_in_step.lock().unwrap() = Some(handle.lock().tpr());
        }),
    ]);
    let state = fake.state();
    assert_eq!(
        rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0))),
        VmOutcome::PowerOff
    );
    // The guest's `mov cr8, 0xc` became TPR 0xc0 before the next entry; CR8 stayed.
    assert_eq!(*seen.lock().unwrap(), Some(0xc0));
    assert_eq!(rig.handles[0].lock().tpr(), 0xc0);
    assert_eq!(state.lock().unwrap().cr8, 0xc);
}

#[test]
fn a_tpr_written_through_the_lapic_is_what_the_guest_reads_in_cr8() {
    let rig = rig(1);
    rig.handles[0].lock().set_tpr(0x35);
    let fake = rig.fake(vec![Step::exit(io(0x80, 1, 1, true))]);
    let state = fake.state();
    rig.run(0, fake, Some(dvmm_boot::loader::ap_sipi_state(0)));
    assert_eq!(state.lock().unwrap().cr8, 0x3);
    assert_eq!(rig.handles[0].lock().tpr(), 0x35, "the low nibble is kept");
}
