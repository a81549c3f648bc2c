/*
 * The conventions every export follows: ABI version, status names, the
 * thread-local last-error message and its buffer protocol, free(NULL).
 */
#include "pf_test.h"

#include <pthread.h>

TEST(abi_version_matches_header) {
    uint32_t v = pf_abi_version();
    CHECK_EQ(v, PF_ABI_VERSION);
    CHECK_EQ(v >> 16, PF_ABI_VERSION_MAJOR);
    CHECK(((unsigned)v & 0xffffu) >= PF_ABI_VERSION_MINOR);
}

TEST(status_names_cover_every_code) {
    static const struct {
        pf_status status;
        const char *name;
    } codes[] = {
        {PF_OK, "PF_OK"},
        {PF_ERR_NULL_POINTER, "PF_ERR_NULL_POINTER"},
        {PF_ERR_INVALID_ARGUMENT, "PF_ERR_INVALID_ARGUMENT"},
        {PF_ERR_STRUCT_TOO_SMALL, "PF_ERR_STRUCT_TOO_SMALL"},
        {PF_ERR_BUFFER_TOO_SMALL, "PF_ERR_BUFFER_TOO_SMALL"},
        {PF_ERR_OUT_OF_RANGE, "PF_ERR_OUT_OF_RANGE"},
        {PF_ERR_LAYOUT, "PF_ERR_LAYOUT"},
        {PF_ERR_UNMAPPED, "PF_ERR_UNMAPPED"},
        {PF_ERR_MISALIGNED, "PF_ERR_MISALIGNED"},
        {PF_ERR_OVERFLOW, "PF_ERR_OVERFLOW"},
        {PF_ERR_WRITE_PROTECTED, "PF_ERR_WRITE_PROTECTED"},
        {PF_ERR_NO_HUGE_PAGES, "PF_ERR_NO_HUGE_PAGES"},
        {PF_ERR_OS, "PF_ERR_OS"},
        {PF_ERR_PANIC, "PF_ERR_PANIC"},
        {PF_ERR_INTERNAL, "PF_ERR_INTERNAL"},
        {PF_ERR_UNKNOWN_VM, "PF_ERR_UNKNOWN_VM"},
        {PF_ERR_FOREIGN_STORE, "PF_ERR_FOREIGN_STORE"},
        {PF_ERR_USERFAULT, "PF_ERR_USERFAULT"},
        {PF_ERR_BUSY, "PF_ERR_BUSY"},
        {PF_ERR_UNSUPPORTED, "PF_ERR_UNSUPPORTED"},
        {PF_ERR_FAULT, "PF_ERR_FAULT"},
        {PF_ERR_STREAM, "PF_ERR_STREAM"},
        {PF_ERR_CANCELLED, "PF_ERR_CANCELLED"},
        {PF_ERR_MAP_LIMIT, "PF_ERR_MAP_LIMIT"},
        {PF_ERR_SERVICE_REFUSED, "PF_ERR_SERVICE_REFUSED"},
        {PF_ERR_SERVICE_PROTOCOL, "PF_ERR_SERVICE_PROTOCOL"},
        {PF_ERR_SNAPSHOT, "PF_ERR_SNAPSHOT"},
        {PF_ERR_MISMATCH, "PF_ERR_MISMATCH"},
    };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        CHECK_EQ((int64_t)codes[i].status, -(int64_t)i);
        const char *name = pf_status_name(codes[i].status);
        CHECK(name != NULL && strcmp(name, codes[i].name) == 0);
    }
    CHECK(strcmp(pf_status_name(1), "PF_UNKNOWN_STATUS") == 0);
    CHECK(strcmp(pf_status_name(PF_ERR_MISMATCH - 1), "PF_UNKNOWN_STATUS") == 0);
    CHECK(strcmp(pf_status_name(-1000), "PF_UNKNOWN_STATUS") == 0);
    CHECK(strcmp(pf_status_name(INT32_MIN), "PF_UNKNOWN_STATUS") == 0);
}

/* Makes the last error "argument `out_count` is NULL". */
static void fail_with_null(void) {
    pf_region r = pf_test_region(0, 4096);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    CHECK_STATUS(pf_guest_memory_region_count(mem, NULL), PF_ERR_NULL_POINTER);
    pf_guest_memory_free(mem);
}

static const char expected_message[] = "argument `out_count` is NULL";

TEST(last_error_message_buffer_protocol) {
    char buf[128];
    size_t needed = 0;

    fail_with_null();

    /* Size query. */
    CHECK_STATUS(pf_last_error_message(NULL, 0, &needed), PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(needed, sizeof expected_message);

    /* One byte: only the NUL fits. */
    memset(buf, 'x', sizeof buf);
    needed = 0;
    CHECK_STATUS(pf_last_error_message(buf, 1, &needed), PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(needed, sizeof expected_message);
    CHECK(buf[0] == '\0' && buf[1] == 'x');

    /* One byte short: truncated, still terminated, nothing past len. */
    memset(buf, 'x', sizeof buf);
    CHECK_STATUS(pf_last_error_message(buf, sizeof expected_message - 1, &needed),
                 PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(strlen(buf), sizeof expected_message - 2);
    CHECK(strncmp(buf, expected_message, sizeof expected_message - 2) == 0);
    CHECK(buf[sizeof expected_message - 1] == 'x');

    /* Exactly enough. */
    memset(buf, 'x', sizeof buf);
    CHECK_OK(pf_last_error_message(buf, sizeof expected_message, &needed));
    CHECK(strcmp(buf, expected_message) == 0);
    CHECK(buf[sizeof expected_message] == 'x');

    /* Errors of the call itself leave the message alone. */
    CHECK_STATUS(pf_last_error_message(buf, sizeof buf, NULL), PF_ERR_NULL_POINTER);
    CHECK_STATUS(pf_last_error_message(NULL, 5, &needed), PF_ERR_NULL_POINTER);
    CHECK_OK(pf_last_error_message(buf, sizeof buf, &needed));
    CHECK(strcmp(buf, expected_message) == 0);
}

TEST(success_clears_last_error) {
    char buf[64];
    size_t needed = 0;
    pf_region r = pf_test_region(0, 4096);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    size_t count = 0;

    CHECK_STATUS(pf_guest_memory_region_count(mem, NULL), PF_ERR_NULL_POINTER);
    CHECK_OK(pf_guest_memory_region_count(mem, &count));
    memset(buf, 'x', sizeof buf);
    CHECK_OK(pf_last_error_message(buf, sizeof buf, &needed));
    CHECK_EQ(needed, 1);
    CHECK(buf[0] == '\0');
    /* Even a zero-length buffer cannot hold the empty message's NUL. */
    CHECK_STATUS(pf_last_error_message(NULL, 0, &needed), PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(needed, 1);
    pf_guest_memory_free(mem);
}

static void *thread_reads_last_error(void *arg) {
    size_t *needed = (size_t *)arg;
    char buf[8];
    (void)pf_last_error_message(buf, sizeof buf, needed);
    return NULL;
}

TEST(last_error_is_per_thread) {
    pthread_t thread;
    size_t needed_there = 0, needed_here = 0;
    char buf[128];

    fail_with_null();
    CHECK(pthread_create(&thread, NULL, thread_reads_last_error, &needed_there) == 0);
    CHECK(pthread_join(thread, NULL) == 0);
    CHECK_EQ(needed_there, 1);
    CHECK_OK(pf_last_error_message(buf, sizeof buf, &needed_here));
    CHECK(strcmp(buf, expected_message) == 0);
}

TEST(free_accepts_null) {
    pf_guest_memory_free(NULL);
    pf_frame_store_free(NULL);
    pf_dedup_free(NULL);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(abi_version_matches_header),
        PF_TEST_CASE(status_names_cover_every_code),
        PF_TEST_CASE(last_error_message_buffer_protocol),
        PF_TEST_CASE(success_clears_last_error),
        PF_TEST_CASE(last_error_is_per_thread),
        PF_TEST_CASE(free_accepts_null),
    };
    return pf_test_main("conventions", tests, sizeof tests / sizeof tests[0]);
}
