//! Copies between guest memory and Rust buffers that stay sound while guest
//! vCPUs (or other threads through raw pointers) write the same bytes.
//!
//! Guest memory is never seen through a Rust reference, so the compiler may
//! not assume it is unchanged between two reads; each copy is one opaque
//! operation. On x86-64 that is `rep movsb` (fast on every CPU with ERMS/FSRM,
//! which is every x86 server since 2013), and naturally aligned 1/2/4/8-byte
//! accesses are single volatile loads/stores so they are single-copy atomic,
//! as the guest expects of its own aligned accesses. A racing write shows up
//! as a mix of old and new bytes, never as undefined behaviour.

/// Whether a copy of `len` bytes at `addr` is one single-copy atomic access
/// in [`copy_from_guest`] and [`copy_to_guest`]: a naturally aligned 1, 2, 4
/// or 8 bytes.
#[inline]
pub(crate) fn is_single_copy(addr: *const u8, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && addr as usize % len == 0
}

/// Copies `dst.len()` bytes from `src` into `dst`.
///
/// # Safety
/// `src..src + dst.len()` must lie inside one live mapping that stays mapped
/// for the duration of the call.
#[inline]
pub(crate) unsafe fn copy_from_guest(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let d = dst.as_mut_ptr();
    // SAFETY: (for every arm) the caller guarantees `src..src+len` is mapped;
    // `d..d+len` is `dst`, exclusively borrowed; the integer arms only run
    // when `src` is aligned for the integer, and write `d` unaligned.
    unsafe {
        match len {
            8 if src as usize % 8 == 0 => d
                .cast::<u64>()
                .write_unaligned(src.cast::<u64>().read_volatile()),
            4 if src as usize % 4 == 0 => d
                .cast::<u32>()
                .write_unaligned(src.cast::<u32>().read_volatile()),
            2 if src as usize % 2 == 0 => d
                .cast::<u16>()
                .write_unaligned(src.cast::<u16>().read_volatile()),
            1 => *d = src.read_volatile(),
            _ => opaque_copy(src, d, len),
        }
    }
}

/// Copies `src` into guest memory at `dst`.
///
/// # Safety
/// `dst..dst + src.len()` must lie inside one live writable mapping that
/// stays mapped for the duration of the call.
#[inline]
pub(crate) unsafe fn copy_to_guest(dst: *mut u8, src: &[u8]) {
    let len = src.len();
    let s = src.as_ptr();
    // SAFETY: mirror of `copy_from_guest`: the caller guarantees the guest
    // side; `s..s+len` is `src`, borrowed for the call.
    unsafe {
        match len {
            8 if dst as usize % 8 == 0 => dst
                .cast::<u64>()
                .write_volatile(s.cast::<u64>().read_unaligned()),
            4 if dst as usize % 4 == 0 => dst
                .cast::<u32>()
                .write_volatile(s.cast::<u32>().read_unaligned()),
            2 if dst as usize % 2 == 0 => dst
                .cast::<u16>()
                .write_volatile(s.cast::<u16>().read_unaligned()),
            1 => dst.write_volatile(*s),
            _ => opaque_copy(s, dst, len),
        }
    }
}

/// Fills `len` guest bytes at `dst` with `byte`.
///
/// # Safety
/// As for [`copy_to_guest`].
pub(crate) unsafe fn fill_guest(dst: *mut u8, byte: u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `rep stosb` writes exactly `len` bytes at `dst`, which the
    // caller guarantees are mapped and writable; DF is clear per the ABI.
    unsafe {
        std::arch::asm!(
            "rep stosb",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            in("al") byte,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    for i in 0..len {
        // SAFETY: `i < len`, inside the range the caller vouches for.
        unsafe { dst.add(i).write_volatile(byte) };
    }
}

/// A copy the compiler cannot split, merge, repeat or elide.
///
/// # Safety
/// Both ranges are valid for `len` bytes and do not overlap.
#[inline]
unsafe fn opaque_copy(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `rep movsb` copies exactly `len` bytes from `src` to `dst`,
    // both valid per the caller; DF is clear per the ABI; no stack use.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    for i in 0..len {
        // SAFETY: `i < len`, inside both ranges the caller vouches for.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // byte patterns wrap on purpose
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_and_alignment() {
        let mut guest = vec![0u8; 256];
        for (i, b) in guest.iter_mut().enumerate() {
            *b = i as u8;
        }
        for off in 0..16 {
            for len in 0..40 {
                let mut out = vec![0xffu8; len];
                // SAFETY: off + len <= 56 < 256.
                unsafe { copy_from_guest(guest.as_ptr().add(off), &mut out) };
                assert_eq!(out, guest[off..off + len]);
                let src: Vec<u8> = (0..len).map(|i| (200 + i) as u8).collect();
                let mut target = guest.clone();
                // SAFETY: as above, in the clone.
                unsafe { copy_to_guest(target.as_mut_ptr().add(off), &src) };
                assert_eq!(target[off..off + len], src[..]);
                assert_eq!(target[..off], guest[..off]);
                assert_eq!(target[off + len..], guest[off + len..]);
            }
        }
        let mut z = vec![1u8; 100];
        // SAFETY: 10 + 50 <= 100.
        unsafe { fill_guest(z.as_mut_ptr().add(10), 0, 50) };
        assert!(z[10..60].iter().all(|&b| b == 0));
        assert!(z[..10].iter().chain(&z[60..]).all(|&b| b == 1));
    }
}
