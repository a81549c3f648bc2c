/*
 * The smallest useful libpagefold program: 2 MiB of guest memory in two
 * regions, a write and a read, and what KVM needs to map each region.
 *
 *   cc minimal.c $(pkg-config --cflags --libs pagefold) -o minimal
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <pagefold.h>

static int fail(const char *what, pf_status status) {
    char msg[256];
    size_t needed = 0;
    pf_last_error_message(msg, sizeof msg, &needed);
    fflush(stdout);
    fprintf(stderr, "%s: %s: %s\n", what, pf_status_name(status), msg);
    return 1;
}

int main(void) {
    uint32_t abi = pf_abi_version();
    if (abi >> 16 != PF_ABI_VERSION_MAJOR || (abi & 0xffff) < PF_ABI_VERSION_MINOR) {
        fprintf(stderr, "libpagefold ABI %#x does not serve this program (%#x)\n",
                (unsigned)abi, (unsigned)PF_ABI_VERSION);
        return 1;
    }

    pf_region regions[2] = {{0, 1 << 20}, {1u << 30, 1 << 20}};
    pf_memory_options options;
    memset(&options, 0, sizeof options);
    options.struct_size = sizeof options;
    options.name = "minimal-guest";

    pf_guest_memory *mem = NULL;
    pf_status s = pf_guest_memory_new(regions, 2, &options, &mem);
    if (s != PF_OK) return fail("pf_guest_memory_new", s);

    static const char hello[] = "hello, guest";
    char back[sizeof hello];
    if ((s = pf_guest_memory_write(mem, 0x1000, hello, sizeof hello)) != PF_OK ||
        (s = pf_guest_memory_read(mem, 0x1000, back, sizeof back)) != PF_OK) {
        pf_guest_memory_free(mem);
        return fail("write/read", s);
    }
    printf("read back: %s\n", back);

    size_t count = 0;
    pf_guest_memory_region_count(mem, &count);
    for (size_t i = 0; i < count; i++) {
        pf_region_info info;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        if ((s = pf_guest_memory_region_info(mem, i, &info)) != PF_OK) {
            pf_guest_memory_free(mem);
            return fail("pf_guest_memory_region_info", s);
        }
        printf("slot %zu: guest 0x%" PRIx64 " size 0x%" PRIx64 " host 0x%" PRIx64
               " fd %d offset 0x%" PRIx64 "\n",
               i, info.guest_start, info.size, info.host_addr, info.fd, info.file_offset);
    }

    /* An error, and its message. */
    s = pf_guest_memory_read(mem, 0x200000, back, sizeof back);
    fail("read of a hole (expected)", s);

    pf_guest_memory_free(mem);
    return 0;
}
