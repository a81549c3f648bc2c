/*
 * Live migration over a file descriptor: a memfd (send, rewind, receive)
 * and a pipe with the sender in a thread; every byte compared on the
 * receiver; the progress callback; cancel by callback, by call and by token;
 * a corrupted, truncated or foreign stream gives PF_ERR_STREAM and no
 * memory; NULL and struct-size errors.
 */
#include "pf_test.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096u

/* Two regions with a hole: 96 pages at 0 and 64 pages at 1 MiB. */
static pf_guest_memory *source_memory(void) {
    pf_region r[2];
    r[0] = pf_test_region(0, 96u * PAGE);
    r[1] = pf_test_region(1u << 20, 64u * PAGE);
    pf_guest_memory *mem = pf_test_memory(r, 2);
    uint8_t page[PAGE];
    /* Distinct pages, duplicates (pages 40..49 hold page 0's content), and
     * zero pages left alone. */
    for (unsigned i = 0; i < 96; i += 3) {
        for (unsigned j = 0; j < PAGE; j++) page[j] = (uint8_t)(i * 7 + j * 13 + (j >> 8));
        CHECK_OK(pf_guest_memory_write(mem, (uint64_t)i * PAGE, page, PAGE));
    }
    for (unsigned j = 0; j < PAGE; j++) page[j] = (uint8_t)(j * 13 + (j >> 8));
    for (unsigned i = 40; i < 50; i++)
        CHECK_OK(pf_guest_memory_write(mem, (uint64_t)i * PAGE, page, PAGE));
    for (unsigned i = 0; i < 64; i += 5) {
        memset(page, (int)(0x40 + i), PAGE);
        CHECK_OK(pf_guest_memory_write(mem, (1u << 20) + (uint64_t)i * PAGE, page, PAGE));
    }
    return mem;
}

/* Every region and byte of `a` equal in `b`. */
static void check_same_memory(const pf_guest_memory *a, const pf_guest_memory *b) {
    size_t na = 0, nb = 0;
    CHECK_OK(pf_guest_memory_region_count(a, &na));
    CHECK_OK(pf_guest_memory_region_count(b, &nb));
    CHECK_EQ(na, nb);
    static uint8_t ba[16 * PAGE], bb[16 * PAGE];
    for (size_t i = 0; i < na && i < nb; i++) {
        pf_region_info ia = pf_test_info(), ib = pf_test_info();
        CHECK_OK(pf_guest_memory_region_info(a, i, &ia));
        CHECK_OK(pf_guest_memory_region_info(b, i, &ib));
        CHECK_EQ(ia.guest_start, ib.guest_start);
        CHECK_EQ(ia.size, ib.size);
        for (uint64_t off = 0; off < ia.size; off += sizeof ba) {
            size_t len = (size_t)(ia.size - off < sizeof ba ? ia.size - off : sizeof ba);
            CHECK_OK(pf_guest_memory_read(a, ia.guest_start + off, ba, len));
            CHECK_OK(pf_guest_memory_read(b, ia.guest_start + off, bb, len));
            if (memcmp(ba, bb, len) != 0) {
                PF_FAIL_AT("bytes differ in [%#" PRIx64 ", +%zu)", ia.guest_start + off, len);
                return;
            }
        }
    }
}

static pf_migration_options options(void) {
    pf_migration_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    return o;
}

typedef struct progress_log {
    int calls;
    int64_t last_round;
    int rounds_increase;
    int cancel_at_call; /* return nonzero on this call (1-based), 0: never */
    uint64_t last_bytes;
} progress_log;

static int on_progress(const pf_migration_progress *p, void *user) {
    progress_log *log = (progress_log *)user;
    log->calls++;
    if ((int64_t)p->round <= log->last_round) log->rounds_increase = 0;
    log->last_round = p->round;
    if (p->struct_size < sizeof *p || p->bytes < log->last_bytes) log->rounds_increase = 0;
    log->last_bytes = p->bytes;
    return log->cancel_at_call != 0 && log->calls >= log->cancel_at_call;
}

static progress_log new_log(int cancel_at_call) {
    progress_log log;
    memset(&log, 0, sizeof log);
    log.last_round = -1;
    log.rounds_increase = 1;
    log.cancel_at_call = cancel_at_call;
    return log;
}

static int new_memfd(void) {
    int fd = memfd_create("pf-migration-test", MFD_CLOEXEC);
    CHECK(fd >= 0);
    return fd;
}

/* Migrates `mem` into `fd` with `o`, dirtying a page between iterate and
 * finish. */
static void send_all(const pf_guest_memory *mem, int fd, const pf_migration_options *o,
                     progress_log *log, pf_migration_summary *summary) {
    pf_migration_sender *s = NULL;
    pf_migration_progress p;
    memset(&p, 0, sizeof p);
    p.struct_size = sizeof p;
    CHECK_OK(pf_migration_sender_start(mem, fd, o, on_progress, log, &s));
    CHECK(s != NULL);
    CHECK_OK(pf_migration_sender_iterate(s, &p));
    CHECK_EQ(p.struct_size, sizeof p);
    CHECK(p.bytes > 0);
    /* "Paused": a write after the last round goes out with finish. */
    uint64_t v = 0x1122334455667788u;
    CHECK_OK(pf_guest_memory_write(mem, 7u * PAGE + 8, &v, sizeof v));
    CHECK_OK(pf_migration_sender_finish(s, summary));
}

TEST(migrates_through_a_memfd_byte_for_byte) {
    pf_guest_memory *mem = source_memory();
    int fd = new_memfd();
    pf_migration_options o = options();
    o.max_rounds = 3;
    progress_log log = new_log(0);
    pf_migration_summary sum;
    memset(&sum, 0, sizeof sum);
    sum.struct_size = sizeof sum;
    send_all(mem, fd, &o, &log, &sum);
    CHECK(log.calls >= 1);
    CHECK(log.rounds_increase);
    CHECK_EQ(log.last_round, (uint64_t)log.calls - 1);
    CHECK(sum.rounds >= 2);
    CHECK(sum.last_round_pages >= 1);
    CHECK(sum.ref_pages >= 9); /* the duplicates travel as references */
    CHECK(sum.bytes > 0 && sum.bytes < 96u * PAGE);

    off_t end = lseek(fd, 0, SEEK_CUR);
    CHECK_EQ((uint64_t)end, sum.bytes);
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    pf_guest_memory *got = NULL;
    pf_migration_received st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    CHECK_OK(pf_migration_receive(fd, NULL, &got, &st));
    CHECK(got != NULL);
    if (got != NULL) check_same_memory(mem, got);
    CHECK_EQ(st.bytes, sum.bytes);
    CHECK_EQ(st.verified, 1);
    CHECK_EQ(st.rounds, sum.rounds);
    CHECK_EQ(st.ref_pages, sum.ref_pages);
    uint64_t v = 0;
    CHECK_OK(pf_guest_memory_load_u64(got, 7u * PAGE + 8, &v));
    CHECK_EQ(v, 0x1122334455667788u);

    /* The descriptor was not closed by either end. */
    CHECK(close(fd) == 0);
    pf_guest_memory_free(got);
    pf_guest_memory_free(mem);
}

typedef struct pipe_job {
    const pf_guest_memory *mem;
    int fd;
    pf_status status;
} pipe_job;

static void *send_thread(void *arg) {
    pipe_job *job = (pipe_job *)arg;
    pf_migration_sender *s = NULL;
    pf_migration_options o = options();
    o.flags = PF_MIGRATION_NO_VERIFY;
    o.bandwidth_limit = 64u << 20;
    job->status = pf_migration_sender_start(job->mem, job->fd, &o, NULL, NULL, &s);
    if (job->status == PF_OK) job->status = pf_migration_sender_iterate(s, NULL);
    if (job->status == PF_OK) job->status = pf_migration_sender_finish(s, NULL);
    else pf_migration_sender_free(s);
    return NULL;
}

TEST(migrates_through_a_pipe_with_the_sender_in_a_thread) {
    pf_guest_memory *mem = source_memory();
    int fds[2];
    CHECK(pipe(fds) == 0);
    pipe_job job;
    job.mem = mem;
    job.fd = fds[1];
    job.status = PF_ERR_INTERNAL;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, send_thread, &job) == 0);
    pf_guest_memory *got = NULL;
    pf_migration_limits limits;
    memset(&limits, 0, sizeof limits);
    limits.struct_size = sizeof limits;
    limits.max_guest_bytes = 1u << 30;
    CHECK_OK(pf_migration_receive(fds[0], &limits, &got, NULL));
    CHECK(pthread_join(t, NULL) == 0);
    CHECK_OK(job.status);
    if (got != NULL) check_same_memory(mem, got);
    close(fds[0]);
    close(fds[1]);
    pf_guest_memory_free(got);
    pf_guest_memory_free(mem);
}

TEST(a_callback_returning_nonzero_cancels) {
    pf_guest_memory *mem = source_memory();
    int fd = new_memfd();
    pf_migration_sender *s = NULL;
    progress_log log = new_log(1);
    CHECK_OK(pf_migration_sender_start(mem, fd, NULL, on_progress, &log, &s));
    CHECK_ERR(pf_migration_sender_iterate(s, NULL), PF_ERR_CANCELLED, "cancelled");
    CHECK_EQ(log.calls, 1);
    /* Spent: refuses further use; finish releases it all the same. */
    CHECK_ERR(pf_migration_sender_iterate(s, NULL), PF_ERR_INVALID_ARGUMENT, "start a new one");
    CHECK_STATUS(pf_migration_sender_finish(s, NULL), PF_ERR_INVALID_ARGUMENT);

    /* The incomplete stream is refused by a receiver. */
    pf_guest_memory *got = NULL;
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    CHECK_ERR(pf_migration_receive(fd, NULL, &got, NULL), PF_ERR_STREAM, "truncated");
    CHECK(got == NULL);

    /* Dirty tracking was put back (off): a write is not logged. */
    uint8_t b = 1;
    pf_dirty_run run;
    size_t n = 9;
    CHECK_OK(pf_guest_memory_write(mem, 0, &b, 1));
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, &run, 1, &n));
    CHECK_EQ(n, 0);
    close(fd);
    pf_guest_memory_free(mem);
}

TEST(cancel_by_call_and_by_token) {
    pf_guest_memory *mem = source_memory();
    int fd = new_memfd();
    pf_migration_sender *s = NULL;
    CHECK_OK(pf_migration_sender_start(mem, fd, NULL, NULL, NULL, &s));
    CHECK_OK(pf_migration_sender_cancel(s));
    CHECK_STATUS(pf_migration_sender_iterate(s, NULL), PF_ERR_CANCELLED);
    pf_migration_sender_free(s);

    s = NULL;
    pf_migration_cancel_token *token = NULL;
    CHECK_OK(pf_migration_sender_start(mem, fd, NULL, NULL, NULL, &s));
    CHECK_OK(pf_migration_sender_cancel_token(s, &token));
    CHECK(token != NULL);
    CHECK_OK(pf_migration_cancel_token_cancel(token));
    CHECK_STATUS(pf_migration_sender_finish(s, NULL), PF_ERR_CANCELLED);
    /* The token outlives its sender. */
    CHECK_OK(pf_migration_cancel_token_cancel(token));
    pf_migration_cancel_token_free(token);
    pf_migration_cancel_token_free(NULL);
    close(fd);
    pf_guest_memory_free(mem);
}

TEST(a_damaged_stream_gives_the_stream_error_and_no_memory) {
    pf_guest_memory *mem = source_memory();
    int fd = new_memfd();
    pf_migration_summary sum;
    memset(&sum, 0, sizeof sum);
    sum.struct_size = sizeof sum;
    pf_migration_options o = options();
    progress_log log = new_log(0);
    send_all(mem, fd, &o, &log, &sum);

    /* One byte flipped in the middle: a chunk fails its checksum. */
    uint8_t b = 0;
    off_t mid = (off_t)(sum.bytes / 2);
    CHECK(pread(fd, &b, 1, mid) == 1);
    b ^= 0x20;
    CHECK(pwrite(fd, &b, 1, mid) == 1);
    pf_guest_memory *got = NULL;
    pf_migration_received st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    CHECK_ERR(pf_migration_receive(fd, NULL, &got, &st), PF_ERR_STREAM, "corrupt");
    CHECK(got == NULL);
    CHECK_EQ(st.bytes, 0); /* untouched */
    b ^= 0x20;
    CHECK(pwrite(fd, &b, 1, mid) == 1);

    /* Cut short. */
    CHECK(ftruncate(fd, (off_t)(sum.bytes - 10)) == 0);
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    CHECK_ERR(pf_migration_receive(fd, NULL, &got, NULL), PF_ERR_STREAM, "truncated");
    CHECK(got == NULL);

    /* Over the receiver's limits. */
    pf_migration_limits limits;
    memset(&limits, 0, sizeof limits);
    limits.struct_size = sizeof limits;
    limits.max_guest_bytes = 64u * PAGE;
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    CHECK_ERR(pf_migration_receive(fd, &limits, &got, NULL), PF_ERR_STREAM, "at most");
    CHECK(got == NULL);

    /* Not a stream at all. */
    int other = new_memfd();
    CHECK(write(other, "hello, this is not a migration stream", 38) == 38);
    CHECK(lseek(other, 0, SEEK_SET) == 0);
    CHECK_ERR(pf_migration_receive(other, NULL, &got, NULL), PF_ERR_STREAM, "not a pagefold");
    CHECK(got == NULL);
    close(other);
    close(fd);
    pf_guest_memory_free(mem);
}

TEST(argument_errors) {
    pf_guest_memory *mem = source_memory();
    int fd = new_memfd();
    pf_migration_sender *s = NULL;
    pf_migration_options o = options();

    CHECK_ERR(pf_migration_sender_start(NULL, fd, NULL, NULL, NULL, &s), PF_ERR_NULL_POINTER,
              "mem");
    CHECK_ERR(pf_migration_sender_start(mem, fd, NULL, NULL, NULL, NULL), PF_ERR_NULL_POINTER,
              "out_sender");
    CHECK_ERR(pf_migration_sender_start(mem, -1, NULL, NULL, NULL, &s), PF_ERR_INVALID_ARGUMENT,
              "not an open file descriptor");
    o.struct_size = sizeof o - 1;
    CHECK_ERR(pf_migration_sender_start(mem, fd, &o, NULL, NULL, &s), PF_ERR_STRUCT_TOO_SMALL,
              "pf_migration_options");
    o = options();
    o.flags = 0x80;
    CHECK_ERR(pf_migration_sender_start(mem, fd, &o, NULL, NULL, &s), PF_ERR_INVALID_ARGUMENT,
              "flags");
    CHECK(s == NULL);
    /* A larger struct (a newer caller) is accepted. */
    struct {
        pf_migration_options o;
        uint64_t newer;
    } big;
    memset(&big, 0, sizeof big);
    big.o.struct_size = sizeof big;
    CHECK_OK(pf_migration_sender_start(mem, fd, &big.o, NULL, NULL, &s));

    pf_migration_progress p;
    memset(&p, 0, sizeof p);
    p.struct_size = 8;
    CHECK_ERR(pf_migration_sender_iterate(s, &p), PF_ERR_STRUCT_TOO_SMALL, "out_progress");
    CHECK_ERR(pf_migration_sender_iterate(NULL, NULL), PF_ERR_NULL_POINTER, "sender");
    CHECK_ERR(pf_migration_sender_cancel(NULL), PF_ERR_NULL_POINTER, "sender");
    CHECK_ERR(pf_migration_sender_cancel_token(s, NULL), PF_ERR_NULL_POINTER, "out_token");
    CHECK_ERR(pf_migration_cancel_token_cancel(NULL), PF_ERR_NULL_POINTER, "token");
    CHECK_ERR(pf_migration_sender_finish(NULL, NULL), PF_ERR_NULL_POINTER, "sender");
    /* A too-small summary: refused, and the sender is released anyway. */
    pf_migration_summary sum;
    memset(&sum, 0, sizeof sum);
    sum.struct_size = 4;
    CHECK_ERR(pf_migration_sender_finish(s, &sum), PF_ERR_STRUCT_TOO_SMALL,
              "pf_migration_summary");
    pf_migration_sender_free(NULL);

    pf_guest_memory *got = NULL;
    pf_migration_limits limits;
    memset(&limits, 0, sizeof limits);
    limits.struct_size = 2;
    pf_migration_received st;
    memset(&st, 0, sizeof st);
    st.struct_size = 1;
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    CHECK_ERR(pf_migration_receive(fd, NULL, NULL, NULL), PF_ERR_NULL_POINTER, "out_mem");
    CHECK_ERR(pf_migration_receive(fd, &limits, &got, NULL), PF_ERR_STRUCT_TOO_SMALL,
              "pf_migration_limits");
    CHECK_ERR(pf_migration_receive(fd, NULL, &got, &st), PF_ERR_STRUCT_TOO_SMALL,
              "pf_migration_received");
    CHECK_ERR(pf_migration_receive(-5, NULL, &got, NULL), PF_ERR_INVALID_ARGUMENT,
              "not an open file descriptor");
    CHECK(got == NULL);
    close(fd);
    pf_guest_memory_free(mem);
}

/* The sender keeps the memory alive after its handle is freed, through
 * iterate and finish, on finish's error path too (valgrind runs of this
 * test catch a use after free; a review found one in finish). */
TEST(the_sender_keeps_a_freed_memory_alive_to_the_end) {
    for (int too_small = 0; too_small < 2; too_small++) {
        pf_guest_memory *mem = source_memory();
        int fd = new_memfd();
        pf_migration_sender *s = NULL;
        CHECK_OK(pf_migration_sender_start(mem, fd, NULL, NULL, NULL, &s));
        pf_guest_memory_free(mem);
        CHECK_OK(pf_migration_sender_iterate(s, NULL));
        pf_migration_summary sum;
        memset(&sum, 0, sizeof sum);
        sum.struct_size = too_small ? 8 : sizeof sum;
        if (too_small) {
            CHECK_ERR(pf_migration_sender_finish(s, &sum), PF_ERR_STRUCT_TOO_SMALL,
                      "pf_migration_summary");
        } else {
            CHECK_OK(pf_migration_sender_finish(s, &sum));
            CHECK(sum.bytes > 0);
        }
        close(fd);
    }
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(the_sender_keeps_a_freed_memory_alive_to_the_end),
        PF_TEST_CASE(migrates_through_a_memfd_byte_for_byte),
        PF_TEST_CASE(migrates_through_a_pipe_with_the_sender_in_a_thread),
        PF_TEST_CASE(a_callback_returning_nonzero_cancels),
        PF_TEST_CASE(cancel_by_call_and_by_token),
        PF_TEST_CASE(a_damaged_stream_gives_the_stream_error_and_no_memory),
        PF_TEST_CASE(argument_errors),
    };
    return pf_test_main("migration", tests, sizeof tests / sizeof tests[0]);
}
