/*
 * A minimal test harness for the C tests of libpagefold. Each test file
 * defines TEST functions, lists them in a pf_test_case array and calls
 * pf_test_main. Output: one "ok"/"FAIL"/"skip" line per test and a summary
 * line "# <suite>: N passed, M failed" (with ", K skipped" appended when
 * tests were skipped) that run.sh adds up. Exit status 0 when every test
 * passed or was skipped, 2 otherwise (valgrind reports its own errors as 1).
 *
 * A test is skipped only where run.sh says so: PF_TEST_NO_USERFAULTFD=1
 * means the binary runs under a tool (valgrind) that does not implement
 * userfaultfd, so tests that need a dedup host cannot run there (run.sh
 * runs them natively as well). Without it, no test skips.
 *
 * Compiles as C11 and as C++17, warning-free with -Wall -Wextra.
 */
#ifndef PF_TEST_H
#define PF_TEST_H

/* POSIX and Linux interfaces (pread, memfd fds, ...) under -std=c11; g++
 * defines it already. Test files include this header first. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pagefold.h"

/* Checks that failed in the running test. */
static int pf_test_failures;
/* Why the running test was skipped, or NULL. */
static const char *pf_test_skip_reason;

/* This thread's last error message (static buffer; for diagnostics). */
static inline const char *pf_test_last_error(void) {
    static char buf[1024];
    size_t needed = 0;
    buf[0] = '\0';
    (void)pf_last_error_message(buf, sizeof buf, &needed);
    return buf;
}

#define PF_FAIL_AT(...)                                                      \
    do {                                                                     \
        fprintf(stderr, "  %s:%d: ", __FILE__, __LINE__);                    \
        fprintf(stderr, __VA_ARGS__);                                        \
        fputc('\n', stderr);                                                 \
        pf_test_failures++;                                                  \
    } while (0)

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) PF_FAIL_AT("check failed: %s", #cond);                  \
    } while (0)

#define CHECK_EQ(a, b)                                                       \
    do {                                                                     \
        uint64_t a_ = (uint64_t)(a), b_ = (uint64_t)(b);                     \
        if (a_ != b_)                                                        \
            PF_FAIL_AT("%s == %s failed: 0x%" PRIx64 " != 0x%" PRIx64, #a,  \
                       #b, a_, b_);                                          \
    } while (0)

/* `call` returns `want`; on a mismatch prints both names and the message. */
#define CHECK_STATUS(call, want)                                             \
    do {                                                                     \
        pf_status got_ = (call);                                             \
        if (got_ != (want))                                                  \
            PF_FAIL_AT("%s\n    returned %s, expected %s; last error: %s",   \
                       #call, pf_status_name(got_), pf_status_name(want),    \
                       pf_test_last_error());                                \
    } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, PF_OK)

/* `call` fails with `want` and leaves a message containing `needle`. */
#define CHECK_ERR(call, want, needle)                                        \
    do {                                                                     \
        CHECK_STATUS(call, want);                                            \
        if (strstr(pf_test_last_error(), (needle)) == NULL)                  \
            PF_FAIL_AT("message of %s lacks \"%s\": \"%s\"", #call,          \
                       (needle), pf_test_last_error());                      \
    } while (0)

#define TEST(name) static void name(void)

typedef struct pf_test_case {
    const char *name;
    void (*fn)(void);
} pf_test_case;

#define PF_TEST_CASE(name) { #name, name }

static inline int pf_test_main(const char *suite, const pf_test_case *tests, size_t count) {
    int passed = 0, failed = 0, skipped = 0;
    for (size_t i = 0; i < count; i++) {
        pf_test_failures = 0;
        pf_test_skip_reason = NULL;
        tests[i].fn();
        if (pf_test_failures == 0 && pf_test_skip_reason != NULL) {
            printf("skip %s.%s: %s\n", suite, tests[i].name, pf_test_skip_reason);
            skipped++;
        } else if (pf_test_failures == 0) {
            printf("ok   %s.%s\n", suite, tests[i].name);
            passed++;
        } else {
            printf("FAIL %s.%s (%d checks failed)\n", suite, tests[i].name, pf_test_failures);
            failed++;
        }
        fflush(stdout);
    }
    if (skipped == 0)
        printf("# %s: %d passed, %d failed\n", suite, passed, failed);
    else
        printf("# %s: %d passed, %d failed, %d skipped\n", suite, passed, failed, skipped);
    return failed == 0 ? 0 : 2;
}

/* ---- helpers shared by the test files ---- */

/* Guest memory with the given layout and default options, or NULL. */
static inline pf_guest_memory *pf_test_memory(const pf_region *regions, size_t count) {
    pf_guest_memory *mem = NULL;
    CHECK_OK(pf_guest_memory_new(regions, count, NULL, &mem));
    CHECK(mem != NULL);
    return mem;
}

static inline pf_region pf_test_region(uint64_t guest_start, uint64_t size) {
    pf_region r;
    r.guest_start = guest_start;
    r.size = size;
    return r;
}

static inline pf_memory_options pf_test_options(void) {
    pf_memory_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    return o;
}

static inline pf_region_info pf_test_info(void) {
    pf_region_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    return info;
}

static inline pf_page_census pf_test_census(void) {
    pf_page_census census;
    memset(&census, 0, sizeof census);
    census.struct_size = sizeof census;
    return census;
}

/* Whether run.sh runs this binary where userfaultfd does not exist. */
static inline int pf_test_no_userfaultfd(void) {
    const char *v = getenv("PF_TEST_NO_USERFAULTFD");
    return v != NULL && strcmp(v, "1") == 0;
}

/* A dedup host on `store` with `options`. NULL if that failed (a failed
 * check), or if userfaultfd is missing where run.sh said it would be: then
 * the call must have failed with PF_ERR_USERFAULT, and the test is marked
 * skipped. Tests call this before they make anything they must free. */
static inline pf_dedup *pf_test_dedup(const pf_frame_store *store,
                                      const pf_dedup_options *options) {
    pf_dedup *dedup = NULL;
    pf_status s = pf_dedup_new(store, options, &dedup);
    if (s == PF_ERR_USERFAULT && pf_test_no_userfaultfd()) {
        CHECK(dedup == NULL);
        CHECK(strstr(pf_test_last_error(), "userfaultfd") != NULL);
        pf_test_skip_reason = "needs userfaultfd (PF_TEST_NO_USERFAULTFD=1)";
        return NULL;
    }
    CHECK_STATUS(s, PF_OK);
    CHECK((s == PF_OK) == (dedup != NULL));
    return dedup;
}

#endif /* PF_TEST_H */
