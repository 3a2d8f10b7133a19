#!/usr/bin/env python3
"""Side-by-side benchmark of st_proactor's chat servers and the peer chat servers.

Workloads (--workloads, default steady,steady-burst,idle,flood-1,flood-64,flood-1000c,syscalls),
each on a fresh server, in rounds interleaved round-robin across the servers:
  steady       chat_load steady mode (default 200 clients, 15 senders, 20 lines/s each, evenly
               spread, 10 s measured after 2 s of warm-up): server CPU time (utime+stime of
               /proc/PID/stat, all threads, dead ones included) over the measured window, VmRSS
               at its end. The offered load leaves every server headroom (the table shows each
               one's CPU %): a saturated server's CPU per delivery is one core divided by the
               offered rate, whatever the server does. Saturation throughput is what the flood
               tables report (deliveries per second).
  steady-burst the same average rate, in bursts: each sender writes --burst lines (20) back to
               back every 20 periods.
  idle         VmRSS before and after 2000 idle clients connect (bytes per idle client).
  flood-*      chat_load flood mode: senders write as fast as their sockets take it (see
               FLOODS below); deliveries per second, deliveries per server CPU-second over the
               flood, the server's peak RSS (VmHWM just before it is stopped).
  syscalls     our servers only, once: the steady load on a server run under `strace -f -c`,
               and the system calls it made per 1000 deliveries (accept4, recv*, send*, and
               the waits: io_uring_enter or epoll_wait). Skipped where strace is missing.

Prints one table for steady+idle and one per flood workload, medians over the rounds (lost,
out-of-order and errors are totals). Exits 1 when a server of ours loses, duplicates, garbles or
reorders a line, closes a reading client, does not complete a flood, crashes, or cannot be
measured; never on times; peers are reported, never failures. Raw results:
target/bench/results.json.

Usage: tests/bench/run_bench.py [--quick] [--rounds N] [--workloads a,b] ... (see --help)
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(REPO, "target", "bench")
LOG_DIR = os.path.join(OUT_DIR, "logs")
LOAD_SRC = os.path.join(REPO, "tests", "bench", "chat_load.c")
LOAD_BIN = os.path.join(OUT_DIR, "chat_load")
PEERS_DIR = os.environ.get("PEERS_DIR", "/work/shared/peers")
PEERS_BIN = os.environ.get("PEERS_BIN", "/tmp/st_peers_bin")
PEER_NAMES = ["beej_poll", "seed_threads", "tokio_chat", "libevent_chat", "libuv_chat"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_RE = re.compile(r"listening on port (\d+) \(backend ([^)]+)\)")

# Saturating workloads: (clients, senders, lines per sender, lines per write, stopped readers).
FLOODS = {
    "flood-1": (100, 10, 20000, 1, 0),
    "flood-64": (100, 10, 20000, 64, 0),
    "flood-1000c": (1000, 4, 20000, 64, 0),
    "flood-1000c-1": (1000, 4, 20000, 1, 0),
    "flood-stall": (100, 10, 20000, 64, 2),
}
WORKLOADS = ["steady", "steady-burst", "idle"] + list(FLOODS) + ["syscalls"]
DEFAULT_WORKLOADS = "steady,steady-burst,idle,flood-1,flood-64,flood-1000c,syscalls"
# The system calls the syscalls workload reports, by group.
SYSCALL_GROUPS = [
    ("accept", ("accept", "accept4")),
    ("recv", ("recv", "recvfrom", "recvmsg", "recvmmsg")),
    ("send", ("send", "sendto", "sendmsg", "sendmmsg", "writev")),
    ("read/write", ("read", "write")),
    ("io_uring_enter", ("io_uring_enter",)),
    ("epoll_wait", ("epoll_wait", "epoll_pwait", "epoll_pwait2")),
    ("epoll_ctl", ("epoll_ctl",)),
]


def log(msg):
    print(msg, flush=True)


class Server:
    def __init__(self, name, argv, ours, env=None, backend=None):
        self.name = name
        self.argv = argv
        self.ours = ours
        self.env = env or {}
        self.backend = backend  # the backend the ready line must report (ours only)
        self.skip_reason = None


class Running:
    """A started server process."""

    def __init__(self, server, tag):
        self.server = server
        os.makedirs(LOG_DIR, exist_ok=True)
        self.log_path = os.path.join(LOG_DIR, "%s-%s.log" % (server.name.replace("/", "-"), tag))
        self.log_file = open(self.log_path, "wb")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = REPO + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        env.update(server.env)
        if server.ours:
            self.port = None
            argv = server.argv + ["0"]
        else:
            self.port = free_port()
            argv = server.argv + [str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        self.pid = self.proc.pid

    def wait_ready(self, timeout=10.0):
        """Returns None when the server accepts connections, else why not."""
        deadline = time.monotonic() + timeout
        if self.server.ours:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return "exited with status %s before it was ready: %s" % (
                        self.proc.returncode, self.log_tail())
                with open(self.log_path, "rb") as f:
                    m = READY_RE.search(f.read().decode("utf-8", "replace"))
                if m:
                    self.port = int(m.group(1))
                    got = m.group(2)
                    if self.server.backend and self.server.backend not in got:
                        return "reports backend '%s', wanted %s" % (got, self.server.backend)
                    break
                time.sleep(0.02)
            else:
                return "no ready line within %.0f s" % timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "exited with status %s: %s" % (self.proc.returncode, self.log_tail())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    pass
                time.sleep(0.1)  # let the server see the probe connection come and go
                return None
            except OSError:
                time.sleep(0.05)
        return "port %d not accepting within %.0f s" % (self.port, timeout)

    def alive(self):
        return self.proc.poll() is None

    def cpu_ticks(self):
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime is field 14, stime field 15.
        return int(fields[11]) + int(fields[12])

    def status_kib(self, key):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def log_tail(self, n=300):
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
            return data[-n:].decode("utf-8", "replace").strip().replace("\n", " | ")
        except OSError:
            return ""

    def stop(self):
        """SIGTERM, then SIGKILL after 3 s. Returns the exit status (None if it had to be killed)."""
        status = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                status = None
        else:
            status = self.proc.returncode
        self.log_file.close()
        return status


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def build_load():
    os.makedirs(OUT_DIR, exist_ok=True)
    if os.path.exists(LOAD_BIN) and os.path.getmtime(LOAD_BIN) >= os.path.getmtime(LOAD_SRC):
        return
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-o", LOAD_BIN, LOAD_SRC]
    log("building chat_load: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def find_peers(notes):
    missing = [n for n in PEER_NAMES if not os.access(os.path.join(PEERS_BIN, n), os.X_OK)]
    if missing:
        build = os.path.join(PEERS_DIR, "build.sh")
        if not os.path.exists(build):
            notes.append("peers missing in %s (%s) and no %s: benching ours only"
                         % (PEERS_BIN, ", ".join(missing), build))
        else:
            log("building peers: PEERS_BIN=%s %s" % (PEERS_BIN, build))
            env = dict(os.environ, PEERS_BIN=PEERS_BIN)
            r = subprocess.run([build], cwd=PEERS_DIR, env=env)
            if r.returncode != 0:
                notes.append("peer build failed (status %d): benching ours and whatever peers exist"
                             % r.returncode)
    peers = []
    for n in PEER_NAMES:
        p = os.path.join(PEERS_BIN, n)
        if os.access(p, os.X_OK):
            peers.append(Server(n, [p], ours=False))
        else:
            notes.append("peer %s not available in %s" % (n, PEERS_BIN))
    return peers


def our_servers():
    rust = os.path.join(REPO, "proact_server")
    c = os.path.join(REPO, "c_demo", "chat_server")
    servers = [
        Server("proact_server/epoll", [rust], True, {"ST_PROACTOR_BACKEND": "epoll"}, "epoll"),
        Server("proact_server/uring", [rust], True, {"ST_PROACTOR_BACKEND": "uring"}, "uring"),
        Server("chat_server/epoll", [c], True, {"ST_PROACTOR_BACKEND": "epoll"}, "epoll"),
    ]
    for s in servers:
        if not os.access(s.argv[0], os.X_OK):
            sys.exit("run_bench: %s is missing: run `make` first" % s.argv[0])
    return servers


def parse_kv(line):
    return {k: (int(v) if re.fullmatch(r"-?\d+", v) else v)
            for k, v in (t.split("=", 1) for t in line.split()[1:] if "=" in t)}


def run_load(srv, args, tag, burst=1, wrap=None):
    """One steady-load measurement on a fresh server (`burst` lines per write burst; `wrap`:
    a command prefix for the server, such as strace). Returns a dict (with 'error' on
    failure)."""
    scenario = "load" if burst == 1 else "burst"
    res = {"server": srv.name, "scenario": scenario, "tag": tag}
    if wrap:
        srv = Server(srv.name, wrap + srv.argv, srv.ours, srv.env, srv.backend)
    run = Running(srv, tag + "-" + scenario)
    server_pid = run.pid
    try:
        why = run.wait_ready()
        if why:
            res["error"] = "start: " + why
            return res
        if wrap:
            # The server is the wrapper's child: chat_load paces its connects by the server's
            # open fds.
            with open("/proc/%d/task/%d/children" % (run.pid, run.pid)) as f:
                server_pid = int(f.read().split()[0])
        cmd = [LOAD_BIN, str(run.port), str(args.clients), str(args.senders), str(args.rate),
               str(args.duration), str(args.warmup), str(server_pid)]
        if burst > 1:
            cmd += ["--burst", str(burst)]
        limit = time.monotonic() + 20 + args.clients / 200 + args.warmup + args.duration + 15
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cpu0 = t0 = None
        try:
            for line in p.stdout:
                now = time.monotonic()
                if line.startswith("MEASURE_START"):
                    cpu0, t0 = run.cpu_ticks(), now
                elif line.startswith("MEASURE_END"):
                    if cpu0 is not None:
                        res["cpu_s"] = (run.cpu_ticks() - cpu0) / CLK_TCK
                        res["wall_s"] = now - t0
                    res["rss_kib"] = run.status_kib("VmRSS")
                    res["hwm_kib"] = run.status_kib("VmHWM")
                elif line.startswith("RESULT"):
                    res.update(parse_kv(line))
                if now > limit:
                    break
            try:
                p.wait(timeout=max(1.0, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                res["error"] = "chat_load did not finish in time"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err = p.stderr.read().strip()
        if "expected" not in res and "error" not in res:
            res["error"] = "chat_load failed (status %s): %s" % (p.returncode, err[-300:])
        if not run.alive():
            res["crashed"] = "server exited with status %s: %s" % (run.proc.returncode, run.log_tail())
        if "cpu_s" in res and res.get("window_delivered"):
            res["cpu_us_per_delivery"] = res["cpu_s"] * 1e6 / res["window_delivered"]
            res["cpu_pct"] = 100.0 * res["cpu_s"] / res["wall_s"]
        return res
    finally:
        if wrap and server_pid != run.pid:
            # Stop the server, not the wrapper, which then writes its summary and exits.
            try:
                os.kill(server_pid, signal.SIGTERM)
                run.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        status = run.stop()
        if srv.ours and status != 0 and "crashed" not in res:
            res["exit_status"] = "killed (no exit within 3 s)" if status is None else status


def run_idle(srv, args, tag):
    """Idle memory: RSS growth per idle client on a fresh server."""
    res = {"server": srv.name, "scenario": "idle", "tag": tag}
    run = Running(srv, tag + "-idle")
    try:
        why = run.wait_ready()
        if why:
            res["error"] = "start: " + why
            return res
        time.sleep(0.2)
        rss0, fds0 = run.status_kib("VmRSS"), run.fd_count()
        n = args.idle_clients
        p = subprocess.Popen([LOAD_BIN, str(run.port), str(n), "0", "0", "120", "0", str(run.pid)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = p.stdout.readline()
            if not line.startswith("CONNECTED"):
                p.wait(timeout=5)
                res["error"] = "idle clients did not connect: " + p.stderr.read().strip()[-300:]
                return res
            deadline = time.monotonic() + 15
            while run.alive() and run.fd_count() < fds0 + n and time.monotonic() < deadline:
                time.sleep(0.05)
            held = run.fd_count() - fds0 if run.alive() else 0
            if held < n:
                res["error"] = "server holds %d of %d idle clients" % (held, n)
                return res
            time.sleep(0.5)
            rss1 = run.status_kib("VmRSS")
            res.update(rss0_kib=rss0, rss1_kib=rss1, clients=n,
                       bytes_per_idle_client=(rss1 - rss0) * 1024.0 / n)
            return res
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if not run.alive():
                res["crashed"] = "server exited with status %s: %s" % (run.proc.returncode, run.log_tail())
    finally:
        status = run.stop()
        if srv.ours and status != 0 and "crashed" not in res:
            res["exit_status"] = "killed (no exit within 3 s)" if status is None else status


def flood_lines(args, wl):
    return args.flood_lines if args.flood_lines else FLOODS[wl][2]


def describe_flood(args, wl):
    clients, senders, _, per_write, stopped = FLOODS[wl]
    lines = flood_lines(args, wl)
    text = "%d clients, %d senders x %d lines, %d line%s per write" % (
        clients, senders, lines, per_write, "" if per_write == 1 else "s")
    if stopped:
        text += ", %d stopped readers" % stopped
    return text + " (%d deliveries per run)" % (senders * lines * (clients - stopped - 1))


def run_flood(srv, args, tag, wl):
    """One saturating run on a fresh server. Returns a dict (with 'error' on failure)."""
    clients, senders, _, per_write, stopped = FLOODS[wl]
    lines = flood_lines(args, wl)
    res = {"server": srv.name, "scenario": wl, "tag": tag}
    run = Running(srv, tag + "-" + wl)
    try:
        why = run.wait_ready()
        if why:
            res["error"] = "start: " + why
            return res
        cmd = [LOAD_BIN, "flood", str(run.port), str(clients), str(senders), str(lines),
               str(per_write), str(run.pid), "--timeout", str(args.flood_timeout),
               "--idle", str(args.flood_idle)]
        if stopped:
            cmd += ["--stop-readers", str(stopped)]
        # chat_load's own bounds: setup 10 s + 5 ms per client, the flood, the idle limit, 3 s
        # for the stopped readers; then a margin.
        limit = time.monotonic() + 10 + clients * 0.005 + args.flood_timeout + args.flood_idle + 3 + 15
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cpu0 = t0 = None
        try:
            for line in p.stdout:
                now = time.monotonic()
                if line.startswith("MEASURE_START"):
                    cpu0, t0 = run.cpu_ticks(), now
                elif line.startswith("MEASURE_END"):
                    if cpu0 is not None:
                        res["cpu_s"] = (run.cpu_ticks() - cpu0) / CLK_TCK
                        res["wall_s"] = now - t0
                elif line.startswith("RESULT"):
                    res.update(parse_kv(line))
                if now > limit:
                    break
            try:
                p.wait(timeout=max(1.0, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                res["error"] = "chat_load did not finish in time"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err = p.stderr.read().strip()
        if err:
            # chat_load shows the first garbled lines it got: keep them beside the server's log.
            with open(run.log_path[:-len(".log")] + ".chat_load.log", "w") as f:
                f.write(err + "\n")
            res["stderr"] = err.splitlines()[:5]
        if "expected" not in res and "error" not in res:
            res["error"] = "chat_load failed (status %s): %s" % (p.returncode, err[-300:])
        if run.alive():
            res["hwm_kib"] = run.status_kib("VmHWM")
        else:
            res["crashed"] = "server exited with status %s: %s" % (run.proc.returncode, run.log_tail())
        if "expected" in res:
            res["completed"] = (res.get("end") == "complete" and res["delivered"] >= res["expected"])
            if res.get("cpu_s"):
                res["deliveries_per_cpu_s"] = res["delivered"] / res["cpu_s"]
            # Over the flood itself (first line sent to last delivery): a run that gives up
            # prints MEASURE_END only after --idle seconds of nothing.
            busy_s = res.get("elapsed_ms", 0) / 1000.0
            if res.get("cpu_s") is not None and busy_s > 0:
                res["cpu_pct"] = 100.0 * res["cpu_s"] / busy_s
        return res
    finally:
        status = run.stop()
        if srv.ours and status != 0 and "crashed" not in res:
            res["exit_status"] = "killed (no exit within 3 s)" if status is None else status


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def problems_of(runs):
    problems = []
    for r in runs:
        for k in ("error", "crashed"):
            if k in r:
                problems.append("%s %s: %s" % (r["scenario"], r["tag"], r[k]))
        if "exit_status" in r:
            problems.append("%s %s: exit status %s after SIGTERM" % (r["scenario"], r["tag"], r["exit_status"]))
    return problems


def run_syscalls(srv, args):
    """The steady load on our server under `strace -f -c`: system calls per 1000 deliveries."""
    out = os.path.join(LOG_DIR, "strace-%s.txt" % srv.name.replace("/", "-"))
    os.makedirs(LOG_DIR, exist_ok=True)
    r = run_load(srv, args, "strace", wrap=["strace", "-f", "-c", "-o", out])
    res = {"server": srv.name, "scenario": "syscalls", "tag": "strace"}
    if "expected" not in r:
        res["error"] = r.get("error") or r.get("crashed") or "no result"
        return res
    time.sleep(0.5)  # strace writes its summary once the server has exited
    counts = {}
    try:
        with open(out) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and fields[-1].isidentifier() and fields[3].isdigit():
                    counts[fields[-1]] = int(fields[3])
    except OSError as err:
        res["error"] = "no strace summary: %s" % err
        return res
    res["delivered"] = r["delivered"]
    res["calls"] = {group: sum(counts.get(n, 0) for n in names) for group, names in SYSCALL_GROUPS}
    return res


def print_syscalls(results):
    head = ("server", "deliveries") + tuple(g for g, _ in SYSCALL_GROUPS)
    table = []
    for r in results:
        if "calls" not in r:
            table.append((r["server"], "FAILED: %s" % r.get("error")) + ("",) * len(SYSCALL_GROUPS))
            continue
        per = 1000.0 / r["delivered"] if r["delivered"] else 0
        table.append((r["server"], str(r["delivered"])) +
                     tuple("%d (%.2f)" % (r["calls"][g], r["calls"][g] * per) for g, _ in SYSCALL_GROUPS))
    print_grid(head, table)
    print("(system calls of the whole run, warm-up and connection set-up included; in brackets "
          "per 1000 deliveries. read/write are the servers' log lines, timers and wake-ups.)")


def summarize(servers, results, scenario="load"):
    """Rows of the steady (+idle) table, or of the bursty one."""
    rows = []
    for s in servers:
        loads = [r for r in results if r["server"] == s.name and r["scenario"] == scenario]
        idles = [r for r in results if r["server"] == s.name and r["scenario"] == "idle"]
        if scenario != "load":
            idles = []
        ok_loads = [r for r in loads if "expected" in r]
        rows.append({
            "name": s.name, "ours": s.ours, "skip": s.skip_reason,
            "runs": len(loads), "idle_runs": len(idles),
            "rounds": len(ok_loads),
            "cpu": med([r.get("cpu_us_per_delivery") for r in ok_loads]),
            "cpu_pct": med([r.get("cpu_pct") for r in ok_loads]),
            "p50": med([r.get("p50_us") for r in ok_loads]),
            "p99": med([r.get("p99_us") for r in ok_loads]),
            "max": max([r.get("max_us", 0) for r in ok_loads], default=None),
            "lost": sum(r.get("lost", 0) for r in ok_loads) if ok_loads else None,
            "ooo": sum(r.get("out_of_order", 0) for r in ok_loads) if ok_loads else None,
            "other": sum(r.get("dup", 0) + r.get("bad", 0) + r.get("echoed", 0) + r.get("closed", 0)
                         for r in ok_loads) if ok_loads else None,
            "delivered": med([r.get("delivered") for r in ok_loads]),
            "rss": med([r.get("rss_kib") for r in ok_loads]),
            "idle": med([r.get("bytes_per_idle_client") for r in idles]),
            "problems": problems_of(loads + idles),
        })
    peer_cpus = [r["cpu"] for r in rows if not r["ours"] and r["cpu"] is not None]
    best = min(peer_cpus) if peer_cpus else None
    best_name = next((r["name"] for r in rows if not r["ours"] and r["cpu"] == best), None)
    for r in rows:
        r["ratio"] = r["cpu"] / best if (best and r["cpu"] is not None) else None
    return rows, best_name


def summarize_flood(servers, results, wl):
    """Rows of one flood workload's table."""
    rows = []
    for s in servers:
        runs = [r for r in results if r["server"] == s.name and r["scenario"] == wl]
        ok = [r for r in runs if "expected" in r]
        total = lambda key: sum(r.get(key, 0) for r in ok) if ok else None
        rows.append({
            "name": s.name, "ours": s.ours, "skip": s.skip_reason, "runs": len(runs),
            "measured": len(ok), "completed": sum(1 for r in ok if r.get("completed")),
            "lost": total("lost"), "bad": total("bad"), "ooo": total("out_of_order"),
            "dup_echo": (total("dup") or 0) + (total("echoed") or 0) if ok else None,
            "closed": total("closed"), "stopped_closed": total("stopped_closed"),
            "per_s": med([r.get("deliveries_per_s") for r in ok]),
            "per_cpu_s": med([r.get("deliveries_per_cpu_s") for r in ok]),
            "cpu_pct": med([r.get("cpu_pct") for r in ok]),
            "p99": med([r.get("p99_us") for r in ok]),
            "hwm": med([r.get("hwm_kib") for r in ok]),
            "problems": problems_of(runs),
        })
    peer = [r["per_cpu_s"] for r in rows if not r["ours"] and r["per_cpu_s"] is not None]
    best = max(peer) if peer else None
    best_row = next((r for r in rows if not r["ours"] and r["per_cpu_s"] == best), None)
    for r in rows:
        r["ratio"] = r["per_cpu_s"] / best if (best and r["per_cpu_s"] is not None) else None
    best_name = None
    if best_row:
        best_name = best_row["name"]
        if best_row["completed"] < best_row["runs"]:
            best_name += " (which completed %d of %d runs)" % (best_row["completed"], best_row["runs"])
    return rows, best_name


def print_grid(head, table):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print(line(t))


def print_table(rows, best_name):
    head = ("server", "CPU us/deliv", "vs best peer", "CPU %", "p50 us", "p99 us", "max us",
            "lost", "out-of-order", "dup/bad/closed", "RSS MiB", "B/idle client")
    table = []
    for r in rows:
        if not r["runs"] and not r["idle_runs"]:
            continue
        table.append((
            ("* " if r["ours"] else "  ") + r["name"],
            fmt(r["cpu"], ".2f"), fmt(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else ""),
            fmt(r["cpu_pct"], ".0f"), fmt(r["p50"], ".0f"), fmt(r["p99"], ".0f"), fmt(r["max"], "d"),
            fmt(r["lost"], "d"), fmt(r["ooo"], "d"), fmt(r["other"], "d"),
            fmt(r["rss"] / 1024 if r["rss"] is not None else None, ".1f"),
            fmt(r["idle"], ".0f")))
    print_grid(head, table)
    print("(* = ours. Medians over rounds; lost, out-of-order and dup/bad/closed are totals over"
          " rounds; max us is the worst round; 'vs best peer' divides CPU us/deliv by that of %s.)"
          % (best_name or "no peer"))


def print_flood_table(rows, best_name):
    head = ("server", "completed", "lost", "bad", "out-of-order", "dup/echo", "closed",
            "stopped closed", "Mdeliv/s", "Mdeliv/CPU-s", "vs best peer", "CPU %", "p99 ms",
            "peak RSS MiB")
    table = []
    for r in rows:
        if not r["runs"]:
            continue
        done = ("yes" if r["completed"] == r["runs"] else "no" if r["completed"] == 0
                else "%d/%d" % (r["completed"], r["runs"]))
        table.append((
            ("* " if r["ours"] else "  ") + r["name"], done,
            fmt(r["lost"], "d"), fmt(r["bad"], "d"), fmt(r["ooo"], "d"), fmt(r["dup_echo"], "d"),
            fmt(r["closed"], "d"), fmt(r["stopped_closed"], "d"),
            fmt(r["per_s"] / 1e6 if r["per_s"] is not None else None, ".2f"),
            fmt(r["per_cpu_s"] / 1e6 if r["per_cpu_s"] is not None else None, ".2f"),
            fmt(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else ""),
            fmt(r["cpu_pct"], ".0f"),
            fmt(r["p99"] / 1000 if r["p99"] is not None else None, ".0f"),
            fmt(r["hwm"] / 1024 if r["hwm"] is not None else None, ".1f")))
    print_grid(head, table)
    print("(* = ours. Medians over rounds; completed and the error columns count all rounds;"
          " 'vs best peer' divides deliveries per CPU-second by that of %s: above 1.00x beats"
          " every peer.)" % (best_name or "no peer"))


def log_flood(s, tag, wl, r):
    if "expected" in r:
        log("%-22s %s %s: %s, %d/%d delivered in %.2f s, %.2f M/s, %s M/CPU-s, lost %d bad %d"
            " out-of-order %d closed %d stopped-closed %d, peak RSS %.1f MiB%s"
            % (s.name, tag, wl, "complete" if r["completed"] else "INCOMPLETE (%s)" % r.get("end"),
               r["delivered"], r["expected"], r.get("elapsed_ms", 0) / 1000.0,
               r.get("deliveries_per_s", 0) / 1e6,
               fmt(r["deliveries_per_cpu_s"] / 1e6 if r.get("deliveries_per_cpu_s") else None, ".2f"),
               r["lost"], r["bad"], r["out_of_order"], r["closed"], r.get("stopped_closed", 0),
               r.get("hwm_kib", 0) / 1024, "  ** " + r["crashed"] if "crashed" in r else ""))
    else:
        log("%-22s %s %s: FAILED: %s" % (s.name, tag, wl, r.get("error") or r.get("crashed")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help="comma-separated, of: %s (default %s)" % (", ".join(WORKLOADS), DEFAULT_WORKLOADS))
    ap.add_argument("--duration", type=int, default=10, help="steady: measured seconds per load run")
    ap.add_argument("--warmup", type=int, default=2, help="steady: warm-up seconds")
    ap.add_argument("--clients", type=int, default=200, help="steady: clients")
    ap.add_argument("--senders", type=int, default=15, help="steady: senders")
    ap.add_argument("--rate", type=int, default=20, help="steady: lines per second per sender")
    ap.add_argument("--burst", type=int, default=20, help="steady-burst: lines per burst")
    ap.add_argument("--idle-clients", type=int, default=2000)
    ap.add_argument("--flood-lines", type=int, default=0,
                    help="flood: lines per sender instead of each workload's own (20000)")
    ap.add_argument("--flood-timeout", type=int, default=120, help="flood: chat_load --timeout")
    ap.add_argument("--flood-idle", type=int, default=5, help="flood: chat_load --idle")
    ap.add_argument("--quick", action="store_true",
                    help="1 round, steady 4 s, flood timeout 60 s (a smoke run)")
    ap.add_argument("--only", help="comma-separated server names (e.g. proact_server/epoll,libevent_chat)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-idle", action="store_true", help="drop the idle workload")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 4
        args.flood_timeout = min(args.flood_timeout, 60)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        sys.exit("run_bench: unknown workload %s; known: %s" % (", ".join(unknown) or "(none)", ", ".join(WORKLOADS)))
    if args.no_idle:
        workloads = [w for w in workloads if w != "idle"]
    notes = []
    floods = [w for w in workloads if w in FLOODS]
    syscalls = "syscalls" in workloads
    workloads = [w for w in workloads if w != "syscalls"]
    if syscalls and not shutil.which("strace"):
        notes.append("strace is missing: no system-call counts")
        syscalls = False

    build_load()
    servers = our_servers()
    if not args.no_peers:
        servers += find_peers(notes)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in servers}
        if unknown:
            sys.exit("run_bench: no server named %s; known: %s"
                     % (", ".join(sorted(unknown)), ", ".join(s.name for s in servers)))
        servers = [s for s in servers if s.name in wanted]
    log("st_proactor chat benchmark: workloads %s, %d round(s), %d server(s); logs in %s"
        % (",".join(workloads), args.rounds, len(servers), LOG_DIR))
    if "steady" in workloads or "steady-burst" in workloads or syscalls:
        log("  steady: %d clients, %d senders x %d lines/s, %d s measured after %d s warm-up"
            % (args.clients, args.senders, args.rate, args.duration, args.warmup))
    if "steady-burst" in workloads:
        log("  steady-burst: the same, in bursts of %d lines" % args.burst)
    if "idle" in workloads:
        log("  idle: %d idle clients" % args.idle_clients)
    for wl in floods:
        log("  %s: %s" % (wl, describe_flood(args, wl)))
    for n in notes:
        log("note: " + n)

    results = []
    started = time.monotonic()
    for rnd in range(args.rounds):
        # Round-robin, and rotate the order each round so no server always comes first.
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)] if servers else []
        for s in order:
            tag = "r%d" % (rnd + 1)
            first = True
            for wl in workloads:
                if s.skip_reason:
                    break
                if wl == "steady":
                    r = run_load(s, args, tag)
                elif wl == "steady-burst":
                    r = run_load(s, args, tag, burst=args.burst)
                elif wl == "idle":
                    r = run_idle(s, args, tag)
                else:
                    r = run_flood(s, args, tag, wl)
                if s.ours and s.backend == "uring" and rnd == 0 and first and "error" in r \
                        and r["error"].startswith("start:"):
                    s.skip_reason = "io_uring unavailable: " + r["error"]
                    log("%-22s %s: SKIPPED (%s)" % (s.name, tag, s.skip_reason))
                    break
                first = False
                results.append(r)
                if wl in ("steady", "steady-burst"):
                    if "expected" in r:
                        log("%-22s %s %s: %.2f us CPU/delivery (%.0f%% CPU), p50 %d us, p99 %d us, "
                            "delivered %d/%d, lost %d, out-of-order %d, RSS %.1f MiB%s"
                            % (s.name, tag, r["scenario"], r.get("cpu_us_per_delivery", float("nan")),
                               r.get("cpu_pct", float("nan")), r["p50_us"], r["p99_us"], r["delivered"],
                               r["expected"], r["lost"], r["out_of_order"], r.get("rss_kib", 0) / 1024,
                               "  ** " + r["crashed"] if "crashed" in r else ""))
                    else:
                        log("%-22s %s %s: FAILED: %s" % (s.name, tag, r["scenario"], r.get("error")))
                elif wl == "idle":
                    if "bytes_per_idle_client" in r:
                        log("%-22s %s idle: %.0f bytes/idle client (RSS %.1f -> %.1f MiB)"
                            % (s.name, tag, r["bytes_per_idle_client"], r["rss0_kib"] / 1024,
                               r["rss1_kib"] / 1024))
                    else:
                        log("%-22s %s idle: FAILED: %s" % (s.name, tag, r.get("error") or r.get("crashed")))
                else:
                    log_flood(s, tag, wl, r)
    syscall_results = []
    if syscalls:
        for s in servers:
            if s.ours and not s.skip_reason:
                r = run_syscalls(s, args)
                syscall_results.append(r)
                log("%-22s syscalls: %s" % (s.name, r.get("calls") or "FAILED: %s" % r.get("error")))
    elapsed = time.monotonic() - started

    summary = {}
    rows, best_name = summarize(servers, results)
    burst_rows, burst_best = summarize(servers, results, "burst")
    if "steady" in workloads or "idle" in workloads:
        summary["steady"] = rows
    if "steady-burst" in workloads:
        summary["steady-burst"] = burst_rows
    if syscall_results:
        summary["syscalls"] = syscall_results
    flood_rows = {}
    for wl in floods:
        flood_rows[wl] = summarize_flood(servers, results, wl)
        summary[wl] = flood_rows[wl][0]
    with open(os.path.join(OUT_DIR, "results.json"), "w") as f:
        json.dump({"args": vars(args), "workloads": workloads, "results": results, "summary": summary},
                  f, indent=1)
    if "steady" in summary:
        print()
        print("steady: %d clients, %d senders x %d lines/s, %d s measured; idle: %d clients"
              % (args.clients, args.senders, args.rate, args.duration, args.idle_clients))
        print_table(rows, best_name)
    if "steady-burst" in summary:
        print()
        print("steady-burst: as steady, each sender writing %d lines back to back every %d periods"
              % (args.burst, args.burst))
        print_table(burst_rows, burst_best)
    if syscall_results:
        print()
        print("syscalls: the steady load, each of our servers under strace -f -c")
        print_syscalls(syscall_results)
    for wl in floods:
        print()
        print("%s: %s" % (wl, describe_flood(args, wl)))
        print_flood_table(*flood_rows[wl])
    print()
    for r in rows:
        if r["skip"]:
            print("note: %s skipped: %s" % (r["name"], r["skip"]))
    all_rows = [("steady", r) for r in (rows if "steady" in summary else [])]
    all_rows += [("steady-burst", r) for r in (burst_rows if "steady-burst" in summary else [])]
    for wl in floods:
        all_rows += [(wl, r) for r in flood_rows[wl][0]]
    for wl, r in all_rows:
        for p in r["problems"]:
            print("problem: %s %s" % (r["name"], p))
    for n in notes:
        print("note: " + n)
    print("total %.0f s" % elapsed)

    failed = []
    steady_rows = (rows if "steady" in summary else []) + \
        (burst_rows if "steady-burst" in summary else [])
    for r in steady_rows:
        if not r["ours"] or r["skip"]:
            continue
        if r["runs"] and r["rounds"] == 0:
            failed.append("%s: no successful load run" % r["name"])
        if r["lost"]:
            failed.append("%s lost %d lines" % (r["name"], r["lost"]))
        if r["ooo"]:
            failed.append("%s delivered %d lines out of order" % (r["name"], r["ooo"]))
        if r["other"]:
            failed.append("%s: %d duplicated/garbled/echoed lines or dropped clients" % (r["name"], r["other"]))
        failed += ["%s: %s" % (r["name"], p) for p in r["problems"]]
    for wl in floods:
        for r in flood_rows[wl][0]:
            if not r["ours"] or r["skip"]:
                continue
            who = "%s %s" % (r["name"], wl)
            if r["completed"] < r["runs"] or r["runs"] == 0:
                failed.append("%s: %d of %d runs completed" % (who, r["completed"], r["runs"]))
            for key, what in (("lost", "lost lines"), ("bad", "garbled lines"),
                              ("ooo", "lines out of order"), ("dup_echo", "duplicated/echoed lines"),
                              ("closed", "reading clients closed")):
                if r[key]:
                    failed.append("%s: %d %s" % (who, r[key], what))
            failed += ["%s: %s" % (who, p) for p in r["problems"]]
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    print("ok: our servers delivered every line, in order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
