/*
 * What a vhost-user backend (or any second process) relies on: the memfd and
 * offset from pf_guest_memory_region_info name the same memory that
 * pf_guest_memory_read/write see, whether it is reached with pread/pwrite on
 * the descriptor or with its own mmap of it.
 */
#include "pf_test.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define KIB 1024ull
#define MIB (1024ull * KIB)

/* A two-region layout, so the second region has a non-zero file offset. */
static pf_guest_memory *two_regions(void) {
    pf_region regions[2];
    regions[0] = pf_test_region(0, 64 * KIB);
    regions[1] = pf_test_region(1 * MIB, 64 * KIB);
    return pf_test_memory(regions, 2);
}

TEST(write_through_fd_is_visible_to_pf_read) {
    pf_guest_memory *mem = two_regions();
    pf_region_info info = pf_test_info();
    static const char msg[] = "written through the memfd";
    char back[sizeof msg];

    CHECK_OK(pf_guest_memory_region_info(mem, 1, &info));
    CHECK(info.file_offset > 0);
    CHECK(pwrite(info.fd, msg, sizeof msg, (off_t)(info.file_offset + 0x2345)) ==
          (ssize_t)sizeof msg);
    memset(back, 0, sizeof back);
    CHECK_OK(pf_guest_memory_read(mem, info.guest_start + 0x2345, back, sizeof back));
    CHECK(memcmp(back, msg, sizeof msg) == 0);
    pf_guest_memory_free(mem);
}

TEST(pf_write_is_visible_through_fd) {
    pf_guest_memory *mem = two_regions();
    pf_region_info info = pf_test_info();
    static const char msg[] = "written with pf_guest_memory_write";
    char back[sizeof msg];
    struct stat st;

    CHECK_OK(pf_guest_memory_region_info(mem, 1, &info));
    CHECK(fstat(info.fd, &st) == 0);
    CHECK((uint64_t)st.st_size >= info.file_offset + info.size);
    CHECK_OK(pf_guest_memory_write(mem, info.guest_start + 0x10, msg, sizeof msg));
    memset(back, 0, sizeof back);
    CHECK(pread(info.fd, back, sizeof back, (off_t)(info.file_offset + 0x10)) ==
          (ssize_t)sizeof back);
    CHECK(memcmp(back, msg, sizeof msg) == 0);
    pf_guest_memory_free(mem);
}

TEST(backend_mapping_shares_memory) {
    pf_guest_memory *mem = two_regions();
    pf_region_info info = pf_test_info();

    CHECK_OK(pf_guest_memory_region_info(mem, 1, &info));
    /* What a vhost-user backend does with a VHOST_USER_SET_MEM_TABLE entry. */
    void *map = mmap(NULL, (size_t)info.size, PROT_READ | PROT_WRITE, MAP_SHARED, info.fd,
                     (off_t)info.file_offset);
    CHECK(map != MAP_FAILED);
    if (map != MAP_FAILED) {
        volatile uint32_t *backend = (volatile uint32_t *)map;
        uint32_t v = 0;

        backend[0x100] = 0xfeedf00du;
        CHECK_OK(pf_guest_memory_load_u32(mem, info.guest_start + 0x400, &v));
        CHECK_EQ(v, 0xfeedf00du);
        CHECK_OK(pf_guest_memory_store_u32(mem, info.guest_start + 0x404, 0x600dcafeu));
        CHECK_EQ(backend[0x101], 0x600dcafeu);
        CHECK(munmap(map, (size_t)info.size) == 0);
    }
    pf_guest_memory_free(mem);
}

TEST(fd_stays_open_until_free) {
    pf_guest_memory *mem = two_regions();
    pf_region_info info = pf_test_info();
    CHECK_OK(pf_guest_memory_region_info(mem, 0, &info));
    /* A backend that wants the memory beyond the handle's life dups it. */
    int kept = dup(info.fd);
    CHECK(kept >= 0);
    CHECK_OK(pf_guest_memory_write(mem, 0x20, "kept", 5));
    pf_guest_memory_free(mem);
    if (kept >= 0) {
        char back[5] = {0};
        CHECK(pread(kept, back, sizeof back, (off_t)(info.file_offset + 0x20)) == 5);
        /* Freeing gives the frames back (punch hole): the data is gone. */
        CHECK(back[0] == 0);
        CHECK(close(kept) == 0);
    }
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(write_through_fd_is_visible_to_pf_read),
        PF_TEST_CASE(pf_write_is_visible_through_fd),
        PF_TEST_CASE(backend_mapping_shares_memory),
        PF_TEST_CASE(fd_stays_open_until_free),
    };
    return pf_test_main("vhost_user", tests, sizeof tests / sizeof tests[0]);
}
