/*
 * The raw-write tracker: writes through the host mapping (as KVM or a device
 * model makes them) are collected into the dirty log.
 *
 * pf-test: needs-userfaultfd (the tracker registers the mappings with a
 * userfaultfd in asynchronous write-protect mode). A test skips only where
 * the tracker is unavailable (PF_ERR_UNSUPPORTED: no userfaultfd under
 * valgrind, or a kernel before 6.7 without WP_ASYNC / PAGEMAP_SCAN).
 */
#include "pf_test.h"

#define PAGE 4096u

/* A tracker on `mem`, or NULL with the test marked skipped when this host
 * cannot run one. */
static pf_raw_write_tracker *tracker_or_skip(const pf_guest_memory *mem, size_t region) {
    pf_raw_write_tracker *t = NULL;
    pf_status s = pf_raw_write_tracker_new(mem, region, &t);
    if (s == PF_ERR_UNSUPPORTED) {
        CHECK(t == NULL);
        static char reason[512];
        snprintf(reason, sizeof reason, "raw-write tracker unavailable: %s",
                 pf_test_last_error());
        pf_test_skip_reason = reason;
        return NULL;
    }
    CHECK_STATUS(s, PF_OK);
    return t;
}

TEST(raw_pointer_writes_are_collected) {
    pf_region r[2];
    r[0] = pf_test_region(0, 64u * PAGE);
    r[1] = pf_test_region(1u << 20, 32u * PAGE);
    pf_guest_memory *mem = pf_test_memory(r, 2);
    pf_raw_write_tracker *t = tracker_or_skip(mem, PF_ALL_REGIONS);
    if (t == NULL) {
        pf_guest_memory_free(mem);
        return;
    }
    uint64_t host = 0, host1 = 0, found = 99;
    CHECK_OK(pf_guest_memory_host_address(mem, 0, &host));
    pf_region_info info = pf_test_info();
    CHECK_OK(pf_guest_memory_region_info(mem, 1, &info));
    host1 = info.host_addr;

    /* Nothing written yet. */
    CHECK_OK(pf_raw_write_tracker_collect(t, &found));
    CHECK_EQ(found, 0);

    uint8_t *p = (uint8_t *)(uintptr_t)host;
    uint8_t *p1 = (uint8_t *)(uintptr_t)host1;
    p[3u * PAGE + 5] = 1;
    p[10u * PAGE] = 2;
    p[11u * PAGE + PAGE - 1] = 3;
    p1[4u * PAGE] = 4;
    CHECK_OK(pf_raw_write_tracker_collect(t, &found));
    CHECK_EQ(found, 4);

    pf_dirty_run runs[8];
    size_t n = 0;
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 8, &n));
    CHECK_EQ(n, 3);
    CHECK_EQ(runs[0].gpa, 3u * PAGE);
    CHECK_EQ(runs[0].pages, 1);
    CHECK_EQ(runs[1].gpa, 10u * PAGE);
    CHECK_EQ(runs[1].pages, 2);
    CHECK_EQ(runs[2].gpa, (1u << 20) + 4u * PAGE);
    CHECK_EQ(runs[2].pages, 1);

    /* Re-protected: nothing new until written again. */
    CHECK_OK(pf_raw_write_tracker_collect(t, &found));
    CHECK_EQ(found, 0);
    p[3u * PAGE] = 9;
    CHECK_OK(pf_raw_write_tracker_collect(t, NULL));
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, 8, &n));
    CHECK_EQ(n, 1);
    CHECK_EQ(runs[0].gpa, 3u * PAGE);

    /* The bytes went through. */
    uint8_t b = 0;
    CHECK_OK(pf_guest_memory_read(mem, 3u * PAGE, &b, 1));
    CHECK_EQ(b, 9);

    /* One tracker per memory. */
    pf_raw_write_tracker *second = NULL;
    CHECK_STATUS(pf_raw_write_tracker_new(mem, 0, &second), PF_ERR_INVALID_ARGUMENT);
    CHECK(second == NULL);
    pf_raw_write_tracker_free(t);

    /* After free: writes go on unprotected; a new tracker may start. */
    p[20u * PAGE] = 5;
    t = tracker_or_skip(mem, 1);
    CHECK(t != NULL);
    pf_raw_write_tracker_free(t);
    pf_guest_memory_free(mem);
}

TEST(argument_errors) {
    pf_region r = pf_test_region(0, 16u * PAGE);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    pf_raw_write_tracker *t = NULL;
    CHECK_ERR(pf_raw_write_tracker_new(NULL, 0, &t), PF_ERR_NULL_POINTER, "mem");
    CHECK_ERR(pf_raw_write_tracker_new(mem, 0, NULL), PF_ERR_NULL_POINTER, "out_tracker");
    CHECK_STATUS(pf_raw_write_tracker_new(mem, 3, &t), PF_ERR_OUT_OF_RANGE);
    CHECK(t == NULL);
    CHECK_ERR(pf_raw_write_tracker_collect(NULL, NULL), PF_ERR_NULL_POINTER, "tracker");
    pf_raw_write_tracker_free(NULL);
    pf_guest_memory_free(mem);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(raw_pointer_writes_are_collected),
        PF_TEST_CASE(argument_errors),
    };
    return pf_test_main("raw_write_tracker", tests, sizeof tests / sizeof tests[0]);
}
