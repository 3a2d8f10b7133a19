/* chat_load: a load generator for broadcast chat servers (every chunk a client sends goes
 * to every other client).
 *
 *   chat_load PORT CLIENTS SENDERS RATE DURATION WARMUP [SERVER_PID] [--burst N] (steady mode)
 *   chat_load flood PORT CLIENTS SENDERS LINES LINES_PER_WRITE [SERVER_PID]
 *             [--timeout S] [--idle S] [--stop-readers K]                     (flood mode)
 *
 * Steady mode: connects CLIENTS sockets to 127.0.0.1:PORT, waits until the server has accepted
 * all of them (a probe line must reach every client; a client that got none 1 s after its
 * connect completed is reconnected, a few at a time, see below), then SENDERS of them each send
 * RATE lines per second for WARMUP + DURATION seconds, evenly spread (or, with --burst N, N
 * lines written back to back every N periods: the same rate in bursts). Every line is exactly LINE_LEN bytes:
 *
 *   "D <sender:4> <seq:8> <send time, CLOCK_MONOTONIC ns:20> ......\n"
 *
 * Every client reads everything, splits lines, and checks each one: latency (now - send time),
 * per-sender sequence order (a line arriving after a higher sequence number of the same sender
 * is out of order), duplicates, garbled lines, lines echoed back to their sender. At the end it
 * prints one machine-readable line:
 *
 *   RESULT expected=.. delivered=.. lost=.. out_of_order=.. p50_us=.. p99_us=.. max_us=.. ...
 *
 * expected/delivered/lost/out_of_order cover every line of the run (warm-up included: the
 * probe barrier makes sure every client is accepted before the first one is sent); the latency
 * percentiles cover the lines sent in the measured window only; window_delivered counts the
 * lines received during the measured window (the denominator of CPU per delivery). The window
 * is announced on stdout with "MEASURE_START" and "MEASURE_END" lines, flushed at once, so a
 * driver can sample the server's CPU time at those moments.
 *
 * SENDERS = 0 is the idle mode: connect CLIENTS sockets, print "CONNECTED n", then hold them
 * (reading and discarding) for DURATION seconds or until SIGTERM/SIGINT.
 *
 * Connecting: a connect() completes on the client side when the SYN-ACK arrives, before the
 * server accepts; when the listen queue overflows (servers with a listen backlog of 10) Linux
 * answers with SYN cookies and silently drops the final ACK, leaving a client that believes it
 * is connected while the server never hears of it. So at most MAX_CONNECTING handshakes are in
 * flight, and with SERVER_PID at most PACE_UNACCEPTED connections the server has not accepted
 * yet (counted from /proc/SERVER_PID/fd), which keeps the listen queue from overflowing; the
 * probe barrier repairs what still slips through (load mode only: idle clients send nothing).
 *
 * Bounded in time: the setup (connect + barrier) gets 10 s + 1 s per 200 clients, the load phase
 * stops at WARMUP + DURATION + 10 s at the latest (earlier once everything is delivered, or
 * when nothing arrived for DRAIN_IDLE_NS after the senders stopped).
 * Exit status: 0 when the run completed (whatever was lost), 2 on bad arguments or setup failure.
 *
 * Both modes show the first 5 garbled lines they receive on stderr (escaped).
 *
 * Flood mode (a saturating load): the same connect pacing and probe barrier, then the first
 * SENDERS clients each send exactly LINES lines (the same 64-byte lines) as fast as their
 * non-blocking sockets take them, LINES_PER_WRITE lines per send() (the last one may carry
 * fewer; a partial send is completed on EPOLLOUT before anything else is written; all lines of
 * one write carry the same send time). Every client except the stopped ones reads as fast as it
 * can and checks every line as in steady mode. --stop-readers K: the last K clients (never
 * senders; their SO_RCVBUF is 16 KiB, set before connect) read nothing after the barrier and
 * keep their sockets open; the server closing one of them counts as stopped_closed (not an
 * error) and what they miss is not lost. The run ends when every line has reached every reading
 * client other than its sender, when nothing moved (no byte sent or received by a reading
 * client) for --idle S (5), or after --timeout S (120) from the first data line; then the stopped
 * readers are drained for at most 3 s to see which of them the server closed. MEASURE_START is
 * printed just before the first data line is sent, MEASURE_END when the last expected delivery
 * arrives (or when the run gives up), then one line
 *
 *   RESULT mode=flood expected=.. delivered=.. lost=.. out_of_order=.. dup=.. bad=.. echoed=..
 *          closed=.. stopped_closed=.. elapsed_ms=.. deliveries_per_s=.. clients=.. senders=..
 *          lines=.. lines_per_write=.. p50_us=.. p99_us=.. max_us=.. stopped=.. stopped_open=..
 *          sent=.. setup_ms=.. reconnects=.. end=complete|idle|timeout|signal
 *
 * expected = SENDERS * LINES * (reading clients other than that sender); closed = reading
 * clients the server closed (an error); elapsed_ms = first data line sent to last delivery
 * received; the latency percentiles cover every delivered line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <dirent.h>
#include <unistd.h>

#define LINE_LEN 64
#define HEAD_LEN 37 /* "D ssss qqqqqqqq tttttttttttttttttttt ": the rest is '.' padding */
#define READ_BUF (256 * 1024)
#define READS_PER_EVENT 8 /* then back to epoll_wait (level-triggered: the rest comes next turn) */
#define MAX_CONNECTING 128
#define PACE_UNACCEPTED 6
#define REPROBE_NS (1000000000LL)
#define PROBE_PERIOD_NS (100 * 1000000LL)
#define SETTLE_NS (300 * 1000000LL)
#define DRAIN_IDLE_NS (3 * 1000000000LL)
#define HARD_EXTRA_NS (10 * 1000000000LL)
/* Flood mode. */
#define STOPPED_RCVBUF (16 * 1024)
#define SEND_CALLS_PER_EVENT 64         /* send() calls per EPOLLOUT event of a sender ... */
#define SEND_BYTES_PER_EVENT (512 * 1024) /* ... or this many bytes, whichever comes first */
#define STOPPED_DRAIN_NS (3 * 1000000000LL)
#define STOPPED_QUIET_NS (500 * 1000000LL)
/* Latency histogram: 1 µs buckets below FINE_US, then 1 ms buckets up to COARSE_MS. */
#define FINE_US 65536
#define COARSE_MS 200000

enum state { ST_IDLE, ST_CONNECTING, ST_CONNECTED, ST_CLOSED };

struct client {
    int fd;
    enum state state;
    int sender;        /* sender id, or -1 */
    int stopped;       /* flood --stop-readers: reads nothing after the barrier */
    int probes_seen;
    long long connected_ns; /* when the connect completed */
    uint32_t events;   /* current epoll interest */
    char carry[LINE_LEN];
    size_t carry_len;
    char *out;         /* pending output: out[out_off .. out_len) */
    size_t out_len, out_off, out_cap;
};

struct sender {
    int client;
    uint32_t seq;            /* next sequence number */
    long long next_ns;       /* when the next line is due (steady mode) */
    char *chunk;             /* flood mode: the write in progress, chunk[chunk_off .. chunk_len) */
    size_t chunk_len, chunk_off;
};

static volatile sig_atomic_t stop_flag;
static struct client *cl;
static struct sender *snd;
static int nclients, nsenders, epfd;
static uint32_t max_seq;      /* sequence numbers per sender the tables can hold */
static size_t seq_words;      /* 64-bit words per (receiver, sender) bitmap */
static int32_t *last_seq;     /* [receiver * nsenders + sender], -1 = none yet */
static uint64_t *seen;        /* bitmaps [(receiver * nsenders + sender) * seq_words] */
static uint64_t hist_fine[FINE_US], hist_coarse[COARSE_MS + 1];
static uint64_t delivered, out_of_order, dups, bad, echoed, window_delivered, measured;
static uint64_t max_lat_us, probes_total, reconnects;
static int server_pid;
static long long win_start_ns, win_end_ns; /* measured window [start, end) */
static int in_window;
/* Flood mode. */
static int flood_pumping;         /* senders write on EPOLLOUT */
static uint32_t flood_lines;      /* lines per sender */
static int lines_per_write;
static long long last_delivery_ns, first_send_ns;
static uint64_t bytes_moved;      /* bytes sent by senders + received by reading clients */
static uint64_t flood_sent;       /* data lines handed to the kernel */
static int stopped_closed;
static char dots[LINE_LEN];

/* Number of open fds of the server process, or -1. */
static int server_fds(void) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", server_pid);
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("chat_load: ERROR ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static long parse_arg(const char *s, const char *name, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) die("bad %s '%s' (%ld..%ld)", name, s, lo, hi);
    return v;
}

static void set_events(struct client *c, uint32_t ev) {
    if (c->events == ev) return;
    struct epoll_event e = {.events = ev, .data.u32 = (uint32_t)(c - cl)};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e) < 0) die("epoll_ctl: %s", strerror(errno));
    c->events = ev;
}

static void close_client(struct client *c) {
    if (c->state == ST_CLOSED) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = ST_CLOSED;
}

static void start_connect(struct client *c, const struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket (client %d): %s", (int)(c - cl), strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (c->stopped) {
        /* Before connect, so that the window the server sees is small from the start. */
        int rcv = STOPPED_RCVBUF;
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv) < 0)
            die("SO_RCVBUF (client %d): %s", (int)(c - cl), strerror(errno));
    }
    c->fd = fd;
    c->state = ST_CONNECTING;
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS)
        die("connect (client %d): %s", (int)(c - cl), strerror(errno));
    struct epoll_event e = {.events = EPOLLOUT, .data.u32 = (uint32_t)(c - cl)};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) die("epoll_ctl add: %s", strerror(errno));
    c->events = EPOLLOUT;
}

static void queue_out(struct client *c, const char *data, size_t len) {
    if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
    if (c->out_len + len > c->out_cap) {
        if (c->out_off > 0) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + len > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap : 4096;
            while (cap < c->out_len + len) cap *= 2;
            char *p = realloc(c->out, cap);
            if (!p) die("out of memory");
            c->out = p;
            c->out_cap = cap;
        }
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

static void flush_out(struct client *c) {
    while (c->state == ST_CONNECTED && c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return;
        } else {
            close_client(c);
            return;
        }
    }
    if (c->state == ST_CONNECTED) set_events(c, EPOLLIN);
}

static void queue_probe(struct client *c) {
    char line[LINE_LEN];
    memset(line, '.', sizeof line);
    line[0] = 'P';
    line[1] = ' ';
    line[LINE_LEN - 1] = '\n';
    queue_out(c, line, sizeof line);
    flush_out(c);
}

/* Writes one data line (sender sid, sequence seq, send time t) at line[0 .. LINE_LEN). */
static void format_line(char *line, int sid, uint32_t seq, long long t) {
    char tmp[LINE_LEN + 1];
    int n = snprintf(tmp, sizeof tmp, "D %04d %08u %020lld ", sid, (unsigned)seq, t);
    memcpy(line, tmp, (size_t)n);
    memset(line + n, '.', (size_t)(LINE_LEN - 1 - n));
    line[LINE_LEN - 1] = '\n';
}

static void send_line(struct sender *s, int sid) {
    struct client *c = &cl[s->client];
    char line[LINE_LEN];
    long long t = now_ns();
    if (s->seq >= max_seq) return; /* cannot happen with sane clocks; keep the tables safe */
    format_line(line, sid, s->seq, t);
    s->seq++;
    if (c->state != ST_CONNECTED) return; /* still counted as sent: the others miss it */
    queue_out(c, line, LINE_LEN);
    flush_out(c);
}

static int parse_digits(const char *p, int n, unsigned long long *out) {
    unsigned long long v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    *out = v;
    return 0;
}

static void record_latency(long long lat_ns) {
    uint64_t us = lat_ns > 0 ? (uint64_t)(lat_ns / 1000) : 0;
    if (us > max_lat_us) max_lat_us = us;
    if (us < FINE_US) hist_fine[us]++;
    else hist_coarse[us / 1000 < COARSE_MS ? us / 1000 : COARSE_MS]++;
    measured++;
}

static uint64_t percentile_us(double q) {
    if (measured == 0) return 0;
    uint64_t rank = (uint64_t)(q * (double)(measured - 1)) + 1, acc = 0;
    for (uint64_t i = 0; i < FINE_US; i++) {
        acc += hist_fine[i];
        if (acc >= rank) return i;
    }
    for (uint64_t i = FINE_US / 1000; i <= COARSE_MS; i++) {
        acc += hist_coarse[i];
        if (acc >= rank) return i * 1000;
    }
    return max_lat_us;
}

/* Counts a garbled line received by client r, and shows the first few on stderr (escaped),
 * which says what the server did: two half lines glued together, a cut line, ... */
#define BAD_SHOWN 5
static void count_bad(int r, const char *text, size_t len, size_t total) {
    if (bad++ >= BAD_SHOWN) return;
    char out[4 * 2 * LINE_LEN + 1];
    size_t o = 0;
    for (size_t i = 0; i < len && i < 2 * LINE_LEN; i++) {
        unsigned char ch = (unsigned char)text[i];
        if (ch >= 32 && ch < 127 && ch != '\\') out[o++] = (char)ch;
        else o += (size_t)snprintf(out + o, sizeof out - o, "\\x%02x", ch);
    }
    out[o] = 0;
    fprintf(stderr, "chat_load: bad line %llu at client %d (%zu bytes): %s%s\n", (unsigned long long)bad, r,
            total, out, len < total ? "..." : "");
}

/* One LINE_LEN-byte line ending in '\n' received by client r. */
static void handle_line(int r, const char *line, long long now) {
    if (line[0] == 'P' && line[1] == ' ') {
        cl[r].probes_seen++;
        probes_total++;
        return;
    }
    unsigned long long sid, seq, ts;
    if (line[0] != 'D' || line[1] != ' ' || line[6] != ' ' || line[15] != ' ' || line[36] != ' ' ||
        parse_digits(line + 2, 4, &sid) || parse_digits(line + 7, 8, &seq) ||
        parse_digits(line + 16, 20, &ts) || sid >= (unsigned long long)nsenders || seq >= max_seq ||
        memcmp(line + HEAD_LEN, dots, LINE_LEN - 1 - HEAD_LEN) != 0) {
        count_bad(r, line, LINE_LEN, LINE_LEN);
        return;
    }
    if (snd[sid].client == r) {
        echoed++;
        return;
    }
    size_t pair = (size_t)r * (size_t)nsenders + (size_t)sid;
    uint64_t *bits = seen + pair * seq_words;
    uint64_t mask = 1ULL << (seq % 64);
    if (bits[seq / 64] & mask) {
        dups++;
        return;
    }
    bits[seq / 64] |= mask;
    delivered++;
    last_delivery_ns = now;
    if ((int32_t)seq < last_seq[pair]) out_of_order++;
    else last_seq[pair] = (int32_t)seq;
    if (in_window) window_delivered++;
    if ((long long)ts >= win_start_ns && (long long)ts < win_end_ns) record_latency(now - (long long)ts);
}

static char rbuf[READ_BUF];

/* Splits rbuf[0 .. len) into lines for client c and checks each one. A line is whatever ends
 * at the next '\n'; one that is not exactly LINE_LEN bytes long is bad. */
static void parse_chunk(struct client *c, size_t len, long long now) {
    int r = (int)(c - cl);
    size_t pos = 0;
    /* Complete the carried partial line first. */
    while (c->carry_len > 0 && pos < len) {
        char ch = rbuf[pos++];
        if (c->carry_len < LINE_LEN) c->carry[c->carry_len] = ch;
        c->carry_len++;
        if (ch == '\n') {
            if (c->carry_len == LINE_LEN) handle_line(r, c->carry, now);
            else count_bad(r, c->carry, c->carry_len < LINE_LEN ? c->carry_len : LINE_LEN, c->carry_len);
            c->carry_len = 0;
        }
    }
    while (pos < len) {
        char *nl = memchr(rbuf + pos, '\n', len - pos);
        if (!nl) {
            size_t rest = len - pos;
            memcpy(c->carry, rbuf + pos, rest < LINE_LEN ? rest : LINE_LEN);
            c->carry_len = rest;
            break;
        }
        size_t l = (size_t)(nl - (rbuf + pos)) + 1;
        if (l == LINE_LEN) handle_line(r, rbuf + pos, now);
        else count_bad(r, rbuf + pos, l, l);
        pos += l;
    }
}

/* Reads what is there (at most READS_PER_EVENT buffers); returns bytes read (0 when nothing or
 * closed). */
static size_t read_client(struct client *c, long long now) {
    size_t total = 0;
    for (int reads = 0; reads < READS_PER_EVENT; reads++) {
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return total;
        if (n <= 0) {
            close_client(c);
            return total;
        }
        total += (size_t)n;
        parse_chunk(c, (size_t)n, now);
        if ((size_t)n < sizeof rbuf) return total;
    }
    return total;
}

/* Flood mode: writes as much of sender k's lines as its socket takes, within one event's
 * budget. A partial write is completed before the next chunk is formatted. */
static void pump_sender(struct client *c) {
    struct sender *s = &snd[c->sender];
    int sid = c->sender;
    size_t budget = SEND_BYTES_PER_EVENT;
    /* Leftover probe bytes from the barrier go first (in practice there are none). */
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) c->out_off += (size_t)n;
        else if (n < 0 && errno == EINTR) continue;
        else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        else {
            close_client(c);
            return;
        }
    }
    for (int calls = 0; calls < SEND_CALLS_PER_EVENT && budget > 0; calls++) {
        if (s->chunk_off == s->chunk_len) {
            if (s->seq >= flood_lines) {
                set_events(c, EPOLLIN);
                return;
            }
            uint32_t n = flood_lines - s->seq;
            if (n > (uint32_t)lines_per_write) n = (uint32_t)lines_per_write;
            long long t = now_ns();
            if (first_send_ns == 0) first_send_ns = t;
            for (uint32_t i = 0; i < n; i++) format_line(s->chunk + (size_t)i * LINE_LEN, sid, s->seq + i, t);
            s->seq += n;
            flood_sent += n;
            s->chunk_len = (size_t)n * LINE_LEN;
            s->chunk_off = 0;
        }
        ssize_t n = send(c->fd, s->chunk + s->chunk_off, s->chunk_len - s->chunk_off, MSG_NOSIGNAL);
        if (n > 0) {
            s->chunk_off += (size_t)n;
            bytes_moved += (uint64_t)n;
            budget = (size_t)n >= budget ? 0 : budget - (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return; /* EPOLLOUT stays in the interest set */
        } else {
            close_client(c); /* the rest of its lines are lost */
            return;
        }
    }
    if (s->chunk_off == s->chunk_len && s->seq >= flood_lines) set_events(c, EPOLLIN);
}

static void handle_event(struct epoll_event *e, long long now, int *connected, int *connecting) {
    struct client *c = &cl[e->data.u32];
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) die("connect (client %d): %s", (int)(c - cl), strerror(err));
        if (!(e->events & EPOLLOUT)) return;
        c->state = ST_CONNECTED;
        c->connected_ns = now;
        (*connected)++;
        (*connecting)--;
        set_events(c, EPOLLIN);
        return;
    }
    if (c->state != ST_CONNECTED) return;
    if (c->stopped && flood_pumping) {
        /* Interest is EPOLLRDHUP only: we hear of the server closing it, and read nothing. */
        if (e->events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            stopped_closed++;
            close_client(c);
        }
        return;
    }
    if (e->events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        size_t n = read_client(c, now);
        if (flood_pumping) bytes_moved += n;
    }
    if (c->state == ST_CONNECTED && (e->events & EPOLLOUT)) {
        if (flood_pumping && c->sender >= 0) pump_sender(c);
        else flush_out(c);
    }
}

static int poll_once(long long now, long long next_due, int *connected, int *connecting) {
    static struct epoll_event evs[512];
    long long wait_ns = next_due - now;
    int timeout = wait_ns <= 0 ? 0 : (int)((wait_ns + 999999) / 1000000);
    if (timeout > 100) timeout = 100;
    int n = epoll_wait(epfd, evs, 512, timeout);
    if (n < 0) {
        if (errno == EINTR) return 0;
        die("epoll_wait: %s", strerror(errno));
    }
    long long t = now_ns();
    for (int i = 0; i < n; i++) handle_event(&evs[i], t, connected, connecting);
    return n;
}

static void setup_process(void) {
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur < (rlim_t)nclients + 16)
        die("RLIMIT_NOFILE %llu is too small for %d clients", (unsigned long long)rl.rlim_cur, nclients);
    memset(dots, '.', sizeof dots);

    cl = calloc((size_t)nclients, sizeof *cl);
    if (!cl) die("out of memory");
    for (int i = 0; i < nclients; i++) {
        cl[i].fd = -1;
        cl[i].sender = -1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));
}

/* The sequence tables for max_seq lines per sender (senders already placed in snd[]). */
static void alloc_tables(void) {
    seq_words = (max_seq + 63) / 64;
    size_t pairs = (size_t)nclients * (size_t)nsenders;
    last_seq = malloc(pairs * sizeof *last_seq);
    seen = calloc(pairs * seq_words, sizeof *seen);
    if (!last_seq || !seen) die("out of memory for %zu sequence tables", pairs);
    for (size_t i = 0; i < pairs; i++) last_seq[i] = -1;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

/* Connects everyone (at most MAX_CONNECTING handshakes at once, and with SERVER_PID at most
 * PACE_UNACCEPTED connections not yet accepted by the server). */
static void connect_all(const struct sockaddr_in *addr, long long setup_deadline, int *connected,
                        int *connecting) {
    int next = 0;
    int fds0 = server_pid ? server_fds() : -1;
    if (server_pid && fds0 < 0) die("cannot read /proc/%d/fd: %s", server_pid, strerror(errno));
    while (*connected < nclients) {
        int paced = 0;
        while (next < nclients && *connecting < MAX_CONNECTING) {
            if (fds0 >= 0) {
                int fds = server_fds();
                if (fds < 0) die("server process %d is gone", server_pid);
                if (fds < fds0) fds0 = fds; /* it was still closing connections of an earlier run */
                int accepted = fds - fds0;
                if (next - accepted >= PACE_UNACCEPTED) {
                    paced = 1;
                    break;
                }
            }
            start_connect(&cl[next++], addr);
            (*connecting)++;
        }
        long long now = now_ns();
        if (now > setup_deadline) die("setup timeout: %d of %d clients connected", *connected, nclients);
        if (stop_flag) die("interrupted during setup");
        poll_once(now, now + (paced ? 200000LL : 100000000LL), connected, connecting);
    }
    for (int i = 0; i < nclients; i++)
        if (cl[i].state != ST_CONNECTED) die("client %d was closed during setup", i);
}

/* Barrier: clients 0 and 1 send probe lines until every client has received one, so that
 * the server has accepted (and registered) everybody before the first counted line; then a
 * short settle time lets the last probes arrive. */
static void probe_barrier(const struct sockaddr_in *addr, long long setup_deadline, int *connected,
                          int *connecting) {
    long long next_probe = now_ns();
    for (;;) {
        long long now = now_ns();
        int missing = 0;
        for (int i = 0; i < nclients; i++) missing += cl[i].probes_seen == 0;
        if (missing == 0) break;
        if (now > setup_deadline) die("setup timeout: %d of %d clients never got a probe line", missing, nclients);
        if (stop_flag) die("interrupted during setup");
        int in_trial = 0; /* connections still in their chance to get a probe */
        for (int i = 2; i < nclients; i++)
            in_trial += cl[i].state == ST_CONNECTING ||
                        (cl[i].state == ST_CONNECTED && cl[i].probes_seen == 0 &&
                         now - cl[i].connected_ns <= REPROBE_NS);
        for (int i = 0; i < nclients; i++) {
            struct client *c = &cl[i];
            if (c->state == ST_CLOSED) die("client %d was closed by the server during setup", i);
            if (c->state == ST_CONNECTED && c->probes_seen == 0 && now - c->connected_ns > REPROBE_NS &&
                i > 1 && in_trial < PACE_UNACCEPTED) {
                in_trial++;
                /* Most likely never accepted (see above): connect again. */
                close_client(c);
                c->carry_len = 0;
                start_connect(c, addr);
                (*connected)--;
                (*connecting)++;
                reconnects++;
            }
        }
        if (now >= next_probe) {
            queue_probe(&cl[0]);
            queue_probe(&cl[1]);
            next_probe = now + PROBE_PERIOD_NS;
        }
        poll_once(now, next_probe, connected, connecting);
    }
    long long settle_end = now_ns() + SETTLE_NS;
    for (;;) {
        long long now = now_ns();
        if (now >= settle_end) break;
        poll_once(now, settle_end, connected, connecting);
    }
}

static int steady_main(int argc, char **argv) {
    /* --burst N (last): each sender writes N lines back to back every N periods, the same
     * average rate in bursts. */
    long burst = 1;
    if (argc >= 9 && strcmp(argv[argc - 2], "--burst") == 0) {
        burst = parse_arg(argv[argc - 1], "--burst", 1, 10000);
        argc -= 2;
    }
    if (argc != 7 && argc != 8) {
        fprintf(stderr,
                "usage: %s PORT CLIENTS SENDERS RATE DURATION WARMUP [SERVER_PID] [--burst N]\n"
                "       %s flood PORT CLIENTS SENDERS LINES LINES_PER_WRITE [SERVER_PID] "
                "[--timeout S] [--idle S] [--stop-readers K]\n",
                argv[0], argv[0]);
        return 2;
    }
    int port = (int)parse_arg(argv[1], "port", 1, 65535);
    nclients = (int)parse_arg(argv[2], "clients", 2, 1000000);
    nsenders = (int)parse_arg(argv[3], "senders", 0, 9999);
    long rate = parse_arg(argv[4], "rate", 0, 100000);
    long duration = parse_arg(argv[5], "duration", 0, 86400);
    long warmup = parse_arg(argv[6], "warmup", 0, 86400);
    if (argc == 8) server_pid = (int)parse_arg(argv[7], "server pid", 1, 1 << 30);
    if (nsenders > nclients) die("senders (%d) > clients (%d)", nsenders, nclients);
    if (nsenders > 0 && rate < 1) die("rate must be >= 1 with senders");

    setup_process();
    if (nsenders > 0) {
        snd = calloc((size_t)nsenders, sizeof *snd);
        if (!snd) die("out of memory");
        max_seq = (uint32_t)(rate * (warmup + duration + 1) + 64);
        for (int k = 0; k < nsenders; k++) {
            snd[k].client = (int)((long long)k * nclients / nsenders);
            cl[snd[k].client].sender = k;
        }
        alloc_tables();
    }
    struct sockaddr_in addr = loopback(port);

    long long t0 = now_ns();
    long long setup_deadline = t0 + 10000000000LL + (long long)nclients * 5000000LL;
    int connected = 0, connecting = 0;
    connect_all(&addr, setup_deadline, &connected, &connecting);

    if (nsenders == 0) {
        /* Idle mode. */
        printf("CONNECTED %d\n", connected);
        fflush(stdout);
        long long end = now_ns() + duration * 1000000000LL;
        while (!stop_flag) {
            long long now = now_ns();
            if (now >= end) break;
            poll_once(now, end, &connected, &connecting);
        }
        int open = 0;
        for (int i = 0; i < nclients; i++) open += cl[i].state == ST_CONNECTED;
        printf("RESULT mode=idle clients=%d open=%d bad=%llu\n", nclients, open,
               (unsigned long long)bad);
        fflush(stdout);
        return 0;
    }

    probe_barrier(&addr, setup_deadline, &connected, &connecting);
    long long setup_ms = (now_ns() - t0) / 1000000;

    /* Load. */
    long long start = now_ns();
    long long period = 1000000000LL / rate;
    win_start_ns = start + warmup * 1000000000LL;
    win_end_ns = win_start_ns + duration * 1000000000LL;
    long long hard_end = win_end_ns + HARD_EXTRA_NS;
    for (int k = 0; k < nsenders; k++) snd[k].next_ns = start + (long long)k * period / nsenders;
    uint64_t sent_lines = 0, expected = 0;
    int window_started = 0, window_ended = 0;
    long long last_rx = start;
    uint64_t last_delivered = 0;
    for (;;) {
        long long now = now_ns();
        if (!window_started && now >= win_start_ns) {
            window_started = 1;
            in_window = 1;
            printf("MEASURE_START\n");
            fflush(stdout);
        }
        if (!window_ended && now >= win_end_ns) {
            window_ended = 1;
            in_window = 0;
            printf("MEASURE_END\n");
            fflush(stdout);
            last_rx = now;
            last_delivered = delivered;
            expected = 0;
            for (int k = 0; k < nsenders; k++) expected += (uint64_t)snd[k].seq * (uint64_t)(nclients - 1);
        }
        long long next_due = win_end_ns;
        if (!window_ended) {
            for (int k = 0; k < nsenders; k++) {
                while (snd[k].next_ns <= now && snd[k].next_ns < win_end_ns) {
                    for (long b = 0; b < burst; b++) {
                        send_line(&snd[k], k);
                        sent_lines++;
                    }
                    snd[k].next_ns += period * burst;
                }
                if (snd[k].next_ns < next_due) next_due = snd[k].next_ns;
            }
        } else {
            if (delivered >= expected) break;
            if (delivered != last_delivered) {
                last_delivered = delivered;
                last_rx = now;
            }
            if (now - last_rx > DRAIN_IDLE_NS) break;
            if (now >= hard_end) break;
            next_due = now + 100000000LL;
        }
        if (stop_flag) break;
        if (!window_started && win_start_ns < next_due) next_due = win_start_ns;
        poll_once(now, next_due, &connected, &connecting);
    }
    if (!window_ended) { /* interrupted */
        expected = 0;
        for (int k = 0; k < nsenders; k++) expected += (uint64_t)snd[k].seq * (uint64_t)(nclients - 1);
    }
    int closed = 0;
    for (int i = 0; i < nclients; i++) closed += cl[i].state != ST_CONNECTED;
    uint64_t lost = expected > delivered ? expected - delivered : 0;
    printf("RESULT expected=%llu delivered=%llu lost=%llu out_of_order=%llu p50_us=%llu p99_us=%llu "
           "max_us=%llu window_delivered=%llu dup=%llu bad=%llu echoed=%llu closed=%d sent=%llu "
           "clients=%d senders=%d rate=%ld duration=%ld warmup=%ld setup_ms=%lld drain_ms=%lld "
           "reconnects=%llu\n",
           (unsigned long long)expected, (unsigned long long)delivered, (unsigned long long)lost,
           (unsigned long long)out_of_order, (unsigned long long)percentile_us(0.50),
           (unsigned long long)percentile_us(0.99), (unsigned long long)max_lat_us,
           (unsigned long long)window_delivered, (unsigned long long)dups, (unsigned long long)bad,
           (unsigned long long)echoed, closed, (unsigned long long)sent_lines, nclients, nsenders,
           rate, duration, warmup, setup_ms, (now_ns() - win_end_ns) / 1000000,
           (unsigned long long)reconnects);
    fflush(stdout);
    return 0;
}

/* After the flood: reads (and discards) what the stopped readers still have coming, to learn
 * which of them the server closed. Bounded by STOPPED_DRAIN_NS; a client that got nothing for
 * STOPPED_QUIET_NS while still open counts as open. Returns how many are still open. */
static int drain_stopped(void) {
    int open = 0;
    for (int i = 0; i < nclients; i++) {
        struct client *c = &cl[i];
        if (!c->stopped || c->state != ST_CONNECTED) continue;
        set_events(c, EPOLLIN | EPOLLRDHUP);
        c->connected_ns = now_ns(); /* reused: when it last got something */
        open++;
    }
    long long end = now_ns() + STOPPED_DRAIN_NS;
    static struct epoll_event evs[512];
    while (open > 0) {
        long long now = now_ns();
        if (now >= end || stop_flag) break;
        int quiet = 0;
        for (int i = 0; i < nclients; i++)
            quiet += cl[i].stopped && cl[i].state == ST_CONNECTED &&
                     now - cl[i].connected_ns > STOPPED_QUIET_NS;
        if (quiet == open) break;
        int n = epoll_wait(epfd, evs, 512, 50);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int k = 0; k < n; k++) {
            struct client *c = &cl[evs[k].data.u32];
            if (!c->stopped || c->state != ST_CONNECTED) continue;
            for (int reads = 0; reads < READS_PER_EVENT; reads++) {
                ssize_t m = recv(c->fd, rbuf, sizeof rbuf, 0);
                if (m > 0) {
                    c->connected_ns = now_ns();
                    continue;
                }
                if (m < 0 && errno == EINTR) continue;
                if (m < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                stopped_closed++; /* EOF or reset: the server closed it */
                close_client(c);
                open--;
                break;
            }
        }
    }
    return open;
}

static int flood_main(int argc, char **argv) {
    const char *usage = "usage: %s flood PORT CLIENTS SENDERS LINES LINES_PER_WRITE [SERVER_PID] "
                        "[--timeout S] [--idle S] [--stop-readers K]\n";
    const char *pos[6];
    int npos = 0;
    long timeout_s = 120, idle_s = 5, nstopped = 0;
    for (int i = 2; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) == 0) {
            if (i + 1 >= argc) die("%s needs a value", argv[i]);
            if (strcmp(argv[i], "--timeout") == 0) timeout_s = parse_arg(argv[++i], "--timeout", 1, 86400);
            else if (strcmp(argv[i], "--idle") == 0) idle_s = parse_arg(argv[++i], "--idle", 1, 86400);
            else if (strcmp(argv[i], "--stop-readers") == 0)
                nstopped = parse_arg(argv[++i], "--stop-readers", 0, 1000000);
            else die("unknown option '%s'", argv[i]);
        } else if (npos < 6) {
            pos[npos++] = argv[i];
        } else {
            fprintf(stderr, usage, argv[0]);
            return 2;
        }
    }
    if (npos < 5) {
        fprintf(stderr, usage, argv[0]);
        return 2;
    }
    int port = (int)parse_arg(pos[0], "port", 1, 65535);
    nclients = (int)parse_arg(pos[1], "clients", 2, 1000000);
    nsenders = (int)parse_arg(pos[2], "senders", 1, 9999);
    flood_lines = (uint32_t)parse_arg(pos[3], "lines", 1, 100000000);
    lines_per_write = (int)parse_arg(pos[4], "lines per write", 1, 65536);
    if (npos == 6) server_pid = (int)parse_arg(pos[5], "server pid", 1, 1 << 30);
    if (nsenders > nclients) die("senders (%d) > clients (%d)", nsenders, nclients);
    if (nstopped > nclients - nsenders) die("--stop-readers %ld: only %d clients are not senders", nstopped, nclients - nsenders);
    int nreading = nclients - (int)nstopped;
    if (nreading < 2) die("at least 2 clients must read (clients %d, stopped %ld)", nclients, nstopped);
    double table_bytes = (double)nclients * nsenders * ((flood_lines + 63) / 64) * 8.0;
    if (table_bytes > 4.0 * 1024 * 1024 * 1024) die("sequence tables would take %.1f GiB", table_bytes / (1 << 30));

    setup_process();
    snd = calloc((size_t)nsenders, sizeof *snd);
    if (!snd) die("out of memory");
    max_seq = flood_lines;
    for (int k = 0; k < nsenders; k++) {
        snd[k].client = k;
        cl[k].sender = k;
        snd[k].chunk = malloc((size_t)lines_per_write * LINE_LEN);
        if (!snd[k].chunk) die("out of memory");
    }
    for (int i = nclients - (int)nstopped; i < nclients; i++) cl[i].stopped = 1;
    alloc_tables();
    win_start_ns = 0; /* every delivered line counts for latency */
    win_end_ns = LLONG_MAX;
    struct sockaddr_in addr = loopback(port);

    long long t0 = now_ns();
    long long setup_deadline = t0 + 10000000000LL + (long long)nclients * 5000000LL;
    int connected = 0, connecting = 0;
    connect_all(&addr, setup_deadline, &connected, &connecting);
    probe_barrier(&addr, setup_deadline, &connected, &connecting);
    long long setup_ms = (now_ns() - t0) / 1000000;

    /* Every sender's line goes to every reading client but itself (senders always read). */
    uint64_t expected = (uint64_t)nsenders * flood_lines * (uint64_t)(nreading - 1);

    /* Flood. */
    for (int i = 0; i < nclients; i++)
        if (cl[i].stopped && cl[i].state == ST_CONNECTED) set_events(&cl[i], EPOLLRDHUP);
    printf("MEASURE_START\n");
    fflush(stdout);
    flood_pumping = 1;
    in_window = 1;
    long long start = now_ns();
    for (int k = 0; k < nsenders; k++)
        if (cl[k].state == ST_CONNECTED) set_events(&cl[k], EPOLLIN | EPOLLOUT);
    const char *end_reason = "complete";
    long long last_progress = start;
    uint64_t last_moved = 0;
    for (;;) {
        long long now = now_ns();
        if (delivered >= expected) break;
        if (bytes_moved != last_moved) {
            last_moved = bytes_moved;
            last_progress = now;
        }
        if (stop_flag) {
            end_reason = "signal";
            break;
        }
        if (now - last_progress > idle_s * 1000000000LL) {
            end_reason = "idle";
            break;
        }
        if (now - start > timeout_s * 1000000000LL) {
            end_reason = "timeout";
            break;
        }
        poll_once(now, now + 100000000LL, &connected, &connecting);
    }
    printf("MEASURE_END\n");
    fflush(stdout);
    in_window = 0;
    flood_pumping = 0;

    int stopped_open = drain_stopped();
    int closed = 0;
    for (int i = 0; i < nclients; i++) closed += !cl[i].stopped && cl[i].state != ST_CONNECTED;
    uint64_t lost = expected > delivered ? expected - delivered : 0;
    long long t_first = first_send_ns ? first_send_ns : start;
    long long elapsed_ns = last_delivery_ns > t_first ? last_delivery_ns - t_first : 0;
    double per_s = elapsed_ns > 0 ? (double)delivered * 1e9 / (double)elapsed_ns : 0.0;
    printf("RESULT mode=flood expected=%llu delivered=%llu lost=%llu out_of_order=%llu dup=%llu "
           "bad=%llu echoed=%llu closed=%d stopped_closed=%d elapsed_ms=%lld deliveries_per_s=%.0f "
           "clients=%d senders=%d lines=%u lines_per_write=%d p50_us=%llu p99_us=%llu max_us=%llu "
           "stopped=%ld stopped_open=%d sent=%llu setup_ms=%lld reconnects=%llu end=%s\n",
           (unsigned long long)expected, (unsigned long long)delivered, (unsigned long long)lost,
           (unsigned long long)out_of_order, (unsigned long long)dups, (unsigned long long)bad,
           (unsigned long long)echoed, closed, stopped_closed, elapsed_ns / 1000000, per_s,
           nclients, nsenders, (unsigned)flood_lines, lines_per_write,
           (unsigned long long)percentile_us(0.50), (unsigned long long)percentile_us(0.99),
           (unsigned long long)max_lat_us, nstopped, stopped_open, (unsigned long long)flood_sent,
           setup_ms, (unsigned long long)reconnects, end_reason);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "flood") == 0) return flood_main(argc, argv);
    return steady_main(argc, argv);
}
