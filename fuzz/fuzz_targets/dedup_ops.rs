//! Fuzzes deduplication with structured input: a set of VMs on one frame
//! store (2-4 VMs of 1-3 regions of 1-8 pages, one or two merge domains,
//! maybe an excluded region, page contents from a small palette) and a
//! sequence of guest writes (library, atomics, raw host pointers), reads,
//! `merge_now`, `scan_step`, `unmerge_all`, `resolve_write_fault` and
//! unregister/re-register, run against a real `DedupHost` and the model the
//! integration tests use (`pagefold_models::dedup_model`). A panic in
//! pagefold and any divergence from the model (a byte, a page state, a scan
//! report, a statistic, the kernel's count of the store's memory) are
//! crashes.
//!
//! Each input builds a fresh store, VMs and host (its userfaultfd handler
//! thread included) and checks everything after every operation, so
//! executions are slow by fuzzing standards (milliseconds); sizes are capped
//! accordingly. Hosts are dropped on background threads, so an execution
//! usually ends with more allocated than freed, which makes libFuzzer run
//! LeakSanitizer after it: `-detect_leaks=0` runs several times faster.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::DedupHost;
use pagefold_models::dedup_model::{
    self, Addr, DedupOp, RegionSpec, Scenario, VmSpec, MAX_PAGES, MAX_REGIONS, MAX_VMS,
};

const MAX_OPS: usize = 48;

#[derive(Arbitrary, Debug)]
struct Region {
    gap: u8,
    pages: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Vm {
    domain: u8,
    regions: Vec<Region>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct At {
    region: u8,
    page: u8,
    offset: u16,
    mode: u8,
}

impl From<At> for Addr {
    fn from(a: At) -> Self {
        Addr {
            region: a.region,
            page: a.page,
            offset: a.offset,
            mode: a.mode,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    Write(u8, At, u16, u8),
    WritePage(u8, At, u8),
    Fill(u8, At, u8, u16),
    WriteObj(u8, At, u8, u64),
    Store(u8, At, u8, u64),
    HostWrite(u8, At, u16, u8),
    Read(u8, At, u16),
    HostRead(u8, At, u16),
    MergeNow,
    ScanStep(u16, u8),
    UnmergeAll,
    ResolveFault(u8, At),
    Toggle(u8, u8),
    Register(u8, u8, bool),
    Stats,
}

impl FuzzOp {
    fn op(&self) -> DedupOp {
        match *self {
            FuzzOp::Write(vm, at, len, seed) => DedupOp::Write {
                vm,
                at: at.into(),
                len,
                seed,
            },
            FuzzOp::WritePage(vm, at, palette) => DedupOp::WritePage {
                vm,
                at: at.into(),
                palette,
            },
            FuzzOp::Fill(vm, at, byte, len) => DedupOp::Fill {
                vm,
                at: at.into(),
                byte,
                len,
            },
            FuzzOp::WriteObj(vm, at, width, val) => DedupOp::WriteObj {
                vm,
                at: at.into(),
                width,
                val,
            },
            FuzzOp::Store(vm, at, width, val) => DedupOp::Store {
                vm,
                at: at.into(),
                width,
                val,
            },
            FuzzOp::HostWrite(vm, at, len, seed) => DedupOp::HostWrite {
                vm,
                at: at.into(),
                len,
                seed,
            },
            FuzzOp::Read(vm, at, len) => DedupOp::Read {
                vm,
                at: at.into(),
                len,
            },
            FuzzOp::HostRead(vm, at, len) => DedupOp::HostRead {
                vm,
                at: at.into(),
                len,
            },
            FuzzOp::MergeNow => DedupOp::MergeNow,
            // Small budgets mostly: full passes of several batches.
            FuzzOp::ScanStep(pages, repeat) => DedupOp::ScanStep {
                pages: pages % 256,
                repeat,
            },
            FuzzOp::UnmergeAll => DedupOp::UnmergeAll,
            FuzzOp::ResolveFault(vm, at) => DedupOp::ResolveFault { vm, at: at.into() },
            FuzzOp::Toggle(vm, domain) => DedupOp::Toggle { vm, domain },
            FuzzOp::Register(vm, domain, bad_exclude) => DedupOp::Register {
                vm,
                domain,
                bad_exclude,
            },
            FuzzOp::Stats => DedupOp::Stats,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// 2 + this % 3 VMs, taken from `vms` round robin.
    vm_count: u8,
    vms: Vec<Vm>,
    /// All VMs get the first VM's regions (clones of one snapshot).
    clones: bool,
    exclude: Option<(u8, u8)>,
    stats_every_op: bool,
    ops: Vec<FuzzOp>,
}

impl Input {
    fn scenario(&self) -> Scenario {
        let spec = |v: Option<&Vm>| {
            let regions: Vec<RegionSpec> = v
                .map(|v| {
                    v.regions
                        .iter()
                        .take(MAX_REGIONS)
                        .map(|r| RegionSpec {
                            gap: r.gap,
                            init: r.pages.iter().take(MAX_PAGES).copied().collect(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            VmSpec {
                domain: v.map_or(0, |v| v.domain),
                // A VM needs a region; an empty page list is one zero page.
                regions: if regions.is_empty() {
                    vec![RegionSpec {
                        gap: 0,
                        init: vec![1, 0],
                    }]
                } else {
                    regions
                },
            }
        };
        let n = 2 + usize::from(self.vm_count) % (MAX_VMS - 1);
        let mut vms: Vec<VmSpec> = (0..n)
            .map(|i| {
                spec(match self.vms.len() {
                    0 => None,
                    len => self.vms.get(i % len),
                })
            })
            .collect();
        if self.clones {
            let first = vms[0].regions.clone();
            for v in &mut vms {
                v.regions = first.clone();
            }
        }
        Scenario {
            vms,
            exclude: self.exclude,
            stats_every_op: self.stats_every_op,
            ops: self.ops.iter().take(MAX_OPS).map(FuzzOp::op).collect(),
        }
    }
}

/// Drops a host on a thread of its own: dropping one waits for its
/// userfaultfd handler thread to notice (up to its 50 ms poll), which would
/// otherwise dominate an execution. At most `MAX_IN_FLIGHT` such threads at
/// once; past that the host is dropped here, so memory stays bounded.
fn dispose_later(host: DedupHost) {
    const MAX_IN_FLIGHT: usize = 16;
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    if IN_FLIGHT.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        drop(host);
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    std::thread::spawn(move || {
        drop(host);
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    });
}

fuzz_target!(|input: Input| {
    let scenario = input.scenario();
    // The host is unmerged (every page back on its own frame) and checked
    // here, then dropped elsewhere so executions stay fast.
    let result = dedup_model::run_with(&scenario, |host| {
        host.unmerge_all()
            .map_err(|e| format!("unmerge_all: {e}"))?;
        dispose_later(host);
        Ok(())
    });
    if let Err(divergence) = result {
        panic!("dedup diverged from the model: {divergence}");
    }
});
