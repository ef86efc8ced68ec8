//! Loading the guest: kernel (ELF vmlinux or bzImage), initramfs, command line and the boot
//! structures the kernel reads first (PVH start info or the Linux zero page, and the memory map).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use devices::virtio::GuestRam;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::layout::*;

/// E820 / PVH memory-map entry types (ACPI 6.5 §15, "E820" address range types).
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Linux boot protocol: "HdrS" (Documentation/arch/x86/boot.rst).
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Linux boot protocol: boot_flag signature.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Linux boot protocol: loader type "undefined" (we are not a registered boot loader).
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Linux boot protocol: kernel alignment for relocatable kernels.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Linux boot protocol: loadflags CAN_USE_HEAP.
const CAN_USE_HEAP: u8 = 1 << 7;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors while loading the guest. Each names the file or structure at fault.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {0}: {1}")]
    KernelOpen(String, std::io::Error),
    #[error("cannot load kernel {0}: not an x86_64 ELF vmlinux or bzImage ({1})")]
    KernelLoad(String, linux_loader::loader::Error),
    #[error("cannot open initramfs {0}: {1}")]
    InitramfsOpen(String, std::io::Error),
    #[error("initramfs {0} ({1} bytes) does not fit in guest RAM above the kernel")]
    InitramfsTooBig(String, u64),
    #[error("cannot read initramfs {0} into guest memory")]
    InitramfsRead(String),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    #[error("cannot write boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `%rsi` = zero page.
    Linux64 { entry: u64, boot_params: u64 },
}

/// Loads kernel, initramfs and command line into `mem` and writes the boot structures.
pub fn load_guest(
    mem: &GuestRam,
    ram_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let kname = kernel.display().to_string();
    let mut kfile = File::open(kernel).map_err(|e| BootError::KernelOpen(kname.clone(), e))?;
    let mut magic = [0u8; 4];
    let is_elf = kfile.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    let loaded: KernelLoaderResult = if is_elf {
        Elf::load(mem, None, &mut kfile, high)
    } else {
        BzImage::load(mem, None, &mut kfile, high)
    }
    .map_err(|e| BootError::KernelLoad(kname.clone(), e))?;

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::CmdlineLoad)?;
    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);

    let initrd = match initramfs {
        Some(p) => {
            let max = loaded
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(u64::from(u32::MAX));
            Some(load_initramfs(mem, ram_size, p, loaded.kernel_end, max)?)
        }
        None => None,
    };

    let e820 = memory_map(ram_size);
    match (is_elf, loaded.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_start_info(mem, &e820, initrd)?;
            Ok(BootEntry::Pvh {
                entry: entry.raw_value(),
                start_info: PVH_INFO_START,
            })
        }
        _ => {
            write_zero_page(mem, &e820, initrd, loaded.setup_header, cmdline_len)?;
            let entry = if is_elf {
                loaded.kernel_load.raw_value()
            } else {
                loaded.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET
            };
            Ok(BootEntry::Linux64 {
                entry,
                boot_params: ZERO_PAGE_START,
            })
        }
    }
}

/// Places the initramfs page-aligned as high as allowed, above the kernel. Returns (addr, size).
fn load_initramfs(
    mem: &GuestRam,
    ram_size: u64,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::InitramfsOpen(name.clone(), e))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| BootError::InitramfsOpen(name.clone(), e))?;
    f.rewind()
        .map_err(|e| BootError::InitramfsOpen(name.clone(), e))?;
    let top = ram_size.min(LOW_RAM_END).min(addr_max.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.next_multiple_of(0x1000) && size > 0)
        .ok_or(BootError::InitramfsTooBig(name.clone(), size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|_| BootError::InitramfsRead(name))?;
    Ok((addr, size))
}

/// The guest's memory map: (start, size, type).
fn memory_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_regions(ram_size) {
        // The first MiB was described above.
        let skip = HIGH_MEMORY_START.saturating_sub(start).min(size);
        map.push((start + skip, size - skip, E820_RAM));
    }
    // Linux checks that MMCONFIG is reserved before it uses it.
    map.push((ECAM_START, ECAM_SIZE, E820_RESERVED));
    map
}

fn write_pvh_start_info(
    mem: &GuestRam,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: ACPI_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestRam>(&params, mem).map_err(BootError::BootParams)
}

fn write_zero_page(
    mem: &GuestRam,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    setup_header: Option<linux_loader::bootparam::setup_header>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut bp = boot_params::default();
    if let Some(h) = setup_header {
        bp.hdr = h;
    } else {
        bp.hdr.header = KERNEL_HDR_MAGIC;
        bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    bp.hdr.loadflags |= CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = 0xfe00;
    bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
    bp.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    bp.acpi_rsdp_addr = ACPI_START;
    for (i, &(addr, size, type_)) in e820.iter().enumerate().take(bp.e820_table.len()) {
        bp.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        bp.e820_entries = i as u8 + 1;
    }
    let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestRam>(&params, mem).map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_reserves_ecam() {
        let m = memory_map(512 << 20);
        assert!(m.contains(&(HIGH_MEMORY_START, (512 << 20) - HIGH_MEMORY_START, E820_RAM)));
        assert!(m.contains(&(ECAM_START, ECAM_SIZE, E820_RESERVED)));
        let big = memory_map(4 << 30);
        assert!(big.contains(&(HIGH_RAM_START, (4 << 30) - LOW_RAM_END, E820_RAM)));
        assert!(big.contains(&(HIGH_MEMORY_START, LOW_RAM_END - HIGH_MEMORY_START, E820_RAM)));
    }

    #[test]
    fn rejects_missing_and_bogus_kernels() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e = load_guest(&mem, 64 << 20, Path::new("/nonexistent"), None, "").unwrap_err();
        assert!(e.to_string().contains("/nonexistent"));
        let dir = std::env::temp_dir().join(format!("hv-boot-test-{}", std::process::id()));
        std::fs::write(&dir, b"this is not a kernel").unwrap();
        let e = load_guest(&mem, 64 << 20, &dir, None, "").unwrap_err();
        assert!(matches!(e, BootError::KernelLoad(..)), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }
}
