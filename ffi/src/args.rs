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
}

/// Reads `*p` after checking `p` for NULL and its `struct_size` against this
/// version's size. Bytes past this version's struct are ignored.
///
/// # Safety
///
/// `p` is NULL or valid for reads of a `size_t`, and of `struct_size` bytes
/// if that is at least `size_of::<T>()`.
pub(crate) unsafe fn read_sized<T: SizePrefixed>(p: *const T, arg: &str) -> Result<T, Error> {
    if p.is_null() {
        return Err(Error::null(arg));
    }
    // `struct_size` is the first field of `T` (`SizePrefixed` contract).
    // SAFETY: `p` is not NULL and readable for a `size_t` (caller), at
    // offset 0; `read_unaligned` needs no alignment.
    let declared = unsafe { p.cast::<usize>().read_unaligned() };
    check_size::<T>(declared, arg)?;
    // SAFETY:
    // - `declared >= size_of::<T>()` bytes are readable (caller, and checked);
    // - every bit pattern is a valid `T` (`SizePrefixed` contract).
    Ok(unsafe { p.read_unaligned() })
}

fn check_size<T: SizePrefixed>(declared: usize, arg: &str) -> Result<(), Error> {
    if declared < size_of::<T>() {
        return Err(Error::new(
            pf_status::PF_ERR_STRUCT_TOO_SMALL,
            format!(
                "`{arg}`->struct_size is {declared}, but {} needs at least {}",
                T::NAME,
                size_of::<T>()
            ),
        ));
    }
    Ok(())
}

/// A size-prefixed out-parameter whose pointer and `struct_size` were
/// checked; written at most once.
pub(crate) struct SizedOut<'a, T>(Out<'a, T>);

impl<T: SizePrefixed> SizedOut<'_, T> {
    /// Stores the result, whose `struct_size` says how many bytes this
    /// version filled in. Bytes past them are left alone.
    pub(crate) fn write(self, value: T) {
        self.0.write(value);
    }
}

/// Checks a size-prefixed out-parameter: not NULL, and `struct_size` at
/// least this version's size.
///
/// # Safety
///
/// `p` is NULL or valid for reads of a `size_t`, and for reads and writes of
/// `struct_size` bytes if that is at least `size_of::<T>()`, during `'a`.
pub(crate) unsafe fn sized_out<'a, T: SizePrefixed>(
    p: *mut T,
    arg: &str,
) -> Result<SizedOut<'a, T>, Error> {
    if p.is_null() {
        return Err(Error::null(arg));
    }
    // SAFETY: as the first read in `read_sized`.
    let declared = unsafe { p.cast::<usize>().read_unaligned() };
    check_size::<T>(declared, arg)?;
    // SAFETY: `p` is not NULL and, `struct_size` being large enough, valid
    // for a write of `T` (caller).
    Ok(SizedOut(unsafe { out(p, arg) }?))
}
