//! Which pages of guest memory changed since the last look, during a live migration: the
//! vCPUs' writes from KVM's dirty log, the devices' writes (the disks' reads into guest
//! memory, their used rings) from the dirty bitmap vm-memory keeps for every write through it.

use devices::virtio::GuestRam;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Starts (`true`) or stops KVM's dirty log on every RAM slot of `memory`.
pub fn log_dirty_pages(vm: &VmFd, memory: &GuestRam, enable: bool) -> Result<(), String> {
    crate::memory_slots::register(vm, memory, enable)
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION (dirty log): {e}"))
}

/// The pages written since the last call (or since the log was started), one bitmap per
/// region (bit `n`: page `n` of the region), vCPUs' and devices' writes together.
pub fn take_dirty(vm: &VmFd, memory: &GuestRam) -> Result<Vec<Vec<u64>>, String> {
    let mut out = Vec::new();
    for (slot, region) in memory.iter().enumerate() {
        let mut bits = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
        let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
        for (b, d) in bits.iter_mut().zip(devices) {
            *b |= d;
        }
        out.push(bits);
    }
    Ok(out)
}

/// Clears the devices' dirty bitmaps (before the first pass, which sends everything anyway).
pub fn clear_device_bits(memory: &GuestRam) {
    for region in memory.iter() {
        std::ops::Deref::deref(region).bitmap().reset();
    }
}

/// How many pages `bitmaps` mark.
pub fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}
