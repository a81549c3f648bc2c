/*
 * The host service through the C API: two VMM processes (fork()ed
 * children) put their guest memory under a service this process runs; the
 * service folds it; each child checks its memory byte for byte, writes a
 * merged page, checks again and detaches. Then refusals and every argument
 * error.
 *
 * pf-test: needs-userfaultfd
 * (run.sh runs this file natively as well as under valgrind, which lacks
 * userfaultfd: a client needs it -- the service arms write protection in
 * the client's address space through it -- so under valgrind the tests that
 * attach a client report "skip", and an attach there is checked to fail
 * with PF_ERR_USERFAULT. The service itself, and every argument check,
 * runs under valgrind too.)
 */
#include "pf_test.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096ull
#define PAGES 64u    /* per VM */
#define SAME_END 32u /* pages [0, 32): the same in every VM */
#define OWN_END 48u  /* pages [32, 48): each VM its own; [48, 64) never written */
#define CHILDREN 2u
/* A guard against a hang, not a timing: a peer that said nothing for this
 * long is dead or stuck. */
#define PIPE_WAIT_MS 60000

/* The content of page `page` of VM `vm`, before any write of the test. */
static void content(unsigned vm, unsigned page, uint8_t *buf) {
    uint64_t words[PAGE / 8];
    for (unsigned k = 0; k < PAGE / 8; k++) {
        if (page < SAME_END)
            words[k] = (uint64_t)page * 7919u + k + 1;
        else if (page < OWN_END)
            words[k] = ((uint64_t)(vm + 1) << 40) | ((uint64_t)page * 512u + k);
        else
            words[k] = 0;
    }
    memcpy(buf, words, PAGE);
}

/* A socket path unique to this process and `tag`. */
static void socket_path(char *buf, size_t len, const char *tag) {
    snprintf(buf, len, "/tmp/pf-test-service-%ld-%s.sock", (long)getpid(), tag);
}

static pf_scan_report report_init(void) {
    pf_scan_report r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    return r;
}

static pf_service_usage stats_of(const pf_service *service) {
    pf_service_usage s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    CHECK_OK(pf_service_stats(service, &s));
    CHECK_EQ(s.struct_size, sizeof s);
    return s;
}

/* Stats once the service counts `vms` VMs. The service records a VM just
 * after it sends the Welcome that ends the client's attach (see `admit` in
 * src/service/server.rs), so the count can trail a returned attach by a
 * moment; this waits (bounded by PIPE_WAIT_MS) instead of racing it. */
static pf_service_usage stats_with_vms(const pf_service *service, uint64_t vms) {
    pf_service_usage s = stats_of(service);
    for (unsigned i = 0; s.vms != vms && i < PIPE_WAIT_MS; i++) {
        usleep(1000);
        s = stats_of(service);
    }
    CHECK_EQ(s.vms, vms);
    return s;
}

static pf_service_options service_options(void) {
    pf_service_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    return o;
}

static pf_client_options client_options(uint64_t domain, uint64_t tag) {
    pf_client_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.domain = domain;
    o.vm_tag = tag;
    return o;
}

/* One byte from `fd`, or -1 after EOF, an error, or PIPE_WAIT_MS of quiet. */
static int read_byte(int fd) {
    struct pollfd p;
    unsigned char c;
    p.fd = fd;
    p.events = POLLIN;
    p.revents = 0;
    for (;;) {
        int n = poll(&p, 1, PIPE_WAIT_MS);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR) continue;
        return r == 1 ? c : -1;
    }
}

static int write_byte(int fd, char c) {
    ssize_t r;
    do {
        r = write(fd, &c, 1);
    } while (r < 0 && errno == EINTR);
    return r == 1 ? 0 : -1;
}

/* Every page of `mem` reads as VM `vm`'s content, with the first 64 bytes
 * of page 0 replaced by `mark` if `mark` is not 0. Returns whether it did
 * (and fails a check for each page that did not). */
static int check_vm(const pf_guest_memory *mem, unsigned vm, uint8_t mark) {
    uint8_t want[PAGE], got[PAGE];
    int ok = 1;
    for (unsigned p = 0; p < PAGES; p++) {
        content(vm, p, want);
        if (p == 0 && mark != 0) memset(want, mark, 64);
        CHECK_OK(pf_guest_memory_read(mem, p * PAGE, got, PAGE));
        if (memcmp(got, want, PAGE) != 0) {
            PF_FAIL_AT("VM %u page %u differs from its content", vm, p);
            ok = 0;
        }
    }
    return ok;
}

/* A VMM process: guest memory with half of it the same as the other
 * child's, under the service; checks on the parent's word. The exit
 * status names the first step that failed (0: none). */
static int vmm_child(unsigned vm, int from_parent, int to_parent, const char *path) {
    uint8_t buf[PAGE];
    pf_region r = pf_test_region(0, PAGES * PAGE);
    pf_guest_memory *mem = NULL;
    pf_service_client *client = NULL;
    pf_client_options o = client_options(0, vm + 1);
    /* The second VM breaks merged pages through the service, as a VM whose
     * memory a vhost-user backend maps does. */
    o.break_on_write = vm == 1;
    uint64_t vm_id = 0, remapped = 0;
    int connected = -1;

    if (read_byte(from_parent) != 'g') return 10; /* the service is up */
    if (pf_guest_memory_new(&r, 1, NULL, &mem) != PF_OK) return 11;
    for (unsigned p = 0; p < OWN_END; p++) {
        content(vm, p, buf);
        CHECK_OK(pf_guest_memory_write(mem, p * PAGE, buf, PAGE));
    }
    CHECK_OK(pf_service_client_attach(path, mem, &o, &client));
    if (client == NULL) return 12;
    CHECK_OK(pf_service_client_vm_id(client, &vm_id));
    CHECK(vm_id != 0);
    CHECK_OK(pf_service_client_connected(client, &connected));
    CHECK_EQ(connected, 1);
    CHECK_OK(pf_service_client_pages_remapped(client, &remapped));
    CHECK_EQ(remapped, 0);
    if (pf_test_failures != 0) return 13;
    if (write_byte(to_parent, 'r') != 0) return 14; /* attached */

    if (read_byte(from_parent) != 'v') return 15; /* merged: verify */
    CHECK_OK(pf_service_client_pages_remapped(client, &remapped));
    /* The shared half, at least, maps the domain's frames now; the
     * untouched quarter may read as zeros already. */
    CHECK(remapped >= SAME_END);
    CHECK(remapped <= PAGES);
    if (!check_vm(mem, vm, 0)) return 16;
    /* A write to a merged page is this VM's alone (the kernel copies it). */
    memset(buf, 0xa0 + (int)vm, 64);
    CHECK_OK(pf_guest_memory_write(mem, 0, buf, 64));
    if (!check_vm(mem, vm, (uint8_t)(0xa0 + vm))) return 17;
    if (write_byte(to_parent, 'w') != 0) return 18;

    /* The other child wrote its page 0 too: neither sees the other's. */
    if (read_byte(from_parent) != 'd') return 19; /* detach */
    if (!check_vm(mem, vm, (uint8_t)(0xa0 + vm))) return 20;
    CHECK_OK(pf_service_client_detach(client));
    /* Back in its own memfd, bytes intact, and free to be attached again. */
    if (!check_vm(mem, vm, (uint8_t)(0xa0 + vm))) return 21;
    pf_guest_memory_free(mem);
    if (pf_test_failures != 0) return 22;
    if (write_byte(to_parent, 'x') != 0) return 23; /* detached */
    return 0;
}

/* Sends `c` to every child and waits for `want` from every child. */
static int round_trip(const int *to, const int *from, char c, char want) {
    int ok = 1;
    for (unsigned i = 0; i < CHILDREN; i++)
        if (c != 0 && write_byte(to[i], c) != 0) ok = 0;
    for (unsigned i = 0; i < CHILDREN; i++) {
        int got = read_byte(from[i]);
        if (got != want) {
            PF_FAIL_AT("child %u answered %d, expected '%c'", i, got, want);
            ok = 0;
        }
    }
    return ok;
}

TEST(two_processes_fold) {
    if (pf_test_no_userfaultfd()) {
        pf_test_skip_reason = "needs userfaultfd (PF_TEST_NO_USERFAULTFD=1)";
        return;
    }
    char path[108];
    socket_path(path, sizeof path, "fold");
    int to[CHILDREN], from[CHILDREN];
    pid_t pids[CHILDREN];
    for (unsigned i = 0; i < CHILDREN; i++) {
        int down[2], up[2];
        CHECK(pipe(down) == 0);
        CHECK(pipe(up) == 0);
        fflush(NULL); /* no buffered output copied into the child */
        /* The children are forked before the service starts, while this
         * process has one thread: a child of a many-threaded process may
         * only call async-signal-safe functions. They wait for 'g'. */
        pids[i] = fork();
        if (pids[i] == 0) {
            close(down[1]);
            close(up[0]);
            for (unsigned j = 0; j < i; j++) {
                close(to[j]);
                close(from[j]);
            }
            _exit(vmm_child(i, down[0], up[1], path));
        }
        CHECK(pids[i] > 0);
        close(down[0]);
        close(up[1]);
        to[i] = down[1];
        from[i] = up[0];
    }

    pf_service_options so = service_options();
    so.max_vms = 8;
    so.ack_deadline_ms = 5000; /* generous: a loaded machine, not a stuck client */
    pf_service *service = NULL;
    CHECK_OK(pf_service_start(path, &so, &service));
    CHECK(service != NULL);
    if (service != NULL && round_trip(to, from, 'g', 'r')) {
        pf_service_usage before = stats_with_vms(service, CHILDREN);
        CHECK_EQ(before.domains, 1);
        CHECK_EQ(before.pages_merged, 0);
        CHECK(before.guest_bytes >= CHILDREN * OWN_END * PAGE);

        pf_scan_report report = report_init();
        CHECK_OK(pf_service_merge_now(service, &report));
        CHECK_EQ(report.struct_size, sizeof report);
        CHECK(report.pages_scanned >= CHILDREN * OWN_END);
        CHECK(report.merged_shared >= SAME_END);

        pf_service_usage after = stats_of(service);
        CHECK_EQ(after.vms, CHILDREN);
        CHECK(after.pages_merged >= CHILDREN * SAME_END);
        /* The duplicates left the children's memfds for one shared copy. */
        CHECK(after.guest_bytes < before.guest_bytes);
        CHECK(after.guest_bytes <= before.guest_bytes - SAME_END * PAGE);
        CHECK(after.shared_bytes >= SAME_END * PAGE);

        if (round_trip(to, from, 'v', 'w') && round_trip(to, from, 'd', 'x')) {
            pf_service_usage left = stats_of(service);
            CHECK_EQ(left.vms, 0);
        }
    }
    /* Closing the pipes ends a child still waiting (it exits nonzero). */
    for (unsigned i = 0; i < CHILDREN; i++) {
        close(to[i]);
        close(from[i]);
    }
    for (unsigned i = 0; i < CHILDREN; i++) {
        int status = 0;
        if (pids[i] <= 0) continue;
        CHECK(waitpid(pids[i], &status, 0) == pids[i]);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            PF_FAIL_AT("child %u: %s %d (the step numbers are in vmm_child)", i,
                       WIFEXITED(status) ? "exit status" : "killed by signal",
                       WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    }
    pf_service_free(service);
    CHECK(access(path, F_OK) != 0); /* the socket file went with it */
}

TEST(service_start_and_query_errors) {
    char path[108];
    socket_path(path, sizeof path, "errors");
    pf_service *service = NULL;
    pf_service_options o = service_options();

    CHECK_ERR(pf_service_start(NULL, NULL, &service), PF_ERR_NULL_POINTER, "socket_path");
    CHECK_ERR(pf_service_start(path, NULL, NULL), PF_ERR_NULL_POINTER, "out_service");
    CHECK_ERR(pf_service_start("", NULL, &service), PF_ERR_INVALID_ARGUMENT, "empty path");
    o.struct_size = sizeof o - 1;
    CHECK_ERR(pf_service_start(path, &o, &service), PF_ERR_STRUCT_TOO_SMALL,
              "pf_service_options");
    o.struct_size = 0;
    CHECK_ERR(pf_service_start(path, &o, &service), PF_ERR_STRUCT_TOO_SMALL,
              "pf_service_options");
    o = service_options();
    o.background_pages = 64;
    CHECK_ERR(pf_service_start(path, &o, &service), PF_ERR_INVALID_ARGUMENT,
              "background_interval_us");
    o = service_options();
    o.allowed_uid_count = 1;
    CHECK_ERR(pf_service_start(path, &o, &service), PF_ERR_NULL_POINTER, "allowed_uids");
    CHECK_ERR(pf_service_start("/nonexistent-pagefold-dir/s.sock", NULL, &service), PF_ERR_OS,
              "bind the service socket");
    CHECK(service == NULL);

    /* Every option set; no VM yet. */
    uint32_t uids[2] = {(uint32_t)getuid() + 1, (uint32_t)getuid() + 2};
    o = service_options();
    o.ack_deadline_ms = 100;
    o.max_vms = 2;
    o.max_guest_bytes = 1ull << 30;
    o.background_pages = 256;
    o.background_interval_us = 100000;
    o.allowed_uids = uids;
    o.allowed_uid_count = 2;
    CHECK_OK(pf_service_start(path, &o, &service));
    CHECK(service != NULL);
    CHECK(access(path, F_OK) == 0);

    pf_scan_report report = report_init();
    CHECK_OK(pf_service_merge_now(service, &report));
    CHECK_EQ(report.struct_size, sizeof report);
    CHECK_EQ(report.pages_scanned, 0);
    CHECK_OK(pf_service_merge_now(service, NULL));
    CHECK_ERR(pf_service_merge_now(NULL, &report), PF_ERR_NULL_POINTER, "service");
    report.struct_size = 8;
    CHECK_ERR(pf_service_merge_now(service, &report), PF_ERR_STRUCT_TOO_SMALL, "pf_scan_report");

    pf_service_usage s = stats_of(service);
    CHECK_EQ(s.vms, 0);
    CHECK_EQ(s.domains, 0);
    CHECK_EQ(s.guest_bytes, 0);
    CHECK_EQ(s.pages_merged, 0);
    CHECK_ERR(pf_service_stats(service, NULL), PF_ERR_NULL_POINTER, "out_stats");
    CHECK_ERR(pf_service_stats(NULL, &s), PF_ERR_NULL_POINTER, "service");
    s.struct_size = sizeof s - 1;
    CHECK_ERR(pf_service_stats(service, &s), PF_ERR_STRUCT_TOO_SMALL, "pf_service_usage");

    pf_service_free(service);
    CHECK(access(path, F_OK) != 0);
    pf_service_free(NULL);
}

TEST(client_argument_errors) {
    char path[108];
    socket_path(path, sizeof path, "nobody");
    pf_region r = pf_test_region(0, 16 * PAGE);
    pf_guest_memory *mem = pf_test_memory(&r, 1);
    pf_service_client *client = NULL;
    pf_client_options o = client_options(0, 0);
    uint64_t v = 7;
    int connected = 7;

    CHECK_ERR(pf_service_client_attach(NULL, mem, NULL, &client), PF_ERR_NULL_POINTER,
              "socket_path");
    CHECK_ERR(pf_service_client_attach(path, NULL, NULL, &client), PF_ERR_NULL_POINTER, "mem");
    CHECK_ERR(pf_service_client_attach(path, mem, NULL, NULL), PF_ERR_NULL_POINTER, "out_client");
    CHECK_ERR(pf_service_client_attach("", mem, NULL, &client), PF_ERR_INVALID_ARGUMENT,
              "empty path");
    o.struct_size = sizeof o - 1;
    CHECK_ERR(pf_service_client_attach(path, mem, &o, &client), PF_ERR_STRUCT_TOO_SMALL,
              "pf_client_options");

    /* Memory that shares its frame store: the service would get it all. */
    pf_frame_store *store = NULL;
    CHECK_OK(pf_frame_store_new(NULL, &store));
    pf_guest_memory *a = NULL, *b = NULL;
    CHECK_OK(pf_guest_memory_new_in_store(store, &r, 1, &a));
    CHECK_OK(pf_guest_memory_new_in_store(store, &r, 1, &b));
    CHECK_ERR(pf_service_client_attach(path, a, NULL, &client), PF_ERR_INVALID_ARGUMENT,
              "shares its frame store");
    pf_guest_memory_free(a);
    pf_guest_memory_free(b);
    pf_frame_store_free(store);

    /* Nobody listens: no socket file at all, then a socket bound but not
     * listening. The client needs userfaultfd before it connects. */
    pf_status s = pf_service_client_attach(path, mem, NULL, &client);
    if (pf_test_no_userfaultfd()) {
        CHECK_ERR(s, PF_ERR_USERFAULT, "userfaultfd");
    } else {
        CHECK_ERR(s, PF_ERR_OS, "connect to the service: No such file or directory");
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un addr;
        memset(&addr, 0, sizeof addr);
        addr.sun_family = AF_UNIX;
        snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
        CHECK(fd >= 0);
        CHECK(bind(fd, (const struct sockaddr *)&addr, sizeof addr) == 0);
        CHECK_ERR(pf_service_client_attach(path, mem, NULL, &client), PF_ERR_OS,
                  "connect to the service: Connection refused");
        close(fd);
        unlink(path);
    }
    CHECK(client == NULL);

    CHECK_ERR(pf_service_client_vm_id(NULL, &v), PF_ERR_NULL_POINTER, "client");
    CHECK_ERR(pf_service_client_connected(NULL, &connected), PF_ERR_NULL_POINTER, "client");
    CHECK_ERR(pf_service_client_pages_remapped(NULL, &v), PF_ERR_NULL_POINTER, "client");
    CHECK_ERR(pf_service_client_detach(NULL), PF_ERR_NULL_POINTER, "client");
    CHECK_EQ(v, 7);
    CHECK_EQ(connected, 7);
    pf_service_client_free(NULL);
    pf_guest_memory_free(mem);
}

/* In one process (the service, and clients of it): what the service and the
 * client refuse, and the out-parameter checks on a live client. */
TEST(refusals) {
    if (pf_test_no_userfaultfd()) {
        pf_test_skip_reason = "needs userfaultfd (PF_TEST_NO_USERFAULTFD=1)";
        return;
    }
    char path[108];
    socket_path(path, sizeof path, "refusals");
    pf_service_options so = service_options();
    so.max_vms = 1;
    pf_service *service = NULL;
    CHECK_OK(pf_service_start(path, &so, &service));
    if (service == NULL) return;

    pf_region r = pf_test_region(0, 8 * PAGE);
    pf_guest_memory *first = pf_test_memory(&r, 1);
    pf_guest_memory *second = pf_test_memory(&r, 1);
    pf_service_client *c1 = NULL, *c2 = NULL;
    pf_client_options o = client_options(3, 42);
    CHECK_OK(pf_service_client_attach(path, first, &o, &c1));
    CHECK(c1 != NULL);
    (void)stats_with_vms(service, 1);

    /* One memory, one engine at a time. */
    CHECK_ERR(pf_service_client_attach(path, first, NULL, &c2), PF_ERR_INVALID_ARGUMENT,
              "registered with a dedup host already");
    /* The service's limit: its reason travels back. */
    CHECK_ERR(pf_service_client_attach(path, second, NULL, &c2), PF_ERR_SERVICE_REFUSED,
              "maximum of 1 VMs");
    CHECK(c2 == NULL);

    uint64_t v = 0;
    int connected = 0;
    CHECK_ERR(pf_service_client_vm_id(c1, NULL), PF_ERR_NULL_POINTER, "out_vm_id");
    CHECK_ERR(pf_service_client_connected(c1, NULL), PF_ERR_NULL_POINTER, "out_connected");
    CHECK_ERR(pf_service_client_pages_remapped(c1, NULL), PF_ERR_NULL_POINTER, "out_pages");
    CHECK_OK(pf_service_client_vm_id(c1, &v));
    CHECK(v != 0);
    CHECK_OK(pf_service_client_connected(c1, &connected));
    CHECK_EQ(connected, 1);

    /* The guest memory handle may go first: the client holds the memory. */
    pf_guest_memory_free(first);
    CHECK_EQ(stats_of(service).vms, 1);
    CHECK_OK(pf_service_client_detach(c1));
    CHECK_EQ(stats_of(service).vms, 0);

    /* A memory the service refused, and one under a dedup host. */
    CHECK_OK(pf_service_client_attach(path, second, NULL, &c2));
    CHECK(c2 != NULL);
    pf_service_client_free(c2); /* detaches as it frees: the service lets it go */
    pf_guest_memory_free(second);

    pf_frame_store *store = NULL;
    CHECK_OK(pf_frame_store_new(NULL, &store));
    pf_guest_memory *mem = NULL;
    CHECK_OK(pf_guest_memory_new_in_store(store, &r, 1, &mem));
    pf_dedup *dedup = pf_test_dedup(store, NULL);
    uint64_t id = 0;
    CHECK_OK(pf_dedup_register(dedup, mem, NULL, &id));
    pf_service_client *c3 = NULL;
    CHECK_ERR(pf_service_client_attach(path, mem, NULL, &c3), PF_ERR_INVALID_ARGUMENT,
              "registered with a dedup host already");
    CHECK(c3 == NULL);
    /* Once unregistered, the service may have it. */
    CHECK_OK(pf_dedup_unregister(dedup, id));
    CHECK_OK(pf_service_client_attach(path, mem, NULL, &c3));
    CHECK_OK(pf_service_client_detach(c3));
    pf_dedup_free(dedup);
    pf_guest_memory_free(mem);
    pf_frame_store_free(store);
    pf_service_free(service);
}

int main(void) {
    /* The fork test first, while this process has no threads but its own. */
    static const pf_test_case tests[] = {
        PF_TEST_CASE(two_processes_fold),
        PF_TEST_CASE(service_start_and_query_errors),
        PF_TEST_CASE(client_argument_errors),
        PF_TEST_CASE(refusals),
    };
    return pf_test_main("service", tests, sizeof tests / sizeof tests[0]);
}
