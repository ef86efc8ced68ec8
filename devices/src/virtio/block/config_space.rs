//! The device-specific configuration space, `struct virtio_blk_config` (Virtio 1.2 §5.2.4).
//!
//! Built once as little-endian bytes; the driver reads it at any offset and size. Nothing in it
//! is writable: the device does not offer VIRTIO_BLK_F_CONFIG_WCE, so `writeback` is read-only.

/// Byte offsets of the fields of `struct virtio_blk_config` (§5.2.4).
mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const GEOMETRY: usize = 16;
    pub const BLK_SIZE: usize = 20;
    pub const TOPOLOGY: usize = 24;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// End of the fields this device exposes (the secure-erase and zoned fields that follow
    /// belong to features it does not offer).
    pub const END: usize = 60;
}

/// Values the configuration space reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigValues {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Maximum number of data segments in a request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// 1 when the device has a write-back cache the driver must flush (VIRTIO_BLK_F_FLUSH).
    pub writeback: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Discard limits (VIRTIO_BLK_F_DISCARD): sectors per segment, segments per request and
    /// alignment in sectors.
    pub max_discard_sectors: u32,
    /// See `max_discard_sectors`.
    pub max_discard_seg: u32,
    /// See `max_discard_sectors`.
    pub discard_sector_alignment: u32,
    /// Write-zeroes limits (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// See `max_write_zeroes_sectors`.
    pub max_write_zeroes_seg: u32,
    /// 1 when a write-zeroes request with the unmap flag may deallocate sectors.
    pub write_zeroes_may_unmap: u8,
}

/// The serialized configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; offset::END],
}

impl ConfigSpace {
    /// Lays out `values` as the driver sees them. `size_max`, `geometry` and `topology` stay
    /// zero: the matching features are not offered.
    pub fn new(values: &ConfigValues) -> Self {
        let mut bytes = [0u8; offset::END];
        let mut put = |at: usize, field: &[u8]| bytes[at..at + field.len()].copy_from_slice(field);
        put(offset::CAPACITY, &values.capacity.to_le_bytes());
        put(offset::SIZE_MAX, &0u32.to_le_bytes());
        put(offset::SEG_MAX, &values.seg_max.to_le_bytes());
        put(offset::GEOMETRY, &[0; 4]);
        put(offset::BLK_SIZE, &values.blk_size.to_le_bytes());
        put(offset::TOPOLOGY, &[0; 8]);
        put(offset::WRITEBACK, &[values.writeback]);
        put(offset::NUM_QUEUES, &values.num_queues.to_le_bytes());
        put(
            offset::MAX_DISCARD_SECTORS,
            &values.max_discard_sectors.to_le_bytes(),
        );
        put(
            offset::MAX_DISCARD_SEG,
            &values.max_discard_seg.to_le_bytes(),
        );
        put(
            offset::DISCARD_SECTOR_ALIGNMENT,
            &values.discard_sector_alignment.to_le_bytes(),
        );
        put(
            offset::MAX_WRITE_ZEROES_SECTORS,
            &values.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            offset::MAX_WRITE_ZEROES_SEG,
            &values.max_write_zeroes_seg.to_le_bytes(),
        );
        put(
            offset::WRITE_ZEROES_MAY_UNMAP,
            &[values.write_zeroes_may_unmap],
        );
        ConfigSpace { bytes }
    }

    /// Copies the bytes at `offset..offset + data.len()` into `data`; bytes beyond the end of
    /// the structure read as zero. Never panics, whatever `offset` and `data.len()` are.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= self.bytes.len() {
            return;
        }
        let n = data.len().min(self.bytes.len() - start);
        data[..n].copy_from_slice(&self.bytes[start..start + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn offsets_match_the_linux_header() {
        assert_eq!(offset::CAPACITY, offset_of!(virtio_blk_config, capacity));
        assert_eq!(offset::SIZE_MAX, offset_of!(virtio_blk_config, size_max));
        assert_eq!(offset::SEG_MAX, offset_of!(virtio_blk_config, seg_max));
        assert_eq!(offset::GEOMETRY, offset_of!(virtio_blk_config, geometry));
        assert_eq!(offset::BLK_SIZE, offset_of!(virtio_blk_config, blk_size));
        assert_eq!(
            offset::TOPOLOGY,
            offset_of!(virtio_blk_config, physical_block_exp)
        );
        assert_eq!(offset::WRITEBACK, offset_of!(virtio_blk_config, wce));
        assert_eq!(
            offset::NUM_QUEUES,
            offset_of!(virtio_blk_config, num_queues)
        );
        assert_eq!(
            offset::MAX_DISCARD_SECTORS,
            offset_of!(virtio_blk_config, max_discard_sectors)
        );
        assert_eq!(
            offset::MAX_DISCARD_SEG,
            offset_of!(virtio_blk_config, max_discard_seg)
        );
        assert_eq!(
            offset::DISCARD_SECTOR_ALIGNMENT,
            offset_of!(virtio_blk_config, discard_sector_alignment)
        );
        assert_eq!(
            offset::MAX_WRITE_ZEROES_SECTORS,
            offset_of!(virtio_blk_config, max_write_zeroes_sectors)
        );
        assert_eq!(
            offset::MAX_WRITE_ZEROES_SEG,
            offset_of!(virtio_blk_config, max_write_zeroes_seg)
        );
        assert_eq!(
            offset::WRITE_ZEROES_MAY_UNMAP,
            offset_of!(virtio_blk_config, write_zeroes_may_unmap)
        );
        assert_eq!(
            offset::END,
            offset_of!(virtio_blk_config, max_secure_erase_sectors)
        );
    }

    fn sample() -> ConfigSpace {
        ConfigSpace::new(&ConfigValues {
            capacity: 0x0102_0304_0506_0708,
            seg_max: 254,
            blk_size: 512,
            writeback: 1,
            num_queues: 4,
            max_discard_sectors: 7,
            max_discard_seg: 8,
            discard_sector_alignment: 9,
            max_write_zeroes_sectors: 10,
            max_write_zeroes_seg: 11,
            write_zeroes_may_unmap: 1,
        })
    }

    #[test]
    fn fields_are_little_endian() {
        let cs = sample();
        let mut cap = [0u8; 8];
        cs.read(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0x0102_0304_0506_0708);
        let mut q = [0u8; 2];
        cs.read(34, &mut q);
        assert_eq!(u16::from_le_bytes(q), 4);
        let mut seg = [0u8; 4];
        cs.read(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let mut b = [0u8; 1];
        cs.read(56, &mut b);
        assert_eq!(b, [1]);
    }

    #[test]
    fn byte_granular_and_out_of_range_reads() {
        let cs = sample();
        // One byte in the middle of capacity.
        let mut b = [0xffu8; 1];
        cs.read(3, &mut b);
        assert_eq!(b, [0x05]);
        // Straddling the end: the tail reads zero.
        let mut tail = [0xffu8; 8];
        cs.read(56, &mut tail);
        assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
        // Entirely beyond, and absurd offsets.
        for off in [60, 4096, u64::MAX, u64::MAX - 1] {
            let mut d = [0xffu8; 4];
            cs.read(off, &mut d);
            assert_eq!(d, [0; 4]);
        }
        // Empty reads are fine.
        cs.read(0, &mut []);
    }
}
