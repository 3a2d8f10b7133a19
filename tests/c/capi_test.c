/*
 * capi_test.c: the C contract of libst_proactor.so (include/st_proactor.h), tested through
 * the real shared library.
 *
 * Each test checks one rule of the contract and prints "ok   <name>" or "FAIL <name>: <why>";
 * the last line is "N passed, M failed", and the exit status is 1 when a test failed.
 * With --valgrind the iteration counts are smaller and the time bounds longer.
 *
 * No test can hang: conditions are polled with wait_until() up to a time bound, and a watchdog
 * process ends the program with a FAIL line when a test (say, a blocking library call such as
 * waitProactor or removeHandler) takes far too long.
 *
 * Conventions: only pipes and AF_UNIX socketpairs; every fd opened is closed and everything
 * allocated is freed (valgrind checks it). State shared with handlers is C11 atomics; only the
 * main thread calls CHECK.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "st_proactor.h"

/* ------------------------------------------------------------------------------------------ */
/* Settings                                                                                   */

static bool g_valgrind;         /* --valgrind: ~30x slower, so fewer iterations, more patience */
static double g_patience_s;     /* how long wait_until() waits for a condition */

static int scaled(int normal, int under_valgrind) { return g_valgrind ? under_valgrind : normal; }

/* ------------------------------------------------------------------------------------------ */
/* Failure reporting: CHECK notes the first failure of a test and jumps to its cleanup.       */

static char g_why[512];
static bool g_test_failed;

static void fail_at(int line, const char *format, ...) {
    if (g_test_failed) return; /* the first failure is the interesting one */
    g_test_failed = true;
    int used = snprintf(g_why, sizeof g_why, "line %d: ", line);
    va_list args;
    va_start(args, format);
    vsnprintf(g_why + used, sizeof g_why - (size_t)used, format, args);
    va_end(args);
}

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fail_at(__LINE__, __VA_ARGS__);                                                    \
            goto out;                                                                          \
        }                                                                                      \
    } while (0)

/* `call` must return 0. */
#define CHECK_OK(call)                                                                         \
    do {                                                                                       \
        errno = 0;                                                                             \
        int rc_ = (call);                                                                      \
        int errno_ = errno;                                                                    \
        CHECK(rc_ == 0, "%s returned %d (errno %s), want 0", #call, rc_, strerror(errno_));    \
    } while (0)

/* `call` must return -1 with errno `want`. */
#define CHECK_ERR(call, want)                                                                  \
    do {                                                                                       \
        errno = 0;                                                                             \
        int rc_ = (call);                                                                      \
        int errno_ = errno;                                                                    \
        CHECK(rc_ == -1 && errno_ == (want), "%s returned %d with errno %d (%s), want -1 %s",   \
              #call, rc_, errno_, strerror(errno_), #want);                                    \
    } while (0)

#define CREATE(p) CHECK(((p) = createProactor()) != NULL, "createProactor: %s", strerror(errno))

/* ------------------------------------------------------------------------------------------ */
/* Time and waiting                                                                           */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* Polls cond(arg) every millisecond until it holds (true) or timeout_s has passed (false). */
static bool wait_until(bool (*cond)(void *arg), void *arg, double timeout_s) {
    double deadline = now_s() + timeout_s;
    while (!cond(arg)) {
        if (now_s() >= deadline) return cond(arg);
        sleep_ms(1);
    }
    return true;
}

struct at_least {
    atomic_int *value;
    int min;
};

static bool reached(void *arg) {
    struct at_least *bound = arg;
    return atomic_load(bound->value) >= bound->min;
}

/* Waits (bounded) until *value >= min. */
static bool wait_for(atomic_int *value, int min) {
    struct at_least bound = {value, min};
    return wait_until(reached, &bound, g_patience_s);
}

/* ------------------------------------------------------------------------------------------ */
/* File descriptors                                                                           */

static int make_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC | O_NONBLOCK); }

static int make_socketpair(int fds[2]) {
    return socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds);
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void close_pair(int fds[2]) {
    close_fd(&fds[0]);
    close_fd(&fds[1]);
}

static bool fd_is_open(int fd) { return fcntl(fd, F_GETFD) != -1; }

static bool write_bytes(int fd, const void *data, size_t len) {
    return write(fd, data, len) == (ssize_t)len;
}

static bool write_byte(int fd) { return write_bytes(fd, "x", 1); }

static ssize_t read_byte(int fd) {
    char byte;
    return read(fd, &byte, 1);
}

/* Number of fds this process has open (the library's own ones included). */
static int open_fd_count(void) {
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL) return -1;
    int count = 0;
    for (struct dirent *entry; (entry = readdir(dir)) != NULL;)
        if (entry->d_name[0] != '.') count++;
    closedir(dir);
    return count - 1; /* the directory's own fd */
}

static bool fd_count_is(void *expected) { return open_fd_count() == *(int *)expected; }

/* ------------------------------------------------------------------------------------------ */
/* Handlers shared by several tests                                                           */

static void noop_handler(int fd) { (void)fd; }

static void noop_context_handler(void *proactor, int fd, void *context) {
    (void)proactor;
    (void)fd;
    (void)context;
}

/* A registration's view of its handler's calls. */
struct probe {
    void *proactor;             /* what the handler must be called with */
    int fd;
    bool reads;                 /* read one byte per call; else leave the data (called again) */
    bool silent;                /* no byte is ever written: any call is a stale event's */
    int delay_ms;               /* each call sleeps this long (keeps other events waiting) */
    atomic_int calls;           /* calls started */
    atomic_int inside;          /* 1 while a call runs */
    atomic_int mismatches;      /* calls with another proactor or fd than registered */
    atomic_int eof;             /* calls in which read() returned 0 */
    int calls_at_removal;       /* noted when removeHandler returned (-1: not removed) */
    int inside_at_removal;
};

static void probe_init(struct probe *probe, void *proactor, int fd, bool reads) {
    probe->proactor = proactor;
    probe->fd = fd;
    probe->reads = reads;
    probe->silent = false;
    probe->delay_ms = 0;
    atomic_init(&probe->calls, 0);
    atomic_init(&probe->inside, 0);
    atomic_init(&probe->mismatches, 0);
    atomic_init(&probe->eof, 0);
    probe->calls_at_removal = -1;
    probe->inside_at_removal = 0;
}

static void probe_handler(void *proactor, int fd, void *context) {
    struct probe *probe = context;
    atomic_fetch_add(&probe->inside, 1);
    atomic_fetch_add(&probe->calls, 1);
    if (proactor != probe->proactor || fd != probe->fd) atomic_fetch_add(&probe->mismatches, 1);
    if (probe->reads && read_byte(fd) == 0) atomic_fetch_add(&probe->eof, 1);
    if (probe->delay_ms > 0) sleep_ms(probe->delay_ms);
    atomic_fetch_sub(&probe->inside, 1);
}

static int probe_add(struct probe *probe) {
    return addFD2ProactorWithContext(probe->proactor, probe->fd, probe_handler, probe);
}

/* Removes the probe's registration and notes what its handler was doing at that moment. */
static int probe_remove(struct probe *probe) {
    int rc = removeHandler(probe->proactor, probe->fd);
    int saved_errno = errno;
    probe->inside_at_removal = atomic_load(&probe->inside);
    probe->calls_at_removal = atomic_load(&probe->calls);
    errno = saved_errno;
    return rc;
}

/* After probe_remove: the handler had returned, and no call has started since; and a silent
 * probe's handler was never called at all. */
static bool probe_quiet_since_removal(struct probe *probe) {
    return probe->inside_at_removal == 0 && atomic_load(&probe->calls) == probe->calls_at_removal
        && !(probe->silent && atomic_load(&probe->calls) != 0);
}

/* A handler that takes a while, reading one byte per call and saying when it starts/ends. */
struct slow {
    int sleep_ms;
    atomic_int calls;
    atomic_int started;
    atomic_int finished;
};

static void slow_init(struct slow *slow) {
    slow->sleep_ms = scaled(50, 200);
    atomic_init(&slow->calls, 0);
    atomic_init(&slow->started, 0);
    atomic_init(&slow->finished, 0);
}

static void slow_handler(void *proactor, int fd, void *context) {
    (void)proactor;
    struct slow *slow = context;
    read_byte(fd);
    atomic_fetch_add(&slow->calls, 1);
    atomic_store(&slow->started, 1);
    sleep_ms(slow->sleep_ms);
    atomic_store(&slow->finished, 1);
}

/* A handler that reads one byte per call and, on its first call, makes one library call. */
struct call_from_handler {
    int (*call)(void *proactor);
    atomic_int calls;
    atomic_int done;            /* the call was made; rc and err are set */
    int rc;
    int err;
};

static void call_from_handler_init(struct call_from_handler *c, int (*call)(void *)) {
    c->call = call;
    atomic_init(&c->calls, 0);
    atomic_init(&c->done, 0);
    c->rc = 0;
    c->err = 0;
}

static void calling_handler(void *proactor, int fd, void *context) {
    struct call_from_handler *c = context;
    read_byte(fd);
    if (atomic_fetch_add(&c->calls, 1) != 0) return;
    errno = 0;
    c->rc = c->call(proactor);
    c->err = errno;
    atomic_store(&c->done, 1); /* publishes rc and err */
}

/* Registers `c` for the pipe `fds` with a new running proactor, makes the pipe readable and
 * waits for the handler's call. The caller cleans up *proactor and fds. */
static bool run_call_from_handler(struct call_from_handler *c, void **proactor, int fds[2]) {
    CREATE(*proactor);
    CHECK_OK(addFD2ProactorWithContext(*proactor, fds[0], calling_handler, c));
    CHECK_OK(runProactor(*proactor));
    CHECK(write_bytes(fds[1], "xy", 2), "write: %s", strerror(errno));
    CHECK(wait_for(&c->done, 1), "the handler was not called within %.0f s", g_patience_s);
out:
    return !g_test_failed;
}

/* ------------------------------------------------------------------------------------------ */
/* Misuse: each returns -1 with the documented errno                                          */

/* Rule: a NULL proactor gives -1/EINVAL from every function, NULL/EINVAL from the backend name. */
static void test_null_proactor_gives_einval(void) {
    int fds[2] = {-1, -1};
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CHECK_ERR(addFD2Proactor(NULL, fds[0], noop_handler), EINVAL);
    CHECK_ERR(addFD2ProactorWithContext(NULL, fds[0], noop_context_handler, NULL), EINVAL);
    CHECK_ERR(removeHandler(NULL, fds[0]), EINVAL);
    CHECK_ERR(runProactor(NULL), EINVAL);
    CHECK_ERR(cancelProactor(NULL), EINVAL);
    CHECK_ERR(requestCancelProactor(NULL), EINVAL);
    CHECK_ERR(waitProactor(NULL), EINVAL);
    CHECK_ERR(destroyProactor(NULL), EINVAL);
    errno = 0;
    const char *name = getProactorBackend(NULL);
    int err = errno;
    CHECK(name == NULL && err == EINVAL, "getProactorBackend(NULL) gave %s, errno %s",
          name ? name : "NULL", strerror(err));
out:
    close_pair(fds);
}

/* Rule: a negative fd gives EINVAL (add, add with context, remove). */
static void test_negative_fd_gives_einval(void) {
    void *p = NULL;
    CREATE(p);
    CHECK_ERR(addFD2Proactor(p, -1, noop_handler), EINVAL);
    CHECK_ERR(addFD2ProactorWithContext(p, -5, noop_context_handler, NULL), EINVAL);
    CHECK_ERR(removeHandler(p, -1), EINVAL);
out:
    if (p) destroyProactor(p);
}

/* Rule: a NULL handler gives EINVAL, and nothing is registered. */
static void test_null_handler_gives_einval(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_ERR(addFD2Proactor(p, fds[0], NULL), EINVAL);
    CHECK_ERR(addFD2ProactorWithContext(p, fds[0], NULL, fds), EINVAL);
    CHECK_ERR(removeHandler(p, fds[0]), ENOENT);
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: adding an fd that is registered already gives EEXIST (both add functions). */
static void test_add_twice_gives_eexist(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2Proactor(p, fds[0], noop_handler));
    CHECK_ERR(addFD2Proactor(p, fds[0], noop_handler), EEXIST);
    CHECK_ERR(addFD2ProactorWithContext(p, fds[0], noop_context_handler, NULL), EEXIST);
    CHECK_OK(removeHandler(p, fds[0]));
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], noop_context_handler, NULL));
    CHECK_ERR(addFD2ProactorWithContext(p, fds[0], noop_context_handler, NULL), EEXIST);
    CHECK_ERR(addFD2Proactor(p, fds[0], noop_handler), EEXIST);
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: removing an fd that is not registered gives ENOENT (never added; removed already).
 * removeHandler never closes the fd. */
static void test_remove_unregistered_gives_enoent(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_ERR(removeHandler(p, fds[0]), ENOENT);
    CHECK_OK(addFD2Proactor(p, fds[0], noop_handler));
    CHECK_OK(removeHandler(p, fds[0]));
    CHECK(fd_is_open(fds[0]), "removeHandler closed the fd");
    CHECK_ERR(removeHandler(p, fds[0]), ENOENT);
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: removeHandler works (returns 0) after the fd was closed. */
static void test_remove_after_close_succeeds(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2Proactor(p, fds[0], noop_handler));
    int closed = fds[0];
    close_fd(&fds[0]);
    CHECK_OK(removeHandler(p, closed));
    CHECK_ERR(removeHandler(p, closed), ENOENT);
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: adding an fd that is not open gives EBADF, and leaves nothing registered. */
static void test_add_closed_fd_gives_ebadf(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    int closed = fds[0];
    close_fd(&fds[0]);
    CHECK_ERR(addFD2Proactor(p, closed, noop_handler), EBADF);
    CHECK_ERR(addFD2ProactorWithContext(p, closed, noop_context_handler, NULL), EBADF);
    CHECK_ERR(removeHandler(p, closed), ENOENT);
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: adding a regular file gives EPERM, and leaves nothing registered. */
static void test_add_regular_file_gives_eperm(void) {
    void *p = NULL;
    FILE *file = tmpfile();
    CHECK(file != NULL, "tmpfile: %s", strerror(errno));
    CREATE(p);
    CHECK_ERR(addFD2Proactor(p, fileno(file), noop_handler), EPERM);
    CHECK_ERR(addFD2ProactorWithContext(p, fileno(file), noop_context_handler, NULL), EPERM);
    CHECK_ERR(removeHandler(p, fileno(file)), ENOENT);
    CHECK(fd_is_open(fileno(file)), "the failed add closed the file");
out:
    if (p) destroyProactor(p);
    if (file) fclose(file);
}

/* Rule: runProactor while the loop runs gives EALREADY. */
static void test_run_while_running_gives_ealready(void) {
    void *p = NULL;
    CREATE(p);
    CHECK_OK(runProactor(p));
    CHECK_ERR(runProactor(p), EALREADY);
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
}

/* Rule: cancelProactor while the loop is not running gives ESRCH (never run; cancelled). */
static void test_cancel_while_stopped_gives_esrch(void) {
    void *p = NULL;
    CREATE(p);
    CHECK_ERR(cancelProactor(p), ESRCH);
    CHECK_OK(runProactor(p));
    CHECK_OK(cancelProactor(p));
    CHECK_ERR(cancelProactor(p), ESRCH);
out:
    if (p) destroyProactor(p);
}

/* Rule: waitProactor from a handler of the same proactor gives EDEADLK. */
static void test_wait_in_handler_gives_edeadlk(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct call_from_handler c;
    call_from_handler_init(&c, waitProactor);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CHECK(run_call_from_handler(&c, &p, fds), "setup failed");
    CHECK(c.rc == -1 && c.err == EDEADLK, "waitProactor in a handler returned %d, errno %s",
          c.rc, strerror(c.err));
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: runProactor from a handler of the same proactor gives EALREADY. */
static void test_run_in_handler_gives_ealready(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct call_from_handler c;
    call_from_handler_init(&c, runProactor);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CHECK(run_call_from_handler(&c, &p, fds), "setup failed");
    CHECK(c.rc == -1 && c.err == EALREADY, "runProactor in a handler returned %d, errno %s",
          c.rc, strerror(c.err));
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* ------------------------------------------------------------------------------------------ */
/* The loop and its handlers                                                                  */

static struct {
    atomic_int calls;
    pthread_t thread; /* of the first call; written before calls becomes 1 */
} g_seed;

static void seed_handler(int fd) {
    read_byte(fd);
    if (atomic_load(&g_seed.calls) == 0) g_seed.thread = pthread_self();
    atomic_fetch_add(&g_seed.calls, 1);
}

/* Rule: runProactor returns at once, and handlers (seed API) run on another thread. */
static void test_run_returns_at_once_handlers_on_loop_thread(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    atomic_store(&g_seed.calls, 0);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2Proactor(p, fds[0], seed_handler));
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    double start = now_s();
    CHECK_OK(runProactor(p));
    double took = now_s() - start;
    CHECK(took < scaled(1, 10), "runProactor took %.2f s", took);
    CHECK(wait_for(&g_seed.calls, 1), "the handler was not called");
    CHECK(!pthread_equal(g_seed.thread, pthread_self()), "the handler ran on the main thread");
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Reads one byte per call, checking the bytes' order; counts the end of stream. */
struct stream_reader {
    atomic_int received;
    atomic_int out_of_order;
    atomic_int eof;
};

static void stream_handler(void *proactor, int fd, void *context) {
    (void)proactor;
    struct stream_reader *reader = context;
    unsigned char byte;
    ssize_t n = read(fd, &byte, 1);
    if (n == 1) {
        if (byte != (unsigned char)atomic_load(&reader->received))
            atomic_fetch_add(&reader->out_of_order, 1);
        atomic_fetch_add(&reader->received, 1);
    } else if (n == 0) {
        atomic_fetch_add(&reader->eof, 1);
    }
}

/* Rule: level-triggered: one read() of one byte per call sees all 100 bytes of one write, in
 * order, then read() == 0 once the writer has closed. */
static void test_level_triggered_sees_every_byte_then_eof(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct stream_reader reader;
    atomic_init(&reader.received, 0);
    atomic_init(&reader.out_of_order, 0);
    atomic_init(&reader.eof, 0);
    unsigned char data[100];
    for (int i = 0; i < 100; i++) data[i] = (unsigned char)i;
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], stream_handler, &reader));
    CHECK_OK(runProactor(p));
    CHECK(write_bytes(fds[1], data, sizeof data), "write: %s", strerror(errno));
    CHECK(wait_for(&reader.received, 100), "received %d of 100 bytes",
          atomic_load(&reader.received));
    CHECK(atomic_load(&reader.out_of_order) == 0, "bytes out of order");
    CHECK(atomic_load(&reader.eof) == 0, "read() returned 0 before the writer closed");
    close_fd(&fds[1]);
    CHECK(wait_for(&reader.eof, 1), "the handler never saw read() == 0 after the close");
    CHECK_OK(removeHandler(p, fds[0]));
    CHECK(atomic_load(&reader.received) == 100, "received %d bytes", atomic_load(&reader.received));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: a handler with context gets (proactor, fd, context) exactly as registered. */
static void test_context_handler_gets_its_registration(void) {
    void *p = NULL;
    int a[2] = {-1, -1}, b[2] = {-1, -1};
    struct probe probe_a, probe_b;
    CHECK(make_pipe(a) == 0 && make_pipe(b) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    probe_init(&probe_a, p, a[0], true);
    probe_init(&probe_b, p, b[0], true);
    CHECK_OK(probe_add(&probe_a));
    CHECK_OK(probe_add(&probe_b));
    CHECK_OK(runProactor(p));
    CHECK(write_bytes(a[1], "aa", 2) && write_byte(b[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe_a.calls, 2) && wait_for(&probe_b.calls, 1), "handlers not called");
    CHECK_OK(cancelProactor(p));
    CHECK(atomic_load(&probe_a.mismatches) == 0 && atomic_load(&probe_b.mismatches) == 0,
          "a handler got another proactor or fd than registered");
out:
    if (p) destroyProactor(p);
    close_pair(a);
    close_pair(b);
}

/* Rule: in a child of fork(), a proactor of the parent refuses every call with ECHILD but
 * destroyProactor, which returns 0 at once (no join of a loop thread that does not exist in
 * the child) and leaves the parent's epoll set or ring alone: the parent's handler is still
 * called afterwards. */
static void test_fork_child_may_only_destroy_the_parents_proactor(void) {
    void *p = NULL;
    int a[2] = {-1, -1}, b[2] = {-1, -1};
    struct probe probe_a;
    pid_t child = -1;
    /* The child leaks the parent's proactor on purpose, which valgrind's leak check would
     * turn into the child's exit status: the rule is checked in the normal runs only. */
    if (g_valgrind) return;
    CHECK(make_pipe(a) == 0 && make_pipe(b) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    probe_init(&probe_a, p, a[0], true);
    CHECK_OK(probe_add(&probe_a));
    CHECK_OK(runProactor(p));
    CHECK(write_byte(a[1]) && wait_for(&probe_a.calls, 1), "the handler was not called");
    fflush(stdout);
    child = fork();
    CHECK(child >= 0, "fork: %s", strerror(errno));
    if (child == 0) {
        int code = 0;
        if (runProactor(p) != -1 || errno != ECHILD) code = 1;
        else if (addFD2Proactor(p, b[0], noop_handler) != -1 || errno != ECHILD) code = 2;
        else if (removeHandler(p, a[0]) != -1 || errno != ECHILD) code = 3;
        else if (cancelProactor(p) != -1 || errno != ECHILD) code = 4;
        else if (getProactorBackend(p) != NULL) code = 5;
        else if (destroyProactor(p) != 0) code = 6;
        _exit(code);
    }
    int status = 0;
    double deadline = now_s() + g_patience_s;
    pid_t done = 0;
    while ((done = waitpid(child, &status, WNOHANG)) == 0 && now_s() < deadline) sleep_ms(10);
    if (done == 0) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        CHECK(false, "the child hung (destroyProactor waited for the parent's loop thread?)");
    }
    CHECK(done == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "the child failed check %d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    /* The parent's loop still watches its fd. */
    CHECK(write_byte(a[1]) && wait_for(&probe_a.calls, 2),
          "the parent's handler was not called after the child destroyed its copy");
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(a);
    close_pair(b);
}

/* Removes its own fd on its first call, without reading: data remains. */
struct self_remover {
    atomic_int calls;
    atomic_int returned; /* removeHandler returned; rc and err are set */
    int rc;
    int err;
};

static void self_removing_handler(void *proactor, int fd, void *context) {
    struct self_remover *remover = context;
    atomic_fetch_add(&remover->calls, 1);
    errno = 0;
    remover->rc = removeHandler(proactor, fd);
    remover->err = errno;
    atomic_store(&remover->returned, 1);
}

/* Rule: a handler may remove its own fd: no deadlock, and it is not called again although
 * unread data remains. */
static void test_handler_removes_its_own_fd(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct self_remover remover = {0};
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], self_removing_handler, &remover));
    CHECK_OK(runProactor(p));
    CHECK(write_bytes(fds[1], "data", 4), "write: %s", strerror(errno));
    CHECK(wait_for(&remover.returned, 1), "removeHandler in the handler did not return");
    CHECK(remover.rc == 0, "removeHandler in the handler returned %d, errno %s", remover.rc,
          strerror(remover.err));
    sleep_ms(scaled(50, 300));
    CHECK(atomic_load(&remover.calls) == 1, "called %d times", atomic_load(&remover.calls));
    CHECK_ERR(removeHandler(p, fds[0]), ENOENT);
    CHECK(fd_is_open(fds[0]), "the fd was closed");
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* On its first call, registers another fd (with a probe as its context). */
struct adder {
    struct probe *other;
    atomic_int calls;
    atomic_int done;
    int rc;
    int err;
};

static void adding_handler(void *proactor, int fd, void *context) {
    struct adder *adder = context;
    read_byte(fd);
    if (atomic_fetch_add(&adder->calls, 1) != 0) return;
    errno = 0;
    adder->rc = addFD2ProactorWithContext(proactor, adder->other->fd, probe_handler, adder->other);
    adder->err = errno;
    atomic_store(&adder->done, 1);
}

/* Rule: a handler may add a new fd, and that fd's handler is then called. */
static void test_handler_adds_an_fd(void) {
    void *p = NULL;
    int a[2] = {-1, -1}, b[2] = {-1, -1};
    struct probe other;
    struct adder adder = {0};
    CHECK(make_pipe(a) == 0 && make_pipe(b) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    probe_init(&other, p, b[0], true);
    adder.other = &other;
    CHECK_OK(addFD2ProactorWithContext(p, a[0], adding_handler, &adder));
    CHECK_OK(runProactor(p));
    CHECK(write_byte(a[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&adder.done, 1), "the first handler was not called");
    CHECK(adder.rc == 0, "add in a handler returned %d, errno %s", adder.rc, strerror(adder.err));
    CHECK(write_byte(b[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&other.calls, 1), "the handler added from a handler was not called");
    CHECK(atomic_load(&other.mismatches) == 0, "wrong proactor or fd");
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(a);
    close_pair(b);
}

/* Reads one byte per call and cancels its own proactor every time. */
struct canceller {
    atomic_int calls;
    atomic_int failures;
};

static void cancelling_handler(void *proactor, int fd, void *context) {
    struct canceller *canceller = context;
    read_byte(fd);
    atomic_fetch_add(&canceller->calls, 1);
    if (cancelProactor(proactor) != 0) atomic_fetch_add(&canceller->failures, 1);
}

/* Rule: cancelProactor from a handler returns 0 and the loop stops after that handler
 * (waitProactor returns; no further call of it or of another ready fd's handler although
 * data remains); runProactor starts it again and handlers are called again. */
static void test_handler_cancels_its_proactor(void) {
    void *p = NULL;
    int fds[2] = {-1, -1}, other[2] = {-1, -1};
    struct canceller canceller = {0};
    CHECK(make_pipe(fds) == 0 && make_pipe(other) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], cancelling_handler, &canceller));
    CHECK_OK(addFD2ProactorWithContext(p, other[0], cancelling_handler, &canceller));
    CHECK(write_bytes(fds[1], "xy", 2) && write_byte(other[1]), "write: %s", strerror(errno));
    CHECK_OK(runProactor(p));
    CHECK(wait_for(&canceller.calls, 1), "the handler was not called");
    CHECK_OK(waitProactor(p));
    CHECK(atomic_load(&canceller.calls) == 1, "called %d times before the loop stopped",
          atomic_load(&canceller.calls));
    CHECK(atomic_load(&canceller.failures) == 0, "cancelProactor in the handler failed");
    CHECK_ERR(cancelProactor(p), ESRCH);
    CHECK_OK(runProactor(p));
    CHECK(wait_for(&canceller.calls, 2), "the handler was not called after the restart");
    CHECK_OK(waitProactor(p));
    CHECK(atomic_load(&canceller.calls) == 2, "called %d times", atomic_load(&canceller.calls));
    CHECK(atomic_load(&canceller.failures) == 0, "cancelProactor in the handler failed");
out:
    if (p) destroyProactor(p);
    close_pair(fds);
    close_pair(other);
}

/* Rule: run / cancel / run again from the main thread: registrations survive, and no handler
 * runs while the loop is stopped. */
static void test_restart_keeps_registrations(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct probe probe;
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    probe_init(&probe, p, fds[0], true);
    CHECK_OK(probe_add(&probe));
    for (int cycle = 1; cycle <= 3; cycle++) {
        CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
        sleep_ms(scaled(20, 100));
        CHECK(atomic_load(&probe.calls) == cycle - 1, "a handler ran while the loop was stopped");
        CHECK_OK(runProactor(p));
        CHECK(wait_for(&probe.calls, cycle), "not called in run %d", cycle);
        CHECK_OK(cancelProactor(p));
        CHECK(atomic_load(&probe.inside) == 0, "a handler runs after cancelProactor returned");
    }
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: handlers run one at a time (two busy fds, never two calls at once). */
static atomic_int g_inside_any;
static atomic_int g_overlaps;
static atomic_int g_serial_calls;

static void serial_handler(int fd) {
    if (atomic_fetch_add(&g_inside_any, 1) != 0) atomic_fetch_add(&g_overlaps, 1);
    sleep_ms(1);
    read_byte(fd);
    atomic_fetch_add(&g_serial_calls, 1);
    atomic_fetch_sub(&g_inside_any, 1);
}

static void test_handlers_run_one_at_a_time(void) {
    void *p = NULL;
    int a[2] = {-1, -1}, b[2] = {-1, -1};
    char data[20];
    memset(data, 'x', sizeof data);
    atomic_store(&g_overlaps, 0);
    atomic_store(&g_serial_calls, 0);
    CHECK(make_pipe(a) == 0 && make_pipe(b) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2Proactor(p, a[0], serial_handler));
    CHECK_OK(addFD2Proactor(p, b[0], serial_handler));
    CHECK(write_bytes(a[1], data, sizeof data) && write_bytes(b[1], data, sizeof data), "write");
    CHECK_OK(runProactor(p));
    CHECK(wait_for(&g_serial_calls, 40), "%d of 40 calls", atomic_load(&g_serial_calls));
    CHECK_OK(cancelProactor(p));
    CHECK(atomic_load(&g_overlaps) == 0, "%d calls overlapped", atomic_load(&g_overlaps));
out:
    if (p) destroyProactor(p);
    close_pair(a);
    close_pair(b);
}

/* Rule: the loop thread blocks asynchronous signals; the caller's mask is left alone. */
struct mask_check {
    atomic_int done;
    atomic_int blocked; /* SIGINT, SIGTERM and SIGUSR1 are all blocked on the loop thread */
};

static void mask_handler(void *proactor, int fd, void *context) {
    (void)proactor;
    struct mask_check *check = context;
    sigset_t mask;
    read_byte(fd);
    sigemptyset(&mask);
    pthread_sigmask(SIG_BLOCK, NULL, &mask);
    atomic_store(&check->blocked, sigismember(&mask, SIGINT) && sigismember(&mask, SIGTERM) &&
                                      sigismember(&mask, SIGUSR1));
    atomic_store(&check->done, 1);
}

static void test_loop_thread_blocks_signals(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct mask_check check = {0};
    sigset_t mine;
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], mask_handler, &check));
    CHECK_OK(runProactor(p));
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&check.done, 1), "the handler was not called");
    CHECK(atomic_load(&check.blocked), "the loop thread does not block SIGINT/SIGTERM/SIGUSR1");
    pthread_sigmask(SIG_BLOCK, NULL, &mine);
    CHECK(!sigismember(&mine, SIGUSR1), "runProactor changed the caller's signal mask");
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* ------------------------------------------------------------------------------------------ */
/* Removal and cancel from other threads                                                      */

/* Rule: removeHandler from another thread while that handler runs waits until it returned. */
static void test_remove_waits_for_running_handler(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct slow slow;
    slow_init(&slow);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], slow_handler, &slow));
    CHECK_OK(runProactor(p));
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&slow.started, 1), "the handler was not called");
    CHECK_OK(removeHandler(p, fds[0]));
    CHECK(atomic_load(&slow.finished) == 1, "removeHandler returned while the handler ran");
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    sleep_ms(scaled(50, 300));
    CHECK(atomic_load(&slow.calls) == 1, "called %d times", atomic_load(&slow.calls));
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: cancelProactor from another thread while a handler runs waits until it returned. */
static void test_cancel_waits_for_running_handler(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct slow slow;
    slow_init(&slow);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], slow_handler, &slow));
    CHECK_OK(runProactor(p));
    CHECK(write_bytes(fds[1], "xy", 2), "write: %s", strerror(errno));
    CHECK(wait_for(&slow.started, 1), "the handler was not called");
    CHECK_OK(cancelProactor(p));
    int calls = atomic_load(&slow.calls);
    CHECK(atomic_load(&slow.finished) == 1, "cancelProactor returned while the handler ran");
    sleep_ms(scaled(50, 300));
    CHECK(atomic_load(&slow.calls) == calls, "a handler ran after cancelProactor returned");
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: once removeHandler returned on another thread, the handler is never entered again,
 * even when the fd number is reused at once by the next registration (each registration
 * has its own context, so a stale call is seen on the old one). Handlers never read, so
 * they are called again and again until removed. Every eighth registration gets no data:
 * an event of an earlier registration of its fd number must not reach it. A slow handler of
 * an always-ready fd keeps events of the others waiting in the loop's batch meanwhile. */
static void test_no_call_after_remove_with_fd_reuse(void) {
    void *p = NULL;
    int fds[2] = {-1, -1}, busy[2] = {-1, -1};
    int iterations = scaled(2000, 400), reused = 0, previous_fd = -1;
    struct probe *probes = calloc((size_t)iterations, sizeof *probes);
    struct probe busy_probe;
    CHECK(probes != NULL, "out of memory");
    CHECK(make_pipe(busy) == 0 && write_byte(busy[1]), "pipe2/write: %s", strerror(errno));
    CREATE(p);
    probe_init(&busy_probe, p, busy[0], false);
    busy_probe.delay_ms = 1;
    CHECK_OK(probe_add(&busy_probe));
    CHECK_OK(runProactor(p));
    for (int i = 0; i < iterations; i++) {
        struct probe *probe = &probes[i];
        CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
        reused += fds[0] == previous_fd;
        previous_fd = fds[0];
        probe_init(probe, p, fds[0], false);
        probe->silent = i % 8 == 1; /* right after one that waited to be called */
        CHECK_OK(probe_add(probe));
        if (probe->silent) sleep_ms(2); /* for a stale event of the previous one to arrive */
        else CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
        if (i % 4 == 0) CHECK(wait_for(&probe->calls, 1), "iteration %d: not called", i);
        CHECK_OK(probe_remove(probe));
        CHECK(probe->inside_at_removal == 0, "iteration %d: removeHandler returned while its "
              "handler ran", i);
        close_pair(fds);
    }
    sleep_ms(scaled(20, 100));
    CHECK_OK(cancelProactor(p));
    CHECK(reused > 0, "fd numbers were never reused: the test did not test reuse");
    for (int i = 0; i < iterations; i++) {
        CHECK(probe_quiet_since_removal(&probes[i]), "iteration %d: handler entered after "
              "removeHandler returned, or without data (%d calls, %d at removal, %s)", i,
              atomic_load(&probes[i].calls), probes[i].calls_at_removal,
              probes[i].silent ? "no data" : "data");
        CHECK(atomic_load(&probes[i].mismatches) == 0, "iteration %d: stale (fd, context) "
              "pair: an event of one registration reached another", i);
    }
out:
    if (p) destroyProactor(p);
    close_pair(fds);
    close_pair(busy);
    free(probes);
}

/* One of the threads that add and remove pipes while the loop runs. */
struct worker {
    pthread_t thread;
    void *proactor;
    int iterations;
    struct probe *probes;       /* one per iteration */
    int failures;               /* add/remove that did not return 0, pipe/write failures */
    int not_called;             /* handlers that were waited for in vain */
    char first_failure[128];
};

static void worker_failed(struct worker *w, const char *what, int i) {
    if (w->failures++ == 0)
        snprintf(w->first_failure, sizeof w->first_failure, "%s (iteration %d): %s", what, i,
                 strerror(errno));
}

static void worker_iteration(struct worker *w, int i) {
    int fds[2];
    if (make_pipe(fds) != 0) {
        worker_failed(w, "pipe2", i);
        return;
    }
    struct probe *probe = &w->probes[i];
    probe_init(probe, w->proactor, fds[0], true);
    probe->silent = i % 8 == 1; /* right after one that waited to be called */
    if (probe_add(probe) != 0) {
        worker_failed(w, "addFD2ProactorWithContext", i);
    } else {
        if (probe->silent) sleep_ms(2); /* for a stale event of an earlier one to arrive */
        else if (!write_byte(fds[1])) worker_failed(w, "write", i);
        if (i % 8 == 0 && !wait_for(&probe->calls, 1)) w->not_called++;
        if (probe_remove(probe) != 0) worker_failed(w, "removeHandler", i);
    }
    close(fds[0]);
    close(fds[1]);
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    for (int i = 0; i < w->iterations; i++) worker_iteration(w, i);
    return NULL;
}

/* Writes a byte every millisecond to a pipe until told to stop: data keeps flowing. */
struct flow {
    pthread_t thread;
    int fd;
    atomic_int stop;
    int written;
};

static void *flow_main(void *arg) {
    struct flow *flow = arg;
    while (!atomic_load(&flow->stop)) {
        flow->written += write_byte(flow->fd);
        sleep_ms(1);
    }
    return NULL;
}

/* Checks the workers' results once they have all been joined. */
static bool workers_consistent(struct worker *workers, int count) {
    for (int t = 0; t < count; t++) {
        struct worker *w = &workers[t];
        CHECK(w->failures == 0, "thread %d: %d failures, first: %s", t, w->failures,
              w->first_failure);
        CHECK(w->not_called == 0, "thread %d: %d handlers never called", t, w->not_called);
        for (int i = 0; i < w->iterations; i++) {
            CHECK(probe_quiet_since_removal(&w->probes[i]), "thread %d iteration %d: handler "
                  "running or entered after removeHandler returned, or called without data "
                  "(%d calls, %d at removal)", t, i, atomic_load(&w->probes[i].calls),
                  w->probes[i].calls_at_removal);
            CHECK(atomic_load(&w->probes[i].mismatches) == 0, "thread %d iteration %d: "
                  "handler called with another registration's fd", t, i);
        }
    }
out:
    return !g_test_failed;
}

enum { WORKERS = 8 };

/* Rule: 8 threads add and remove thousands of pipes while the loop runs and data flows;
 * every add and remove returns 0, every removal is final, no registration gets an event of
 * an earlier one of its fd number, and the loop still works. */
static void test_concurrent_add_remove_from_8_threads(void) {
    void *p = NULL;
    int data[2] = {-1, -1};
    struct worker workers[WORKERS];
    struct flow flow = {.fd = -1};
    struct probe flow_probe;
    int started = 0;
    bool flowing = false;
    memset(workers, 0, sizeof workers);
    atomic_init(&flow.stop, 0);
    CHECK(make_pipe(data) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    probe_init(&flow_probe, p, data[0], true);
    flow_probe.delay_ms = 1; /* keeps the workers' events waiting in the loop's batch */
    CHECK_OK(probe_add(&flow_probe));
    CHECK_OK(runProactor(p));
    flow.fd = data[1];
    CHECK(pthread_create(&flow.thread, NULL, flow_main, &flow) == 0, "pthread_create");
    flowing = true;
    for (; started < WORKERS; started++) {
        struct worker *w = &workers[started];
        w->proactor = p;
        w->iterations = scaled(400, 50);
        w->probes = calloc((size_t)w->iterations, sizeof *w->probes);
        CHECK(w->probes != NULL, "out of memory");
        CHECK(pthread_create(&w->thread, NULL, worker_main, w) == 0, "pthread_create");
    }
out:
    /* Join whatever was started, then check (plain ifs: CHECK would jump back to `out`). */
    for (int t = 0; t < started; t++) pthread_join(workers[t].thread, NULL);
    if (flowing) {
        atomic_store(&flow.stop, 1);
        pthread_join(flow.thread, NULL);
    }
    if (!g_test_failed && !wait_for(&flow_probe.calls, flow.written))
        fail_at(__LINE__, "the flowing pipe got %d calls for %d bytes",
                atomic_load(&flow_probe.calls), flow.written);
    if (p && !g_test_failed && cancelProactor(p) != 0)
        fail_at(__LINE__, "cancelProactor: %s", strerror(errno));
    if (!g_test_failed) workers_consistent(workers, WORKERS);
    if (p) destroyProactor(p);
    close_pair(data);
    for (int t = 0; t < WORKERS; t++) free(workers[t].probes);
}

/* Rule: two proactors side by side each call only their own handlers, with their own handle. */
static void test_two_proactors_are_independent(void) {
    void *p1 = NULL, *p2 = NULL;
    int s1[2] = {-1, -1}, s2[2] = {-1, -1};
    struct probe probe1, probe2;
    CHECK(make_socketpair(s1) == 0 && make_socketpair(s2) == 0, "socketpair: %s",
          strerror(errno));
    CREATE(p1);
    CREATE(p2);
    probe_init(&probe1, p1, s1[0], true);
    probe_init(&probe2, p2, s2[0], true);
    CHECK_OK(probe_add(&probe1));
    CHECK_OK(probe_add(&probe2));
    CHECK_ERR(removeHandler(p1, s2[0]), ENOENT);
    CHECK_OK(runProactor(p1));
    CHECK_OK(runProactor(p2));
    CHECK(write_byte(s1[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe1.calls, 1), "the first proactor's handler was not called");
    CHECK(write_byte(s2[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe2.calls, 1), "the second proactor's handler was not called");
    CHECK_OK(cancelProactor(p1));
    CHECK(write_byte(s1[1]) && write_byte(s2[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe2.calls, 2), "the second proactor stopped with the first");
    sleep_ms(scaled(20, 100));
    CHECK(atomic_load(&probe1.calls) == 1, "the cancelled proactor still calls its handler");
    CHECK(atomic_load(&probe1.mismatches) == 0 && atomic_load(&probe2.mismatches) == 0,
          "a handler got the other proactor or fd");
    CHECK_OK(cancelProactor(p2));
out:
    if (p1) destroyProactor(p1);
    if (p2) destroyProactor(p2);
    close_pair(s1);
    close_pair(s2);
}

/* ------------------------------------------------------------------------------------------ */
/* Signals, wait, destroy, backend                                                            */

static _Atomic(void *) g_signal_proactor;
static atomic_int g_signals;          /* signal handler runs */
static atomic_int g_signal_failures;  /* requestCancelProactor != 0, or errno changed */

static void on_sigusr1(int sig) {
    (void)sig;
    int saved = errno;
    errno = ENOTTY; /* requestCancelProactor must leave errno alone on success */
    if (requestCancelProactor(atomic_load(&g_signal_proactor)) != 0 || errno != ENOTTY)
        atomic_fetch_add(&g_signal_failures, 1);
    errno = saved;
    atomic_fetch_add(&g_signals, 1);
}

/* Sends SIGUSR1 (to this thread, or to the process), then waits for the loop to stop. */
static bool cancel_by_signal(void *p, bool whole_process) {
    int before = atomic_load(&g_signals);
    int rc = whole_process ? kill(getpid(), SIGUSR1) : pthread_kill(pthread_self(), SIGUSR1);
    CHECK(rc == 0, "sending SIGUSR1 failed");
    CHECK(wait_for(&g_signals, before + 1), "the signal handler did not run");
    CHECK_OK(waitProactor(p));
    CHECK(atomic_load(&g_signal_failures) == 0, "requestCancelProactor in the signal handler "
          "failed or changed errno");
    CHECK_ERR(cancelProactor(p), ESRCH);
out:
    return !g_test_failed;
}

/* Rule: requestCancelProactor from a real signal handler stops the loop, and waitProactor
 * then returns; the loop can be run again. */
static void test_request_cancel_from_signal_handler(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct probe probe;
    struct sigaction action, previous;
    bool installed = false;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigusr1;
    sigemptyset(&action.sa_mask);
    atomic_store(&g_signal_failures, 0);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    atomic_store(&g_signal_proactor, p);
    CHECK(sigaction(SIGUSR1, &action, &previous) == 0, "sigaction: %s", strerror(errno));
    installed = true;
    probe_init(&probe, p, fds[0], true);
    CHECK_OK(probe_add(&probe));
    CHECK_OK(runProactor(p));
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe.calls, 1), "the handler was not called");
    CHECK(cancel_by_signal(p, false), "pthread_kill");
    CHECK_OK(runProactor(p));
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe.calls, 2), "the handler was not called after the restart");
    CHECK(cancel_by_signal(p, true), "kill");
out:
    if (installed) sigaction(SIGUSR1, &previous, NULL);
    if (p) destroyProactor(p);
    atomic_store(&g_signal_proactor, NULL);
    close_pair(fds);
}

/* Rule: requestCancelProactor on a stopped loop has no effect (a later run is not stopped by
 * it) and leaves errno alone; waitProactor on a stopped loop returns 0 at once. */
static void test_request_and_wait_on_stopped_loop(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct probe probe;
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    CREATE(p);
    double start = now_s();
    CHECK_OK(waitProactor(p));
    CHECK(now_s() - start < scaled(1, 10), "waitProactor on a stopped loop blocked");
    errno = ENOTTY;
    CHECK(requestCancelProactor(p) == 0 && errno == ENOTTY, "requestCancelProactor on a "
          "stopped loop failed or changed errno");
    probe_init(&probe, p, fds[0], true);
    CHECK_OK(probe_add(&probe));
    CHECK_OK(runProactor(p));
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe.calls, 1), "the loop was stopped by a request made before it ran");
    CHECK_OK(cancelProactor(p));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: destroyProactor on a running loop returns 0 once no handler runs, closes the
 * library's own fds and never a registered fd; no handler is called afterwards. */
static void test_destroy_running_proactor(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct slow slow;
    slow_init(&slow);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    int baseline = open_fd_count();
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], slow_handler, &slow));
    CHECK_OK(runProactor(p));
    CHECK(write_bytes(fds[1], "xy", 2), "write: %s", strerror(errno));
    CHECK(wait_for(&slow.started, 1), "the handler was not called");
    void *doomed = p;
    p = NULL;
    CHECK_OK(destroyProactor(doomed));
    int calls = atomic_load(&slow.calls);
    CHECK(atomic_load(&slow.finished) == 1, "destroyProactor returned while a handler ran");
    CHECK(fd_is_open(fds[0]) && fd_is_open(fds[1]), "destroyProactor closed a registered fd");
    CHECK(open_fd_count() == baseline, "%d fds open after destroy, %d before create",
          open_fd_count(), baseline);
    sleep_ms(scaled(50, 300));
    CHECK(atomic_load(&slow.calls) == calls, "a handler ran after destroyProactor returned");
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* One create ... destroy cycle, in one of three shapes. */
static bool lifecycle_cycle(int shape) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    CREATE(p);
    if (shape == 1) {
        CHECK_OK(runProactor(p));
        CHECK_OK(cancelProactor(p));
    } else if (shape == 2) {
        CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
        CHECK_OK(addFD2Proactor(p, fds[0], noop_handler));
        CHECK_OK(runProactor(p));
        CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    }
    void *doomed = p;
    p = NULL;
    CHECK_OK(destroyProactor(doomed));
    CHECK(fds[0] < 0 || fd_is_open(fds[0]), "destroyProactor closed a registered fd");
out:
    if (p) destroyProactor(p);
    close_pair(fds);
    return !g_test_failed;
}

/* Rule: create/destroy, create/run/cancel/destroy and create/add/run/destroy, many times,
 * leak no fd (and, under valgrind, no memory). */
static void test_create_run_destroy_cycles(void) {
    int baseline = open_fd_count();
    int cycles = scaled(300, 60);
    for (int i = 0; i < cycles; i++) CHECK(lifecycle_cycle(i % 3), "cycle %d", i);
    CHECK(open_fd_count() == baseline, "%d fds open after %d cycles, %d before",
          open_fd_count(), cycles, baseline);
out:
    return;
}

/* Rule: destroyProactor from inside one of its handlers returns 0; the loop stops after that
 * handler (no further call although data remains), then the library's own fds are closed;
 * the registered fds are not. */
static void test_destroy_from_handler(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct call_from_handler c;
    call_from_handler_init(&c, destroyProactor);
    CHECK(make_pipe(fds) == 0, "pipe2: %s", strerror(errno));
    int baseline = open_fd_count();
    bool called = run_call_from_handler(&c, &p, fds);
    if (atomic_load(&c.done)) p = NULL; /* the handler destroyed it */
    CHECK(called, "setup failed");
    CHECK(c.rc == 0, "destroyProactor in a handler returned %d, errno %s", c.rc,
          strerror(c.err));
    CHECK(wait_until(fd_count_is, &baseline, g_patience_s), "the library's fds are still "
          "open after a destroy from a handler (%d open, %d before create)", open_fd_count(),
          baseline);
    CHECK(fd_is_open(fds[0]) && fd_is_open(fds[1]), "destroyProactor closed a registered fd");
    sleep_ms(scaled(20, 100));
    CHECK(atomic_load(&c.calls) == 1, "the handler was called %d times",
          atomic_load(&c.calls));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Creates a proactor with ST_PROACTOR_BACKEND set to `value` (unset for NULL), stderr
 * silenced (the library explains a bad value there); errno is kept for the caller. */
static void *create_with_backend(const char *value) {
    int saved_stderr = dup(STDERR_FILENO), null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null >= 0) dup2(null, STDERR_FILENO);
    if (value) setenv("ST_PROACTOR_BACKEND", value, 1);
    else unsetenv("ST_PROACTOR_BACKEND");
    void *p = createProactor();
    int err = errno;
    if (saved_stderr >= 0) dup2(saved_stderr, STDERR_FILENO);
    close_fd(&saved_stderr);
    close_fd(&null);
    errno = err;
    return p;
}

static bool backend_name_valid(const char *name) {
    return name != NULL && (strcmp(name, "epoll") == 0 || strcmp(name, "io_uring") == 0);
}

/* Rule: getProactorBackend names "epoll" or "io_uring", and the one ST_PROACTOR_BACKEND
 * asks for; an unknown name makes createProactor fail with EINVAL; "uring" gives an io_uring
 * proactor or ENOTSUP. */
static void test_backend_name_follows_environment(void) {
    void *p = NULL;
    const char *env = getenv("ST_PROACTOR_BACKEND");
    char *original = env ? strdup(env) : NULL;
    CREATE(p);
    const char *name = getProactorBackend(p);
    CHECK(backend_name_valid(name), "getProactorBackend gave %s", name ? name : "NULL");
    if (original && strcmp(original, "epoll") == 0)
        CHECK(strcmp(name, "epoll") == 0, "ST_PROACTOR_BACKEND=epoll but the backend is %s", name);
    if (original && (strcmp(original, "uring") == 0 || strcmp(original, "io_uring") == 0))
        CHECK(strcmp(name, "io_uring") == 0, "ST_PROACTOR_BACKEND=%s but the backend is %s",
              original, name);
    destroyProactor(p);
    p = create_with_backend("epoll");
    CHECK(p != NULL, "createProactor with ST_PROACTOR_BACKEND=epoll: %s", strerror(errno));
    name = getProactorBackend(p);
    CHECK(name && strcmp(name, "epoll") == 0, "ST_PROACTOR_BACKEND=epoll gave %s",
          name ? name : "NULL");
    destroyProactor(p);
    p = create_with_backend("kqueue");
    CHECK(p == NULL && errno == EINVAL, "ST_PROACTOR_BACKEND=kqueue: createProactor gave %p, "
          "errno %s; want NULL, EINVAL", p, strerror(errno));
    p = create_with_backend("uring");
    if (p == NULL)
        CHECK(errno == ENOTSUP, "ST_PROACTOR_BACKEND=uring: errno %s, want ENOTSUP",
              strerror(errno));
    else
        CHECK((name = getProactorBackend(p)) != NULL && strcmp(name, "io_uring") == 0,
              "ST_PROACTOR_BACKEND=uring gave a %s proactor", name ? name : "NULL");
out:
    if (p) destroyProactor(p);
    if (original) setenv("ST_PROACTOR_BACKEND", original, 1);
    else unsetenv("ST_PROACTOR_BACKEND");
    free(original);
}

/* ------------------------------------------------------------------------------------------ */
/* Watchdog: a child process that ends the program when a test runs far too long.           */
/*                                                                                            */
/* A process, forked before any thread exists, rather than a thread: under valgrind, a thread */
/* blocked in a syscall valgrind does not know may block (io_uring_enter in valgrind 3.19)    */
/* stalls every thread of the process, a watchdog thread included. The parent sends one line */
/* per test, "<passed> <failed> <name>", and "-" once the test is over; if a test is still   */
/* running after the bound, the child prints its FAIL line and the summary, and kills the    */
/* parent with SIGKILL. End of file on the pipe means the parent is done.                    */

static int g_watchdog_fd = -1;
static pid_t g_watchdog_pid = -1;
static char g_backend[16] = "?";  /* the backend of a default proactor, for the hint below */

static void note_backend(void) {
    void *p = createProactor();
    if (p == NULL) return;
    snprintf(g_backend, sizeof g_backend, "%s", getProactorBackend(p));
    destroyProactor(p);
}

static void watchdog_fire(pid_t parent, const char *line, int bound_s) {
    int passed = 0, failed = 0, name_at = 0;
    sscanf(line, "%d %d %n", &passed, &failed, &name_at);
    const char *hint = g_valgrind && strcmp(g_backend, "io_uring") == 0
        ? " (backend io_uring under valgrind: a thread blocked in io_uring_enter seems to keep "
          "valgrind's lock and stall every thread)" : "";
    dprintf(STDOUT_FILENO, "FAIL %s: still running after %d s: a library call or a wait never "
            "returned%s\n%d passed, %d failed\n", line + name_at, bound_s, hint, passed,
            failed + 1);
    kill(parent, SIGKILL);
    _exit(1);
}

static void watchdog_main(int fd, pid_t parent, int bound_s) {
    char buffer[512], current[sizeof buffer] = "";
    size_t used = 0;
    double deadline = 0; /* 0: no test running */
    for (;;) {
        int timeout_ms = deadline == 0 ? -1 : (int)((deadline - now_s()) * 1000.0) + 1;
        if (deadline != 0 && timeout_ms <= 0) watchdog_fire(parent, current, bound_s);
        struct pollfd pollfd = {fd, POLLIN, 0};
        if (poll(&pollfd, 1, timeout_ms) <= 0) continue; /* timeout (checked above) or EINTR */
        ssize_t n = read(fd, buffer + used, sizeof buffer - 1 - used);
        if (n <= 0) _exit(0); /* the parent is done (or gone) */
        used += (size_t)n;
        buffer[used] = '\0';
        for (char *end; (end = strchr(buffer, '\n')) != NULL;) {
            *end = '\0';
            if (strcmp(buffer, "-") == 0) {
                deadline = 0;
            } else {
                snprintf(current, sizeof current, "%s", buffer);
                deadline = now_s() + bound_s;
            }
            used -= (size_t)(end + 1 - buffer);
            memmove(buffer, end + 1, used + 1);
        }
        if (used == sizeof buffer - 1) used = 0; /* a line too long: drop it */
    }
}

static bool watchdog_start(int bound_s) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return false;
    pid_t parent = getpid();
    g_watchdog_pid = fork();
    if (g_watchdog_pid < 0) return false;
    if (g_watchdog_pid == 0) {
        close(fds[1]);
        watchdog_main(fds[0], parent, bound_s);
    }
    close(fds[0]);
    g_watchdog_fd = fds[1];
    return true;
}

static void watchdog_arm(const char *name, int passed, int failed) {
    dprintf(g_watchdog_fd, "%d %d %s\n", passed, failed, name);
}

static void watchdog_disarm(void) { dprintf(g_watchdog_fd, "-\n"); }

static void watchdog_stop(void) {
    close_fd(&g_watchdog_fd);
    waitpid(g_watchdog_pid, NULL, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Runner                                                                                     */

struct test {
    const char *name;
    void (*run)(void);
};

/* ------------------------------------------------------------------------------------------ */
/* Queued sends and completion operations                                                     */

struct receive_log {
    atomic_int bytes;     /* bytes delivered so far */
    atomic_int corrupt;   /* bytes that were not the expected value */
    atomic_int ended;     /* 1 after the last call (0 = end of stream) */
    atomic_int removed;   /* 1 if the fd was no longer registered at the last call */
};

static void on_received(void *proactor, int fd, ssize_t result, const void *data, void *context) {
    struct receive_log *log = context;
    if (result > 0) {
        const unsigned char *bytes = data;
        int seen = atomic_load(&log->bytes);
        for (ssize_t i = 0; i < result; i++)
            if (bytes[i] != (unsigned char)((seen + i) % 251)) atomic_fetch_add(&log->corrupt, 1);
        atomic_fetch_add(&log->bytes, (int)result);
        return;
    }
    /* The last call: the fd is removed already, so removing it again is ENOENT. */
    atomic_store(&log->removed, removeHandler(proactor, fd) == -1 && errno == ENOENT);
    atomic_store(&log->ended, 1);
}

/* Rule: bytes handed to sendViaProactor arrive whole and in order; receiveViaProactor delivers
 * them, then one last call with 0 at the end of the stream, by which time the fd is removed. */
static void test_send_and_receive_via_proactor(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct receive_log log;
    atomic_init(&log.bytes, 0);
    atomic_init(&log.corrupt, 0);
    atomic_init(&log.ended, 0);
    atomic_init(&log.removed, 0);
    enum { TOTAL = 300000, CHUNK = 1000 };
    unsigned char chunk[CHUNK];
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2Proactor(p, fds[1], noop_handler));
    CHECK_OK(receiveViaProactor(p, fds[0], on_received, &log));
    CHECK_OK(runProactor(p));
    for (int sent = 0; sent < TOTAL; sent += CHUNK) {
        for (int i = 0; i < CHUNK; i++) chunk[i] = (unsigned char)((sent + i) % 251);
        CHECK_OK(sendViaProactor(p, fds[1], chunk, sizeof chunk));
    }
    CHECK(wait_for(&log.bytes, TOTAL), "received %d of %d bytes", atomic_load(&log.bytes), TOTAL);
    CHECK(atomic_load(&log.corrupt) == 0, "%d bytes out of place", atomic_load(&log.corrupt));
    CHECK_OK(removeHandler(p, fds[1]));
    close_fd(&fds[1]);
    CHECK(wait_for(&log.ended, 1), "no last call after the peer closed");
    CHECK(atomic_load(&log.removed) == 1, "the fd was still registered at the last call");
    CHECK_ERR(sendViaProactor(p, fds[0], "x", 1), ENOENT);
    CHECK_ERR(receiveViaProactor(p, fds[0], NULL, NULL), EINVAL);
    /* The send limit reads back as set. */
    CHECK(getProactorSendLimit(p) == 4194304, "default send limit %zu", getProactorSendLimit(p));
    CHECK_OK(setProactorSendLimit(p, 1000));
    CHECK(getProactorSendLimit(p) == 1000, "send limit %zu after setting 1000",
          getProactorSendLimit(p));
    CHECK_ERR(setProactorSendLimit(NULL, 1000), EINVAL);
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

struct accept_log {
    atomic_int accepted;
    atomic_int bad_peer;
    int fds[8];
};

static void on_accepted(void *proactor, int listen_fd, int fd, const struct sockaddr *peer,
                        socklen_t peer_len, void *context) {
    (void)proactor;
    (void)listen_fd;
    struct accept_log *log = context;
    if (fd < 0) return;
    if (peer == NULL || peer_len < (socklen_t)sizeof(struct sockaddr_in) ||
        peer->sa_family != AF_INET)
        atomic_fetch_add(&log->bad_peer, 1);
    int index = atomic_load(&log->accepted);
    if (index < 8) log->fds[index] = fd; else close(fd);
    atomic_fetch_add(&log->accepted, 1);
}

/* Rule: acceptViaProactor calls its handler once per connection, with the new fd and the
 * peer's address, until the listener is removed. */
static void test_accept_via_proactor(void) {
    void *p = NULL;
    int listener = -1, clients[8];
    struct accept_log log;
    atomic_init(&log.accepted, 0);
    atomic_init(&log.bad_peer, 0);
    for (int i = 0; i < 8; i++) clients[i] = log.fds[i] = -1;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t size = sizeof address;
    listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(listener >= 0, "socket: %s", strerror(errno));
    CHECK(bind(listener, (struct sockaddr *)&address, size) == 0, "bind: %s", strerror(errno));
    CHECK(listen(listener, 16) == 0, "listen: %s", strerror(errno));
    CHECK(getsockname(listener, (struct sockaddr *)&address, &size) == 0, "getsockname");
    CREATE(p);
    CHECK_OK(acceptViaProactor(p, listener, on_accepted, &log));
    CHECK_ERR(acceptViaProactor(p, listener, on_accepted, &log), EEXIST);
    CHECK_OK(runProactor(p));
    for (int i = 0; i < 8; i++) {
        clients[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(clients[i] >= 0, "socket: %s", strerror(errno));
        CHECK(connect(clients[i], (struct sockaddr *)&address, sizeof address) == 0,
              "connect: %s", strerror(errno));
    }
    CHECK(wait_for(&log.accepted, 8), "accepted %d of 8", atomic_load(&log.accepted));
    CHECK(atomic_load(&log.bad_peer) == 0, "a peer address was wrong");
    CHECK_OK(removeHandler(p, listener));
out:
    if (p) destroyProactor(p);
    for (int i = 0; i < 8; i++) {
        if (clients[i] >= 0) close(clients[i]);
        if (log.fds[i] >= 0) close(log.fds[i]);
    }
    if (listener >= 0) close(listener);
}

/* ------------------------------------------------------------------------------------------ */
/* Flow control: pause/resume reading, watermarks and their events, stalls                    */

/* Rule: a NULL proactor gives -1/EINVAL from every flow-control function. */
static void test_flow_functions_with_null_proactor_give_einval(void) {
    int fds[2] = {-1, -1};
    size_t low = 0, high = 0;
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CHECK_ERR(pauseProactorReading(NULL, fds[0]), EINVAL);
    CHECK_ERR(resumeProactorReading(NULL, fds[0]), EINVAL);
    CHECK_ERR(setProactorWatermarks(NULL, 1, 2), EINVAL);
    CHECK_ERR(getProactorWatermarks(NULL, &low, &high), EINVAL);
    CHECK_ERR(setProactorFlowHandler(NULL, NULL, NULL), EINVAL);
    CHECK_ERR(setProactorStallTimeout(NULL, 100), EINVAL);
    CHECK_ERR(setProactorStallTimeout(NULL, 0), EINVAL);
    CHECK_ERR(setProactorLagTimeout(NULL, 100), EINVAL);
    CHECK_ERR(setProactorLagTimeout(NULL, 0), EINVAL);
out:
    close_pair(fds);
}

/* Rule: pause and resume give EINVAL for a negative fd and ENOENT for an fd that is not
 * registered (never added; removed). */
static void test_pause_and_resume_give_einval_for_negative_fd_enoent_unregistered(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    CHECK_ERR(pauseProactorReading(p, -1), EINVAL);
    CHECK_ERR(resumeProactorReading(p, -7), EINVAL);
    CHECK_ERR(pauseProactorReading(p, fds[0]), ENOENT);
    CHECK_ERR(resumeProactorReading(p, fds[0]), ENOENT);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], noop_context_handler, NULL));
    CHECK_OK(pauseProactorReading(p, fds[0]));
    CHECK_OK(removeHandler(p, fds[0]));
    CHECK_ERR(pauseProactorReading(p, fds[0]), ENOENT);
    CHECK_ERR(resumeProactorReading(p, fds[0]), ENOENT);
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: the watermarks default to 262144 / 1048576 (the header's DEFAULT_LOW_WATERMARK and
 * DEFAULT_HIGH_WATERMARK) and read back as set; low > high gives EINVAL and changes nothing;
 * a NULL out pointer gives EINVAL; a stall timeout of 0 (off) or more is taken. */
static void test_watermarks_default_read_back_and_refuse_bad_arguments(void) {
    void *p = NULL;
    size_t low = 0, high = 0;
    CREATE(p);
    CHECK_OK(getProactorWatermarks(p, &low, &high));
    CHECK(low == 262144 && high == 1048576, "default watermarks %zu / %zu", low, high);
    CHECK(low == (size_t)DEFAULT_LOW_WATERMARK && high == (size_t)DEFAULT_HIGH_WATERMARK,
          "the header's defaults differ: %zu / %zu", low, high);
    CHECK_OK(setProactorWatermarks(p, 1000, 5000));
    CHECK_OK(getProactorWatermarks(p, &low, &high));
    CHECK(low == 1000 && high == 5000, "watermarks %zu / %zu after setting 1000 / 5000", low, high);
    CHECK_ERR(setProactorWatermarks(p, 5001, 5000), EINVAL);
    CHECK_OK(getProactorWatermarks(p, &low, &high));
    CHECK(low == 1000 && high == 5000, "a refused setting changed them to %zu / %zu", low, high);
    CHECK_OK(setProactorWatermarks(p, 3000, 3000));
    CHECK_ERR(getProactorWatermarks(p, NULL, &high), EINVAL);
    CHECK_ERR(getProactorWatermarks(p, &low, NULL), EINVAL);
    CHECK_ERR(getProactorWatermarks(p, NULL, NULL), EINVAL);
    CHECK_OK(setProactorStallTimeout(p, 250));
    CHECK_OK(setProactorStallTimeout(p, 0));
    CHECK_OK(setProactorFlowHandler(p, NULL, NULL)); /* none set: clearing is fine */
out:
    if (p) destroyProactor(p);
}

/* What a flow handler saw, for the fd it expects. */
struct flow_log {
    void *proactor;             /* what the handler must be called with */
    int fd;
    pthread_t main_thread;
    atomic_int high;
    atomic_int drained;
    atomic_int stalled;
    atomic_int lagging;
    atomic_int unknown;         /* events of another code */
    atomic_int mismatches;      /* calls with another proactor or fd */
    atomic_int on_main_thread;  /* calls on the test's own thread */
    atomic_int queued_failed;   /* getProactorQueuedBytes failed inside the handler */
    atomic_size_t high_queued;  /* `queued` of the last event of each kind */
    atomic_size_t drained_queued;
    atomic_size_t stalled_queued;
    _Atomic double stalled_at;  /* now_s() at the first STALLED */
    _Atomic double lagging_at;  /* now_s() at the first LAGGING */
};

static void flow_log_init(struct flow_log *log, void *proactor, int fd) {
    log->proactor = proactor;
    log->fd = fd;
    log->main_thread = pthread_self();
    atomic_init(&log->high, 0);
    atomic_init(&log->drained, 0);
    atomic_init(&log->stalled, 0);
    atomic_init(&log->lagging, 0);
    atomic_init(&log->unknown, 0);
    atomic_init(&log->mismatches, 0);
    atomic_init(&log->on_main_thread, 0);
    atomic_init(&log->queued_failed, 0);
    atomic_init(&log->high_queued, 0);
    atomic_init(&log->drained_queued, 0);
    atomic_init(&log->stalled_queued, 0);
    atomic_init(&log->stalled_at, 0.0);
    atomic_init(&log->lagging_at, 0.0);
}

static void flow_logger(void *proactor, int fd, int event, size_t queued, void *context) {
    struct flow_log *log = context;
    if (proactor != log->proactor || fd != log->fd) atomic_fetch_add(&log->mismatches, 1);
    if (pthread_equal(pthread_self(), log->main_thread)) atomic_fetch_add(&log->on_main_thread, 1);
    size_t now_queued = 0; /* any function may be called from a flow handler */
    if (getProactorQueuedBytes(proactor, fd, &now_queued) != 0)
        atomic_fetch_add(&log->queued_failed, 1);
    switch (event) {
    case ST_PROACTOR_FLOW_HIGH:
        atomic_store(&log->high_queued, queued);
        atomic_fetch_add(&log->high, 1); /* last: publishes what is above */
        break;
    case ST_PROACTOR_FLOW_DRAINED:
        atomic_store(&log->drained_queued, queued);
        atomic_fetch_add(&log->drained, 1);
        break;
    case ST_PROACTOR_FLOW_STALLED:
        atomic_store(&log->stalled_queued, queued);
        if (atomic_load(&log->stalled) == 0) atomic_store(&log->stalled_at, now_s());
        atomic_fetch_add(&log->stalled, 1);
        break;
    case ST_PROACTOR_FLOW_LAGGING:
        if (atomic_load(&log->lagging) == 0) atomic_store(&log->lagging_at, now_s());
        atomic_fetch_add(&log->lagging, 1);
        break;
    default:
        atomic_fetch_add(&log->unknown, 1);
    }
}

/* Hands `total` bytes to the proactor for `fd`, in sends of 64 KiB. */
static bool send_in_chunks(void *p, int fd, size_t total) {
    static const unsigned char chunk[65536];
    for (size_t sent = 0; sent < total; sent += sizeof chunk)
        if (sendViaProactor(p, fd, chunk, sizeof chunk) != 0) return false;
    return true;
}

/* Reads from the non-blocking `fd` until `total` bytes came, or `timeout_s` passed. */
static bool read_until(int fd, size_t total, double timeout_s) {
    static unsigned char buffer[65536];
    double deadline = now_s() + timeout_s;
    size_t got = 0;
    while (got < total) {
        ssize_t n = read(fd, buffer, sizeof buffer);
        if (n > 0) {
            got += (size_t)n;
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR) || now_s() >= deadline) {
            return false;
        } else {
            sleep_ms(1);
        }
    }
    return true;
}

/* Rule: over a socketpair whose reader does not read, ST_PROACTOR_FLOW_HIGH comes once, on
 * the loop thread, with the proactor, the fd, the context and queued > high; once the reader
 * reads, ST_PROACTOR_FLOW_DRAINED once with queued <= low; after setProactorFlowHandler(p,
 * NULL, NULL), a new crossing reaches no handler. */
static void test_flow_handler_gets_high_then_drained_with_its_context(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct flow_log log;
    enum { TOTAL = 2 << 20 };
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    flow_log_init(&log, p, fds[0]);
    CHECK_OK(setProactorFlowHandler(p, flow_logger, &log));
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], noop_context_handler, NULL));
    CHECK_OK(runProactor(p));
    CHECK(send_in_chunks(p, fds[0], TOTAL), "sendViaProactor: %s", strerror(errno));
    CHECK(wait_for(&log.high, 1), "no ST_PROACTOR_FLOW_HIGH within %.0f s", g_patience_s);
    CHECK(atomic_load(&log.high_queued) > 1048576 &&
              atomic_load(&log.high_queued) <= TOTAL + 32 * 64,
          "HIGH with %zu bytes queued", atomic_load(&log.high_queued));
    sleep_ms(scaled(200, 1000));
    CHECK(atomic_load(&log.high) == 1 && atomic_load(&log.drained) == 0,
          "%d HIGH and %d DRAINED while the reader does not read", atomic_load(&log.high),
          atomic_load(&log.drained));
    CHECK(read_until(fds[1], TOTAL, g_patience_s), "the reader did not get the %d bytes", TOTAL);
    CHECK(wait_for(&log.drained, 1), "no ST_PROACTOR_FLOW_DRAINED within %.0f s", g_patience_s);
    CHECK(atomic_load(&log.drained_queued) <= 262144, "DRAINED with %zu bytes queued",
          atomic_load(&log.drained_queued));
    CHECK(atomic_load(&log.mismatches) == 0, "the flow handler got another proactor or fd");
    CHECK(atomic_load(&log.on_main_thread) == 0, "the flow handler ran on the test's thread");
    CHECK(atomic_load(&log.queued_failed) == 0, "getProactorQueuedBytes failed in the handler");
    CHECK(atomic_load(&log.unknown) == 0 && atomic_load(&log.stalled) == 0,
          "unexpected events (no stall timeout is set)");
    /* Cleared (from the loop thread's point of view: after the loop stopped), then a new
     * crossing: nothing reaches the old handler. */
    CHECK_OK(cancelProactor(p));
    CHECK_OK(setProactorFlowHandler(p, NULL, NULL));
    CHECK_OK(runProactor(p));
    CHECK(send_in_chunks(p, fds[0], TOTAL), "sendViaProactor: %s", strerror(errno));
    sleep_ms(scaled(300, 1000));
    CHECK(atomic_load(&log.high) == 1 && atomic_load(&log.drained) == 1,
          "a cleared flow handler was called (%d HIGH, %d DRAINED)", atomic_load(&log.high),
          atomic_load(&log.drained));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: with a stall timeout (setProactorStallTimeout, ms), a reader that does not read gets
 * one ST_PROACTOR_FLOW_STALLED, not before the timeout has passed since the output started
 * waiting, and no second one while the stall goes on. */
static void test_stall_timeout_gives_one_stalled_for_a_reader_that_does_not_read(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct flow_log log;
    const int timeout_ms = 200;
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    flow_log_init(&log, p, fds[0]);
    CHECK_OK(setProactorFlowHandler(p, flow_logger, &log));
    CHECK_OK(setProactorStallTimeout(p, timeout_ms));
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], noop_context_handler, NULL));
    CHECK_OK(runProactor(p));
    double started = now_s();
    CHECK(send_in_chunks(p, fds[0], 1 << 20), "sendViaProactor: %s", strerror(errno));
    CHECK(wait_for(&log.stalled, 1), "no ST_PROACTOR_FLOW_STALLED within %.0f s", g_patience_s);
    double after = atomic_load(&log.stalled_at) - started;
    CHECK(after >= timeout_ms / 1000.0, "STALLED %.3f s after the output started", after);
    CHECK(atomic_load(&log.stalled_queued) > 0, "STALLED with nothing queued");
    sleep_ms(scaled(5 * timeout_ms, 10 * timeout_ms));
    CHECK(atomic_load(&log.stalled) == 1, "%d STALLED for one stall", atomic_load(&log.stalled));
    CHECK(atomic_load(&log.mismatches) == 0, "the flow handler got another proactor or fd");
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: with a lag timeout (setProactorLagTimeout, ms), an fd that stays above the high
 * watermark gets one ST_PROACTOR_FLOW_LAGGING, not before the timeout has passed since its
 * HIGH, and no second one while the congestion goes on; after its DRAINED, a new congestion
 * gets its own. */
static void test_lag_timeout_gives_one_lagging_per_congestion(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct flow_log log;
    const int timeout_ms = 200;
    enum { TOTAL = 2 << 20 };
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    flow_log_init(&log, p, fds[0]);
    CHECK_OK(setProactorFlowHandler(p, flow_logger, &log));
    CHECK_OK(setProactorLagTimeout(p, timeout_ms));
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], noop_context_handler, NULL));
    CHECK_OK(runProactor(p));
    double started = now_s();
    CHECK(send_in_chunks(p, fds[0], TOTAL), "sendViaProactor: %s", strerror(errno));
    CHECK(wait_for(&log.lagging, 1), "no ST_PROACTOR_FLOW_LAGGING within %.0f s", g_patience_s);
    double after = atomic_load(&log.lagging_at) - started;
    CHECK(after >= timeout_ms / 1000.0, "LAGGING %.3f s after the sends began", after);
    CHECK(atomic_load(&log.high) == 1, "%d HIGH before LAGGING", atomic_load(&log.high));
    sleep_ms(scaled(5 * timeout_ms, 10 * timeout_ms));
    CHECK(atomic_load(&log.lagging) == 1, "%d LAGGING for one congestion",
          atomic_load(&log.lagging));
    CHECK(read_until(fds[1], TOTAL, g_patience_s), "the reader did not get the %d bytes", TOTAL);
    CHECK(wait_for(&log.drained, 1), "no ST_PROACTOR_FLOW_DRAINED within %.0f s", g_patience_s);
    CHECK(send_in_chunks(p, fds[0], TOTAL), "sendViaProactor: %s", strerror(errno));
    CHECK(wait_for(&log.lagging, 2), "no LAGGING for a second congestion");
    CHECK(atomic_load(&log.mismatches) == 0 && atomic_load(&log.unknown) == 0,
          "the flow handler got another proactor, fd or event");
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Rule: a send that cannot fit under the send limit by itself is refused with ENOBUFS before
 * any byte is copied (here `buf` holds 16 bytes: a copy of the length given would crash), and
 * a length over PTRDIFF_MAX is EINVAL; for a broadcast, every fd gets ENOBUFS. A send that
 * fits exactly is taken. */
static void test_oversized_sends_are_refused_before_any_copy(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    static const unsigned char small[16];
    size_t queued = 1;
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2Proactor(p, fds[0], noop_handler));
    CHECK_ERR(sendViaProactor(p, fds[0], small, (size_t)1 << 40), ENOBUFS);
    CHECK_ERR(sendViaProactor(p, fds[0], small, (size_t)PTRDIFF_MAX + 1), EINVAL);
    CHECK_ERR(sendViaProactor(p, fds[0], small, SIZE_MAX), EINVAL);
    int targets[2] = {fds[0], fds[0]};
    int results[2] = {0, 0};
    CHECK_ERR(broadcastViaProactor(p, targets, 2, small, (size_t)1 << 40, results), ENOBUFS);
    CHECK(results[0] == ENOBUFS && results[1] == ENOBUFS, "results %d, %d", results[0],
          results[1]);
    CHECK_OK(getProactorQueuedBytes(p, fds[0], &queued));
    CHECK(queued == 0, "%zu bytes queued after refused sends", queued);
    /* 16 bytes plus 64 of bookkeeping: over a limit of 79, exactly a limit of 80. */
    CHECK_OK(setProactorSendLimit(p, 79));
    CHECK_ERR(sendViaProactor(p, fds[0], small, sizeof small), ENOBUFS);
    CHECK_OK(setProactorSendLimit(p, 80));
    CHECK_OK(sendViaProactor(p, fds[0], small, sizeof small));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

static int input_waiting(int fd) {
    int count = -1;
    if (ioctl(fd, FIONREAD, &count) != 0) return -1;
    return count;
}

/* Rule: a paused fd's context handler is not called while its bytes wait in the socket;
 * after resume it reads them all; pause and resume are idempotent; a hang-up while paused
 * is seen (read() == 0) only after resume. */
static void test_pause_and_resume_reading_with_a_context_handler(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct probe probe;
    const int quiet_ms = scaled(300, 1000);
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    probe_init(&probe, p, fds[0], true);
    CHECK_OK(probe_add(&probe));
    CHECK_OK(runProactor(p));
    CHECK(write_byte(fds[1]), "write: %s", strerror(errno));
    CHECK(wait_for(&probe.calls, 1), "the handler was not called");
    CHECK_OK(pauseProactorReading(p, fds[0]));
    CHECK_OK(pauseProactorReading(p, fds[0]));
    int before = atomic_load(&probe.calls);
    CHECK(write_bytes(fds[1], "abc", 3), "write: %s", strerror(errno));
    sleep_ms(quiet_ms);
    CHECK(atomic_load(&probe.calls) == before, "called %d times while paused",
          atomic_load(&probe.calls) - before);
    CHECK(input_waiting(fds[0]) == 3, "%d bytes wait in the socket, want 3", input_waiting(fds[0]));
    CHECK_OK(resumeProactorReading(p, fds[0]));
    CHECK_OK(resumeProactorReading(p, fds[0]));
    CHECK(wait_for(&probe.calls, before + 3), "%d calls after resume, want 3",
          atomic_load(&probe.calls) - before);
    /* The peer hangs up while the fd is paused. */
    CHECK_OK(pauseProactorReading(p, fds[0]));
    before = atomic_load(&probe.calls);
    close_fd(&fds[1]);
    sleep_ms(quiet_ms);
    CHECK(atomic_load(&probe.calls) == before && atomic_load(&probe.eof) == 0,
          "called %d times while paused and hung up", atomic_load(&probe.calls) - before);
    CHECK_OK(resumeProactorReading(p, fds[0]));
    CHECK(wait_for(&probe.eof, 1), "the hang-up was not reported after resume");
    CHECK_OK(removeHandler(p, fds[0]));
    CHECK(atomic_load(&probe.mismatches) == 0, "the handler got another proactor or fd");
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

/* Reads one byte per call; pauses its own fd when the byte is 'p'. */
struct self_pauser {
    atomic_int calls;
    atomic_int paused;   /* 1 once pauseProactorReading returned 0 in the handler */
    atomic_int failed;   /* it returned -1 */
};

static void self_pausing_handler(void *proactor, int fd, void *context) {
    struct self_pauser *pauser = context;
    char byte;
    if (read(fd, &byte, 1) != 1) return;
    atomic_fetch_add(&pauser->calls, 1);
    if (byte != 'p') return;
    if (pauseProactorReading(proactor, fd) == 0) atomic_store(&pauser->paused, 1);
    else atomic_fetch_add(&pauser->failed, 1);
}

/* Rule: a handler may pause its own fd: no new call once it returns, though bytes remain;
 * another thread resumes it and the rest is read. */
static void test_handler_pauses_its_own_fd(void) {
    void *p = NULL;
    int fds[2] = {-1, -1};
    struct self_pauser pauser;
    atomic_init(&pauser.calls, 0);
    atomic_init(&pauser.paused, 0);
    atomic_init(&pauser.failed, 0);
    CHECK(make_socketpair(fds) == 0, "socketpair: %s", strerror(errno));
    CREATE(p);
    CHECK_OK(addFD2ProactorWithContext(p, fds[0], self_pausing_handler, &pauser));
    CHECK_OK(runProactor(p));
    CHECK(write_bytes(fds[1], "xpyz", 4), "write: %s", strerror(errno));
    CHECK(wait_for(&pauser.paused, 1), "the handler did not pause its fd (%d failures)",
          atomic_load(&pauser.failed));
    sleep_ms(scaled(300, 1000));
    CHECK(atomic_load(&pauser.calls) == 2, "%d calls, want 2 (x, p)", atomic_load(&pauser.calls));
    CHECK(input_waiting(fds[0]) == 2, "%d bytes wait, want 2", input_waiting(fds[0]));
    CHECK_OK(resumeProactorReading(p, fds[0]));
    CHECK(wait_for(&pauser.calls, 4), "%d calls after resume, want 4", atomic_load(&pauser.calls));
out:
    if (p) destroyProactor(p);
    close_pair(fds);
}

#define TEST(name) {#name, test_##name}

static const struct test TESTS[] = {
    TEST(null_proactor_gives_einval),
    TEST(negative_fd_gives_einval),
    TEST(null_handler_gives_einval),
    TEST(add_twice_gives_eexist),
    TEST(remove_unregistered_gives_enoent),
    TEST(remove_after_close_succeeds),
    TEST(add_closed_fd_gives_ebadf),
    TEST(add_regular_file_gives_eperm),
    TEST(run_while_running_gives_ealready),
    TEST(cancel_while_stopped_gives_esrch),
    TEST(wait_in_handler_gives_edeadlk),
    TEST(run_in_handler_gives_ealready),
    TEST(run_returns_at_once_handlers_on_loop_thread),
    TEST(level_triggered_sees_every_byte_then_eof),
    TEST(context_handler_gets_its_registration),
    TEST(fork_child_may_only_destroy_the_parents_proactor),
    TEST(handler_removes_its_own_fd),
    TEST(handler_adds_an_fd),
    TEST(handler_cancels_its_proactor),
    TEST(restart_keeps_registrations),
    TEST(handlers_run_one_at_a_time),
    TEST(loop_thread_blocks_signals),
    TEST(remove_waits_for_running_handler),
    TEST(cancel_waits_for_running_handler),
    TEST(no_call_after_remove_with_fd_reuse),
    TEST(concurrent_add_remove_from_8_threads),
    TEST(two_proactors_are_independent),
    TEST(request_cancel_from_signal_handler),
    TEST(request_and_wait_on_stopped_loop),
    TEST(destroy_running_proactor),
    TEST(create_run_destroy_cycles),
    TEST(destroy_from_handler),
    TEST(backend_name_follows_environment),
    TEST(send_and_receive_via_proactor),
    TEST(accept_via_proactor),
    TEST(flow_functions_with_null_proactor_give_einval),
    TEST(pause_and_resume_give_einval_for_negative_fd_enoent_unregistered),
    TEST(watermarks_default_read_back_and_refuse_bad_arguments),
    TEST(flow_handler_gets_high_then_drained_with_its_context),
    TEST(stall_timeout_gives_one_stalled_for_a_reader_that_does_not_read),
    TEST(lag_timeout_gives_one_lagging_per_congestion),
    TEST(oversized_sends_are_refused_before_any_copy),
    TEST(pause_and_resume_reading_with_a_context_handler),
    TEST(handler_pauses_its_own_fd),
};

static int g_passed, g_failed;

static void run_test(const struct test *test) {
    g_test_failed = false;
    g_why[0] = '\0';
    watchdog_arm(test->name, g_passed, g_failed);
    test->run();
    watchdog_disarm();
    if (g_test_failed) {
        printf("FAIL %s: %s\n", test->name, g_why);
        g_failed++;
    } else {
        printf("ok   %s\n", test->name);
        g_passed++;
    }
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc > 2 || (argc == 2 && strcmp(argv[1], "--valgrind") != 0)) {
        fprintf(stderr, "usage: %s [--valgrind]\n", argv[0]);
        return 2;
    }
    g_valgrind = argc == 2;
    g_patience_s = g_valgrind ? 60.0 : 20.0; /* bounds against hangs, not timings */
    signal(SIGPIPE, SIG_IGN);
    note_backend();
    if (!watchdog_start(scaled(60, 180))) {
        fprintf(stderr, "cannot start the watchdog process: %s\n", strerror(errno));
        return 2;
    }
    for (size_t i = 0; i < sizeof TESTS / sizeof TESTS[0]; i++) run_test(&TESTS[i]);
    watchdog_stop();
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed > 0 ? 1 : 0;
}
