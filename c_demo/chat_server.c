/*
 * chat_server: "Beej's chat" (the poll server of Beej's Guide to Network Programming) on top
 * of libst_proactor.so: every line a client sends goes to every OTHER connected client. It is
 * meant to face hostile clients: connections are limited, slow readers are disconnected
 * without taking the room down with them, and its log never holds the loop up.
 *
 * Usage: chat_server [port] [--bind ADDRESS] [--max-clients N] [--max-per-ip N]
 *                    [--max-lag SECONDS] [--stall-timeout SECONDS]
 *   port                     TCP port to listen on (default 9034; 0 = any free port)
 *   --bind ADDRESS           IPv4 or IPv6 literal or host name to listen on (default: every
 *                            interface, dual-stack :: or else 0.0.0.0)
 *   --max-clients N          N >= 1: a connection accepted while N clients are connected gets
 *                            "server full\n" and is closed (default: no limit but descriptors)
 *   --max-per-ip N           a connection from an address (IPv4 address, IPv6 /64) that already
 *                            has N clients gets "too many connections from your address\n"
 *                            and is closed (default 0 = no limit)
 *   --max-lag SECONDS        a client whose output stays congested (above the high watermark)
 *                            that long, reading or not, is disconnected (default 10; 0 = never)
 *   --stall-timeout SECONDS  a client whose output makes no progress that long is disconnected
 *                            (default 2; 0 = never)
 * Bad arguments: one line and the usage on stderr, exit 2. Cannot listen: exit 1. SIGINT or
 * SIGTERM: exit 0.
 *
 * Shape: readiness handlers for input, the library's queues for output. The loop (level-
 * triggered) calls on_listener when the listening socket is readable, and it accepts one
 * connection; it calls on_client when a client socket is readable or hung up, and it does one
 * recv itself. What is read is handed to broadcastViaProactor, which queues it for every other
 * client and writes it from the loop as their sockets take it. The loop runs on the
 * proactor's own thread; main only sets up, then blocks in waitProactor until SIGINT/SIGTERM
 * asks the loop to stop.
 *
 * Flow control: on_flow hears when a client's queued output passes the library's high
 * watermark; then every client whose bytes would go to it (all the others) stops being read,
 * so TCP slows the senders down, until its queue is back under the low watermark. A client is
 * disconnected when its output makes no progress for the stall timeout, stays congested for
 * the lag timeout (a reader too slow to ever catch up would otherwise hold the room back for
 * good while never stalling), or would pass the library's send limit (ENOBUFS).
 *
 * Drops are bounded and never recursive: a client being dropped leaves the room (client list,
 * congested set, per-address count) first, then goes on a work list that the outermost handler
 * empties before it returns (removeHandler, close, one log line: each exactly once). A client
 * dropped for being slow takes its unfinished line with it; one that hung up has it forwarded.
 *
 * Logging: log lines go into a 64 KiB buffer that a writer thread writes to stdout with
 * write(2), so a stdout nobody reads costs lines (counted, and reported once there is room),
 * never the chat. stderr is only used before the loop runs.
 *
 * The behaviour (messages, exit codes) is the one README.md and the issue 17 spec describe for
 * both chat servers; examples/proact_server.rs is the same server in Rust, and
 * tests/chat/chat_e2e.py checks both.
 *
 * Build: cd c_demo && make. Run: ./chat_server [port] [flags] (LD_LIBRARY_PATH=.. also works).
 */
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
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
#define DEFAULT_STALL_TEXT "2"
#define DEFAULT_MAX_LAG_MS 10000u
#define DEFAULT_MAX_LAG_TEXT "10"
/* An unfinished line (the bytes after a chunk's last newline) waits for its end, so that two
 * senders' lines never interleave mid-line at a reader when TCP splits a sender's write,
 * until its sender has been read and quiet for LINE_HOLD_MS (long enough for a busy sender to
 * write the rest once it is read again after a pause), and at most LINE_HOLD_LIMIT bytes;
 * then it goes out as it is. */
#define LINE_HOLD_MS 250
#define LINE_HOLD_LIMIT (16 * 1024)
#define SECONDS_TEXT_SIZE 32
/* The log: a line is cut at LOG_LINE_MAX bytes; at most LOG_BUFFER_SIZE bytes wait for the
 * writer thread; the shutdown gives it LOG_DRAIN_MS to write them. */
#define LOG_BUFFER_SIZE (64 * 1024)
#define LOG_LINE_MAX 512
#define LOG_DRAIN_MS 1000
/* Refusals are logged at most once per REFUSAL_LOG_MS per kind (a flood of refused
 * connections would otherwise be a flood of log lines). */
#define REFUSAL_LOG_MS 1000
#define SERVER_FULL_REPLY "server full\n"
#define TOO_MANY_REPLY "too many connections from your address\n"
/* The per-address table keys every address as 16 bytes (see address_key). */
#define ADDRESS_KEY_SIZE 16
#define INITIAL_ADDRESS_SLOTS 64

/* ---------------------------------------------------------------- logging */

/*
 * The log buffer and its writer thread. A global, like stdout itself: every part of the
 * program logs, on the loop thread and on main. The loop thread only copies a line in under
 * the mutex and signals; the writer thread writes the bytes [head, head + len) (a ring) to
 * fd 1 without holding the mutex, so a stdout that blocks holds up the writer alone, and the
 * producer never touches the bytes being written (it only fills the free part).
 */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;    /* the writer waits here for bytes or for the stop */
    pthread_cond_t drained; /* the shutdown waits here for an empty buffer */
    char ring[LOG_BUFFER_SIZE];
    size_t head;
    size_t len;
    unsigned long long dropped; /* lines that found no room since the last notice */
    bool stopping;
    bool started;
    pthread_t thread;
} g_log = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
};

/* Copies bytes in after what waits (the caller checked that they fit). */
static void log_append_locked(const char *bytes, size_t len) {
    size_t tail = (g_log.head + g_log.len) % LOG_BUFFER_SIZE;
    size_t first = LOG_BUFFER_SIZE - tail < len ? LOG_BUFFER_SIZE - tail : len;
    memcpy(g_log.ring + tail, bytes, first);
    memcpy(g_log.ring, bytes + first, len - first);
    g_log.len += len;
}

static bool log_fits_locked(size_t len) {
    return LOG_BUFFER_SIZE - g_log.len >= len;
}

/* Puts the "N log lines dropped" line in once it fits: it must come before any later line. */
static void log_report_dropped_locked(void) {
    if (g_log.dropped == 0)
        return;
    char notice[64];
    int n = snprintf(notice, sizeof notice, NAME ": %llu log lines dropped\n", g_log.dropped);
    if (n > 0 && (size_t)n < sizeof notice && log_fits_locked((size_t)n)) {
        log_append_locked(notice, (size_t)n);
        g_log.dropped = 0;
    }
}

/* Stores one whole line, or counts it as dropped: never waits for the writer. The writer
 * only sleeps on an empty buffer, so only the first line into one needs a wake-up call. */
static void log_put(const char *line, size_t len) {
    (void)pthread_mutex_lock(&g_log.lock);
    bool writer_sleeps = g_log.len == 0;
    log_report_dropped_locked();
    if (g_log.dropped == 0 && log_fits_locked(len))
        log_append_locked(line, len);
    else
        g_log.dropped++;
    if (writer_sleeps && g_log.len > 0)
        (void)pthread_cond_signal(&g_log.wake);
    (void)pthread_mutex_unlock(&g_log.lock);
}

/* One log line, "NAME: " and the message, cut to LOG_LINE_MAX bytes. */
static void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_line(const char *fmt, ...) {
    char line[LOG_LINE_MAX];
    size_t len = strlen(NAME ": ");
    memcpy(line, NAME ": ", len);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line + len, sizeof line - len - 1, fmt, ap); /* room kept for '\n' */
    va_end(ap);
    if (n > 0)
        len += (size_t)n < sizeof line - len - 1 ? (size_t)n : sizeof line - len - 2;
    line[len++] = '\n';
    log_put(line, len);
}

/* Waits (with the mutex released) until fd 1 takes bytes again, for a stdout someone made
 * non-blocking: the writer is the one thread that may wait on stdout. */
static void wait_stdout_writable(void) {
    struct pollfd p = {.fd = STDOUT_FILENO, .events = POLLOUT};
    (void)poll(&p, 1, 100);
}

/*
 * The writer thread: writes what the buffer holds to fd 1 with plain blocking write(2) calls,
 * until the stop and an empty buffer. A write error other than EINTR/EAGAIN (stdout closed)
 * throws the bytes away: nobody can read them, and the chat goes on.
 */
static void *log_writer(void *unused) {
    (void)unused;
    (void)pthread_mutex_lock(&g_log.lock);
    for (;;) {
        while (g_log.len == 0 && !g_log.stopping)
            (void)pthread_cond_wait(&g_log.wake, &g_log.lock);
        if (g_log.len == 0)
            break;
        const char *bytes = g_log.ring + g_log.head;
        size_t chunk = LOG_BUFFER_SIZE - g_log.head < g_log.len ? LOG_BUFFER_SIZE - g_log.head : g_log.len;
        (void)pthread_mutex_unlock(&g_log.lock);
        ssize_t n = write(STDOUT_FILENO, bytes, chunk);
        int err = errno;
        if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK))
            wait_stdout_writable();
        (void)pthread_mutex_lock(&g_log.lock);
        if (n < 0 && err != EINTR && err != EAGAIN && err != EWOULDBLOCK)
            n = (ssize_t)chunk; /* unwritable: drop the chunk */
        if (n > 0) {
            g_log.head = (g_log.head + (size_t)n) % LOG_BUFFER_SIZE;
            g_log.len -= (size_t)n;
        }
        log_report_dropped_locked();
        if (g_log.len == 0)
            (void)pthread_cond_broadcast(&g_log.drained);
    }
    (void)pthread_mutex_unlock(&g_log.lock);
    return NULL;
}

/* Starts the writer thread (it inherits main's signal mask: SIGINT/SIGTERM blocked). The
 * drained condition uses the monotonic clock, as the shutdown's deadline does. */
static int log_start(void) {
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc == 0) {
        rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        if (rc == 0)
            rc = pthread_cond_init(&g_log.drained, &attr);
        (void)pthread_condattr_destroy(&attr);
    }
    if (rc == 0)
        rc = pthread_create(&g_log.thread, NULL, log_writer, NULL);
    if (rc != 0) {
        (void)fprintf(stderr, NAME ": cannot start the log writer: %s\n", strerror(rc));
        return -1;
    }
    g_log.started = true;
    return 0;
}

/*
 * Gives the writer at most LOG_DRAIN_MS to write what waits, then lets it go: a writer stuck
 * in write() on a stdout nobody reads is not joined (the process exit ends it), so the
 * shutdown never blocks on stdout.
 */
static void log_finish(void) {
    if (!g_log.started)
        return;
    struct timespec deadline;
    (void)clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += LOG_DRAIN_MS / 1000;
    deadline.tv_nsec += (long)(LOG_DRAIN_MS % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    (void)pthread_mutex_lock(&g_log.lock);
    g_log.stopping = true;
    (void)pthread_cond_signal(&g_log.wake);
    int rc = 0;
    while (g_log.len > 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&g_log.drained, &g_log.lock, &deadline);
    bool drained = g_log.len == 0;
    (void)pthread_mutex_unlock(&g_log.lock);
    if (drained) {
        (void)pthread_join(g_log.thread, NULL);
        g_log.started = false;
    }
}

/* Writes all of text to fd, for the usage and help text (stdout is never written through
 * stdio: its buffer could block an exit on a full pipe). */
static void write_all(int fd, const char *text) {
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        text += n;
        len -= (size_t)n;
    }
}

/* ---------------------------------------------------------------- command line */

#define USAGE "usage: " NAME " [port] [--bind ADDRESS] [--max-clients N] [--max-per-ip N]" \
              " [--max-lag SECONDS] [--stall-timeout SECONDS]\n"

static void print_usage(int fd, bool with_description) {
    write_all(fd, USAGE);
    if (!with_description)
        return;
    char text[2048];
    (void)snprintf(text, sizeof text,
        "A chat server: every line a client sends goes to every other client.\n"
        "  port                     TCP port to listen on (default %d, 0 = any free port)\n"
        "  --bind ADDRESS           listen only on this IPv4 or IPv6 address or host name\n"
        "                           (default: every interface)\n"
        "  --max-clients N          while N clients are connected (N >= 1), refuse new ones with\n"
        "                           \"server full\" (default: no limit but descriptors)\n"
        "  --max-per-ip N           refuse a connection from an address (IPv4 address, IPv6 /64)\n"
        "                           that already has N clients (default 0 = no limit)\n"
        "  --max-lag SECONDS        disconnect a client whose output stays congested (over the high\n"
        "                           watermark) that long, reading or not (default %u s, 0 = never)\n"
        "  --stall-timeout SECONDS  disconnect a client whose output makes no progress that long\n"
        "                           (default %u s, 0 = never)\n"
        "The room moves at the pace of its slowest reader, within these limits.\n",
        DEFAULT_PORT, DEFAULT_MAX_LAG_MS / 1000, DEFAULT_STALL_TIMEOUT_MS / 1000);
    write_all(fd, text);
}

/* Seconds as --stall-timeout and --max-lag take them (digits, an optional fraction), in
 * milliseconds rounded up, so that any positive value is at least 1 ms. */
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
    if (!digits || *p != '\0' || strlen(s) >= SECONDS_TEXT_SIZE)
        return false;
    unsigned long long total = whole * 1000 + fraction_ms + (rest ? 1 : 0);
    if (total > 0xffffffffULL)
        return false;
    *ms = (unsigned)total;
    return true;
}

/* Strictly decimal digits, at most max: no sign, no spaces, no hex (strtoul accepts too much). */
static bool parse_count(const char *s, unsigned long max, unsigned long *count) {
    unsigned long value = 0;
    if (*s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return false;
        value = value * 10 + (unsigned long)(*s - '0');
        if (value > max)
            return false;
    }
    *count = value;
    return true;
}

static bool parse_port(const char *s, unsigned *port) {
    unsigned long value;
    if (!parse_count(s, 65535, &value))
        return false;
    *port = (unsigned)value;
    return true;
}

struct options {
    unsigned port;
    const char *bind;        /* NULL: every interface */
    unsigned long max_clients; /* 0: no limit of its own */
    unsigned long max_per_ip;  /* 0: no limit */
    unsigned lag_ms;
    const char *lag_text;
    unsigned stall_ms;
    const char *stall_text;
};

static int bad_usage(void) {
    print_usage(STDERR_FILENO, false);
    return 2;
}

/*
 * Whether argv[*i] is the flag `name`, given as `name VALUE` or `name=VALUE`: 1 with *value
 * set (and *i past a separate value), 0 when it is another argument, -1 (the line printed)
 * when the value is missing.
 */
static int flag_value(int argc, char **argv, int *i, const char *name, const char *what,
                      const char **value) {
    const char *arg = argv[*i];
    size_t len = strlen(name);
    if (strncmp(arg, name, len) != 0)
        return 0;
    if (arg[len] == '=') {
        *value = arg + len + 1;
        return 1;
    }
    if (arg[len] != '\0')
        return 0;
    if (*i + 1 == argc) {
        (void)fprintf(stderr, NAME ": %s needs %s\n", name, what);
        return -1;
    }
    *value = argv[++*i];
    return 1;
}

/* The flags that take a value; false (the line printed) when the value is bad. */
static bool set_bind(struct options *o, const char *value) {
    if (*value != '\0') {
        o->bind = value; /* checked by getaddrinfo, which knows host names */
        return true;
    }
    (void)fprintf(stderr, NAME ": --bind needs an address\n");
    return false;
}

static bool set_max_clients(struct options *o, const char *value) {
    if (parse_count(value, UINT32_MAX, &o->max_clients) && o->max_clients >= 1)
        return true;
    (void)fprintf(stderr, NAME ": invalid max clients '%s': expected a whole number of at least 1\n",
                  value);
    return false;
}

static bool set_max_per_ip(struct options *o, const char *value) {
    if (parse_count(value, UINT32_MAX, &o->max_per_ip))
        return true;
    (void)fprintf(stderr, NAME ": invalid max per ip '%s': expected a whole number (0 = no limit)\n",
                  value);
    return false;
}

static bool set_max_lag(struct options *o, const char *value) {
    if (parse_seconds(value, &o->lag_ms)) {
        o->lag_text = value;
        return true;
    }
    (void)fprintf(stderr, NAME ": invalid max lag '%s': expected a number of seconds\n", value);
    return false;
}

static bool set_stall_timeout(struct options *o, const char *value) {
    if (parse_seconds(value, &o->stall_ms)) {
        o->stall_text = value;
        return true;
    }
    (void)fprintf(stderr, NAME ": invalid stall timeout '%s': expected a number of seconds\n", value);
    return false;
}

static const struct flag {
    const char *name;
    const char *what; /* for "NAME: --flag needs WHAT" */
    bool (*set)(struct options *, const char *);
} flags[] = {
    {"--bind", "an address", set_bind},
    {"--max-clients", "a number", set_max_clients},
    {"--max-per-ip", "a number", set_max_per_ip},
    {"--max-lag", "a number of seconds", set_max_lag},
    {"--stall-timeout", "a number of seconds", set_stall_timeout},
};

/* Returns -1 to go on (options set), or the exit status when the program must stop now. */
static int parse_args(int argc, char **argv, struct options *o) {
    memset(o, 0, sizeof *o);
    o->port = DEFAULT_PORT;
    o->lag_ms = DEFAULT_MAX_LAG_MS;
    o->lag_text = DEFAULT_MAX_LAG_TEXT;
    o->stall_ms = DEFAULT_STALL_TIMEOUT_MS;
    o->stall_text = DEFAULT_STALL_TEXT;
    bool have_port = false;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            print_usage(STDOUT_FILENO, true);
            return 0;
        }
        int found = 0;
        for (size_t f = 0; f < sizeof flags / sizeof flags[0] && found == 0; f++) {
            const char *value = NULL;
            found = flag_value(argc, argv, &i, flags[f].name, flags[f].what, &value);
            if (found == 1 && !flags[f].set(o, value))
                found = -1;
        }
        if (found < 0)
            return bad_usage();
        if (found > 0)
            continue;
        if (arg[0] == '-' && arg[1] != '\0' && strspn(arg + 1, "0123456789") != strlen(arg + 1)) {
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

/* The one global of the loop's side: the signal handler has no other way to reach it. */
static void *volatile g_proactor;

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
 * arrived in that window would otherwise be lost. Unblocking delivers it late instead. The
 * log writer thread is started while they are blocked, so they never go to it.
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

/* Only the wildcard :: becomes dual stack; a given IPv6 address keeps the system default. */
static bool is_ipv6_wildcard(const struct addrinfo *ai) {
    return ai->ai_family == AF_INET6 &&
           IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)ai->ai_addr)->sin6_addr);
}

/* socket, options, bind, listen for one getaddrinfo result; -1 with errno on failure. */
static int listen_on(const struct addrinfo *ai) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0)
        return -1;
    int yes = 1, no = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes) != 0)
        goto fail;
    /* Dual stack: one IPv6 socket also takes IPv4 clients, as ::ffff:a.b.c.d. */
    if (is_ipv6_wildcard(ai) && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof no) != 0)
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

static void report_listen_failure(const char *address, unsigned port, const char *why) {
    if (address != NULL)
        (void)fprintf(stderr, NAME ": cannot listen on %s port %u: %s\n", address, port, why);
    else
        (void)fprintf(stderr, NAME ": cannot listen on port %u: %s\n", port, why);
}

/*
 * Beej's getaddrinfo loop, but IPv6 results first (the dual-stack socket serves both
 * families), then IPv4 ones. address NULL: every interface. Prints the stderr line and
 * returns -1 when nothing binds.
 */
static int open_listener(const char *address, unsigned port) {
    char service[8];
    (void)snprintf(service, sizeof service, "%u", port);
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int rc = getaddrinfo(address, service, &hints, &res);
    if (rc != 0) {
        report_listen_failure(address, port, rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
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
        report_listen_failure(address, port, strerror(err));
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

/* ---------------------------------------------------------------- per-address counts */

/*
 * How many clients each address has, for --max-per-ip: an open-addressing table (linear
 * probing, backward-shift deletion, so no tombstones pile up under connect/close churn)
 * keyed by 16 bytes. The hash is seeded at random so that a client cannot pick addresses
 * that all land on one probe chain.
 */
struct address_count {
    unsigned char key[ADDRESS_KEY_SIZE];
    uint32_t count; /* 0: an empty slot */
};

struct address_table {
    struct address_count *slots;
    size_t size; /* a power of two, or 0 before the first insert */
    size_t used;
    uint64_t seed;
};

/* One key per address that counts as one: IPv4 a.b.c.d and IPv4-mapped ::ffff:a.b.c.d both
 * as ::ffff:a.b.c.d; any other IPv6 address as its /64 (the rest zero, so it never equals a
 * mapped key, whose bytes 10 and 11 are 0xff). */
static void address_key(const struct sockaddr_storage *ss, unsigned char key[ADDRESS_KEY_SIZE]) {
    memset(key, 0, ADDRESS_KEY_SIZE);
    if (ss->ss_family == AF_INET) {
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((const struct sockaddr_in *)ss)->sin_addr, 4);
    } else if (ss->ss_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
        memcpy(key, a->s6_addr, IN6_IS_ADDR_V4MAPPED(a) ? 16 : 8);
    }
}

static void address_table_init(struct address_table *t) {
    memset(t, 0, sizeof *t);
    if (getrandom(&t->seed, sizeof t->seed, GRND_NONBLOCK) != (ssize_t)sizeof t->seed)
        t->seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32); /* weaker, still varies */
}

static size_t address_home(const struct address_table *t, const unsigned char *key) {
    uint64_t a, b;
    memcpy(&a, key, 8);
    memcpy(&b, key + 8, 8);
    uint64_t h = (t->seed ^ a) * 0x9e3779b97f4a7c15ULL;
    h = (h ^ (h >> 29) ^ b) * 0xbf58476d1ce4e5b9ULL;
    return (size_t)(h ^ (h >> 32)) & (t->size - 1);
}

/* The slot holding key, or the empty one where it would go (the table is never full). */
static size_t address_slot(const struct address_table *t, const unsigned char *key) {
    size_t i = address_home(t, key);
    while (t->slots[i].count != 0 && memcmp(t->slots[i].key, key, ADDRESS_KEY_SIZE) != 0)
        i = (i + 1) & (t->size - 1);
    return i;
}

static uint32_t address_clients(const struct address_table *t, const unsigned char *key) {
    return t->size == 0 ? 0 : t->slots[address_slot(t, key)].count;
}

/* Doubles the table (keeps it at most half full, so probe chains stay short). */
static int address_table_grow(struct address_table *t) {
    size_t size = t->size ? t->size * 2 : INITIAL_ADDRESS_SLOTS;
    struct address_count *slots = calloc(size, sizeof *slots);
    if (slots == NULL)
        return -1;
    struct address_table grown = {slots, size, t->used, t->seed};
    for (size_t i = 0; i < t->size; i++)
        if (t->slots[i].count != 0)
            grown.slots[address_slot(&grown, t->slots[i].key)] = t->slots[i];
    free(t->slots);
    *t = grown;
    return 0;
}

static int address_add(struct address_table *t, const unsigned char *key) {
    if ((t->used + 1) * 2 > t->size && address_table_grow(t) != 0)
        return -1;
    struct address_count *slot = &t->slots[address_slot(t, key)];
    if (slot->count == 0) {
        memcpy(slot->key, key, ADDRESS_KEY_SIZE);
        t->used++;
    }
    slot->count++;
    return 0;
}

/* Whether home position h lies cyclically in (hole, j]: then the entry at j must stay. */
static bool probe_passes(size_t hole, size_t j, size_t h) {
    return hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
}

static void address_remove(struct address_table *t, const unsigned char *key) {
    if (t->size == 0)
        return;
    size_t hole = address_slot(t, key);
    if (t->slots[hole].count == 0 || --t->slots[hole].count != 0)
        return;
    /* Backward shift: entries after the hole that could live in it move back into it. */
    for (size_t j = (hole + 1) & (t->size - 1); t->slots[j].count != 0; j = (j + 1) & (t->size - 1)) {
        if (probe_passes(hole, j, address_home(t, t->slots[j].key)))
            continue;
        t->slots[hole] = t->slots[j];
        hole = j;
    }
    t->slots[hole].count = 0;
    t->used--;
}

/* ---------------------------------------------------------------- server state */

/* Where a connection is: FREE (no client on this fd), IN_ROOM (gets and sends chat), or
 * LEAVING (out of the room, on the drop work list, not yet removed and closed). */
enum phase { PHASE_FREE, PHASE_IN_ROOM, PHASE_LEAVING };

enum drop_reason { DROP_HUNG_UP, DROP_READ_ERROR, DROP_STALLED, DROP_TOO_SLOW, DROP_LAGGING };

/* What the server knows of the client on one fd (indexed by fd number). */
struct client {
    enum phase phase;
    enum drop_reason reason; /* while LEAVING */
    int read_error;          /* errno, for DROP_READ_ERROR */
    size_t slot;             /* its index in server.clients while IN_ROOM */
    bool counted;            /* it is counted in the per-address table under key */
    unsigned char key[ADDRESS_KEY_SIZE];
    /* Its unfinished line (see LINE_HOLD_MS): NULL when nothing is held. */
    unsigned char *held;
    size_t held_len;
    long long held_since_ms; /* when the client last sent bytes held here */
};

/* A kind of refusal, logged at most once per REFUSAL_LOG_MS (see log_refusal). */
struct refusal_log {
    long long last_ms;
    bool logged_once;
    unsigned long long unreported; /* refused since the last line of this kind */
};

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
    struct client *conn; /* by fd number */
    size_t conn_size;
    int *clients;        /* the fds in the room, unordered */
    size_t nclients;
    size_t capacity;     /* of clients and of the other fd lists below */
    int *targets;        /* scratch for a broadcast: every client but the sender */
    int *results;        /* scratch for a broadcast: errno (or 0) per target */
    /* Clients whose queued output is above the high watermark, a handful at most. A client
     * is read only while no OTHER client is in this list. */
    int *congested;
    size_t ncongested;
    long long resumed_ms; /* when reading last resumed: held lines are quiet from then on */
    /* The drop work list: LEAVING fds, in the order they left the room. Only the outermost
     * handler empties it (finish_drops), so a drop never runs inside another. */
    int *leaving;
    size_t nleaving;
    bool finishing_drops;
    /* The fds holding an unfinished line, and the timerfd that lets them go (armed while
     * some line is held). */
    int *holders;
    size_t nholders;
    int hold_timer;
    bool hold_armed;
    /* How many bytes one expiry of the hold timer may release (the high watermark): its
     * flow events come only after it returns, so without a cap a wave of held lines would
     * push a reader straight past the send limit instead of pausing the room. */
    size_t release_budget;
    /* Limits (0: none) and what they refused. */
    size_t max_clients;
    uint32_t max_per_ip;
    struct address_table addresses;
    struct refusal_log full_log, per_ip_log;
    char stall_text[SECONDS_TEXT_SIZE]; /* the stall timeout as given, for the log */
    char lag_text[SECONDS_TEXT_SIZE];   /* the lag timeout as given, for the log */
    unsigned char buf[RECV_BUF_SIZE + LINE_HOLD_LIMIT];
};

static long long now_ms(void) {
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool in_room(const struct server *s, int fd) {
    return fd >= 0 && (size_t)fd < s->conn_size && s->conn[fd].phase == PHASE_IN_ROOM;
}

/* ---------------------------------------------------------------- client table */

/*
 * Grows the fd lists together, so that a broadcast, a drop or a held line never has to
 * allocate (and so never fails for want of memory) while it runs.
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
        grow_array(&s->holders, cap) != 0 || grow_array(&s->leaving, cap) != 0)
        return -1;
    s->capacity = cap;
    return 0;
}

/* Makes conn[fd] exist (FREE) for a new fd number. */
static int ensure_conn(struct server *s, int fd) {
    if ((size_t)fd < s->conn_size)
        return 0;
    size_t size = s->conn_size ? s->conn_size : 64;
    while (size <= (size_t)fd)
        size *= 2;
    struct client *grown = realloc(s->conn, size * sizeof *grown);
    if (grown == NULL)
        return -1;
    memset(grown + s->conn_size, 0, (size - s->conn_size) * sizeof *grown);
    s->conn = grown;
    s->conn_size = size;
    return 0;
}

/* Takes fd out of the clients list in O(1): the last fd moves into its slot. */
static void remove_from_clients(struct server *s, int fd) {
    size_t slot = s->conn[fd].slot;
    int last = s->clients[--s->nclients];
    s->clients[slot] = last;
    s->conn[last].slot = slot;
}

static void remove_from_holders(struct server *s, int fd) {
    for (size_t i = 0; i < s->nholders; i++) {
        if (s->holders[i] == fd) {
            s->holders[i] = s->holders[--s->nholders];
            return;
        }
    }
}

/* Takes what fd holds out of the table (the caller frees it); NULL when nothing is held. */
static unsigned char *unhold_line(struct server *s, int fd, size_t *len) {
    struct client *c = &s->conn[fd];
    if (c->held == NULL)
        return NULL;
    unsigned char *bytes = c->held;
    *len = c->held_len;
    c->held = NULL;
    c->held_len = 0;
    remove_from_holders(s, fd);
    return bytes;
}

static void discard_held_line(struct server *s, int fd) {
    size_t len = 0;
    free(unhold_line(s, fd, &len));
}

/* ---------------------------------------------------------------- flow control */

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
 * touch any reader.
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

/* ---------------------------------------------------------------- drops */

/*
 * First step of every drop: fd leaves the room at once (the clients list, the congested set,
 * which resumes the room if it waited for fd, and its address's count), so that nothing more
 * is sent to it, and goes on the work list; finish_drops does the rest. A slow client's
 * unfinished line goes to nobody. A client already leaving is left alone: each drop happens
 * once, whoever asks first.
 */
static void begin_drop(struct server *s, int fd, enum drop_reason reason, int read_error) {
    if (!in_room(s, fd))
        return;
    struct client *c = &s->conn[fd];
    c->phase = PHASE_LEAVING;
    c->reason = reason;
    c->read_error = read_error;
    remove_from_clients(s, fd);
    set_congested(s, fd, false);
    if (c->counted) {
        address_remove(&s->addresses, c->key);
        c->counted = false;
    }
    if (reason != DROP_HUNG_UP && reason != DROP_READ_ERROR)
        discard_held_line(s, fd);
    s->leaving[s->nleaving++] = fd; /* room for every client: see ensure_capacity */
}

static void log_drop(const struct server *s, int fd, const struct client *c) {
    switch (c->reason) {
    case DROP_HUNG_UP:
        log_line("socket %d hung up", fd);
        break;
    case DROP_READ_ERROR:
        log_line("socket %d closed: %s", fd, strerror(c->read_error));
        break;
    case DROP_STALLED:
        log_line("socket %d stalled (no progress for %s s), disconnected", fd, s->stall_text);
        break;
    case DROP_TOO_SLOW:
        log_line("socket %d too slow (over %zu bytes queued), disconnected", fd,
                 getProactorSendLimit(s->proactor));
        break;
    case DROP_LAGGING:
        log_line("socket %d too slow (congested for %s s), disconnected", fd, s->lag_text);
        break;
    }
}

/* The rest of a drop: one log line, removeHandler before close (the library's rule). */
static void complete_drop(struct server *s, int fd) {
    struct client *c = &s->conn[fd];
    log_drop(s, fd, c);
    discard_held_line(s, fd); /* a hung-up client's line was forwarded already */
    if (removeHandler(s->proactor, fd) != 0)
        log_line("removeHandler(%d): %s", fd, strerror(errno));
    if (close(fd) != 0)
        log_line("close(%d): %s", fd, strerror(errno));
    c->phase = PHASE_FREE;
}

/*
 * Empties the drop work list; every handler calls it last. Completing a drop sends nothing,
 * so the list cannot grow while it runs; the flag keeps an (unexpected) nested call from
 * completing a drop twice all the same.
 */
static void finish_drops(struct server *s) {
    if (s->finishing_drops)
        return;
    s->finishing_drops = true;
    for (size_t i = 0; i < s->nleaving; i++)
        complete_drop(s, s->leaving[i]);
    s->nleaving = 0;
    s->finishing_drops = false;
}

/* The flow handler: runs on the loop thread like every handler, one at a time. */
static void on_flow(void *proactor, int fd, int event, size_t queued, void *context) {
    (void)proactor;
    (void)queued;
    struct server *s = context;
    if (!in_room(s, fd))
        return;
    if (event == ST_PROACTOR_FLOW_HIGH)
        set_congested(s, fd, true);
    else if (event == ST_PROACTOR_FLOW_DRAINED)
        set_congested(s, fd, false);
    else if (event == ST_PROACTOR_FLOW_STALLED)
        begin_drop(s, fd, DROP_STALLED, 0);
    else if (event == ST_PROACTOR_FLOW_LAGGING)
        begin_drop(s, fd, DROP_LAGGING, 0);
    finish_drops(s);
}

/* ---------------------------------------------------------------- broadcast */

/*
 * Queues bytes for every client but the sender. The library writes the queues from the loop
 * as the sockets drain; a client whose queue would pass the hard cap (ENOBUFS) leaves the
 * room, so that it cannot make the server hold unbounded memory (flow control keeps queues
 * far below it, so this is the last resort). It only leaves here: the caller's finish_drops
 * completes it, after this broadcast, and nothing is broadcast again for it.
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
     * see the hang-up and drop it. begin_drop edits clients, not targets or results. */
    for (size_t i = 0; i < count; i++)
        if (s->results[i] == ENOBUFS)
            begin_drop(s, s->targets[i], DROP_TOO_SLOW, 0);
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
    unsigned char *copy = malloc(len);
    if (copy == NULL) {
        broadcast_from(s, fd, bytes, len);
        return;
    }
    memcpy(copy, bytes, len);
    struct client *c = &s->conn[fd];
    c->held = copy;
    c->held_len = len;
    c->held_since_ms = now_ms();
    s->holders[s->nholders++] = fd; /* holders has room for every client */
    if (!s->hold_armed)
        arm_hold_timer(s, LINE_HOLD_MS);
}

/* Sends what fd holds, if anything: it has been quiet long enough. Returns its length. */
static size_t release_held_line(struct server *s, int fd) {
    size_t len = 0;
    unsigned char *bytes = unhold_line(s, fd, &len);
    if (bytes == NULL)
        return 0;
    broadcast_from(s, fd, bytes, len);
    free(bytes);
    return len;
}

/* Whether the server has paused reading fd: some other client is behind. */
static bool reading_paused(const struct server *s, int fd) {
    return s->ncongested >= 2 || (s->ncongested == 1 && s->congested[0] != fd);
}

/*
 * The hold timer's handler: sends the unfinished lines whose client is being read and has
 * been quiet for LINE_HOLD_MS since it was last read or resumed (the end of a paused client's
 * line, or of one whose bytes wait to be read, may be in its socket), up to release_budget
 * bytes; past that it comes back in 1 ms, once the flow events of what it sent have paused
 * the room if some reader is behind.
 */
static void on_hold_timer(void *proactor, int fd, void *context) {
    (void)proactor;
    struct server *s = context;
    uint64_t expirations;
    if (read(fd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
        log_line("read(timer): %s", strerror(errno));
    s->hold_armed = false;
    long long now = now_ms(), next = -1;
    size_t i = 0, released = 0;
    while (i < s->nholders) {
        if (released >= s->release_budget) {
            next = 1;
            break;
        }
        int holder = s->holders[i];
        long long since = s->conn[holder].held_since_ms;
        long long quiet = now - (since > s->resumed_ms ? since : s->resumed_ms);
        if (reading_paused(s, holder) || quiet < LINE_HOLD_MS || bytes_waiting(holder)) {
            long long wait = quiet < LINE_HOLD_MS ? LINE_HOLD_MS - quiet : LINE_HOLD_MS;
            if (next < 0 || wait < next)
                next = wait;
            i++;
            continue;
        }
        /* Sending may make clients leave, which takes their lines out of holders: the entry
         * is taken out first, and an entry moved behind i is seen at the next expiry. */
        released += release_held_line(s, holder);
    }
    if (s->nholders > 0)
        arm_hold_timer(s, next > 0 ? next : LINE_HOLD_MS);
    finish_drops(s);
}

/* ---------------------------------------------------------------- client handler */

/*
 * One recv per call (the loop is level-triggered and calls again while bytes remain). What
 * was read goes to the others up to its last newline; the unfinished line after it is held.
 * A client that hung up leaves the room first, then what it had not finished goes to the
 * others (nothing it sent is lost).
 */
static void on_client(void *proactor, int fd, void *context) {
    (void)proactor;
    struct server *s = context;
    if (!in_room(s, fd))
        return; /* cannot happen: a leaving fd is removed before the next handler runs */
    size_t kept = take_held_line(s, fd, s->buf);
    ssize_t n = recv(fd, s->buf + kept, RECV_BUF_SIZE, 0);
    if (n > 0) {
        size_t len = kept + (size_t)n;
        const unsigned char *newline = memrchr(s->buf, '\n', len);
        size_t end = newline ? (size_t)(newline - s->buf) + 1 : 0;
        if (len - end > LINE_HOLD_LIMIT)
            end = len;
        broadcast_from(s, fd, s->buf, end);
        if (in_room(s, fd)) /* the sender itself is never a target, but be sure */
            hold_line(s, fd, s->buf + end, len - end);
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        hold_line(s, fd, s->buf, kept);
    } else {
        begin_drop(s, fd, n == 0 ? DROP_HUNG_UP : DROP_READ_ERROR, n == 0 ? 0 : errno);
        broadcast_from(s, fd, s->buf, kept);
    }
    finish_drops(s);
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

/*
 * One line per kind per REFUSAL_LOG_MS at most: a flood of connections must not become a
 * flood of log lines. The ones in between are counted into the next line of the kind.
 */
static void log_refusal(struct refusal_log *r, const char *peer, const char *why) {
    long long now = now_ms();
    if (r->logged_once && now - r->last_ms < REFUSAL_LOG_MS) {
        r->unreported++;
        return;
    }
    if (r->unreported > 0)
        log_line("refused a connection from %s: %s (and %llu more refused since the last report)",
                 peer, why, r->unreported);
    else
        log_line("refused a connection from %s: %s", peer, why);
    r->logged_once = true;
    r->last_ms = now;
    r->unreported = 0;
}

/* Tells a refused connection why, in one non-blocking send (it may not even be read), and
 * closes it: it never joins the room. */
static void refuse(int fd, const char *reply) {
    (void)send(fd, reply, strlen(reply), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (close(fd) != 0)
        log_line("close(%d): %s", fd, strerror(errno));
}

/* Refuses fd if a limit says so (and logs it, rate-limited); true when it was refused. */
static bool refused_by_limits(struct server *s, int fd, const struct sockaddr_storage *peer,
                              const unsigned char *key) {
    char addr[INET6_ADDRSTRLEN + 16], why[96];
    if (s->max_clients > 0 && s->nclients >= s->max_clients) {
        format_peer(peer, addr, sizeof addr);
        (void)snprintf(why, sizeof why, "server full (%zu clients)", s->max_clients);
        log_refusal(&s->full_log, addr, why);
        refuse(fd, SERVER_FULL_REPLY);
        return true;
    }
    if (s->max_per_ip > 0 && address_clients(&s->addresses, key) >= s->max_per_ip) {
        format_peer(peer, addr, sizeof addr);
        (void)snprintf(why, sizeof why, "too many connections from that address (%lu)",
                       (unsigned long)s->max_per_ip);
        log_refusal(&s->per_ip_log, addr, why);
        refuse(fd, TOO_MANY_REPLY);
        return true;
    }
    return false;
}

static void refuse_for_error(int fd, const char *what) {
    log_line("socket %d refused: %s", fd, what);
    if (close(fd) != 0)
        log_line("close(%d): %s", fd, strerror(errno));
}

/* Takes a freshly accepted client into the room and the proactor, or closes it. */
static void add_client(struct server *s, int fd, const struct sockaddr_storage *peer) {
    unsigned char key[ADDRESS_KEY_SIZE];
    address_key(peer, key);
    if (refused_by_limits(s, fd, peer, key))
        return;
    if (ensure_capacity(s, s->nclients + 1) != 0 || ensure_conn(s, fd) != 0 ||
        (s->max_per_ip > 0 && address_add(&s->addresses, key) != 0)) {
        refuse_for_error(fd, "out of memory");
        return;
    }
    struct client *c = &s->conn[fd];
    memset(c, 0, sizeof *c);
    c->counted = s->max_per_ip > 0;
    memcpy(c->key, key, sizeof key);
    if (addFD2ProactorWithContext(s->proactor, fd, on_client, s) != 0) {
        int err = errno;
        if (c->counted)
            address_remove(&s->addresses, key);
        c->counted = false;
        refuse_for_error(fd, strerror(err));
        return;
    }
    /* The proactor already gathers a turn's output into one send per client, so Nagle's
     * algorithm would only add delay (up to a delayed-ACK timeout) to each line. */
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
        log_line("socket %d: TCP_NODELAY: %s", fd, strerror(errno));
    c->phase = PHASE_IN_ROOM;
    c->slot = s->nclients;
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
    memset(&peer, 0, sizeof peer);
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

static struct server *server_new(const struct options *o) {
    struct server *s = calloc(1, sizeof *s);
    if (s == NULL) {
        (void)fprintf(stderr, NAME ": out of memory\n");
        return NULL;
    }
    s->listener = -1;
    s->max_clients = o->max_clients;
    s->max_per_ip = (uint32_t)o->max_per_ip;
    address_table_init(&s->addresses);
    (void)snprintf(s->stall_text, sizeof s->stall_text, "%s", o->stall_text);
    (void)snprintf(s->lag_text, sizeof s->lag_text, "%s", o->lag_text);
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
 * closes the listener and every client (what they held goes nowhere: nothing is written any
 * more), destroys the proactor; returns the clients closed.
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
    for (size_t i = 0; i < s->nclients; i++) {
        int fd = s->clients[i];
        discard_held_line(s, fd);
        if (removeHandler(s->proactor, fd) != 0)
            (void)fprintf(stderr, NAME ": removeHandler(%d): %s\n", fd, strerror(errno));
        if (close(fd) != 0)
            (void)fprintf(stderr, NAME ": close(%d): %s\n", fd, strerror(errno));
        s->conn[fd].phase = PHASE_FREE;
    }
    s->nclients = 0;
    g_proactor = NULL; /* first: a late SIGINT must not reach a destroyed proactor */
    if (destroyProactor(s->proactor) != 0)
        (void)fprintf(stderr, NAME ": destroyProactor: %s\n", strerror(errno));
    s->proactor = NULL;
    return closed;
}

static void server_free(struct server *s) {
    if (s->reserve_fd >= 0 && close(s->reserve_fd) != 0)
        (void)fprintf(stderr, NAME ": close(reserve): %s\n", strerror(errno));
    if (s->listener >= 0)
        (void)close(s->listener);
    free(s->clients);
    free(s->targets);
    free(s->results);
    free(s->congested);
    free(s->holders);
    free(s->leaving);
    for (size_t fd = 0; fd < s->conn_size; fd++)
        free(s->conn[fd].held);
    free(s->conn);
    free(s->addresses.slots);
    if (close(s->hold_timer) != 0)
        (void)fprintf(stderr, NAME ": close(timer): %s\n", strerror(errno));
    free(s);
}

/* Creates the proactor with the options' flow control; prints the stderr line on failure. */
static int server_create_proactor(struct server *s, const struct options *o, const char **backend) {
    s->proactor = createProactor();
    *backend = s->proactor ? getProactorBackend(s->proactor) : NULL;
    if (s->proactor == NULL || *backend == NULL) {
        (void)fprintf(stderr, NAME ": createProactor: %s\n", strerror(errno));
        goto fail;
    }
    size_t low;
    if (setProactorStallTimeout(s->proactor, o->stall_ms) != 0 ||
        setProactorLagTimeout(s->proactor, o->lag_ms) != 0 ||
        getProactorWatermarks(s->proactor, &low, &s->release_budget) != 0 ||
        setProactorFlowHandler(s->proactor, on_flow, s) != 0) {
        (void)fprintf(stderr, NAME ": flow control setup: %s\n", strerror(errno));
        goto fail;
    }
    g_proactor = s->proactor;
    return 0;
fail:
    if (s->proactor != NULL)
        (void)destroyProactor(s->proactor);
    s->proactor = NULL;
    return -1;
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

/* Blocks until the loop has stopped (SIGINT/SIGTERM); 0, or 1 when waiting failed. */
static int wait_for_stop(struct server *s) {
    while (waitProactor(s->proactor) != 0) {
        if (errno != EINTR) {
            (void)fprintf(stderr, NAME ": waitProactor: %s\n", strerror(errno));
            /* The loop may still run: stop and join it before main touches the state. */
            if (cancelProactor(s->proactor) != 0 && errno != ESRCH)
                (void)fprintf(stderr, NAME ": cancelProactor: %s\n", strerror(errno));
            return 1;
        }
    }
    return 0;
}

/* Everything between the parsed command line and the exit status; the log writer runs. */
static int run_server(const struct options *options) {
    struct server *s = server_new(options);
    if (s == NULL)
        return 1;
    unsigned port = options->port;
    s->listener = open_listener(options->bind, port);
    if (s->listener < 0 || bound_port(s->listener, &port) != 0) {
        if (s->listener >= 0)
            (void)fprintf(stderr, NAME ": getsockname: %s\n", strerror(errno));
        server_free(s);
        return 1;
    }
    const char *backend = NULL;
    if (server_create_proactor(s, options, &backend) != 0) {
        server_free(s);
        return 1;
    }
    int status = 0;
    if (install_stop_signals() != 0 || server_start(s, backend, port) != 0 ||
        set_stop_signals_blocked(false) != 0) {
        /* The loop may be running: asking it to stop makes the wait below return. */
        (void)requestCancelProactor(s->proactor);
        status = 1;
    }
    if (wait_for_stop(s) != 0)
        status = 1;
    size_t closed = server_shutdown(s);
    server_free(s);
    if (status == 0)
        log_line("shutting down (%zu clients closed)", closed);
    return status;
}

int main(int argc, char **argv) {
    struct options options;
    int status = parse_args(argc, argv, &options);
    if (status >= 0)
        return status;
    if (setup_process() != 0 || set_stop_signals_blocked(true) != 0 || log_start() != 0)
        return 1;
    status = run_server(&options);
    log_finish(); /* at most LOG_DRAIN_MS: the exit never waits on stdout */
    return status;
}
