#!/usr/bin/env python3
"""End-to-end tests for the chat servers (./proact_server and c_demo/chat_server).

usage: python3 tests/chat/chat_e2e.py SERVER_BINARY [--only NAME]

The behaviour checked is the one of the chat spec: raw TCP, every chunk a client sends goes to
every OTHER connected client, byte-exact and in order per sender, never back to the sender;
log lines on stdout prefixed with `NAME: ` where NAME is the binary's file name.

Each test gets a fresh server started on port 0 (the port is read from its `listening on port P`
line), with LD_LIBRARY_PATH pointing at the repository root and the rest of the environment
inherited (so ST_PROACTOR_BACKEND passes through). The server is stopped after every test
(SIGTERM, then SIGKILL), whatever happened. Output: one line per test, then `N passed, M failed`;
exit status 1 when any test failed. Python 3 standard library only; clients connect to
127.0.0.1 only.
"""
import argparse
import errno
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"
START_TIMEOUT = 10.0   # for the `listening on port P` line
LOG_TIMEOUT = 5.0      # for any other log line
RECV_TIMEOUT = 5.0     # for data that should arrive
QUIET_TIME = 0.3       # how long "no data" is watched for
STOP_TIMEOUT = 5.0     # SIGTERM to exit, before SIGKILL


class TestFailure(Exception):
    pass


class TestSkip(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def describe(data, limit=60):
    """Short printable form of a byte string for failure messages."""
    data = bytes(data)
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"


def first_difference(got, want):
    """Index of the first byte where got and want differ (the shorter length if one is a
    prefix of the other)."""
    n = min(len(got), len(want))
    step = 64 * 1024
    for base in range(0, n, step):
        if got[base:base + step] != want[base:base + step]:
            for i in range(base, min(base + step, n)):
                if got[i] != want[i]:
                    return i
    return n


# ---------------------------------------------------------------------------------------------
# The server under test


class Server:
    """A running server: its process, its stdout lines (read by a thread) and its port."""

    def __init__(self, binary, args=("0",), nofile=None):
        self.binary = binary
        self.name = os.path.basename(binary)
        self.prefix = self.name + ": "
        env = dict(os.environ)
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = REPO_ROOT + (":" + old if old else "")
        self.lines = []          # stdout lines, without the newline
        self.err_lines = []      # stderr lines
        self.cond = threading.Condition()
        self.stdout_closed = False
        self.signalled = False   # set once the test or the harness sent a stopping signal
        preexec = None
        if nofile is not None:  # (soft, hard) for the server's RLIMIT_NOFILE; None: hard stays
            def preexec():
                soft, hard = nofile
                if hard is None:
                    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
        self.proc = subprocess.Popen([binary, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     preexec_fn=preexec)
        self.out_thread = threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True),
                                           daemon=True)
        self.err_thread = threading.Thread(target=self._read, args=(self.proc.stderr, self.err_lines, False),
                                           daemon=True)
        self.out_thread.start()
        self.err_thread.start()
        self.port = None
        self.backend = None

    def _read(self, stream, store, is_stdout):
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self.cond:
                    store.append(line)
                    self.cond.notify_all()
        finally:
            if is_stdout:
                with self.cond:
                    self.stdout_closed = True
                    self.cond.notify_all()

    # -- log lines --

    def log(self, msg):
        """The regex of a whole log line `NAME: msg` (msg is a regex)."""
        return "^" + re.escape(self.prefix) + msg + "$"

    def find(self, regex, start=0):
        """(index, match) of the first stdout line from `start` on matching regex, else None."""
        pat = re.compile(regex)
        with self.cond:
            for i in range(start, len(self.lines)):
                m = pat.search(self.lines[i])
                if m:
                    return i, m
        return None

    def wait_line(self, regex, timeout=LOG_TIMEOUT, start=0, what=None):
        """Waits for a stdout line matching regex; returns (index, match)."""
        pat = re.compile(regex)
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    m = pat.search(self.lines[i])
                    if m:
                        return i, m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.stdout_closed:
                    break
                self.cond.wait(min(left, 0.5))
        status = self.proc.poll()
        why = "stdout closed" if self.stdout_closed else f"after {timeout:.0f} s"
        raise TestFailure(f"no log line {what or regex!r} ({why}; server "
                          f"{'running' if status is None else f'exited with status {status}'}); "
                          f"last lines: {self.tail()}")

    def count(self, regex):
        pat = re.compile(regex)
        with self.cond:
            return sum(1 for line in self.lines if pat.search(line))

    def tail(self, n=4):
        with self.cond:
            out = self.lines[-n:]
            err = self.err_lines[-n:]
        text = repr(out)
        if err:
            text += f"; stderr: {err!r}"
        return text

    # -- life cycle --

    def wait_listening(self):
        _, m = self.wait_line(r"^(\S+): listening on port (\d+) \(backend ([^)]*)\)$",
                              timeout=START_TIMEOUT, what="listening on port P (backend B)")
        check(m.group(1) == self.name,
              f"log prefix is {m.group(1)!r}, expected the program name {self.name!r}")
        self.port = int(m.group(2))
        self.backend = m.group(3)
        check(self.port != 0, "the listening line shows port 0, not the real bound port")
        wanted = {"epoll": "epoll", "uring": "io_uring", "io_uring": "io_uring"}.get(
            os.environ.get("ST_PROACTOR_BACKEND", ""))
        check(wanted is None or self.backend == wanted,
              f"backend {self.backend!r} in the listening line, but ST_PROACTOR_BACKEND asks for {wanted!r}")
        return self

    def pid(self):
        return self.proc.pid

    def assert_alive(self):
        status = self.proc.poll()
        check(status is None, f"server exited with status {status}; last lines: {self.tail()}")

    def signal(self, sig):
        self.signalled = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout):
        """Exit status, or None if the process still runs after timeout seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def join_output(self, timeout=2.0):
        self.out_thread.join(timeout)
        self.err_thread.join(timeout)

    def stop(self):
        """SIGTERM, then SIGKILL after STOP_TIMEOUT. Returns the exit status, or a string if
        the server had to be killed."""
        killed = False
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            if self.wait_exit(STOP_TIMEOUT) is None:
                killed = True
                self.proc.kill()
                self.proc.wait(5)
        self.join_output()
        for s in (self.proc.stdout, self.proc.stderr):
            try:
                s.close()
            except OSError:
                pass
        return "killed" if killed else self.proc.returncode

    def cpu_seconds(self):
        """User + system CPU time the server has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def nofile_limits(self):
        """(soft, hard) RLIMIT_NOFILE of the server, from /proc/PID/limits."""
        with open(f"/proc/{self.proc.pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return soft, hard
        raise TestFailure("no 'Max open files' in /proc/PID/limits")

    def fd_flags(self, fd):
        """The open-file flags of the server's fd (O_NONBLOCK...; O_CLOEXEC as the kernel
        shows it in fdinfo)."""
        with open(f"/proc/{self.proc.pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
        raise TestFailure(f"no flags in /proc/PID/fdinfo/{fd}")

    def listening_fd(self):
        """The server's fd that listens on its port (from /proc/net/tcp{,6} and /proc/PID/fd)."""
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == self.port:
                            inodes.add(fields[9])
            except OSError:
                continue
        fd_dir = f"/proc/{self.proc.pid}/fd"
        for name in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, name))
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return int(name)
        raise TestFailure(f"no fd of the server listens on port {self.port}")

    def rss_kib(self, field="VmRSS"):
        """VmRSS (or VmHWM, the peak RSS) of the server process in KiB (None when it is gone)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None


# ---------------------------------------------------------------------------------------------
# Clients


class Client:
    """One chat client: a TCP connection to 127.0.0.1:port."""

    def __init__(self, server, nodelay=False, rcvbuf=None, wait_accept=True):
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(RECV_TIMEOUT)
        self.fd = None            # the server's fd for this client, from its log
        self.accept_index = None  # the index of that log line
        try:
            self.sock.connect((HOST, server.port))
            self.local_port = self.sock.getsockname()[1]
            if wait_accept:
                self.wait_accepted()
        except BaseException:
            self.sock.close()
            raise

    def wait_accepted(self, timeout=LOG_TIMEOUT):
        """Waits for the server's `new connection` line of this client: after it, the client
        gets every broadcast."""
        i, m = self.server.wait_line(
            self.server.log(rf"new connection from 127\.0\.0\.1:{self.local_port} on socket (\d+)"),
            timeout=timeout, what=f"new connection from 127.0.0.1:{self.local_port} on socket FD")
        self.fd = int(m.group(1))
        self.accept_index = i
        return self

    def send(self, data):
        self.sock.settimeout(RECV_TIMEOUT * 4)
        self.sock.sendall(data)

    def recv_exact(self, n, timeout=RECV_TIMEOUT):
        """Exactly n bytes, within timeout seconds: fails on timeout or EOF."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        deadline = time.monotonic() + timeout
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestFailure(f"client {self.local_port}: got {got} of {n} bytes in {timeout:.0f} s "
                                  f"(received so far {describe(buf[:got])})")
            self.sock.settimeout(left)
            try:
                k = self.sock.recv_into(view[got:], min(n - got, 1 << 20))
            except socket.timeout:
                continue
            except OSError as e:
                raise TestFailure(f"client {self.local_port}: {e} after {got} of {n} bytes")
            if k == 0:
                raise TestFailure(f"client {self.local_port}: EOF after {got} of {n} bytes "
                                  f"(received {describe(buf[:got])})")
            got += k
        return bytes(buf)

    def recv_until(self, marker, max_bytes, timeout=RECV_TIMEOUT):
        """Bytes up to and including the first occurrence of marker."""
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            idx = buf.find(marker)
            if idx >= 0:
                check(idx + len(marker) == len(buf),
                      f"client {self.local_port}: unexpected bytes after {marker!r}: "
                      f"{describe(buf[idx + len(marker):])}")
                return bytes(buf)
            left = deadline - time.monotonic()
            check(left > 0 and len(buf) <= max_bytes,
                  f"client {self.local_port}: no {marker!r} in {len(buf)} bytes received "
                  f"within {timeout:.0f} s (tail {describe(buf[-60:])})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as e:
                raise TestFailure(f"client {self.local_port}: {e} while waiting for {marker!r}")
            check(chunk, f"client {self.local_port}: EOF while waiting for {marker!r} "
                         f"(received {describe(buf)})")
            buf += chunk

    def assert_no_data(self, wait=QUIET_TIME):
        """Nothing arrives (and no EOF) for `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except OSError as e:
            raise TestFailure(f"client {self.local_port}: {e} while expecting silence")
        if not data:
            raise TestFailure(f"client {self.local_port}: EOF while expecting silence")
        raise TestFailure(f"client {self.local_port}: unexpected data {describe(data)}")

    def expect_eof(self, timeout=RECV_TIMEOUT, allow_data=False, max_bytes=64 << 20):
        """Reads until EOF (connection reset counts as the end too). With allow_data False,
        any byte before it fails. Returns the number of bytes read."""
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            left = deadline - time.monotonic()
            check(left > 0, f"client {self.local_port}: no EOF within {timeout:.0f} s "
                            f"({total} bytes read)")
            check(total <= max_bytes, f"client {self.local_port}: over {max_bytes} bytes and no EOF")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return total
            if not data:
                return total
            check(allow_data, f"client {self.local_port}: data {describe(data)} instead of EOF")
            total += len(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def reset(self):
        """Closes with SO_LINGER {1, 0}: the peer gets an RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def connect(server, n, **kw):
    """n clients, each accepted by the server (its `new connection` line seen)."""
    clients = []
    try:
        for _ in range(n):
            clients.append(Client(server, **kw))
    except BaseException:
        close_all(clients)
        raise
    return clients


def close_all(clients):
    for c in clients:
        c.close()


def assert_all_quiet(clients, wait=QUIET_TIME):
    """No client receives anything (or EOF) during `wait` seconds."""
    for c in clients:
        c.sock.setblocking(False)
    try:
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([c.sock for c in clients], [], [], left)
            for s in ready:
                c = next(c for c in clients if c.sock is s)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise TestFailure(f"client {c.local_port}: {e} while expecting silence")
                raise TestFailure(f"client {c.local_port}: unexpected "
                                  f"{'data ' + describe(data) if data else 'EOF'}")
    finally:
        for c in clients:
            c.sock.setblocking(True)


def assert_chat_works(sender, receivers, text=b"still chatting\n"):
    """sender's line reaches every receiver exactly, and not the sender."""
    sender.send(text)
    for r in receivers:
        got = r.recv_exact(len(text))
        check(got == text, f"client {r.local_port} got {describe(got)}, expected {describe(text)}")
    sender.assert_no_data()


def run_threads(targets, timeout, stop=None):
    """Runs each callable on its own thread; re-raises the first failure. Daemon threads, so a
    stuck one cannot keep the suite alive. `stop` (an Event the callables watch) is set at the
    first failure, so the others give up early."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
            if stop is not None:
                stop.set()

    threads = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        e = errors[0]
        if isinstance(e, TestFailure):
            raise e
        raise TestFailure(f"{type(e).__name__}: {e}")
    stuck = sum(t.is_alive() for t in threads)
    check(stuck == 0, f"{stuck} thread(s) still running after {timeout:.0f} s")


# ---------------------------------------------------------------------------------------------
# Tests

TESTS = []


def test(needs_server=True, **server_options):
    def register(fn):
        TESTS.append((fn.__name__, fn, needs_server, server_options))
        return fn
    return register


@test()
def basic_broadcast_3_clients(server):
    clients = connect(server, 3)
    try:
        for i, sender in enumerate(clients):
            line = f"hello from client {i}\n".encode()
            sender.send(line)
            for other in clients:
                if other is not sender:
                    got = other.recv_exact(len(line))
                    check(got == line, f"client {other.local_port} got {describe(got)}, expected {describe(line)}")
            assert_all_quiet(clients)
    finally:
        close_all(clients)


@test()
def no_echo_10_clients(server):
    n, per_sender = 10, 3
    clients = connect(server, n)
    try:
        lines = [[f"client {i} says line {k}\n".encode() for k in range(per_sender)] for i in range(n)]

        def sender(i):
            for line in lines[i]:
                clients[i].send(line)

        run_threads([lambda i=i: sender(i) for i in range(n)], timeout=10)
        for i, c in enumerate(clients):
            expected = [line for j in range(n) if j != i for line in lines[j]]
            data = c.recv_exact(sum(map(len, expected)))
            got = data.splitlines(keepends=True)
            check(sorted(got) == sorted(expected),
                  f"client {i} got lines {got!r}, expected the {len(expected)} lines of the 9 others")
            for j in range(n):
                mine = [line for line in got if line.startswith(f"client {j} says".encode())]
                if j == i:
                    check(not mine, f"client {i} received its own lines {mine!r}")
                else:
                    check(mine == lines[j], f"client {i} got client {j}'s lines out of order: {mine!r}")
        assert_all_quiet(clients)
    finally:
        close_all(clients)


@test()
def all_256_byte_values(server):
    clients = connect(server, 3)
    try:
        payload = bytes(range(256))
        clients[0].send(payload)
        for c in clients[1:]:
            got = c.recv_exact(len(payload))
            check(got == payload, f"byte {first_difference(got, payload)} differs: got {describe(got)}")
        assert_all_quiet(clients)
    finally:
        close_all(clients)


@test()
def four_mib_message(server):
    size = 4 * 1024 * 1024
    payload = os.urandom(size)
    clients = connect(server, 3)
    try:
        sender, receivers = clients[0], clients[1:]

        def receive(r):
            got = r.recv_exact(size, timeout=30)
            check(got == payload, f"client {r.local_port}: byte {first_difference(got, payload)} of the "
                                  f"4 MiB differs")

        run_threads([lambda: sender.send(payload)] + [lambda r=r: receive(r) for r in receivers], timeout=40)
        assert_all_quiet(clients)
        server.assert_alive()
    finally:
        close_all(clients)


@test()
def one_byte_writes(server):
    count = 500
    payload = bytes((i * 7 + 1) % 256 for i in range(count))
    clients = connect(server, 3, nodelay=True)
    try:
        sender = clients[0]
        for i in range(count):
            sender.send(payload[i:i + 1])
        for c in clients[1:]:
            got = c.recv_exact(count, timeout=10)
            check(got == payload, f"client {c.local_port}: byte {first_difference(got, payload)} differs "
                                  f"(order or content)")
        assert_all_quiet(clients)
    finally:
        close_all(clients)


@test()
def client_leaves_gracefully(server):
    a, b, leaver = clients = connect(server, 3)
    try:
        leaver.close()
        server.wait_line(server.log(rf"socket {leaver.fd} hung up"), start=leaver.accept_index)
        assert_chat_works(a, [b], b"after the leave, from a\n")
        assert_chat_works(b, [a], b"after the leave, from b\n")
        server.assert_alive()
    finally:
        close_all(clients)


@test()
def client_reset_mid_stream(server):
    a, b, resetter = clients = connect(server, 3)
    try:
        stream = bytes(i % 251 for i in range(200_000))
        resetter.send(stream[:150_000])   # a stream cut short: the rest is never sent
        resetter.reset()
        # the spec's <strerror> is the C library's text, as os.strerror gives it
        reset_text = os.strerror(errno.ECONNRESET)
        i, m = server.wait_line(server.log(rf"socket {resetter.fd} (hung up|closed: .*)"),
                                start=resetter.accept_index, what=f"socket {resetter.fd} hung up / closed: ...")
        check(m.group(1) in ("hung up", f"closed: {reset_text}"),
              f"leave line {server.lines[i]!r}: expected 'hung up' or 'closed: {reset_text}'")
        server.assert_alive()
        marker = b"\nMARKER after the reset\n"
        a.send(marker)
        got = b.recv_until(marker, max_bytes=len(stream) + 1024)
        # b got a prefix of what the resetting client sent (from every byte to none), then a's line.
        part = got[:-len(marker)]
        check(stream.startswith(part), f"b got {len(part)} bytes from the reset client that are not a "
                                       f"prefix of its stream (first difference at "
                                       f"{first_difference(part, stream)})")
        # a got the very same bytes of the reset client's stream as b, and not its own line
        if part:
            a_got = a.recv_exact(len(part))
            check(a_got == part, f"a got other bytes of the reset client's stream than b (first "
                                 f"difference at {first_difference(a_got, part)})")
        a.assert_no_data()
        assert_chat_works(b, [a], b"b still chats\n")
    finally:
        close_all(clients)


@test()
def half_closed_client(server):
    a, b, half = clients = connect(server, 3)
    try:
        half.sock.shutdown(socket.SHUT_WR)
        server.wait_line(server.log(rf"socket {half.fd} hung up"), start=half.accept_index)
        server.assert_alive()
        assert_chat_works(a, [b], b"from a after the half close\n")
        assert_chat_works(b, [a], b"from b after the half close\n")
        # the server closed the half-closed client and sent it nothing more
        half.expect_eof()
    finally:
        close_all(clients)


@test()
def connect_and_leave_logs(server):
    c = Client(server)
    line = server.lines[c.accept_index]
    check(re.fullmatch(re.escape(server.prefix) + rf"new connection from 127\.0\.0\.1:{c.local_port} on socket \d+",
                       line), f"bad connection line {line!r}")
    check(c.fd > 2, f"the socket fd in the log is {c.fd}")
    c.close()
    i, _ = server.wait_line(server.log(rf"socket {c.fd} hung up"), start=c.accept_index)
    check(i > c.accept_index, "the leave line comes before the connection line")
    d = Client(server)   # a second connection after the first is gone is logged as well
    d.close()
    server.wait_line(server.log(rf"socket {d.fd} hung up"), start=d.accept_index)


@test()
def slow_consumer_dropped(server):
    total = 40 * 1024 * 1024
    each = total // 2
    window = 2 * 1024 * 1024     # a sender stays at most this far ahead of its reader (< the limit)
    # Baseline + the never-reader's 4 MiB queue + the readers' windows stay far below 32 MiB,
    # while a server without the send limit would hold most of the 40 MB for the never-reader.
    rss_bound_kib = 32 * 1024
    chunk = 64 * 1024
    deadline_s = 30

    slow = Client(server, rcvbuf=4096)   # never reads
    a, b = connect(server, 2)
    clients = [slow, a, b]
    try:
        data = {a: os.urandom(each), b: os.urandom(each)}
        peer = {a: b, b: a}
        received = {a: 0, b: 0}  # bytes each client got from its peer
        cv = threading.Condition()
        stop = threading.Event()
        rss = []

        for c in (a, b):
            c.sock.settimeout(5.0)  # shared by its sending and its receiving thread: set once

        def send(c):
            buf = memoryview(data[c])
            sent = 0
            end = time.monotonic() + deadline_s
            while sent < each:
                with cv:
                    while sent - received[peer[c]] > window - chunk:
                        check(not stop.is_set(), "stopped after another thread failed")
                        left = end - time.monotonic()
                        check(left > 0, f"client {c.local_port}: peer stopped reading ({sent} sent, "
                                        f"{received[peer[c]]} received)")
                        cv.wait(min(left, 0.5))
                n = min(chunk, each - sent)
                c.sock.sendall(buf[sent:sent + n])
                sent += n

        def recv(c):
            want = data[peer[c]]
            buf = bytearray(each)
            view = memoryview(buf)
            got = 0
            end = time.monotonic() + deadline_s
            while got < each:
                check(time.monotonic() < end, f"client {c.local_port}: got {got} of {each} bytes "
                                              f"in {deadline_s} s")
                check(not stop.is_set(), "stopped after another thread failed")
                try:
                    k = c.sock.recv_into(view[got:], min(each - got, 1 << 20))
                except socket.timeout:
                    continue
                check(k > 0, f"client {c.local_port}: EOF after {got} of {each} bytes")
                got += k
                with cv:
                    received[c] = got
                    cv.notify_all()
            check(buf == want, f"client {c.local_port}: byte {first_difference(buf, want)} of the "
                               f"{each} differs")

        def sample_rss():
            while not stop.is_set():
                kib = server.rss_kib()
                if kib is not None:
                    rss.append(kib)
                stop.wait(0.01)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        try:
            run_threads([lambda: send(a), lambda: send(b), lambda: recv(a), lambda: recv(b)],
                        timeout=deadline_s + 10, stop=stop)
        finally:
            stop.set()
            with cv:
                cv.notify_all()
            sampler.join(2)
        peak = server.rss_kib("VmHWM")  # catches a peak between two samples
        if peak is not None:
            rss.append(peak)
        check(rss, "no RSS sample of the server")
        check(max(rss) < rss_bound_kib, f"server RSS reached {max(rss)} KiB (bound {rss_bound_kib} KiB)")
        # Flow control: the never-reader's queue passes the high watermark, the room waits for
        # it, and after the stall timeout (2 s by default) it is dropped and the room goes on.
        server.wait_line(server.log(rf"socket {slow.fd} (stalled \(no progress for 2 s\)|"
                                    rf"too slow \(over \d+ bytes queued\)), disconnected"),
                         start=slow.accept_index,
                         what=f"socket {slow.fd} stalled (no progress for 2 s), disconnected")
        for c in (a, b):
            check(server.find(server.log(rf"socket {c.fd} (too slow|hung up|closed).*"), c.accept_index) is None,
                  f"the reading client on socket {c.fd} was disconnected")
        slow.expect_eof(timeout=10, allow_data=True)
        assert_all_quiet([a, b])
        server.assert_alive()
    finally:
        close_all(clients)


@test(nofile=(256, None))
def thousand_clients(server):
    """The server starts with a soft RLIMIT_NOFILE of 256: it must raise it to the hard limit."""
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 64
    if hard != resource.RLIM_INFINITY and hard < need:
        raise TestSkip(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors needed")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    soft_s, hard_s = server.nofile_limits()
    check(soft_s == hard_s, f"the server's RLIMIT_NOFILE is soft {soft_s}, hard {hard_s}: "
                            f"the soft limit was not raised to the hard one")
    clients = []
    try:
        deadline = time.monotonic() + 30
        for _ in range(n):
            check(time.monotonic() < deadline, f"only {len(clients)} clients connected in 30 s")
            clients.append(Client(server, wait_accept=False))
        ports = {c.local_port for c in clients}
        conn = re.compile(server.log(r"new connection from 127\.0\.0\.1:(\d+) on socket \d+"))
        end = time.monotonic() + 20
        while True:
            with server.cond:
                seen = {int(m.group(1)) for line in server.lines for m in [conn.match(line)] if m}
            if ports <= seen:
                break
            check(time.monotonic() < end, f"the server logged {len(ports & seen)} of the {n} connections")
            time.sleep(0.1)
        for c in clients:
            c.wait_accepted(timeout=1)
        check(len(seen) >= n, f"the log shows {len(seen)} connections")
        line = b"one line for 999 readers\n"
        clients[0].send(line)
        end = time.monotonic() + 20
        for c in clients[1:]:
            got = c.recv_exact(len(line), timeout=max(0.5, end - time.monotonic()))
            check(got == line, f"client {c.local_port} got {describe(got)}")
        clients[0].assert_no_data()
        server.assert_alive()
    finally:
        close_all(clients)


@test()
def sockets_are_nonblocking_cloexec(server):
    """Beyond the brief's list: the spec's O_NONBLOCK and CLOEXEC on the listening socket and
    on client sockets, read from /proc/PID/fdinfo."""
    clients = connect(server, 2)
    try:
        fds = {"the listening socket": server.listening_fd()}
        for c in clients:
            fds[f"client socket {c.fd}"] = c.fd
        for what, fd in fds.items():
            flags = server.fd_flags(fd)
            check(flags & os.O_NONBLOCK, f"{what} (fd {fd}) is not O_NONBLOCK (flags {flags:o})")
            check(flags & os.O_CLOEXEC, f"{what} (fd {fd}) is not close-on-exec (flags {flags:o})")
    finally:
        close_all(clients)


NOFILE_FOR_EMFILE = 64


@test(nofile=(NOFILE_FOR_EMFILE, NOFILE_FOR_EMFILE))
def out_of_descriptors_sheds_connections(server):
    """Beyond the spec's brief list: with RLIMIT_NOFILE at 64, connections past the limit are
    accepted and closed at once (one log line per episode), the loop does not spin, and a
    descriptor freed by a leaving client takes a new client again."""
    n = NOFILE_FOR_EMFILE + 36
    emfile = server.log(rf"accept: ({re.escape(os.strerror(errno.EMFILE))}|{re.escape(os.strerror(errno.ENFILE))}); "
                        r"shedding new connections until descriptors free up")
    clients = []
    try:
        for _ in range(n):
            clients.append(Client(server, wait_accept=False))
        server.wait_line(emfile, what="accept: Too many open files; shedding new connections until "
                                      "descriptors free up")
        # The backlog is served in order, so the last one is shed once all are handled.
        clients[-1].expect_eof()
        conn = re.compile(server.log(r"new connection from 127\.0\.0\.1:(\d+) on socket \d+"))
        with server.cond:
            accepted = {int(m.group(1)) for line in server.lines for m in [conn.match(line)] if m}
        k = len(accepted)
        check(NOFILE_FOR_EMFILE // 2 <= k < NOFILE_FOR_EMFILE,
              f"{k} connections accepted with RLIMIT_NOFILE {NOFILE_FOR_EMFILE}")
        check(accepted == {c.local_port for c in clients[:k]},
              "the accepted connections are not the first ones in the backlog")
        for c in clients[:k]:
            c.wait_accepted(timeout=1)
        for c in clients[k:]:
            c.expect_eof(timeout=2)
        check(server.count(emfile) == 1, f"the EMFILE line appears {server.count(emfile)} times, "
                                         f"expected once for the episode")
        cpu = server.cpu_seconds()
        time.sleep(1.0)
        used = server.cpu_seconds() - cpu
        check(used < 0.3, f"the idle server used {used:.2f} s of CPU in 1 s (spinning?)")
        # A client leaves: its descriptor takes the next client, which can chat.
        leaver = clients[0]
        leaver.close()
        server.wait_line(server.log(rf"socket {leaver.fd} hung up"), start=leaver.accept_index)
        newcomer = Client(server)
        clients.append(newcomer)
        assert_chat_works(newcomer, [clients[1]], b"a descriptor came free\n")
        # Full again: the next connection is shed, and the line is logged anew.
        extra = Client(server, wait_accept=False)
        clients.append(extra)
        extra.expect_eof()
        server.wait_line(emfile, start=newcomer.accept_index, what="a second EMFILE line")
        server.assert_alive()
    finally:
        close_all(clients)


def signal_exits_0(server, sig):
    clients = connect(server, 3)
    try:
        server.signal(sig)
        status = server.wait_exit(5)
        check(status is not None, f"server still running 5 s after {sig.name}")
        check(status == 0, f"server exited with status {status} after {sig.name}")
        for c in clients:
            c.expect_eof(timeout=2)
        server.join_output()
        with server.cond:
            last = server.lines[-1] if server.lines else None
        check(last is not None and re.fullmatch(re.escape(server.prefix) + r"shutting down \(3 clients closed\)",
                                                last),
              f"the last log line is {last!r}, expected '{server.prefix}shutting down (3 clients closed)'")
    finally:
        close_all(clients)


@test()
def sigint_exits_0(server):
    signal_exits_0(server, signal.SIGINT)


@test()
def sigterm_exits_0(server):
    signal_exits_0(server, signal.SIGTERM)


@test(needs_server=False)
def bad_arguments(binary):
    name = os.path.basename(binary)
    env = dict(os.environ)
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = REPO_ROOT + (":" + old if old else "")

    def run(*args):
        try:
            r = subprocess.run([binary, *args], stdin=subprocess.DEVNULL, capture_output=True,
                               env=env, timeout=10)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"{name} {' '.join(args)} still running after 10 s")
        return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")

    usage = (f"usage: {name} [port] [--bind ADDRESS] [--max-clients N] [--max-per-ip N] "
             "[--max-lag SECONDS] [--stall-timeout SECONDS]")
    for opt in ("-h", "--help"):
        code, out, err = run(opt)
        check(code == 0, f"{opt}: exit status {code}, expected 0 (stderr {err!r})")
        check(usage in out, f"{opt}: no {usage!r} on stdout: {out!r}")
    for arg in ("abc", "70000", "-5", "65536", "12x"):
        code, out, err = run(arg)
        check(code == 2, f"{arg!r}: exit status {code}, expected 2 (stdout {out!r}, stderr {err!r})")
        msg = f"{name}: invalid port '{arg}': expected a number from 0 to 65535"
        check(msg in err, f"{arg!r}: stderr {err!r} lacks {msg!r}")
        check(usage in err, f"{arg!r}: no usage line on stderr: {err!r}")
    for args, msg in ((("--stall-timeout", "abc"), "invalid stall timeout 'abc': expected a number of seconds"),
                      (("--stall-timeout=-1",), "invalid stall timeout '-1': expected a number of seconds"),
                      (("--stall-timeout", "1.5x"), "invalid stall timeout '1.5x': expected a number of seconds"),
                      (("--stall-timeout",), "--stall-timeout needs a number of seconds"),
                      (("--stall",), "unknown option '--stall'")):
        code, out, err = run(*args)
        check(code == 2, f"{' '.join(args)}: exit status {code}, expected 2 (stderr {err!r})")
        check(f"{name}: {msg}" in err, f"{' '.join(args)}: stderr {err!r} lacks {name + ': ' + msg!r}")
        check(usage in err, f"{' '.join(args)}: no usage line on stderr: {err!r}")
    code, out, err = run("1234", "5678")
    check(code == 2, f"two arguments: exit status {code}, expected 2 (stderr {err!r})")
    check(f"{name}: too many arguments" in err, f"two arguments: stderr {err!r} lacks '{name}: too many arguments'")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = run(str(port))
    check(code == 1, f"port {port} in use: exit status {code}, expected 1 (stdout {out!r}, stderr {err!r})")
    msg = f"{name}: cannot listen on port {port}: {os.strerror(errno.EADDRINUSE)}\n"
    check(msg in err, f"port in use: stderr {err!r} lacks {msg!r}")


@test()
def nc_clients(server):
    nc = shutil.which("nc")
    if nc is None:
        if os.environ.get("CI"):
            raise TestFailure("nc is not installed (CI installs netcat-openbsd)")
        raise TestSkip("nc not installed")
    procs = []
    try:
        for _ in range(2):
            start = len(server.lines)
            procs.append(subprocess.Popen([nc, HOST, str(server.port)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
            server.wait_line(server.log(r"new connection from 127\.0\.0\.1:\d+ on socket \d+"), start=start,
                             what="new connection from 127.0.0.1:PORT on socket FD (nc)")
        line = b"hello through netcat\n"
        procs[0].stdin.write(line)
        procs[0].stdin.flush()
        out = procs[1].stdout.fileno()
        got = b""
        deadline = time.monotonic() + RECV_TIMEOUT
        while len(got) < len(line):
            left = deadline - time.monotonic()
            check(left > 0, f"the second nc printed {got!r} in {RECV_TIMEOUT:.0f} s")
            ready, _, _ = select.select([out], [], [], left)
            if ready:
                chunk = os.read(out, 4096)
                check(chunk, f"the second nc's stdout closed after {got!r}")
                got += chunk
        check(got == line, f"the second nc printed {got!r}, expected {line!r}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for s in (p.stdin, p.stdout):
                try:
                    s.close()
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------
# Flow control under load: the room moves at the pace of its slowest reader that still reads

CHAT_LOAD = os.environ.get("CHAT_LOAD", os.path.join(REPO_ROOT, "target", "bench", "chat_load"))
HIGH_MARK = 1 << 20          # the library's default high watermark
ONE_READ = 80 * 1024         # one read (64 KiB) plus a held unfinished line (16 KiB)


def rss_bound_kib(clients):
    """The memory bound README.md states: a broadcast's bytes are stored once for all its
    readers and every queue stays under high mark + one read, so the room holds at most
    2 x (high + one read) of queued bytes, plus 16 bytes per queued message per reader (at most
    high / 8 per client, since each message is charged 64 bytes more than its size); 8 MiB for
    the process itself."""
    return (8 * (1 << 20) + 2 * (HIGH_MARK + ONE_READ) + clients * HIGH_MARK // 8) // 1024


def run_flood(server, clients, senders, lines, per_write, extra=(), limit=120):
    """Runs chat_load's flood mode against the server; returns its RESULT fields."""
    check(os.access(CHAT_LOAD, os.X_OK), f"{CHAT_LOAD} is missing (`make test-chat` builds it)")
    cmd = [CHAT_LOAD, "flood", str(server.port), str(clients), str(senders), str(lines),
           str(per_write), str(server.pid()), "--timeout", str(limit), *extra]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=limit + 60)
    except subprocess.TimeoutExpired:
        raise TestFailure(f"chat_load still running after {limit + 60} s")
    out = r.stdout.decode("utf-8", "replace")
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    check(r.returncode == 0 and results, f"chat_load exited with {r.returncode}: "
                                         f"{r.stderr.decode('utf-8', 'replace')[-300:]!r}")
    fields = dict(kv.split("=", 1) for kv in results[-1].split()[1:] if "=" in kv)
    return {k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in fields.items()}


def check_flood_complete(server, result, clients, stopped=0):
    problems = {k: result.get(k) for k in ("lost", "bad", "out_of_order", "dup", "echoed", "closed")
                if result.get(k) != 0}
    check(not problems and result.get("end") == "complete",
          f"the flood did not complete: {problems}, end={result.get('end')} "
          f"(delivered {result.get('delivered')} of {result.get('expected')})")
    dropped = server.count(server.log(r"socket \d+ .*disconnected"))
    check(dropped == stopped, f"{dropped} clients disconnected (expected {stopped}); last lines: "
                              f"{server.tail()}")
    peak = server.rss_kib("VmHWM")
    bound = rss_bound_kib(clients)
    check(peak is not None and peak < bound, f"server peak RSS {peak} KiB, bound {bound} KiB")


@test()
def flood_one_line_per_write(server):
    """100 clients, 10 of them writing 20,000 64-byte lines as fast as they can, one line per
    write, all reading as fast as they can: every line reaches every other client once and in
    order, nobody is disconnected, memory stays under the stated bound."""
    result = run_flood(server, 100, 10, 20000, 1)
    check_flood_complete(server, result, 100)


@test()
def flood_64_lines_per_write(server):
    result = run_flood(server, 100, 10, 20000, 64)
    check_flood_complete(server, result, 100)


@test(args=("0", "--stall-timeout", "1"))
def flood_with_a_reader_that_never_reads(server):
    """A client that never reads among 19 that do: it is dropped after the stall timeout, and
    the others get everything."""
    result = run_flood(server, 20, 4, 20000, 64, extra=("--stop-readers", "1"))
    check(result.get("stopped_closed") == 1, f"the never-reading client was not disconnected: {result}")
    check_flood_complete(server, result, 20, stopped=1)
    check(server.count(server.log(r"socket \d+ stalled \(no progress for 1 s\), disconnected")) == 1,
          f"no stall line for the never-reading client; last lines: {server.tail()}")


def line_stream(count):
    """count 64-byte numbered lines."""
    return b"".join(b"%010d " % i + b"." * 52 + b"\n" for i in range(count))


@test(args=("0", "--stall-timeout", "1"))
def reader_that_stops_is_dropped_and_the_room_goes_on(server):
    """One client reads 2 MB, then stops reading for good: within the stall timeout (plus the
    time its socket buffers take to fill, plus a margin) it is disconnected with a log line,
    and the reader that keeps reading gets every byte."""
    stall, margin = 1.0, 15.0
    payload = line_stream(24 * (1 << 20) // 64)
    sender, healthy = connect(server, 2)
    stopper = Client(server, rcvbuf=64 * 1024)
    clients = [sender, healthy, stopper]
    stopped_at = []
    try:
        def send():
            sender.sock.settimeout(60)
            sender.sock.sendall(payload)

        def read_all():
            got = healthy.recv_exact(len(payload), timeout=60)
            check(got == payload, f"the reading client: byte {first_difference(got, payload)} differs")

        def read_then_stop():
            stopper.recv_exact(2 << 20, timeout=30)
            stopped_at.append(time.monotonic())

        run_threads([send, read_all, read_then_stop], timeout=90)
        i, _ = server.wait_line(server.log(rf"socket {stopper.fd} stalled \(no progress for 1 s\), disconnected"),
                                start=stopper.accept_index, timeout=margin)
        check(server.find(server.log(rf"socket {healthy.fd} .*"), healthy.accept_index + 1) is None,
              "the reading client was disconnected")
        stopper.expect_eof(timeout=10, allow_data=True)
        assert_chat_works(sender, [healthy], b"the room goes on\n")
    finally:
        close_all(clients)


@test()
def slow_reader_slows_the_senders_and_stays(server):
    """A reader that takes about 1.6 MB/s while a sender could go much faster: it is not
    disconnected (default stall timeout, 2 s), gets every byte in order, and the sender is
    slowed to its pace (a lower bound on the sending time, which noise cannot break)."""
    total = 16 * (1 << 20)
    payload = line_stream(total // 64)
    chunk, pause = 64 * 1024, 0.04     # 64 KiB per 40 ms
    sender, fast = connect(server, 2)
    slow = Client(server, rcvbuf=64 * 1024)
    clients = [sender, fast, slow]
    took = []
    try:
        def send():
            start = time.monotonic()
            sender.sock.settimeout(120)
            sender.sock.sendall(payload)
            took.append(time.monotonic() - start)

        def read_fast():
            got = fast.recv_exact(total, timeout=120)
            check(got == payload, f"the fast reader: byte {first_difference(got, payload)} differs")

        def read_slowly():
            buf = bytearray()
            slow.sock.settimeout(10)
            deadline = time.monotonic() + 120
            while len(buf) < total:
                check(time.monotonic() < deadline, f"the slow reader got {len(buf)} of {total} bytes")
                data = slow.sock.recv(min(chunk, total - len(buf)))
                check(data, f"the slow reader was disconnected after {len(buf)} bytes")
                buf += data
                time.sleep(pause)
            check(buf == payload, f"the slow reader: byte {first_difference(buf, payload)} differs")

        run_threads([send, read_fast, read_slowly], timeout=150)
        # What can sit in buffers before the sender feels the slow reader: the sender's socket
        # send buffer, the server's receive buffer for it, the server's queue (high mark), its
        # send buffer to the reader and the reader's receive buffer (autotuned on loopback,
        # several MB each: a run once finished in 2.5 s, usually 5-7 s); the rest went at the
        # reader's pace, at most 1.6 MB/s. Without flow control the sender is done in well
        # under a second.
        buffered = 12 * (1 << 20)
        lower = (total - buffered) / (chunk / pause) / 2
        check(took and took[0] >= lower, f"the sender finished in {took[0]:.1f} s: not slowed to the "
                                         f"slow reader's pace (at least {lower:.1f} s expected)")
        check(server.count(server.log(r"socket \d+ .*disconnected")) == 0,
              f"a client was disconnected: {server.tail()}")
    finally:
        close_all(clients)


# ---------------------------------------------------------------------------------------------
# Runner


def run_test(binary, name, fn, needs_server, server_options):
    """Returns ("ok", seconds) / ("fail", reason) / ("skip", reason)."""
    start = time.monotonic()
    if not needs_server:
        try:
            fn(binary)
        except TestSkip as e:
            return "skip", str(e)
        except TestFailure as e:
            return "fail", str(e)
        except Exception as e:  # noqa: BLE001 - a test bug or an unexpected error: a failure
            return "fail", f"{type(e).__name__}: {e}"
        return "ok", time.monotonic() - start

    server = None
    result = None
    try:
        server = Server(binary, **server_options)
        server.wait_listening()
        fn(server)
        if not server.signalled:
            server.assert_alive()
    except TestSkip as e:
        result = ("skip", str(e))
    except TestFailure as e:
        result = ("fail", str(e))
    except Exception as e:  # noqa: BLE001
        result = ("fail", f"{type(e).__name__}: {e}")
    finally:
        if server is not None:
            was_signalled = server.signalled
            status = server.proc.poll()
            if result is not None and result[0] == "fail" and not was_signalled and status is not None:
                result = ("fail", f"{result[1]} [the server had exited with status {status}; "
                                  f"last lines: {server.tail()}]")
            status = server.stop()
            if result is None and not was_signalled and status != 0:
                result = ("fail", f"after the test, SIGTERM gave exit status {status}, expected 0; "
                                  f"last lines: {server.tail()}")
    if result is None:
        result = ("ok", time.monotonic() - start)
    return result


def main():
    parser = argparse.ArgumentParser(description="End-to-end tests of a chat server.")
    parser.add_argument("server", metavar="SERVER_BINARY")
    parser.add_argument("--only", metavar="NAME", help="run only this test")
    args = parser.parse_args()
    binary = os.path.abspath(args.server)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print(f"chat_e2e: {args.server} is not an executable file", file=sys.stderr)
        return 2
    tests = TESTS
    if args.only:
        tests = [t for t in TESTS if t[0] == args.only]
        if not tests:
            print(f"chat_e2e: no test named {args.only!r}; tests: {', '.join(t[0] for t in TESTS)}",
                  file=sys.stderr)
            return 2
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
