#!/usr/bin/env python3
"""Starts a chat server of the build tree without LD_LIBRARY_PATH, and checks that it serves.

usage: python3 tests/install/serve_without_library_path.py SERVER_BINARY

The server (./proact_server or c_demo/chat_server) is started on port 0 with LD_LIBRARY_PATH
removed from its environment (ST_PROACTOR_BACKEND passes through), so it can find
libst_proactor.so only through its own run path. Checked: it starts and loads the build tree's
library; a line one client sends reaches another client; SIGTERM stops it with status 0.
Clients connect to 127.0.0.1 only; every wait is bounded; the server is killed whatever happens.
"""
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 10.0
LINE = b"served without LD_LIBRARY_PATH\n"


class Failure(Exception):
    pass


def read_log_line(server, pattern, deadline):
    """The first stdout line of `server` matching `pattern`, before `deadline`."""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([server.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = server.stdout.readline()
        if not line:
            raise Failure("the server exited: " + server.stderr.read().decode(errors="replace"))
        match = re.search(pattern, line.decode(errors="replace"))
        if match:
            return match
    raise Failure(f"no log line matching {pattern!r} within {TIMEOUT} s")


def check_serves(binary):
    env = {key: value for key, value in os.environ.items() if key != "LD_LIBRARY_PATH"}
    # Unbuffered, so that select() sees every line that readline() has not consumed.
    server = subprocess.Popen([binary, "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              bufsize=0, env=env)
    clients = []
    try:
        deadline = time.monotonic() + TIMEOUT
        port = int(read_log_line(server, r"listening on port (\d+)", deadline).group(1))
        with open(f"/proc/{server.pid}/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "libst_proactor" in line}
        library = os.path.realpath(os.path.join(REPO_ROOT, "libst_proactor.so"))
        if loaded != {library}:
            raise Failure(f"loaded {sorted(loaded)}, want {library}")
        for _ in range(2):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
            read_log_line(server, r"new connection", deadline)
        sender, receiver = clients
        sender.sendall(LINE)
        received = b""
        while len(received) < len(LINE) and time.monotonic() < deadline:
            chunk = receiver.recv(len(LINE) - len(received))
            if not chunk:
                break
            received += chunk
        if received != LINE:
            raise Failure(f"the other client got {received!r}, want {LINE!r}")
        for client in clients:
            client.close()
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=TIMEOUT)
        if status != 0:
            raise Failure(f"exit status {status} after SIGTERM, want 0")
    finally:
        for client in clients:
            client.close()
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
        server.stderr.close()


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    binary = sys.argv[1]
    backend = os.environ.get("ST_PROACTOR_BACKEND", "auto")
    try:
        check_serves(binary)
    except (Failure, OSError, subprocess.TimeoutExpired) as error:
        print(f"FAIL {binary} without LD_LIBRARY_PATH ({backend}): {error}")
        return 1
    print(f"ok   {binary} starts without LD_LIBRARY_PATH and serves ({backend})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
