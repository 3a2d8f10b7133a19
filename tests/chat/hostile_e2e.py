#!/usr/bin/env python3
"""Hostile-client tests for the chat servers (./proact_server and c_demo/chat_server).

usage: python3 tests/chat/hostile_e2e.py SERVER_BINARY [--only NAME]

What a client can do to the room, and what the server must do about it (issue 17): a reader
that reads too slowly is dropped after --max-lag seconds of congestion; a wave of 1500 clients
that never read is dropped, each once, while an honest reader keeps everything; --max-clients
and --max-per-ip refuse the extra connections with one line and a close; --bind listens only
on the address given; a stdout nobody reads does not stop the room (the log is written by a
thread of its own and drops lines, counting them, when its buffer is full); a reader that
reads steadily is never dropped by --max-lag; bad flag values exit 2 with one line.

The harness is chat_e2e.py's (one fresh server per test, started on port 0, stopped after it,
whatever happened; ST_PROACTOR_BACKEND passes through the environment). Output: one line per
test, then `N passed, M failed`; exit status 1 when any test failed. Python 3 standard library
only; clients connect to 127.0.0.1 only (one test binds a client to 127.0.0.2, which is
loopback too). Every test is bounded in time (the longest, the drop wave, by about 3 minutes).
"""
import argparse
import errno
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chat_e2e import (  # noqa: E402 - the harness lives beside this file
    HOST, LOG_TIMEOUT, RECV_TIMEOUT, REPO_ROOT, Client, Server, TestFailure, TestSkip,
    assert_chat_works, check, close_all, connect, describe, first_difference, line_stream,
    run_test, run_threads)


def usage_line(name):
    return (f"usage: {name} [port] [--bind ADDRESS] [--max-clients N] [--max-per-ip N] "
            f"[--max-lag SECONDS] [--stall-timeout SECONDS]")


# The log lines of a client arriving and leaving (every way it can leave), after `NAME: `.
CONNECT_TEXT = re.compile(r"new connection from (\S+):(\d+) on socket (\d+)")
LEAVE_TEXT = re.compile(r"socket (\d+) (hung up|closed: .*|stalled \(no progress for \S+ s\), disconnected|"
                        r"too slow \((over \d+ bytes queued|congested for \S+ s)\), disconnected)")
DROP_KINDS = ("stalled", "too slow")
LOG_DROPPED_TEXT = re.compile(r"(\d+) log lines dropped")


# ---------------------------------------------------------------------------------------------
# Helpers


def server_env():
    """The environment a server runs in (as chat_e2e's Server gives it)."""
    env = dict(os.environ)
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = REPO_ROOT + (":" + old if old else "")
    return env


class HostileClient(Client):
    """A chat_e2e Client whose socket gets options (and a source address) before connect."""

    def __init__(self, server, sockopts=(), source=None, wait_accept=True):
        self.server = server
        self.source = source or HOST
        self.fd = None
        self.accept_index = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            for level, option, value in sockopts:
                self.sock.setsockopt(level, option, value)
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.settimeout(RECV_TIMEOUT)
            self.sock.connect((HOST, server.port))
            self.local_port = self.sock.getsockname()[1]
            if wait_accept:
                self.wait_accepted()
        except BaseException:
            self.sock.close()
            raise

    def wait_accepted(self, timeout=LOG_TIMEOUT):
        addr = re.escape(self.source)
        i, m = self.server.wait_line(
            self.server.log(rf"new connection from {addr}:{self.local_port} on socket (\d+)"),
            timeout=timeout, what=f"new connection from {self.source}:{self.local_port} on socket FD")
        self.fd = int(m.group(1))
        self.accept_index = i
        return self


def wait_readable(sock, timeout):
    """True when sock has input (or EOF, or an error) within timeout seconds. poll, not
    select: the drop-wave test has descriptors above 1024."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def read_exactly(client, n, deadline, what, stop=None):
    """n bytes from the client's socket before the monotonic deadline; fails on EOF, error or
    time-out. Safe while another thread sends on the same socket (no timeout is changed)."""
    sock = client.sock
    buf = bytearray()
    while len(buf) < n:
        check(stop is None or not stop.is_set(), f"{what}: stopped after another thread failed")
        left = deadline - time.monotonic()
        check(left > 0, f"{what}: got {len(buf)} of {n} bytes in time")
        if not wait_readable(sock, min(left, 0.5)):
            continue
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20), socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError as e:
            raise TestFailure(f"{what}: {e} after {len(buf)} of {n} bytes{why_gone(client.server, client)}")
        check(chunk, f"{what}: EOF after {len(buf)} of {n} bytes{why_gone(client.server, client)}")
        buf += chunk
    return bytes(buf)


def read_to_eof(sock, timeout):
    """(bytes, end) read until EOF within timeout: end is 'eof', 'reset' or 'timeout'."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable(sock, left):
            return bytes(buf), "timeout"
        try:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return bytes(buf), "reset"
        if not chunk:
            return bytes(buf), "eof"
        buf += chunk


def expect_refused(client, message, timeout=2.0):
    """The server sends the refused client exactly `message`, then EOF at once."""
    data, end = read_to_eof(client.sock, timeout)
    check(end == "eof" and data == message,
          f"refused client {client.source}:{client.local_port}: got {describe(data)} then "
          f"{'no EOF within %.0f s' % timeout if end == 'timeout' else end}; expected exactly "
          f"{describe(message)} then EOF")


def raise_own_nofile(need):
    """Raises this process's soft RLIMIT_NOFILE to at least `need` (up to the hard limit);
    skips the test when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise TestSkip(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors needed")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else need, hard))


def log_texts(server):
    """The server's stdout lines with the `NAME: ` prefix taken off (other lines as they are)."""
    with server.cond:
        lines = list(server.lines)
    n = len(server.prefix)
    return [line[n:] if line.startswith(server.prefix) else line for line in lines]


def check_log_consistency(server):
    """Walks the log: a connection line names an fd no client holds, a leave line one that a
    client holds (so a second drop or close of one client shows); no error of a double
    removeHandler or close on stdout or stderr; no log line was dropped (which would make the
    walk meaningless). Returns {fd: index of its connection line} for the clients still there."""
    texts = log_texts(server)
    with server.cond:
        err = list(server.err_lines)
    lost = [t for t in texts if LOG_DROPPED_TEXT.fullmatch(t)]
    check(not lost, f"the server's log dropped lines ({lost[:3]}): this test's reader fell behind, "
                    f"the per-socket checks cannot be made")
    open_fds = {}
    problems = []
    for i, text in enumerate(texts):
        m = CONNECT_TEXT.fullmatch(text)
        if m:
            fd = int(m.group(3))
            if fd in open_fds:
                problems.append(f"line {i} {text!r}: socket {fd} is still connected since line {open_fds[fd]}")
            open_fds[fd] = i
            continue
        m = LEAVE_TEXT.fullmatch(text)
        if m:
            fd = int(m.group(1))
            if fd not in open_fds:
                problems.append(f"line {i} {text!r}: socket {fd} is not connected (a second drop?)")
            open_fds.pop(fd, None)
    for bad in ("Bad file descriptor", "No such file"):
        hits = [line for line in texts + err if bad in line]
        if hits:
            problems.append(f"{len(hits)} lines with {bad!r}, e.g. {hits[0]!r}")
    check(not problems, "the log is inconsistent: " + "; ".join(problems[:5]))
    return open_fds


def connections(server):
    """{index of a connection line: (fd, address, port, [(index, text) of its leave lines])},
    in one walk of the log: a leave line belongs to the last connection line of its fd (so a
    second drop of one client shows as a second leave line of that connection)."""
    conns = {}
    current = {}
    for i, text in enumerate(log_texts(server)):
        m = CONNECT_TEXT.fullmatch(text)
        if m:
            fd = int(m.group(3))
            conns[i] = (fd, m.group(1), int(m.group(2)), [])
            current[fd] = i
            continue
        m = LEAVE_TEXT.fullmatch(text)
        if m and int(m.group(1)) in current:
            conns[current[int(m.group(1))]][3].append((i, text))
    return conns


def leave_lines_of(server, client):
    """The leave lines (index, text) of an accepted client's connection."""
    return connections(server)[client.accept_index][3]


def why_gone(server, client):
    """` (the server logged 'LINE')` for a client the server let go, else ''."""
    try:
        gone = leave_lines_of(server, client)
    except KeyError:
        return ""
    return f" (the server logged {gone[0][1]!r})" if gone else ""


def check_not_dropped(server, clients):
    for c in clients:
        gone = leave_lines_of(server, c)
        if gone:
            raise TestFailure(f"the honest client on socket {c.fd} was disconnected: {gone[0][1]!r}")


def refusal_lines(server, kind):
    """[(port, more)] of the refusal lines of one kind (a regex): `more` is the K of
    ` (and K more refused since the last report)`, 0 when absent."""
    pat = re.compile(rf"refused a connection from 127\.0\.0\.[12]:(\d+): {kind}"
                     rf"( \(and (\d+) more refused since the last report\))?")
    out = []
    for text in log_texts(server):
        m = pat.fullmatch(text)
        if m:
            out.append((int(m.group(1)), int(m.group(3) or 0)))
    return out


def check_refused_silently(server, clients):
    """No connection line names a refused client (so no leave line either)."""
    named = {(addr, port) for _, addr, port, _ in connections(server).values()}
    for c in clients:
        check((c.source, c.local_port) not in named,
              f"the refused client {c.source}:{c.local_port} has a connection line")


def tcp_listeners(port):
    """[(table, local address in hex)] of the LISTEN sockets on `port` in /proc/net/tcp{,6}."""
    out = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    addr, hexport = fields[1].rsplit(":", 1)
                    if fields[3] == "0A" and int(hexport, 16) == port:
                        out.append((table, addr))
        except OSError:
            continue
    return out


def accept_queue(port):
    """How many connections wait in the accept queue of the listener on `port` (a LISTEN
    socket's rx_queue in /proc/net/tcp{,6}), or None if there is none."""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return int(fields[4].split(":")[1], 16)
        except OSError:
            continue
    return None


def run_binary(binary, *args, timeout=10):
    try:
        r = subprocess.run([binary, *args], stdin=subprocess.DEVNULL, capture_output=True,
                           env=server_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TestFailure(f"{os.path.basename(binary)} {' '.join(args)} still running after {timeout} s")
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Tests

TESTS = []


def test(needs_server=True, **server_options):
    def register(fn):
        TESTS.append((fn.__name__, fn, needs_server, server_options))
        return fn
    return register


@test()
def slow_reader_cannot_hold_the_room(server):
    """A client with a 536-byte MSS and a 4 KiB receive buffer that reads 16 KiB every 1.5 s
    makes progress (so the stall timeout never fires) but holds the room: with the default
    --max-lag (10 s) it is dropped, and the room goes on. Client A sends 2 MiB of lines; 3 s
    later B sends `ping`: A gets it within 15 s, B gets all of A's lines in order."""
    lag, ping_within = 10, 15.0
    payload = line_stream(2 * (1 << 20) // 64)
    ping = b"ping\n"
    a, b = connect(server, 2)
    slow = HostileClient(server, sockopts=((socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536),
                                           (socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)))
    clients = [a, b, slow]
    stop, done = threading.Event(), threading.Event()
    started = threading.Event()
    times = {}
    try:
        for c in (a, b):
            c.sock.settimeout(60)   # for sendall only; reads poll with their own deadlines
        slow.sock.setblocking(False)

        def send_a():
            times["start"] = time.monotonic()
            started.set()
            a.sock.sendall(payload)

        def b_reads_everything():
            got = read_exactly(b, len(payload), time.monotonic() + 60, "B reading A's lines", stop)
            check(got == payload, f"B: byte {first_difference(got, payload)} of A's lines differs")

        def b_pings():
            check(started.wait(10), "A never started")
            if stop.wait(max(0.0, times["start"] + 3 - time.monotonic())):
                return
            b.sock.sendall(ping)
            times["ping"] = time.monotonic()

        def a_waits_for_ping():
            deadline = time.monotonic() + 60
            got = bytearray()
            while not got.endswith(ping):
                check(not stop.is_set(), "A: stopped after another thread failed")
                if "ping" in times:
                    deadline = min(deadline, times["ping"] + ping_within)
                left = deadline - time.monotonic()
                check(left > 0, f"A: no ping within {ping_within:.0f} s of B sending it "
                                f"(got {describe(got)}); last lines: {server.tail()}")
                if not wait_readable(a.sock, min(left, 0.2)):
                    continue
                chunk = a.sock.recv(4096, socket.MSG_DONTWAIT)
                check(chunk, f"A: EOF while waiting for the ping (got {describe(got)}){why_gone(server, a)}")
                got += chunk
            times["pong"] = time.monotonic()
            check(bytes(got) == ping, f"A got {describe(got)}, expected only B's {ping!r}")

        def slow_reads():
            while not done.wait(1.5) and not stop.is_set():
                try:
                    if not slow.sock.recv(16 * 1024):
                        return   # dropped: EOF
                except BlockingIOError:
                    continue
                except OSError:
                    return       # dropped: reset

        slow_thread = threading.Thread(target=slow_reads, daemon=True)
        slow_thread.start()
        try:
            run_threads([send_a, b_reads_everything, b_pings, a_waits_for_ping], timeout=75, stop=stop)
        finally:
            done.set()
            slow_thread.join(3)
        took = times["pong"] - times["ping"]
        check(took <= ping_within, f"the ping took {took:.1f} s (at most {ping_within:.0f} s)")
        gone = leave_lines_of(server, slow)
        want = f"socket {slow.fd} too slow (congested for {lag} s), disconnected"
        check(gone and gone[0][1] == want,
              f"the slow reader's leave line is {gone[0][1] if gone else None!r}, expected {want!r}")
        check_not_dropped(server, [a, b])
        assert_chat_works(a, [b], b"the room goes on\n")
        check_log_consistency(server)
    finally:
        stop.set()
        done.set()
        close_all(clients)


WAVE_CLIENTS = 1500
WAVE_BYTES = 16000
WAVE_BYTE = b"z"          # the wave's bytes; the sender's lines have none
RSS_LIMIT_KIB = 256 * 1024
WAVE_TIME_LIMIT = 150     # seconds, for the whole test


@test(nofile=(4096, None))
def drop_wave_spares_the_honest_reader(server):
    """1500 clients (4 KiB receive buffers) each send 16,000 bytes with no newline and never
    read; a sender pushes 1.2 MiB of lines meanwhile; an honest client reads all along. It is
    never disconnected and gets every line in order (the wave's bytes, forwarded as unfinished
    lines, in between); each wave client is dropped with exactly one log line; no error of a
    second removeHandler or close; the server's peak RSS stays under 256 MiB."""
    raise_own_nofile(WAVE_CLIENTS + 200)
    soft, _ = server.nofile_limits()
    if soft != "unlimited" and int(soft) < WAVE_CLIENTS + 100:
        raise TestSkip(f"the server's RLIMIT_NOFILE is {soft}, below {WAVE_CLIENTS + 100}")
    end = time.monotonic() + WAVE_TIME_LIMIT   # every step below is bounded by it

    def before(seconds):
        return min(time.monotonic() + seconds, end)

    payload = line_stream(int(1.2 * (1 << 20)) // 64)
    honest, sender = connect(server, 2)
    wave = []
    stop, done = threading.Event(), threading.Event()
    try:
        for c in (honest, sender):
            c.sock.settimeout(90)   # for sendall only
        small = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),)
        for _ in range(WAVE_CLIENTS):
            check(time.monotonic() < end - 100, f"only {len(wave)} wave clients connected in "
                                                f"{WAVE_TIME_LIMIT - 100} s")
            wave.append(HostileClient(server, sockopts=small, wait_accept=False))
        ports = {c.local_port: c for c in wave}
        deadline = before(30)
        while True:
            for i, text in enumerate(log_texts(server)):
                m = CONNECT_TEXT.fullmatch(text)
                if m and int(m.group(2)) in ports:
                    c = ports[int(m.group(2))]
                    c.fd, c.accept_index = int(m.group(3)), i
            waiting = sum(c.fd is None for c in wave)
            if not waiting:
                break
            if time.monotonic() >= deadline:
                raise TestFailure(f"the server logged {WAVE_CLIENTS - waiting} of the {WAVE_CLIENTS} wave "
                                  f"connections in time; {accept_queue(server.port)} wait in its "
                                  f"accept queue; last lines: {server.tail()}")
            time.sleep(0.2)
        refused_sends = []

        def blast():
            blob = WAVE_BYTE * WAVE_BYTES
            for c in wave:
                check(not stop.is_set(), "stopped after another thread failed")
                check(time.monotonic() < end, "the wave's sends did not end in time")
                try:
                    c.sock.sendall(blob)
                except OSError as e:   # already dropped: its sends may fail
                    refused_sends.append(e)

        def push():
            sender.sock.sendall(payload)

        def honest_reads():
            got = bytearray()
            deadline = before(90)
            try:
                while len(got) < len(payload):
                    check(not stop.is_set(), "honest: stopped after another thread failed")
                    left = deadline - time.monotonic()
                    check(left > 0, f"honest: {len(got)} of the {len(payload)} bytes of lines in time")
                    if not wait_readable(honest.sock, min(left, 0.5)):
                        continue
                    chunk = honest.sock.recv(1 << 20, socket.MSG_DONTWAIT)
                    check(chunk, f"honest: EOF after {len(got)} of {len(payload)} bytes of lines"
                                 f"{why_gone(server, honest)}")
                    got += chunk.replace(WAVE_BYTE, b"")
                check(got == payload, f"honest: byte {first_difference(got, payload)} of the sender's "
                                      f"lines differs (order or content)")
            finally:
                done.set()

        def sender_drains():   # the sender reads too (the wave's bytes), or it would stall
            while not done.is_set() and not stop.is_set():
                if wait_readable(sender.sock, 0.2):
                    try:
                        chunk = sender.sock.recv(1 << 20, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    check(chunk, f"the sender was disconnected{why_gone(server, sender)}")

        run_threads([blast, push, honest_reads, sender_drains], timeout=end - time.monotonic() + 5,
                    stop=stop)
        # Every wave client is dropped (all stall: they never read), each with one line.
        deadline = before(30)
        while True:
            conns = connections(server)
            left_over = [c for c in wave if not conns[c.accept_index][3]]
            if not left_over:
                break
            check(time.monotonic() < deadline,
                  f"{len(left_over)} of the {WAVE_CLIENTS} wave clients were not disconnected "
                  f"(e.g. socket {left_over[0].fd}); last lines: {server.tail()}")
            time.sleep(0.5)
        check_not_dropped(server, [honest, sender])
        check_log_consistency(server)
        conns = connections(server)
        for c in wave:
            gone = conns[c.accept_index][3]
            check(len(gone) == 1, f"socket {c.fd} has {len(gone)} leave lines: {[t for _, t in gone]}")
            check(any(f"socket {c.fd} {kind} " in gone[0][1] for kind in DROP_KINDS),
                  f"wave client on socket {c.fd} left as {gone[0][1]!r}, expected a drop")
        peak = server.rss_kib("VmHWM")
        check(peak is not None and peak < RSS_LIMIT_KIB, f"server peak RSS {peak} KiB (limit {RSS_LIMIT_KIB} KiB)")
        # The two that stayed still chat (what the wave sent them meanwhile is only its bytes).
        for frm, to, marker in ((sender, honest, b"\nafter the wave, from the sender\n"),
                                (honest, sender, b"\nafter the wave, from the honest one\n")):
            frm.send(marker)
            got = to.recv_until(marker, max_bytes=64 << 20, timeout=max(5.0, end - time.monotonic()))
            rest = got[:-len(marker)].replace(WAVE_BYTE, b"")
            check(not rest, f"before the marker, bytes other than the wave's: {describe(rest)}")
    finally:
        stop.set()
        done.set()
        close_all(wave)
        close_all([honest, sender])


def _limit_test(server, limit, served, refused, fill, extra, message, kind_regex, log_kind):
    """Shared by the two refusal tests. `fill()` makes a client that counts against the limit,
    `extra()` one past it, which must be refused with `message`. Appends to `served` and
    `refused` (the caller closes them); leaves `limit` clients served."""
    for _ in range(limit):
        served.append(fill())
    assert_chat_works(served[0], served[1:], b"all served\n")
    # The next one is refused: exactly the message, then EOF; no chat byte ever.
    one = extra()
    refused.append(one)
    line = b"not for the refused one\n"
    served[0].send(line)
    expect_refused(one, message)
    for c in served[1:]:
        got = c.recv_exact(len(line))
        check(got == line, f"client {c.local_port} got {describe(got)}, expected {line!r}")
    server.wait_line(server.log(rf"refused a connection from 127\.0\.0\.1:{one.local_port}: {kind_regex}"),
                     what=f"refused a connection from 127.0.0.1:{one.local_port}: {log_kind}")
    # Two more at once: counted, not logged (at most one line a second per kind)...
    for _ in range(2):
        c = extra()
        refused.append(c)
        expect_refused(c, message)
    # ...and reported with the next logged refusal, a second later.
    time.sleep(1.1)
    last = extra()
    refused.append(last)
    expect_refused(last, message)
    server.wait_line(server.log(rf"refused a connection from 127\.0\.0\.1:{last.local_port}: "
                                rf"{kind_regex}( \(and \d+ more refused since the last report\))?"),
                     what=f"the refusal of 127.0.0.1:{last.local_port}, a second later")
    lines = refusal_lines(server, kind_regex)
    total = sum(1 + more for _, more in lines)
    check(total == 4 and 2 <= len(lines) <= 3,
          f"the refusal lines (port, K more) {lines} account for {total} refusals in {len(lines)} "
          f"lines; expected 4, the 2 quick ones counted in a later line")
    check_refused_silently(server, refused)
    # Two of them leave: the count drops, and new clients are served.
    for c in served[-2:]:
        c.close()
        server.wait_line(server.log(rf"socket {c.fd} hung up"), start=c.accept_index)
    del served[-2:]
    for _ in range(2):
        served.append(fill())
    assert_chat_works(served[-1], served[:-1], b"served after two left\n")
    again = extra()
    refused.append(again)
    expect_refused(again, message)


@test(args=("--max-clients", "5", "0"))      # flags before the port: any order works
def max_clients_refuses_the_extra_ones(server):
    """--max-clients 5: five clients chat; the sixth gets exactly `server full` and EOF at once,
    logged once a second at most (the rest counted); after two leave, new ones are served."""
    served, refused = [], []
    try:
        _limit_test(server, 5, served, refused,
                    fill=lambda: Client(server),
                    extra=lambda: HostileClient(server, wait_accept=False),
                    message=b"server full\n",
                    kind_regex=r"server full \(5 clients\)", log_kind="server full (5 clients)")
    finally:
        close_all(served)
        close_all(refused)


def _can_bind(address):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


@test(args=("0", "--max-per-ip", "3"))
def max_per_ip_refuses_the_extra_ones(server):
    """--max-per-ip 3: three clients from 127.0.0.1 chat; the fourth gets exactly `too many
    connections from your address` and EOF; while 127.0.0.1 is full, one from 127.0.0.2
    (another loopback address) is served and chats with them, and 127.0.0.2 has its own count;
    after two leave, new ones are served."""
    message = b"too many connections from your address\n"
    served, refused = [], []
    try:
        _limit_test(server, 3, served, refused,
                    fill=lambda: Client(server),
                    extra=lambda: HostileClient(server, wait_accept=False),
                    message=message, kind_regex=r"too many connections from that address \(3\)",
                    log_kind="too many connections from that address (3)")
        if not _can_bind("127.0.0.2"):
            raise TestSkip("the 127.0.0.1 part passed; no socket here can bind 127.0.0.2")
        locals_ = list(served)
        first = HostileClient(server, source="127.0.0.2")
        served.append(first)
        assert_chat_works(first, locals_, b"from 127.0.0.2\n")
        assert_chat_works(locals_[0], locals_[1:] + [first], b"from 127.0.0.1\n")
        for _ in range(2):
            served.append(HostileClient(server, source="127.0.0.2"))
        for source in ("127.0.0.2", None):
            c = HostileClient(server, source=source, wait_accept=False)
            refused.append(c)
            expect_refused(c, message)
        check_refused_silently(server, refused)
    finally:
        close_all(served)
        close_all(refused)


@test(args=("0", "--bind", "127.0.0.1"))
def bind_listens_only_there(server):
    """--bind 127.0.0.1: the one listener on the port is 127.0.0.1 (0100007F in /proc/net/tcp),
    none in /proc/net/tcp6; the chat works there."""
    listeners = tcp_listeners(server.port)
    check(listeners == [("tcp", "0100007F")],
          f"listeners on port {server.port}: {listeners}, expected only ('tcp', '0100007F')")
    clients = connect(server, 3)
    try:
        assert_chat_works(clients[0], clients[1:], b"bound to loopback\n")
        assert_chat_works(clients[2], clients[:2], b"and back\n")
    finally:
        close_all(clients)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _cycles(port, n, deadline):
    for i in range(n):
        check(time.monotonic() < deadline, f"{i} of {n} connect/close cycles in time")
        s = socket.create_connection((HOST, port), timeout=5)
        s.close()


def _chat_pair(port, deadline):
    """Two clients that the server has accepted (probed: no log line can be read here), with
    everything before the probe's end marker read."""
    a = socket.create_connection((HOST, port), timeout=5)
    b = socket.create_connection((HOST, port), timeout=5)
    try:
        # Until both are in the room, a's lines may miss b: send probes until one arrives.
        got = bytearray()
        k = 0
        while not got:
            check(time.monotonic() < deadline, "b got none of a's probe lines: the room does not relay")
            a.sendall(b"probe %d\n" % k)
            k += 1
            if wait_readable(b, 0.2):
                chunk = b.recv(65536)
                check(chunk, "b: EOF while probing")
                got += chunk
        end = b"end of the probes\n"
        a.sendall(end)
        while not got.endswith(end):
            left = deadline - time.monotonic()
            check(left > 0 and wait_readable(b, left), f"b: no end of the probes (got {describe(got)})")
            chunk = b.recv(65536)
            check(chunk, "b: EOF while probing")
            got += chunk
        check(re.fullmatch(rb"(probe \d+\n)+end of the probes\n", bytes(got)),
              f"b got {describe(got)} while probing")
        return a, b
    except BaseException:
        a.close()
        b.close()
        raise


def _exchange(a, b, text, deadline):
    """text from a reaches b exactly (b had nothing else pending)."""
    a.sendall(text)
    got = bytearray()
    while len(got) < len(text):
        left = deadline - time.monotonic()
        check(left > 0 and wait_readable(b, min(left, 5)), f"{text!r} did not arrive (got {describe(got)})")
        chunk = b.recv(65536)
        check(chunk, f"EOF while waiting for {text!r}")
        got += chunk
    check(bytes(got) == text, f"got {describe(got)}, expected {text!r}")


@test(needs_server=False)
def full_stdout_pipe_does_not_stop_the_room(binary):
    """The server's stdout is a pipe nobody reads: 3000 connect/close cycles fill it (and the
    log's 64 KiB buffer), and two clients still chat. Then the pipe is read: the lines lost
    meanwhile are reported (`N log lines dropped`) and, with the lines that got through,
    account for every line. 3000 more cycles fill it again; SIGINT still exits 0 within 5 s."""
    name = os.path.basename(binary)
    begin = time.monotonic()
    deadline = begin + 90
    rfd, wfd = os.pipe()
    proc = None
    err = tempfile.TemporaryFile()
    drain = None
    stop_drain = threading.Event()
    pair = ()
    try:
        # A port that was free a moment ago (another attempt if it was taken meanwhile); the
        # server listens once a connection succeeds: that is cycle 0.
        listening = False
        for _ in range(3):
            port = _free_port()
            proc = subprocess.Popen([binary, str(port)], stdin=subprocess.DEVNULL, stdout=wfd,
                                    stderr=err, env=server_env())
            while not listening and proc.poll() is None and time.monotonic() < begin + 15:
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                    listening = True
                except OSError:
                    time.sleep(0.05)
            if listening or proc.poll() is None:
                break
        os.close(wfd)
        wfd = None
        err.seek(0)
        check(listening, f"the server did not listen (status {proc.poll()}): {err.read()[-300:]!r}")
        cycles = 3000
        _cycles(port, cycles, deadline)
        check(proc.poll() is None, f"the server exited with status {proc.poll()} during the cycles")
        a, b = pair = _chat_pair(port, deadline)
        _exchange(a, b, b"hello over a full stdout\n", deadline)
        _exchange(b, a, b"and back\n", deadline)

        # Read the pipe now: the next line brings `N log lines dropped` before it.
        out = bytearray()

        def read_pipe():
            while not stop_drain.is_set():
                if select.select([rfd], [], [], 0.1)[0]:
                    chunk = os.read(rfd, 1 << 16)
                    if not chunk:
                        return
                    out.extend(chunk)

        drain = threading.Thread(target=read_pipe, daemon=True)
        drain.start()
        _cycles(port, 1, deadline)
        # Every line the server made so far: `listening`, two per cycle, one per chat client.
        made = 1 + 2 * (1 + cycles + 1) + 2
        dropped_re = re.compile(rb"^" + re.escape(name.encode()) + rb": (\d+) log lines dropped$", re.M)
        prefix_re = re.compile(rb"^" + re.escape(name.encode()) + rb": ", re.M)
        settle = time.monotonic() + 10
        while True:
            text = bytes(out)
            dropped = sum(int(n) for n in dropped_re.findall(text))
            lines = len(prefix_re.findall(text)) - len(dropped_re.findall(text))
            if dropped and dropped + lines >= made:
                break
            check(time.monotonic() < settle,
                  f"after reading the pipe: {lines} lines and {dropped} reported dropped "
                  f"({len(dropped_re.findall(text))} 'log lines dropped' lines); expected a report, "
                  f"and {made} lines in all; the last: {text[-200:]!r}")
            time.sleep(0.1)
        check(dropped + lines == made, f"{lines} lines came through and {dropped} were reported dropped: "
                                       f"{dropped + lines}, but the server made {made}")
        stop_drain.set()
        drain.join(2)
        check(not drain.is_alive(), "the pipe reader did not stop")

        # Nobody reads again: fill it once more; the room still relays, and SIGINT ends it.
        _cycles(port, cycles, deadline)
        _exchange(a, b, b"after 6000 cycles\n", deadline)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            status = proc.wait(5)
        except subprocess.TimeoutExpired:
            raise TestFailure("the server still runs 5 s after SIGINT, its stdout full")
        check(status == 0, f"exit status {status} after SIGINT (expected 0)")
        check(time.monotonic() - sent <= 5, "SIGINT took over 5 s")
    finally:
        stop_drain.set()
        for s in pair:
            s.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if drain is not None:
            drain.join(2)
        for fd in (rfd, wfd):
            if fd is not None:
                os.close(fd)
        err.close()


@test()
def steady_reader_is_not_dropped_by_max_lag(server):
    """The default --max-lag (10 s): a reader taking 64 KiB every 50 ms (about 1.3 MB/s, slower
    than the sender) while a sender pushes 8 MiB of lines is never disconnected and gets
    everything in order: flow control keeps each congestion far shorter than the limit."""
    total = 8 * (1 << 20)
    payload = line_stream(total // 64)
    chunk, period = 64 * 1024, 0.05
    sender = Client(server)
    reader = Client(server, rcvbuf=64 * 1024)
    clients = [sender, reader]
    stop = threading.Event()
    try:
        sender.sock.settimeout(90)

        def send():
            sender.sock.sendall(payload)

        def read_steadily():
            buf = bytearray()
            start = time.monotonic()
            deadline = start + 90
            k = 0
            while len(buf) < total:
                buf += read_exactly(reader, min(chunk, total - len(buf)), deadline,
                                    f"the steady reader (at {len(buf)} bytes)", stop)
                k += 1
                pause = start + k * period - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            check(buf == payload, f"the steady reader: byte {first_difference(buf, payload)} differs")

        run_threads([send, read_steadily], timeout=100, stop=stop)
        check_not_dropped(server, [sender, reader])
        lagged = server.count(server.log(r"socket \d+ too slow \(congested for .*"))
        check(lagged == 0, f"{lagged} lag drops; last lines: {server.tail()}")
        assert_chat_works(reader, [sender], b"still here\n")
    finally:
        stop.set()
        close_all(clients)


@test(needs_server=False)
def bad_flag_values(binary):
    """Bad values of the new flags exit 2 with one line naming the problem (and the usage
    line, in the style of --stall-timeout); --help describes every flag; good values start;
    a --bind address that is not this machine's fails with exit 1 and the spec's line."""
    name = os.path.basename(binary)
    usage = usage_line(name)
    code, out, err = run_binary(binary, "--help")
    check(code == 0, f"--help: exit status {code}, expected 0 (stderr {err!r})")
    check(usage in out.splitlines(), f"--help: no line {usage!r} in {out!r}")
    for flag in ("--bind", "--max-clients", "--max-per-ip", "--max-lag", "--stall-timeout"):
        check(out.count(flag) >= 2, f"--help: {flag} is not described (only in the usage line)")
    for args, value in ((("--max-clients", "0"), "0"), (("--max-per-ip", "-1"), "-1"),
                        (("--max-lag", "x"), "x"), (("--bind",), None),
                        (("--max-clients", "x"), "x"), (("--max-lag", "-1"), "-1"),
                        (("0", "--max-per-ip"), None)):
        shown = " ".join(args)
        code, out, err = run_binary(binary, *args)
        check(code == 2, f"{shown}: exit status {code}, expected 2 (stderr {err!r})")
        lines = err.splitlines()
        check(lines and lines[0].startswith(name + ": "), f"{shown}: stderr {err!r} does not start with "
                                                          f"'{name}: '")
        check(lines[1:] in ([], [usage]), f"{shown}: stderr has more than the message and the usage "
                                          f"line: {err!r}")
        flag = next(a for a in args if a.startswith("--"))
        names = (flag, flag[2:], flag[2:].replace("-", " "))
        check(any(n in lines[0] for n in names) or (value is not None and f"'{value}'" in lines[0]),
              f"{shown}: the message {lines[0]!r} names neither the flag nor the value")
        check(not out, f"{shown}: stdout {out!r}")
    # Good values start (any order, decimals for --max-lag as for --stall-timeout).
    for args in (("--max-lag", "2.5", "0", "--max-per-ip", "0"), ("--max-clients", "1", "--max-lag", "0", "0"),
                 ("0", "--bind", "127.0.0.1", "--stall-timeout", "1")):
        server = Server(binary, args=args)
        try:
            server.wait_listening()
        finally:
            status = server.stop()
        check(status == 0, f"{' '.join(args)}: SIGTERM gave exit status {status}")
    # An address of no interface here (TEST-NET-1): bind fails, unless the kernel allows
    # non-local binds.
    try:
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
            nonlocal_bind = f.read().strip() != "0"
    except OSError:
        nonlocal_bind = True
    if not nonlocal_bind:
        code, out, err = run_binary(binary, "0", "--bind", "192.0.2.1")
        check(code == 1, f"--bind 192.0.2.1: exit status {code}, expected 1 (stderr {err!r})")
        msg = f"{name}: cannot listen on 192.0.2.1 port 0: {os.strerror(errno.EADDRNOTAVAIL)}"
        check(msg in err.splitlines(), f"--bind 192.0.2.1: stderr {err!r} lacks the line {msg!r}")


# ---------------------------------------------------------------------------------------------
# Runner


def main():
    parser = argparse.ArgumentParser(description="Hostile-client tests of a chat server.")
    parser.add_argument("server", metavar="SERVER_BINARY")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="run only this test (may be given more than once)")
    args = parser.parse_args()
    binary = os.path.abspath(args.server)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print(f"hostile_e2e: {args.server} is not an executable file", file=sys.stderr)
        return 2
    tests = TESTS
    if args.only:
        unknown = set(args.only) - {t[0] for t in TESTS}
        if unknown:
            print(f"hostile_e2e: no test named {', '.join(sorted(unknown))}; tests: "
                  f"{', '.join(t[0] for t in TESTS)}", file=sys.stderr)
            return 2
        tests = [t for t in TESTS if t[0] in args.only]
    passed = failed = 0
    for name, fn, needs_server, server_options in tests:
        kind, detail = run_test(binary, name, fn, needs_server, server_options)
        if kind == "ok":
            passed += 1
            print(f"ok   {name} ({detail:.1f} s)", flush=True)
        elif kind == "skip":
            print(f"skip {name}: {detail}", flush=True)
        else:
            failed += 1
            print(f"FAIL {name}: {detail}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
