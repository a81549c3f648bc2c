//! The mini VMM's guest: its memory layout, the 4-level page tables the VMM
//! builds for it (4 KiB and 2 MiB pages), and its 64-bit programs, assembled
//! with iced-x86 at start-up. Used by the mini VMM ([`super::vmm`]), the
//! KVM examples (`examples/kvm_*.rs`) and the KVM integration tests
//! (`tests/kvm_*.rs`).
//!
//! Layout (guest-physical = guest-virtual below 2 MiB):
//! - region 0, `0..2 MiB`: page tables at `0x1000..0x40000`, code at
//!   [`CODE`], stack below [`STACK_TOP`], a scratch page at [`SCRATCH`];
//!   identity-mapped with 4 KiB pages.
//! - region 1, [`DATA_GPA`]`..+data`: the data the program fills and
//!   writes, mapped at [`DATA_VA`] (the upper half of the address space),
//!   its first half with 2 MiB pages and the rest with 4 KiB pages, no-execute.
// Offsets and counts here are small constants (below 1 MiB).
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;

use iced_x86::IcedError;
use pagefold::{kvm::LongMode, FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE};

/// The mini VMM's result: any error, sendable between threads.
pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Size of region 0.
pub const LOW_SIZE: u64 = 2 << 20;
/// The root page table (PML4) of the guest's page tables: its CR3.
pub const PML4: u64 = 0x1000;
const PDPT_LOW: u64 = 0x2000;
const PD_LOW: u64 = 0x3000;
const PT_LOW: u64 = 0x4000;
const PDPT_HIGH: u64 = 0x5000;
const PD_HIGH: u64 = 0x6000;
/// Page tables of the 4 KiB half of the data mapping start here.
const PT_HIGH: u64 = 0x8000;
const TABLES_END: u64 = 0x40000;
/// Where the program is loaded (and runs: identity-mapped).
pub const CODE: u64 = 0x40000;
/// The top of the program's stack (it grows down).
pub const STACK_TOP: u64 = 0x80000;
/// A page of the low region the store-kinds program reads its patterns
/// from.
pub const SCRATCH: u64 = 0x90000;
/// Guest-physical start of the data region.
pub const DATA_GPA: u64 = 2 << 20;
/// Guest-virtual address the data is mapped at (PML4 slot 384).
pub const DATA_VA: u64 = 0xffff_c000_0000_0000;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
/// Every mapping is user-accessible: the programs run in ring 3 (see
/// `LongMode::user_mode`).
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
const HUGE: u64 = 2 << 20;

/// Ports of the fill-and-write program.
pub const PORT_FILLED: u16 = 0x10;
/// `OUT`: a round of writes ended (the value: the round number). The VMM
/// may stop the vCPU here (to migrate it): the guest holds nothing in
/// vector registers across this exit.
pub const PORT_PROGRESS: u16 = 0x11;
/// `OUT`: a verification ended: 1 if the whole active data summed to the
/// running checksum, 0 if not.
pub const PORT_VERIFY: u16 = 0x12;
/// `OUT`: the guest gave up the data pages from this page index to the
/// end (a balloon): the VMM may release them.
pub const PORT_BALLOON: u16 = 0x13;
/// `IN` after each round: [`CONTROL_RUN`], [`CONTROL_VERIFY`] or
/// [`CONTROL_VERIFY_HALT`].
pub const PORT_CONTROL: u16 = 0x14;
/// `OUT` of the store-kinds program: which store it finished (1-based).
pub const PORT_STORE: u16 = 0x15;
/// `OUT`: the program stopped (it runs in ring 3, where `HLT` is not
/// allowed); it repeats the write if resumed.
pub const PORT_HALT: u16 = 0x1f;
/// [`PORT_CONTROL`]: run another round of writes.
pub const CONTROL_RUN: u32 = 0;
/// [`PORT_CONTROL`]: verify the data against the running checksum, then
/// go on writing.
pub const CONTROL_VERIFY: u32 = 1;
/// [`PORT_CONTROL`]: verify, then stop ([`PORT_HALT`]).
pub const CONTROL_VERIFY_HALT: u32 = 2;

/// What the fill-and-write program does.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// Data pages (a multiple of 1024: 4 MiB).
    pub data_pages: u64,
    /// Pages at the end of the data given up after the fill.
    pub balloon_pages: u64,
    /// Pages the write loop writes to at a time, a window of the active
    /// data (a power of two).
    pub hot_pages: u64,
    /// The window moves to the next `hot_pages` every `2^window_shift`
    /// rounds, cycling over the active data, so writes keep reaching
    /// pages that were merged.
    pub window_shift: u32,
    /// Random 8-byte writes per round.
    pub writes_per_round: u64,
}

/// The multiplier of the content mix and of the write loop's generator.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
const LCG_A: u64 = 6_364_136_223_846_793_005;
const LCG_C: u64 = 1_442_695_040_888_963_407;

/// Kind of data page `p`: pages `p % 8` in 0..4 hold content identical in
/// every VM, 4..6 stay zero, 6..8 hold content unique to the VM.
pub fn page_kind(p: u64) -> PageKind {
    match p % 8 {
        0..=3 => PageKind::Shared,
        4 | 5 => PageKind::Zero,
        _ => PageKind::Unique,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// What a data page holds after the fill (see [`page_kind`]).
pub enum PageKind {
    /// Content identical in every VM.
    Shared,
    /// Zeros.
    Zero,
    /// Content unique to the VM.
    Unique,
}

/// The qword the fill writes at data qword `q` of a VM with `seed`
/// (the host-side model of the guest's fill loop).
pub fn fill_value(q: u64, seed: u64) -> u64 {
    let key = match page_kind(q / 512) {
        PageKind::Shared => 0,
        PageKind::Zero => return 0,
        PageKind::Unique => seed << 48,
    };
    let v = (q ^ key).wrapping_mul(MIX);
    v ^ (v >> 29)
}

/// Guest memory for a VM with `data_pages` of data, on `store` (the dedup
/// host's frame store, so its pages can be folded across VMs).
pub fn memory(store: &Arc<FrameStore>, data_pages: u64) -> Res<Arc<GuestMemory>> {
    Ok(Arc::new(GuestMemory::with_store(
        Arc::clone(store),
        &[
            (GuestPhysAddr(0), LOW_SIZE),
            (GuestPhysAddr(DATA_GPA), data_pages * PAGE_SIZE as u64),
        ],
    )?))
}

/// Writes the page tables: the low 2 MiB identity-mapped with 4 KiB pages;
/// the data at [`DATA_VA`], its first half (rounded down to 2 MiB; more
/// above 224 MiB of data, so the rest's 4 KiB page tables fit, at most
/// 112 MiB of them) with 2 MiB pages and the rest with 4 KiB pages.
/// Returns the PML4's address.
pub fn build_page_tables(mem: &GuestMemory, data_pages: u64) -> Res<GuestPhysAddr> {
    let data_size = data_pages * PAGE_SIZE as u64;
    if data_size > 1 << 30 {
        return Err("the mini VMM maps at most 1 GiB of data".into());
    }
    let entry = |at: u64, index: u64, value: u64| -> Res<()> {
        mem.write_obj(GuestPhysAddr(at + index * 8), value)?;
        Ok(())
    };
    // Low: PML4[0] -> PDPT_LOW[0] -> PD_LOW[0] -> PT_LOW (512 x 4 KiB).
    entry(PML4, 0, PDPT_LOW | PTE_P | PTE_RW | PTE_US)?;
    entry(PDPT_LOW, 0, PD_LOW | PTE_P | PTE_RW | PTE_US)?;
    entry(PD_LOW, 0, PT_LOW | PTE_P | PTE_RW | PTE_US)?;
    for i in 0..512 {
        entry(PT_LOW, i, (i * PAGE_SIZE as u64) | PTE_P | PTE_RW | PTE_US)?;
    }
    // High: PML4[384] -> PDPT_HIGH[0] -> PD_HIGH.
    entry(
        PML4,
        (DATA_VA >> 39) & 511,
        PDPT_HIGH | PTE_P | PTE_RW | PTE_US,
    )?;
    entry(PDPT_HIGH, 0, PD_HIGH | PTE_P | PTE_RW | PTE_US)?;
    // Half with 2 MiB pages, or more where the 4 KiB page tables of the
    // rest would not fit the table area (above 224 MiB of data).
    let small_max = (TABLES_END - PT_HIGH) / PAGE_SIZE as u64 * HUGE;
    let huge_part = ((data_size / 2) / HUGE * HUGE).max(data_size.saturating_sub(small_max));
    let mut next_pt = PT_HIGH;
    let mut off = 0;
    while off < data_size {
        let pde = off / HUGE;
        if off < huge_part {
            entry(
                PD_HIGH,
                pde,
                (DATA_GPA + off) | PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_NX,
            )?;
            off += HUGE;
            continue;
        }
        if next_pt >= TABLES_END {
            return Err("too much data for the page-table area".into());
        }
        entry(PD_HIGH, pde, next_pt | PTE_P | PTE_RW | PTE_US)?;
        for i in 0..512 {
            let o = off + i * PAGE_SIZE as u64;
            if o < data_size {
                entry(
                    next_pt,
                    i,
                    (DATA_GPA + o) | PTE_P | PTE_RW | PTE_US | PTE_NX,
                )?;
            }
        }
        next_pt += PAGE_SIZE as u64;
        off += HUGE;
    }
    Ok(GuestPhysAddr(PML4))
}

/// Loads `code` at [`CODE`] and returns the vCPU's start state.
pub fn load(mem: &GuestMemory, code: &[u8], cr3: GuestPhysAddr, seed: u64) -> Res<LongMode> {
    mem.write(GuestPhysAddr(CODE), code)?;
    Ok(LongMode {
        cr3,
        entry: pagefold::GuestVirtAddr(CODE),
        stack: pagefold::GuestVirtAddr(STACK_TOP),
        args: [seed, 0],
        user_mode: true,
    })
}

fn asm_err(e: IcedError) -> Box<dyn std::error::Error + Send + Sync> {
    format!("assembling the guest program: {e}").into()
}

/// The fill-and-write program (`RDI` = the VM's seed, nonzero):
/// 1. fills the data: [`fill_value`] for every qword of every page that is
///    not a zero page, keeping a running sum of all data qwords in `R14`;
///    `OUT` [`PORT_FILLED`];
/// 2. gives up the last `balloon_pages` (subtracts them from the sum, never
///    touches them again), `OUT` [`PORT_BALLOON`] with the first page given up;
/// 3. loops forever: a round of `writes_per_round` random 8-byte writes in
///    the round's window of `hot_pages` (each updates the running sum), `OUT` [`PORT_PROGRESS`]
///    (the round), `IN` [`PORT_CONTROL`]: on [`CONTROL_VERIFY`] sums the
///    whole active data and `OUT`s [`PORT_VERIFY`] 1 if it equals the running
///    sum, else 0; on [`CONTROL_VERIFY_HALT`] the same, then `OUT`s
///    [`PORT_HALT`].
///
/// A lost write, a write that landed in another VM's page, or a page
/// released with data in it changes the sum: the verification catches it.
pub fn fill_and_write(p: &Program) -> Res<Vec<u8>> {
    use iced_x86::code_asm::*;
    if p.data_pages % 1024 != 0 || !p.hot_pages.is_power_of_two() {
        return Err("data pages must be a multiple of 1024 and hot pages a power of two".into());
    }
    if p.hot_pages + p.balloon_pages > p.data_pages {
        return Err("the hot window does not fit the active data".into());
    }
    let total_q = p.data_pages * 512;
    let active_q = (p.data_pages - p.balloon_pages) * 512;
    let hot_mask = p.hot_pages * 512 - 1;
    // Windows over the active data: a power of two of them.
    let windows = (p.data_pages - p.balloon_pages) / p.hot_pages;
    let window_mask = (1u64 << windows.max(1).ilog2()) - 1;
    let window_bytes =
        i32::try_from(p.hot_pages * PAGE_SIZE as u64).map_err(|_| "hot window too large")?;
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    (|| -> Result<(), IcedError> {
        let mut fill_page = a.create_label();
        let mut shared = a.create_label();
        let mut do_fill = a.create_label();
        let mut fill_q = a.create_label();
        let mut next_page = a.create_label();
        let mut balloon = a.create_label();
        let mut balloon_done = a.create_label();
        let mut round = a.create_label();
        let mut write = a.create_label();
        let mut verify = a.create_label();
        let mut halted = a.create_label();

        a.mov(r15, DATA_VA)?;
        a.mov(r12, rdi)?; // seed
        a.mov(r10, MIX)?;
        a.xor(r14, r14)?; // running sum
        a.xor(ecx, ecx)?; // page
        a.set_label(&mut fill_page)?;
        a.mov(rax, rcx)?;
        a.and(eax, 7)?;
        a.cmp(eax, 4)?;
        a.jb(shared)?;
        a.cmp(eax, 6)?;
        a.jb(next_page)?; // zero page: untouched
        a.mov(rbx, r12)?;
        a.shl(rbx, 48)?; // unique: key = seed << 48
        a.jmp(do_fill)?;
        a.set_label(&mut shared)?;
        a.xor(ebx, ebx)?; // shared: key = 0
        a.set_label(&mut do_fill)?;
        a.mov(r8, rcx)?;
        a.shl(r8, 9)?; // first qword of the page
        a.xor(r9d, r9d)?;
        a.set_label(&mut fill_q)?;
        a.lea(rax, qword_ptr(r8 + r9))?;
        a.mov(rdx, rax)?; // q
        a.xor(rax, rbx)?;
        a.imul_2(rax, r10)?;
        a.mov(r11, rax)?;
        a.shr(r11, 29)?;
        a.xor(rax, r11)?;
        a.mov(qword_ptr(r15 + rdx * 8), rax)?;
        a.add(r14, rax)?;
        a.inc(r9)?;
        a.cmp(r9, 512)?;
        a.jb(fill_q)?;
        a.set_label(&mut next_page)?;
        a.inc(rcx)?;
        a.mov(rax, p.data_pages)?;
        a.cmp(rcx, rax)?;
        a.jb(fill_page)?;
        a.mov(dx, u32::from(PORT_FILLED))?;
        a.out(dx, eax)?;

        // Give up the tail: take it out of the sum.
        a.mov(rcx, active_q)?;
        a.mov(rax, total_q)?;
        a.set_label(&mut balloon)?;
        a.cmp(rcx, rax)?;
        a.jae(balloon_done)?;
        a.sub(r14, qword_ptr(r15 + rcx * 8))?;
        a.inc(rcx)?;
        a.jmp(balloon)?;
        a.set_label(&mut balloon_done)?;
        a.mov(rax, p.data_pages - p.balloon_pages)?;
        a.mov(dx, u32::from(PORT_BALLOON))?;
        a.out(dx, eax)?;

        a.mov(r13, r12)?;
        a.imul_2(r13, r10)?; // generator state from the seed
        a.xor(ebp, ebp)?; // round
        a.set_label(&mut round)?;
        a.mov(rax, rbp)?;
        a.shr(rax, p.window_shift)?;
        a.mov(rdx, window_mask)?;
        a.and(rax, rdx)?;
        a.imul_3(rax, rax, window_bytes)?;
        a.lea(r9, qword_ptr(r15 + rax))?; // this round's window
        a.mov(rcx, p.writes_per_round)?;
        a.set_label(&mut write)?;
        a.mov(rax, LCG_A)?;
        a.imul_2(r13, rax)?;
        a.mov(rax, LCG_C)?;
        a.add(r13, rax)?;
        a.mov(rax, r13)?;
        a.shr(rax, 17)?;
        a.mov(rdx, hot_mask)?;
        a.and(rax, rdx)?;
        a.sub(r14, qword_ptr(r9 + rax * 8))?;
        a.mov(qword_ptr(r9 + rax * 8), r13)?;
        a.add(r14, r13)?;
        a.dec(rcx)?;
        a.jnz(write)?;
        a.inc(ebp)?;
        a.mov(eax, ebp)?;
        a.mov(dx, u32::from(PORT_PROGRESS))?;
        a.out(dx, eax)?;
        a.mov(dx, u32::from(PORT_CONTROL))?;
        a.in_(eax, dx)?;
        a.test(eax, eax)?;
        a.jz(round)?;
        a.mov(ebx, eax)?; // the command
        a.xor(eax, eax)?;
        a.xor(ecx, ecx)?;
        a.mov(rdx, active_q)?;
        a.set_label(&mut verify)?;
        a.add(rax, qword_ptr(r15 + rcx * 8))?;
        a.inc(rcx)?;
        a.cmp(rcx, rdx)?;
        a.jb(verify)?;
        a.cmp(rax, r14)?;
        a.sete(al)?;
        a.movzx(eax, al)?;
        a.mov(dx, u32::from(PORT_VERIFY))?;
        a.out(dx, eax)?;
        a.cmp(ebx, CONTROL_VERIFY_HALT)?;
        a.jne(round)?;
        a.set_label(&mut halted)?;
        a.mov(dx, u32::from(PORT_HALT))?;
        a.out(dx, eax)?;
        a.jmp(round)?;
        Ok(())
    })()
    .map_err(asm_err)?;
    a.assemble(CODE).map_err(asm_err)
}

/// One store of the store-kinds program: what it writes where, so the
/// test can apply the same to its model of the page bytes.
#[derive(Clone, Copy, Debug)]
pub struct Store {
    /// The store's name (its instruction), for messages.
    pub name: &'static str,
    /// Byte offset in the data.
    pub offset: u64,
    /// Bytes written, taken from the pattern at [`SCRATCH`] (`pattern[..len]`),
    /// except for `fxsave`, whose bytes the test does not model.
    pub len: u64,
    /// Issued only where the vCPU offers AVX.
    pub needs_avx: bool,
}

/// The stores the store-kinds program issues, each to its own data page
/// (pages `8 * i` for store `i`, and `8 * i + 1` for the stores that
/// cross into the next page: shared pages when the data was filled by
/// [`fill_value`]).
pub fn stores() -> Vec<Store> {
    let page = PAGE_SIZE as u64;
    let s = |i: u64, name, off: u64, len, avx| Store {
        name,
        offset: 8 * i * page + off,
        len,
        needs_avx: avx,
    };
    vec![
        s(0, "mov qword", 8, 8, false),
        s(1, "mov byte (last byte of the page)", page - 1, 1, false),
        s(2, "movdqu xmm (SSE, unaligned)", 17, 16, false),
        s(3, "movntdq xmm (non-temporal)", 64, 16, false),
        s(4, "vmovdqu ymm (AVX)", 33, 32, true),
        s(5, "rep movsb (8 KiB over two pages)", 100, 2 * page, false),
        s(7, "rep stosq (a whole page)", 0, page, false),
        s(8, "lock xadd qword", 256, 8, false),
        s(9, "mov qword across a page boundary", page - 4, 8, false),
        s(11, "push (stack in the page)", page - 8, 8, false),
        s(12, "fxsave (512 bytes)", 512, 512, false),
        s(
            13,
            "maskmovdqu xmm (SSE2 masked, non-temporal)",
            48,
            16,
            false,
        ),
    ]
}

/// The pattern the store-kinds program stores: `len` bytes for a store
/// starting from byte 0 of [`SCRATCH`], and `stosq`'s qword is the first
/// eight bytes repeated.
pub fn pattern() -> Vec<u8> {
    (0..2 * PAGE_SIZE as u64)
        .map(|i| (i.wrapping_mul(37) ^ 0xa5) as u8)
        .collect()
}

/// The store-kinds program: issues each of [`stores`] (AVX only with
/// `avx`) to the data at [`DATA_VA`], `OUT`s [`PORT_STORE`] after each,
/// then `OUT`s [`PORT_HALT`]. Loads the pattern from [`SCRATCH`] (write [`pattern`]
/// there first).
pub fn store_kinds(avx: bool) -> Res<Vec<u8>> {
    use iced_x86::code_asm::*;
    let stores = stores();
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    (|| -> Result<(), IcedError> {
        let off = |name: &str| -> u64 {
            stores
                .iter()
                .find(|s| s.name.starts_with(name))
                .map_or(0, |s| s.offset)
        };
        let done = |a: &mut CodeAssembler, n: u32| -> Result<(), IcedError> {
            a.mov(eax, n)?;
            a.mov(dx, u32::from(PORT_STORE))?;
            a.out(dx, eax)?;
            a.mov(rax, qword_ptr(r14)) // the pattern again
        };
        a.mov(r15, DATA_VA)?;
        a.mov(r14, SCRATCH)?;
        a.mov(rax, qword_ptr(r14))?;
        a.movdqu(xmm0, xmmword_ptr(r14))?;
        a.mov(qword_ptr(r15 + off("mov qword") as i32), rax)?;
        done(&mut a, 1)?;
        a.mov(byte_ptr(r15 + off("mov byte") as i32), al)?;
        done(&mut a, 2)?;
        a.movdqu(xmmword_ptr(r15 + off("movdqu") as i32), xmm0)?;
        done(&mut a, 3)?;
        a.movntdq(xmmword_ptr(r15 + off("movntdq") as i32), xmm0)?;
        a.sfence()?;
        done(&mut a, 4)?;
        if avx {
            a.vmovdqu(ymm0, ymmword_ptr(r14))?;
            a.vmovdqu(ymmword_ptr(r15 + off("vmovdqu") as i32), ymm0)?;
            a.vzeroupper()?;
        }
        done(&mut a, 5)?;
        a.mov(rsi, r14)?;
        a.lea(rdi, qword_ptr(r15 + off("rep movsb") as i32))?;
        a.mov(ecx, 2 * PAGE_SIZE as u32)?;
        a.cld()?;
        a.rep().movsb()?;
        done(&mut a, 6)?;
        a.mov(rax, qword_ptr(r14))?;
        a.lea(rdi, qword_ptr(r15 + off("rep stosq") as i32))?;
        a.mov(ecx, (PAGE_SIZE / 8) as u32)?;
        a.rep().stosq()?;
        done(&mut a, 7)?;
        // xadd stores old + rax; the test models the result as the
        // pattern, so subtract the old value first.
        a.lea(rdi, qword_ptr(r15 + off("lock xadd") as i32))?;
        a.mov(rax, qword_ptr(r14))?;
        a.sub(rax, qword_ptr(rdi))?;
        a.lock().xadd(qword_ptr(rdi), rax)?;
        done(&mut a, 8)?;
        a.mov(rax, qword_ptr(r14))?;
        a.mov(qword_ptr(r15 + off("mov qword across") as i32), rax)?;
        done(&mut a, 9)?;
        a.mov(rbx, rsp)?;
        a.lea(rsp, qword_ptr(r15 + (off("push") + 8) as i32))?;
        a.push(rax)?;
        a.mov(rsp, rbx)?;
        done(&mut a, 10)?;
        a.fxsave(qword_ptr(r15 + off("fxsave") as i32))?;
        done(&mut a, 11)?;
        a.pcmpeqb(xmm1, xmm1)?; // mask: every byte
        a.lea(rdi, qword_ptr(r15 + off("maskmovdqu") as i32))?;
        a.maskmovdqu(xmm0, xmm1)?;
        a.sfence()?;
        done(&mut a, 12)?;
        let mut halt = a.create_label();
        a.set_label(&mut halt)?;
        a.mov(dx, u32::from(PORT_HALT))?;
        a.out(dx, eax)?;
        a.jmp(halt)?;
        Ok(())
    })()
    .map_err(asm_err)?;
    a.assemble(CODE).map_err(asm_err)
}

/// The touch program: writes one qword to each of the first `pages` data
/// pages, in order, then `OUT`s [`PORT_HALT`]; resumed, it starts over.
/// Timing a run of it over merged pages against a run over pages it
/// already owns gives the cost of a guest write's copy-on-write break.
pub fn touch_pages(pages: u64) -> Res<Vec<u8>> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    (|| -> Result<(), IcedError> {
        let mut start = a.create_label();
        let mut page = a.create_label();
        a.set_label(&mut start)?;
        a.mov(r15, DATA_VA)?;
        a.mov(rcx, pages)?;
        a.set_label(&mut page)?;
        a.mov(qword_ptr(r15 + 8), rcx)?;
        a.add(r15, PAGE_SIZE as i32)?;
        a.dec(rcx)?;
        a.jnz(page)?;
        a.mov(dx, u32::from(PORT_HALT))?;
        a.out(dx, eax)?;
        a.jmp(start)?;
        Ok(())
    })()
    .map_err(asm_err)?;
    a.assemble(CODE).map_err(asm_err)
}

/// The write-table program (position-independent; any identity-mapped
/// layout): `RDI` = a table of `RSI` (at least 1) addresses; writes `ESI`
/// (the count left) as 4 bytes to each, then `OUT 0x10, AL` and spins.
/// Used by the dirty-log tests and `examples/kvm_dirty_ratios`.
pub fn write_table() -> Res<Vec<u8>> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    (|| -> Result<(), IcedError> {
        let mut next = a.create_label();
        let mut spin = a.create_label();
        a.set_label(&mut next)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(dword_ptr(rax), esi)?;
        a.add(rdi, 8)?;
        a.dec(rsi)?;
        a.jnz(next)?;
        a.out(0x10u32, al)?;
        a.set_label(&mut spin)?;
        a.jmp(spin)?;
        Ok(())
    })()
    .map_err(asm_err)?;
    a.assemble(0).map_err(asm_err)
}

/// `OUT` of the CPU-state program: its registers are loaded; the VMM
/// stops the vCPU here to snapshot it.
pub const PORT_CPU_STATE_READY: u16 = 0x16;
/// Data pages the CPU-state program fills and checks.
pub const CPU_STATE_PAGES: u64 = 16;
/// `MXCSR` the CPU-state program loads: round toward zero, every
/// exception masked (the reset value is `0x1f80`).
pub const CPU_STATE_MXCSR: u32 = 0x7f80;
/// [`PORT_VERIFY`] bits of the CPU-state program, each set when its check
/// passed.
pub mod cpu_check {
    /// The time-stamp counter did not go back across the stop.
    pub const TSC: u32 = 1 << 0;
    /// `XMM0`-`XMM15` still hold the data they were loaded from.
    pub const XMM: u32 = 1 << 1;
    /// The x87 stack still holds pi and `seed + 1`.
    pub const X87: u32 = 1 << 2;
    /// `MXCSR` is still [`super::CPU_STATE_MXCSR`].
    pub const MXCSR: u32 = 1 << 3;
    /// The data pages still sum to the running sum (`R14`).
    pub const MEMORY: u32 = 1 << 4;
    /// Every check.
    pub const ALL: u32 = TSC | XMM | X87 | MXCSR | MEMORY;
}
/// Pi as an IEEE double (what `FLDPI` then `FSTP qword` stores).
const PI_BITS: u64 = 0x4009_21fb_5444_2d18;

/// The CPU-state program (`RDI` = a seed below 2^52): state a vCPU keeps
/// outside its general registers, carried across a stop (a snapshot and
/// restore, a migration):
/// 1. fills [`CPU_STATE_PAGES`] data pages (each qword `(q ^ seed) *`
///    the mix constant), summing them in `R14`; loads `XMM0`-`XMM15` from
///    the first 256 data bytes, pushes `seed + 1` and pi on the x87 stack,
///    loads [`CPU_STATE_MXCSR`], reads the time-stamp counter (kept in
///    `R13`); `OUT`s [`PORT_CPU_STATE_READY`];
/// 2. when resumed, checks each ([`cpu_check`]): the counter against
///    `R13`, the vector registers against the data, the x87 stack, `MXCSR`,
///    the data's sum against `R14`; `OUT`s [`PORT_VERIFY`] the bits of
///    the checks that passed, then [`PORT_HALT`] (repeated if resumed).
///
/// Runs in ring 3, where every one of these instructions runs natively
/// (no instruction emulator on PVM).
pub fn cpu_state() -> Res<Vec<u8>> {
    use iced_x86::code_asm::*;
    let qwords = CPU_STATE_PAGES * 512;
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    (|| -> Result<(), IcedError> {
        let mut fill = a.create_label();
        let mut sum = a.create_label();
        let mut halt = a.create_label();
        let xmms = [
            xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
            xmm14, xmm15,
        ];
        a.mov(r15, DATA_VA)?;
        a.mov(r12, rdi)?; // seed
        a.mov(r10, MIX)?;
        a.xor(r14, r14)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut fill)?;
        a.mov(rax, rcx)?;
        a.xor(rax, r12)?;
        a.imul_2(rax, r10)?;
        a.mov(qword_ptr(r15 + rcx * 8), rax)?;
        a.add(r14, rax)?;
        a.inc(rcx)?;
        a.mov(rax, qwords)?;
        a.cmp(rcx, rax)?;
        a.jb(fill)?;
        for (i, &x) in xmms.iter().enumerate() {
            a.movdqu(x, xmmword_ptr(r15 + 16 * i as i32))?;
        }
        a.fninit()?;
        a.lea(rax, qword_ptr(r12 + 1))?;
        a.push(rax)?;
        a.fild(qword_ptr(rsp))?; // st0 = seed + 1
        a.fldpi()?; // st0 = pi, st1 = seed + 1
        a.mov(dword_ptr(rsp), CPU_STATE_MXCSR)?;
        a.ldmxcsr(dword_ptr(rsp))?;
        a.pop(rax)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r13, rax)?;
        a.mov(dx, u32::from(PORT_CPU_STATE_READY))?;
        a.out(dx, eax)?;

        // Resumed: each check sets its bit in EBX.
        a.xor(ebx, ebx)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.cmp(rax, r13)?;
        a.setae(bl)?; // TSC
        a.mov(r9, SCRATCH)?;
        for (i, &x) in xmms.iter().enumerate() {
            a.movdqu(xmmword_ptr(r9 + 16 * i as i32), x)?;
        }
        a.mov(esi, 1)?; // all equal so far
        a.xor(ecx, ecx)?;
        let mut cmp_q = a.create_label();
        a.set_label(&mut cmp_q)?;
        a.mov(rax, qword_ptr(r9 + rcx * 8))?;
        a.xor(edx, edx)?;
        a.cmp(rax, qword_ptr(r15 + rcx * 8))?;
        a.sete(dl)?;
        a.and(esi, edx)?;
        a.inc(ecx)?;
        a.cmp(ecx, 32)?;
        a.jb(cmp_q)?;
        a.shl(esi, 1)?;
        a.or(ebx, esi)?; // XMM
        a.fstp(qword_ptr(r9 + 256))?; // pi as a double
        a.fistp(qword_ptr(r9 + 264))?; // seed + 1
        a.mov(rax, PI_BITS)?;
        a.xor(esi, esi)?;
        a.cmp(rax, qword_ptr(r9 + 256))?;
        a.sete(sil)?;
        a.lea(rax, qword_ptr(r12 + 1))?;
        a.xor(edx, edx)?;
        a.cmp(rax, qword_ptr(r9 + 264))?;
        a.sete(dl)?;
        a.and(esi, edx)?;
        a.shl(esi, 2)?;
        a.or(ebx, esi)?; // X87
        a.stmxcsr(dword_ptr(r9 + 272))?;
        a.xor(esi, esi)?;
        a.cmp(dword_ptr(r9 + 272), CPU_STATE_MXCSR)?;
        a.sete(sil)?;
        a.shl(esi, 3)?;
        a.or(ebx, esi)?; // MXCSR
        a.xor(eax, eax)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut sum)?;
        a.add(rax, qword_ptr(r15 + rcx * 8))?;
        a.inc(rcx)?;
        a.mov(rdx, qwords)?;
        a.cmp(rcx, rdx)?;
        a.jb(sum)?;
        a.xor(esi, esi)?;
        a.cmp(rax, r14)?;
        a.sete(sil)?;
        a.shl(esi, 4)?;
        a.or(ebx, esi)?; // MEMORY
        a.mov(eax, ebx)?;
        a.mov(dx, u32::from(PORT_VERIFY))?;
        a.out(dx, eax)?;
        a.set_label(&mut halt)?;
        a.mov(dx, u32::from(PORT_HALT))?;
        a.out(dx, eax)?;
        a.jmp(halt)?;
        Ok(())
    })()
    .map_err(asm_err)?;
    a.assemble(CODE).map_err(asm_err)
}

/// `OUT` of the first-touch program's first instruction: the VMM
/// timestamps the guest's start (a restored guest's first instruction).
pub const PORT_FIRST: u16 = 0x17;
/// `OUT` of the first-touch program after its 1,000th page touch and after
/// its last (the value: touches so far).
pub const PORT_TOUCHED: u16 = 0x18;
/// `OUT` of the first-touch program at its end: the low 32 bits of the sum
/// of the qwords it read ([`first_touch_sum`] is the host's model).
pub const PORT_TOUCH_SUM: u16 = 0x19;
/// The first-touch program's stride through the data pages: odd, so
/// `i * STRIDE mod pages` visits every page once (pages a power of two).
const TOUCH_STRIDE: u64 = 0x9e37_79b1;

/// Data page and byte offset of the first-touch program's `i`th touch
/// (`data_pages` a power of two).
pub fn first_touch_at(i: u64, data_pages: u64) -> (u64, u64) {
    (
        i.wrapping_mul(TOUCH_STRIDE) & (data_pages - 1),
        (i & 511) * 8,
    )
}

/// What the first-touch program reports at [`PORT_TOUCH_SUM`] over
/// `touches` touches, `read_qword(data byte offset)` reading the data.
pub fn first_touch_sum(touches: u64, data_pages: u64, read_qword: impl Fn(u64) -> u64) -> u32 {
    let sum = (0..touches).fold(0u64, |s, i| {
        let (page, off) = first_touch_at(i, data_pages);
        s.wrapping_add(read_qword(page * PAGE_SIZE as u64 + off))
    });
    sum as u32
}

/// The first-touch program: its first instruction `OUT`s [`PORT_FIRST`];
/// then it reads one qword of `touches` distinct data pages spread over
/// the data ([`first_touch_at`]: a stride through a power-of-two page
/// count), `OUT`s [`PORT_TOUCHED`] after the 1,000th and after the last,
/// [`PORT_TOUCH_SUM`] the sum's low 32 bits, then [`PORT_HALT`]. For
/// timing a restored guest: the VMM timestamps each exit.
pub fn first_touch(data_pages: u64, touches: u64) -> Res<Vec<u8>> {
    use iced_x86::code_asm::*;
    if !data_pages.is_power_of_two() || touches == 0 || touches > data_pages {
        return Err("data pages must be a power of two, touches in 1..=data pages".into());
    }
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    (|| -> Result<(), IcedError> {
        let mut touch = a.create_label();
        let mut no_mark = a.create_label();
        let mut halt = a.create_label();
        a.out(u32::from(PORT_FIRST), al)?;
        a.mov(r15, DATA_VA)?;
        a.xor(r14, r14)?;
        a.xor(ecx, ecx)?;
        a.mov(r10, TOUCH_STRIDE)?;
        a.mov(r11, data_pages - 1)?;
        a.mov(r12, touches)?;
        a.set_label(&mut touch)?;
        a.mov(rax, rcx)?;
        a.imul_2(rax, r10)?;
        a.and(rax, r11)?;
        a.shl(rax, 12)?;
        a.mov(rdx, rcx)?;
        a.and(edx, 511)?;
        a.lea(rax, qword_ptr(rax + rdx * 8))?;
        a.add(r14, qword_ptr(r15 + rax))?;
        a.inc(rcx)?;
        a.cmp(rcx, 1000)?;
        a.jne(no_mark)?;
        a.mov(eax, ecx)?;
        a.out(u32::from(PORT_TOUCHED), eax)?;
        a.set_label(&mut no_mark)?;
        a.cmp(rcx, r12)?;
        a.jb(touch)?;
        a.mov(eax, ecx)?;
        a.out(u32::from(PORT_TOUCHED), eax)?;
        a.mov(eax, r14d)?;
        a.out(u32::from(PORT_TOUCH_SUM), eax)?;
        a.set_label(&mut halt)?;
        a.mov(dx, u32::from(PORT_HALT))?;
        a.out(dx, eax)?;
        a.jmp(halt)?;
        Ok(())
    })()
    .map_err(asm_err)?;
    a.assemble(CODE).map_err(asm_err)
}
