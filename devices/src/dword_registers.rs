//! Decoding of I/O register blocks made of aligned 32-bit registers, as the AML that drives them
//! declares its fields (`DWordAcc`): the ACPI hot-plug controller and the `_OSC` report.

use vm_device::bus::PioAddressOffset;

/// The offset of the register an access of `len` bytes at `offset` hits in a block of
/// `block_len` ports, if it is an aligned 32-bit access inside the block; `None` for any other
/// access, which is counted in `ignored` (the device then reads all-ones and drops writes).
pub(crate) fn decode(
    offset: PioAddressOffset,
    len: usize,
    block_len: u16,
    ignored: &mut u64,
) -> Option<u16> {
    let reg = (len == 4 && offset.is_multiple_of(4) && offset < block_len).then_some(offset);
    if reg.is_none() {
        *ignored += 1;
    }
    reg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_aligned_dwords_inside_the_block() {
        let mut ignored = 0;
        assert_eq!(decode(0, 4, 16, &mut ignored), Some(0));
        assert_eq!(decode(12, 4, 16, &mut ignored), Some(12));
        assert_eq!(ignored, 0);
        let bad = [
            (16, 4),
            (2, 4),
            (0, 2),
            (0, 1),
            (0, 8),
            (0, 0),
            (u16::MAX, 4),
        ];
        for (offset, len) in bad {
            assert_eq!(
                decode(offset, len, 16, &mut ignored),
                None,
                "{offset}/{len}"
            );
        }
        assert_eq!(ignored, bad.len() as u64);
    }
}
