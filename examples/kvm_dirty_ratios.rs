//! The cost of harvesting KVM's dirty log against memory size, with manual
//! protection (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` of the fetched
//! pages) and with the legacy get-and-clear (the peer): a 64-bit guest
//! (ring 3, identity-mapped with 2 MiB pages) writes a fixed number of
//! pages (default 1000) spread evenly over guest memory of 64 MiB, 256
//! MiB, 1 GiB and 4 GiB (sparse: only what the guest writes is ever
//! backed), then the host times
//!
//! - `fetch`: one [`KvmVm::fetch_dirty_log`] (the ioctls of every slot and
//!   the merge into pagefold's log);
//! - `harvest`: one [`GuestMemory::harvest_dirty`] of what it merged;
//! - `fetch-clean`: a fetch right after, with nothing dirty (the part of
//!   the cost that follows the memory size).
//!
//! and, as a note, pagefold's own part of a fetch: the merge of bitmaps
//! holding the same pages into its log.
//!
//! Median over the rounds, the ratio legacy / manual (above 1: manual is
//! faster) with the range from the quartiles, and ns per GiB of guest
//! memory. 4 GiB is laid out as a PC would be, 3 GiB below 4 GiB (KVM's
//! TSS sits just below 4 GiB) and 1 GiB from 4 GiB: two slots.
//!
//! `cargo run --release --example kvm_dirty_ratios [PAGES] [ROUNDS]`
//! (`benches/kvm_dirty_ratios.sh` runs it.)

// Timing arithmetic and page indices of at most a few GiB of memory.
#![allow(clippy::cast_possible_truncation)]

#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
use pagefold_tools::mini_vmm::guest;

#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
mod bench {
    use std::{sync::Arc, time::Instant};

    use pagefold::{
        kvm::{Exit, Flow, KvmError, KvmOptions, KvmVcpu, KvmVm, LongMode},
        DirtyRun, GuestMemory, GuestPhysAddr, GuestVirtAddr, RegionSet, PAGE_SIZE,
    };

    use crate::guest::Res;

    const PAGE: u64 = PAGE_SIZE as u64;
    const GIB: u64 = 1 << 30;
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    /// Eight page directories from here: 8 GiB identity-mapped.
    const PDS: u64 = 0x3000;
    const CODE: u64 = 0x1_0000;
    const TABLE: u64 = 0x2_0000;
    const STACK: u64 = 0x8_0000;
    /// Guest pages below this hold the tables and code (mapped read-only).
    const RESERVED: u64 = 0x20_0000;

    const P: u64 = 1;
    const RW: u64 = 1 << 1;
    const US: u64 = 1 << 2;
    const A: u64 = 1 << 5;
    const D: u64 = 1 << 6;
    const PS: u64 = 1 << 7;

    /// Identity map of 8 GiB with 2 MiB pages, user-accessible, with the
    /// accessed and dirty bits already set (so no walk writes to the tables,
    /// which would put their pages in KVM's log). The first 2 MiB (tables,
    /// code, address table) are read-only and not dirty, so KVM maps them
    /// read-only and never logs them.
    fn page_tables(mem: &GuestMemory) -> Res<()> {
        mem.write_obj(GuestPhysAddr(PML4), PDPT | P | RW | US | A)?;
        for g in 0..8u64 {
            let pd = PDS + g * PAGE;
            mem.write_obj(GuestPhysAddr(PDPT + g * 8), pd | P | RW | US | A)?;
            let entries: Vec<u8> = (0..512u64)
                .flat_map(|i| {
                    let gpa = g * GIB + (i << 21);
                    let flags = if gpa == 0 {
                        P | US | A | PS
                    } else {
                        P | RW | US | A | D | PS
                    };
                    (gpa | flags).to_le_bytes()
                })
                .collect();
            mem.write(GuestPhysAddr(pd), &entries)?;
        }
        Ok(())
    }

    fn layout(size: u64) -> Vec<(GuestPhysAddr, u64)> {
        if size <= 3 * GIB {
            vec![(GuestPhysAddr(0), size)]
        } else {
            vec![
                (GuestPhysAddr(0), 3 * GIB),
                (GuestPhysAddr(4 * GIB), size - 3 * GIB),
            ]
        }
    }

    /// `pages` page addresses spread evenly over the memory above
    /// `RESERVED`.
    fn targets(layout: &[(GuestPhysAddr, u64)], pages: u64) -> Vec<u64> {
        let all: Vec<(u64, u64)> = layout
            .iter()
            .map(|&(s, len)| {
                let lo = s.0.max(RESERVED);
                (lo, (s.0 + len).saturating_sub(lo) / PAGE)
            })
            .collect();
        let total: u64 = all.iter().map(|a| a.1).sum();
        (0..pages)
            .map(|i| {
                let mut k = i * total / pages;
                for &(lo, n) in &all {
                    if k < n {
                        return lo + k * PAGE;
                    }
                    k -= n;
                }
                unreachable!("index below the total")
            })
            .collect()
    }

    #[derive(Default)]
    struct Samples {
        fetch: Vec<f64>,
        harvest: Vec<f64>,
        clean: Vec<f64>,
        merge: Vec<f64>,
    }

    fn quartiles(v: &mut [f64]) -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.25), at(0.5), at(0.75))
    }

    /// One VM of one size in one mode, with its guest ready to run.
    struct Rig {
        mem: Arc<GuestMemory>,
        vm: KvmVm,
        vcpu: KvmVcpu,
        pages: u64,
        /// Bitmaps (per region) holding the pages the guest writes.
        bitmaps: Vec<Vec<u64>>,
        runs: Vec<DirtyRun>,
        samples: Samples,
    }

    impl Rig {
        fn new(size: u64, legacy: bool, pages: u64) -> Res<Option<Rig>> {
            let layout = layout(size);
            let mem = Arc::new(GuestMemory::new(&layout)?);
            page_tables(&mem)?;
            mem.write(GuestPhysAddr(CODE), &crate::guest::write_table()?)?;
            let targets = targets(&layout, pages);
            let table: Vec<u8> = targets.iter().flat_map(|a| a.to_le_bytes()).collect();
            mem.write(GuestPhysAddr(TABLE), &table)?;
            let options = KvmOptions {
                log_dirty_pages: true,
                legacy_dirty_log: legacy,
                ..KvmOptions::default()
            };
            let vm = match KvmVm::with_options(&mem, options) {
                Ok(vm) => vm,
                Err(e @ KvmError::Ioctl { op, .. })
                    if op == "open /dev/kvm" || op == "KVM_CREATE_VM" =>
                {
                    println!("SKIP kvm_dirty_ratios: /dev/kvm is not usable: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            if !legacy && !vm.manual_dirty_log_protect() {
                println!("SKIP kvm_dirty_ratios: KVM offers no manual dirty-log protection");
                return Ok(None);
            }
            let vcpu = vm.create_vcpu(0)?;
            let bitmaps = layout
                .iter()
                .map(|&(start, len)| {
                    let mut b = vec![0u64; (len / PAGE).div_ceil(64) as usize];
                    for &a in targets
                        .iter()
                        .filter(|&&a| a >= start.0 && a < start.0 + len)
                    {
                        let p = ((a - start.0) / PAGE) as usize;
                        b[p / 64] |= 1 << (p % 64);
                    }
                    b
                })
                .collect();
            Ok(Some(Rig {
                mem,
                vm,
                vcpu,
                pages,
                bitmaps,
                runs: Vec::with_capacity(pages as usize),
                samples: Samples::default(),
            }))
        }

        /// The guest writes its pages; then one fetch, one harvest, one
        /// clean fetch and (pagefold's share of a fetch) one merge of the
        /// same pages, timed. `record`: keep the times (not in warm-up).
        fn round(&mut self, record: bool) -> Res<()> {
            self.vcpu.setup_long_mode(&LongMode {
                cr3: GuestPhysAddr(PML4),
                entry: GuestVirtAddr(CODE),
                stack: GuestVirtAddr(STACK),
                args: [TABLE, self.pages],
                user_mode: true,
            })?;
            self.vcpu.run(|exit| match exit {
                Exit::IoOut { .. } => Flow::Stop,
                _ => Flow::Continue,
            })?;
            let t0 = Instant::now();
            let fetched = self.vm.fetch_dirty_log()?;
            let t1 = Instant::now();
            self.runs.clear();
            let harvested = self.mem.harvest_dirty(RegionSet::All, &mut self.runs)?;
            let t2 = Instant::now();
            let clean = self.vm.fetch_dirty_log()?;
            let t3 = Instant::now();
            let pages = self.pages;
            if fetched != pages || harvested != pages || clean != 0 {
                return Err(format!(
                    "fetched {fetched}, harvested {harvested}, then {clean}; expected {pages}, {pages}, 0"
                )
                .into());
            }
            let t4 = Instant::now();
            for (i, b) in self.bitmaps.iter().enumerate() {
                self.mem.merge_dirty_bitmap(i, b)?;
            }
            let t5 = Instant::now();
            self.runs.clear();
            self.mem.harvest_dirty(RegionSet::All, &mut self.runs)?;
            if record {
                let s = &mut self.samples;
                s.fetch.push((t1 - t0).as_nanos() as f64);
                s.harvest.push((t2 - t1).as_nanos() as f64);
                s.clean.push((t3 - t2).as_nanos() as f64);
                s.merge.push((t5 - t4).as_nanos() as f64);
            }
            Ok(())
        }
    }

    /// Both modes for one size, their rounds interleaved (so both see the
    /// same background load); round 0 warms up (backs the pages, builds
    /// KVM's mappings).
    fn measure(size: u64, pages: u64, rounds: usize) -> Res<Option<(Samples, Samples)>> {
        let Some(mut manual) = Rig::new(size, false, pages)? else {
            return Ok(None);
        };
        let Some(mut legacy) = Rig::new(size, true, pages)? else {
            return Ok(None);
        };
        for round in 0..=rounds {
            manual.round(round > 0)?;
            legacy.round(round > 0)?;
        }
        Ok(Some((manual.samples, legacy.samples)))
    }

    fn fmt_time(ns: f64) -> String {
        if ns >= 1e6 {
            format!("{:.2} ms", ns / 1e6)
        } else if ns >= 1e3 {
            format!("{:.2} us", ns / 1e3)
        } else {
            format!("{ns:.0} ns")
        }
    }

    fn host() -> &'static str {
        let m = |name: &str| std::path::Path::new("/sys/module").join(name).exists();
        if m("kvm_pvm") {
            "KVM PVM (shadow paging, no VMX)"
        } else if m("kvm_intel") {
            "KVM on VMX"
        } else if m("kvm_amd") {
            "KVM on SVM"
        } else {
            "KVM"
        }
    }

    pub(crate) fn main() -> Res<()> {
        let mut args = std::env::args().skip(1);
        let pages: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
        let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
        if !std::path::Path::new("/dev/kvm").exists() {
            println!("SKIP kvm_dirty_ratios: /dev/kvm does not exist");
            return Ok(());
        }
        let sizes = [64 << 20, 256 << 20, GIB, 4 * GIB];
        println!(
            "KVM dirty-log harvest: {pages} pages written per round, {rounds} rounds, median (ratio = legacy / manual; range from the quartiles); {}",
            host()
        );
        let hdr = format!(
            "{:<22} {:>10} {:>10} {:>6} {:>11} {:>13} {:>13}",
            "row", "manual", "legacy", "ratio", "range", "manual/GiB", "legacy/GiB"
        );
        println!("{hdr}");
        println!("{}", "-".repeat(hdr.len()));
        let mut logs = Vec::new();
        let mut merges = Vec::new();
        for size in sizes {
            let Some((mut manual, mut legacy)) = measure(size, pages, rounds)? else {
                return Ok(());
            };
            let name = if size >= GIB {
                format!("{} GiB", size / GIB)
            } else {
                format!("{} MiB", size >> 20)
            };
            let gib = size as f64 / GIB as f64;
            let (_, merge, _) = quartiles(&mut manual.merge);
            merges.push(format!("{name} {}", fmt_time(merge)));
            for (row, m, l) in [
                ("fetch", &mut manual.fetch, &mut legacy.fetch),
                ("harvest", &mut manual.harvest, &mut legacy.harvest),
                ("fetch-clean", &mut manual.clean, &mut legacy.clean),
            ] {
                let (m25, m50, m75) = quartiles(m);
                let (l25, l50, l75) = quartiles(l);
                let ratio = l50 / m50;
                logs.push(ratio.ln());
                println!(
                    "{:<22} {:>10} {:>10} {:>6.2} {:>11} {:>13} {:>13}",
                    format!("{row}/{name}"),
                    fmt_time(m50),
                    fmt_time(l50),
                    ratio,
                    format!("{:.2}-{:.2}", l25 / m75, l75 / m25),
                    fmt_time(m50 / gib),
                    fmt_time(l50 / gib),
                );
            }
        }
        let geo = (logs.iter().sum::<f64>() / logs.len().max(1) as f64).exp();
        println!(
            "summary: {} rows, geometric-mean ratio {geo:.2}",
            logs.len()
        );
        println!(
            "pagefold's part of a fetch (merging the fetched bitmaps into its log): {}",
            merges.join(", ")
        );
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    #[cfg(all(feature = "kvm", target_arch = "x86_64"))]
    return bench::main();
    #[cfg(not(all(feature = "kvm", target_arch = "x86_64")))]
    {
        println!("SKIP kvm_dirty_ratios: needs the kvm feature on x86-64");
        Ok(())
    }
}
