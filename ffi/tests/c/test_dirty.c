/*
 * The dirty log: tracking on/off per region, harvest into a caller buffer
 * (and the needed count when it is too small), KVM bitmap merge, explicit
 * marks, and the error paths.
 */
#include "pf_test.h"

#define PAGE 4096u

/* Two regions with a hole: [0, 70 pages) and [100 pages, 230 pages). */
static pf_guest_memory *two_regions(void) {
    pf_region r[2];
    r[0] = pf_test_region(0, 70u * PAGE);
    r[1] = pf_test_region(100u * PAGE, 130u * PAGE);
    return pf_test_memory(r, 2);
}

TEST(writes_are_logged_while_tracking_is_on) {
    pf_guest_memory *mem = two_regions();
    pf_dirty_run runs[8];
    size_t n = 99;
    uint8_t byte = 1;

    /* Off by default. */
    CHECK_OK(pf_guest_memory_write(mem, 3u * PAGE, &byte, 1));
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 8, &n));
    CHECK_EQ(n, 0);

    CHECK_OK(pf_guest_memory_set_dirty_tracking(mem, PF_ALL_REGIONS, 1));
    CHECK_OK(pf_guest_memory_write(mem, 3u * PAGE + 10, &byte, 1));
    CHECK_OK(pf_guest_memory_store_u64(mem, 4u * PAGE, 7));
    CHECK_OK(pf_guest_memory_write(mem, 150u * PAGE, &byte, 1));
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 8, &n));
    CHECK_EQ(n, 2);
    CHECK_EQ(runs[0].gpa, 3u * PAGE);
    CHECK_EQ(runs[0].pages, 2);
    CHECK_EQ(runs[1].gpa, 150u * PAGE);
    CHECK_EQ(runs[1].pages, 1);
    /* Harvest cleared them. */
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 8, &n));
    CHECK_EQ(n, 0);

    /* Per region: only region 1 tracked; stopping keeps what was logged. */
    CHECK_OK(pf_guest_memory_set_dirty_tracking(mem, 0, 0));
    CHECK_OK(pf_guest_memory_write(mem, 5u * PAGE, &byte, 1));
    CHECK_OK(pf_guest_memory_write(mem, 101u * PAGE, &byte, 1));
    CHECK_OK(pf_guest_memory_set_dirty_tracking(mem, 1, 0));
    CHECK_OK(pf_guest_memory_write(mem, 102u * PAGE, &byte, 1));
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, 1, runs, 8, &n));
    CHECK_EQ(n, 1);
    CHECK_EQ(runs[0].gpa, 101u * PAGE);
    CHECK_EQ(runs[0].pages, 1);
    pf_guest_memory_free(mem);
}

TEST(a_small_buffer_gets_the_needed_count_and_loses_nothing) {
    pf_guest_memory *mem = two_regions();
    pf_dirty_run runs[3];
    size_t n = 0;

    CHECK_OK(pf_guest_memory_mark_dirty(mem, 0, 1));
    CHECK_OK(pf_guest_memory_mark_dirty(mem, 10u * PAGE, 5));
    CHECK_OK(pf_guest_memory_mark_dirty(mem, 69u * PAGE + 100, 1));
    /* Spans the hole: refused, nothing marked. */
    CHECK_ERR(pf_guest_memory_mark_dirty(mem, 69u * PAGE, 2), PF_ERR_UNMAPPED, "no region");

    CHECK_STATUS(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, NULL, 0, &n),
                 PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(n, 3);
    CHECK_STATUS(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 2, &n),
                 PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(n, 3);
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 3, &n));
    CHECK_EQ(n, 3);
    CHECK_EQ(runs[0].gpa, 0);
    CHECK_EQ(runs[1].gpa, 10u * PAGE);
    CHECK_EQ(runs[1].pages, 5);
    CHECK_EQ(runs[2].gpa, 69u * PAGE);
    pf_guest_memory_free(mem);
}

TEST(kvm_bitmaps_merge_in) {
    pf_guest_memory *mem = two_regions();
    /* Region 1: 130 pages, so 3 words with 2 valid bits in the last. */
    uint64_t bits[3] = {1u, 0, 2u};
    uint64_t too_far[3] = {0, 0, 4u};
    pf_dirty_run runs[4];
    size_t n = 0;

    CHECK_OK(pf_guest_memory_merge_dirty_bitmap(mem, 1, bits, 3));
    CHECK_ERR(pf_guest_memory_merge_dirty_bitmap(mem, 1, bits, 2), PF_ERR_INVALID_ARGUMENT,
              "bitmap");
    CHECK_STATUS(pf_guest_memory_merge_dirty_bitmap(mem, 1, too_far, 3),
                 PF_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(pf_guest_memory_merge_dirty_bitmap(mem, 2, bits, 3), PF_ERR_OUT_OF_RANGE);
    CHECK_STATUS(pf_guest_memory_merge_dirty_bitmap(mem, 1, NULL, 3), PF_ERR_NULL_POINTER);
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 4, &n));
    CHECK_EQ(n, 2);
    CHECK_EQ(runs[0].gpa, 100u * PAGE);
    CHECK_EQ(runs[1].gpa, 229u * PAGE);
    pf_guest_memory_free(mem);
}

TEST(errors_are_typed) {
    pf_guest_memory *mem = two_regions();
    pf_dirty_run run;
    size_t n = 0;
    CHECK_STATUS(pf_guest_memory_set_dirty_tracking(NULL, 0, 1), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_guest_memory_set_dirty_tracking(mem, 2, 1), PF_ERR_OUT_OF_RANGE);
    CHECK_STATUS(pf_guest_memory_harvest_dirty(mem, 0, &run, 1, NULL), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_guest_memory_harvest_dirty(mem, 0, NULL, 1, &n), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_guest_memory_harvest_dirty(mem, 7, &run, 1, &n), PF_ERR_OUT_OF_RANGE);
    CHECK_STATUS(pf_guest_memory_mark_dirty(NULL, 0, 1), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_guest_memory_mark_dirty(mem, 500u * PAGE, 1), PF_ERR_UNMAPPED);
    pf_guest_memory_free(mem);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(writes_are_logged_while_tracking_is_on),
        PF_TEST_CASE(a_small_buffer_gets_the_needed_count_and_loses_nothing),
        PF_TEST_CASE(kvm_bitmaps_merge_in),
        PF_TEST_CASE(errors_are_typed),
    };
    return pf_test_main("dirty", tests, sizeof tests / sizeof tests[0]);
}
