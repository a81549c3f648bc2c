//! The panic boundary every export runs behind, and the thread-local
//! last-error message it maintains.
//!
//! An export's body goes inside `ffi_boundary!`, which runs it under
//! `catch_unwind`: a panic never unwinds into C (that would abort the process
//! since Rust 1.81, or be undefined behaviour before). What the body returns
//! decides the bookkeeping ([`BoundaryResult`]): a `Result<(), Error>` becomes
//! a `pf_status` and sets or clears the last-error message; plain values pass
//! through.

use std::{
    any::Any,
    cell::RefCell,
    ffi::c_char,
    panic::{self, AssertUnwindSafe},
};

use crate::status::{pf_status, Error};

/// Runs an export's body behind the panic boundary.
///
/// `ffi_boundary! { body }` is for status-returning exports: the body
/// evaluates to `Result<(), Error>` (so `?` works) and the macro to a
/// `pf_status`. `ffi_boundary! { returns T; body }` is for the few exports
/// with another return type `T` (see [`BoundaryResult`] for which).
macro_rules! ffi_boundary {
    (returns $t:ty; $($body:tt)*) => {
        $crate::boundary::enter(move || -> $t { $($body)* })
    };
    ($($body:tt)*) => {
        $crate::boundary::enter(
            move || -> ::std::result::Result<(), $crate::status::Error> { $($body)* },
        )
    };
}

/// A value an export's body can produce, and what the export returns for it.
pub(crate) trait BoundaryResult {
    /// The export's C return type.
    type Output;
    /// The return value when the body finished.
    fn finish(self) -> Self::Output;
    /// The return value when the body panicked (the message is already set).
    fn panicked() -> Self::Output;
}

impl BoundaryResult for Result<(), Error> {
    type Output = pf_status;

    fn finish(self) -> pf_status {
        match self {
            Ok(()) => {
                clear_last_error();
                pf_status::PF_OK
            }
            Err(e) => {
                set_last_error(e.message);
                e.status
            }
        }
    }

    fn panicked() -> pf_status {
        pf_status::PF_ERR_PANIC
    }
}

/// A status returned as is, with the last-error slot left alone: for
/// `pf_last_error_message`, which must not overwrite what it reports.
pub(crate) struct Untracked(pub(crate) pf_status);

impl BoundaryResult for Untracked {
    type Output = pf_status;

    fn finish(self) -> pf_status {
        self.0
    }

    fn panicked() -> pf_status {
        pf_status::PF_ERR_PANIC
    }
}

impl BoundaryResult for () {
    type Output = ();

    fn finish(self) {}

    fn panicked() {}
}

impl BoundaryResult for u32 {
    type Output = u32;

    fn finish(self) -> u32 {
        self
    }

    fn panicked() -> u32 {
        0
    }
}

impl BoundaryResult for *const c_char {
    type Output = *const c_char;

    fn finish(self) -> *const c_char {
        self
    }

    fn panicked() -> *const c_char {
        c"PF_ERR_PANIC".as_ptr()
    }
}

/// The body of `ffi_boundary!`: runs `body`, turning a panic into
/// `R::panicked()` plus a last-error message.
#[inline]
pub(crate) fn enter<R: BoundaryResult>(body: impl FnOnce() -> R) -> R::Output {
    // AssertUnwindSafe: after a panic nothing the body captured is used again
    // by this call; the caller is told (PF_ERR_PANIC docs) to only free a
    // handle whose call panicked. Guest memory itself keeps its invariants at
    // every statement boundary (atomics, poison-tolerant locks).
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r.finish(),
        Err(payload) => {
            set_last_error(format!("panic in pagefold: {}", panic_text(&*payload)));
            // Dropping the payload runs its destructor, which could itself
            // panic; keep that from escaping too (and leak what it was).
            if let Err(again) = panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
            R::panicked()
        }
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic payload that is not a string)"
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Stores `message` as this thread's last error. NUL bytes, which would cut
/// the C string short, are replaced.
pub(crate) fn set_last_error(message: String) {
    let message = if message.contains('\0') {
        message.replace('\0', "\\0")
    } else {
        message
    };
    // `try_with`/`try_borrow_mut`: during thread teardown the slot may be
    // gone; a lost message is better than a panic.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = Some(message);
        }
    });
}

fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            if slot.is_some() {
                *slot = None;
            }
        }
    });
}

/// A copy of this thread's last error message ("" if none).
fn last_error() -> String {
    LAST_ERROR
        .try_with(|slot| slot.try_borrow().ok().and_then(|m| m.clone()))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Copies the message of the last failed call on this thread into `buf`.
///
/// `*needed` is always set (when `needed` is not NULL) to the buffer size the
/// whole message takes, terminating NUL included; it is 1 when there is no
/// message (the last call succeeded, or none was made on this thread).
///
/// - If `len >= *needed`, the message and its NUL are written and `PF_OK`
///   is returned.
/// - Otherwise `PF_ERR_BUFFER_TOO_SMALL` is returned and, if `len > 0`, the
///   first `len - 1` bytes of the message (cut at a character boundary) and a
///   NUL are written, so `buf` always holds a C string. Call with
///   `buf = NULL, len = 0` to ask for the size alone.
///
/// This call leaves the stored message in place, whatever it returns, so it
/// can be retried with a larger buffer.
///
/// Errors: `PF_ERR_NULL_POINTER` if `needed` is NULL, or `buf` is NULL while
/// `len > 0`.
///
/// # Safety
///
/// - `buf` is NULL or valid for writes of `len` bytes.
/// - `needed` is NULL or valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_last_error_message(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> pf_status {
    ffi_boundary! { returns Untracked;
        if needed.is_null() || (buf.is_null() && len > 0) {
            return Untracked(pf_status::PF_ERR_NULL_POINTER);
        }
        // SAFETY: `needed` is not NULL and `buf` is not NULL when `len > 0`
        // (both checked above); the caller guarantees they are valid for
        // writes of one `size_t` and `len` bytes.
        Untracked(unsafe { copy_message(&last_error(), buf, len, needed) })
    }
}

/// The body of `pf_last_error_message` once its pointers are checked.
///
/// # Safety
///
/// `needed` is valid for a write of one `usize`; `buf` is valid for writes
/// of `len` bytes (so not NULL if `len > 0`).
unsafe fn copy_message(msg: &str, buf: *mut c_char, len: usize, needed: *mut usize) -> pf_status {
    // SAFETY: guaranteed by the caller; unaligned writes are allowed.
    unsafe { needed.write_unaligned(msg.len() + 1) };
    if len == 0 {
        return pf_status::PF_ERR_BUFFER_TOO_SMALL;
    }
    let mut n = msg.len().min(len - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `buf` is valid for `len` byte writes (caller), `n + 1 <= len`
    // bytes are written, and `msg` (a Rust string) cannot overlap the C
    // caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
        buf.add(n).write(0);
    }
    if n == msg.len() {
        pf_status::PF_OK
    } else {
        pf_status::PF_ERR_BUFFER_TOO_SMALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicking_body_returns_panic_status_and_sets_message() {
        set_last_error("stale".to_owned());
        let s: pf_status = ffi_boundary! {
            if last_error() == "stale" {
                panic!("boom {}", 42);
            }
            Ok(())
        };
        assert_eq!(s, pf_status::PF_ERR_PANIC);
        assert_eq!(last_error(), "panic in pagefold: boom 42");

        let v: u32 = ffi_boundary! { returns u32; panic!("static message") };
        assert_eq!(v, 0);
        assert_eq!(last_error(), "panic in pagefold: static message");

        let p = ffi_boundary! { returns *const c_char;
            std::panic::panic_any(7_i32)
        };
        // SAFETY: `panicked()` returns a static C string.
        assert_eq!(unsafe { std::ffi::CStr::from_ptr(p) }, c"PF_ERR_PANIC");
        assert!(last_error().contains("not a string"));
    }

    #[test]
    fn error_sets_message_and_success_clears_it() {
        let s: pf_status = ffi_boundary! { Err(Error::null("buf")) };
        assert_eq!(s, pf_status::PF_ERR_NULL_POINTER);
        assert_eq!(last_error(), "argument `buf` is NULL");
        let s: pf_status = ffi_boundary! { Ok(()) };
        assert_eq!(s, pf_status::PF_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn last_error_is_per_thread() {
        set_last_error("main thread".to_owned());
        let other = std::thread::spawn(last_error).join().ok();
        assert_eq!(other.as_deref(), Some(""));
        assert_eq!(last_error(), "main thread");
    }

    #[test]
    fn message_copy_truncates_and_reports_size() {
        set_last_error("héllo\0x".to_owned());
        let mut need = 0usize;
        // SAFETY: NULL/0 asks for the size; `need` is a valid out-pointer.
        let s = unsafe { pf_last_error_message(std::ptr::null_mut(), 0, &mut need) };
        assert_eq!(s, pf_status::PF_ERR_BUFFER_TOO_SMALL);
        assert_eq!(need, "héllo\\0x".len() + 1);

        // Room for "h" plus the first byte of "é": cut before "é".
        let mut small = [0x55 as c_char; 3];
        // SAFETY: `small` is valid for 3 bytes.
        let s = unsafe { pf_last_error_message(small.as_mut_ptr(), 3, &mut need) };
        assert_eq!(s, pf_status::PF_ERR_BUFFER_TOO_SMALL);
        assert_eq!(small[..2], [b'h' as c_char, 0]);

        let mut big = [0 as c_char; 64];
        // SAFETY: `big` is valid for 64 bytes.
        let s = unsafe { pf_last_error_message(big.as_mut_ptr(), big.len(), &mut need) };
        assert_eq!(s, pf_status::PF_OK);
        // SAFETY: the call wrote a NUL-terminated string into `big`.
        let got = unsafe { std::ffi::CStr::from_ptr(big.as_ptr()) };
        assert_eq!(got.to_str().ok(), Some("héllo\\0x"));
        assert_eq!(last_error(), "héllo\\0x", "reading does not clear");

        // SAFETY: NULL arguments are checked, never dereferenced.
        let s = unsafe { pf_last_error_message(big.as_mut_ptr(), 1, std::ptr::null_mut()) };
        assert_eq!(s, pf_status::PF_ERR_NULL_POINTER);
        // SAFETY: as above.
        let s = unsafe { pf_last_error_message(std::ptr::null_mut(), 4, &mut need) };
        assert_eq!(s, pf_status::PF_ERR_NULL_POINTER);
        assert_eq!(last_error(), "héllo\\0x", "failures here do not overwrite");
    }
}
