//! rust-vmm's virtio-queue over pagefold memory: a driver written here lays
//! out split virtqueues (descriptor table, indirect tables, avail and used
//! rings) in guest memory as the virtio 1.x spec says; a device built on
//! `virtio_queue::Queue` echoes each chain's readable bytes, transformed,
//! into its writable buffers on its own thread, while dedup merges and
//! unmerges the pages of the rings and buffers. The driver checks every
//! completion byte for byte against its model; the event index is checked
//! against the spec's rule; dirty tracking must report every page the
//! device wrote. Once over an `Arc<GuestMemory>`, once over an
//! `AtomicGuestMemory` that a region is plugged into mid-run.

// A failed unwrap is a failed test; every size here is small.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read, Write},
    num::Wrapping,
    ops::Deref,
    sync::{
        atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use pagefold::{
    rust_vmm::AtomicGuestMemory, DedupHost, DirtyRun, FrameStore, GuestMemory, GuestPhysAddr,
    GuestRegion, RegionSet, ScanBudget, PAGE_SIZE,
};
use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const P: u64 = PAGE_SIZE as u64;

// Guest layout: region A is pages [0, 96), region B pages [96, 256).
const REGION_A_PAGES: u64 = 96;
const REGION_B_PAGES: u64 = 160;
/// Buffer slot k is pages 1 + 2k and 2 + 2k: a buffer lies anywhere in its
/// two pages. Slot 47 is pages 95 and 96, across the regions' boundary.
const SLOTS: usize = 95;
const BOUNDARY_SLOT: usize = 47;
const DESC_TABLE: u64 = 200 * P;
const AVAIL: u64 = 201 * P;
const USED: u64 = 202 * P;
/// One indirect table of `MAX_CHAIN` descriptors per head descriptor.
const INDIRECT: u64 = 204 * P;
const Q: u16 = 64;
const MAX_CHAIN: usize = 8;
/// Where the second variant plugs a region, and the slots it adds there.
const HOTPLUG_BASE: u64 = 0x100_0000;
const HOTPLUG_PAGES: u64 = 32;
const HOTPLUG_SLOTS: usize = 16;
/// The rings' indexes start here, so they wrap during a run.
const START: u16 = 0xff00;
/// Features the driver negotiated (the bits of the device's offer it took).
const FEATURES: u64 = (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);
const MIN_REQUESTS: u64 = 1000;
/// How long a side waits for a notification before calling it lost.
const LOST: Duration = Duration::from_secs(20);

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

fn slot_base(k: usize) -> u64 {
    if k < SLOTS {
        (1 + 2 * k as u64) * P
    } else {
        HOTPLUG_BASE + 2 * (k - SLOTS) as u64 * P
    }
}

/// The byte every free buffer page holds: one of four, by page number, so
/// free pages fold onto four frames (one of them the zero page).
fn palette_byte(addr: u64) -> u8 {
    ((addr / P) % 4) as u8 * 0x11
}

fn palette_range(addr: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| palette_byte(addr + i)).collect()
}

/// What the device XORs a chain's bytes with: derived from its head.
fn key(head: u16) -> u8 {
    head as u8 ^ 0x5a
}

/// The spec's rule (2.7.10, `vring_need_event`): a notification is due
/// when `event` lies in `[old, new)`, in wrapping arithmetic.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

// Split virtqueue field offsets (2.7 of virtio 1.x) for a queue of `size`.
fn avail_idx_at(avail: u64) -> GuestAddress {
    GuestAddress(avail + 2)
}
fn avail_ring_at(avail: u64, i: u16, size: u16) -> GuestAddress {
    GuestAddress(avail + 4 + 2 * u64::from(i % size))
}
fn used_event_at(avail: u64, size: u16) -> GuestAddress {
    GuestAddress(avail + 4 + 2 * u64::from(size))
}
fn used_idx_at(used: u64) -> GuestAddress {
    GuestAddress(used + 2)
}
fn used_elem_at(used: u64, i: u16, size: u16) -> GuestAddress {
    GuestAddress(used + 4 + 8 * u64::from(i % size))
}
fn avail_event_at(used: u64, size: u16) -> GuestAddress {
    GuestAddress(used + 4 + 8 * u64::from(size))
}

/// The driver's (the guest's) stores, as a vCPU makes them: straight into
/// the regions' mappings, not through pagefold's accessors, so they are not
/// in pagefold's dirty log (KVM's would have them), which then holds what
/// the device wrote.
fn guest_write(m: &GuestMemory, addr: u64, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        let a = addr + done as u64;
        let n = ((P - a % P) as usize).min(data.len() - done);
        let hva = m.host_address(gpa(a)).unwrap();
        // `[a, a + n)` lies in one page of a region that `m` keeps
        // mapped; no Rust reference into guest memory exists (every other
        // access is volatile or raw), and the ring protocol gives these
        // bytes to the driver alone while it writes them.
        // SAFETY: in bounds of a live mapping, no reference aliased
        // (argued above).
        unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), hva.0 as *mut u8, n) };
        done += n;
    }
}

/// A ring index or event field, stored atomically by the guest.
fn guest_store16(m: &GuestMemory, at: GuestAddress, v: u16, order: Ordering) {
    let hva = m.host_address(gpa(at.0)).unwrap();
    assert_eq!(hva.0 % 2, 0, "ring fields are 2-byte aligned");
    // SAFETY: the address is 2-byte aligned inside a region that `m` keeps
    // mapped, and every access to this field (the device's through
    // vm-memory's atomic loads and stores) is atomic.
    unsafe { AtomicU16::from_ptr(hva.0 as *mut u16) }.store(v.to_le(), order);
}

/// A 16-byte split descriptor as the driver writes it: addr, len, flags,
/// next, little-endian.
fn write_desc(m: &GuestMemory, at: u64, addr: u64, len: u32, flags: u32, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    guest_write(m, at, &d);
}

fn load16(m: &GuestMemory, at: GuestAddress, order: Ordering) -> u16 {
    u16::from_le(Bytes::load(m, at, order).unwrap())
}

/// An interrupt line or a queue notification: a counter to wait past.
#[derive(Default)]
struct Doorbell {
    rings: Mutex<u64>,
    cv: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        *self.rings.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    fn count(&self) -> u64 {
        *self.rings.lock().unwrap()
    }

    /// Waits until the bell rang after `seen`; a wait of `LOST` is a lost
    /// notification, which the spec's rules must never allow.
    fn wait_past(&self, seen: u64, who: &str) {
        let g = self.rings.lock().unwrap();
        let (_g, to) = self.cv.wait_timeout_while(g, LOST, |c| *c <= seen).unwrap();
        assert!(
            !to.timed_out(),
            "{who} waited {LOST:?} for a notification: one was lost"
        );
    }
}

#[derive(Default)]
struct Shared {
    /// Driver to device: "avail ring has new entries".
    kick: Doorbell,
    /// Device to driver: "used ring has new entries".
    irq: Doorbell,
    stop_submitting: AtomicBool,
    done: AtomicBool,
    completed: AtomicU64,
    plugged: AtomicBool,
    /// A seqlock around the driver's writes of `used_event`: odd while a
    /// write is under way, so the device knows which value it saw.
    used_event_seq: AtomicU64,
}

struct Buf {
    addr: u64,
    len: usize,
    slot: usize,
    writable: bool,
    /// What the driver put in a readable buffer.
    data: Vec<u8>,
}

struct Request {
    /// Descriptors of the main table the chain holds.
    descs: Vec<u16>,
    bufs: Vec<Buf>,
}

#[derive(Debug, Default)]
struct DriverStats {
    submitted: u64,
    completed: u64,
    indirect: u64,
    multi_direct: u64,
    straddling: u64,
    kicks: u64,
    kicks_suppressed: u64,
    sleeps: u64,
    bytes_checked: u64,
}

struct Driver<AS> {
    space: AS,
    shared: Arc<Shared>,
    rng: SmallRng,
    free_desc: Vec<u16>,
    free_slots: Vec<usize>,
    inflight: HashMap<u16, Request>,
    avail_idx: Wrapping<u16>,
    last_used: Wrapping<u16>,
    plugged: bool,
    stats: DriverStats,
}

impl<AS: GuestAddressSpace<M = GuestMemory>> Driver<AS> {
    fn new(space: AS, shared: Arc<Shared>, seed: u64) -> Self {
        Driver {
            space,
            shared,
            rng: SmallRng::seed_from_u64(seed),
            free_desc: (0..Q).collect(),
            free_slots: (0..SLOTS).collect(),
            inflight: HashMap::new(),
            avail_idx: Wrapping(START),
            last_used: Wrapping(START),
            plugged: false,
            stats: DriverStats::default(),
        }
    }

    fn run(mut self) -> Self {
        loop {
            if !self.plugged && self.shared.plugged.load(Ordering::SeqCst) {
                self.plugged = true;
                self.free_slots.extend(SLOTS..SLOTS + HOTPLUG_SLOTS);
            }
            let reaped = self.reap();
            let stopping = self.shared.stop_submitting.load(Ordering::SeqCst);
            if stopping && self.inflight.is_empty() {
                break;
            }
            if reaped > 0 && self.rng.gen_bool(0.1) {
                // Busy: no interrupts wanted for a long while.
                self.set_used_event((self.last_used + Wrapping(0x8000)).0);
            }
            let old = self.avail_idx;
            if !stopping {
                for _ in 0..self.rng.gen_range(1..=4) {
                    if !self.try_submit() {
                        break;
                    }
                }
            }
            if self.avail_idx != old {
                self.publish(old.0);
                continue;
            }
            if reaped > 0 || self.inflight.is_empty() {
                continue;
            }
            self.sleep();
        }
        self.shared.done.store(true, Ordering::SeqCst);
        self.shared.kick.ring();
        self
    }

    /// Nothing to submit and nothing used: ask for an interrupt after one
    /// of the chains in flight (any of them: the device must notify when
    /// its used index passes `used_event`), then wait for it.
    fn sleep(&mut self) {
        let seen = self.shared.irq.count();
        let ahead = self.rng.gen_range(0..self.inflight.len()) as u16;
        self.set_used_event((self.last_used + Wrapping(ahead)).0);
        fence(Ordering::SeqCst);
        let m = self.space.memory();
        if load16(&m, used_idx_at(USED), Ordering::Acquire) != self.last_used.0 {
            return;
        }
        self.stats.sleeps += 1;
        self.shared.irq.wait_past(seen, "the driver");
    }

    fn set_used_event(&self, v: u16) {
        let m = self.space.memory();
        self.shared.used_event_seq.fetch_add(1, Ordering::SeqCst);
        guest_store16(&m, used_event_at(AVAIL, Q), v, Ordering::Relaxed);
        self.shared.used_event_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes the entries from `old` on visible and kicks the device if its
    /// `avail_event` asks for it (2.7.10).
    fn publish(&mut self, old: u16) {
        let m = self.space.memory();
        guest_store16(&m, avail_idx_at(AVAIL), self.avail_idx.0, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = load16(&m, avail_event_at(USED, Q), Ordering::Relaxed);
        if need_event(event, self.avail_idx.0, old) {
            self.stats.kicks += 1;
            self.shared.kick.ring();
        } else {
            self.stats.kicks_suppressed += 1;
        }
    }

    fn take_desc(&mut self) -> u16 {
        let i = self.rng.gen_range(0..self.free_desc.len());
        self.free_desc.swap_remove(i)
    }

    fn take_slot(&mut self) -> usize {
        if let Some(i) = self.free_slots.iter().position(|&s| s == BOUNDARY_SLOT) {
            if self.rng.gen_bool(0.1) {
                return self.free_slots.swap_remove(i);
            }
        }
        let i = self.rng.gen_range(0..self.free_slots.len());
        self.free_slots.swap_remove(i)
    }

    /// Places one random chain and its avail entry (not yet published).
    fn try_submit(&mut self) -> bool {
        let n = self.rng.gen_range(1..=MAX_CHAIN);
        let indirect =
            FEATURES & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0 && n > 1 && self.rng.gen_bool(0.3);
        let need = if indirect { 1 } else { n };
        if self.free_desc.len() < need || self.free_slots.len() < n {
            return false;
        }
        let m = self.space.memory();
        // Device-readable buffers first, then device-writable (2.7.4.2).
        let n_read = self.rng.gen_range(0..=n);
        let mut bufs = Vec::with_capacity(n);
        for i in 0..n {
            let slot = self.take_slot();
            let base = slot_base(slot);
            let (off, len) = if slot == BOUNDARY_SLOT && self.rng.gen_bool(0.5) {
                let off = self.rng.gen_range(P / 2..P);
                (off, self.rng.gen_range(P - off + 1..=2 * P - off))
            } else {
                match self.rng.gen_range(0..4) {
                    0 => (0, P),
                    1 => (
                        self.rng.gen_range(0..2 * P - 64),
                        self.rng.gen_range(1..=64),
                    ),
                    _ => {
                        let off = self.rng.gen_range(0..2 * P - 1);
                        (off, self.rng.gen_range(1..=2 * P - off))
                    }
                }
            };
            let addr = base + off;
            let len = len as usize;
            if addr < REGION_A_PAGES * P && addr + len as u64 > REGION_A_PAGES * P {
                self.stats.straddling += 1;
            }
            let writable = i >= n_read;
            let mut data = Vec::new();
            if !writable {
                data = if self.rng.gen_bool(0.5) {
                    vec![self.rng.gen_range(1..4u8) * 0x11; len]
                } else {
                    (0..len).map(|_| self.rng.gen()).collect()
                };
                guest_write(&m, addr, &data);
            }
            bufs.push(Buf {
                addr,
                len,
                slot,
                writable,
                data,
            });
        }
        let flags = |i: usize, b: &Buf| {
            (if i + 1 < n { VRING_DESC_F_NEXT } else { 0 })
                | (if b.writable { VRING_DESC_F_WRITE } else { 0 })
        };
        let (head, descs) = if indirect {
            let head = self.take_desc();
            let table = INDIRECT + u64::from(head) * (MAX_CHAIN as u64 * 16);
            // The chain starts at entry 0 of the table; the rest in any order.
            let mut pos: Vec<u16> = (1..n as u16).collect();
            pos.shuffle(&mut self.rng);
            pos.insert(0, 0);
            for (i, b) in bufs.iter().enumerate() {
                let next = pos.get(i + 1).copied().unwrap_or(0);
                let at = table + u64::from(pos[i]) * 16;
                write_desc(&m, at, b.addr, b.len as u32, flags(i, b), next);
            }
            let at = DESC_TABLE + u64::from(head) * 16;
            write_desc(&m, at, table, 16 * n as u32, VRING_DESC_F_INDIRECT, 0);
            self.stats.indirect += 1;
            (head, vec![head])
        } else {
            let idx: Vec<u16> = (0..n).map(|_| self.take_desc()).collect();
            for (i, b) in bufs.iter().enumerate() {
                let next = idx.get(i + 1).copied().unwrap_or(0);
                let at = DESC_TABLE + u64::from(idx[i]) * 16;
                write_desc(&m, at, b.addr, b.len as u32, flags(i, b), next);
            }
            if n > 1 {
                self.stats.multi_direct += 1;
            }
            (idx[0], idx)
        };
        guest_store16(
            &m,
            avail_ring_at(AVAIL, self.avail_idx.0, Q),
            head,
            Ordering::Relaxed,
        );
        self.avail_idx += Wrapping(1);
        assert!(
            self.inflight
                .insert(head, Request { descs, bufs })
                .is_none(),
            "descriptor {head} handed out twice"
        );
        self.stats.submitted += 1;
        true
    }

    /// Takes every used element, checks it against the model, restores the
    /// buffers' pages and frees the descriptors.
    fn reap(&mut self) -> usize {
        let m = self.space.memory();
        let used = Wrapping(load16(&m, used_idx_at(USED), Ordering::Acquire));
        assert!(
            (used - self.last_used).0 as usize <= self.inflight.len(),
            "used index {} ran past the {} chains in flight from {}",
            used.0,
            self.inflight.len(),
            self.last_used.0
        );
        let mut n = 0;
        while self.last_used != used {
            let mut e = [0u8; 8];
            Bytes::read_slice(&*m, &mut e, used_elem_at(USED, self.last_used.0, Q)).unwrap();
            let id = u32::from_le_bytes(e[..4].try_into().unwrap());
            let len = u32::from_le_bytes(e[4..].try_into().unwrap());
            assert!(id < u32::from(Q), "used id {id} out of the table");
            let head = id as u16;
            let req = self
                .inflight
                .remove(&head)
                .unwrap_or_else(|| panic!("used id {head} is no chain in flight"));
            self.check(&m, head, &req, len);
            for b in &req.bufs {
                guest_write(&m, b.addr, &palette_range(b.addr, b.len));
                self.free_slots.push(b.slot);
            }
            self.free_desc.extend(&req.descs);
            self.last_used += Wrapping(1);
            self.stats.completed += 1;
            self.shared.completed.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
        n
    }

    fn check(&mut self, m: &GuestMemory, head: u16, req: &Request, len: u32) {
        let input: Vec<u8> = req
            .bufs
            .iter()
            .filter(|b| !b.writable)
            .flat_map(|b| b.data.iter().copied())
            .collect();
        let writable: usize = req.bufs.iter().filter(|b| b.writable).map(|b| b.len).sum();
        let want_len = if input.is_empty() { 0 } else { writable };
        assert_eq!(len as usize, want_len, "chain {head}: used length");
        let mut cursor = 0;
        for (i, b) in req.bufs.iter().enumerate() {
            let base = slot_base(b.slot);
            let mut want = palette_range(base, 2 * PAGE_SIZE);
            let off = (b.addr - base) as usize;
            if !b.writable {
                want[off..off + b.len].copy_from_slice(&b.data);
            } else if want_len > 0 {
                for j in 0..b.len {
                    want[off + j] = input[(cursor + j) % input.len()] ^ key(head);
                }
                cursor += b.len;
            }
            let mut have = vec![0u8; 2 * PAGE_SIZE];
            if i % 2 == 0 {
                Bytes::read_slice(m, &mut have, GuestAddress(base)).unwrap();
            } else {
                m.read(gpa(base), &mut have).unwrap();
            }
            if have != want {
                let at = (0..have.len()).find(|&j| have[j] != want[j]).unwrap();
                panic!(
                    "chain {head} buffer {i} ({} {} bytes at {:#x}): byte at {:#x} is {:#x}, \
                     want {:#x}",
                    if b.writable { "writable" } else { "readable" },
                    b.len,
                    b.addr,
                    base + at as u64,
                    have[at],
                    want[at]
                );
            }
            self.stats.bytes_checked += have.len() as u64;
        }
    }
}

#[derive(Debug, Default)]
struct DeviceStats {
    chains: u64,
    by_reader_writer: u64,
    notified: u64,
    suppressed: u64,
    exact_checks: u64,
    waits: u64,
}

struct Device<AS> {
    space: AS,
    queue: Queue,
    shared: Arc<Shared>,
    rng: SmallRng,
    /// Used elements added since the last `needs_notification`.
    added: u16,
    written_pages: BTreeSet<u64>,
    stats: DeviceStats,
}

impl<AS: GuestAddressSpace<M = GuestMemory>> Device<AS> {
    fn run(mut self) -> Self {
        loop {
            let mem = self.space.memory();
            self.queue.disable_notification(&*mem).unwrap();
            let mut batch = self.rng.gen_range(1..=4);
            while let Some(chain) = self.queue.pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                let len = if self.rng.gen_bool(0.5) {
                    self.echo_by_descriptors(&mem, chain)
                } else {
                    self.stats.by_reader_writer += 1;
                    self.echo_by_reader_writer(&mem, chain)
                };
                self.queue.add_used(&*mem, head, len).unwrap();
                self.written_pages.insert(USED / P);
                self.stats.chains += 1;
                self.added += 1;
                batch -= 1;
                if batch == 0 {
                    self.notify_if_needed(&mem);
                    batch = self.rng.gen_range(1..=4);
                }
            }
            if self.added > 0 {
                self.notify_if_needed(&mem);
            }
            let seen = self.shared.kick.count();
            let more = self.queue.enable_notification(&*mem).unwrap();
            // With the event index, enabling writes `avail_event`.
            self.written_pages.insert(USED / P);
            if more {
                continue;
            }
            if self.shared.done.load(Ordering::SeqCst) {
                break;
            }
            self.stats.waits += 1;
            self.shared.kick.wait_past(seen, "the device");
        }
        self
    }

    /// virtio-queue's `needs_notification`, checked against the spec's rule
    /// whenever the driver did not write `used_event` meanwhile.
    fn notify_if_needed(&mut self, mem: &GuestMemory) {
        let new = self.queue.next_used();
        let old = new.wrapping_sub(self.added);
        let seq = self.shared.used_event_seq.load(Ordering::SeqCst);
        let event = load16(mem, used_event_at(AVAIL, Q), Ordering::SeqCst);
        let needs = self.queue.needs_notification(mem).unwrap();
        fence(Ordering::SeqCst);
        if seq % 2 == 0 && self.shared.used_event_seq.load(Ordering::SeqCst) == seq {
            assert_eq!(
                needs,
                need_event(event, new, old),
                "needs_notification with used_event {event}, used index {old} -> {new}"
            );
            self.stats.exact_checks += 1;
        }
        self.added = 0;
        if needs {
            self.stats.notified += 1;
            self.shared.irq.ring();
        } else {
            self.stats.suppressed += 1;
        }
    }

    fn note_written(&mut self, addr: u64, len: usize) {
        if len > 0 {
            self.written_pages
                .extend(addr / P..=(addr + len as u64 - 1) / P);
        }
    }

    /// Walks the descriptors, reading and writing each buffer at
    /// `desc.addr()` through the memory's `Bytes`.
    fn echo_by_descriptors<M>(&mut self, mem: &GuestMemory, chain: DescriptorChain<M>) -> u32
    where
        M: Deref<Target = GuestMemory>,
    {
        let head = chain.head_index();
        let mut input = Vec::new();
        let mut outs = Vec::new();
        for d in chain {
            if d.is_write_only() {
                outs.push((d.addr(), d.len() as usize));
            } else {
                assert!(outs.is_empty(), "chain {head}: readable after writable");
                let mut b = vec![0u8; d.len() as usize];
                Bytes::read_slice(mem, &mut b, d.addr()).unwrap();
                input.extend_from_slice(&b);
            }
        }
        if input.is_empty() {
            return 0;
        }
        let mut done = 0;
        for (addr, len) in outs {
            let out: Vec<u8> = (0..len)
                .map(|j| input[(done + j) % input.len()] ^ key(head))
                .collect();
            Bytes::write_slice(mem, &out, addr).unwrap();
            self.note_written(addr.0, len);
            done += len;
        }
        done as u32
    }

    /// The same through virtio-queue's `Reader` and `Writer` (volatile
    /// slices of the regions' mappings, carrying the dirty log).
    fn echo_by_reader_writer<M>(&mut self, mem: &GuestMemory, chain: DescriptorChain<M>) -> u32
    where
        M: Deref<Target = GuestMemory> + Clone,
    {
        let head = chain.head_index();
        let mut input = Vec::new();
        chain
            .clone()
            .reader(mem)
            .unwrap()
            .read_to_end(&mut input)
            .unwrap();
        if input.is_empty() {
            return 0;
        }
        let mut writer = chain.clone().writer(mem).unwrap();
        let total = writer.available_bytes();
        let out: Vec<u8> = (0..total)
            .map(|j| input[j % input.len()] ^ key(head))
            .collect();
        writer.write_all(&out).unwrap();
        assert_eq!(writer.bytes_written(), total);
        for d in chain.writable() {
            self.note_written(d.addr().0, d.len() as usize);
        }
        total as u32
    }
}

/// The two regions, every buffer page on its palette, the rings' indexes at
/// `START`, dirty tracking on, and the memory registered for dedup.
fn setup() -> (Arc<FrameStore>, Arc<GuestMemory>, Arc<DedupHost>) {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let mem = GuestMemory::with_store(
        Arc::clone(&store),
        &[
            (gpa(0), REGION_A_PAGES * P),
            (gpa(REGION_A_PAGES * P), REGION_B_PAGES * P),
        ],
    )
    .unwrap();
    for k in 0..SLOTS {
        let base = slot_base(k);
        mem.write(gpa(base), &palette_range(base, 2 * PAGE_SIZE))
            .unwrap();
    }
    guest_store16(&mem, avail_idx_at(AVAIL), START, Ordering::Relaxed);
    guest_store16(&mem, used_event_at(AVAIL, Q), START, Ordering::Relaxed);
    guest_store16(&mem, used_idx_at(USED), START, Ordering::Relaxed);
    guest_store16(&mem, avail_event_at(USED, Q), START, Ordering::Relaxed);
    mem.set_dirty_tracking(RegionSet::All, true).unwrap();
    mem.harvest_dirty(RegionSet::All, &mut Vec::new()).unwrap();
    let mem = Arc::new(mem);
    let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
    host.register(Arc::clone(&mem), Default::default()).unwrap();
    (store, mem, host)
}

/// The queue as the driver programs it through the transport.
fn queue(size: u16, start: u16, event_idx: bool) -> Queue {
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_next_avail(start);
    q.set_next_used(start);
    q.set_ready(true);
    q
}

fn pages_of(runs: &[DirtyRun]) -> impl Iterator<Item = u64> + '_ {
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |i| r.start.0 / P + i))
}

type Plug<AS> = Box<dyn FnOnce(&AS, &DedupHost)>;

/// Runs driver and device on their own threads over `space` while this
/// thread merges, scans and unmerges, then checks everything.
fn echo_under_dedup<AS>(space: AS, host: &DedupHost, plug: Option<Plug<AS>>)
where
    AS: GuestAddressSpace<M = GuestMemory> + Send + 'static,
{
    let shared = Arc::new(Shared::default());
    let q = queue(Q, START, FEATURES & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
    assert!(q.is_valid(&*space.memory()));
    let device = Device {
        space: space.clone(),
        queue: q,
        shared: Arc::clone(&shared),
        rng: SmallRng::seed_from_u64(17),
        added: 0,
        written_pages: BTreeSet::new(),
        stats: DeviceStats::default(),
    };
    let device = thread::spawn(move || device.run());
    let driver = Driver::new(space.clone(), Arc::clone(&shared), 3);
    let driver = thread::spawn(move || driver.run());

    let mut dirty = BTreeSet::new();
    let mut runs = Vec::new();
    let mut rng = SmallRng::seed_from_u64(5);
    let (mut merged, mut unmerged, mut rounds) = (0u64, 0u64, 0u64);
    let plugs = plug.is_some();
    let mut plug = plug;
    let run_for = Duration::from_millis(1500);
    let started = Instant::now();
    // The time budget, and then, on a slow machine, more rounds until both
    // merges and unmerges happened and enough requests completed (at most
    // three budgets more): what is asserted is that they did, not speed.
    while started.elapsed() < run_for
        || ((merged == 0
            || unmerged == 0
            || shared.completed.load(Ordering::Relaxed) < MIN_REQUESTS)
            && started.elapsed() < run_for * 4)
    {
        if driver.is_finished() || device.is_finished() {
            break; // one of them panicked: the joins below report it
        }
        if started.elapsed() >= run_for / 2 {
            if let Some(p) = plug.take() {
                p(&space, host);
                shared.plugged.store(true, Ordering::SeqCst);
            }
        }
        match rng.gen_range(0..5) {
            0 | 1 => {
                let r = host.merge_now().unwrap();
                merged += r.merged_shared + r.merged_zero;
            }
            2 => {
                let r = host.scan_step(ScanBudget::Pages(100)).unwrap();
                merged += r.merged_shared + r.merged_zero;
            }
            3 => unmerged += host.unmerge_all().unwrap(),
            _ => {
                runs.clear();
                space
                    .memory()
                    .harvest_dirty(RegionSet::All, &mut runs)
                    .unwrap();
                dirty.extend(pages_of(&runs));
            }
        }
        rounds += 1;
    }
    shared.stop_submitting.store(true, Ordering::SeqCst);
    let driver = driver.join().unwrap();
    let device = device.join().unwrap();
    eprintln!(
        "rounds {rounds}, merged {merged}, unmerged {unmerged}\n{:?}\n{:?}",
        driver.stats, device.stats
    );

    assert!(
        merged > 0 && unmerged > 0,
        "dedup did real work: merged {merged}, unmerged {unmerged}"
    );
    let st = &driver.stats;
    assert!(st.completed >= MIN_REQUESTS, "{st:?}");
    assert_eq!(st.completed, st.submitted, "every request completed");
    assert!(
        st.indirect > 0 && st.multi_direct > 0 && st.straddling > 0,
        "{st:?}"
    );
    assert!(device.stats.exact_checks > 0, "{:?}", device.stats);
    assert!(device.stats.by_reader_writer > 0, "{:?}", device.stats);
    assert_eq!(driver.plugged, plugs, "the region was plugged mid-run");
    let slots = if plugs { SLOTS + HOTPLUG_SLOTS } else { SLOTS };
    assert_eq!(driver.free_slots.len(), slots);
    // The driver's own memory: every descriptor free again (and reused:
    // far more chains than descriptors), both indexes where both sides
    // think they are.
    assert!(driver.inflight.is_empty());
    let mut free = driver.free_desc.clone();
    free.sort_unstable();
    assert_eq!(free, (0..Q).collect::<Vec<_>>());
    assert!(st.submitted > 10 * u64::from(Q));
    assert_eq!(device.queue.next_avail(), driver.avail_idx.0);
    assert_eq!(device.queue.next_used(), driver.last_used.0);
    let mem = space.memory();
    assert_eq!(
        load16(&mem, used_idx_at(USED), Ordering::Acquire),
        driver.last_used.0
    );
    // The device wrote nowhere else: every buffer page is back on its
    // palette, read merged and unmerged.
    host.merge_now().unwrap();
    let check_slots = |when: &str| {
        for k in 0..slots {
            let base = slot_base(k);
            let mut have = vec![0u8; 2 * PAGE_SIZE];
            Bytes::read_slice(&*mem, &mut have, GuestAddress(base)).unwrap();
            assert!(
                have == palette_range(base, 2 * PAGE_SIZE),
                "{when}: slot {k} at {base:#x} is not back on its palette"
            );
        }
    };
    check_slots("merged");
    host.unmerge_all().unwrap();
    check_slots("unmerged");
    // Dirty tracking saw every page the device wrote.
    runs.clear();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    dirty.extend(pages_of(&runs));
    let missed: Vec<u64> = device.written_pages.difference(&dirty).copied().collect();
    assert!(
        missed.is_empty(),
        "pages the device wrote that dirty tracking did not report: {missed:?}"
    );
    assert!(device.written_pages.contains(&(USED / P)));
    if plugs {
        assert!(
            device.written_pages.last() >= Some(&(HOTPLUG_BASE / P)),
            "the device wrote buffers in the plugged region"
        );
    }
    assert!(device.written_pages.len() > 20);
}

#[test]
fn virtio_queue_echoes_chains_over_an_arc_while_dedup_merges_and_unmerges() {
    let (_store, mem, host) = setup();
    echo_under_dedup::<Arc<GuestMemory>>(mem, &host, None);
}

#[test]
fn virtio_queue_echoes_chains_over_an_atomic_memory_a_region_is_plugged_into() {
    let (store, mem, host) = setup();
    let space = AtomicGuestMemory::from(Arc::clone(&mem));
    let plug: Plug<AtomicGuestMemory> = Box::new(move |space, host| {
        let region = GuestRegion::allocate(&store, gpa(HOTPLUG_BASE), HOTPLUG_PAGES * P).unwrap();
        let plugged = space.memory().insert_region(Arc::clone(&region)).unwrap();
        for k in SLOTS..SLOTS + HOTPLUG_SLOTS {
            let base = slot_base(k);
            plugged
                .write(gpa(base), &palette_range(base, 2 * PAGE_SIZE))
                .unwrap();
        }
        let index = plugged.find_region(gpa(HOTPLUG_BASE)).unwrap();
        plugged
            .set_dirty_tracking(RegionSet::One(index), true)
            .unwrap();
        // Dedup takes the new region as a memory of its own, in the same
        // domain, so its pages fold with the first two regions'.
        let alone = Arc::new(GuestMemory::from_regions(vec![region]).unwrap());
        host.register(alone, Default::default()).unwrap();
        space.lock().unwrap().replace(plugged);
    });
    echo_under_dedup(space, &host, Some(plug));
}

/// Adds a one-buffer chain at descriptor `head` and its avail entry; returns
/// the new avail index, unpublished.
fn add_chain(m: &GuestMemory, size: u16, avail_idx: u16, head: u16) -> u16 {
    let buf = slot_base(usize::from(head));
    write_desc(m, DESC_TABLE + u64::from(head) * 16, buf, 64, 0, 0);
    guest_store16(
        m,
        avail_ring_at(AVAIL, avail_idx, size),
        head,
        Ordering::Relaxed,
    );
    avail_idx.wrapping_add(1)
}

fn publish(m: &GuestMemory, idx: u16) {
    guest_store16(m, avail_idx_at(AVAIL), idx, Ordering::Release);
}

/// The event index by hand, on one thread, with the indexes wrapping: the
/// device's `avail_event` and the driver's kicks, the driver's `used_event`
/// and the device's `needs_notification`, exactly as 2.7.10 of the spec
/// says; and without the feature, the used ring's `NO_NOTIFY` flag.
#[test]
fn event_index_suppresses_and_requires_notifications_as_the_spec_says() {
    let (_store, mem, host) = setup();
    let m: &GuestMemory = &mem;
    const SIZE: u16 = 8;
    let s: u16 = 0xfffd;
    let avail_event = || load16(m, avail_event_at(USED, SIZE), Ordering::Relaxed);
    guest_store16(m, avail_idx_at(AVAIL), s, Ordering::Relaxed);
    guest_store16(m, used_idx_at(USED), s, Ordering::Relaxed);
    let r = host.merge_now().unwrap();
    assert!(r.merged_zero + r.merged_shared > 0);
    let mut q = queue(SIZE, s, true);
    assert!(q.is_valid(m));

    // The device, caught up, asks to be kicked at the next entry.
    assert!(!q.enable_notification(m).unwrap());
    assert_eq!(avail_event(), s);
    // One chain: the driver must kick.
    let mut idx = add_chain(m, SIZE, s, 0);
    publish(m, idx);
    assert!(need_event(avail_event(), idx, s));
    // Another before the device ran: no kick.
    let old = idx;
    idx = add_chain(m, SIZE, idx, 1);
    publish(m, idx);
    assert!(!need_event(avail_event(), idx, old));
    // The device sees the pending entries when it re-enables.
    assert!(q.enable_notification(m).unwrap());
    assert_eq!(avail_event(), s);
    let heads: Vec<u16> = (0..2)
        .map(|_| q.pop_descriptor_chain(m).unwrap().head_index())
        .collect();
    assert_eq!(heads, [0, 1]);
    assert!(q.pop_descriptor_chain(m).is_none());
    host.merge_now().unwrap();
    assert!(!q.enable_notification(m).unwrap());
    assert_eq!(avail_event(), s.wrapping_add(2));
    // Three at once, across the index's wrap: one kick.
    let old = idx;
    for h in 2..5 {
        idx = add_chain(m, SIZE, idx, h);
    }
    publish(m, idx);
    assert!(need_event(avail_event(), idx, old));
    assert_eq!(idx, 2, "the avail index wrapped");
    let heads: Vec<u16> = (0..3)
        .map(|_| q.pop_descriptor_chain(m).unwrap().head_index())
        .collect();
    assert_eq!(heads, [2, 3, 4]);

    // Interrupts: the driver wants one when the 2nd chain is used.
    guest_store16(
        m,
        used_event_at(AVAIL, SIZE),
        s.wrapping_add(1),
        Ordering::Relaxed,
    );
    q.add_used(m, 0, 0).unwrap();
    assert!(!q.needs_notification(m).unwrap(), "used index s+1: not yet");
    host.merge_now().unwrap();
    q.add_used(m, 1, 0).unwrap();
    assert!(q.needs_notification(m).unwrap(), "used index passed s+1");
    // A batch of three across the wrap whose middle is the event: one
    // interrupt, at the end of the batch.
    guest_store16(m, used_event_at(AVAIL, SIZE), 0, Ordering::Relaxed); // s + 3
    for h in 2..5 {
        q.add_used(m, h, 0).unwrap();
    }
    assert_eq!(q.next_used(), 2);
    assert!(q.needs_notification(m).unwrap());
    assert_eq!(load16(m, used_idx_at(USED), Ordering::Acquire), 2);
    // An event already passed: none.
    guest_store16(m, used_event_at(AVAIL, SIZE), 1, Ordering::Relaxed);
    idx = add_chain(m, SIZE, idx, 5);
    publish(m, idx);
    let c = q.pop_descriptor_chain(m).unwrap();
    q.add_used(m, c.head_index(), 0).unwrap();
    assert!(
        !q.needs_notification(m).unwrap(),
        "used_event 1 was passed before"
    );
    assert!(!q.enable_notification(m).unwrap());

    // Random batches against the rule, the driver moving `used_event`
    // anywhere within or beyond the batch.
    let mut rng = SmallRng::seed_from_u64(9);
    let mut next_head = 0u16;
    for round in 0..2000 {
        let k = rng.gen_range(1..=SIZE);
        let old = idx;
        for _ in 0..k {
            idx = add_chain(m, SIZE, idx, next_head % SIZE);
            next_head += 1;
        }
        publish(m, idx);
        let used_before = q.next_used();
        let event = used_before
            .wrapping_add(rng.gen_range(0..2 * k))
            .wrapping_sub(1);
        guest_store16(m, used_event_at(AVAIL, SIZE), event, Ordering::Relaxed);
        // The device enabled notifications when it last caught up: the
        // driver must kick.
        assert_eq!(avail_event(), old);
        assert!(need_event(avail_event(), idx, old));
        for _ in 0..k {
            let c = q.pop_descriptor_chain(m).unwrap();
            q.add_used(m, c.head_index(), 0).unwrap();
        }
        let new = q.next_used();
        assert_eq!(
            q.needs_notification(m).unwrap(),
            need_event(event, new, used_before),
            "round {round}: used_event {event}, used {used_before} -> {new}"
        );
        assert!(!q.enable_notification(m).unwrap());
        if round % 500 == 0 {
            host.merge_now().unwrap();
        }
    }

    // Without the event index: the used ring's flags, and every add needs
    // an interrupt.
    let mut q = queue(SIZE, q.next_avail(), false);
    q.set_next_used(load16(m, used_idx_at(USED), Ordering::Acquire));
    let used_flags = || load16(m, GuestAddress(USED), Ordering::Relaxed);
    q.disable_notification(m).unwrap();
    assert_eq!(used_flags(), VRING_USED_F_NO_NOTIFY as u16);
    assert!(!q.enable_notification(m).unwrap());
    assert_eq!(used_flags(), 0);
    idx = add_chain(m, SIZE, idx, 0);
    publish(m, idx);
    let c = q.pop_descriptor_chain(m).unwrap();
    q.add_used(m, c.head_index(), 0).unwrap();
    assert!(q.needs_notification(m).unwrap());
}
