//! Reading and writing guest-virtual memory: each page is translated (with
//! the cache when given) and the bytes move page by page, so an access may
//! cross page boundaries and land on physically scattered pages. A write
//! translates every page before it moves a byte, so a fault part-way
//! writes nothing.

use super::{
    cache::WalkCache,
    fault::{FaultCode, FaultReason, Stage, WalkFault},
    memory::PhysMemory,
    types::{Access, AccessKind},
    walker::{WalkOptions, Walker},
};
use crate::addr::{GuestPhysAddr, GuestVirtAddr, PageSize};

/// A failed guest-virtual access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest-virtual access failed {offset} bytes in: {fault}")]
pub struct VirtError {
    /// Bytes into the access where it failed (nothing was written by a
    /// failed write; a failed read filled `buf[..offset]`).
    pub offset: usize,
    /// Why.
    pub fault: WalkFault,
}

/// Most pages one write translates up front (a 1 MiB write of 4 KiB pages).
const MAX_WRITE_PAGES: usize = 256;

impl Walker {
    /// Reads `buf.len()` bytes at guest-virtual `va` as `access` (its kind
    /// is taken as a read), page by page.
    pub fn read_virt<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: GuestVirtAddr,
        buf: &mut [u8],
        access: Access,
        options: WalkOptions,
        mut cache: Option<&mut WalkCache>,
    ) -> Result<(), VirtError> {
        let access = Access {
            kind: AccessKind::Read,
            ..access
        };
        let mut done = 0;
        while done < buf.len() {
            let at = GuestVirtAddr(va.0.wrapping_add(done as u64));
            let t = self
                .translate_with(mem, at, access, options, cache.as_deref_mut())
                .map_err(|fault| VirtError {
                    offset: done,
                    fault,
                })?;
            let n = usize::try_from(t.contiguous_bytes())
                .unwrap_or(usize::MAX)
                .min(buf.len() - done)
                .min(page_left(at));
            mem.read_bytes(t.pa.0, &mut buf[done..done + n])
                .map_err(|pa| VirtError {
                    offset: done,
                    fault: unbacked(at.0, t.gpa.0, access, pa),
                })?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at guest-virtual `va` as `access` (its kind is taken as
    /// a write). Every page is translated first; a fault writes nothing.
    /// Writes longer than 1 MiB are split, and only each 1 MiB part is
    /// all-or-nothing.
    pub fn write_virt<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: GuestVirtAddr,
        data: &[u8],
        access: Access,
        options: WalkOptions,
        mut cache: Option<&mut WalkCache>,
    ) -> Result<(), VirtError> {
        let access = Access {
            kind: AccessKind::Write,
            ..access
        };
        let mut done = 0;
        let mut pieces: Vec<(u64, u64, usize, usize)> = Vec::new();
        while done < data.len() {
            pieces.clear();
            let mut planned = done;
            while planned < data.len() && pieces.len() < MAX_WRITE_PAGES {
                let at = GuestVirtAddr(va.0.wrapping_add(planned as u64));
                let t = self
                    .translate_with(mem, at, access, options, cache.as_deref_mut())
                    .map_err(|fault| VirtError {
                        offset: planned,
                        fault,
                    })?;
                let n = usize::try_from(t.contiguous_bytes())
                    .unwrap_or(usize::MAX)
                    .min(data.len() - planned)
                    .min(page_left(at));
                pieces.push((t.pa.0, t.gpa.0, planned, n));
                planned += n;
            }
            for &(pa, gpa, off, n) in &pieces {
                mem.write_bytes(pa, &data[off..off + n])
                    .map_err(|bad| VirtError {
                        offset: off,
                        fault: unbacked(va.0.wrapping_add(off as u64), gpa, access, bad),
                    })?;
            }
            done = planned;
        }
        Ok(())
    }
}

/// Bytes from `at` to the end of its 4 KiB page.
#[inline]
fn page_left(at: GuestVirtAddr) -> usize {
    let size = PageSize::Size4K;
    crate::addr::usize_from(size.bytes() - at.page_offset(size))
}

fn unbacked(va: u64, gpa: u64, access: Access, pa: u64) -> WalkFault {
    WalkFault {
        va: GuestVirtAddr(va),
        gpa: Some(GuestPhysAddr(gpa)),
        access,
        stage: Stage::First,
        level: 0,
        entry_addr: None,
        entry: None,
        reason: FaultReason::Unbacked {
            pa: GuestPhysAddr(pa),
        },
        code: FaultCode::Emulation,
    }
}
