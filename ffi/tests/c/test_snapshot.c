/*
 * Snapshots through the C API: save (full, incremental, with device
 * state), open (one file, a chain), the accessors, and every restore: by
 * copy, folded into a dedup host (two clones sharing frames), lazily, and
 * lazily folded on arrival; every byte checked. Bad input (NULL, absurd
 * options, damaged, truncated, foreign and missing files, a wrong layout
 * or chain) gives its status and message, never a crash.
 *
 * pf-test: needs-userfaultfd
 * (run.sh runs this file natively as well as under valgrind, which lacks
 * userfaultfd: there the tests that need a dedup host or a lazy restore
 * report "skip" after checking that the call failed with PF_ERR_USERFAULT.)
 */
#include "pf_test.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define PAGE 4096ull
#define A_PAGES 48u /* region A: pages [0, 48) at 0 */
#define B_START 0x100000ull
#define B_PAGES 16u /* region B: pages [48, 64) at 1 MiB */
#define PAGES (A_PAGES + B_PAGES)
/* Page p: zero if p % 4 == 0, one content repeated if p % 4 == 1, else a
 * content of its own. */
#define ZERO_PAGES (PAGES / 4)
#define CONTENT_PAGES (PAGES - ZERO_PAGES)
#define DISTINCT (1u + PAGES / 2)

static char dir[64];

static uint64_t gpa_of(unsigned p) {
    return p < A_PAGES ? p * PAGE : B_START + (p - A_PAGES) * PAGE;
}

/* Pages an incremental snapshot's generation 1 changed since generation 0
 * (page 4 was zero). */
static int changed(unsigned p) {
    return p % 8 == 2 || p == 4;
}

static void content(unsigned gen, unsigned p, uint8_t *buf) {
    uint64_t words[PAGE / 8];
    for (unsigned k = 0; k < PAGE / 8; k++) {
        if (gen == 1 && changed(p))
            words[k] = 0xc0ffee0000000000ull + (uint64_t)p * 512u + k;
        else if (p % 4 == 0)
            words[k] = 0;
        else if (p % 4 == 1)
            words[k] = 0x5151515100000000ull + k;
        else
            words[k] = ((uint64_t)p << 32) + k + 1;
    }
    memcpy(buf, words, PAGE);
}

static void layout(pf_region r[2]) {
    r[0] = pf_test_region(0, A_PAGES * PAGE);
    r[1] = pf_test_region(B_START, B_PAGES * PAGE);
}

/* Fresh memory of the snapshots' layout (nothing written). */
static pf_guest_memory *fresh_memory(void) {
    pf_region r[2];
    layout(r);
    return pf_test_memory(r, 2);
}

static void fill(const pf_guest_memory *mem, unsigned gen) {
    uint8_t buf[PAGE];
    for (unsigned p = 0; p < PAGES; p++) {
        content(gen, p, buf);
        CHECK_OK(pf_guest_memory_write(mem, gpa_of(p), buf, PAGE));
    }
}

/* Memory of generation `gen`, every page written (zero pages too). */
static pf_guest_memory *filled_memory(unsigned gen) {
    pf_guest_memory *mem = fresh_memory();
    if (mem != NULL) fill(mem, gen);
    return mem;
}

/* Every page of `mem` reads as generation `gen`. */
static void check_memory(const pf_guest_memory *mem, unsigned gen) {
    uint8_t want[PAGE], got[PAGE];
    unsigned bad = 0;
    for (unsigned p = 0; p < PAGES; p++) {
        content(gen, p, want);
        CHECK_OK(pf_guest_memory_read(mem, gpa_of(p), got, PAGE));
        if (memcmp(want, got, PAGE) != 0 && bad++ < 4)
            PF_FAIL_AT("page %u (gpa 0x%" PRIx64 ") differs from generation %u", p, gpa_of(p), gen);
    }
}

/* `dir`/`name` into `out`. */
static const char *path_of(char *out, size_t len, const char *name) {
    snprintf(out, len, "%s/%s", dir, name);
    return out;
}

static pf_save_options save_options(void) {
    pf_save_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    return o;
}

static pf_save_stats save_stats(void) {
    pf_save_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    return s;
}

static pf_snapshot_info info_of(const pf_snapshot *snap) {
    pf_snapshot_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_OK(pf_snapshot_get_info(snap, &info));
    return info;
}

static pf_lazy_options lazy_options(void) {
    pf_lazy_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    return o;
}

static pf_lazy_stats lazy_stats(void) {
    pf_lazy_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    return s;
}

static const uint8_t device_bytes[] = {'v', 'i', 'r', 't', 'i', 'o', 0, 1, 2, 0xff, 'q'};

/* Saves generation 0 at `dir`/`name`, with the device state above. */
static void save_gen0(const char *name, pf_save_stats *stats) {
    char path[128];
    pf_guest_memory *mem = filled_memory(0);
    pf_save_options o = save_options();
    o.flags = PF_SAVE_DEVICE_STATE;
    o.device_state = device_bytes;
    o.device_state_len = sizeof device_bytes;
    CHECK_OK(pf_snapshot_save(mem, path_of(path, sizeof path, name), &o, stats));
    pf_guest_memory_free(mem);
}

static pf_snapshot *open_snap(const char *name) {
    char path[128];
    pf_snapshot *snap = NULL;
    CHECK_OK(pf_snapshot_open(path_of(path, sizeof path, name), &snap));
    CHECK(snap != NULL);
    return snap;
}

static pf_frame_store *new_store(void) {
    pf_frame_store *store = NULL;
    CHECK_OK(pf_frame_store_new(NULL, &store));
    return store;
}

/* Whether a lazy restore that returned `s` cannot run here because run.sh
 * runs this binary without userfaultfd (then the test is skipped). */
static int no_lazy_here(pf_status s) {
    if (s == PF_ERR_USERFAULT && pf_test_no_userfaultfd()) {
        CHECK(strstr(pf_test_last_error(), "userfaultfd") != NULL);
        pf_test_skip_reason = "needs userfaultfd (PF_TEST_NO_USERFAULTFD=1)";
        return 1;
    }
    return 0;
}

static void flip_byte(const char *path, off_t at) {
    int fd = open(path, O_RDWR);
    uint8_t b = 0;
    CHECK(fd >= 0);
    if (fd < 0) return;
    CHECK(pread(fd, &b, 1, at) == 1);
    b ^= 0x5a;
    CHECK(pwrite(fd, &b, 1, at) == 1);
    close(fd);
}

static void copy_file(const char *from, const char *to) {
    uint8_t buf[8192];
    int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ssize_t n;
    CHECK(in >= 0 && out >= 0);
    while (in >= 0 && out >= 0 && (n = read(in, buf, sizeof buf)) > 0)
        CHECK(write(out, buf, (size_t)n) == n);
    if (in >= 0) close(in);
    if (out >= 0) close(out);
}

static uint64_t file_size(const char *path) {
    struct stat st;
    CHECK(stat(path, &st) == 0);
    return (uint64_t)st.st_size;
}

TEST(save_open_and_restore_by_copy) {
    char path[128];
    pf_save_stats st = save_stats();
    save_gen0("full", &st);
    CHECK_EQ(st.struct_size, sizeof st);
    CHECK_EQ(st.pages, PAGES);
    CHECK_EQ(st.zero_pages, ZERO_PAGES);
    CHECK_EQ(st.stored_pages, DISTINCT);
    CHECK_EQ(st.duplicate_pages, PAGES / 4 - 1);
    CHECK_EQ(st.parent_pages, 0);
    CHECK_EQ(st.file_bytes, file_size(path_of(path, sizeof path, "full")));

    pf_snapshot *snap = open_snap("full");
    pf_snapshot_info info = info_of(snap);
    CHECK_EQ(info.struct_size, sizeof info);
    CHECK(memcmp(info.id, st.id, sizeof info.id) == 0);
    static const uint8_t zeros[32] = {0};
    CHECK(memcmp(info.parent_id, zeros, sizeof zeros) == 0);
    CHECK_EQ(info.pages, PAGES);
    CHECK_EQ(info.stored_pages, DISTINCT);
    CHECK_EQ(info.file_bytes, st.file_bytes);
    CHECK_EQ(info.region_count, 2);
    CHECK_EQ(info.vcpu_count, 0);
    CHECK_EQ(info.flags, PF_SNAPSHOT_DEVICE_STATE);
    CHECK_EQ(info.device_state_len, sizeof device_bytes);

    /* Regions: ask, too small, then all. */
    pf_region r[3];
    size_t count = 99;
    memset(r, 0xee, sizeof r);
    CHECK_ERR(pf_snapshot_regions(snap, NULL, 0, &count), PF_ERR_BUFFER_TOO_SMALL,
              "2 regions do not fit");
    CHECK_EQ(count, 2);
    CHECK_STATUS(pf_snapshot_regions(snap, r, 1, &count), PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(r[0].size, 0xeeeeeeeeeeeeeeeeull); /* nothing written */
    CHECK_OK(pf_snapshot_regions(snap, r, 3, &count));
    CHECK_EQ(count, 2);
    CHECK_EQ(r[0].guest_start, 0);
    CHECK_EQ(r[0].size, A_PAGES * PAGE);
    CHECK_EQ(r[1].guest_start, B_START);
    CHECK_EQ(r[1].size, B_PAGES * PAGE);

    /* Device state: ask, too small, then all. */
    uint8_t dev[64];
    size_t len = 0;
    CHECK_STATUS(pf_snapshot_device_state(snap, NULL, 0, &len), PF_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(len, sizeof device_bytes);
    CHECK_ERR(pf_snapshot_device_state(snap, dev, 3, &len), PF_ERR_BUFFER_TOO_SMALL,
              "11 bytes of device state do not fit");
    CHECK_OK(pf_snapshot_device_state(snap, dev, sizeof dev, &len));
    CHECK_EQ(len, sizeof device_bytes);
    CHECK(memcmp(dev, device_bytes, sizeof device_bytes) == 0);

    /* Restore into memory made from the snapshot's own layout. */
    pf_guest_memory *mem = NULL;
    CHECK_OK(pf_guest_memory_new(r, count, NULL, &mem));
    pf_restore_stats rs;
    memset(&rs, 0, sizeof rs);
    rs.struct_size = sizeof rs;
    CHECK_OK(pf_snapshot_restore_into(snap, mem, &rs));
    CHECK_EQ(rs.struct_size, sizeof rs);
    CHECK_EQ(rs.pages, PAGES);
    CHECK_EQ(rs.zero_pages, ZERO_PAGES);
    CHECK_EQ(rs.copied_pages, CONTENT_PAGES);
    check_memory(mem, 0);
    /* The zero pages hold no memory: released, not written. */
    pf_page_census census = pf_test_census();
    CHECK_OK(pf_guest_memory_census(mem, &census));
    CHECK_EQ(census.zero_pages, ZERO_PAGES);
    CHECK_EQ(census.private_pages, CONTENT_PAGES);
    /* The memory may be freed before the snapshot and vice versa. */
    pf_snapshot_free(snap);
    check_memory(mem, 0);
    pf_guest_memory_free(mem);
}

TEST(device_state_none_and_empty_differ) {
    char path[128];
    pf_guest_memory *mem = filled_memory(0);
    /* None: the defaults (NULL options). */
    CHECK_OK(pf_snapshot_save(mem, path_of(path, sizeof path, "nodev"), NULL, NULL));
    /* Empty: the flag with no bytes. */
    pf_save_options o = save_options();
    o.flags = PF_SAVE_DEVICE_STATE;
    CHECK_OK(pf_snapshot_save(mem, path_of(path, sizeof path, "emptydev"), &o, NULL));
    pf_snapshot *none = open_snap("nodev"), *empty = open_snap("emptydev");
    pf_snapshot_info a = info_of(none), b = info_of(empty);
    CHECK_EQ(a.flags, 0);
    CHECK_EQ(b.flags, PF_SNAPSHOT_DEVICE_STATE);
    CHECK_EQ(a.device_state_len, 0);
    CHECK_EQ(b.device_state_len, 0);
    /* The ids differ: the device-state part is part of the image. */
    CHECK(memcmp(a.id, b.id, sizeof a.id) != 0);
    size_t len = 7;
    CHECK_OK(pf_snapshot_device_state(none, NULL, 0, &len));
    CHECK_EQ(len, 0);
    len = 7;
    CHECK_OK(pf_snapshot_device_state(empty, NULL, 0, &len));
    CHECK_EQ(len, 0);
    pf_snapshot_free(none);
    pf_snapshot_free(empty);
    pf_guest_memory_free(mem);
}

TEST(incremental_chain_restores_the_newest) {
    char parent_path[128], child_path[128];
    path_of(parent_path, sizeof parent_path, "chain0");
    path_of(child_path, sizeof child_path, "chain1");
    pf_guest_memory *mem = filled_memory(0);
    pf_save_stats s0 = save_stats(), s1 = save_stats();
    /* Tracking on (the default): the log holds what is written from now. */
    CHECK_OK(pf_snapshot_save(mem, parent_path, NULL, &s0));
    fill(mem, 1);
    pf_dirty_run runs[PAGES];
    size_t n = 0;
    CHECK_OK(pf_guest_memory_harvest_dirty(mem, PF_ALL_REGIONS, runs, PAGES, &n));
    unsigned dirty = 0;
    for (size_t i = 0; i < n; i++) dirty += (unsigned)runs[i].pages;
    /* Every page was written again (same bytes or not): all are dirty. */
    CHECK_EQ(dirty, PAGES);
    /* Only the changed pages, as a VMM that knows better would pass. */
    n = 0;
    for (unsigned p = 0; p < PAGES; p++) {
        if (!changed(p)) continue;
        runs[n].gpa = gpa_of(p);
        runs[n].pages = 1;
        n++;
    }
    pf_snapshot *parent = open_snap("chain0");
    pf_save_options o = save_options();
    static const uint8_t child_state[] = "child device state";
    o.flags = PF_SAVE_DEVICE_STATE | PF_SAVE_NO_TRACK_DIRTY;
    o.device_state = child_state;
    o.device_state_len = sizeof child_state;
    CHECK_OK(pf_snapshot_save_incremental(mem, parent, runs, n, child_path, &o, &s1));
    CHECK_EQ(s1.pages, PAGES);
    CHECK_EQ(s1.parent_pages, PAGES - n);
    CHECK_EQ(s1.stored_pages, n);
    /* Saving over the parent's own file is refused. */
    CHECK_ERR(pf_snapshot_save_incremental(mem, parent, runs, n, parent_path, NULL, NULL),
              PF_ERR_INVALID_ARGUMENT, "ancestor 1");
    pf_snapshot_free(parent);

    const char *paths[2] = {parent_path, child_path};
    pf_snapshot *chain = NULL;
    CHECK_OK(pf_snapshot_open_chain(paths, 2, &chain));
    pf_snapshot_info info = info_of(chain);
    CHECK_EQ(info.flags, PF_SNAPSHOT_INCREMENTAL | PF_SNAPSHOT_DEVICE_STATE);
    CHECK(memcmp(info.id, s1.id, sizeof info.id) == 0);
    CHECK(memcmp(info.parent_id, s0.id, sizeof info.id) == 0);
    CHECK_EQ(info.stored_pages, n);
    uint8_t dev[64];
    size_t len = 0;
    CHECK_OK(pf_snapshot_device_state(chain, dev, sizeof dev, &len));
    CHECK_EQ(len, sizeof child_state);
    CHECK(memcmp(dev, child_state, sizeof child_state) == 0);
    pf_guest_memory *restored = fresh_memory();
    CHECK_OK(pf_snapshot_restore_into(chain, restored, NULL));
    check_memory(restored, 1);
    pf_guest_memory_free(restored);
    pf_snapshot_free(chain);

    /* The child alone knows its parent only by id. */
    pf_snapshot *child = open_snap("chain1");
    restored = fresh_memory();
    CHECK_ERR(pf_snapshot_restore_into(child, restored, NULL), PF_ERR_MISMATCH,
              "which was not opened with this one");
    pf_guest_memory_free(restored);
    pf_snapshot_free(child);
    /* A chain in the wrong order, or of two full snapshots. */
    const char *wrong[2] = {child_path, parent_path};
    chain = NULL;
    CHECK_ERR(pf_snapshot_open_chain(wrong, 2, &chain), PF_ERR_MISMATCH, "is full");
    CHECK(chain == NULL);
    const char *fulls[2] = {parent_path, parent_path};
    CHECK_ERR(pf_snapshot_open_chain(fulls, 2, &chain), PF_ERR_MISMATCH, "is full");
    pf_guest_memory_free(mem);
}

TEST(restore_folded_clones_share_frames) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    pf_frame_store_free(store);
    if (dedup == NULL) return;
    pf_save_stats st = save_stats();
    save_gen0("fold", &st);
    pf_snapshot *snap = open_snap("fold");

    pf_fold_options fo;
    memset(&fo, 0, sizeof fo);
    fo.struct_size = sizeof fo;
    fo.layout = 7;
    uint64_t vm[2] = {0, 0};
    pf_guest_memory *mem[2] = {NULL, NULL};
    CHECK_ERR(pf_snapshot_restore_folded(dedup, snap, NULL, &fo, &vm[0], &mem[0], NULL),
              PF_ERR_INVALID_ARGUMENT, "not a pf_fold_layout");
    fo.layout = PF_FOLD_CONTENTS;
    fo.max_guest_bytes = 4096;
    CHECK_ERR(pf_snapshot_restore_folded(dedup, snap, NULL, &fo, &vm[0], &mem[0], NULL),
              PF_ERR_SNAPSHOT, "over the restore's limit");
    CHECK(mem[0] == NULL);
    fo.max_guest_bytes = 0;
    pf_vm_options vo;
    memset(&vo, 0, sizeof vo);
    vo.struct_size = sizeof vo;
    uint64_t not_a_region = 0x1000;
    vo.exclude_starts = &not_a_region;
    vo.exclude_count = 1;
    CHECK_ERR(pf_snapshot_restore_folded(dedup, snap, &vo, &fo, &vm[0], &mem[0], NULL),
              PF_ERR_INVALID_ARGUMENT, "no region of the VM starts at");

    pf_folded_stats fs[2];
    for (int i = 0; i < 2; i++) {
        memset(&fs[i], 0, sizeof fs[i]);
        fs[i].struct_size = sizeof fs[i];
        CHECK_OK(pf_snapshot_restore_folded(dedup, snap, NULL, &fo, &vm[i], &mem[i], &fs[i]));
        if (mem[i] == NULL) goto out;
        CHECK(vm[i] != 0);
        CHECK_EQ(fs[i].pages, PAGES);
        CHECK_EQ(fs[i].zero_pages, ZERO_PAGES);
        CHECK_EQ(fs[i].shared_pages, CONTENT_PAGES);
        CHECK_EQ(fs[i].copied_pages, 0);
        CHECK_EQ(fs[i].contents, DISTINCT);
        CHECK_EQ(fs[i].image, 0);
        check_memory(mem[i], 0);
    }
    CHECK(vm[0] != vm[1]);
    /* The first read every content; the second found them all. */
    CHECK_EQ(fs[0].contents_read, DISTINCT);
    CHECK_EQ(fs[1].contents_found, DISTINCT);
    CHECK_EQ(fs[1].contents_read, 0);
    {
        pf_host_stats hs;
        memset(&hs, 0, sizeof hs);
        hs.struct_size = sizeof hs;
        CHECK_OK(pf_dedup_stats(dedup, &hs));
        /* DISTINCT frames for 2 * CONTENT_PAGES pages. */
        CHECK_EQ(hs.pages_shared, DISTINCT);
        CHECK_EQ(hs.pages_sharing, 2 * CONTENT_PAGES - DISTINCT);
        pf_vm_stats vs;
        memset(&vs, 0, sizeof vs);
        vs.struct_size = sizeof vs;
        CHECK_OK(pf_dedup_vm_stats(dedup, vm[1], &vs));
        CHECK_EQ(vs.pages_merged, CONTENT_PAGES);
        /* Copy on write: clone 0's write is its own. */
        uint8_t page[PAGE];
        memset(page, 0x77, sizeof page);
        CHECK_OK(pf_guest_memory_write(mem[0], gpa_of(1), page, PAGE));
        check_memory(mem[1], 0);
        uint8_t got[PAGE];
        CHECK_OK(pf_guest_memory_read(mem[0], gpa_of(1), got, PAGE));
        CHECK(memcmp(got, page, PAGE) == 0);
        /* A folded clone is an ordinary VM of its host. */
        CHECK_OK(pf_dedup_unregister(dedup, vm[0]));
        check_memory(mem[1], 0);
    }
out:
    pf_guest_memory_free(mem[0]);
    pf_guest_memory_free(mem[1]);
    pf_snapshot_free(snap);
    pf_dedup_free(dedup);
}

TEST(restore_lazy_serves_touches_and_fetches) {
    char ws[128];
    path_of(ws, sizeof ws, "lazy.ws");
    pf_save_stats st = save_stats();
    save_gen0("lazy", &st);
    pf_snapshot *snap = open_snap("lazy");
    pf_guest_memory *mem = fresh_memory();
    pf_lazy_restore *lazy = NULL;
    pf_lazy_options o = lazy_options();
    pf_lazy_stats ls = lazy_stats();
    uint64_t done = 0;
    o.working_set = ws;
    o.record_pages = 8;
    /* The fetch waits a little: the reads below are first touches. */
    o.fetch_delay_us = 300000;
    pf_status s = pf_snapshot_restore_lazy(snap, mem, &o, &lazy);
    if (no_lazy_here(s)) goto out;
    CHECK_STATUS(s, PF_OK);
    if (lazy == NULL) goto out;
    /* The handle may go first: the restore holds the file. */
    pf_snapshot_free(snap);
    snap = NULL;
    CHECK_OK(pf_lazy_restore_pages_done(lazy, &done));
    CHECK(done <= PAGES);
    check_memory(mem, 0);
    CHECK_OK(pf_lazy_restore_wait(lazy, &ls));
    CHECK_EQ(ls.struct_size, sizeof ls);
    CHECK_EQ(ls.pages, PAGES);
    CHECK_EQ(ls.zero_pages, ZERO_PAGES);
    CHECK_EQ(ls.damaged, 0);
    CHECK(ls.on_fault >= 1);
    CHECK_EQ(ls.on_fault + ls.fetched + ls.found + ls.zero_untouched + ls.damaged, PAGES);
    check_memory(mem, 0);
    CHECK_EQ(file_size(ws), 16 + 8 * 8);
    pf_guest_memory_free(mem);

    /* Again with the working set the first restore wrote: its pages are
     * fetched first. Freed before the wait, the restore stops. */
    snap = open_snap("lazy");
    mem = fresh_memory();
    o.record_pages = 0;
    o.fetch_delay_us = 0;
    CHECK_OK(pf_snapshot_restore_lazy(snap, mem, &o, &lazy));
    ls = lazy_stats();
    CHECK_OK(pf_lazy_restore_wait(lazy, &ls));
    CHECK(ls.working_set > 0);
    CHECK_EQ(ls.on_fault + ls.fetched + ls.found + ls.zero_untouched + ls.damaged, PAGES);
    check_memory(mem, 0);
    pf_guest_memory_free(mem);
    mem = fresh_memory();
    lazy = NULL;
    CHECK_OK(pf_snapshot_restore_lazy(snap, mem, NULL, &lazy));
    pf_lazy_restore_free(lazy);

    /* Memory that was written is refused. */
    pf_guest_memory_free(mem);
    mem = filled_memory(0);
    lazy = NULL;
    CHECK_ERR(pf_snapshot_restore_lazy(snap, mem, NULL, &lazy), PF_ERR_INVALID_ARGUMENT,
              "populated already");
    CHECK(lazy == NULL);
out:
    pf_guest_memory_free(mem);
    pf_snapshot_free(snap);
}

TEST(restore_folded_lazy_clones_share_the_image) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    pf_frame_store_free(store);
    if (dedup == NULL) return;
    pf_save_stats st = save_stats();
    save_gen0("foldlazy", &st);
    pf_snapshot *snap = open_snap("foldlazy");
    pf_lazy_options o = lazy_options();
    o.fetch_delay_us = 100000;
    uint64_t vm[3] = {0, 0, 0};
    pf_guest_memory *mem[3] = {NULL, NULL, NULL};
    pf_lazy_folded_restore *r = NULL;
    pf_lazy_stats ls;
    uint64_t done = 0;
    pf_vm_stats vs;
    memset(&vs, 0, sizeof vs);
    vs.struct_size = sizeof vs;

    /* Clone 0: pages arrive on touch and from the fetch. */
    CHECK_OK(pf_snapshot_restore_folded_lazy(dedup, snap, NULL, &o, &vm[0], &mem[0], &r));
    if (r == NULL) goto out;
    CHECK(vm[0] != 0);
    /* Arriving: not to be unregistered yet. */
    CHECK_ERR(pf_dedup_unregister(dedup, vm[0]), PF_ERR_BUSY, "still arriving");
    check_memory(mem[0], 0);
    ls = lazy_stats();
    CHECK_OK(pf_lazy_folded_restore_wait(r, &ls));
    CHECK_EQ(ls.pages, PAGES);
    CHECK_EQ(ls.damaged, 0);
    CHECK_EQ(ls.on_fault + ls.fetched + ls.found + ls.zero_untouched + ls.damaged, PAGES);
    check_memory(mem[0], 0);

    /* Clone 1: the image is whole; everything is found, nothing fetched. */
    r = NULL;
    CHECK_OK(pf_snapshot_restore_folded_lazy(dedup, snap, NULL, &o, &vm[1], &mem[1], &r));
    if (r == NULL) goto out;
    CHECK_OK(pf_lazy_folded_restore_pages_done(r, &done));
    CHECK_EQ(done, PAGES);
    ls = lazy_stats();
    CHECK_OK(pf_lazy_folded_restore_wait(r, &ls));
    CHECK_EQ(ls.found, CONTENT_PAGES);
    CHECK_EQ(ls.fetched + ls.on_fault, 0);
    check_memory(mem[1], 0);
    CHECK_OK(pf_dedup_vm_stats(dedup, vm[1], &vs));
    /* Its zero pages map the image's holes (counted merged) or nothing. */
    CHECK(vs.pages_merged >= CONTENT_PAGES);
    {
        pf_host_stats hs;
        memset(&hs, 0, sizeof hs);
        hs.struct_size = sizeof hs;
        CHECK_OK(pf_dedup_stats(dedup, &hs));
        /* Both clones map the image's frames. */
        CHECK(hs.pages_sharing >= CONTENT_PAGES);
    }

    /* Clone 2, freed before its wait: the VM is discarded. */
    r = NULL;
    CHECK_OK(pf_snapshot_restore_folded_lazy(dedup, snap, NULL, &o, &vm[2], &mem[2], &r));
    pf_lazy_folded_restore_free(r);
    CHECK_STATUS(pf_dedup_vm_stats(dedup, vm[2], &vs), PF_ERR_UNKNOWN_VM);
    CHECK_OK(pf_dedup_vm_stats(dedup, vm[1], &vs));
out:
    for (int i = 0; i < 3; i++) pf_guest_memory_free(mem[i]);
    pf_snapshot_free(snap);
    pf_dedup_free(dedup);
}

TEST(lazy_folded_free_before_arrival_discards_the_vm) {
    pf_frame_store *store = new_store();
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    pf_frame_store_free(store);
    if (dedup == NULL) return;
    pf_save_stats st = save_stats();
    save_gen0("foldlazy2", &st);
    pf_snapshot *snap = open_snap("foldlazy2");
    pf_lazy_options o = lazy_options();
    o.fetch_delay_us = 1000000; /* nothing arrives before the free */
    uint64_t vm = 0;
    pf_guest_memory *mem = NULL;
    pf_lazy_folded_restore *r = NULL;
    CHECK_OK(pf_snapshot_restore_folded_lazy(dedup, snap, NULL, &o, &vm, &mem, &r));
    uint64_t done = PAGES + 1;
    CHECK_OK(pf_lazy_folded_restore_pages_done(r, &done));
    CHECK(done < PAGES);
    pf_lazy_folded_restore_free(r);
    pf_vm_stats vs;
    memset(&vs, 0, sizeof vs);
    vs.struct_size = sizeof vs;
    CHECK_STATUS(pf_dedup_vm_stats(dedup, vm, &vs), PF_ERR_UNKNOWN_VM);
    pf_guest_memory_free(mem);
    /* The host goes on: a new clone restores whole. */
    mem = NULL;
    r = NULL;
    o.fetch_delay_us = 0;
    CHECK_OK(pf_snapshot_restore_folded_lazy(dedup, snap, NULL, &o, &vm, &mem, &r));
    CHECK_OK(pf_lazy_folded_restore_wait(r, NULL));
    if (mem != NULL) check_memory(mem, 0);
    pf_guest_memory_free(mem);
    pf_snapshot_free(snap);
    pf_dedup_free(dedup);
}

TEST(damaged_missing_and_foreign_files_are_reported) {
    char good[128], bad[128], path[128];
    pf_save_stats st = save_stats();
    save_gen0("good", &st);
    path_of(good, sizeof good, "good");
    path_of(bad, sizeof bad, "bad");
    pf_snapshot *snap = NULL;

    CHECK_ERR(pf_snapshot_open(path_of(path, sizeof path, "missing"), &snap), PF_ERR_OS,
              "No such file or directory");
    CHECK_ERR(pf_snapshot_open(dir, &snap), PF_ERR_OS, "not a regular file");
    CHECK(snap == NULL);
    /* A save into a directory that does not exist. */
    pf_guest_memory *mem = filled_memory(0);
    CHECK_ERR(pf_snapshot_save(mem, path_of(path, sizeof path, "no/such/dir"), NULL, NULL),
              PF_ERR_OS, "no/such/");
    pf_guest_memory_free(mem);

    /* Not a snapshot at all. */
    {
        int fd = open(bad, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        uint8_t junk[8192];
        memset(junk, 'x', sizeof junk);
        CHECK(write(fd, junk, sizeof junk) == (ssize_t)sizeof junk);
        close(fd);
    }
    CHECK_ERR(pf_snapshot_open(bad, &snap), PF_ERR_SNAPSHOT, "not a pagefold snapshot");
    /* A header byte changed: its checksum fails. */
    copy_file(good, bad);
    flip_byte(bad, 20);
    CHECK_ERR(pf_snapshot_open(bad, &snap), PF_ERR_SNAPSHOT, "header");
    /* The last byte (the device-state part's checksum). */
    copy_file(good, bad);
    flip_byte(bad, (off_t)file_size(bad) - 1);
    CHECK_ERR(pf_snapshot_open(bad, &snap), PF_ERR_SNAPSHOT, "device state");
    /* Cut short. */
    copy_file(good, bad);
    CHECK(truncate(bad, (off_t)file_size(bad) - 100) == 0);
    CHECK_ERR(pf_snapshot_open(bad, &snap), PF_ERR_SNAPSHOT, "truncated");
    CHECK(snap == NULL);

    /* A stored page changed: the file opens (pages are checked when read),
     * the restore refuses the page. */
    copy_file(good, bad);
    flip_byte(bad, 4096 + 100);
    CHECK_OK(pf_snapshot_open(bad, &snap));
    mem = fresh_memory();
    CHECK_ERR(pf_snapshot_restore_into(snap, mem, NULL), PF_ERR_SNAPSHOT, "does not match its hash");
    pf_guest_memory_free(mem);
    /* Lazily: the damaged page is never shown; the wait reports it. */
    mem = fresh_memory();
    pf_lazy_restore *lazy = NULL;
    pf_status s = pf_snapshot_restore_lazy(snap, mem, NULL, &lazy);
    if (s == PF_ERR_USERFAULT && pf_test_no_userfaultfd()) {
        /* Under valgrind: only this part cannot run (natively it does). */
        CHECK(lazy == NULL);
    } else {
        CHECK_STATUS(s, PF_OK);
        pf_lazy_stats ls = lazy_stats();
        if (lazy != NULL)
            CHECK_ERR(pf_lazy_restore_wait(lazy, &ls), PF_ERR_SNAPSHOT, "does not match its hash");
        CHECK_EQ(ls.pages, 0); /* untouched on error */
    }
    pf_guest_memory_free(mem);

    /* Memory of another layout. */
    pf_region one = pf_test_region(0, A_PAGES * PAGE);
    mem = pf_test_memory(&one, 1);
    CHECK_ERR(pf_snapshot_restore_into(snap, mem, NULL), PF_ERR_MISMATCH, "region layout differs");
    lazy = NULL;
    CHECK_ERR(pf_snapshot_restore_lazy(snap, mem, NULL, &lazy), PF_ERR_MISMATCH,
              "region layout differs");
    pf_guest_memory_free(mem);
    pf_snapshot_free(snap);
}

TEST(bad_arguments_are_refused) {
    char path[128];
    path_of(path, sizeof path, "args");
    pf_guest_memory *mem = filled_memory(0);
    pf_snapshot *snap = NULL;
    pf_save_options o = save_options();
    pf_save_stats st = save_stats();
    uint8_t byte = 1;

    CHECK_ERR(pf_snapshot_save(NULL, path, NULL, NULL), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_snapshot_save(mem, NULL, NULL, NULL), PF_ERR_NULL_POINTER, "`path`");
    CHECK_ERR(pf_snapshot_save(mem, "", NULL, NULL), PF_ERR_INVALID_ARGUMENT, "empty path");
    o.flags = 1u << 7;
    CHECK_ERR(pf_snapshot_save(mem, path, &o, NULL), PF_ERR_INVALID_ARGUMENT, "unknown bits 0x80");
    o.flags = 0;
    o.reserved = 1;
    CHECK_ERR(pf_snapshot_save(mem, path, &o, NULL), PF_ERR_INVALID_ARGUMENT, "reserved");
    o.reserved = 0;
    o.device_state = &byte;
    o.device_state_len = 1;
    CHECK_ERR(pf_snapshot_save(mem, path, &o, NULL), PF_ERR_INVALID_ARGUMENT,
              "lacks PF_SAVE_DEVICE_STATE");
    o.flags = PF_SAVE_DEVICE_STATE;
    o.device_state_len = (size_t)PF_SNAPSHOT_MAX_DEVICE_STATE + 1;
    CHECK_ERR(pf_snapshot_save(mem, path, &o, NULL), PF_ERR_INVALID_ARGUMENT,
              "more than the 67108864 bytes");
    o.device_state = NULL;
    o.device_state_len = 1;
    CHECK_ERR(pf_snapshot_save(mem, path, &o, NULL), PF_ERR_NULL_POINTER, "device_state");
    o.struct_size = 4;
    CHECK_STATUS(pf_snapshot_save(mem, path, &o, NULL), PF_ERR_STRUCT_TOO_SMALL);
    st.struct_size = 8;
    CHECK_STATUS(pf_snapshot_save(mem, path, NULL, &st), PF_ERR_STRUCT_TOO_SMALL);
    CHECK_EQ(access(path, F_OK), -1); /* nothing was saved */

    CHECK_OK(pf_snapshot_save(mem, path, NULL, NULL));
    CHECK_ERR(pf_snapshot_open(path, NULL), PF_ERR_NULL_POINTER, "out_snap");
    CHECK_ERR(pf_snapshot_open(NULL, &snap), PF_ERR_NULL_POINTER, "`path`");
    const char *paths[2] = {path, NULL};
    CHECK_ERR(pf_snapshot_open_chain(paths, 0, &snap), PF_ERR_INVALID_ARGUMENT, "count is 0");
    CHECK_ERR(pf_snapshot_open_chain(paths, 2, &snap), PF_ERR_NULL_POINTER, "paths[1]");
    CHECK_ERR(pf_snapshot_open_chain(NULL, 1, &snap), PF_ERR_NULL_POINTER, "`paths`");
    CHECK(snap == NULL);
    CHECK_OK(pf_snapshot_open_chain(paths, 1, &snap));

    pf_snapshot_info info;
    memset(&info, 0, sizeof info);
    CHECK_STATUS(pf_snapshot_get_info(snap, &info), PF_ERR_STRUCT_TOO_SMALL);
    CHECK_ERR(pf_snapshot_get_info(NULL, &info), PF_ERR_NULL_POINTER, "`snap`");
    CHECK_ERR(pf_snapshot_get_info(snap, NULL), PF_ERR_NULL_POINTER, "out_info");
    size_t count = 0;
    CHECK_ERR(pf_snapshot_regions(snap, NULL, 2, &count), PF_ERR_NULL_POINTER, "regions");
    CHECK_ERR(pf_snapshot_regions(snap, NULL, 0, NULL), PF_ERR_NULL_POINTER, "out_count");
    CHECK_ERR(pf_snapshot_device_state(NULL, NULL, 0, &count), PF_ERR_NULL_POINTER, "`snap`");
    CHECK_ERR(pf_snapshot_device_state(snap, NULL, 0, NULL), PF_ERR_NULL_POINTER, "out_len");

    pf_dirty_run run;
    run.gpa = 0;
    run.pages = 1;
    CHECK_ERR(pf_snapshot_save_incremental(mem, NULL, &run, 1, path, NULL, NULL),
              PF_ERR_NULL_POINTER, "`parent`");
    CHECK_ERR(pf_snapshot_save_incremental(mem, snap, NULL, 1, path, NULL, NULL),
              PF_ERR_NULL_POINTER, "`dirty`");
    run.gpa = 1ull << 40;
    {
        char child[128];
        path_of(child, sizeof child, "args.child");
        CHECK_ERR(pf_snapshot_save_incremental(mem, snap, &run, 1, child, NULL, NULL),
                  PF_ERR_INVALID_ARGUMENT, "is not inside the memory");
        CHECK_EQ(access(child, F_OK), -1);
    }

    pf_restore_stats rs;
    memset(&rs, 0, sizeof rs);
    CHECK_STATUS(pf_snapshot_restore_into(snap, mem, &rs), PF_ERR_STRUCT_TOO_SMALL);
    CHECK_ERR(pf_snapshot_restore_into(snap, NULL, NULL), PF_ERR_NULL_POINTER, "`mem`");
    uint64_t vm = 0;
    pf_guest_memory *out_mem = NULL;
    CHECK_ERR(pf_snapshot_restore_folded(NULL, snap, NULL, NULL, &vm, &out_mem, NULL),
              PF_ERR_NULL_POINTER, "`dedup`");
    pf_lazy_folded_restore *lfr = NULL;
    CHECK_ERR(pf_snapshot_restore_folded_lazy(NULL, snap, NULL, NULL, &vm, &out_mem, &lfr),
              PF_ERR_NULL_POINTER, "`dedup`");
    pf_lazy_restore *lazy = NULL;
    CHECK_ERR(pf_snapshot_restore_lazy(snap, mem, NULL, NULL), PF_ERR_NULL_POINTER, "out_restore");
    CHECK_ERR(pf_snapshot_restore_lazy(NULL, mem, NULL, &lazy), PF_ERR_NULL_POINTER, "`snap`");
    pf_lazy_options lo = lazy_options();
    lo.working_set = "";
    CHECK_ERR(pf_snapshot_restore_lazy(snap, mem, &lo, &lazy), PF_ERR_INVALID_ARGUMENT,
              "working_set` is an empty path");
    lo.struct_size = 0;
    CHECK_STATUS(pf_snapshot_restore_lazy(snap, mem, &lo, &lazy), PF_ERR_STRUCT_TOO_SMALL);
    CHECK(lazy == NULL && lfr == NULL && out_mem == NULL);
    uint64_t done = 0;
    CHECK_ERR(pf_lazy_restore_pages_done(NULL, &done), PF_ERR_NULL_POINTER, "restore");
    CHECK_ERR(pf_lazy_restore_wait(NULL, NULL), PF_ERR_NULL_POINTER, "restore");
    CHECK_ERR(pf_lazy_folded_restore_pages_done(NULL, &done), PF_ERR_NULL_POINTER, "restore");
    CHECK_ERR(pf_lazy_folded_restore_wait(NULL, NULL), PF_ERR_NULL_POINTER, "restore");
    pf_lazy_restore_free(NULL);
    pf_lazy_folded_restore_free(NULL);
    pf_snapshot_free(NULL);
    pf_snapshot_free(snap);
    pf_guest_memory_free(mem);
}

static void remove_dir(void) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[512];
    if (d == NULL) return;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(save_open_and_restore_by_copy),
        PF_TEST_CASE(device_state_none_and_empty_differ),
        PF_TEST_CASE(incremental_chain_restores_the_newest),
        PF_TEST_CASE(restore_folded_clones_share_frames),
        PF_TEST_CASE(restore_lazy_serves_touches_and_fetches),
        PF_TEST_CASE(restore_folded_lazy_clones_share_the_image),
        PF_TEST_CASE(lazy_folded_free_before_arrival_discards_the_vm),
        PF_TEST_CASE(damaged_missing_and_foreign_files_are_reported),
        PF_TEST_CASE(bad_arguments_are_refused),
    };
    strcpy(dir, "/tmp/pf-snapshot-XXXXXX");
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    int rc = pf_test_main("snapshot", tests, sizeof tests / sizeof tests[0]);
    remove_dir();
    return rc;
}
