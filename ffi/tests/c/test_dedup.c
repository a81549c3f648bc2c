/*
 * Frame stores and deduplication through the C API: three VMs in one
 * store, merged; the statistics and the kernel's figure; copy on write;
 * resolve_write_fault; unmerge; domains; excluded regions; scan steps;
 * handle lifetimes; every error path.
 *
 * pf-test: needs-userfaultfd
 * (run.sh runs this file natively as well as under valgrind, which lacks
 * userfaultfd: there the tests that need a dedup host report "skip".)
 */
#include "pf_test.h"

#include <pthread.h>
#include <time.h>

#define PAGE 4096ull
#define PAGES 64u        /* per VM */
#define SHARED_END 32u   /* pages [0, 32): the same in every VM */
#define ZERO_END 48u     /* pages [32, 48): zeros, written */
#define VMS 3u           /* pages [48, 64): different in every VM */
#define SHARED_PAGES SHARED_END
#define ZERO_PAGES (ZERO_END - SHARED_END)
#define UNIQUE_PAGES (PAGES - ZERO_END)

/* The content of page `page` of VM `vm`. */
static void content(unsigned vm, unsigned page, uint8_t *buf) {
    uint64_t words[PAGE / 8];
    for (unsigned k = 0; k < PAGE / 8; k++) {
        if (page < SHARED_END)
            words[k] = (uint64_t)page * 7919u + k + 1;
        else if (page < ZERO_END)
            words[k] = 0;
        else
            words[k] = ((uint64_t)(vm + 1) << 40) | ((uint64_t)page * 512u + k);
    }
    memcpy(buf, words, PAGE);
}

static pf_frame_store *new_store(void) {
    pf_frame_store *store = NULL;
    CHECK_OK(pf_frame_store_new(NULL, &store));
    CHECK(store != NULL);
    return store;
}

/* VM `vm`'s memory in `store`: one region of PAGES pages at 0, every page
 * written (the zero pages too, so they hold memory until merged). */
static pf_guest_memory *new_vm(const pf_frame_store *store, unsigned vm) {
    pf_region r = pf_test_region(0, PAGES * PAGE);
    pf_guest_memory *mem = NULL;
    uint8_t buf[PAGE];
    CHECK_OK(pf_guest_memory_new_in_store(store, &r, 1, &mem));
    if (mem == NULL) return NULL;
    for (unsigned p = 0; p < PAGES; p++) {
        content(vm, p, buf);
        CHECK_OK(pf_guest_memory_write(mem, p * PAGE, buf, PAGE));
    }
    return mem;
}

/* Whether page `page` of `mem` reads as `want`. */
static int page_is(const pf_guest_memory *mem, unsigned page, const uint8_t *want) {
    uint8_t buf[PAGE];
    CHECK_OK(pf_guest_memory_read(mem, page * PAGE, buf, PAGE));
    return memcmp(buf, want, PAGE) == 0;
}

/* Every page of `mem` reads as VM `vm`'s content, but page `except` (none
 * if it is PAGES or more). */
static void check_vm(const pf_guest_memory *mem, unsigned vm, unsigned except) {
    uint8_t want[PAGE];
    for (unsigned p = 0; p < PAGES; p++) {
        if (p == except) continue;
        content(vm, p, want);
        if (!page_is(mem, p, want)) PF_FAIL_AT("VM %u page %u differs from its content", vm, p);
    }
}

static uint64_t store_bytes(const pf_frame_store *store) {
    uint64_t bytes = 0;
    CHECK_OK(pf_frame_store_allocated_bytes(store, &bytes));
    return bytes;
}

static uint64_t reg(const pf_dedup *dedup, const pf_guest_memory *mem,
                    const pf_vm_options *options) {
    uint64_t id = 0;
    CHECK_OK(pf_dedup_register(dedup, mem, options, &id));
    CHECK(id != 0);
    return id;
}

static pf_scan_report report_init(void) {
    pf_scan_report r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    return r;
}

static pf_host_stats stats_of(const pf_dedup *dedup) {
    pf_host_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    CHECK_OK(pf_dedup_stats(dedup, &s));
    CHECK_EQ(s.struct_size, sizeof s);
    return s;
}

static pf_vm_stats vm_stats_of(const pf_dedup *dedup, uint64_t vm) {
    pf_vm_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    CHECK_OK(pf_dedup_vm_stats(dedup, vm, &s));
    CHECK_EQ(s.struct_size, sizeof s);
    return s;
}

static pf_vm_options vm_options(uint32_t domain) {
    pf_vm_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.domain = domain;
    return o;
}

/* ---- frame stores ---- */

TEST(frame_store_new_and_free) {
    pf_frame_store *store = new_store();
    CHECK_EQ(store_bytes(store), 0);
    pf_frame_store_free(store);

    pf_store_options o = pf_test_options();
    o.name = "pf-ctest-store";
    store = NULL;
    CHECK_OK(pf_frame_store_new(&o, &store));
    CHECK(store != NULL);
    pf_frame_store_free(store);
    pf_frame_store_free(NULL);
}

TEST(frame_store_new_rejects_bad_arguments) {
    pf_frame_store *store = (pf_frame_store *)(uintptr_t)0x1;
    pf_store_options o = pf_test_options();

    CHECK_ERR(pf_frame_store_new(NULL, NULL), PF_ERR_NULL_POINTER, "out_store");
    o.struct_size = sizeof o - 1;
    CHECK_ERR(pf_frame_store_new(&o, &store), PF_ERR_STRUCT_TOO_SMALL, "pf_memory_options");
    o = pf_test_options();
    o.backing = 7;
    CHECK_ERR(pf_frame_store_new(&o, &store), PF_ERR_INVALID_ARGUMENT, "backing 7");
    o.backing = PF_BACKING_MEMFD;
    o.flags = 1u << 9;
    CHECK_ERR(pf_frame_store_new(&o, &store), PF_ERR_INVALID_ARGUMENT, "flags 0x200");
    CHECK(store == (pf_frame_store *)(uintptr_t)0x1); /* untouched on error */

    uint64_t bytes = 7;
    CHECK_ERR(pf_frame_store_allocated_bytes(NULL, &bytes), PF_ERR_NULL_POINTER, "store");
    store = new_store();
    CHECK_ERR(pf_frame_store_allocated_bytes(store, NULL), PF_ERR_NULL_POINTER, "out_bytes");
    CHECK_EQ(bytes, 7);
    pf_frame_store_free(store);
}

TEST(memories_in_one_store_share_it) {
    pf_frame_store *store = new_store();
    pf_guest_memory *a = new_vm(store, 0);
    pf_guest_memory *b = new_vm(store, 1);
    pf_region_info ia = pf_test_info(), ib = pf_test_info();
    uint64_t bytes_a = 0;

    /* One memfd behind both, at different offsets. */
    CHECK_OK(pf_guest_memory_region_info(a, 0, &ia));
    CHECK_OK(pf_guest_memory_region_info(b, 0, &ib));
    CHECK_EQ(ia.fd, ib.fd);
    CHECK(ia.file_offset != ib.file_offset);
    /* The store holds both memories' pages; each memory reports the store. */
    CHECK_EQ(store_bytes(store), 2 * PAGES * PAGE);
    CHECK_OK(pf_guest_memory_allocated_bytes(a, &bytes_a));
    CHECK_EQ(bytes_a, 2 * PAGES * PAGE);

    /* The memories keep the store alive without its handle. */
    pf_frame_store_free(store);
    check_vm(a, 0, PAGES);
    check_vm(b, 1, PAGES);
    pf_guest_memory_free(a);
    CHECK_OK(pf_guest_memory_allocated_bytes(b, &bytes_a));
    CHECK_EQ(bytes_a, PAGES * PAGE); /* a's frames went back */
    pf_guest_memory_free(b);
}

TEST(memory_in_store_rejects_bad_arguments) {
    pf_frame_store *store = new_store();
    pf_region r = pf_test_region(0, 16 * PAGE);
    pf_region bad[2];
    pf_guest_memory *mem = (pf_guest_memory *)(uintptr_t)0x1;

    CHECK_ERR(pf_guest_memory_new_in_store(NULL, &r, 1, &mem), PF_ERR_NULL_POINTER, "store");
    CHECK_ERR(pf_guest_memory_new_in_store(store, &r, 1, NULL), PF_ERR_NULL_POINTER, "out_mem");
    CHECK_ERR(pf_guest_memory_new_in_store(store, NULL, 1, &mem), PF_ERR_NULL_POINTER, "regions");
    CHECK_ERR(pf_guest_memory_new_in_store(store, NULL, 0, &mem), PF_ERR_LAYOUT,
              "at least one region");
    CHECK_ERR(pf_guest_memory_new_in_store(store, &r, SIZE_MAX, &mem), PF_ERR_INVALID_ARGUMENT,
              "region_count");
    bad[0] = pf_test_region(0, 8 * PAGE);
    bad[1] = pf_test_region(4 * PAGE, 8 * PAGE);
    CHECK_ERR(pf_guest_memory_new_in_store(store, bad, 2, &mem), PF_ERR_LAYOUT, "overlap");
    bad[0] = pf_test_region(100, PAGE);
    CHECK_ERR(pf_guest_memory_new_in_store(store, bad, 1, &mem), PF_ERR_LAYOUT, "not aligned");
    CHECK(mem == (pf_guest_memory *)(uintptr_t)0x1);
    /* Failed layouts leave nothing allocated in the store. */
    CHECK_EQ(store_bytes(store), 0);
    pf_frame_store_free(store);
}

/* ---- dedup: errors that need no host ---- */

TEST(dedup_new_rejects_bad_arguments) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = (pf_dedup *)(uintptr_t)0x1;
    pf_dedup_options o;
    memset(&o, 0, sizeof o);

    CHECK_ERR(pf_dedup_new(NULL, NULL, &dedup), PF_ERR_NULL_POINTER, "store");
    CHECK_ERR(pf_dedup_new(store, NULL, NULL), PF_ERR_NULL_POINTER, "out_dedup");
    o.struct_size = sizeof o - 1;
    CHECK_ERR(pf_dedup_new(store, &o, &dedup), PF_ERR_STRUCT_TOO_SMALL, "pf_dedup_options");
    o.struct_size = 0;
    CHECK_ERR(pf_dedup_new(store, &o, &dedup), PF_ERR_STRUCT_TOO_SMALL, "struct_size is 0");
    CHECK(dedup == (pf_dedup *)(uintptr_t)0x1);
    pf_frame_store_free(store);
}

/* Dedup needs 4 KiB pages. A hugetlb store can be made even with no huge
 * pages reserved (they are reserved when memory is made in it); if this
 * kernel refuses even that, there is nothing to check. */
TEST(dedup_refuses_hugetlb_stores) {
    pf_store_options o = pf_test_options();
    pf_frame_store *store = NULL;
    pf_dedup *dedup = NULL;
    o.backing = PF_BACKING_HUGETLB_2M;
    pf_status s = pf_frame_store_new(&o, &store);
    if (s == PF_ERR_NO_HUGE_PAGES) {
        CHECK(store == NULL);
        return;
    }
    CHECK_OK(s);
    CHECK_ERR(pf_dedup_new(store, NULL, &dedup), PF_ERR_UNSUPPORTED, "4 KiB pages");
    CHECK(dedup == NULL);
    pf_frame_store_free(store);
}

TEST(dedup_calls_reject_a_null_handle) {
    pf_region r = pf_test_region(0, PAGE);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    pf_scan_report report = report_init();
    pf_host_stats stats;
    pf_vm_stats vm;
    pf_kernel_view view;
    uint64_t id = 0, pages = 0;
    int merged = 0;
    memset(&stats, 0, sizeof stats);
    memset(&vm, 0, sizeof vm);
    memset(&view, 0, sizeof view);
    stats.struct_size = sizeof stats;
    vm.struct_size = sizeof vm;
    view.struct_size = sizeof view;

    CHECK_ERR(pf_dedup_register(NULL, mem, NULL, &id), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_unregister(NULL, 1), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_merge_now(NULL, &report), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_scan_step(NULL, 1, 0, &report), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_unmerge_all(NULL, &pages), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_resolve_write_fault(NULL, 1, 0, &merged), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_stats(NULL, &stats), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_vm_stats(NULL, 1, &vm), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_kernel_view(NULL, &view), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_start_background(NULL, 1, 0, 1000), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_start_background_on(NULL, 1, 0, 1000, 1), PF_ERR_NULL_POINTER, "dedup");
    CHECK_ERR(pf_dedup_stop_background(NULL), PF_ERR_NULL_POINTER, "dedup");
    pf_guest_memory_free(mem);
}

/* ---- dedup with a host ---- */

TEST(three_vms_merge_and_the_kernel_sees_it) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    uint64_t ids[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        ids[v] = reg(dedup, vms[v], NULL);
    }
    CHECK(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);

    pf_host_stats s = stats_of(dedup);
    CHECK_EQ(s.pages_total, VMS * PAGES);
    CHECK_EQ(s.pages_shared, 0);
    CHECK_EQ(s.pages_sharing, 0);
    CHECK_EQ(s.zero_pages, 0);

    uint64_t before = store_bytes(store);
    CHECK_EQ(before, VMS * PAGES * PAGE);
    pf_scan_report r = report_init();
    CHECK_OK(pf_dedup_merge_now(dedup, &r));
    uint64_t after = store_bytes(store);

    CHECK_EQ(r.struct_size, sizeof r);
    CHECK_EQ(r.pages_scanned, VMS * PAGES);
    CHECK_EQ(r.merged_shared, VMS * SHARED_PAGES);
    CHECK_EQ(r.merged_zero, VMS * ZERO_PAGES);
    CHECK_EQ(r.volatile_pages, 0);
    CHECK_EQ(r.full_scan_completed, 1);
    CHECK(r.remaps > 0 && r.remaps <= VMS * 4);
    CHECK(r.hash_threads >= 1);

    s = stats_of(dedup);
    CHECK_EQ(s.pages_total, VMS * PAGES);
    CHECK_EQ(s.pages_shared, SHARED_PAGES);
    CHECK_EQ(s.pages_sharing, (VMS - 1) * SHARED_PAGES);
    CHECK_EQ(s.zero_pages, VMS * ZERO_PAGES);
    CHECK_EQ(s.full_scans, 1);
    CHECK_EQ(s.cow_breaks, 0);
    CHECK_EQ(s.map_limit_hits, 0);
    CHECK(s.profit_bytes > 0);

    /* The kernel's figure: one frame per shared content and the unique
     * pages are all the store holds now. */
    CHECK_EQ(after, (SHARED_PAGES + VMS * UNIQUE_PAGES) * PAGE);
    CHECK_EQ(before - after, ((VMS - 1) * SHARED_PAGES + VMS * ZERO_PAGES) * PAGE);

    pf_kernel_view kv;
    memset(&kv, 0, sizeof kv);
    kv.struct_size = sizeof kv;
    CHECK_OK(pf_dedup_kernel_view(dedup, &kv));
    CHECK_EQ(kv.struct_size, sizeof kv);
    CHECK_EQ(kv.store_bytes, after);
    CHECK(kv.rss_bytes > 0 && kv.pss_bytes > 0 && kv.pss_bytes <= kv.rss_bytes);
    CHECK(kv.guest_mappings >= VMS && kv.guest_mappings <= kv.mappings);

    for (unsigned v = 0; v < VMS; v++) {
        pf_vm_stats vs = vm_stats_of(dedup, ids[v]);
        CHECK_EQ(vs.pages, PAGES);
        CHECK_EQ(vs.pages_merged, SHARED_PAGES);
        CHECK_EQ(vs.zero_pages, ZERO_PAGES);
        CHECK_EQ(vs.cow_breaks, 0);
        pf_page_census c = pf_test_census();
        CHECK_OK(pf_guest_memory_census(vms[v], &c));
        CHECK_EQ(c.shared_pages, SHARED_PAGES);
        CHECK_EQ(c.zero_pages, ZERO_PAGES);
        CHECK_EQ(c.private_pages, UNIQUE_PAGES);
        check_vm(vms[v], v, PAGES);
    }

    /* A second pass finds nothing new. */
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    CHECK_EQ(store_bytes(store), after);

    pf_dedup_free(dedup);
    /* Freeing the host unmerged everything: every page its own again
     * (zero pages stay holes). */
    for (unsigned v = 0; v < VMS; v++) {
        pf_page_census c = pf_test_census();
        CHECK_OK(pf_guest_memory_census(vms[v], &c));
        CHECK_EQ(c.private_pages, PAGES);
        check_vm(vms[v], v, PAGES);
        pf_guest_memory_free(vms[v]);
    }
    CHECK_EQ(store_bytes(store), 0);
    pf_frame_store_free(store);
}

TEST(writes_to_merged_pages_copy_on_write) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    uint64_t ids[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        ids[v] = reg(dedup, vms[v], NULL);
    }
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    uint64_t merged_bytes = store_bytes(store);
    uint8_t want[PAGE];

    /* A library write to a shared page of VM 0. */
    CHECK_OK(pf_guest_memory_write(vms[0], 5 * PAGE + 100, "hello", 5));
    content(0, 5, want);
    memcpy(want + 100, "hello", 5);
    CHECK(page_is(vms[0], 5, want));
    check_vm(vms[1], 1, PAGES);
    check_vm(vms[2], 2, PAGES);

    /* An atomic store to a released zero page of VM 1. */
    CHECK_OK(pf_guest_memory_store_u64(vms[1], (SHARED_END + 3) * PAGE + 8, 0x1122334455667788ull));
    uint64_t v64 = 0;
    CHECK_OK(pf_guest_memory_load_u64(vms[1], (SHARED_END + 3) * PAGE + 8, &v64));
    CHECK_EQ(v64, 0x1122334455667788ull);
    check_vm(vms[0], 0, 5);
    check_vm(vms[2], 2, PAGES);

    /* A raw pointer write to a shared page of VM 2, as a device model or a
     * vCPU would do it. */
    uint64_t hva = 0;
    CHECK_OK(pf_guest_memory_host_address(vms[2], 7 * PAGE, &hva));
    const uint64_t beef = 0xdeadbeefull;
    *(volatile uint64_t *)(uintptr_t)hva = beef;
    content(2, 7, want);
    memcpy(want, &beef, 8);
    CHECK(page_is(vms[2], 7, want));
    check_vm(vms[0], 0, 5);
    check_vm(vms[1], 1, SHARED_END + 3);

    /* The kernel made a copy for each write; the statistics notice. */
    pf_host_stats s = stats_of(dedup);
    CHECK_EQ(s.cow_breaks, 3);
    CHECK_EQ(s.pages_shared, SHARED_PAGES);
    CHECK_EQ(s.pages_sharing, (VMS - 1) * SHARED_PAGES - 2);
    CHECK_EQ(s.zero_pages, VMS * ZERO_PAGES - 1);
    CHECK_EQ(vm_stats_of(dedup, ids[0]).cow_breaks, 1);
    CHECK_EQ(vm_stats_of(dedup, ids[1]).cow_breaks, 1);
    CHECK_EQ(vm_stats_of(dedup, ids[2]).cow_breaks, 1);
    CHECK_EQ(vm_stats_of(dedup, ids[0]).pages_merged, SHARED_PAGES - 1);
    /* The copies are anonymous memory, not store frames. */
    CHECK_EQ(store_bytes(store), merged_bytes);

    pf_dedup_free(dedup);
    for (unsigned v = 0; v < VMS; v++) pf_guest_memory_free(vms[v]);
    pf_frame_store_free(store);
}

TEST(resolve_write_fault_gives_a_page_its_own_frame) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    uint64_t ids[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        ids[v] = reg(dedup, vms[v], NULL);
    }
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    uint64_t merged_bytes = store_bytes(store);
    int was_merged = -1;

    CHECK_OK(pf_dedup_resolve_write_fault(dedup, ids[1], 9 * PAGE + 123, &was_merged));
    CHECK_EQ(was_merged, 1);
    CHECK_OK(pf_dedup_resolve_write_fault(dedup, ids[1], 9 * PAGE, &was_merged));
    CHECK_EQ(was_merged, 0);
    /* A zero page comes back too; a unique page was never merged. */
    CHECK_OK(pf_dedup_resolve_write_fault(dedup, ids[1], (ZERO_END - 1) * PAGE, &was_merged));
    CHECK_EQ(was_merged, 1);
    CHECK_OK(pf_dedup_resolve_write_fault(dedup, ids[1], (PAGES - 1) * PAGE, &was_merged));
    CHECK_EQ(was_merged, 0);

    /* The page has a frame of its own again: one more frame in the store. */
    CHECK_EQ(store_bytes(store), merged_bytes + PAGE);
    pf_vm_stats vs = vm_stats_of(dedup, ids[1]);
    CHECK_EQ(vs.pages_merged, SHARED_PAGES - 1);
    CHECK_EQ(vs.zero_pages, ZERO_PAGES - 1);
    CHECK_EQ(vs.cow_breaks, 2);
    pf_page_census c = pf_test_census();
    CHECK_OK(pf_guest_memory_census(vms[1], &c));
    CHECK_EQ(c.private_pages, UNIQUE_PAGES + 2);
    for (unsigned v = 0; v < VMS; v++) check_vm(vms[v], v, PAGES);

    /* Errors: NULL out, unknown VM, an address outside the VM. */
    was_merged = 7;
    CHECK_ERR(pf_dedup_resolve_write_fault(dedup, ids[1], 0, NULL), PF_ERR_NULL_POINTER,
              "out_was_merged");
    CHECK_ERR(pf_dedup_resolve_write_fault(dedup, 12345, 0, &was_merged), PF_ERR_UNKNOWN_VM,
              "VM 12345 is not registered");
    CHECK_ERR(pf_dedup_resolve_write_fault(dedup, 0, 0, &was_merged), PF_ERR_UNKNOWN_VM, "VM 0 is not registered");
    CHECK_ERR(pf_dedup_resolve_write_fault(dedup, ids[1], PAGES * PAGE, &was_merged),
              PF_ERR_UNMAPPED, "not backed");
    CHECK_EQ(was_merged, 7);

    pf_dedup_free(dedup);
    for (unsigned v = 0; v < VMS; v++) pf_guest_memory_free(vms[v]);
    pf_frame_store_free(store);
}

TEST(unmerge_all_restores_private_frames) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        (void)reg(dedup, vms[v], NULL);
    }
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    uint64_t pages = 0;

    CHECK_ERR(pf_dedup_unmerge_all(dedup, NULL), PF_ERR_NULL_POINTER, "out_pages");
    CHECK_OK(pf_dedup_unmerge_all(dedup, &pages));
    CHECK_EQ(pages, VMS * (SHARED_PAGES + ZERO_PAGES));
    pf_host_stats s = stats_of(dedup);
    CHECK_EQ(s.pages_shared, 0);
    CHECK_EQ(s.pages_sharing, 0);
    CHECK_EQ(s.zero_pages, 0);
    CHECK_EQ(s.pages_total, VMS * PAGES);
    /* Shared pages have their frames back; zero pages stay holes. */
    CHECK_EQ(store_bytes(store), VMS * (SHARED_PAGES + UNIQUE_PAGES) * PAGE);
    for (unsigned v = 0; v < VMS; v++) {
        pf_page_census c = pf_test_census();
        CHECK_OK(pf_guest_memory_census(vms[v], &c));
        CHECK_EQ(c.private_pages, PAGES);
        check_vm(vms[v], v, PAGES);
    }
    /* Nothing is left to unmerge; a merge folds the pages again. */
    CHECK_OK(pf_dedup_unmerge_all(dedup, &pages));
    CHECK_EQ(pages, 0);
    pf_scan_report r = report_init();
    CHECK_OK(pf_dedup_merge_now(dedup, &r));
    CHECK_EQ(r.merged_shared, VMS * SHARED_PAGES);
    CHECK_EQ(stats_of(dedup).pages_sharing, (VMS - 1) * SHARED_PAGES);

    pf_dedup_free(dedup);
    for (unsigned v = 0; v < VMS; v++) pf_guest_memory_free(vms[v]);
    pf_frame_store_free(store);
}

TEST(different_domains_share_nothing) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *a = new_vm(store, 0), *b = new_vm(store, 1), *c = new_vm(store, 2);
    pf_vm_options one = vm_options(1), two = vm_options(2);
    uint64_t ia = reg(dedup, a, &one);
    uint64_t ib = reg(dedup, b, &two);
    pf_scan_report r = report_init();

    CHECK_OK(pf_dedup_merge_now(dedup, &r));
    CHECK_EQ(r.merged_shared, 0);
    CHECK_EQ(r.merged_zero, 2 * ZERO_PAGES); /* zero pages go in every domain */
    pf_host_stats s = stats_of(dedup);
    CHECK_EQ(s.pages_shared, 0);
    CHECK_EQ(s.pages_sharing, 0);
    CHECK_EQ(s.zero_pages, 2 * ZERO_PAGES);
    CHECK_EQ(vm_stats_of(dedup, ia).pages_merged, 0);
    CHECK_EQ(vm_stats_of(dedup, ib).pages_merged, 0);

    /* A third VM in domain 1 pairs with the first only. */
    uint64_t ic = reg(dedup, c, &one);
    r = report_init();
    CHECK_OK(pf_dedup_merge_now(dedup, &r));
    CHECK_EQ(r.merged_shared, 2 * SHARED_PAGES);
    s = stats_of(dedup);
    CHECK_EQ(s.pages_shared, SHARED_PAGES);
    CHECK_EQ(s.pages_sharing, SHARED_PAGES);
    CHECK_EQ(vm_stats_of(dedup, ia).pages_merged, SHARED_PAGES);
    CHECK_EQ(vm_stats_of(dedup, ib).pages_merged, 0);
    CHECK_EQ(vm_stats_of(dedup, ic).pages_merged, SHARED_PAGES);
    check_vm(a, 0, PAGES);
    check_vm(b, 1, PAGES);
    check_vm(c, 2, PAGES);

    pf_dedup_free(dedup);
    pf_guest_memory_free(a);
    pf_guest_memory_free(b);
    pf_guest_memory_free(c);
    pf_frame_store_free(store);
}

TEST(excluded_regions_are_left_alone) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    const uint64_t high = 1ull << 30;
    pf_region layout[2];
    layout[0] = pf_test_region(0, 16 * PAGE);
    layout[1] = pf_test_region(high, 16 * PAGE);
    pf_guest_memory *m[2];
    uint64_t ids[2];
    uint8_t fill[16 * PAGE];
    memset(fill, 0x5a, sizeof fill);
    pf_vm_options o = vm_options(0);
    o.exclude_starts = &high;
    o.exclude_count = 1;
    for (int i = 0; i < 2; i++) {
        m[i] = NULL;
        CHECK_OK(pf_guest_memory_new_in_store(store, layout, 2, &m[i]));
        CHECK_OK(pf_guest_memory_write(m[i], 0, fill, sizeof fill));
        CHECK_OK(pf_guest_memory_write(m[i], high, fill, sizeof fill));
        ids[i] = reg(dedup, m[i], &o);
    }
    pf_scan_report r = report_init();
    CHECK_OK(pf_dedup_merge_now(dedup, &r));
    CHECK_EQ(r.pages_scanned, 2 * 16);
    /* All 32 included pages hold one content: one shared frame. */
    CHECK_EQ(r.merged_shared, 2 * 16);
    CHECK_EQ(stats_of(dedup).pages_shared, 1);
    for (int i = 0; i < 2; i++) {
        CHECK_EQ(vm_stats_of(dedup, ids[i]).pages_merged, 16);
        pf_page_census c = pf_test_census();
        CHECK_OK(pf_guest_memory_census(m[i], &c));
        CHECK_EQ(c.private_pages, 16); /* the excluded region */
        CHECK_EQ(c.shared_pages, 16);
    }

    pf_dedup_free(dedup);
    pf_guest_memory_free(m[0]);
    pf_guest_memory_free(m[1]);
    pf_frame_store_free(store);
}

TEST(scan_steps_merge_pages_that_held_still) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        (void)reg(dedup, vms[v], NULL);
    }
    pf_scan_report r = report_init();

    /* Budgets: exactly one. */
    CHECK_ERR(pf_dedup_scan_step(dedup, 0, 0, &r), PF_ERR_INVALID_ARGUMENT, "no budget");
    CHECK_ERR(pf_dedup_scan_step(dedup, 10, 10, &r), PF_ERR_INVALID_ARGUMENT, "two budgets");
    CHECK_EQ(r.pages_scanned, 0);

    /* First pass: every page is seen for the first time, none merges. */
    CHECK_OK(pf_dedup_scan_step(dedup, VMS * PAGES, 0, &r));
    CHECK_EQ(r.pages_scanned, VMS * PAGES);
    CHECK_EQ(r.volatile_pages, VMS * PAGES);
    CHECK_EQ(r.merged_shared + r.merged_zero, 0);
    CHECK_EQ(r.full_scan_completed, 1);

    /* One shared page of VM 2 changes between passes: it stays unmerged,
     * while VMs 0 and 1 still pair up on that page. */
    CHECK_OK(pf_guest_memory_store_u64(vms[2], 4 * PAGE, 1));
    r = report_init();
    CHECK_OK(pf_dedup_scan_step(dedup, VMS * PAGES, 0, &r));
    CHECK_EQ(r.volatile_pages, 1);
    CHECK_EQ(r.merged_zero, VMS * ZERO_PAGES);
    CHECK_EQ(r.merged_shared, VMS * SHARED_PAGES - 1);
    CHECK_EQ(r.full_scan_completed, 1);
    pf_host_stats s = stats_of(dedup);
    CHECK_EQ(s.full_scans, 2);
    CHECK_EQ(s.pages_volatile, 1);
    CHECK_EQ(s.pages_shared, SHARED_PAGES);
    CHECK_EQ(s.pages_sharing, (VMS - 1) * SHARED_PAGES - 1);

    /* A page budget smaller than a pass stops early. */
    r = report_init();
    CHECK_OK(pf_dedup_scan_step(dedup, 10, 0, &r));
    CHECK_EQ(r.pages_scanned, 10);
    CHECK_EQ(r.full_scan_completed, 0);
    /* A time budget makes progress too; the report is optional. */
    r = report_init();
    CHECK_OK(pf_dedup_scan_step(dedup, 0, 2000, &r));
    CHECK(r.pages_scanned > 0);
    CHECK_OK(pf_dedup_scan_step(dedup, 0, 1000, NULL));

    pf_dedup_free(dedup);
    for (unsigned v = 0; v < VMS; v++) pf_guest_memory_free(vms[v]);
    pf_frame_store_free(store);
}

TEST(background_scanner_merges_and_stops) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        (void)reg(dedup, vms[v], NULL);
    }
    CHECK_ERR(pf_dedup_start_background(dedup, 0, 0, 1000), PF_ERR_INVALID_ARGUMENT, "no budget");
    CHECK_OK(pf_dedup_start_background(dedup, PAGES, 0, 1000));
    /* Restarting replaces the running scanner: here with one of its own
     * thread and a budget of endless full scans per step. */
    CHECK_ERR(pf_dedup_start_background_on(dedup, PAGES, 0, 1000, 0), PF_ERR_INVALID_ARGUMENT,
              "threads must be at least 1");
    CHECK_OK(pf_dedup_start_background_on(dedup, UINT64_MAX, 0, 0, 1));
    pf_host_stats s = stats_of(dedup);
    for (int i = 0; i < 2000 && s.pages_sharing < (VMS - 1) * SHARED_PAGES; i++) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
        s = stats_of(dedup);
    }
    CHECK_EQ(s.pages_sharing, (VMS - 1) * SHARED_PAGES);
    CHECK_EQ(s.zero_pages, VMS * ZERO_PAGES);
    CHECK_EQ(s.background_errors, 0);
    /* The bookkeeping is counted, and the profit is what it leaves of the
     * saving. */
    CHECK(s.metadata_bytes >= (uint64_t)VMS * PAGES * sizeof(uint64_t));
    CHECK_EQ(s.profit_bytes,
             (int64_t)((s.pages_sharing + s.zero_pages) * 4096) - (int64_t)s.metadata_bytes);
    CHECK_OK(pf_dedup_stop_background(dedup));
    CHECK_OK(pf_dedup_stop_background(dedup)); /* none running: fine */
    uint64_t scans = stats_of(dedup).full_scans;
    struct timespec ts = {0, 30 * 1000 * 1000};
    nanosleep(&ts, NULL);
    CHECK_EQ(stats_of(dedup).full_scans, scans);
    for (unsigned v = 0; v < VMS; v++) check_vm(vms[v], v, PAGES);

    pf_dedup_free(dedup);
    for (unsigned v = 0; v < VMS; v++) pf_guest_memory_free(vms[v]);
    pf_frame_store_free(store);
}

TEST(map_headroom_option_limits_merging) {
    pf_frame_store *store = new_store();
    pf_dedup_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.map_headroom = UINT64_MAX / 2; /* more than the kernel allows at all */
    pf_dedup *dedup = pf_test_dedup(store, &o);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *a = new_vm(store, 0), *b = new_vm(store, 1);
    (void)reg(dedup, a, NULL);
    (void)reg(dedup, b, NULL);
    pf_scan_report r = report_init();
    CHECK_OK(pf_dedup_merge_now(dedup, &r));
    CHECK_EQ(r.merged_shared + r.merged_zero, 0);
    CHECK(r.map_limit > 0);
    CHECK_EQ(stats_of(dedup).map_limit_hits, r.map_limit);
    check_vm(a, 0, PAGES);
    pf_dedup_free(dedup);

    /* The default headroom (0 in the struct) leaves room to merge. */
    o.map_headroom = 0;
    dedup = pf_test_dedup(store, &o);
    (void)reg(dedup, a, NULL);
    (void)reg(dedup, b, NULL);
    r = report_init();
    CHECK_OK(pf_dedup_merge_now(dedup, &r));
    CHECK_EQ(r.map_limit, 0);
    CHECK_EQ(r.merged_shared, 2 * SHARED_PAGES);

    pf_dedup_free(dedup);
    pf_guest_memory_free(a);
    pf_guest_memory_free(b);
    pf_frame_store_free(store);
}

TEST(handles_are_released_in_any_order) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    uint64_t ids[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        ids[v] = reg(dedup, vms[v], NULL);
    }
    /* The store's handle goes first: memories and host hold the store. */
    pf_frame_store_free(store);
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));

    /* VM 0's handle goes while it is registered: the host keeps it, merged,
     * and counts it. */
    pf_guest_memory_free(vms[0]);
    CHECK_EQ(stats_of(dedup).pages_total, VMS * PAGES);
    CHECK_EQ(vm_stats_of(dedup, ids[0]).pages_merged, SHARED_PAGES);
    CHECK_EQ(stats_of(dedup).pages_sharing, (VMS - 1) * SHARED_PAGES);

    /* Unregistering VM 1 gives it back private and whole; VM 0 and VM 2
     * stay merged with each other. */
    CHECK_OK(pf_dedup_unregister(dedup, ids[1]));
    pf_page_census c = pf_test_census();
    CHECK_OK(pf_guest_memory_census(vms[1], &c));
    CHECK_EQ(c.private_pages, PAGES);
    check_vm(vms[1], 1, PAGES);
    pf_host_stats s = stats_of(dedup);
    CHECK_EQ(s.pages_total, (VMS - 1) * PAGES);
    CHECK_EQ(s.pages_sharing, SHARED_PAGES);
    CHECK_ERR(pf_dedup_unregister(dedup, ids[1]), PF_ERR_UNKNOWN_VM, "not registered");
    pf_vm_stats vs;
    memset(&vs, 0x77, sizeof vs);
    vs.struct_size = sizeof vs;
    CHECK_ERR(pf_dedup_vm_stats(dedup, ids[1], &vs), PF_ERR_UNKNOWN_VM, "not registered");
    CHECK_EQ(vs.pages, 0x7777777777777777ull); /* untouched on error */

    /* Unregistering VM 0, whose handle is gone, releases its memory. VM 2
     * alone still maps the shared frames (KSM counts them in pages_shared),
     * sharing them with nobody. */
    CHECK_OK(pf_dedup_unregister(dedup, ids[0]));
    s = stats_of(dedup);
    CHECK_EQ(s.pages_total, PAGES);
    CHECK_EQ(s.pages_shared, SHARED_PAGES);
    CHECK_EQ(s.pages_sharing, 0);

    /* An unregistered memory may be registered again, with a new id. */
    uint64_t again = reg(dedup, vms[1], NULL);
    CHECK(again != ids[1]);
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    CHECK_EQ(stats_of(dedup).pages_sharing, SHARED_PAGES);

    /* The host goes while VMs 1 and 2 are registered; their handles stay
     * usable, with every page their own. */
    pf_dedup_free(dedup);
    for (unsigned v = 1; v < VMS; v++) {
        c = pf_test_census();
        CHECK_OK(pf_guest_memory_census(vms[v], &c));
        CHECK_EQ(c.private_pages, PAGES);
        check_vm(vms[v], v, PAGES);
        CHECK_OK(pf_guest_memory_write(vms[v], 0, "x", 1));
        pf_guest_memory_free(vms[v]);
    }
}

struct writer {
    const pf_guest_memory *mem;
    int stop; /* __atomic */
    uint64_t last;
    int failures;
};

/* A vCPU stand-in: writes a counter into merged pages (a shared one and a
 * zero one), through the library and through a raw pointer, until told to
 * stop, while the main thread merges and unmerges. */
static void *write_counter(void *arg) {
    struct writer *w = (struct writer *)arg;
    uint64_t hva = 0;
    if (pf_guest_memory_host_address(w->mem, 5 * PAGE, &hva) != PF_OK) w->failures++;
    for (uint64_t i = 1; !__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE); i++) {
        if (pf_guest_memory_store_u64(w->mem, 3 * PAGE, i) != PF_OK) w->failures++;
        if (pf_guest_memory_store_u64(w->mem, (SHARED_END + 1) * PAGE + 64, i) != PF_OK)
            w->failures++;
        if (hva != 0) __atomic_store_n((uint64_t *)(uintptr_t)hva, i, __ATOMIC_RELEASE);
        w->last = i;
    }
    return NULL;
}

TEST(writers_run_while_pages_merge) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *vms[VMS];
    for (unsigned v = 0; v < VMS; v++) {
        vms[v] = new_vm(store, v);
        (void)reg(dedup, vms[v], NULL);
    }
    struct writer w;
    memset(&w, 0, sizeof w);
    w.mem = vms[0];
    pthread_t thread;
    CHECK(pthread_create(&thread, NULL, write_counter, &w) == 0);
    uint64_t pages = 0;
    for (int round = 0; round < 5; round++) {
        CHECK_OK(pf_dedup_merge_now(dedup, NULL));
        CHECK_OK(pf_dedup_scan_step(dedup, VMS * PAGES, 0, NULL));
        (void)stats_of(dedup);
        CHECK_OK(pf_dedup_unmerge_all(dedup, &pages));
    }
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    __atomic_store_n(&w.stop, 1, __ATOMIC_RELEASE);
    CHECK(pthread_join(thread, NULL) == 0);
    CHECK_EQ(w.failures, 0);
    CHECK(w.last > 0);
    uint64_t v = 0;
    CHECK_OK(pf_guest_memory_load_u64(vms[0], 3 * PAGE, &v));
    CHECK_EQ(v, w.last);
    CHECK_OK(pf_guest_memory_load_u64(vms[0], (SHARED_END + 1) * PAGE + 64, &v));
    CHECK_EQ(v, w.last);
    CHECK_OK(pf_guest_memory_load_u64(vms[0], 5 * PAGE, &v));
    CHECK_EQ(v, w.last);
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    for (unsigned i = 1; i < VMS; i++) check_vm(vms[i], i, PAGES);
    /* Once quiet, a merge folds the rest as before. */
    pf_host_stats s = stats_of(dedup);
    CHECK_EQ(s.pages_shared, SHARED_PAGES);
    CHECK_EQ(s.pages_sharing, (VMS - 1) * SHARED_PAGES - 2); /* not VM 0's pages 3 and 5 */

    pf_dedup_free(dedup);
    for (unsigned i = 0; i < VMS; i++) pf_guest_memory_free(vms[i]);
    pf_frame_store_free(store);
}

TEST(register_rejects_bad_arguments) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *mem = new_vm(store, 0);
    uint64_t id = 99;
    pf_vm_options o = vm_options(0);
    uint64_t starts[2] = {0, 4096};

    CHECK_ERR(pf_dedup_register(dedup, NULL, NULL, &id), PF_ERR_NULL_POINTER, "mem");
    CHECK_ERR(pf_dedup_register(dedup, mem, NULL, NULL), PF_ERR_NULL_POINTER, "out_vm_id");
    o.struct_size = sizeof o - 1;
    CHECK_ERR(pf_dedup_register(dedup, mem, &o, &id), PF_ERR_STRUCT_TOO_SMALL, "pf_vm_options");
    o = vm_options(0);
    o.reserved = 1;
    CHECK_ERR(pf_dedup_register(dedup, mem, &o, &id), PF_ERR_INVALID_ARGUMENT, "reserved");
    o = vm_options(0);
    o.exclude_count = 1;
    CHECK_ERR(pf_dedup_register(dedup, mem, &o, &id), PF_ERR_NULL_POINTER, "exclude_starts");
    o.exclude_starts = starts;
    o.exclude_count = SIZE_MAX;
    CHECK_ERR(pf_dedup_register(dedup, mem, &o, &id), PF_ERR_INVALID_ARGUMENT, "exclude_count");
    o.exclude_count = 2;
    CHECK_ERR(pf_dedup_register(dedup, mem, &o, &id), PF_ERR_INVALID_ARGUMENT,
              "exclude_starts[1] = 0x1000 is not the start of a region");
    CHECK_EQ(id, 99);

    /* Memory of another store, its own (pf_guest_memory_new) or another
     * pf_frame_store, registers too (ABI 0.10): shared frames live in the
     * host's store, each page's own frame in its memory's. */
    pf_region r = pf_test_region(0, 4 * PAGE);
    pf_guest_memory *own = pf_test_memory(&r, 1);
    uint64_t own_id = 99;
    CHECK_OK(pf_dedup_register(dedup, own, NULL, &own_id));
    CHECK_OK(pf_dedup_unregister(dedup, own_id));
    pf_frame_store *other = new_store();
    pf_guest_memory *elsewhere = new_vm(other, 1);
    uint64_t elsewhere_id = 99;
    CHECK_OK(pf_dedup_register(dedup, elsewhere, NULL, &elsewhere_id));
    CHECK_OK(pf_dedup_unregister(dedup, elsewhere_id));
    CHECK_EQ(id, 99);

    /* One memory, one registration: not twice with this host, nor with a
     * second host on the same store. */
    o.exclude_count = 1; /* starts[0] = 0 is the region's start */
    uint64_t first = reg(dedup, mem, &o);
    CHECK_ERR(pf_dedup_register(dedup, mem, NULL, &id), PF_ERR_INVALID_ARGUMENT,
              "already registered with a dedup host");
    pf_dedup *second = pf_test_dedup(store, NULL);
    CHECK_ERR(pf_dedup_register(second, mem, NULL, &id), PF_ERR_INVALID_ARGUMENT,
              "already registered with a dedup host");
    CHECK_EQ(id, 99);
    /* Once unregistered, the other host may have it. */
    CHECK_OK(pf_dedup_unregister(dedup, first));
    (void)reg(second, mem, NULL);
    pf_dedup_free(second);
    /* Freeing a host forgets its registrations. */
    (void)reg(dedup, mem, NULL);

    pf_dedup_free(dedup);
    pf_guest_memory_free(mem);
    pf_guest_memory_free(own);
    pf_guest_memory_free(elsewhere);
    pf_frame_store_free(other);
    pf_frame_store_free(store);
}

TEST(outputs_are_size_checked_and_versioned) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *mem = new_vm(store, 0);
    uint64_t id = reg(dedup, mem, NULL);

    /* Too small: refused before anything happens, output untouched. */
    pf_scan_report r = report_init();
    r.struct_size = sizeof r - 1;
    CHECK_ERR(pf_dedup_merge_now(dedup, &r), PF_ERR_STRUCT_TOO_SMALL, "pf_scan_report");
    CHECK_ERR(pf_dedup_scan_step(dedup, 1, 0, &r), PF_ERR_STRUCT_TOO_SMALL, "pf_scan_report");
    CHECK_EQ(r.pages_scanned, 0);
    CHECK_EQ(stats_of(dedup).zero_pages, 0); /* the merge did not run */
    pf_host_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = 8;
    CHECK_ERR(pf_dedup_stats(dedup, &s), PF_ERR_STRUCT_TOO_SMALL, "pf_host_stats");
    /* A program built against ABI 0.2's first pf_host_stats (no
     * background_errors) is served up to its size; the rest is untouched. */
    memset(&s, 0xee, sizeof s);
    s.struct_size = offsetof(pf_host_stats, background_errors);
    CHECK_OK(pf_dedup_stats(dedup, &s));
    CHECK_EQ(s.struct_size, offsetof(pf_host_stats, background_errors));
    CHECK_EQ(s.full_scans, 0);
    CHECK_EQ(s.background_errors, 0xeeeeeeeeeeeeeeeeull);
    s.struct_size = offsetof(pf_host_stats, background_errors) - 1;
    CHECK_ERR(pf_dedup_stats(dedup, &s), PF_ERR_STRUCT_TOO_SMALL, "pf_host_stats");
    CHECK_ERR(pf_dedup_stats(dedup, NULL), PF_ERR_NULL_POINTER, "out_stats");
    pf_vm_stats vs;
    memset(&vs, 0, sizeof vs);
    vs.struct_size = sizeof vs - 8;
    CHECK_ERR(pf_dedup_vm_stats(dedup, id, &vs), PF_ERR_STRUCT_TOO_SMALL, "pf_vm_stats");
    CHECK_ERR(pf_dedup_vm_stats(dedup, id, NULL), PF_ERR_NULL_POINTER, "out_stats");
    pf_kernel_view kv;
    memset(&kv, 0, sizeof kv);
    kv.struct_size = 0;
    CHECK_ERR(pf_dedup_kernel_view(dedup, &kv), PF_ERR_STRUCT_TOO_SMALL, "pf_kernel_view");
    CHECK_ERR(pf_dedup_kernel_view(dedup, NULL), PF_ERR_NULL_POINTER, "out_view");
    CHECK_EQ(kv.store_bytes, 0);

    /* Larger (a caller built against a later version): filled as far as
     * this version goes, struct_size says how far, the rest untouched. */
    struct {
        pf_scan_report v1;
        uint64_t later[2];
    } big_report;
    memset(&big_report, 0xab, sizeof big_report);
    big_report.v1.struct_size = sizeof big_report;
    CHECK_OK(pf_dedup_merge_now(dedup, &big_report.v1));
    CHECK_EQ(big_report.v1.struct_size, sizeof(pf_scan_report));
    CHECK_EQ(big_report.v1.merged_zero, ZERO_PAGES);
    CHECK_EQ(big_report.later[0], 0xababababababababull);
    CHECK_EQ(big_report.later[1], 0xababababababababull);
    struct {
        pf_host_stats v1;
        uint64_t later;
    } big_stats;
    memset(&big_stats, 0xab, sizeof big_stats);
    big_stats.v1.struct_size = sizeof big_stats;
    CHECK_OK(pf_dedup_stats(dedup, &big_stats.v1));
    CHECK_EQ(big_stats.v1.struct_size, sizeof(pf_host_stats));
    CHECK_EQ(big_stats.v1.zero_pages, ZERO_PAGES);
    CHECK_EQ(big_stats.later, 0xababababababababull);
    struct {
        pf_vm_stats v1;
        uint64_t later;
    } big_vm;
    memset(&big_vm, 0xab, sizeof big_vm);
    big_vm.v1.struct_size = sizeof big_vm;
    CHECK_OK(pf_dedup_vm_stats(dedup, id, &big_vm.v1));
    CHECK_EQ(big_vm.v1.struct_size, sizeof(pf_vm_stats));
    CHECK_EQ(big_vm.v1.pages, PAGES);
    CHECK_EQ(big_vm.later, 0xababababababababull);
    struct {
        pf_kernel_view v1;
        uint64_t later;
    } big_view;
    memset(&big_view, 0xab, sizeof big_view);
    big_view.v1.struct_size = sizeof big_view;
    CHECK_OK(pf_dedup_kernel_view(dedup, &big_view.v1));
    CHECK_EQ(big_view.v1.struct_size, sizeof(pf_kernel_view));
    CHECK_EQ(big_view.v1.store_bytes, store_bytes(store));
    CHECK_EQ(big_view.later, 0xababababababababull);
    /* Larger options are accepted too. */
    struct {
        pf_vm_options v1;
        uint64_t later;
    } big_options;
    memset(&big_options, 0xab, sizeof big_options);
    big_options.v1 = vm_options(3);
    big_options.v1.struct_size = sizeof big_options;
    pf_guest_memory *mem2 = new_vm(store, 1);
    (void)reg(dedup, mem2, &big_options.v1);
    struct {
        pf_dedup_options v1;
        uint64_t later;
    } big_dedup_options;
    memset(&big_dedup_options, 0xab, sizeof big_dedup_options);
    big_dedup_options.v1.struct_size = sizeof big_dedup_options;
    big_dedup_options.v1.map_headroom = 0;
    pf_dedup *other = pf_test_dedup(store, &big_dedup_options.v1);
    pf_dedup_free(other);

    pf_dedup_free(dedup);
    pf_guest_memory_free(mem);
    pf_guest_memory_free(mem2);
    pf_frame_store_free(store);
}

/* A balloon releases a merged page through the dedup host once attached;
 * before that the entry is refused as shared. */
TEST(balloon_releases_merged_pages_through_the_host) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    if (dedup == NULL) {
        pf_frame_store_free(store);
        return;
    }
    pf_guest_memory *a = new_vm(store, 0), *b = new_vm(store, 1);
    uint64_t ida = reg(dedup, a, NULL);
    uint64_t idb = reg(dedup, b, NULL);
    CHECK_OK(pf_dedup_merge_now(dedup, NULL));
    uint64_t sharing = stats_of(dedup).pages_sharing;

    pf_balloon *bal = NULL;
    CHECK_OK(pf_balloon_new(a, 0, &bal));
    pf_balloon_entry_error errs[1];
    pf_balloon_report r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.errors = errs;
    r.errors_capacity = 1;
    uint64_t pfn = 3; /* a page [0, SHARED_END): merged across the VMs */
    CHECK_OK(pf_balloon_inflate_pfns(bal, &pfn, 1, &r));
    CHECK_EQ(r.applied, 0);
    CHECK_EQ(r.error_count, 1);
    CHECK_EQ(errs[0].code, PF_BALLOON_E_SHARED);

    CHECK_ERR(pf_balloon_attach_dedup(NULL, dedup, ida), PF_ERR_NULL_POINTER, "b");
    CHECK_ERR(pf_balloon_attach_dedup(bal, NULL, ida), PF_ERR_NULL_POINTER, "dedup");
    /* Another VM's id, and one nobody registered: refused, balloon as it was. */
    CHECK_ERR(pf_balloon_attach_dedup(bal, dedup, idb), PF_ERR_INVALID_ARGUMENT, "another memory");
    CHECK_ERR(pf_balloon_attach_dedup(bal, dedup, ida + idb + 100), PF_ERR_INVALID_ARGUMENT,
              "not registered");
    CHECK_OK(pf_balloon_inflate_pfns(bal, &pfn, 1, &r));
    CHECK_EQ(errs[0].code, PF_BALLOON_E_SHARED);
    CHECK_OK(pf_balloon_attach_dedup(bal, dedup, ida));
    CHECK_OK(pf_balloon_inflate_pfns(bal, &pfn, 1, &r));
    CHECK_EQ(r.applied, 1);
    CHECK_EQ(r.error_count, 0);
    CHECK_EQ(stats_of(dedup).pages_sharing, sharing - 1);
    /* The other VM keeps its content; the ballooned page reads zeros. */
    check_vm(b, 1, PAGES);
    uint8_t buf[PAGE], zeros[PAGE];
    memset(zeros, 0, sizeof zeros);
    CHECK_OK(pf_guest_memory_read(a, 3 * PAGE, buf, PAGE));
    CHECK(memcmp(buf, zeros, PAGE) == 0);

    pf_balloon_free(bal);
    pf_dedup_free(dedup);
    pf_guest_memory_free(a);
    pf_guest_memory_free(b);
    pf_frame_store_free(store);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(frame_store_new_and_free),
        PF_TEST_CASE(frame_store_new_rejects_bad_arguments),
        PF_TEST_CASE(memories_in_one_store_share_it),
        PF_TEST_CASE(memory_in_store_rejects_bad_arguments),
        PF_TEST_CASE(dedup_new_rejects_bad_arguments),
        PF_TEST_CASE(dedup_refuses_hugetlb_stores),
        PF_TEST_CASE(dedup_calls_reject_a_null_handle),
        PF_TEST_CASE(three_vms_merge_and_the_kernel_sees_it),
        PF_TEST_CASE(writes_to_merged_pages_copy_on_write),
        PF_TEST_CASE(resolve_write_fault_gives_a_page_its_own_frame),
        PF_TEST_CASE(unmerge_all_restores_private_frames),
        PF_TEST_CASE(different_domains_share_nothing),
        PF_TEST_CASE(excluded_regions_are_left_alone),
        PF_TEST_CASE(scan_steps_merge_pages_that_held_still),
        PF_TEST_CASE(background_scanner_merges_and_stops),
        PF_TEST_CASE(map_headroom_option_limits_merging),
        PF_TEST_CASE(handles_are_released_in_any_order),
        PF_TEST_CASE(writers_run_while_pages_merge),
        PF_TEST_CASE(register_rejects_bad_arguments),
        PF_TEST_CASE(outputs_are_size_checked_and_versioned),
        PF_TEST_CASE(balloon_releases_merged_pages_through_the_host),
    };
    return pf_test_main("dedup", tests, sizeof tests / sizeof tests[0]);
}
