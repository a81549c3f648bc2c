//! The raw VM ioctls pagefold issues on a VM fd it may not have created
//! (an adopted VM is a plain fd, not a kvm-ioctls `VmFd`): their numbers
//! and thin wrappers.

use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
};
#[cfg(target_arch = "x86_64")]
use kvm_bindings::{kvm_clock_data, kvm_pit_state2};

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
/// `_IOWR(KVMIO, 0x62, struct kvm_irqchip)` (520 bytes: chip id, pad, a
/// 512-byte union: [`IrqchipArg`]).
#[cfg(target_arch = "x86_64")]
pub(super) const KVM_GET_IRQCHIP: u32 =
    kvm_ioc(IOC_READ | IOC_WRITE, 0x62, size_of::<IrqchipArg>());
/// `_IOR(KVMIO, 0x63, struct kvm_irqchip)` (the kernel's number says
/// "read" though it reads the struct: as the header defines it).
#[cfg(target_arch = "x86_64")]
pub(super) const KVM_SET_IRQCHIP: u32 = kvm_ioc(IOC_READ, 0x63, size_of::<IrqchipArg>());
/// `_IOW(KVMIO, 0x7b, struct kvm_clock_data)`.
#[cfg(target_arch = "x86_64")]
pub(super) const KVM_SET_CLOCK: u32 = kvm_ioc(IOC_WRITE, 0x7b, size_of::<kvm_clock_data>());
/// `_IOR(KVMIO, 0x7c, struct kvm_clock_data)`.
#[cfg(target_arch = "x86_64")]
pub(super) const KVM_GET_CLOCK: u32 = kvm_ioc(IOC_READ, 0x7c, size_of::<kvm_clock_data>());
/// `_IOR(KVMIO, 0x9f, struct kvm_pit_state2)`.
#[cfg(target_arch = "x86_64")]
pub(super) const KVM_GET_PIT2: u32 = kvm_ioc(IOC_READ, 0x9f, size_of::<kvm_pit_state2>());
/// `_IOW(KVMIO, 0xa0, struct kvm_pit_state2)`.
#[cfg(target_arch = "x86_64")]
pub(super) const KVM_SET_PIT2: u32 = kvm_ioc(IOC_WRITE, 0xa0, size_of::<kvm_pit_state2>());
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub(super) const KVM_CLEAR_DIRTY_LOG: u32 =
    kvm_ioc(IOC_READ | IOC_WRITE, 0xc0, size_of::<kvm_clear_dirty_log>());

/// `struct kvm_irqchip` as bytes: the chip id, then the 512-byte union
/// (a PIC's 16-byte `kvm_pic_state`, or `kvm_ioapic_state`) read by
/// hand, so no union field is ever read.
#[cfg(target_arch = "x86_64")]
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct IrqchipArg {
    pub(super) chip_id: u32,
    pub(super) pad: u32,
    pub(super) chip: [u8; 512],
}

#[cfg(target_arch = "x86_64")]
const _: () = assert!(size_of::<IrqchipArg>() == size_of::<kvm_bindings::kvm_irqchip>());

/// A VM ioctl whose argument is a `T` the kernel reads or writes in place.
///
/// # Safety
///
/// `nr` is an ioctl whose argument is a pointer to a `T` (its size is the
/// one in `nr`), which the kernel reads or writes only within, and for
/// which any bytes the kernel writes are a valid `T` (plain integers).
#[cfg(target_arch = "x86_64")]
unsafe fn vm_ioctl_arg<T>(
    vm: BorrowedFd<'_>,
    nr: u32,
    arg: &mut T,
    op: &'static str,
) -> Result<(), KvmError> {
    // SAFETY: the kernel reads or writes `size_of::<T>()` bytes at `arg`
    // (the caller's promise on `nr`), which is live and exclusive for the
    // call.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), nr as libc::Ioctl, std::ptr::from_mut(arg)) };
    if r < 0 {
        return Err(last_os_error(op));
    }
    Ok(())
}

/// `KVM_GET_IRQCHIP` of chip `chip_id` (0 master PIC, 1 slave PIC, 2
/// IOAPIC): its 512 union bytes. `ENXIO`: the VM has no in-kernel irqchip.
#[cfg(target_arch = "x86_64")]
pub(super) fn get_irqchip(vm: BorrowedFd<'_>, chip_id: u32) -> Result<[u8; 512], KvmError> {
    let mut a = IrqchipArg {
        chip_id,
        pad: 0,
        chip: [0; 512],
    };
    // SAFETY: KVM_GET_IRQCHIP's argument is a `struct kvm_irqchip`, which
    // `IrqchipArg` lays out (size asserted above); it is all integers.
    unsafe { vm_ioctl_arg(vm, KVM_GET_IRQCHIP, &mut a, "KVM_GET_IRQCHIP") }?;
    Ok(a.chip)
}

/// `KVM_SET_IRQCHIP` of chip `chip_id` with its 512 union bytes.
#[cfg(target_arch = "x86_64")]
pub(super) fn set_irqchip(
    vm: BorrowedFd<'_>,
    chip_id: u32,
    chip: [u8; 512],
) -> Result<(), KvmError> {
    let mut a = IrqchipArg {
        chip_id,
        pad: 0,
        chip,
    };
    // SAFETY: KVM_SET_IRQCHIP reads a `struct kvm_irqchip`, which
    // `IrqchipArg` lays out (size asserted above).
    unsafe { vm_ioctl_arg(vm, KVM_SET_IRQCHIP, &mut a, "KVM_SET_IRQCHIP") }
}

/// `KVM_GET_CLOCK`.
#[cfg(target_arch = "x86_64")]
pub(super) fn get_clock(vm: BorrowedFd<'_>) -> Result<kvm_clock_data, KvmError> {
    let mut c = kvm_clock_data::default();
    // SAFETY: KVM_GET_CLOCK writes a `struct kvm_clock_data` (all
    // integers), which kvm-bindings lays out as the kernel does.
    unsafe { vm_ioctl_arg(vm, KVM_GET_CLOCK, &mut c, "KVM_GET_CLOCK") }?;
    Ok(c)
}

/// `KVM_SET_CLOCK`.
#[cfg(target_arch = "x86_64")]
pub(super) fn set_clock(vm: BorrowedFd<'_>, clock: &kvm_clock_data) -> Result<(), KvmError> {
    let mut c = *clock;
    // SAFETY: KVM_SET_CLOCK reads a `struct kvm_clock_data`.
    unsafe { vm_ioctl_arg(vm, KVM_SET_CLOCK, &mut c, "KVM_SET_CLOCK") }
}

/// `KVM_GET_PIT2`. `ENXIO`: the VM has no in-kernel PIT.
#[cfg(target_arch = "x86_64")]
pub(super) fn get_pit2(vm: BorrowedFd<'_>) -> Result<kvm_pit_state2, KvmError> {
    let mut p = kvm_pit_state2::default();
    // SAFETY: KVM_GET_PIT2 writes a `struct kvm_pit_state2` (all
    // integers), which kvm-bindings lays out as the kernel does.
    unsafe { vm_ioctl_arg(vm, KVM_GET_PIT2, &mut p, "KVM_GET_PIT2") }?;
    Ok(p)
}

/// `KVM_SET_PIT2`.
#[cfg(target_arch = "x86_64")]
pub(super) fn set_pit2(vm: BorrowedFd<'_>, pit: &kvm_pit_state2) -> Result<(), KvmError> {
    let mut p = *pit;
    // SAFETY: KVM_SET_PIT2 reads a `struct kvm_pit_state2`.
    unsafe { vm_ioctl_arg(vm, KVM_SET_PIT2, &mut p, "KVM_SET_PIT2") }
}

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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vm_state_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_SET_IRQCHIP, 0x8208_ae63);
        assert_eq!(KVM_SET_CLOCK, 0x4030_ae7b);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_GET_PIT2, 0x8070_ae9f);
        assert_eq!(KVM_SET_PIT2, 0x4070_aea0);
    }
}
