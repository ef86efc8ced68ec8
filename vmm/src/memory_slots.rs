//! Guest RAM as KVM memory slots: slot `i` is region `i` of the guest memory, registered at
//! start and registered again, with the same range and mapping, to start or stop KVM's dirty
//! log during a live migration.

use devices::virtio::GuestRam;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Registers every region of `memory` as its slot, logging the guest's writes to it if
/// `log_dirty`.
pub fn register(vm: &VmFd, memory: &GuestRam, log_dirty: bool) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host + len) is a live mmap owned by `memory`, which the
        // VM keeps (every vCPU holds a clone) for as long as the process runs; the guest ranges
        // of the regions do not overlap; registered again, a slot keeps its range and mapping.
        unsafe { vm.set_user_memory_region(r) }?;
    }
    Ok(())
}
