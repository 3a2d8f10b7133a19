#!/usr/bin/env python3
"""Side-by-side benchmark of st_proactor's chat servers and the peer chat servers.

For every server, in rounds interleaved round-robin across the servers:
  1. steady chat load: start the server, run tests/bench/chat_load (default 200 clients,
     15 senders, 100 lines/s each, 10 s measured after 2 s of warm-up), sample the server's CPU
     time (utime+stime of /proc/PID/stat, all threads, dead ones included) at the start and end
     of the measured window, and its VmRSS at the end; stop the server.
  2. idle memory: start a fresh server, read VmRSS, connect 2000 idle clients, wait until the
     server holds all of them (its /proc/PID/fd count), read VmRSS again; bytes per idle client
     is the difference divided by the number of clients; stop the server.

Prints one row per server with the medians over the rounds (lost, out-of-order and errors are
totals over all rounds). Exits 1 when a server of ours loses, duplicates, garbles or reorders a
line, crashes, or cannot be measured; never on times. Raw results: target/bench/results.json.

Usage: tests/bench/run_bench.py [--quick] [--rounds N] [--duration S] ... (see --help)
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


def run_load(srv, args, tag):
    """One steady-load measurement on a fresh server. Returns a dict (with 'error' on failure)."""
    res = {"server": srv.name, "scenario": "load", "tag": tag}
    run = Running(srv, tag + "-load")
    try:
        why = run.wait_ready()
        if why:
            res["error"] = "start: " + why
            return res
        cmd = [LOAD_BIN, str(run.port), str(args.clients), str(args.senders), str(args.rate),
               str(args.duration), str(args.warmup), str(run.pid)]
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


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def summarize(servers, results):
    rows = []
    for s in servers:
        loads = [r for r in results if r["server"] == s.name and r["scenario"] == "load"]
        idles = [r for r in results if r["server"] == s.name and r["scenario"] == "idle"]
        ok_loads = [r for r in loads if "expected" in r]
        problems = []
        for r in loads + idles:
            for k in ("error", "crashed"):
                if k in r:
                    problems.append("%s %s: %s" % (r["scenario"], r["tag"], r[k]))
            if "exit_status" in r:
                problems.append("%s %s: exit status %s after SIGTERM" % (r["scenario"], r["tag"], r["exit_status"]))
        rows.append({
            "name": s.name, "ours": s.ours, "skip": s.skip_reason,
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
            "problems": problems,
        })
    peer_cpus = [r["cpu"] for r in rows if not r["ours"] and r["cpu"] is not None]
    best = min(peer_cpus) if peer_cpus else None
    best_name = next((r["name"] for r in rows if not r["ours"] and r["cpu"] == best), None)
    for r in rows:
        r["ratio"] = r["cpu"] / best if (best and r["cpu"] is not None) else None
    return rows, best_name


def print_table(rows, best_name):
    head = ("server", "CPU us/deliv", "vs best peer", "CPU %", "p50 us", "p99 us", "max us",
            "lost", "out-of-order", "dup/bad/closed", "RSS MiB", "B/idle client")
    table = []
    for r in rows:
        table.append((
            ("* " if r["ours"] else "  ") + r["name"],
            fmt(r["cpu"], ".2f"), fmt(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else ""),
            fmt(r["cpu_pct"], ".0f"), fmt(r["p50"], ".0f"), fmt(r["p99"], ".0f"), fmt(r["max"], "d"),
            fmt(r["lost"], "d"), fmt(r["ooo"], "d"), fmt(r["other"], "d"),
            fmt(r["rss"] / 1024 if r["rss"] is not None else None, ".1f"),
            fmt(r["idle"], ".0f")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print(line(t))
    print("(* = ours. Medians over rounds; lost, out-of-order and dup/bad/closed are totals over"
          " rounds; max us is the worst round; 'vs best peer' divides CPU us/deliv by that of %s.)"
          % (best_name or "no peer"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="measured seconds per load run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--senders", type=int, default=15)
    ap.add_argument("--rate", type=int, default=100, help="lines per second per sender")
    ap.add_argument("--idle-clients", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="1 round of 4 s (a smoke run)")
    ap.add_argument("--only", help="comma-separated server names (e.g. proact_server/epoll,libevent_chat)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-idle", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 4

    build_load()
    notes = []
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
    log("st_proactor chat benchmark: %d clients, %d senders x %d lines/s, %d s measured after %d s"
        " warm-up, %d idle clients, %d round(s), %d server(s); logs in %s"
        % (args.clients, args.senders, args.rate, args.duration, args.warmup, args.idle_clients,
           args.rounds, len(servers), LOG_DIR))
    for n in notes:
        log("note: " + n)

    results = []
    started = time.monotonic()
    for rnd in range(args.rounds):
        # Round-robin, and rotate the order each round so no server always comes first.
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)] if servers else []
        for s in order:
            if s.skip_reason:
                continue
            tag = "r%d" % (rnd + 1)
            r = run_load(s, args, tag)
            if s.ours and s.backend == "uring" and "error" in r and r["error"].startswith("start:") \
                    and "expected" not in r and rnd == 0:
                s.skip_reason = "io_uring unavailable: " + r["error"]
                log("%-22s %s: SKIPPED (%s)" % (s.name, tag, s.skip_reason))
                continue
            results.append(r)
            if "expected" in r:
                log("%-22s %s load: %.2f us CPU/delivery (%.0f%% CPU), p50 %d us, p99 %d us, "
                    "delivered %d/%d, lost %d, out-of-order %d, RSS %.1f MiB%s"
                    % (s.name, tag, r.get("cpu_us_per_delivery", float("nan")), r.get("cpu_pct", float("nan")),
                       r["p50_us"], r["p99_us"], r["delivered"], r["expected"], r["lost"], r["out_of_order"],
                       r.get("rss_kib", 0) / 1024, "  ** " + r["crashed"] if "crashed" in r else ""))
            else:
                log("%-22s %s load: FAILED: %s" % (s.name, tag, r.get("error")))
            if not args.no_idle:
                r = run_idle(s, args, tag)
                results.append(r)
                if "bytes_per_idle_client" in r:
                    log("%-22s %s idle: %.0f bytes/idle client (RSS %.1f -> %.1f MiB)"
                        % (s.name, tag, r["bytes_per_idle_client"], r["rss0_kib"] / 1024, r["rss1_kib"] / 1024))
                else:
                    log("%-22s %s idle: FAILED: %s" % (s.name, tag, r.get("error") or r.get("crashed")))
    elapsed = time.monotonic() - started

    rows, best_name = summarize(servers, results)
    with open(os.path.join(OUT_DIR, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "summary": rows}, f, indent=1)
    print()
    print_table(rows, best_name)
    for r in rows:
        if r["skip"]:
            print("note: %s skipped: %s" % (r["name"], r["skip"]))
    for r in rows:
        for p in r["problems"]:
            print("problem: %s %s" % (r["name"], p))
    for n in notes:
        print("note: " + n)
    print("total %.0f s" % elapsed)

    failed = []
    for r in rows:
        if not r["ours"] or r["skip"]:
            continue
        if r["rounds"] == 0:
            failed.append("%s: no successful load run" % r["name"])
        if r["lost"]:
            failed.append("%s lost %d lines" % (r["name"], r["lost"]))
        if r["ooo"]:
            failed.append("%s delivered %d lines out of order" % (r["name"], r["ooo"]))
        if r["other"]:
            failed.append("%s: %d duplicated/garbled/echoed lines or dropped clients" % (r["name"], r["other"]))
        failed += ["%s: %s" % (r["name"], p) for p in r["problems"]]
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    print("ok: our servers delivered every line, in order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
