//! A vCPU's architectural state as KVM holds it, saved and restored for snapshots and
//! migration: general and special registers, FPU/SSE/AVX (XSAVE) and XCRs, the MSRs KVM can
//! save, the local APIC, the multiprocessing state, pending exceptions and interrupts, debug
//! registers and the TSC frequency.
//!
//! The order of the restore follows what KVM needs: the TSC frequency before the TSC MSR, the
//! special registers (CR0/CR4/EFER) before XSAVE, the LAPIC before the MSRs that depend on it
//! (TSC deadline), the events after the registers they interrupt, the MP state last.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Everything KVM keeps of one vCPU that the guest can observe.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE, AVX (the XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// The MSRs KVM saves and restores (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs, and the interrupt shadow.
    pub events: kvm_vcpu_events,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The guest's TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// A KVM vCPU ioctl that failed: which one, and why.
#[derive(Debug, thiserror::Error)]
#[error("{ioctl}: {source}")]
pub struct StateIoctlError {
    ioctl: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateIoctlError {
    move |source| StateIoctlError { ioctl, source }
}

/// The MSRs of `fd` that KVM can both read and write back: KVM's list of MSRs to save,
/// without the ones this vCPU refuses to read (KVM_GET_MSRS stops at the first it cannot
/// read, so each refusal drops one index and the batch is read again).
pub fn saveable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, StateIoctlError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    let mut checked = 0;
    while checked < indices.len() {
        let batch: Vec<u32> = indices[checked..]
            .iter()
            .take(KVM_MAX_MSR_ENTRIES)
            .copied()
            .collect();
        let read = read_msrs(fd, &batch)?.len();
        checked += read;
        if read < batch.len() {
            indices.remove(checked);
        }
    }
    Ok(indices)
}

/// Reads `indices` (at most [`KVM_MAX_MSR_ENTRIES`]); KVM stops at the first it cannot read.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateIoctlError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateIoctlError {
        ioctl: "KVM_GET_MSRS",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
    Ok(msrs.as_slice()[..n]
        .iter()
        .map(|e| (e.index, e.data))
        .collect())
}

impl VcpuState {
    /// Reads the state of `fd` (its thread must not be in KVM_RUN), with the MSRs `msrs`.
    pub fn save(fd: &VcpuFd, msrs: &[u32]) -> Result<Self, StateIoctlError> {
        // The MP state first: reading it makes KVM settle pending APIC events into it.
        let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let mut saved = Vec::with_capacity(msrs.len());
        for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let read = read_msrs(fd, chunk)?;
            if read.len() < chunk.len() {
                return Err(StateIoctlError {
                    ioctl: "KVM_GET_MSRS",
                    source: kvm_ioctls::Error::new(libc::EIO),
                });
            }
            saved.extend(read);
        }
        let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let events = fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            msrs: saved,
            lapic,
            mp_state,
            events,
            debugregs,
            tsc_khz,
        })
    }

    /// Writes the state into `fd`, a vCPU created with the same CPUID that has not run yet.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateIoctlError> {
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                // Without TSC scaling KVM refuses another frequency; the guest then sees the
                // host's, as after a migration to another host without it.
                if let Err(e) = fd.set_tsc_khz(khz) {
                    log::warn!("KVM_SET_TSC_KHZ {khz}: {e}; the guest keeps the host's TSC rate");
                }
            }
        }
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        // SAFETY: `self.xsave` is a whole kvm_xsave read by KVM_GET_XSAVE (or deserialized
        // into one of that size): KVM reads exactly size_of::<kvm_xsave>() bytes from it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| StateIoctlError {
                ioctl: "KVM_SET_MSRS",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let set = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if set < entries.len() {
                log::warn!(
                    "KVM_SET_MSRS took {set} of {} MSRs; refused MSR {:#x}",
                    entries.len(),
                    entries[set].index
                );
                return Err(StateIoctlError {
                    ioctl: "KVM_SET_MSRS",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}
