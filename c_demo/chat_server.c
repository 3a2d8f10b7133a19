/*
 * chat_server: "Beej's chat" (the poll server of Beej's Guide to Network Programming) on top
 * of libst_proactor.so, in the proactor style: every chunk of bytes a client sends goes to
 * every OTHER connected client.
 *
 * Shape: the listening socket is registered with on_listener (accepts), each client with
 * on_client (one recv, then broadcast). The loop runs on the proactor's own thread; main
 * only sets up, then blocks in waitProactor until SIGINT/SIGTERM asks the loop to stop.
 *
 * Flow control: on_flow hears when a client's queued output passes the library's high
 * watermark; then every client whose bytes would go to it (all the others) stops being read,
 * so TCP slows the senders down, until its queue is back under the low watermark. A client
 * whose output makes no progress for the stall timeout is disconnected.
 *
 * The behaviour (messages, exit codes) is the one README.md describes for both chat servers;
 * examples/proact_server.rs is the same server in Rust, and tests/chat/chat_e2e.py checks both.
 *
 * Build: cd c_demo && make. Run: LD_LIBRARY_PATH=.. ./chat_server [port] [--stall-timeout SECONDS]
 */
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "st_proactor.h"

#define NAME "chat_server"
#define DEFAULT_PORT 9034
#define RECV_BUF_SIZE (64 * 1024)
#define INITIAL_CLIENT_CAPACITY 16
#define DEFAULT_STALL_TIMEOUT_MS 2000u
/* An unfinished line (the bytes after a chunk's last newline) waits for its end, so that two
 * senders' lines never interleave mid-line at a reader when TCP splits a sender's write,
 * until its sender has been read and quiet for LINE_HOLD_MS (long enough for a busy sender to
 * write the rest once it is read again after a pause), and at most LINE_HOLD_LIMIT bytes;
 * then it goes out as it is. */
#define LINE_HOLD_MS 250
#define LINE_HOLD_LIMIT (16 * 1024)
#define STALL_TEXT_SIZE 32

/*
 * Server state, handed to every handler as its context. The handlers all run on the
 * proactor's single loop thread, one at a time, so nothing here needs a lock; main reads it
 * again only after waitProactor has returned (the loop thread is stopped by then).
 */
struct server {
    void *proactor;
    int listener;
    int reserve_fd;      /* /dev/null, given up on EMFILE to accept-and-drop one connection */
    bool emfile_logged;  /* the EMFILE/ENFILE line is printed once until an accept succeeds */
    int *clients;        /* connected client fds, unordered */
    size_t nclients;
    size_t capacity;     /* of clients, targets and results alike */
    int *targets;        /* scratch for a broadcast: every client but the sender */
    int *results;        /* scratch for a broadcast: errno (or 0) per target */
    /* Clients whose queued output is above the high watermark, a handful at most (same
     * capacity as clients). A client is read only while no OTHER client is in this list. */
    int *congested;
    size_t ncongested;
    long long resumed_ms; /* when reading last resumed: held lines are quiet from then on */
    char stall_text[STALL_TEXT_SIZE]; /* the stall timeout as given, for the log */
    /* Unfinished lines, by fd number (see LINE_HOLD_MS), the fds holding one, and the
     * timerfd that lets them go (armed while some line is held). */
    struct held_line *held;
    size_t held_size;
    int *holders;
    size_t nholders;
    int hold_timer;
    bool hold_armed;
    unsigned char buf[RECV_BUF_SIZE + LINE_HOLD_LIMIT];
};

struct held_line {
    unsigned char *bytes; /* NULL when nothing is held */
    size_t len;
    struct timespec since; /* when the client last sent bytes held here */
};

/* The one global: the signal handler has no other way to reach the proactor. */
static void *volatile g_proactor;

/* ---------------------------------------------------------------- logging */

/*
 * One log line on stdout, prefixed with the program name. A failed write is deliberately
 * ignored: the chat must keep serving its clients even when nobody reads its log.
 */
static void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_line(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    (void)fputs(NAME ": ", stdout);
    (void)vprintf(fmt, ap);
    (void)fputc('\n', stdout);
    va_end(ap);
}

/* ---------------------------------------------------------------- command line */

static void print_usage(FILE *out, bool with_description) {
    (void)fprintf(out, "usage: " NAME " [port] [--stall-timeout SECONDS]\n");
    if (with_description)
        (void)fprintf(out, "A chat server: every line a client sends goes to every other client"
                           " (default port %d, 0 = any free port).\n"
                           "The room moves at the pace of its slowest reader; a client whose"
                           " output makes no progress\nfor the stall timeout (default %u s,"
                           " 0 = never) is disconnected.\n",
                      DEFAULT_PORT, DEFAULT_STALL_TIMEOUT_MS / 1000);
}

/* Seconds as --stall-timeout takes them (digits, an optional fraction), in milliseconds
 * rounded up, so that any positive value is at least 1 ms. */
static bool parse_seconds(const char *s, unsigned *ms) {
    unsigned long long whole = 0, fraction_ms = 0, scale = 100;
    bool digits = false, rest = false;
    const char *p = s;
    for (; *p >= '0' && *p <= '9'; p++) {
        whole = whole * 10 + (unsigned long long)(*p - '0');
        digits = true;
        if (whole > 4294967ULL)
            return false;
    }
    if (*p == '.') {
        for (p++; *p >= '0' && *p <= '9'; p++) {
            digits = true;
            if (scale > 0)
                fraction_ms += (unsigned long long)(*p - '0') * scale;
            else if (*p != '0')
                rest = true;
            scale /= 10;
        }
    }
    if (!digits || *p != '\0' || strlen(s) >= STALL_TEXT_SIZE)
        return false;
    unsigned long long total = whole * 1000 + fraction_ms + (rest ? 1 : 0);
    if (total > 0xffffffffULL)
        return false;
    *ms = (unsigned)total;
    return true;
}

/* Strictly decimal digits, 0..65535: no sign, no spaces, no hex (strtol accepts too much). */
static bool parse_port(const char *s, unsigned *port) {
    unsigned long value = 0;
    if (*s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return false;
        value = value * 10 + (unsigned long)(*s - '0');
        if (value > 65535)
            return false;
    }
    *port = (unsigned)value;
    return true;
}

struct options {
    unsigned port;
    unsigned stall_ms;
    const char *stall_text;
};

static int bad_usage(void) {
    print_usage(stderr, false);
    return 2;
}

/* Returns -1 to go on (options set), or the exit status when the program must stop now. */
static int parse_args(int argc, char **argv, struct options *o) {
    o->port = DEFAULT_PORT;
    o->stall_ms = DEFAULT_STALL_TIMEOUT_MS;
    o->stall_text = "2";
    bool have_port = false;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            print_usage(stdout, true);
            return 0;
        }
        const char *value = NULL;
        if (strcmp(arg, "--stall-timeout") == 0) {
            if (i + 1 == argc) {
                (void)fprintf(stderr, NAME ": --stall-timeout needs a number of seconds\n");
                return bad_usage();
            }
            value = argv[++i];
        } else if (strncmp(arg, "--stall-timeout=", 16) == 0) {
            value = arg + 16;
        }
        if (value != NULL) {
            if (!parse_seconds(value, &o->stall_ms)) {
                (void)fprintf(stderr, NAME ": invalid stall timeout '%s': expected a number of seconds\n",
                              value);
                return bad_usage();
            }
            o->stall_text = value;
        } else if (arg[0] == '-' && arg[1] != '\0' && strspn(arg + 1, "0123456789") != strlen(arg + 1)) {
            (void)fprintf(stderr, NAME ": unknown option '%s'\n", arg);
            return bad_usage();
        } else if (have_port) {
            (void)fprintf(stderr, NAME ": too many arguments\n");
            return bad_usage();
        } else if (parse_port(arg, &o->port)) {
            have_port = true;
        } else {
            (void)fprintf(stderr, NAME ": invalid port '%s': expected a number from 0 to 65535\n", arg);
            return bad_usage();
        }
    }
    return -1;
}

/* ---------------------------------------------------------------- process setup */

/*
 * SIGPIPE off: a peer that vanishes must give EPIPE to whoever writes, not kill the server.
 * RLIMIT_NOFILE up to the hard limit: every client costs a descriptor. Failing to raise it
 * is not fatal (the EMFILE path copes), so it is only reported.
 */
static int setup_process(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    if (sigemptyset(&sa.sa_mask) != 0 || sigaction(SIGPIPE, &sa, NULL) != 0) {
        (void)fprintf(stderr, NAME ": cannot ignore SIGPIPE: %s\n", strerror(errno));
        return -1;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        (void)fprintf(stderr, NAME ": getrlimit(RLIMIT_NOFILE): %s\n", strerror(errno));
    } else if (rl.rlim_cur != rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            (void)fprintf(stderr, NAME ": setrlimit(RLIMIT_NOFILE): %s\n", strerror(errno));
    }
    return 0;
}

/* The signal handler: only the async-signal-safe stop request, errno kept for the thread. */
static void on_stop_signal(int sig) {
    (void)sig;
    int saved = errno;
    (void)requestCancelProactor(g_proactor);
    errno = saved;
}

static int install_stop_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART;
    if (sigemptyset(&sa.sa_mask) != 0 || sigaction(SIGINT, &sa, NULL) != 0 ||
        sigaction(SIGTERM, &sa, NULL) != 0) {
        (void)fprintf(stderr, NAME ": sigaction: %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

/*
 * SIGINT/SIGTERM are held blocked from before the handlers exist until the loop runs:
 * requestCancelProactor does nothing to a loop that is not running yet, so a signal that
 * arrived in that window would otherwise be lost. Unblocking delivers it late instead.
 */
static int set_stop_signals_blocked(bool blocked) {
    sigset_t set;
    if (sigemptyset(&set) != 0 || sigaddset(&set, SIGINT) != 0 || sigaddset(&set, SIGTERM) != 0)
        return -1;
    int rc = pthread_sigmask(blocked ? SIG_BLOCK : SIG_UNBLOCK, &set, NULL);
    if (rc != 0) {
        (void)fprintf(stderr, NAME ": pthread_sigmask: %s\n", strerror(rc));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- listening socket */

/* socket, options, bind, listen for one getaddrinfo result; -1 with errno on failure. */
static int listen_on(const struct addrinfo *ai) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0)
        return -1;
    int yes = 1, no = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes) != 0)
        goto fail;
    /* Dual stack: one IPv6 socket also takes IPv4 clients, as ::ffff:a.b.c.d. */
    if (ai->ai_family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof no) != 0)
        goto fail;
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, SOMAXCONN) != 0)
        goto fail;
    return fd;
fail:;
    int saved = errno;
    (void)close(fd);
    errno = saved;
    return -1;
}

/*
 * Beej's getaddrinfo loop, but IPv6 results first (the dual-stack socket serves both
 * families), then IPv4 ones. Prints the stderr line and returns -1 when nothing binds.
 */
static int open_listener(unsigned port) {
    char service[8];
    (void)snprintf(service, sizeof service, "%u", port);
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int rc = getaddrinfo(NULL, service, &hints, &res);
    if (rc != 0) {
        (void)fprintf(stderr, NAME ": cannot listen on port %u: %s\n", port,
                      rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        return -1;
    }
    static const int families[] = {AF_INET6, AF_INET};
    int fd = -1, err = EAFNOSUPPORT;
    for (size_t f = 0; f < sizeof families / sizeof families[0] && fd < 0; f++) {
        for (const struct addrinfo *ai = res; ai != NULL && fd < 0; ai = ai->ai_next) {
            if (ai->ai_family != families[f])
                continue;
            fd = listen_on(ai);
            if (fd < 0)
                err = errno;
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        (void)fprintf(stderr, NAME ": cannot listen on port %u: %s\n", port, strerror(err));
    return fd;
}

/* The port the kernel really bound (differs from the request for port 0). */
static int bound_port(int fd, unsigned *port) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return -1;
    if (ss.ss_family == AF_INET6)
        *port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    else
        *port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

/* ---------------------------------------------------------------- client table */

/*
 * Grows clients, targets and results together, so a broadcast never has to allocate (and
 * so never fails for want of memory) while it runs.
 */
static int grow_array(int **array, size_t cap) {
    int *grown = realloc(*array, cap * sizeof *grown);
    if (grown == NULL)
        return -1;
    *array = grown;
    return 0;
}

static int ensure_capacity(struct server *s, size_t needed) {
    if (needed <= s->capacity)
        return 0;
    size_t cap = s->capacity ? s->capacity * 2 : INITIAL_CLIENT_CAPACITY;
    while (cap < needed)
        cap *= 2;
    /* An array already grown when a later one fails is kept: bigger is harmless. */
    if (grow_array(&s->clients, cap) != 0 || grow_array(&s->targets, cap) != 0 ||
        grow_array(&s->results, cap) != 0 || grow_array(&s->congested, cap) != 0 ||
        grow_array(&s->holders, cap) != 0)
        return -1;
    s->capacity = cap;
    return 0;
}

static void forget_client(struct server *s, int fd) {
    for (size_t i = 0; i < s->nclients; i++) {
        if (s->clients[i] == fd) {
            s->clients[i] = s->clients[--s->nclients]; /* order does not matter */
            return;
        }
    }
}

/* ---------------------------------------------------------------- flow control */

static long long now_ms(void) {
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Whether bytes wait to be read in socket fd (FIONREAD). */
static bool bytes_waiting(int fd) {
    int waiting = 0;
    return ioctl(fd, FIONREAD, &waiting) == 0 && waiting > 0;
}

static void pause_all_but(struct server *s, int fd) {
    for (size_t i = 0; i < s->nclients; i++)
        if (s->clients[i] != fd)
            (void)pauseProactorReading(s->proactor, s->clients[i]);
}

/*
 * Marks a client as behind (its queue is above the high watermark) or not, and pauses or
 * resumes the readers this changes: a client is read only while no other client is behind
 * (its bytes would go to that one). Only the steps between none, one and two clients behind
 * touch any reader. pause/resume of an fd that is gone fails with ENOENT, which is harmless.
 */
static void set_congested(struct server *s, int fd, bool behind) {
    size_t before = s->ncongested, i = 0;
    while (i < s->ncongested && s->congested[i] != fd)
        i++;
    if (behind && i == s->ncongested)
        s->congested[s->ncongested++] = fd;
    else if (!behind && i < s->ncongested)
        s->congested[i] = s->congested[--s->ncongested];
    else
        return;
    if (before == 0 && s->ncongested == 1) {        /* the first one behind: the others wait */
        pause_all_but(s, fd);
    } else if (before == 1 && s->ncongested == 2) { /* a second: the first waits for it too */
        (void)pauseProactorReading(s->proactor, s->congested[0]);
        (void)pauseProactorReading(s->proactor, s->congested[1]);
    } else if (before == 2 && s->ncongested == 1) { /* one left behind: it may send again */
        (void)resumeProactorReading(s->proactor, s->congested[0]);
        s->resumed_ms = now_ms();
    } else if (before == 1 && s->ncongested == 0) { /* nobody behind any more */
        for (size_t k = 0; k < s->nclients; k++)
            (void)resumeProactorReading(s->proactor, s->clients[k]);
        s->resumed_ms = now_ms();
    }
}

static void release_held_line(struct server *s, int fd);

static bool is_client(const struct server *s, int fd) {
    for (size_t i = 0; i < s->nclients; i++)
        if (s->clients[i] == fd)
            return true;
    return false;
}

/* Sends what the client still held (nothing it sent is lost), removes it before closing it
 * (the library's rule), then drops it from the table. */
static void drop_client(struct server *s, int fd) {
    if (!is_client(s, fd))
        return; /* dropped already (a broadcast of its last bytes dropped others) */
    release_held_line(s, fd);
    set_congested(s, fd, false);
    if (removeHandler(s->proactor, fd) != 0)
        log_line("removeHandler(%d): %s", fd, strerror(errno));
    if (close(fd) != 0)
        log_line("close(%d): %s", fd, strerror(errno));
    forget_client(s, fd);
}

/* The flow handler: runs on the loop thread like every handler, one at a time. */
static void on_flow(void *proactor, int fd, int event, size_t queued, void *context) {
    (void)proactor;
    (void)queued;
    struct server *s = context;
    if (!is_client(s, fd))
        return;
    if (event == ST_PROACTOR_FLOW_HIGH) {
        set_congested(s, fd, true);
    } else if (event == ST_PROACTOR_FLOW_DRAINED) {
        set_congested(s, fd, false);
    } else if (event == ST_PROACTOR_FLOW_STALLED) {
        log_line("socket %d stalled (no progress for %s s), disconnected", fd, s->stall_text);
        drop_client(s, fd);
    }
}

/* ---------------------------------------------------------------- client handler */

/*
 * Queues bytes for every client but the sender. The library writes the queues from the loop
 * as the sockets drain; a client whose queue would pass the hard cap (ENOBUFS) is dropped so
 * that it cannot make the server hold unbounded memory (flow control keeps queues far below
 * it, so this is the last resort).
 */
static void broadcast_from(struct server *s, int sender, const unsigned char *bytes, size_t len) {
    size_t count = 0;
    if (len == 0)
        return;
    for (size_t i = 0; i < s->nclients; i++)
        if (s->clients[i] != sender)
            s->targets[count++] = s->clients[i];
    if (count == 0)
        return;
    memset(s->results, 0, count * sizeof *s->results);
    if (broadcastViaProactor(s->proactor, s->targets, count, bytes, len, s->results) == 0)
        return;
    if (errno == EINVAL) { /* bad arguments: nothing was queued, results not meaningful */
        log_line("broadcastViaProactor: %s", strerror(errno));
        return;
    }
    /* Other errors (EPIPE, ECONNRESET...) are left alone: that client's own handler will
     * see the hang-up and drop it. The ones past the cap are gathered first: dropping one
     * broadcasts its held line, which reuses targets and results. */
    size_t slow = 0;
    for (size_t i = 0; i < count; i++)
        if (s->results[i] == ENOBUFS)
            s->targets[slow++] = s->targets[i];
    if (slow == 0)
        return;
    int *too_slow = malloc(slow * sizeof *too_slow);
    if (too_slow == NULL) {
        log_line("out of memory: %zu slow clients stay", slow);
        return;
    }
    memcpy(too_slow, s->targets, slow * sizeof *too_slow);
    for (size_t i = 0; i < slow; i++) {
        if (!is_client(s, too_slow[i]))
            continue;
        log_line("socket %d too slow (over %zu bytes queued), disconnected", too_slow[i],
                 getProactorSendLimit(s->proactor));
        drop_client(s, too_slow[i]);
    }
    free(too_slow);
}

/* ---------------------------------------------------------------- unfinished lines */

static void arm_hold_timer(struct server *s, long long ms) {
    struct itimerspec when;
    memset(&when, 0, sizeof when);
    when.it_value.tv_sec = (time_t)(ms / 1000);
    when.it_value.tv_nsec = (long)(ms % 1000) * 1000000L + 1; /* never 0: that disarms */
    if (timerfd_settime(s->hold_timer, 0, &when, NULL) != 0)
        log_line("timerfd_settime: %s", strerror(errno));
    s->hold_armed = true;
}

/* Takes what fd holds out of the table (the caller frees it); NULL when nothing is held. */
static unsigned char *unhold_line(struct server *s, int fd, size_t *len) {
    if ((size_t)fd >= s->held_size || s->held[fd].bytes == NULL)
        return NULL;
    unsigned char *bytes = s->held[fd].bytes;
    *len = s->held[fd].len;
    s->held[fd].bytes = NULL;
    s->held[fd].len = 0;
    for (size_t i = 0; i < s->nholders; i++) {
        if (s->holders[i] == fd) {
            s->holders[i] = s->holders[--s->nholders];
            break;
        }
    }
    return bytes;
}

/* Copies what fd holds to out (room for LINE_HOLD_LIMIT bytes) and forgets it; its length. */
static size_t take_held_line(struct server *s, int fd, unsigned char *out) {
    size_t len = 0;
    unsigned char *bytes = unhold_line(s, fd, &len);
    if (bytes != NULL)
        memcpy(out, bytes, len);
    free(bytes);
    return len;
}

/* Holds an unfinished line of fd (len <= LINE_HOLD_LIMIT); sends it at once if memory is short. */
static void hold_line(struct server *s, int fd, const unsigned char *bytes, size_t len) {
    if (len == 0)
        return;
    if ((size_t)fd >= s->held_size) {
        size_t size = s->held_size ? s->held_size : 64;
        while (size <= (size_t)fd)
            size *= 2;
        struct held_line *grown = realloc(s->held, size * sizeof *grown);
        if (grown == NULL) {
            broadcast_from(s, fd, bytes, len);
            return;
        }
        memset(grown + s->held_size, 0, (size - s->held_size) * sizeof *grown);
        s->held = grown;
        s->held_size = size;
    }
    unsigned char *copy = malloc(len);
    if (copy == NULL) {
        broadcast_from(s, fd, bytes, len);
        return;
    }
    memcpy(copy, bytes, len);
    struct held_line *h = &s->held[fd];
    h->bytes = copy;
    h->len = len;
    (void)clock_gettime(CLOCK_MONOTONIC, &h->since);
    s->holders[s->nholders++] = fd; /* holders has room for every client */
    if (!s->hold_armed)
        arm_hold_timer(s, LINE_HOLD_MS);
}

/* Sends what fd holds, if anything (it is leaving, or it stalled). */
static void release_held_line(struct server *s, int fd) {
    size_t len = 0;
    unsigned char *bytes = unhold_line(s, fd, &len); /* out first: sending may drop clients */
    if (bytes == NULL)
        return;
    broadcast_from(s, fd, bytes, len);
    free(bytes);
}

/* Whether the server has paused reading fd: some other client is behind. */
static bool reading_paused(const struct server *s, int fd) {
    return s->ncongested >= 2 || (s->ncongested == 1 && s->congested[0] != fd);
}

/*
 * The hold timer's handler: sends the unfinished lines whose client is being read and has
 * been quiet for LINE_HOLD_MS since it was last read or resumed (the end of a paused client's
 * line, or of one whose bytes wait to be read, may be in its socket).
 */
static void on_hold_timer(void *proactor, int fd, void *context) {
    (void)proactor;
    struct server *s = context;
    uint64_t expirations;
    if (read(fd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
        log_line("read(timer): %s", strerror(errno));
    s->hold_armed = false;
    long long now = now_ms(), next = -1;
    size_t i = 0;
    while (i < s->nholders) {
        int holder = s->holders[i];
        const struct held_line *h = &s->held[holder];
        long long since = (long long)h->since.tv_sec * 1000 + h->since.tv_nsec / 1000000;
        long long quiet = now - (since > s->resumed_ms ? since : s->resumed_ms);
        if (reading_paused(s, holder) || quiet < LINE_HOLD_MS || bytes_waiting(holder)) {
            long long wait = quiet < LINE_HOLD_MS ? LINE_HOLD_MS - quiet : LINE_HOLD_MS;
            if (next < 0 || wait < next)
                next = wait;
            i++;
            continue;
        }
        /* Sending may drop clients and edit holders: the entry is taken out first, and an
         * entry moved behind i is seen at the next expiry. */
        release_held_line(s, holder);
    }
    if (s->nholders > 0)
        arm_hold_timer(s, next > 0 ? next : LINE_HOLD_MS);
}

/* ---------------------------------------------------------------- client handler */

/*
 * One recv per call (the loop is level-triggered and calls again while bytes remain). What
 * was read goes to the others up to its last newline; the unfinished line after it is held.
 */
static void on_client(void *proactor, int fd, void *context) {
    (void)proactor;
    struct server *s = context;
    size_t kept = take_held_line(s, fd, s->buf);
    ssize_t n = recv(fd, s->buf + kept, RECV_BUF_SIZE, 0);
    if (n > 0) {
        size_t len = kept + (size_t)n;
        const unsigned char *newline = memrchr(s->buf, '\n', len);
        size_t end = newline ? (size_t)(newline - s->buf) + 1 : 0;
        if (len - end > LINE_HOLD_LIMIT)
            end = len;
        broadcast_from(s, fd, s->buf, end);
        hold_line(s, fd, s->buf + end, len - end);
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        hold_line(s, fd, s->buf, kept);
    } else {
        int err = errno;
        broadcast_from(s, fd, s->buf, kept); /* nothing the client sent is lost */
        if (n == 0)
            log_line("socket %d hung up", fd);
        else
            log_line("socket %d closed: %s", fd, strerror(err));
        drop_client(s, fd);
    }
}

/* ---------------------------------------------------------------- listener handler */

/* "ADDR:PORT", with an IPv4-mapped IPv6 address shown as plain IPv4, other IPv6 as [addr]. */
static void format_peer(const struct sockaddr_storage *ss, char *out, size_t size) {
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    bool bracket = false;
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        port = ntohs(sin6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            if (inet_ntop(AF_INET, &sin6->sin6_addr.s6_addr[12], host, sizeof host) == NULL)
                (void)snprintf(host, sizeof host, "?");
        } else {
            bracket = true;
            if (inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host) == NULL)
                (void)snprintf(host, sizeof host, "?");
        }
    } else if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        port = ntohs(sin->sin_port);
        if (inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host) == NULL)
            (void)snprintf(host, sizeof host, "?");
    }
    (void)snprintf(out, size, bracket ? "[%s]:%u" : "%s:%u", host, port);
}

/*
 * Out of descriptors: the pending connection keeps the listener readable, and the
 * level-triggered loop would call us again at once, forever. So give up the reserve fd,
 * accept that connection just to close it, and take the reserve back.
 */
static void shed_connection(struct server *s) {
    if (s->reserve_fd >= 0) {
        if (close(s->reserve_fd) != 0)
            log_line("close(reserve): %s", strerror(errno));
        s->reserve_fd = -1;
    }
    /* A failure here (the peer gave up, or still EMFILE) leaves nothing to undo. */
    int fd = accept4(s->listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0 && close(fd) != 0)
        log_line("close(%d): %s", fd, strerror(errno));
    s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    /* If it cannot be reopened now, the next EMFILE tries again (it may spin until then). */
}

/* Takes a freshly accepted client into the table and the proactor, or closes it. */
static void add_client(struct server *s, int fd, const struct sockaddr_storage *peer) {
    if (ensure_capacity(s, s->nclients + 1) != 0) {
        log_line("socket %d refused: out of memory", fd);
        if (close(fd) != 0)
            log_line("close(%d): %s", fd, strerror(errno));
        return;
    }
    if (addFD2ProactorWithContext(s->proactor, fd, on_client, s) != 0) {
        log_line("socket %d refused: addFD2ProactorWithContext: %s", fd, strerror(errno));
        if (close(fd) != 0)
            log_line("close(%d): %s", fd, strerror(errno));
        return;
    }
    /* The proactor already gathers a turn's output into one send per client, so Nagle's
     * algorithm would only add delay (up to a delayed-ACK timeout) to each line. */
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
        log_line("socket %d: TCP_NODELAY: %s", fd, strerror(errno));
    s->clients[s->nclients++] = fd;
    if (s->ncongested > 0) /* its bytes would go to a client that is behind already */
        (void)pauseProactorReading(s->proactor, fd);
    char addr[INET6_ADDRSTRLEN + 16];
    format_peer(peer, addr, sizeof addr);
    log_line("new connection from %s on socket %d", addr, fd);
}

/* One accept per call, like Beej's poll loop: a backlog just makes the loop call again. */
static void on_listener(void *proactor, int fd, void *context) {
    (void)proactor;
    struct server *s = context;
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    int client = accept4(fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (client >= 0) {
        s->emfile_logged = false;
        add_client(s, client, &peer);
        return;
    }
    switch (errno) {
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case ECONNABORTED:
    case EINTR:
        return;
    case EMFILE:
    case ENFILE:
        if (!s->emfile_logged) {
            log_line("accept: %s; shedding new connections until descriptors free up", strerror(errno));
            s->emfile_logged = true;
        }
        shed_connection(s);
        return;
    default:
        log_line("accept: %s", strerror(errno));
        return;
    }
}

/* ---------------------------------------------------------------- main */

static struct server *server_new(void) {
    struct server *s = calloc(1, sizeof *s);
    if (s == NULL) {
        (void)fprintf(stderr, NAME ": out of memory\n");
        return NULL;
    }
    s->listener = -1;
    s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (s->reserve_fd < 0) {
        (void)fprintf(stderr, NAME ": open(/dev/null): %s\n", strerror(errno));
        free(s);
        return NULL;
    }
    s->hold_timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (s->hold_timer < 0) {
        (void)fprintf(stderr, NAME ": timerfd_create: %s\n", strerror(errno));
        (void)close(s->reserve_fd);
        free(s);
        return NULL;
    }
    return s;
}

/*
 * After waitProactor: the loop thread is stopped, so main owns the state now. Removes and
 * closes the listener and every client, destroys the proactor; returns the clients closed.
 */
static size_t server_shutdown(struct server *s) {
    if (s->listener >= 0) {
        if (removeHandler(s->proactor, s->listener) != 0)
            (void)fprintf(stderr, NAME ": removeHandler(listener): %s\n", strerror(errno));
        if (close(s->listener) != 0)
            (void)fprintf(stderr, NAME ": close(listener): %s\n", strerror(errno));
        s->listener = -1;
    }
    if (removeHandler(s->proactor, s->hold_timer) != 0 && errno != ENOENT)
        (void)fprintf(stderr, NAME ": removeHandler(timer): %s\n", strerror(errno));
    size_t closed = s->nclients;
    while (s->nclients > 0)
        drop_client(s, s->clients[s->nclients - 1]);
    g_proactor = NULL; /* first: a late SIGINT must not reach a destroyed proactor */
    if (destroyProactor(s->proactor) != 0)
        (void)fprintf(stderr, NAME ": destroyProactor: %s\n", strerror(errno));
    s->proactor = NULL;
    return closed;
}

static void server_free(struct server *s) {
    if (s->reserve_fd >= 0 && close(s->reserve_fd) != 0)
        (void)fprintf(stderr, NAME ": close(reserve): %s\n", strerror(errno));
    free(s->clients);
    free(s->targets);
    free(s->results);
    free(s->congested);
    free(s->holders);
    for (size_t fd = 0; fd < s->held_size; fd++)
        free(s->held[fd].bytes);
    free(s->held);
    if (close(s->hold_timer) != 0)
        (void)fprintf(stderr, NAME ": close(timer): %s\n", strerror(errno));
    free(s);
}

/* Registers the listener and starts the loop; the listening line follows only once it runs. */
static int server_start(struct server *s, const char *backend, unsigned port) {
    if (addFD2ProactorWithContext(s->proactor, s->listener, on_listener, s) != 0) {
        (void)fprintf(stderr, NAME ": addFD2ProactorWithContext(listener): %s\n", strerror(errno));
        return -1;
    }
    if (addFD2ProactorWithContext(s->proactor, s->hold_timer, on_hold_timer, s) != 0) {
        (void)fprintf(stderr, NAME ": addFD2ProactorWithContext(timer): %s\n", strerror(errno));
        return -1;
    }
    if (runProactor(s->proactor) != 0) {
        (void)fprintf(stderr, NAME ": runProactor: %s\n", strerror(errno));
        return -1;
    }
    log_line("listening on port %u (backend %s)", port, backend);
    return 0;
}

int main(int argc, char **argv) {
    struct options options;
    int status = parse_args(argc, argv, &options);
    if (status >= 0)
        return status;
    unsigned port = options.port;
    /* Line-buffered even into a pipe or a file: tests wait for whole lines. */
    if (setvbuf(stdout, NULL, _IOLBF, 0) != 0) {
        (void)fprintf(stderr, NAME ": setvbuf: %s\n", strerror(errno));
        return 1;
    }
    if (setup_process() != 0 || set_stop_signals_blocked(true) != 0)
        return 1;

    struct server *s = server_new();
    if (s == NULL)
        return 1;
    (void)snprintf(s->stall_text, sizeof s->stall_text, "%s", options.stall_text);
    s->listener = open_listener(port);
    if (s->listener < 0 || bound_port(s->listener, &port) != 0) {
        if (s->listener >= 0) {
            (void)fprintf(stderr, NAME ": getsockname: %s\n", strerror(errno));
            (void)close(s->listener);
        }
        server_free(s);
        return 1;
    }
    s->proactor = createProactor();
    const char *backend = s->proactor ? getProactorBackend(s->proactor) : NULL;
    if (s->proactor == NULL || backend == NULL) {
        (void)fprintf(stderr, NAME ": createProactor: %s\n", strerror(errno));
        if (s->proactor != NULL)
            (void)destroyProactor(s->proactor);
        (void)close(s->listener);
        server_free(s);
        return 1;
    }
    g_proactor = s->proactor;
    if (setProactorStallTimeout(s->proactor, options.stall_ms) != 0 ||
        setProactorFlowHandler(s->proactor, on_flow, s) != 0) {
        (void)fprintf(stderr, NAME ": flow control setup: %s\n", strerror(errno));
        (void)destroyProactor(s->proactor);
        (void)close(s->listener);
        server_free(s);
        return 1;
    }

    status = 0;
    if (install_stop_signals() != 0 || server_start(s, backend, port) != 0 ||
        set_stop_signals_blocked(false) != 0) {
        /* The loop may be running: asking it to stop makes the wait below return. */
        (void)requestCancelProactor(s->proactor);
        status = 1;
    }
    while (waitProactor(s->proactor) != 0) {
        if (errno != EINTR) {
            (void)fprintf(stderr, NAME ": waitProactor: %s\n", strerror(errno));
            status = 1;
            /* The loop may still run: stop and join it before main touches the state. */
            if (cancelProactor(s->proactor) != 0 && errno != ESRCH)
                (void)fprintf(stderr, NAME ": cancelProactor: %s\n", strerror(errno));
            break;
        }
    }
    size_t closed = server_shutdown(s);
    server_free(s);
    if (status == 0)
        log_line("shutting down (%zu clients closed)", closed);
    return status;
}
