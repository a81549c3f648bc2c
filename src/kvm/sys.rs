//! The raw VM ioctls pagefold issues on a VM fd it may not have created
//! (an adopted VM is a plain fd, not a kvm-ioctls `VmFd`): their numbers
//! and thin wrappers.

use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
};

use super::error::{last_os_error, KvmError};

/// `_IOC(dir, 0xAE, nr, size)` as `<asm-generic/ioctl.h>` builds it
/// (x86-64 and arm64 use the generic layout: dir in bits 30-31, size in
/// 16-29, type in 8-15, nr in 0-7).
const fn kvm_ioc(dir: u32, nr: u32, size: usize) -> u32 {
    assert!(size < 1 << 14, "_IOC size field is 14 bits");
    #[allow(clippy::cast_possible_truncation)] // checked above
    let size = size as u32;
    (dir << 30) | (size << 16) | (0xAE << 8) | nr
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
/// `_IO(KVMIO, 0x03)`.
pub(super) const KVM_CHECK_EXTENSION: u32 = kvm_ioc(0, 0x03, 0);
/// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
pub(super) const KVM_GET_DIRTY_LOG: u32 = kvm_ioc(IOC_WRITE, 0x42, size_of::<kvm_dirty_log>());
/// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
pub(super) const KVM_SET_USER_MEMORY_REGION: u32 =
    kvm_ioc(IOC_WRITE, 0x46, size_of::<kvm_userspace_memory_region>());
/// `_IOW(KVMIO, 0xa3, struct kvm_enable_cap)`.
pub(super) const KVM_ENABLE_CAP: u32 = kvm_ioc(IOC_WRITE, 0xa3, size_of::<kvm_enable_cap>());
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub(super) const KVM_CLEAR_DIRTY_LOG: u32 =
    kvm_ioc(IOC_READ | IOC_WRITE, 0xc0, size_of::<kvm_clear_dirty_log>());

/// `KVM_CHECK_EXTENSION` on the VM fd: the capability's value (0:
/// absent), or the error (not a KVM fd, or the VM is dead).
pub(super) fn check_extension(vm: BorrowedFd<'_>, cap: u32) -> Result<i32, KvmError> {
    // `vm` is a KVM VM fd: one `KvmVm` created, or one a VMM handed to
    // `KvmVm::adopt`, whose contract says so.
    // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value and
    // reads and writes no memory.
    let r = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_CHECK_EXTENSION as libc::Ioctl,
            libc::c_ulong::from(cap),
        )
    };
    if r < 0 {
        return Err(last_os_error("KVM_CHECK_EXTENSION"));
    }
    Ok(r)
}

/// `KVM_ENABLE_CAP` on the VM fd.
pub(super) fn enable_cap(vm: BorrowedFd<'_>, cap: &kvm_enable_cap) -> Result<(), KvmError> {
    // SAFETY: the kernel reads `*cap` (live for the call) and writes
    // nothing.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_ENABLE_CAP as libc::Ioctl, cap) };
    if r < 0 {
        return Err(last_os_error("KVM_ENABLE_CAP"));
    }
    Ok(())
}

/// `KVM_SET_USER_MEMORY_REGION` on the VM fd.
///
/// # Safety
///
/// With a non-zero `memory_size`, the guest (and KVM) may read and write
/// `memory_size` bytes at `userspace_addr` until the slot is deleted (or
/// the kernel VM is gone): the caller keeps that mapping alive so long.
pub(super) unsafe fn set_user_memory_region(
    vm: BorrowedFd<'_>,
    region: &kvm_userspace_memory_region,
) -> Result<(), KvmError> {
    // SAFETY: the kernel reads `*region` (live for the call); what the
    // slot then reaches is the caller's promise (above).
    let r = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_SET_USER_MEMORY_REGION as libc::Ioctl,
            region,
        )
    };
    if r < 0 {
        return Err(last_os_error("KVM_SET_USER_MEMORY_REGION"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> as built on x86-64 (QEMU and
        // kvm-ioctls use the same).
        assert_eq!(KVM_CHECK_EXTENSION, 0xae03);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_ENABLE_CAP, 0x4068_aea3);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
    }
}
