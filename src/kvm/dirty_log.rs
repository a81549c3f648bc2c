//! KVM's dirty log fetched into pagefold's dirty log.
//!
//! # Two modes
//!
//! - **Manual protection** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, Linux
//!   5.3+, used wherever KVM offers it unless
//!   [`KvmOptions::legacy_dirty_log`] asks otherwise): `KVM_GET_DIRTY_LOG`
//!   only copies KVM's bitmap out — it neither clears it nor write-protects
//!   anything — and `KVM_CLEAR_DIRTY_LOG` then clears exactly the bits this
//!   fetch saw and re-arms tracking of those pages (write protection, or the
//!   EPT dirty bit with PML). The get is a copy; the clear costs what was
//!   dirty (one call per slot covering the span from the first to the last
//!   dirty word), and the kernel takes the MMU lock only there.
//! - **Legacy** (no capability, or forced): `KVM_GET_DIRTY_LOG` swaps every
//!   word of KVM's bitmap to zero and write-protects the dirty pages under
//!   the MMU lock, in one call.
//!
//! Both fetch into one bitmap buffer per slot, kept between fetches (a raw
//! ioctl; kvm-ioctls' `get_dirty_log` allocates a fresh `Vec` per call),
//! and OR it into pagefold's log with [`GuestMemory::merge_dirty_bitmap`],
//! whose bitmaps are allocated when the VM is created so the merge cannot
//! fail for memory.
//!
//! # What the first fetch reports
//!
//! In both modes the first fetch reports the pages the guest wrote since
//! the VM was created, and every later fetch the pages written since the
//! fetch before. With [`KvmOptions::dirty_log_initially_set`], where KVM
//! offers `KVM_DIRTY_LOG_INITIALLY_SET`, it is enabled with manual
//! protection: slots then start with every bit set and
//! nothing write-protected (registering a large slot costs nothing), so
//! creation ends with one `KVM_CLEAR_DIRTY_LOG` of every page of every slot
//! — before any vCPU exists, with nothing mapped yet, so it only walks the
//! bitmap. A VMM that wants "everything is dirty" for the first round of a
//! migration marks it itself ([`GuestMemory::mark_dirty`]).
//!
//! A slot registered where a vCPU may already run — every slot of an
//! adopted VM (the VMM's vCPUs are not pagefold's to know of) and every
//! slot added with `add_slot` — is different under `INITIALLY_SET`: a
//! guest store between the registration and that clear sets no bit (the
//! bit is set already, the page not protected), and the clear would drop
//! it. So there the cleared bits go into pagefold's log: the next harvest
//! reports every page of such a slot once, too much but nothing lost.
//! Without `INITIALLY_SET`, KVM logs from the registration on, and
//! nothing is needed.
//!
//! The price of `INITIALLY_SET`: KVM then also write-protects (and, with
//! eager splitting, splits) the 2 MiB ranges of every word a clear covers
//! (`kvm_arch_mmu_enable_log_dirty_pt_masked`), for huge pages it may have
//! mapped before logging began. `benches/kvm_dirty_ratios.sh` measured
//! fetches of 1000 dirty pages 1.1-1.6x dearer with it than without it on
//! a PVM host. It pays only where logging starts on a slot a guest already
//! uses, which `KvmVm` never does (slots are registered with logging, and
//! for pagefold's own VM before any vCPU exists): so it is opt-in.
//!
//! # Why no guest write is lost (manual mode)
//!
//! Per slot a fetch does: get (copy KVM's bits), clear exactly those bits
//! in KVM (re-arming their pages; the kernel flushes the TLBs of every vCPU
//! before the ioctl returns), and only then merge them into pagefold's log,
//! from which a harvest takes them and the caller reads the pages' bytes.
//! Take a guest write to page P:
//!
//! - before the get: P's bit is set (or the write is in a vCPU's PML
//!   buffer, which the get flushes into the bitmap first); the get reports
//!   P; the write's bytes are in memory before the clear returns, and the
//!   harvest that reports P starts after the merge, so its copy sees them;
//! - between the get and the clear, P not reported by the get: the write
//!   sets P's bit, the clear leaves it (it clears only the bits it was
//!   given), the next fetch reports P;
//! - between the get and the clear, P reported by the get: P is still
//!   writable, so the write sets nothing, and the clear then clears P's bit
//!   — but P is reported by this fetch, and its bytes (stored before the
//!   clear's TLB flush completed) are read by a copy made after the harvest,
//!   which comes after the merge, which comes after the clear;
//! - after the clear: P is protected again; the write faults (or sets the
//!   dirty bit / PML entry) and sets P's bit; the next fetch reports it.
//!
//! This is why the clear comes *before* the merge: were the bits merged
//! first, a concurrent harvest could copy P, the guest write P again, and
//! the clear then drop that write's bit. Legacy mode is the same argument
//! with get and clear fused into one ioctl. If a clear fails, what was
//! fetched is still merged (reporting too much is harmless; the bits whose
//! clear failed stay set in KVM and come again) and the error is returned.

use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};

use super::{
    error::{last_os_error, KvmError},
    options::KvmOptions,
    slot::{slot_pages, Slot},
    sys::{self, KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG},
};

/// Most pages one `KVM_CLEAR_DIRTY_LOG` covers: `num_pages` is a `u32`,
/// and every call but a slot's last must cover a multiple of 64 pages.
const MAX_CLEAR_PAGES: u64 = 1 << 31;

/// How the VM fetches KVM's dirty log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Slots registered without `KVM_MEM_LOG_DIRTY_PAGES`.
    Off,
    /// `KVM_GET_DIRTY_LOG` gets, clears and write-protects.
    Legacy,
    /// `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG`.
    Manual { initially_set: bool },
}

/// How a [`KvmVm`](super::KvmVm) fetches its dirty log (the mode, set
/// when the VM is created or adopted).
#[derive(Debug)]
pub(super) struct DirtyLog {
    mode: Mode,
}

/// A registered slot and its bitmap buffer, reused by every fetch (empty
/// with dirty logging off).
#[derive(Debug)]
pub(super) struct LoggedSlot {
    pub(super) slot: Slot,
    bitmap: Vec<u64>,
}

/// `KVM_GET_DIRTY_LOG` of slot `slot` into `bitmap`, which holds one bit
/// per page of the slot rounded up to whole words.
fn get_dirty_log(vm: BorrowedFd<'_>, slot: u32, bitmap: &mut [u64]) -> Result<(), KvmError> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // The kernel writes `ALIGN(npages, 64) / 8` bytes (the slot's bitmap
    // size) through `dirty_bitmap`; `bitmap` has `ceil(npages / 64)` `u64`s
    // (built from the slot's size in `DirtyLog::start`), exactly that many.
    // SAFETY: `log` is live for the call, `bitmap` exclusively borrowed and
    // large enough (above), and any bit pattern is a valid `u64`.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_DIRTY_LOG as libc::Ioctl, &log) };
    if r < 0 {
        return Err(last_os_error("KVM_GET_DIRTY_LOG"));
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG` of the set bits of `bitmap` (a slot's whole
/// bitmap), for the words `words` only; `pages` is the slot's page count.
fn clear_dirty_log(
    vm: BorrowedFd<'_>,
    slot: u32,
    pages: u64,
    bitmap: &mut [u64],
    words: std::ops::Range<usize>,
) -> Result<(), KvmError> {
    let end_page = ((words.end as u64) * 64).min(pages);
    let mut first_page = words.start as u64 * 64;
    while first_page < end_page {
        // `first_page` is a multiple of 64 (a word start or a multiple of
        // MAX_CLEAR_PAGES past one); the count is a multiple of 64 unless it
        // ends at the slot's last page, as KVM requires.
        let num_pages = (end_page - first_page).min(MAX_CLEAR_PAGES);
        let word = usize::try_from(first_page / 64).unwrap_or(usize::MAX);
        let chunk = bitmap
            .get_mut(word..word + usize::try_from(num_pages.div_ceil(64)).unwrap_or(usize::MAX))
            .ok_or(KvmError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        let clear = kvm_clear_dirty_log {
            slot,
            num_pages: u32::try_from(num_pages).unwrap_or(u32::MAX),
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: chunk.as_mut_ptr().cast(),
            },
        };
        // The kernel reads `ALIGN(num_pages, 64) / 8` bytes through
        // `dirty_bitmap` (and writes none); `chunk` holds exactly
        // `ceil(num_pages / 64)` `u64`s (the `get` above checked the bounds).
        // SAFETY: `clear` is live for the call and the read stays in `chunk`.
        let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as libc::Ioctl, &clear) };
        if r < 0 {
            return Err(last_os_error("KVM_CLEAR_DIRTY_LOG"));
        }
        first_page += num_pages;
    }
    Ok(())
}

/// The range of words from the first to the last non-zero one, if any.
fn dirty_words(bitmap: &[u64]) -> Option<std::ops::Range<usize>> {
    let first = bitmap.iter().position(|&w| w != 0)?;
    let last = bitmap.iter().rposition(|&w| w != 0)?;
    Some(first..last + 1)
}

impl DirtyLog {
    /// Picks the mode and, for manual protection, enables it on `vm` (for
    /// the whole VM). Runs before pagefold registers any slot
    /// (`KVM_DIRTY_LOG_INITIALLY_SET` applies to slots registered after
    /// it).
    pub(super) fn enable(vm: BorrowedFd<'_>, options: &KvmOptions) -> Result<Self, KvmError> {
        let mode = if !options.log_dirty_pages {
            Mode::Off
        } else if options.legacy_dirty_log {
            Mode::Legacy
        } else {
            // The answer is the set of flags KVM accepts (0: none; an
            // error counts as none).
            let offered = sys::check_extension(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                .ok()
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0);
            let enable = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            if offered & enable == 0 {
                Mode::Legacy
            } else {
                let init = u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
                let initially_set = options.dirty_log_initially_set && offered & init != 0;
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = enable | if initially_set { init } else { 0 };
                sys::enable_cap(vm, &cap).map_err(|e| match e {
                    KvmError::Ioctl { source, .. } => KvmError::Ioctl {
                        op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                        source,
                    },
                    other => other,
                })?;
                Mode::Manual { initially_set }
            }
        };
        Ok(DirtyLog { mode })
    }

    /// Whether slots are registered with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub(super) fn logs(&self) -> bool {
        self.mode != Mode::Off
    }

    /// Once `slot` is registered: allocates its buffer and pagefold's
    /// bitmaps of its region, and with `KVM_DIRTY_LOG_INITIALLY_SET`
    /// clears KVM's all-set bitmap, so the first fetch reports only what
    /// the guest writes — unless `vcpus_may_run` (see "What the first
    /// fetch reports"), where the cleared bits go into pagefold's log.
    pub(super) fn track(
        &self,
        vm: BorrowedFd<'_>,
        slot: Slot,
        vcpus_may_run: bool,
    ) -> Result<LoggedSlot, KvmError> {
        if self.mode == Mode::Off {
            return Ok(LoggedSlot {
                slot,
                bitmap: Vec::new(),
            });
        }
        crate::dirty::region_bitmap(slot.region.dirty_log(), slot_index(&slot))?;
        let pages = slot_pages(&slot);
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        let mut bitmap = vec![0u64; words];
        if self.initially_set() && words > 0 {
            bitmap.fill(u64::MAX);
            if pages % 64 != 0 {
                bitmap[words - 1] = (1u64 << (pages % 64)) - 1;
            }
            let cleared = clear_dirty_log(vm, slot.id, pages, &mut bitmap, 0..words);
            if vcpus_may_run {
                crate::dirty::merge_region_bitmap(&slot.region, slot_index(&slot), &bitmap)?;
            }
            cleared?;
            bitmap.fill(0);
        }
        Ok(LoggedSlot { slot, bitmap })
    }

    /// [`KvmVm::fetch_dirty_log`](super::KvmVm::fetch_dirty_log) of `slots`
    /// of `vm`, merged into `mem`'s dirty log.
    pub(super) fn fetch(
        &self,
        vm: BorrowedFd<'_>,
        slots: &mut [LoggedSlot],
    ) -> Result<u64, KvmError> {
        let manual = match self.mode {
            Mode::Off => return Ok(0),
            Mode::Legacy => false,
            Mode::Manual { .. } => true,
        };
        let mut total = 0u64;
        for LoggedSlot { slot, bitmap } in slots {
            get_dirty_log(vm, slot.id, bitmap)?;
            let Some(words) = dirty_words(bitmap) else {
                continue;
            };
            let cleared = if manual {
                clear_dirty_log(vm, slot.id, slot_pages(slot), bitmap, words.clone())
            } else {
                Ok(())
            };
            total += bitmap[words]
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>();
            crate::dirty::merge_region_bitmap(&slot.region, slot_index(slot), bitmap)?;
            cleared?;
        }
        Ok(total)
    }

    /// Whether fetches use manual protection.
    pub(super) fn is_manual(&self) -> bool {
        matches!(self.mode, Mode::Manual { .. })
    }

    /// Whether KVM's slots started all-dirty.
    pub(super) fn initially_set(&self) -> bool {
        self.mode
            == Mode::Manual {
                initially_set: true,
            }
    }
}

/// The index an error names for `slot`'s region: its index in the VM's
/// memory, or `usize::MAX` for a region added later.
fn slot_index(slot: &Slot) -> usize {
    slot.index.unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_words_spans_first_to_last_set_word() {
        assert_eq!(dirty_words(&[0, 0, 0]), None);
        assert_eq!(dirty_words(&[0, 4, 0, 1, 0]), Some(1..4));
        assert_eq!(dirty_words(&[1]), Some(0..1));
    }
}
