/*
 * Guest page-table walks from C: translation, faults with their x86 error
 * codes, accessed/dirty updates, the walk cache and its invalidation,
 * guest-virtual reads and writes across pages, listing mappings, a
 * nested walk under EPT with its EPT-violation qualification, and an
 * AArch64 guest's stage 1 with its aborts.
 */
#include "pf_test.h"

#define MIB (1024ull * 1024ull)

/* x86 entry bits. */
#define P 0x1ull
#define RW 0x2ull
#define US 0x4ull
#define A 0x20ull
#define D 0x40ull
#define PS 0x80ull

/* Registers of a 64-bit kernel: CR0.PE|WP|PG, CR4.PAE, EFER.LME|LMA|NXE. */
#define CR0 0x80010001ull
#define CR4 0x20ull
#define EFER 0xd00ull

static void put(pf_guest_memory *mem, uint64_t gpa, uint64_t v) {
    CHECK_OK(pf_guest_memory_store_u64(mem, gpa, v));
}

static uint64_t get(pf_guest_memory *mem, uint64_t gpa) {
    uint64_t v = 0;
    CHECK_OK(pf_guest_memory_load_u64(mem, gpa, &v));
    return v;
}

/*
 * 4 MiB of guest memory with 4-level tables at 0x1000 (PML4), 0x2000
 * (PDPT), 0x3000 (PD), 0x4000 (PT):
 *   0x400000 -> 0x5000   4 KiB, writable, user
 *   0x401000 -> 0x6000   4 KiB, read-only, supervisor
 *   0x600000 -> 0x200000 2 MiB, writable, user
 */
static pf_guest_memory *guest(void) {
    pf_region r = pf_test_region(0, 4 * MIB);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    put(mem, 0x1000, 0x2000 | P | RW | US);
    put(mem, 0x2000, 0x3000 | P | RW | US);
    put(mem, 0x3000 + 2 * 8, 0x4000 | P | RW | US);
    put(mem, 0x3000 + 3 * 8, 0x200000 | P | RW | US | PS);
    put(mem, 0x4000, 0x5000 | P | RW | US);
    put(mem, 0x4000 + 8, 0x6000 | P);
    return mem;
}

static pf_walker *walker_for(uint64_t cr3, const pf_second_level *second) {
    pf_x86_paging regs;
    memset(&regs, 0, sizeof regs);
    regs.struct_size = sizeof regs;
    regs.cr0 = CR0;
    regs.cr3 = cr3;
    regs.cr4 = CR4;
    regs.efer = EFER;
    pf_walker *w = NULL;
    CHECK_OK(pf_walker_new(&regs, second, &w));
    CHECK(w != NULL);
    return w;
}

static pf_translation translation(void) {
    pf_translation t;
    memset(&t, 0, sizeof t);
    t.struct_size = sizeof t;
    return t;
}

static pf_walk_fault fault(void) {
    pf_walk_fault f;
    memset(&f, 0, sizeof f);
    f.struct_size = sizeof f;
    return f;
}

TEST(translates_4k_and_2m_pages) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_translation t = translation();

    CHECK_OK(pf_walker_translate(w, mem, 0x400123, 0, NULL, &t, NULL));
    CHECK_EQ(t.gpa, 0x5123);
    CHECK_EQ(t.pa, 0x5123);
    CHECK_EQ(t.page_size, 4096);
    CHECK_EQ(t.level, 1);
    CHECK_EQ(t.memory_refs, 4);
    CHECK_EQ(t.permissions & (PF_PERM_WRITE | PF_PERM_USER), PF_PERM_WRITE | PF_PERM_USER);

    CHECK_OK(pf_walker_translate(w, mem, 0x6abcde, PF_ACCESS_USER | PF_ACCESS_WRITE, NULL, &t, NULL));
    CHECK_EQ(t.gpa, 0x2abcde);
    CHECK_EQ(t.page_size, 2 * MIB);
    CHECK_EQ(t.level, 2);
    CHECK_EQ(t.memory_refs, 3);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

TEST(faults_carry_the_page_fault_error_code) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_translation t = translation();
    pf_walk_fault f = fault();

    /* User write to a supervisor read-only page: P | W | U = 7, decided at
     * the PT level (the first entry that denies). */
    CHECK_ERR(pf_walker_translate(w, mem, 0x401000, PF_ACCESS_USER | PF_ACCESS_WRITE, NULL, &t, &f),
              PF_ERR_FAULT, "fault");
    CHECK_EQ(f.code_kind, PF_FAULT_PAGE_FAULT);
    CHECK_EQ(f.code, 7);
    CHECK_EQ(f.reason, PF_REASON_PERMISSION);
    CHECK_EQ(f.stage, 1);
    CHECK_EQ(f.level, 1);
    CHECK_EQ(f.has_entry, 1);
    CHECK_EQ(f.entry_addr, 0x4008);
    CHECK_EQ(f.entry, 0x6000 | P);

    /* Not present at the PD level: error code 0 for a supervisor read. */
    f = fault();
    CHECK_STATUS(pf_walker_translate(w, mem, 0x800000, 0, NULL, &t, &f), PF_ERR_FAULT);
    CHECK_EQ(f.reason, PF_REASON_NOT_PRESENT);
    CHECK_EQ(f.level, 2);
    CHECK_EQ(f.code, 0);

    /* A reserved bit (PS in the PML4 entry): P | RSVD = 9. */
    put(mem, 0x1000 + 8, 0x2000 | P | PS);
    f = fault();
    CHECK_STATUS(pf_walker_translate(w, mem, 1ull << 39, 0, NULL, &t, &f), PF_ERR_FAULT);
    CHECK_EQ(f.reason, PF_REASON_RESERVED);
    CHECK_EQ(f.detail, PS);
    CHECK_EQ(f.code, 9);

    /* Non-canonical: #GP, no entry. */
    f = fault();
    CHECK_STATUS(pf_walker_translate(w, mem, 0x0000800000000000ull, 0, NULL, &t, &f), PF_ERR_FAULT);
    CHECK_EQ(f.code_kind, PF_FAULT_GENERAL_PROTECTION);
    CHECK_EQ(f.reason, PF_REASON_NON_CANONICAL);
    CHECK_EQ(f.has_entry, 0);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

TEST(accessed_and_dirty_only_when_asked) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_translation t = translation();

    CHECK_OK(pf_walker_translate(w, mem, 0x400000, PF_ACCESS_WRITE, NULL, &t, NULL));
    CHECK_EQ(get(mem, 0x4000) & (A | D), 0);
    CHECK_OK(pf_walker_translate(w, mem, 0x400000, PF_ACCESS_WRITE | PF_WALK_SET_ACCESSED_DIRTY, NULL,
                                 &t, NULL));
    CHECK_EQ(get(mem, 0x4000) & (A | D), A | D);
    CHECK_EQ(get(mem, 0x1000) & (A | D), A); /* D only on the leaf */
    CHECK_EQ(get(mem, 0x3000 + 2 * 8) & (A | D), A);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

TEST(cache_hits_and_invalidation) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_walk_cache *c = NULL;
    pf_translation t = translation();
    uint64_t space = 0;

    CHECK_OK(pf_walk_cache_new(&c));
    CHECK_OK(pf_walker_space(w, &space));
    CHECK_OK(pf_walker_translate(w, mem, 0x400010, 0, c, &t, NULL));
    CHECK_EQ(t.memory_refs, 4);
    CHECK_OK(pf_walker_translate(w, mem, 0x400020, 0, c, &t, NULL));
    CHECK_EQ(t.memory_refs, 0);
    CHECK_EQ(t.gpa, 0x5020);

    /* The guest remaps the page; the cache answers the old frame until the
     * page is invalidated, as a TLB does. */
    put(mem, 0x4000, 0x7000 | P | RW | US);
    CHECK_OK(pf_walker_translate(w, mem, 0x400020, 0, c, &t, NULL));
    CHECK_EQ(t.gpa, 0x5020);
    CHECK_OK(pf_walk_cache_invalidate(c, PF_INVALIDATE_PAGE, space, 0x400000));
    CHECK_OK(pf_walker_translate(w, mem, 0x400020, 0, c, &t, NULL));
    CHECK_EQ(t.gpa, 0x7020);
    CHECK(t.memory_refs > 0);

    CHECK_OK(pf_walk_cache_invalidate(c, PF_INVALIDATE_ALL, 0, 0));
    CHECK_OK(pf_walk_cache_invalidate(c, PF_INVALIDATE_SPACE, space, 0));
    CHECK_OK(pf_walk_cache_invalidate(c, PF_INVALIDATE_PCID, 0, 7));
    CHECK_OK(pf_walk_cache_invalidate(c, PF_INVALIDATE_SECOND_LEVEL, 0, 0));
    CHECK_ERR(pf_walk_cache_invalidate(c, 99, 0, 0), PF_ERR_INVALID_ARGUMENT, "scope");
    CHECK_ERR(pf_walk_cache_invalidate(c, PF_INVALIDATE_PCID, 0, 4096), PF_ERR_INVALID_ARGUMENT,
              "PCID");
    CHECK_ERR(pf_walk_cache_invalidate(NULL, 0, 0, 0), PF_ERR_NULL_POINTER, "cache");
    pf_walk_cache_free(c);
    pf_walk_cache_free(NULL);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

TEST(lean_translation_returns_the_address) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_walk_cache *c = NULL;
    pf_translation t = translation();
    pf_walk_fault f = fault();
    uint64_t space = 0, pa = 0;

    CHECK_OK(pf_walk_cache_new(&c));
    CHECK_OK(pf_walker_space(w, &space));
    /* Without a cache, then through one: equal to the full translation. */
    CHECK_OK(pf_walker_translate_pa(w, mem, 0x400123, 0, NULL, &pa, NULL));
    CHECK_EQ(pa, 0x5123);
    CHECK_OK(pf_walker_translate_pa(w, mem, 0x6abcde, PF_ACCESS_USER | PF_ACCESS_WRITE, c, &pa,
                                    NULL));
    CHECK_EQ(pa, 0x2abcde);
    CHECK_OK(pf_walker_translate_pa(w, mem, 0x400010, 0, c, &pa, NULL));
    CHECK_EQ(pa, 0x5010);
    CHECK_OK(pf_walker_translate_pa(w, mem, 0x400020, 0, c, &pa, NULL)); /* a hit */
    CHECK_EQ(pa, 0x5020);
    CHECK_OK(pf_walker_translate(w, mem, 0x400020, 0, c, &t, NULL));
    CHECK_EQ(t.pa, pa);
    CHECK_EQ(t.memory_refs, 0);

    /* Stale until invalidated, as a TLB; then walked again. */
    put(mem, 0x4000, 0x7000 | P | RW | US);
    CHECK_OK(pf_walker_translate_pa(w, mem, 0x400020, 0, c, &pa, NULL));
    CHECK_EQ(pa, 0x5020);
    CHECK_OK(pf_walk_cache_invalidate(c, PF_INVALIDATE_PAGE, space, 0x400000));
    CHECK_OK(pf_walker_translate_pa(w, mem, 0x400020, 0, c, &pa, NULL));
    CHECK_EQ(pa, 0x7020);

    /* Faults as pf_walker_translate reports them, hit or not. */
    CHECK_ERR(pf_walker_translate_pa(w, mem, 0x401000, PF_ACCESS_USER | PF_ACCESS_WRITE, c, &pa, &f),
              PF_ERR_FAULT, "fault");
    CHECK_EQ(f.code_kind, PF_FAULT_PAGE_FAULT);
    CHECK_EQ(f.code, 7);
    CHECK_ERR(pf_walker_translate_pa(w, mem, 0x400000, 0, c, NULL, NULL), PF_ERR_NULL_POINTER,
              "out_pa");
    CHECK_ERR(pf_walker_translate_pa(NULL, mem, 0x400000, 0, c, &pa, NULL), PF_ERR_NULL_POINTER,
              "walker");
    pf_walk_cache_free(c);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

TEST(virtual_reads_and_writes_cross_pages) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_walk_fault f = fault();
    uint8_t data[16], back[16];
    for (int i = 0; i < 16; i++) data[i] = (uint8_t)(0xa0 + i);

    /* 0x400ff8..0x401008 spans the writable page and the read-only one:
     * a supervisor write with CR0.WP faults on the second page and writes
     * nothing on the first. */
    CHECK_STATUS(pf_walker_write_virt(w, mem, 0x400ff8, data, sizeof data, 0, NULL, &f), PF_ERR_FAULT);
    CHECK_EQ(f.va, 0x401000);
    CHECK_EQ(f.code, 3); /* P | W */
    CHECK_EQ(get(mem, 0x5ff8), 0);

    /* Reads cross the boundary. */
    CHECK_OK(pf_guest_memory_write(mem, 0x5ff8, data, 8));
    CHECK_OK(pf_guest_memory_write(mem, 0x6000, data + 8, 8));
    CHECK_OK(pf_walker_read_virt(w, mem, 0x400ff8, back, sizeof back, 0, NULL, NULL));
    CHECK(memcmp(back, data, sizeof data) == 0);

    /* Within the writable page, the write lands. */
    CHECK_OK(pf_walker_write_virt(w, mem, 0x400100, data, sizeof data, PF_ACCESS_USER, NULL, NULL));
    CHECK_OK(pf_guest_memory_read(mem, 0x5100, back, sizeof back));
    CHECK(memcmp(back, data, sizeof data) == 0);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

struct seen {
    pf_mapping first[4];
    size_t count;
};

static int collect(const pf_mapping *m, void *user) {
    struct seen *s = (struct seen *)user;
    if (s->count < 4) s->first[s->count] = *m;
    s->count++;
    return 0;
}

static int stop_at_first(const pf_mapping *m, void *user) {
    (void)m;
    (*(size_t *)user)++;
    return 1;
}

TEST(mappings_are_listed_in_order) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    struct seen s;
    uint64_t skipped = 99;
    memset(&s, 0, sizeof s);

    CHECK_OK(pf_walker_mappings(w, mem, 0, collect, &s, &skipped));
    CHECK_EQ(s.count, 3);
    CHECK_EQ(skipped, 0);
    CHECK_EQ(s.first[0].va, 0x400000);
    CHECK_EQ(s.first[0].gpa, 0x5000);
    CHECK_EQ(s.first[1].va, 0x401000);
    CHECK_EQ(s.first[1].permissions & (PF_PERM_WRITE | PF_PERM_USER), 0);
    CHECK_EQ(s.first[2].va, 0x600000);
    CHECK_EQ(s.first[2].size, 2 * MIB);
    CHECK_EQ(s.first[2].level, 2);

    size_t calls = 0;
    CHECK_OK(pf_walker_mappings(w, mem, 0, stop_at_first, &calls, NULL));
    CHECK_EQ(calls, 1);
    CHECK_ERR(pf_walker_mappings(w, mem, 0, NULL, NULL, NULL), PF_ERR_NULL_POINTER, "callback");
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

struct segs {
    pf_segment s[8];
    size_t n;
};

static int take_segment(const pf_segment *s, void *user) {
    struct segs *v = (struct segs *)user;
    if (v->n < 8) v->s[v->n] = *s;
    v->n++;
    return 0;
}

TEST(ranges_come_as_contiguous_segments) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_walk_fault f = fault();
    struct segs v;
    memset(&v, 0, sizeof v);

    /* 0x400000 -> 0x5000 and 0x401000 -> 0x6000 are contiguous. */
    CHECK_OK(pf_walker_translate_range(w, mem, 0x400800, 0x1000, 0, take_segment, &v, NULL));
    CHECK_EQ(v.n, 1);
    CHECK_EQ(v.s[0].va, 0x400800);
    CHECK_EQ(v.s[0].pa, 0x5800);
    CHECK_EQ(v.s[0].len, 0x1000);

    /* A user write: the second page is supervisor read-only, so the range
     * faults there after delivering the first segment. */
    memset(&v, 0, sizeof v);
    CHECK_STATUS(pf_walker_translate_range(w, mem, 0x400800, 0x1000, PF_ACCESS_USER | PF_ACCESS_WRITE,
                                           take_segment, &v, &f),
                 PF_ERR_FAULT);
    CHECK_EQ(v.n, 1);
    CHECK_EQ(v.s[0].len, 0x800);
    CHECK_EQ(f.va, 0x401000);
    CHECK_EQ(f.code, 7);

    CHECK_ERR(pf_walker_translate_range(w, mem, 0, 1, 0, NULL, NULL, NULL), PF_ERR_NULL_POINTER, "callback");
    CHECK_ERR(pf_walker_translate_range(w, mem, 0, 1, PF_WALK_SET_ACCESSED_DIRTY, take_segment, &v, NULL),
              PF_ERR_INVALID_ARGUMENT, "accessed/dirty");
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

TEST(nested_walk_under_ept) {
    pf_guest_memory *mem = guest();
    /* EPT at 0x10000: one 1 GiB page mapping guest-physical 0.. to 0..,
     * read/write/execute, write-back. */
    put(mem, 0x10000, 0x11000 | 0x7);
    put(mem, 0x11000, 0x0 | 0x7 | (6ull << 3) | PS);
    pf_second_level ept;
    memset(&ept, 0, sizeof ept);
    ept.struct_size = sizeof ept;
    ept.kind = PF_SECOND_LEVEL_EPT;
    ept.flags = PF_EPT_EXECUTE_ONLY;
    ept.root = 0x10000 | 6 | (3 << 3); /* WB, 4 levels */
    pf_walker *w = walker_for(0x1000, &ept);
    pf_translation t = translation();
    pf_walk_fault f = fault();

    /* Four guest entries, each behind a 2-entry EPT walk, plus the final
     * address: 4 * (2 + 1) + 2 = 14 references. */
    CHECK_OK(pf_walker_translate(w, mem, 0x400123, 0, NULL, &t, NULL));
    CHECK_EQ(t.gpa, 0x5123);
    CHECK_EQ(t.pa, 0x5123);
    CHECK_EQ(t.second_page_size, 1ull << 30);
    CHECK_EQ(t.memory_refs, 14);

    /* Take execute away in the EPT: a fetch is an EPT violation on the
     * final address: fetch (bit 2), readable and writable (bits 3, 4),
     * linear address valid (7), final translation (8). */
    put(mem, 0x11000, 0x0 | 0x3 | (6ull << 3) | PS);
    CHECK_STATUS(pf_walker_translate(w, mem, 0x400123, PF_ACCESS_FETCH, NULL, &t, &f), PF_ERR_FAULT);
    CHECK_EQ(f.stage, 2);
    CHECK_EQ(f.guest_table_level, 0);
    CHECK_EQ(f.code_kind, PF_FAULT_EPT_VIOLATION);
    CHECK_EQ(f.code, 0x4 | 0x8 | 0x10 | 0x80 | 0x100);
    CHECK_EQ(f.gpa, 0x5123);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

TEST(argument_errors) {
    pf_guest_memory *mem = guest();
    pf_walker *w = walker_for(0x1000, NULL);
    pf_x86_paging regs;
    pf_translation t = translation();
    pf_walker *none = NULL;
    memset(&regs, 0, sizeof regs);
    regs.struct_size = sizeof regs;

    CHECK_ERR(pf_walker_new(NULL, NULL, &none), PF_ERR_NULL_POINTER, "paging");
    CHECK_ERR(pf_walker_new(&regs, NULL, NULL), PF_ERR_NULL_POINTER, "out_walker");
    regs.struct_size = 8;
    CHECK_ERR(pf_walker_new(&regs, NULL, &none), PF_ERR_STRUCT_TOO_SMALL, "pf_x86_paging");
    regs.struct_size = sizeof regs;
    regs.cr0 = 0x80000000ull; /* PG without PE */
    CHECK_ERR(pf_walker_new(&regs, NULL, &none), PF_ERR_INVALID_ARGUMENT, "CR0.PG");
    /* Reserved bits: all-ones registers name the register and the bits. */
    regs.cr0 = ~0ull;
    CHECK_ERR(pf_walker_new(&regs, NULL, &none), PF_ERR_INVALID_ARGUMENT,
              "CR0 has reserved bits set: 0xffffffff1ffaffc0");
    regs.cr0 = CR0;
    regs.cr4 = ~0ull;
    CHECK_ERR(pf_walker_new(&regs, NULL, &none), PF_ERR_INVALID_ARGUMENT,
              "CR4 has reserved bits set: 0xfffffffee4008000");
    regs.cr4 = CR4;
    regs.efer = ~0ull;
    CHECK_ERR(pf_walker_new(&regs, NULL, &none), PF_ERR_INVALID_ARGUMENT,
              "EFER has reserved bits set: 0xffffffffffc902fe");
    regs.efer = EFER;
    regs.maxphyaddr = 60;
    CHECK_ERR(pf_walker_new(&regs, NULL, &none), PF_ERR_INVALID_ARGUMENT, "MAXPHYADDR");
    CHECK(none == NULL);

    CHECK_ERR(pf_walker_translate(w, mem, 0x400000, PF_ACCESS_WRITE | PF_ACCESS_FETCH, NULL, &t, NULL),
              PF_ERR_INVALID_ARGUMENT, "exclusive");
    CHECK_ERR(pf_walker_translate(w, mem, 0x400000, 1u << 20, NULL, &t, NULL), PF_ERR_INVALID_ARGUMENT,
              "unknown access flags");
    CHECK_ERR(pf_walker_translate(NULL, mem, 0, 0, NULL, &t, NULL), PF_ERR_NULL_POINTER, "walker");
    CHECK_ERR(pf_walker_translate(w, mem, 0, 0, NULL, NULL, NULL), PF_ERR_NULL_POINTER, "out");
    t.struct_size = 8;
    CHECK_ERR(pf_walker_translate(w, mem, 0x400000, 0, NULL, &t, NULL), PF_ERR_STRUCT_TOO_SMALL,
              "pf_translation");
    t = translation();
    /* A too-small fault_out is refused before the walk, whether or not the
     * walk would fault, and nothing is read or updated. */
    pf_walk_fault small;
    memset(&small, 0, sizeof small);
    small.struct_size = 8;
    CHECK_ERR(pf_walker_translate(w, mem, 0x400000, 0, NULL, &t, &small), PF_ERR_STRUCT_TOO_SMALL,
              "pf_walk_fault");
    CHECK_ERR(pf_walker_translate(w, mem, 0x7f000000, 0, NULL, &t, &small), PF_ERR_STRUCT_TOO_SMALL,
              "pf_walk_fault");
    uint8_t byte = 0;
    CHECK_ERR(pf_walker_read_virt(w, mem, 0x400000, &byte, 1, 0, NULL, &small),
              PF_ERR_STRUCT_TOO_SMALL, "pf_walk_fault");
    pf_walker_free(NULL);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

/* AArch64, 4 KiB granule, 48-bit ranges (TCR_EL1: T0SZ = T1SZ = 16, TG1
 * 4 KiB, IPS 48 bits), MMU on: TTBR0's tables at 0x1000.. map VA 0x400000
 * to 0x5000 for EL0 and EL1 (AF, AP[1], AttrIndx 1); nothing else. */
#define ARM_TCR 0x580100010ull
#define ARM_AF (1ull << 10)
#define ARM_AP1 (1ull << 6)

TEST(aarch64_stage1_translates_and_aborts) {
    pf_region r = pf_test_region(0, 4 * MIB);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    put(mem, 0x1000, 0x2000 | 3);
    put(mem, 0x2000, 0x3000 | 3);
    put(mem, 0x3000 + 2 * 8, 0x4000 | 3);
    put(mem, 0x4000, 0x5000 | 3 | ARM_AF | ARM_AP1 | (1 << 2));

    pf_aarch64_paging regs;
    memset(&regs, 0, sizeof regs);
    regs.struct_size = sizeof regs;
    regs.tcr = ARM_TCR;
    regs.ttbr0 = 0x1000;
    regs.ttbr1 = 0x1000;
    regs.sctlr = 1;
    regs.mair = 0xff00;
    pf_walker *w = NULL;
    CHECK_OK(pf_walker_new_aarch64(&regs, NULL, &w));

    pf_translation t = translation();
    CHECK_OK(pf_walker_translate(w, mem, 0x400abc, PF_ACCESS_USER | PF_ACCESS_WRITE, NULL, &t, NULL));
    CHECK_EQ(t.gpa, 0x5abc);
    CHECK_EQ(t.memory_refs, 4);
    CHECK_EQ(t.arch_attributes & 0xff, 0xff); /* MAIR byte of AttrIndx 1 */
    CHECK_EQ((t.arch_attributes >> 8) & 7, 1);

    /* Unmapped at level 3: a data abort from EL0, translation fault,
     * level 3 (FSC 0b000111). */
    pf_walk_fault f = fault();
    CHECK_STATUS(pf_walker_translate(w, mem, 0x401000, PF_ACCESS_USER, NULL, &t, &f), PF_ERR_FAULT);
    CHECK_EQ(f.code_kind, PF_FAULT_AARCH64_ABORT);
    CHECK_EQ(f.code, (0x24ull << 26) | (1ull << 25) | 0x7);
    CHECK_EQ(f.reason, PF_REASON_NOT_PRESENT);

    /* An EL1 fetch of an EL0-writable page: a permission fault (an
     * instruction abort taken without a change of EL, EC 0x21). */
    f = fault();
    CHECK_STATUS(pf_walker_translate(w, mem, 0x400000, PF_ACCESS_FETCH, NULL, &t, &f), PF_ERR_FAULT);
    CHECK_EQ(f.code, (0x21ull << 26) | (1ull << 25) | 0xf);

    pf_walker *bad = NULL;
    regs.tcr = ARM_TCR | (3ull << 14); /* TG0 = 0b11: reserved */
    CHECK_ERR(pf_walker_new_aarch64(&regs, NULL, &bad), PF_ERR_INVALID_ARGUMENT, "TG0");
    regs.tcr = ARM_TCR;
    regs.flags = 0x80;
    CHECK_ERR(pf_walker_new_aarch64(&regs, NULL, &bad), PF_ERR_INVALID_ARGUMENT, "flags");
    CHECK(bad == NULL);
    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(translates_4k_and_2m_pages),
        PF_TEST_CASE(faults_carry_the_page_fault_error_code),
        PF_TEST_CASE(accessed_and_dirty_only_when_asked),
        PF_TEST_CASE(cache_hits_and_invalidation),
        PF_TEST_CASE(lean_translation_returns_the_address),
        PF_TEST_CASE(virtual_reads_and_writes_cross_pages),
        PF_TEST_CASE(mappings_are_listed_in_order),
        PF_TEST_CASE(ranges_come_as_contiguous_segments),
        PF_TEST_CASE(nested_walk_under_ept),
        PF_TEST_CASE(argument_errors),
        PF_TEST_CASE(aarch64_stage1_translates_and_aborts),
    };
    return pf_test_main("paging", tests, sizeof tests / sizeof tests[0]);
}
