//! vCPUs: architectural set-up (CPUID, MSRs, FPU, LAPIC, boot registers) and the run loop that
//! dispatches port and MMIO exits to the device buses.
//!
//! Every exit the VMM does not expect ends the VM with an explanation (exit reason, RIP,
//! instruction bytes) instead of spinning: on PVM hosts an instruction KVM's emulator cannot run
//! shows up as `KVM_EXIT_INTERNAL_ERROR` with suberror 1, and the bytes say which one it was.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use devices::virtio::GuestRam;
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::BootEntry;
use crate::exit::{ExitSignal, VmExit};
use crate::layout::*;
use crate::vcpu_state::VcpuState;

/// IA32_MISC_ENABLE (Intel SDM vol. 4, table 2-2) and its fast-strings bit.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// AMD HWCR (AMD64 APM vol. 2, "MSRC001_0015") and TscFreqSel (bit 24): the TSC counts at the P0
/// frequency. Linux warns "[Firmware Bug]: TSC doesn't count with P0 frequency!" without it.
const MSR_K7_HWCR: u32 = 0xc001_0015;
const MSR_K7_HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// Environment variable: sample every vCPU's RIP every so many milliseconds (a debugging aid for
/// guests that hang: the samples go to stderr at warn level).
pub const SAMPLE_ENV: &str = "HOTPLUG_VMM_SAMPLE_MS";

/// CR0/CR4/EFER bits (Intel SDM vol. 3, §2.5, §2.2.1).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// LAPIC register offsets and delivery modes (Intel SDM vol. 3, §11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT entries: flags/access, base, limit (Intel SDM vol. 3, §3.4.5).
const GDT_CODE32: (u16, u32, u32) = (0xc09b, 0, 0xfffff);
const GDT_CODE64: (u16, u32, u32) = (0xa09b, 0, 0xfffff);
const GDT_DATA: (u16, u32, u32) = (0xc093, 0, 0xfffff);
const GDT_TSS: (u16, u32, u32) = (0x008b, 0, 0x67);

/// Failure to set a vCPU up.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {cpu}: {what}: {err}")]
pub struct VcpuSetupError {
    cpu: u8,
    what: &'static str,
    err: kvm_ioctls::Error,
}

/// What a parked vCPU thread can be asked to do.
enum Request {
    /// Read the vCPU's state (it is not in KVM_RUN) and send it back.
    Save(Sender<Result<VcpuState, String>>),
    /// Go on running the guest.
    Resume,
}

#[derive(Default)]
struct Parking {
    /// Threads parked at the gate.
    parked: usize,
    /// Threads that will never run the guest again (fatal exit, or HLT).
    gone: usize,
}

/// Where the vCPU threads stop between two KVM_RUNs while the VM is paused, and the requests
/// they serve meanwhile. See [`VcpuSet`].
#[derive(Default)]
struct Gate {
    paused: std::sync::atomic::AtomicBool,
    parking: Mutex<Parking>,
    changed: Condvar,
}

impl Gate {
    fn is_closed(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    fn update(&self, f: impl FnOnce(&mut Parking)) {
        f(&mut self.parking.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }
}

/// The vCPU threads of the VM, to pause, save and resume: pausing kicks every vCPU out of
/// KVM_RUN (a signal, repeated until each has stopped, since one can arrive just before a
/// thread enters KVM_RUN) and returns once every thread is parked; a parked thread serves
/// requests for its vCPU's state; resuming returns once every thread is running again.
pub struct VcpuSet {
    gate: Arc<Gate>,
    threads: Mutex<Vec<(libc::pthread_t, Sender<Request>)>>,
}

impl VcpuSet {
    /// A set whose threads start paused (`true`) or running.
    pub fn new(start_paused: bool) -> Self {
        let gate = Gate::default();
        gate.paused
            .store(start_paused, std::sync::atomic::Ordering::Release);
        VcpuSet {
            gate: Arc::new(gate),
            threads: Mutex::new(Vec::new()),
        }
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<(libc::pthread_t, Sender<Request>)>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every vCPU between two KVM_RUNs; returns once all are parked (or gone).
    pub fn pause(&self) {
        self.gate
            .paused
            .store(true, std::sync::atomic::Ordering::Release);
        let threads = self.threads();
        let n = threads.len();
        let mut parking = self.gate.parking.lock().unwrap_or_else(|e| e.into_inner());
        while parking.parked + parking.gone < n {
            for (tid, _) in threads.iter() {
                // SAFETY: the vCPU threads never exit before the process does, so the handles
                // stay valid; SIGRTMIN has a no-op handler that only interrupts KVM_RUN.
                unsafe { libc::pthread_kill(*tid, vmm_sys_util::signal::SIGRTMIN()) };
            }
            parking = self
                .gate
                .changed
                .wait_timeout(parking, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the parked vCPUs run again; returns once each has left the gate.
    pub fn resume(&self) {
        self.gate
            .paused
            .store(false, std::sync::atomic::Ordering::Release);
        for (_, requests) in self.threads().iter() {
            let _ = requests.send(Request::Resume);
        }
        let mut parking = self.gate.parking.lock().unwrap_or_else(|e| e.into_inner());
        while parking.parked > 0 {
            parking = self
                .gate
                .changed
                .wait(parking)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Every vCPU's state, in vCPU order; the vCPUs must be [paused](Self::pause).
    pub fn save(&self) -> Result<Vec<VcpuState>, String> {
        let mut replies = Vec::new();
        for (id, (_, requests)) in self.threads().iter().enumerate() {
            let (tx, rx) = channel();
            requests
                .send(Request::Save(tx))
                .map_err(|_| format!("vCPU {id} has stopped"))?;
            replies.push((id, rx));
        }
        replies
            .into_iter()
            .map(|(id, rx)| {
                rx.recv()
                    .map_err(|_| format!("vCPU {id} has stopped"))?
                    .map_err(|e| format!("vCPU {id}: {e}"))
            })
            .collect()
    }

    /// Registers the thread `tid` running a vCPU, which takes `requests` while parked ([`Vcpu::spawn`]).
    fn add(&self, tid: libc::pthread_t, requests: Sender<Request>) {
        self.threads().push((tid, requests));
    }
}

/// A vCPU ready to run.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    io: Arc<RwLock<IoManager>>,
    mem: GuestRam,
    exit: Arc<ExitSignal>,
    /// Log where the vCPU is whenever a kick interrupts KVM_RUN (HOTPLUG_VMM_SAMPLE_MS).
    sample: bool,
    /// The gate of its [`VcpuSet`] and the requests it serves while parked there.
    gate: Arc<Gate>,
    requests: Option<Receiver<Request>>,
    /// The MSRs its state is saved with.
    msrs: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Configures `fd` as vCPU `id` of `cpus`; the boot vCPU (0) also gets the entry registers.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        fd: VcpuFd,
        id: u8,
        cpus: u8,
        base_cpuid: &CpuId,
        boot: Option<BootEntry>,
        mem: GuestRam,
        io: Arc<RwLock<IoManager>>,
        exit: Arc<ExitSignal>,
    ) -> Result<Vcpu, VcpuSetupError> {
        let err = |what| move |err| VcpuSetupError { cpu: id, what, err };
        let mut cpuid = base_cpuid.clone();
        patch_cpuid(&mut cpuid, id, cpus);
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

        let mut entries = vec![kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MSR_IA32_MISC_ENABLE_FAST_STRING,
            ..Default::default()
        }];
        if is_amd(&cpuid) {
            entries.push(kvm_msr_entry {
                index: MSR_K7_HWCR,
                data: MSR_K7_HWCR_TSC_FREQ_SEL,
                ..Default::default()
            });
        }
        let msrs = Msrs::from_entries(&entries).expect("a few MSRs fit");
        let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            log::warn!("vCPU {id}: KVM took {set} of {} boot MSRs", entries.len());
        }

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;

        let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

        if let Some(entry) = boot {
            setup_boot_registers(&fd, &mem, entry).map_err(err("boot registers"))?;
        }
        let sample = std::env::var_os(SAMPLE_ENV).is_some();
        Ok(Vcpu {
            fd,
            id,
            io,
            mem,
            exit,
            sample,
            gate: Arc::default(),
            requests: None,
            msrs: Arc::default(),
        })
    }

    /// The KVM vCPU, e.g. to restore its state before it runs.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the vCPU on a new thread named `vcpuN`, one of `set`'s, saving its state with the
    /// MSRs `msrs`.
    pub fn spawn(
        mut self,
        set: &VcpuSet,
        msrs: Arc<Vec<u32>>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        self.gate = set.gate.clone();
        self.msrs = msrs;
        let (tx, rx) = channel();
        self.requests = Some(rx);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run())?;
        use std::os::unix::thread::JoinHandleExt;
        set.add(handle.as_pthread_t(), tx);
        Ok(handle)
    }

    /// Waits at the gate, serving requests, until resumed. False if the VM is ending.
    fn park(&mut self) -> bool {
        let Some(requests) = &self.requests else {
            return true;
        };
        self.gate.update(|p| p.parked += 1);
        loop {
            match requests.recv() {
                Ok(Request::Save(reply)) => {
                    let state = VcpuState::save(&self.fd, &self.msrs).map_err(|e| e.to_string());
                    let _ = reply.send(state);
                }
                // A Resume sent while this thread was not parked yet is stale: the gate says.
                Ok(Request::Resume) if self.gate.is_closed() => {}
                Ok(Request::Resume) => {
                    self.gate.update(|p| p.parked -= 1);
                    return true;
                }
                Err(_) => {
                    self.gate.update(|p| p.parked -= 1);
                    return false;
                }
            }
        }
    }

    /// Runs the vCPU until the VM exits. Never returns normally: the VM's exit is reported
    /// through the [`ExitSignal`], and the vCPU thread parks until the process ends.
    fn run(mut self) {
        loop {
            if self.gate.is_closed() {
                if !self.park() {
                    break;
                }
                continue;
            }
            let outcome = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &self.io),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if self.sample {
                        log::warn!(
                            "vCPU {} sample: {}; stack: {}",
                            self.id,
                            self.describe_state(),
                            self.stack_text_words()
                        );
                    }
                    Outcome::Continue
                }
                Err(e) => Outcome::Fatal(format!("KVM_RUN failed: {e}")),
            };
            match outcome {
                Outcome::Continue => {}
                Outcome::Fatal(what) => {
                    let msg = format!("vCPU {}: {what}; {}", self.id, self.describe_state());
                    self.exit.request(VmExit::Fatal(msg));
                    break;
                }
                Outcome::InternalError if self.was_reset() => {
                    // An INIT (the guest's own IPI) put this vCPU back at the reset vector,
                    // where a PC's firmware would run; there is none, so the instruction there
                    // could not run. That is the guest resetting the machine: it ends as a
                    // reset does, not as a failure of the VMM.
                    log::warn!("vCPU {} was reset by the guest (INIT): resetting", self.id);
                    self.exit.request(VmExit::Reset);
                    break;
                }
                Outcome::InternalError => {
                    let msg = self.describe_internal_error();
                    self.exit.request(VmExit::Fatal(msg));
                    break;
                }
                Outcome::Stop => break,
            }
            if self.exit.is_requested() {
                break;
            }
        }
        // The main thread ends the process; this thread has nothing left to do.
        self.gate.update(|p| p.gone += 1);
        loop {
            std::thread::park();
        }
    }

    /// Whether the vCPU is in the state a reset or INIT leaves it in.
    fn was_reset(&self) -> bool {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                at_reset_vector(regs.rip, sregs.cs.selector, sregs.cs.base, sregs.cr0)
            }
            _ => false,
        }
    }

    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so KVM filled the `internal`
        // member of the exit union (and `emulation_failure`, which shares its first two fields,
        // for suberror KVM_INTERNAL_ERROR_EMULATION). Both are plain integers: any bit pattern is
        // valid.
        let (suberror, emu) = unsafe {
            (
                run.__bindgen_anon_1.internal.suberror,
                run.__bindgen_anon_1.emulation_failure,
            )
        };
        let mut bytes = Vec::new();
        if suberror == KVM_INTERNAL_ERROR_EMULATION
            && emu.ndata >= 3
            && emu.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        {
            // SAFETY: the flag says KVM filled insn_size/insn_bytes (plain bytes).
            let insn = unsafe { emu.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            bytes.extend_from_slice(&insn.insn_bytes[..n]);
        }
        let what = if suberror == KVM_INTERNAL_ERROR_EMULATION {
            "KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure: KVM's instruction emulator cannot run this instruction)".to_string()
        } else {
            format!("KVM_EXIT_INTERNAL_ERROR suberror {suberror}")
        };
        format!(
            "vCPU {}: {what}; {}",
            self.id,
            self.describe_state_with(if bytes.is_empty() { None } else { Some(bytes) })
        )
    }

    fn describe_state(&self) -> String {
        self.describe_state_with(None)
    }

    /// The words on the top of the guest's kernel stack that look like kernel text addresses, as
    /// hex: a guessed call chain for sampling profiles (`resources/symbolize.py` names them).
    fn stack_text_words(&self) -> String {
        /// How much of the stack to scan, and where x86_64 Linux maps its kernel image.
        const SCAN_BYTES: u64 = 1024;
        const KERNEL_TEXT: std::ops::Range<u64> = 0xffff_ffff_8000_0000..0xffff_ffff_c000_0000;
        let Ok(regs) = self.fd.get_regs() else {
            return "unavailable".into();
        };
        let mut words = Vec::new();
        let mut addr = regs.rsp & !7;
        let end = addr.saturating_add(SCAN_BYTES);
        while addr < end {
            // One translation per guest page: the stack may cross into an unmapped one.
            let page_end = ((addr | 0xfff) + 1).min(end);
            let Some(phys) = self
                .fd
                .translate_gva(addr)
                .ok()
                .filter(|t| t.valid != 0)
                .map(|t| t.physical_address)
            else {
                break;
            };
            let mut buf = vec![0u8; (page_end - addr) as usize];
            if self.mem.read_slice(&mut buf, GuestAddress(phys)).is_err() {
                break;
            }
            words.extend(
                buf.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .filter(|w| KERNEL_TEXT.contains(w))
                    .map(|w| format!("{w:#x}")),
            );
            addr = page_end;
        }
        words.join(" ")
    }

    /// "RIP 0x... (CS base ...), instruction bytes: ..." from the vCPU's registers and memory.
    fn describe_state_with(&self, insn: Option<Vec<u8>>) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return "registers unavailable".into();
        };
        let sregs = self.fd.get_sregs().ok();
        let cs_base = sregs.map(|s| s.cs.base).unwrap_or(0);
        let linear = cs_base.wrapping_add(regs.rip);
        let bytes = insn.or_else(|| {
            let phys = if sregs.is_some_and(|s| s.cr0 & X86_CR0_PG != 0) {
                self.fd
                    .translate_gva(linear)
                    .ok()
                    .filter(|t| t.valid != 0)
                    .map(|t| t.physical_address)
            } else {
                Some(linear)
            }?;
            let mut b = [0u8; 16];
            self.mem.read_slice(&mut b, GuestAddress(phys)).ok()?;
            Some(b.to_vec())
        });
        let bytes = match bytes {
            Some(b) => b
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            None => "unavailable".into(),
        };
        format!(
            "RIP {:#x} (linear {linear:#x}), instruction bytes: {bytes}",
            regs.rip
        )
    }
}

/// Whether these registers are those a reset or an INIT leaves an x86 CPU in (SDM Vol. 3,
/// 10.1.1 "Processor State After Reset"): real mode, CS 0xf000 with base 0xffff0000, IP 0xfff0.
fn at_reset_vector(rip: u64, cs_selector: u16, cs_base: u64, cr0: u64) -> bool {
    rip == 0xfff0 && cs_selector == 0xf000 && cs_base == 0xffff_0000 && cr0 & X86_CR0_PE == 0
}

enum Outcome {
    Continue,
    Stop,
    InternalError,
    Fatal(String),
}

fn handle_exit(exit: VcpuExit<'_>, io: &RwLock<IoManager>) -> Outcome {
    let bus = io.read().unwrap_or_else(|e| e.into_inner());
    match exit {
        VcpuExit::IoIn(port, data) => {
            if bus.pio_read(PioAddress(port), data).is_err() {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if bus.pio_write(PioAddress(port), data).is_err() {
                log::trace!("unhandled port write {port:#x} {data:02x?}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if bus.mmio_read(MmioAddress(addr), data).is_err() {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if bus.mmio_write(MmioAddress(addr), data).is_err() {
                log::trace!("unhandled MMIO write {addr:#x} {data:02x?}");
            }
        }
        // With the in-kernel LAPIC, HLT is handled by KVM; a HLT exit means the vCPU stopped for good.
        VcpuExit::Hlt => return Outcome::Stop,
        VcpuExit::Intr => {}
        VcpuExit::InternalError => return Outcome::InternalError,
        VcpuExit::Shutdown => {
            return Outcome::Fatal("KVM_EXIT_SHUTDOWN (triple fault)".into());
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Outcome::Fatal(format!(
                "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host CPU {cpu})"
            ));
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Outcome::Fatal(format!("KVM_EXIT_SYSTEM_EVENT type {kind}"));
        }
        other => return Outcome::Fatal(format!("unexpected exit {other:?}")),
    }
    Outcome::Continue
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// Whether the CPUID vendor string is AMD's.
fn is_amd(cpuid: &CpuId) -> bool {
    cpuid.as_slice().iter().any(|e| {
        e.function == 0
            && e.ebx == u32::from_le_bytes(*b"Auth")
            && e.edx == u32::from_le_bytes(*b"enti")
            && e.ecx == u32::from_le_bytes(*b"cAMD")
    })
}

/// Gives vCPU `id` its own APIC ID and the topology of `cpus` single-threaded cores.
fn patch_cpuid(cpuid: &mut CpuId, id: u8, cpus: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                // ECX[31]: running on a hypervisor.
                e.ecx |= 1 << 31;
                // EDX[28] HTT: the logical-processor count field is valid.
                e.edx |= 1 << 28;
            }
            0xb | 0x1f => e.edx = u32::from(id),
            // Invariant TSC (CPUID Fn8000_0007 EDX[8]) hidden, as QEMU hides it unless asked:
            // Linux then keeps its time with kvm-clock, which KVM_SET_CLOCK carries across a
            // snapshot or migration. With it, Linux picks the TSC, and on PVM hosts (no TSC
            // offsetting: the guest reads the host's TSC) a restored guest's clock jumps by the
            // time it spent saved (RCU stall reports, a 2-vCPU guest seen hung; docs/migration.md).
            0x8000_0007 => e.edx &= !(1 << 8),
            // AMD extended APIC ID (AMD64 APM vol. 3, CPUID Fn8000_001E): EAX the APIC ID, EBX
            // the core ID (one thread per core), ECX node 0. Linux reads the APIC ID from here on
            // AMD and reports a mismatch with the LAPIC otherwise.
            0x8000_001e => {
                e.eax = u32::from(id);
                e.ebx = u32::from(id);
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

fn gdt_entry((flags, base, limit): (u16, u32, u32)) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

fn segment((flags, base, limit): (u16, u32, u32), index: u16) -> kvm_segment {
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn setup_boot_registers(
    fd: &VcpuFd,
    mem: &GuestRam,
    entry: BootEntry,
) -> Result<(), kvm_ioctls::Error> {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    let code = if long_mode { GDT_CODE64 } else { GDT_CODE32 };
    let gdt = [0, gdt_entry(code), gdt_entry(GDT_DATA), gdt_entry(GDT_TSS)];
    let mem_err = |_| kvm_ioctls::Error::new(libc::EFAULT);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(mem_err)?;

    let mut sregs: kvm_sregs = fd.get_sregs()?;
    let data = segment(GDT_DATA, 2);
    sregs.cs = segment(code, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS, 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, boot_params } => {
            // Identity-map the first GiB with 2 MiB pages; the kernel builds its own tables.
            mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
                .map_err(mem_err)?;
            mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START))
                .map_err(mem_err)?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
                    .map_err(mem_err)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    fd.set_sregs(&sregs)?;
    fd.set_regs(&regs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_flat_segments() {
        assert_eq!(gdt_entry(GDT_CODE64), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_CODE32), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA), 0x00cf_9300_0000_ffff);
        let cs = segment(GDT_CODE64, 1);
        assert_eq!((cs.l, cs.db, cs.limit, cs.selector), (1, 0, 0xffff_ffff, 8));
        let ds = segment(GDT_DATA, 2);
        assert_eq!((ds.type_, ds.db, ds.present), (3, 1, 1));
    }

    #[test]
    fn only_the_reset_state_counts_as_a_reset() {
        assert!(at_reset_vector(0xfff0, 0xf000, 0xffff_0000, 0x6000_0010));
        assert!(
            !at_reset_vector(0xfff0, 0xf000, 0xffff_0000, 0x8005_0033),
            "protected mode"
        );
        assert!(
            !at_reset_vector(0xfff1, 0xf000, 0xffff_0000, 0x10),
            "another IP"
        );
        assert!(
            !at_reset_vector(0xfff0, 0x0010, 0, 0x10),
            "another code segment"
        );
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x31;
        regs[APIC_LVT0 + 1] = 0x05; // mode bits set to something else
        regs[APIC_LVT0 + 2] = 0x01; // masked
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x31);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
