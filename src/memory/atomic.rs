//! Integers that guest memory supports atomic access to, mapped to their std
//! atomic types. Sealed: only the widths hardware guarantees.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

mod private {
    pub trait Sealed {}
}

/// An unsigned integer usable with [`GuestMemory::load`](super::GuestMemory::load)
/// and friends: `u8`, `u16`, `u32`, `u64`.
pub trait AtomicInt: bytemuck::Pod + Eq + std::fmt::Debug + private::Sealed {
    /// The std atomic of the same width.
    type Atomic;
    /// Size and required alignment in bytes.
    const SIZE: usize;

    /// Atomic load through `ptr`.
    ///
    /// # Safety
    /// `ptr` is aligned to `SIZE` and valid for reads for the call.
    unsafe fn load(ptr: *const u8, order: Ordering) -> Self;
    /// Atomic store through `ptr`.
    ///
    /// # Safety
    /// `ptr` is aligned to `SIZE` and valid for writes for the call.
    unsafe fn store(ptr: *mut u8, val: Self, order: Ordering);
    /// Atomic swap through `ptr`, returning the old value.
    ///
    /// # Safety
    /// `ptr` is aligned to `SIZE` and valid for writes for the call.
    unsafe fn swap(ptr: *mut u8, val: Self, order: Ordering) -> Self;
    /// Atomic compare-exchange through `ptr`.
    ///
    /// # Safety
    /// `ptr` is aligned to `SIZE` and valid for writes for the call.
    unsafe fn compare_exchange(
        ptr: *mut u8,
        current: Self,
        new: Self,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Self, Self>;
}

macro_rules! atomic_int {
    ($t:ty, $a:ty) => {
        impl private::Sealed for $t {}
        impl AtomicInt for $t {
            type Atomic = $a;
            const SIZE: usize = std::mem::size_of::<$t>();

            #[inline]
            unsafe fn load(ptr: *const u8, order: Ordering) -> Self {
                // SAFETY: the caller guarantees alignment and validity; the
                // atomic type has the same layout as the integer, and a
                // shared reference to an atomic permits concurrent mutation.
                unsafe { <$a>::from_ptr(ptr as *mut $t).load(order) }
            }

            #[inline]
            unsafe fn store(ptr: *mut u8, val: Self, order: Ordering) {
                // SAFETY: as for `load`.
                unsafe { <$a>::from_ptr(ptr.cast::<$t>()).store(val, order) }
            }

            #[inline]
            unsafe fn swap(ptr: *mut u8, val: Self, order: Ordering) -> Self {
                // SAFETY: as for `load`.
                unsafe { <$a>::from_ptr(ptr.cast::<$t>()).swap(val, order) }
            }

            #[inline]
            unsafe fn compare_exchange(
                ptr: *mut u8,
                current: Self,
                new: Self,
                success: Ordering,
                failure: Ordering,
            ) -> Result<Self, Self> {
                // SAFETY: as for `load`.
                unsafe {
                    <$a>::from_ptr(ptr.cast::<$t>())
                        .compare_exchange(current, new, success, failure)
                }
            }
        }
    };
}

atomic_int!(u8, AtomicU8);
atomic_int!(u16, AtomicU16);
atomic_int!(u32, AtomicU32);
atomic_int!(u64, AtomicU64);
