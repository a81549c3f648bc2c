/*
 * Guest memory: creation and its error paths, byte access, region info,
 * host addresses, discard, census and the allocation figures.
 */
#include "pf_test.h"

#include <fcntl.h>
#include <unistd.h>

#define KIB 1024ull
#define MIB (1024ull * KIB)
#define GIB (1024ull * MIB)

TEST(new_and_free) {
    /* Out of order on purpose: regions are numbered by address. */
    pf_region regions[2];
    regions[0] = pf_test_region(1 * MIB, 64 * KIB);
    regions[1] = pf_test_region(0, 16 * KIB);
    pf_guest_memory *mem = pf_test_memory(regions, 2);
    size_t count = 0;
    uint64_t total = 0;

    CHECK_OK(pf_guest_memory_region_count(mem, &count));
    CHECK_EQ(count, 2);
    CHECK_OK(pf_guest_memory_total_size(mem, &total));
    CHECK_EQ(total, 80 * KIB);
    pf_guest_memory_free(mem);
}

TEST(new_rejects_null_pointers) {
    pf_region r = pf_test_region(0, 4096);
    pf_guest_memory *mem = (pf_guest_memory *)(uintptr_t)0x1;

    CHECK_ERR(pf_guest_memory_new(&r, 1, NULL, NULL), PF_ERR_NULL_POINTER, "out_mem");
    CHECK_ERR(pf_guest_memory_new(NULL, 1, NULL, &mem), PF_ERR_NULL_POINTER, "regions");
    CHECK(mem == (pf_guest_memory *)(uintptr_t)0x1); /* untouched on error */
}

TEST(new_rejects_bad_layouts) {
    pf_guest_memory *mem = NULL;
    pf_region r[2];
    memset(r, 0, sizeof r);

    CHECK_ERR(pf_guest_memory_new(NULL, 0, NULL, &mem), PF_ERR_LAYOUT, "at least one region");
    CHECK_ERR(pf_guest_memory_new(r, 0, NULL, &mem), PF_ERR_LAYOUT, "at least one region");

    r[0] = pf_test_region(0, 0);
    CHECK_ERR(pf_guest_memory_new(r, 1, NULL, &mem), PF_ERR_LAYOUT, "size zero");
    r[0] = pf_test_region(100, 4096);
    CHECK_ERR(pf_guest_memory_new(r, 1, NULL, &mem), PF_ERR_LAYOUT, "not aligned");
    r[0] = pf_test_region(0, 4097);
    CHECK_ERR(pf_guest_memory_new(r, 1, NULL, &mem), PF_ERR_LAYOUT, "not aligned");
    r[0] = pf_test_region(UINT64_MAX - 4095, 4096);
    CHECK_ERR(pf_guest_memory_new(r, 1, NULL, &mem), PF_ERR_LAYOUT, "end of the address space");
    r[0] = pf_test_region(0x10000, 0x2000);
    r[1] = pf_test_region(0x9000, 0x8000);
    CHECK_ERR(pf_guest_memory_new(r, 2, NULL, &mem), PF_ERR_LAYOUT, "overlap");
    CHECK(mem == NULL);
}

TEST(new_rejects_absurd_region_count) {
    pf_guest_memory *mem = NULL;
    pf_region r = pf_test_region(0, 4096);
    CHECK_ERR(pf_guest_memory_new(&r, SIZE_MAX, NULL, &mem), PF_ERR_INVALID_ARGUMENT,
              "region_count");
    CHECK_ERR(pf_guest_memory_new(&r, SIZE_MAX / sizeof r, NULL, &mem),
              PF_ERR_INVALID_ARGUMENT, "region_count");
    CHECK(mem == NULL);
}

TEST(options_struct_size_is_checked) {
    pf_region r = pf_test_region(0, 64 * KIB);
    pf_guest_memory *mem = NULL;
    pf_memory_options o = pf_test_options();

    o.struct_size = 0;
    CHECK_ERR(pf_guest_memory_new(&r, 1, &o, &mem), PF_ERR_STRUCT_TOO_SMALL, "struct_size is 0");
    o.struct_size = sizeof(size_t);
    CHECK_ERR(pf_guest_memory_new(&r, 1, &o, &mem), PF_ERR_STRUCT_TOO_SMALL, "pf_memory_options");
    o.struct_size = sizeof o - 1;
    CHECK_STATUS(pf_guest_memory_new(&r, 1, &o, &mem), PF_ERR_STRUCT_TOO_SMALL);
    CHECK(mem == NULL);

    /* A caller built against a later, larger struct is served. */
    struct {
        pf_memory_options v1;
        uint64_t later_fields[4];
    } bigger;
    memset(&bigger, 0xab, sizeof bigger);
    bigger.v1 = pf_test_options();
    bigger.v1.struct_size = sizeof bigger;
    CHECK_OK(pf_guest_memory_new(&r, 1, &bigger.v1, &mem));
    CHECK(mem != NULL);
    pf_guest_memory_free(mem);
}

TEST(options_values_are_checked) {
    pf_region r = pf_test_region(0, 64 * KIB);
    pf_guest_memory *mem = NULL;
    pf_memory_options o = pf_test_options();

    o.backing = 3;
    CHECK_ERR(pf_guest_memory_new(&r, 1, &o, &mem), PF_ERR_INVALID_ARGUMENT, "backing 3");
    o.backing = PF_BACKING_MEMFD;
    o.flags = 1u << 7;
    CHECK_ERR(pf_guest_memory_new(&r, 1, &o, &mem), PF_ERR_INVALID_ARGUMENT, "flags 0x80");
    CHECK(mem == NULL);

    o.flags = PF_MEMORY_TRANSPARENT_HUGE_PAGES | PF_MEMORY_POPULATE;
    CHECK_OK(pf_guest_memory_new(&r, 1, &o, &mem));
    uint8_t byte = 1;
    CHECK_OK(pf_guest_memory_write(mem, 0x100, &byte, 1));
    pf_guest_memory_free(mem);
}

/* Whether /proc/self/maps mentions `needle`. */
static int maps_contain(const char *needle) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    int found = 0;
    if (f == NULL) return 0;
    while (!found && fgets(line, sizeof line, f) != NULL) found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

TEST(options_name_names_the_memfd) {
    pf_region r = pf_test_region(0, 64 * KIB);
    pf_guest_memory *mem = NULL;
    pf_memory_options o = pf_test_options();
    o.name = "pf-ctest-name";
    CHECK_OK(pf_guest_memory_new(&r, 1, &o, &mem));
    CHECK(maps_contain("memfd:pf-ctest-name"));
    pf_guest_memory_free(mem);
    CHECK(!maps_contain("memfd:pf-ctest-name"));
}

/* Hugetlb needs reserved huge pages; without them the call fails cleanly.
 * The memory is never touched here: with no pages behind it a write would
 * fault. */
TEST(hugetlb_backings) {
    static const struct {
        uint32_t backing;
        uint64_t page;
    } cases[] = {{PF_BACKING_HUGETLB_2M, 2 * MIB}, {PF_BACKING_HUGETLB_1G, 1 * GIB}};
    for (size_t i = 0; i < 2; i++) {
        pf_memory_options o = pf_test_options();
        pf_guest_memory *mem = NULL;
        o.backing = cases[i].backing;

        pf_region r = pf_test_region(0, cases[i].page);
        pf_status s = pf_guest_memory_new(&r, 1, &o, &mem);
        CHECK(s == PF_OK || s == PF_ERR_NO_HUGE_PAGES || s == PF_ERR_OS);
        if (s == PF_OK) {
            pf_region_info info = pf_test_info();
            CHECK_OK(pf_guest_memory_region_info(mem, 0, &info));
            CHECK_EQ(info.size, cases[i].page);
        } else {
            CHECK(mem == NULL);
        }
        pf_guest_memory_free(mem);

        /* 4 KiB granularity is not enough for huge pages. */
        mem = NULL;
        r = pf_test_region(4096, cases[i].page);
        s = pf_guest_memory_new(&r, 1, &o, &mem);
        CHECK(s == PF_ERR_LAYOUT || s == PF_ERR_NO_HUGE_PAGES || s == PF_ERR_OS);
        CHECK(mem == NULL);
    }
}

TEST(read_write_round_trip_and_spans) {
    pf_region regions[3];
    regions[0] = pf_test_region(0, 8 * KIB);
    regions[1] = pf_test_region(8 * KIB, 4 * KIB); /* adjacent */
    regions[2] = pf_test_region(64 * KIB, 4 * KIB); /* after a hole */
    pf_guest_memory *mem = pf_test_memory(regions, 3);
    uint8_t data[6 * 1024], back[sizeof data];

    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(i * 7 + 3);
    /* Never-written memory reads as zeros. */
    memset(back, 0xff, sizeof back);
    CHECK_OK(pf_guest_memory_read(mem, 0x1400, back, sizeof back));
    CHECK(back[0] == 0 && back[sizeof back - 1] == 0);

    /* Across the boundary of the two adjacent regions. */
    CHECK_OK(pf_guest_memory_write(mem, 0x1400, data, sizeof data));
    CHECK_OK(pf_guest_memory_read(mem, 0x1400, back, sizeof back));
    CHECK(memcmp(data, back, sizeof data) == 0);

    /* Into the hole: refused as a whole, nothing written. */
    uint8_t ones[4096];
    memset(ones, 1, sizeof ones);
    CHECK_ERR(pf_guest_memory_write(mem, 0x2800, ones, sizeof ones), PF_ERR_UNMAPPED, "0x3000");
    uint8_t b = 0xff;
    CHECK_OK(pf_guest_memory_read(mem, 0x2800, &b, 1));
    CHECK_EQ(b, data[0x2800 - 0x1400]);
    CHECK_ERR(pf_guest_memory_read(mem, 0x2800, back, sizeof back), PF_ERR_UNMAPPED, "0x3000");
    CHECK_ERR(pf_guest_memory_read(mem, 0x5000, &b, 1), PF_ERR_UNMAPPED, "0x5000");
    CHECK_ERR(pf_guest_memory_write(mem, 68 * KIB, &b, 1), PF_ERR_UNMAPPED, "0x11000");

    /* Zero-length accesses: NULL buffer allowed. */
    CHECK_OK(pf_guest_memory_read(mem, 0, NULL, 0));
    CHECK_OK(pf_guest_memory_write(mem, 0, NULL, 0));
    pf_guest_memory_free(mem);
}

TEST(read_write_argument_errors) {
    pf_region r = pf_test_region(0, 8 * KIB);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    uint8_t buf[16] = {0};

    CHECK_ERR(pf_guest_memory_read(NULL, 0, buf, sizeof buf), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_write(NULL, 0, buf, sizeof buf), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_read(mem, 0, NULL, 1), PF_ERR_NULL_POINTER, "`buf`");
    CHECK_ERR(pf_guest_memory_write(mem, 0, NULL, 1), PF_ERR_NULL_POINTER, "`data`");
    /* Lengths no object can have are refused before any byte moves. */
    CHECK_ERR(pf_guest_memory_read(mem, 0, buf, SIZE_MAX), PF_ERR_INVALID_ARGUMENT, "PTRDIFF_MAX");
    CHECK_ERR(pf_guest_memory_write(mem, 0, buf, (size_t)PTRDIFF_MAX + 1),
              PF_ERR_INVALID_ARGUMENT, "PTRDIFF_MAX");
    pf_guest_memory_free(mem);
}

TEST(access_wrapping_the_address_space_overflows) {
    /* The highest region possible: it ends at 2^64 - 4096. */
    pf_region r = pf_test_region(UINT64_MAX - 8191, 4096);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    uint8_t buf[8192];
    memset(buf, 0, sizeof buf);
    CHECK_ERR(pf_guest_memory_read(mem, UINT64_MAX - 8191, buf, sizeof buf - 1), PF_ERR_UNMAPPED,
              "0xfffffffffffff000");
    CHECK_ERR(pf_guest_memory_read(mem, UINT64_MAX - 8191, buf, sizeof buf), PF_ERR_OVERFLOW,
              "wraps");
    CHECK_ERR(pf_guest_memory_read(mem, UINT64_MAX - 4095 - 16, buf, sizeof buf), PF_ERR_OVERFLOW,
              "wraps");
    CHECK_ERR(pf_guest_memory_write(mem, UINT64_MAX - 4095 - 16, buf, sizeof buf),
              PF_ERR_OVERFLOW, "wraps");
    CHECK_OK(pf_guest_memory_write(mem, UINT64_MAX - 8191, buf, 4096));
    pf_guest_memory_free(mem);
}

TEST(region_info_describes_regions_in_address_order) {
    pf_region regions[2];
    regions[0] = pf_test_region(1 * MIB, 64 * KIB);
    regions[1] = pf_test_region(0, 16 * KIB);
    pf_guest_memory *mem = pf_test_memory(regions, 2);
    pf_region_info a = pf_test_info(), b = pf_test_info();

    CHECK_OK(pf_guest_memory_region_info(mem, 0, &a));
    CHECK_OK(pf_guest_memory_region_info(mem, 1, &b));
    CHECK_EQ(a.struct_size, sizeof a);
    CHECK_EQ(a.guest_start, 0);
    CHECK_EQ(a.size, 16 * KIB);
    CHECK_EQ(b.guest_start, 1 * MIB);
    CHECK_EQ(b.size, 64 * KIB);
    CHECK(a.host_addr != 0 && b.host_addr != 0);
    CHECK(a.fd >= 0 && a.fd == b.fd); /* one memfd per guest memory */
    CHECK(a.file_offset % 4096 == 0 && b.file_offset % 4096 == 0);
    CHECK(a.file_offset != b.file_offset);
    CHECK_EQ(a.reserved, 0);
    CHECK(fcntl(a.fd, F_GETFD) >= 0);
    pf_guest_memory_free(mem);
}

TEST(region_info_errors) {
    pf_region r = pf_test_region(0, 16 * KIB);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    pf_region_info info = pf_test_info();

    CHECK_ERR(pf_guest_memory_region_info(NULL, 0, &info), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_region_info(mem, 0, NULL), PF_ERR_NULL_POINTER, "`out_info`");
    CHECK_ERR(pf_guest_memory_region_info(mem, 1, &info), PF_ERR_OUT_OF_RANGE,
              "region index 1");
    CHECK_ERR(pf_guest_memory_region_info(mem, SIZE_MAX, &info), PF_ERR_OUT_OF_RANGE, "index");
    info.struct_size = 0;
    CHECK_ERR(pf_guest_memory_region_info(mem, 0, &info), PF_ERR_STRUCT_TOO_SMALL,
              "pf_region_info");
    info.struct_size = sizeof info - 1;
    CHECK_STATUS(pf_guest_memory_region_info(mem, 0, &info), PF_ERR_STRUCT_TOO_SMALL);
    CHECK_EQ(info.struct_size, sizeof info - 1); /* untouched on error */

    /* A larger struct: this version's fields are filled, the rest is left. */
    struct {
        pf_region_info v1;
        uint64_t later_fields[2];
    } bigger;
    memset(&bigger, 0xab, sizeof bigger);
    bigger.v1.struct_size = sizeof bigger;
    CHECK_OK(pf_guest_memory_region_info(mem, 0, &bigger.v1));
    CHECK_EQ(bigger.v1.struct_size, sizeof(pf_region_info));
    CHECK_EQ(bigger.v1.size, 16 * KIB);
    CHECK_EQ(bigger.later_fields[0], 0xababababababababull);
    CHECK_EQ(bigger.later_fields[1], 0xababababababababull);

    size_t count = 0;
    CHECK_ERR(pf_guest_memory_region_count(NULL, &count), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_region_count(mem, NULL), PF_ERR_NULL_POINTER, "`out_count`");
    uint64_t total = 0;
    CHECK_ERR(pf_guest_memory_total_size(NULL, &total), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_total_size(mem, NULL), PF_ERR_NULL_POINTER, "`out_size`");
    pf_guest_memory_free(mem);
}

TEST(host_address_is_the_mapping) {
    pf_region regions[2];
    regions[0] = pf_test_region(0, 16 * KIB);
    regions[1] = pf_test_region(1 * MIB, 16 * KIB);
    pf_guest_memory *mem = pf_test_memory(regions, 2);
    pf_region_info info = pf_test_info();
    uint64_t host = 0;

    CHECK_OK(pf_guest_memory_region_info(mem, 1, &info));
    CHECK_OK(pf_guest_memory_host_address(mem, 1 * MIB + 0x123, &host));
    CHECK_EQ(host, info.host_addr + 0x123);

    /* A store through the host address is what pf_guest_memory_read sees. */
    volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)host;
    *p = 0x5a;
    uint8_t b = 0;
    CHECK_OK(pf_guest_memory_read(mem, 1 * MIB + 0x123, &b, 1));
    CHECK_EQ(b, 0x5a);

    CHECK_ERR(pf_guest_memory_host_address(mem, 16 * KIB, &host), PF_ERR_UNMAPPED, "0x4000");
    CHECK_ERR(pf_guest_memory_host_address(NULL, 0, &host), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_host_address(mem, 0, NULL), PF_ERR_NULL_POINTER, "out_host_addr");
    pf_guest_memory_free(mem);
}

TEST(discard_census_and_allocated_bytes) {
    pf_region r = pf_test_region(0, 64 * KIB); /* 16 pages */
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    pf_page_census c = pf_test_census();
    uint64_t before = 0, after = 0, released = 0;
    uint8_t page[4096];

    CHECK_OK(pf_guest_memory_census(mem, &c));
    CHECK_EQ(c.struct_size, sizeof c);
    CHECK_EQ(c.private_pages + c.zero_pages + c.shared_pages + c.ballooned_pages, 16);

    memset(page, 0x77, sizeof page);
    for (uint64_t gpa = 0; gpa < 64 * KIB; gpa += 4096)
        CHECK_OK(pf_guest_memory_write(mem, gpa, page, sizeof page));
    CHECK_OK(pf_guest_memory_allocated_bytes(mem, &before));
    CHECK(before >= 64 * KIB);

    CHECK_OK(pf_guest_memory_discard(mem, 16 * KIB, 32 * KIB, &released));
    CHECK_EQ(released, 8);
    CHECK_OK(pf_guest_memory_allocated_bytes(mem, &after));
    CHECK(after + 32 * KIB <= before);
    CHECK_OK(pf_guest_memory_read(mem, 16 * KIB, page, sizeof page));
    CHECK(page[0] == 0 && page[4095] == 0);
    CHECK_OK(pf_guest_memory_read(mem, 0, page, sizeof page));
    CHECK(page[0] == 0x77);

    c = pf_test_census();
    CHECK_OK(pf_guest_memory_census(mem, &c));
    CHECK_EQ(c.zero_pages, 8);
    CHECK_EQ(c.private_pages, 8);
    CHECK_EQ(c.shared_pages + c.ballooned_pages, 0);

    /* Discarding again releases nothing new. */
    CHECK_OK(pf_guest_memory_discard(mem, 16 * KIB, 32 * KIB, &released));
    CHECK_EQ(released, 0);
    /* Zero-length discard is fine. */
    CHECK_OK(pf_guest_memory_discard(mem, 0, 0, &released));
    CHECK_EQ(released, 0);
    pf_guest_memory_free(mem);
}

TEST(discard_census_allocated_bytes_errors) {
    pf_region r = pf_test_region(0, 64 * KIB);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    uint64_t released = 99, bytes = 0;
    pf_page_census c = pf_test_census();

    CHECK_ERR(pf_guest_memory_discard(mem, 100, 4096, &released), PF_ERR_MISALIGNED, "0x64");
    CHECK_ERR(pf_guest_memory_discard(mem, 0, 100, &released), PF_ERR_MISALIGNED, "aligned");
    CHECK_ERR(pf_guest_memory_discard(mem, 60 * KIB, 8 * KIB, &released), PF_ERR_UNMAPPED,
              "0x10000");
    CHECK_ERR(pf_guest_memory_discard(mem, 1 * MIB, 4096, &released), PF_ERR_UNMAPPED, "0x100000");
    CHECK_ERR(pf_guest_memory_discard(mem, 4096, UINT64_MAX - 4095, &released), PF_ERR_OVERFLOW,
              "wraps");
    CHECK_ERR(pf_guest_memory_discard(NULL, 0, 4096, &released), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_discard(mem, 0, 4096, NULL), PF_ERR_NULL_POINTER,
              "out_released_pages");
    CHECK_EQ(released, 99);

    CHECK_ERR(pf_guest_memory_census(NULL, &c), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_census(mem, NULL), PF_ERR_NULL_POINTER, "`out_census`");
    c.struct_size = sizeof c - 8;
    CHECK_ERR(pf_guest_memory_census(mem, &c), PF_ERR_STRUCT_TOO_SMALL, "pf_page_census");

    CHECK_ERR(pf_guest_memory_allocated_bytes(NULL, &bytes), PF_ERR_NULL_POINTER, "`mem`");
    CHECK_ERR(pf_guest_memory_allocated_bytes(mem, NULL), PF_ERR_NULL_POINTER, "`out_bytes`");
    pf_guest_memory_free(mem);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(new_and_free),
        PF_TEST_CASE(new_rejects_null_pointers),
        PF_TEST_CASE(new_rejects_bad_layouts),
        PF_TEST_CASE(new_rejects_absurd_region_count),
        PF_TEST_CASE(options_struct_size_is_checked),
        PF_TEST_CASE(options_values_are_checked),
        PF_TEST_CASE(options_name_names_the_memfd),
        PF_TEST_CASE(hugetlb_backings),
        PF_TEST_CASE(read_write_round_trip_and_spans),
        PF_TEST_CASE(read_write_argument_errors),
        PF_TEST_CASE(access_wrapping_the_address_space_overflows),
        PF_TEST_CASE(region_info_describes_regions_in_address_order),
        PF_TEST_CASE(region_info_errors),
        PF_TEST_CASE(host_address_is_the_mapping),
        PF_TEST_CASE(discard_census_and_allocated_bytes),
        PF_TEST_CASE(discard_census_allocated_bytes_errors),
    };
    return pf_test_main("memory", tests, sizeof tests / sizeof tests[0]);
}
