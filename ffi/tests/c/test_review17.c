/*
 * Review of the AArch64 integration (issue 17), C ABI side: adding
 * `arch_attributes` to pf_translation must not turn away callers compiled
 * against the header before it (struct_size of the first version), which
 * the size-prefix convention promises to serve.
 */
#include "pf_test.h"

#define MIB (1024ull * 1024ull)

static void put(pf_guest_memory *mem, uint64_t gpa, uint64_t v) {
    CHECK_OK(pf_guest_memory_store_u64(mem, gpa, v));
}

TEST(translation_of_the_first_version_is_still_served) {
    pf_region r = pf_test_region(0, 4 * MIB);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    /* x86 4-level: 0x400000 -> 0x5000. */
    put(mem, 0x1000, 0x2000 | 3);
    put(mem, 0x2000, 0x3000 | 3);
    put(mem, 0x3000 + 2 * 8, 0x4000 | 3);
    put(mem, 0x4000, 0x5000 | 3);
    pf_x86_paging regs;
    memset(&regs, 0, sizeof regs);
    regs.struct_size = sizeof regs;
    regs.cr0 = 0x80010001ull;
    regs.cr3 = 0x1000;
    regs.cr4 = 0x20;
    regs.efer = 0xd00;
    pf_walker *w = NULL;
    CHECK_OK(pf_walker_new(&regs, NULL, &w));

    /* A caller built before arch_attributes existed. */
    pf_translation t;
    memset(&t, 0xa5, sizeof t);
    t.struct_size = offsetof(pf_translation, arch_attributes);
    CHECK_OK(pf_walker_translate(w, mem, 0x400123, 0, NULL, &t, NULL));
    CHECK_EQ(t.gpa, 0x5123);
    CHECK_EQ(t.struct_size, offsetof(pf_translation, arch_attributes));
    /* Bytes past its version are not written. */
    CHECK_EQ(t.arch_attributes, 0xa5a5a5a5a5a5a5a5ull);

    pf_walker_free(w);
    pf_guest_memory_free(mem);
}

int main(void) {
    static const pf_test_case tests[] = {
        PF_TEST_CASE(translation_of_the_first_version_is_still_served),
    };
    return pf_test_main("review17", tests, sizeof tests / sizeof tests[0]);
}
