/*
 * Balloon reclaim: inflate by PFN, by le32 queue payload and by range (the
 * kernel's allocated bytes drop, and reads of ballooned pages do not raise
 * them again), per-entry errors in a bad batch while the
 * rest applies, deflate, a write to a ballooned page, free page reports,
 * stats with unknown tags, the OOM hook, and the NULL / struct-size errors.
 */
#include "pf_test.h"

#define PAGE 4096u

/* Two regions with a hole: pages [0, 64) and [128, 192). */
static pf_guest_memory *two_regions(void) {
    pf_region r[2];
    r[0] = pf_test_region(0, 64u * PAGE);
    r[1] = pf_test_region(128u * PAGE, 64u * PAGE);
    return pf_test_memory(r, 2);
}

static pf_balloon *new_balloon(pf_guest_memory *mem, size_t max_batch) {
    pf_balloon *b = NULL;
    CHECK_OK(pf_balloon_new(mem, max_batch, &b));
    CHECK(b != NULL);
    return b;
}

/* Writes a non-zero byte to `count` pages from page `first`. */
static void fill(pf_guest_memory *mem, uint64_t first, uint64_t count) {
    uint8_t byte = 0xa5;
    for (uint64_t p = first; p < first + count; p++)
        CHECK_OK(pf_guest_memory_write(mem, p * PAGE + 7, &byte, 1));
}

static uint64_t allocated(pf_guest_memory *mem) {
    uint64_t bytes = 0;
    CHECK_OK(pf_guest_memory_allocated_bytes(mem, &bytes));
    return bytes;
}

static pf_balloon_report report(pf_balloon_entry_error *errors, size_t capacity) {
    pf_balloon_report r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.errors = errors;
    r.errors_capacity = capacity;
    return r;
}

static pf_balloon_counts counts(pf_balloon *b) {
    pf_balloon_counts c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    CHECK_OK(pf_balloon_get_counts(b, &c));
    return c;
}

/* Little-endian 32-bit PFNs, as the virtio queues carry them. */
static void put_le32(uint8_t *out, uint32_t v) {
    out[0] = (uint8_t)v;
    out[1] = (uint8_t)(v >> 8);
    out[2] = (uint8_t)(v >> 16);
    out[3] = (uint8_t)(v >> 24);
}

TEST(inflate_releases_memory) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon_report r = report(NULL, 0);
    pf_page_census census = pf_test_census();
    uint64_t pfns[3] = {1, 2, 3};
    uint64_t before;

    fill(mem, 0, 20);
    fill(mem, 130, 10);
    before = allocated(mem);
    CHECK_EQ(before, 30u * PAGE);

    CHECK_OK(pf_balloon_inflate_pfns(b, pfns, 3, &r));
    CHECK_EQ(r.struct_size, sizeof r);
    CHECK_EQ(r.applied, 3);
    CHECK_EQ(r.released_pages, 3);
    CHECK_EQ(r.error_count, 0);
    CHECK_EQ(allocated(mem), before - 3u * PAGE);

    /* A range across the whole of pages 130..140. */
    r = report(NULL, 0);
    CHECK_OK(pf_balloon_inflate_range(b, 130u * PAGE, 10u * PAGE, &r));
    CHECK_EQ(r.applied, 10);
    CHECK_EQ(r.released_pages, 10);
    CHECK_EQ(allocated(mem), before - 13u * PAGE);
    /* Again: already-ballooned pages of a range are skipped silently. */
    r = report(NULL, 0);
    CHECK_OK(pf_balloon_inflate_range(b, 130u * PAGE, 10u * PAGE, &r));
    CHECK_EQ(r.applied, 0);
    CHECK_EQ(r.error_count, 0);

    CHECK_EQ(counts(b).actual, 13);
    CHECK_OK(pf_guest_memory_census(mem, &census));
    CHECK_EQ(census.ballooned_pages, 13);

    /* Ballooned pages read as zeros, and reading them gives them no memory
     * back: nothing allocated, nothing the guest touched. */
    {
        uint8_t buf[64];
        uint64_t word = 1, touched = 1;
        memset(buf, 1, sizeof buf);
        CHECK_OK(pf_guest_memory_read(mem, 2u * PAGE + 7, buf, sizeof buf));
        for (size_t i = 0; i < sizeof buf; i++)
            CHECK_EQ(buf[i], 0);
        CHECK_OK(pf_guest_memory_load_u64(mem, 3u * PAGE + 64, &word));
        CHECK_EQ(word, 0);
        CHECK_EQ(allocated(mem), before - 13u * PAGE);
        CHECK_OK(pf_balloon_reclaim_touched(b, &touched));
        CHECK_EQ(touched, 0);
    }

    /* Range errors: misaligned, into the hole. Nothing changes. */
    r = report(NULL, 0);
    CHECK_STATUS(pf_balloon_inflate_range(b, 5u * PAGE + 1, PAGE, &r), PF_ERR_MISALIGNED);
    CHECK_ERR(pf_balloon_inflate_range(b, 60u * PAGE, 10u * PAGE, &r), PF_ERR_UNMAPPED, "hole");
    CHECK_EQ(r.applied, 0);
    CHECK_EQ(counts(b).actual, 13);

    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

TEST(le32_payloads) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon_entry_error errs[4];
    pf_balloon_report r = report(errs, 4);
    uint8_t payload[4 * 3 + 2];
    uint64_t before;

    fill(mem, 140, 3);
    before = allocated(mem);
    put_le32(payload, 140);
    put_le32(payload + 4, 141);
    put_le32(payload + 8, 142);
    CHECK_OK(pf_balloon_inflate_le32(b, payload, 12, &r));
    CHECK_EQ(r.applied, 3);
    CHECK_EQ(r.released_pages, 3);
    CHECK_EQ(r.error_count, 0);
    CHECK_EQ(allocated(mem), before - 3u * PAGE);

    /* Deflate two of them plus a trailing partial entry. */
    r = report(errs, 4);
    CHECK_OK(pf_balloon_deflate_le32(b, payload, 8 + 2, &r));
    CHECK_EQ(r.applied, 2);
    CHECK_EQ(r.error_count, 1);
    CHECK_EQ(errs[0].index, 2);
    CHECK_EQ(errs[0].code, PF_BALLOON_E_TRUNCATED);
    CHECK_EQ(counts(b).actual, 1);

    /* An empty payload (NULL with length 0) is a valid, empty request. */
    r = report(NULL, 0);
    CHECK_OK(pf_balloon_inflate_le32(b, NULL, 0, &r));
    CHECK_EQ(r.applied, 0);
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

TEST(a_bad_batch_reports_each_entry_and_applies_the_rest) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 5);
    pf_balloon_entry_error errs[3];
    pf_balloon_report r;
    /* ok, hole, repeat of 0, beyond memory, ok, over the limit of 5. */
    uint64_t pfns[6] = {10, 70, 10, 100000, 129, 11};

    fill(mem, 10, 2);
    fill(mem, 129, 1);
    memset(errs, 0xff, sizeof errs);
    r = report(errs, 2);
    CHECK_OK(pf_balloon_inflate_pfns(b, pfns, 6, &r));
    CHECK_EQ(r.applied, 2);
    CHECK_EQ(r.released_pages, 2);
    CHECK_EQ(r.error_count, 4);
    CHECK_EQ(errs[0].index, 1);
    CHECK_EQ(errs[0].code, PF_BALLOON_E_HOLE);
    CHECK_EQ(errs[1].index, 2);
    CHECK_EQ(errs[1].code, PF_BALLOON_E_REPEATED);
    /* Past the capacity: untouched. */
    CHECK_EQ(errs[2].index, SIZE_MAX);

    /* Count only, then all of them. */
    r = report(NULL, 0);
    CHECK_OK(pf_balloon_inflate_pfns(b, pfns, 6, &r));
    CHECK_EQ(r.applied, 0);
    CHECK_EQ(r.error_count, 6);
    {
        pf_balloon_entry_error all[8];
        r = report(all, 8);
        CHECK_OK(pf_balloon_inflate_pfns(b, pfns, 6, &r));
        CHECK_EQ(r.error_count, 6);
        CHECK_EQ(all[0].code, PF_BALLOON_E_ALREADY_BALLOONED);
        CHECK_EQ(all[1].code, PF_BALLOON_E_HOLE);
        CHECK_EQ(all[2].code, PF_BALLOON_E_REPEATED);
        CHECK_EQ(all[3].code, PF_BALLOON_E_OUT_OF_RANGE);
        CHECK_EQ(all[4].code, PF_BALLOON_E_ALREADY_BALLOONED);
        CHECK_EQ(all[5].index, 5);
        CHECK_EQ(all[5].code, PF_BALLOON_E_OVER_LIMIT);
    }
    CHECK_EQ(counts(b).actual, 2);
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

TEST(deflate_and_writes_take_pages_back) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon_entry_error errs[2];
    pf_balloon_report r = report(NULL, 0);
    uint64_t in[4] = {20, 21, 22, 23};
    uint64_t out[3] = {20, 21, 50};
    uint64_t before;
    uint8_t byte = 9;
    pf_balloon_counts c;

    fill(mem, 20, 4);
    CHECK_OK(pf_balloon_inflate_pfns(b, in, 4, &r));
    CHECK_EQ(r.applied, 4);

    r = report(errs, 2);
    CHECK_OK(pf_balloon_deflate_pfns(b, out, 3, &r));
    CHECK_EQ(r.applied, 2);
    CHECK_EQ(r.error_count, 1);
    CHECK_EQ(errs[0].index, 2);
    CHECK_EQ(errs[0].code, PF_BALLOON_E_NOT_BALLOONED);
    c = counts(b);
    CHECK_EQ(c.actual, 2);
    CHECK_EQ(c.deflated, 2);

    /* A library write to a ballooned page deflates it. */
    before = allocated(mem);
    CHECK_OK(pf_guest_memory_write(mem, 22u * PAGE, &byte, 1));
    CHECK_EQ(allocated(mem), before + PAGE);
    c = counts(b);
    CHECK_EQ(c.actual, 1);
    CHECK_EQ(c.deflated, 3);
    byte = 0;
    CHECK_OK(pf_guest_memory_read(mem, 22u * PAGE, &byte, 1));
    CHECK_EQ(byte, 9);

    /* The rest by range; pages not in the balloon are skipped. */
    r = report(NULL, 0);
    CHECK_OK(pf_balloon_deflate_range(b, 20u * PAGE, 8u * PAGE, &r));
    CHECK_EQ(r.applied, 1);
    CHECK_EQ(r.error_count, 0);
    CHECK_EQ(counts(b).actual, 0);
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

TEST(free_page_reports_release_without_ballooning) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    uint64_t released = 0;
    uint64_t before;
    pf_balloon_counts c;

    fill(mem, 32, 16);
    before = allocated(mem);
    CHECK_OK(pf_balloon_report_free(b, 32u * PAGE, 4, &released));
    CHECK_EQ(released, 16);
    CHECK_EQ(allocated(mem), before - 16u * PAGE);
    c = counts(b);
    CHECK_EQ(c.reported, 16);
    CHECK_EQ(c.actual, 0);
    CHECK_OK(pf_balloon_report_free(b, 32u * PAGE, 0, NULL));
    CHECK_STATUS(pf_balloon_report_free(b, 32u * PAGE + 1, 4, NULL), PF_ERR_MISALIGNED);
    CHECK_STATUS(pf_balloon_report_free(b, 64u * PAGE, 4, NULL), PF_ERR_UNMAPPED);
    CHECK_STATUS(pf_balloon_report_free(b, 0, 99, NULL), PF_ERR_INVALID_ARGUMENT);
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

/* One stats entry: le16 tag, le64 value, packed (10 bytes). */
static void put_stat(uint8_t *out, uint16_t tag, uint64_t value) {
    out[0] = (uint8_t)tag;
    out[1] = (uint8_t)(tag >> 8);
    for (int i = 0; i < 8; i++)
        out[2 + i] = (uint8_t)(value >> (8 * i));
}

TEST(stats_are_parsed_with_unknown_tags) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon_stats s;
    uint8_t buf[4 * 10];

    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    CHECK_OK(pf_balloon_get_stats(b, &s));
    CHECK_EQ(s.struct_size, sizeof s);
    CHECK_EQ(s.set, 0);
    CHECK_EQ(s.unknown_tags, 0);

    put_stat(buf, PF_BALLOON_STAT_FREE_MEMORY, 123456789ull);
    put_stat(buf + 10, 99, 1);
    put_stat(buf + 20, PF_BALLOON_STAT_OOM_KILLS, 3);
    put_stat(buf + 30, PF_BALLOON_STAT_FREE_MEMORY, 0x1122334455667788ull);
    CHECK_OK(pf_balloon_update_stats(b, buf, sizeof buf));
    CHECK_OK(pf_balloon_get_stats(b, &s));
    CHECK_EQ(s.set, (1u << PF_BALLOON_STAT_FREE_MEMORY) | (1u << PF_BALLOON_STAT_OOM_KILLS));
    CHECK_EQ(s.values[PF_BALLOON_STAT_FREE_MEMORY], 0x1122334455667788ull);
    CHECK_EQ(s.values[PF_BALLOON_STAT_OOM_KILLS], 3);
    CHECK_EQ(s.values[PF_BALLOON_STAT_SWAP_IN], 0);
    CHECK_EQ(s.unknown_tags, 1);

    /* A partial entry is refused; the recorded stats stay. */
    CHECK_ERR(pf_balloon_update_stats(b, buf, 15), PF_ERR_INVALID_ARGUMENT, "partial");
    CHECK_OK(pf_balloon_get_stats(b, &s));
    CHECK_EQ(s.values[PF_BALLOON_STAT_OOM_KILLS], 3);
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

typedef struct oom_seen {
    int calls;
    uint64_t pages;
} oom_seen;

static void on_oom(uint64_t pages, void *user) {
    oom_seen *seen = (oom_seen *)user;
    seen->calls++;
    seen->pages += pages;
}

TEST(the_oom_hook_sees_deflates_below_the_target) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon_report r = report(NULL, 0);
    oom_seen seen = {0, 0};
    pf_balloon_counts c;

    CHECK_OK(pf_balloon_set_oom_hook(b, on_oom, &seen));
    CHECK_OK(pf_balloon_inflate_range(b, 0, 8u * PAGE, &r));
    CHECK_OK(pf_balloon_set_target(b, 8));
    r = report(NULL, 0);
    CHECK_OK(pf_balloon_deflate_range(b, 0, 3u * PAGE, &r));
    CHECK_EQ(r.applied, 3);
    CHECK_EQ(seen.calls, 1);
    CHECK_EQ(seen.pages, 3);
    c = counts(b);
    CHECK_EQ(c.target, 8);
    CHECK_EQ(c.actual, 5);
    CHECK_EQ(c.oom_deflated, 3);

    /* Removed: no more calls. */
    CHECK_OK(pf_balloon_set_oom_hook(b, NULL, NULL));
    r = report(NULL, 0);
    CHECK_OK(pf_balloon_deflate_range(b, 3u * PAGE, PAGE, &r));
    CHECK_EQ(seen.calls, 1);
    CHECK_EQ(counts(b).oom_deflated, 4);
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

TEST(errors_are_typed) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon *none = NULL;
    pf_balloon_report r = report(NULL, 0);
    pf_balloon_counts c;
    pf_balloon_stats s;
    uint64_t pfn = 1;

    CHECK_STATUS(pf_balloon_new(NULL, 0, &none), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_new(mem, 0, NULL), PF_ERR_NULL_POINTER);
    CHECK(none == NULL);
    CHECK_STATUS(pf_balloon_inflate_pfns(NULL, &pfn, 1, &r), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_inflate_pfns(b, NULL, 1, &r), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_inflate_pfns(b, &pfn, 1, NULL), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_deflate_pfns(b, &pfn, 1, NULL), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_inflate_le32(b, NULL, 4, &r), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_deflate_le32(NULL, &pfn, 4, &r), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_inflate_range(b, 0, PAGE, NULL), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_deflate_range(NULL, 0, PAGE, &r), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_report_free(NULL, 0, 0, NULL), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_set_target(NULL, 1), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_get_counts(b, NULL), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_get_stats(NULL, &s), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_update_stats(b, NULL, 10), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_balloon_set_oom_hook(NULL, on_oom, NULL), PF_ERR_NULL_POINTER);

    /* A capacity without an array. */
    r = report(NULL, 4);
    CHECK_ERR(pf_balloon_inflate_pfns(b, &pfn, 1, &r), PF_ERR_NULL_POINTER, "errors");

    /* Struct sizes: too small is refused before anything is applied. */
    r = report(NULL, 0);
    r.struct_size = 8;
    CHECK_ERR(pf_balloon_inflate_pfns(b, &pfn, 1, &r), PF_ERR_STRUCT_TOO_SMALL,
              "pf_balloon_report");
    CHECK_EQ(r.struct_size, 8);
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c - 1;
    CHECK_ERR(pf_balloon_get_counts(b, &c), PF_ERR_STRUCT_TOO_SMALL, "pf_balloon_counts");
    CHECK_EQ(c.actual, 0);
    memset(&s, 0, sizeof s);
    CHECK_ERR(pf_balloon_get_stats(b, &s), PF_ERR_STRUCT_TOO_SMALL, "pf_balloon_stats");
    c = counts(b);
    CHECK_EQ(c.actual, 0);

    pf_balloon_free(NULL);
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

/* A vCPU touching a ballooned page through the raw mapping reads zeros;
 * pf_balloon_reclaim_touched finds the page and counts it as deflated. */
TEST(raw_touches_are_reclaimed_as_deflated) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon_report r = report(NULL, 0);
    uint64_t n = 99, host = 0;
    fill(mem, 0, 16);
    CHECK_OK(pf_balloon_inflate_range(b, 0, 16u * PAGE, &r));
    CHECK_EQ(r.applied, 16);
    CHECK_OK(pf_balloon_reclaim_touched(b, &n));
    CHECK_EQ(n, 0);
    CHECK_OK(pf_guest_memory_host_address(mem, 0, &host));
    volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)host;
    CHECK_EQ(p[2u * PAGE + 1], 0); /* reads zeros */
    p[5u * PAGE] = 0x42;             /* and writes */
    uint64_t deflated = counts(b).deflated;
    CHECK_OK(pf_balloon_reclaim_touched(b, &n));
    CHECK_EQ(n, 2);
    pf_balloon_counts c = counts(b);
    CHECK_EQ(c.deflated, deflated + 2);
    CHECK_EQ(c.actual, 14);
    CHECK_OK(pf_balloon_reclaim_touched(b, NULL));
    CHECK_ERR(pf_balloon_reclaim_touched(NULL, &n), PF_ERR_NULL_POINTER, "balloon");
    pf_balloon_free(b);
    pf_guest_memory_free(mem);
}

TEST(the_balloon_keeps_its_memory_alive) {
    pf_guest_memory *mem = two_regions();
    pf_balloon *b = new_balloon(mem, 0);
    pf_balloon_report r = report(NULL, 0);
    pf_guest_memory_free(mem);
    CHECK_OK(pf_balloon_inflate_range(b, 0, 4u * PAGE, &r));
    CHECK_EQ(r.applied, 4);
    CHECK_EQ(counts(b).actual, 4);
    pf_balloon_free(b);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(inflate_releases_memory),
        PF_TEST_CASE(le32_payloads),
        PF_TEST_CASE(a_bad_batch_reports_each_entry_and_applies_the_rest),
        PF_TEST_CASE(deflate_and_writes_take_pages_back),
        PF_TEST_CASE(free_page_reports_release_without_ballooning),
        PF_TEST_CASE(stats_are_parsed_with_unknown_tags),
        PF_TEST_CASE(the_oom_hook_sees_deflates_below_the_target),
        PF_TEST_CASE(errors_are_typed),
        PF_TEST_CASE(raw_touches_are_reclaimed_as_deflated),
        PF_TEST_CASE(the_balloon_keeps_its_memory_alive),
    };
    return pf_test_main("balloon", tests, sizeof tests / sizeof tests[0]);
}
