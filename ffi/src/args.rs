//! Checked conversions of C arguments into Rust values: NULL and length
//! checks happen here, once, so exports cannot forget them.
//!
//! Each `unsafe fn` here takes the raw pointer's validity from its caller
//! (ultimately from the export's `# Safety` section) and checks everything a
//! C caller can get wrong without breaking that contract: NULL, lengths that
//! no object can have, and struct sizes.

use std::{ffi::c_void, marker::PhantomData, mem::size_of, ptr::NonNull};

use crate::status::{pf_status, Error};

/// An out-parameter that was checked for NULL; written at most once.
pub(crate) struct Out<'a, T> {
    ptr: NonNull<T>,
    _borrow: PhantomData<&'a mut T>,
}

impl<T> Out<'_, T> {
    /// Stores the result.
    pub(crate) fn write(self, value: T) {
        // SAFETY: `out` built `self` from a non-NULL pointer that its caller
        // guarantees valid for a write of `T` during 'a; `write_unaligned`
        // needs no alignment.
        unsafe { self.ptr.as_ptr().write_unaligned(value) }
    }
}

/// Checks the out-parameter `p` (named `arg` in messages) for NULL.
///
/// # Safety
///
/// `p` is NULL or valid for a write of one `T` (any alignment) for `'a`.
pub(crate) unsafe fn out<'a, T>(p: *mut T, arg: &str) -> Result<Out<'a, T>, Error> {
    let ptr = NonNull::new(p).ok_or_else(|| Error::null(arg))?;
    Ok(Out {
        ptr,
        _borrow: PhantomData,
    })
}

/// Borrows the object behind a handle.
///
/// # Safety
///
/// `p` is NULL or points to a live `T` that is not freed during `'a`.
pub(crate) unsafe fn handle<'a, T>(p: *const T, arg: &str) -> Result<&'a T, Error> {
    // SAFETY: `as_ref` checks NULL; otherwise the caller guarantees a live
    // `T` (handles are aligned: they come from `Box::into_raw`).
    unsafe { p.as_ref() }.ok_or_else(|| Error::null(arg))
}

/// Checks a caller buffer of `len` bytes at `p`: NULL is allowed only with
/// `len == 0`; `len` must be a size an object can have and must not wrap
/// the address space.
fn check_buffer(p: *const c_void, len: usize, arg: &str) -> Result<(), Error> {
    if p.is_null() {
        return Err(Error::null(arg));
    }
    if len > isize::MAX.unsigned_abs() {
        return Err(Error::invalid(format!(
            "length {len} of `{arg}` exceeds PTRDIFF_MAX"
        )));
    }
    if (p as usize).checked_add(len).is_none() {
        return Err(Error::invalid(format!(
            "`{arg}` ({p:p}) plus length {len} wraps the address space"
        )));
    }
    Ok(())
}

/// The `len` bytes at `p` as a slice.
///
/// # Safety
///
/// Unless `len` is 0, `p` is NULL or valid for reads of `len` bytes that
/// nothing writes during `'a`.
pub(crate) unsafe fn bytes<'a>(p: *const c_void, len: usize, arg: &str) -> Result<&'a [u8], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    check_buffer(p, len, arg)?;
    // `p` is not NULL and `len <= isize::MAX` without wrapping (checked).
    // SAFETY: the caller guarantees `len` readable bytes, unchanged during
    // 'a; any byte is a valid `u8`, which needs no alignment.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// The `len` bytes at `p` as a mutable slice.
///
/// # Safety
///
/// Unless `len` is 0, `p` is NULL or valid for reads and writes of `len`
/// bytes that nothing else reads or writes during `'a`.
pub(crate) unsafe fn bytes_mut<'a>(
    p: *mut c_void,
    len: usize,
    arg: &str,
) -> Result<&'a mut [u8], Error> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_buffer(p, len, arg)?;
    // SAFETY: as in `bytes`, plus the caller guarantees exclusive access
    // during 'a.
    Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
}

/// Plain data that C hands over in arrays: every bit pattern is a valid
/// value, so copying one out of C memory cannot produce an invalid value.
///
/// # Safety
///
/// Implementors are `#[repr(C)]` (or primitive) integers, or structs of
/// them, with no padding-dependent invariants.
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: an integer is valid for every bit pattern.
unsafe impl Plain for u64 {}
// SAFETY: as for `u64`.
unsafe impl Plain for u32 {}
// SAFETY: a raw pointer is valid for every bit pattern (it is only
// checked and dereferenced later, under its own contract), like an integer.
unsafe impl Plain for *const std::ffi::c_char {}

/// Copies the caller's array of `count` `T`s at `p` (named `arg` in
/// messages; `count_arg` names the count). NULL is allowed only with
/// `count == 0`; a count no array can have is refused, and so is one that
/// the allocator cannot hold, before anything is read.
///
/// # Safety
///
/// Unless `count` is 0, `p` is NULL or valid for reads of `count` `T`s (any
/// alignment) during the call.
pub(crate) unsafe fn array<T: Plain>(
    p: *const T,
    count: usize,
    arg: &str,
    count_arg: &str,
) -> Result<Vec<T>, Error> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(Error::null(arg));
    }
    let fits = count
        .checked_mul(size_of::<T>())
        .filter(|bytes| *bytes <= isize::MAX.unsigned_abs())
        .and_then(|bytes| (p as usize).checked_add(bytes))
        .is_some();
    if !fits {
        return Err(Error::invalid(format!(
            "{count_arg} {count} is larger than any array can be"
        )));
    }
    let mut items = Vec::new();
    items
        .try_reserve_exact(count)
        .map_err(|e| Error::invalid(format!("{count_arg} {count}: {e}")))?;
    for i in 0..count {
        // `i < count`, and the offset does not wrap (checked above).
        // SAFETY: `count` readable elements at `p` (caller); no alignment
        // needed; every bit pattern is a valid `T` (`Plain` contract).
        items.push(unsafe { p.add(i).read_unaligned() });
    }
    Ok(items)
}

/// A struct that starts with `size_t struct_size` so later versions can grow
/// it: callers set `struct_size` to the `sizeof` they were compiled with.
///
/// # Safety
///
/// Implementors are `#[repr(C)]`, their first field is `struct_size: usize`,
/// and every bit pattern is a valid value (integers and raw pointers only),
/// so reading one from C memory cannot produce an invalid value.
pub(crate) unsafe trait SizePrefixed: Copy {
    /// The C type name, for messages.
    const NAME: &'static str;
    /// Size of the struct's first published version: a caller compiled
    /// against it passes this `struct_size`, and is served (fields added
    /// since are neither read nor written). At most `size_of::<Self>()`.
    const FIRST_SIZE: usize = size_of::<Self>();
}

/// Reads `*p` after checking `p` for NULL and its `struct_size` against the
/// struct's first version. A caller compiled against an older, shorter
/// version is read up to its `struct_size`, the fields added since as zero
/// (their defaults); bytes past this version's struct are ignored.
///
/// # Safety
///
/// `p` is NULL or valid for reads of a `size_t`, and of `struct_size` bytes
/// if that is at least `T::FIRST_SIZE`.
pub(crate) unsafe fn read_sized<T: SizePrefixed>(p: *const T, arg: &str) -> Result<T, Error> {
    if p.is_null() {
        return Err(Error::null(arg));
    }
    // `struct_size` is the first field of `T` (`SizePrefixed` contract).
    // SAFETY: `p` is not NULL and readable for a `size_t` (caller), at
    // offset 0; `read_unaligned` needs no alignment.
    let declared = unsafe { p.cast::<usize>().read_unaligned() };
    let n = check_size::<T>(declared, arg)?;
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    // 1. `n <= declared` bytes at `p` are readable (caller, and checked);
    // 2. `n <= size_of::<T>()` bytes fit in `value`; the two do not overlap;
    // 3. all zeros, and then any bytes, are a valid `T` (`SizePrefixed`
    //    contract), so `value` is initialised either way.
    // SAFETY: 1-3 above.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), value.as_mut_ptr().cast::<u8>(), n);
        Ok(value.assume_init())
    }
}

/// Checks `struct_size` against the struct's first version; returns how
/// many bytes of it this version uses: the whole struct, or, for a caller
/// between the first version and this one, the first version's size (no
/// field is ever read or written in part).
fn check_size<T: SizePrefixed>(declared: usize, arg: &str) -> Result<usize, Error> {
    if declared < T::FIRST_SIZE {
        return Err(Error::new(
            pf_status::PF_ERR_STRUCT_TOO_SMALL,
            format!(
                "`{arg}`->struct_size is {declared}, but {} needs at least {}",
                T::NAME,
                T::FIRST_SIZE
            ),
        ));
    }
    Ok(if declared >= size_of::<T>() {
        size_of::<T>()
    } else {
        T::FIRST_SIZE
    })
}

/// A size-prefixed out-parameter whose pointer and `struct_size` were
/// checked; written at most once, up to the size its caller declared.
pub(crate) struct SizedOut<'a, T> {
    ptr: NonNull<T>,
    /// Bytes to write: what `check_size` returned.
    len: usize,
    _borrow: PhantomData<&'a mut T>,
}

impl<T: SizePrefixed> SizedOut<'_, T> {
    /// Stores the result: as many bytes as the caller's version has, with
    /// `struct_size` set to that many (the fields it filled in). Bytes past
    /// them are left alone.
    pub(crate) fn write(self, value: T) {
        let mut value = value;
        let len = self.len;
        // SAFETY: `struct_size: usize` is the first field (`SizePrefixed`
        // contract), so offset 0 of `value` holds it; `write_unaligned`
        // needs no alignment.
        unsafe {
            std::ptr::addr_of_mut!(value)
                .cast::<usize>()
                .write_unaligned(len)
        };
        // 1. `sized_out` checked the pointer and that the caller declared at
        //    least `len` bytes, valid for writes during 'a (its contract);
        // 2. `len <= size_of::<T>()` bytes of `value` are readable; the
        //    caller's struct and `value` (a local) do not overlap.
        // SAFETY: 1-2 above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                std::ptr::addr_of!(value).cast::<u8>(),
                self.ptr.as_ptr().cast::<u8>(),
                len,
            );
        }
    }
}

/// Checks a size-prefixed out-parameter: not NULL, and `struct_size` at
/// least the struct's first version's size.
///
/// # Safety
///
/// `p` is NULL or valid for reads of a `size_t`, and for reads and writes of
/// `struct_size` bytes if that is at least `T::FIRST_SIZE`, during `'a`.
pub(crate) unsafe fn sized_out<'a, T: SizePrefixed>(
    p: *mut T,
    arg: &str,
) -> Result<SizedOut<'a, T>, Error> {
    let ptr = NonNull::new(p).ok_or_else(|| Error::null(arg))?;
    // SAFETY: as the first read in `read_sized`.
    let declared = unsafe { p.cast::<usize>().read_unaligned() };
    let len = check_size::<T>(declared, arg)?;
    Ok(SizedOut {
        ptr,
        len,
        _borrow: PhantomData,
    })
}
