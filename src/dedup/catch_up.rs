//! Bringing another process's view of a VM in line with the host's: a
//! process that starts mapping the VM's memory is told every merged run
//! (each held while it is told, so no merge or unmerge moves it meanwhile),
//! and a private page is held while a process lifts a protection it should
//! not have.

use std::time::{Duration, Instant};

use super::{
    error::DedupError,
    remote::{RemoteError, RemoteRun, RemoteTarget},
    steps::{self, RemappedClaim},
    vm::VmEntry,
};
use crate::{
    addr::PAGE_SIZE,
    memory::{GuestRegion, PageKind, PageState},
};

/// Longest run told at once (8 MiB).
const MAX_RUN: usize = 2048;

/// Calls `tell(region, runs)` for every run of `vm`'s pages that map a
/// shared frame or zeros, each run held while it is told. A page another
/// operation holds is waited for (up to `wait`: a window whose process
/// does not answer is rolled back by then): a merge window that remapped it
/// before the new process joined would otherwise leave it untold, and
/// until it is told the new process must not write it.
pub(super) fn catch_up(
    vm: &VmEntry,
    wait: Duration,
    mut tell: impl FnMut(usize, &[RemoteRun]) -> Result<(), RemoteError>,
) -> Result<(), DedupError> {
    for (ri, region) in vm.mem.regions().iter().enumerate() {
        let states = region.page_states();
        let mut p = 0;
        let mut waited_since: Option<Instant> = None;
        while p < region.pages() {
            let s = states.load(p);
            if s.is_locked() && !s.is_remapped() {
                // A merge window holds it: it may remap the page in the
                // processes it read before this one joined (found by
                // review: a backend that joined mid-window was never told,
                // and read the punched own frame). Once published, the page
                // is told below.
                let since = *waited_since.get_or_insert_with(Instant::now);
                if since.elapsed() > wait {
                    return Err(DedupError::Busy(page_gpa(region, p)));
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            if !s.is_remapped() {
                waited_since = None;
                p += 1;
                continue;
            }
            let mut held: Vec<(usize, PageState)> = Vec::new();
            let mut busy = false;
            for q in p..region.pages().min(p + MAX_RUN) {
                match steps::claim_remapped(states, q) {
                    RemappedClaim::Held(s) => held.push((q, s)),
                    RemappedClaim::Skip if states.load(q).is_locked() => {
                        busy = true;
                        break;
                    }
                    RemappedClaim::Skip => break,
                    RemappedClaim::Busy => {
                        busy = true;
                        break;
                    }
                }
            }
            if held.is_empty() {
                if busy {
                    let since = *waited_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > wait {
                        return Err(DedupError::Busy(page_gpa(region, p)));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                } else {
                    p += 1;
                }
                continue;
            }
            waited_since = None;
            let runs = runs_of(&held);
            let told = if runs.is_empty() {
                Ok(())
            } else {
                tell(ri, &runs)
            };
            for &(q, s) in &held {
                steps::release_remapped(states, q, s);
            }
            told?;
            p += held.len();
        }
    }
    Ok(())
}

fn page_gpa(region: &GuestRegion, page: usize) -> crate::addr::GuestPhysAddr {
    crate::addr::GuestPhysAddr(region.start().0 + (page * PAGE_SIZE) as u64)
}

/// The held pages as runs of one target each (consecutive pages onto
/// consecutive frames, or zeros); pages of other kinds are left out.
fn runs_of(held: &[(usize, PageState)]) -> Vec<RemoteRun> {
    let mut runs: Vec<RemoteRun> = Vec::new();
    for &(q, s) in held {
        let target = match s.kind() {
            PageKind::Shared => RemoteTarget::Shared {
                file_offset: s.frame().file_offset(),
            },
            PageKind::Zero => RemoteTarget::Zero,
            _ => continue,
        };
        if let Some(last) = runs.last_mut() {
            let continues = last.first_page + last.pages == q as u64
                && match (last.target, target) {
                    (RemoteTarget::Zero, RemoteTarget::Zero) => true,
                    (
                        RemoteTarget::Shared { file_offset: a },
                        RemoteTarget::Shared { file_offset: b },
                    ) => b == a + last.pages * PAGE_SIZE as u64,
                    _ => false,
                };
            if continues {
                last.pages += 1;
                continue;
            }
        }
        runs.push(RemoteRun {
            first_page: q as u64,
            pages: 1,
            target,
        });
    }
    runs
}

/// Runs `f` with `page` of `region` held, if it is private and no other
/// operation holds it; whether it ran.
pub(super) fn with_private_page_held(region: &GuestRegion, page: usize, f: impl FnOnce()) -> bool {
    let states = region.page_states();
    let s = states.load(page);
    if s.is_remapped() || s.is_locked() || s.kind() != PageKind::Private {
        return false;
    }
    if !steps::claim_candidate(states, page, s) {
        return false;
    }
    f();
    steps::release_candidate(states, page, s);
    true
}
