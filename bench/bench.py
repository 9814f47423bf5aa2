#!/usr/bin/env python3
"""Benchmark runner for tunnel and other HTTP CONNECT proxies (loopback only).

Builds the C load generator and target into the work dir, starts the target,
starts every selected proxy on its own loopback port, checks each one for
correctness (sanity phase), then runs every workload interleaved across
proxies (round r runs proxies in an order rotated by r) for --rounds rounds,
and finally the idle-tunnel and stalled-tunnel (slow reader) memory tests, one
freshly started proxy at a time.
For every run it records the load generator's JSON plus the CPU time of the
proxy's processes (/proc/PID/stat utime+stime+cutime+cstime of every process
in the proxy's setsid group and its descendants), of the target, of the load
generator and of the whole machine (so interference from other programs is
visible), and the proxy RSS (VmRSS, summed over its processes).  Prints
markdown tables of medians and ratios and writes <out>.json and <out>.md.

`ours` is this repository's proxy, started with the `twistd` next to the
Python running this script (so `tox -e bench` measures the tox env's
install).  The bench directory itself is only read.  Everything written
(build/, configs/ with filled-in paths, logs/, results/) goes to the work dir:
--workdir, else $BENCH_WORKDIR, else ${TMPDIR:-/tmp}/tunnel-bench.  The
peers' virtualenv (proxy.py) is --peers-venv, else $PEERS_VENV, else
<workdir>/peers-venv; setup-peers.sh creates it.  Built-in proxies whose
program is missing are skipped with a note.

Ports: target 18000; built-in proxies 18011-18032; --extra proxies from 18040.

    tox -e bench                                   # the default, 3 rounds
    tox -e bench -- --quick                        # smoke test (~2 min)
    bench/run_bench.sh --proxies direct,ours,squid --rounds 5

Placeholders usable in --extra commands: {port} {host} {target_port} {bench}
{venv} {logdir} {workdir} {twistd} {python}.  Each proxy runs with bash -c in
its own process group (setsid), cwd <workdir>/logs/cwd-NAME, output in
<workdir>/logs/NAME.log.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# read only: sources, config templates, reference proxies
BENCH = Path(__file__).resolve().parent
# this repository's proxy: the twistd installed next to the running Python
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
# Set by setup_paths() from the command line / environment:
WORK = BUILD = LOGDIR = CONFDIR = VENV = LOADGEN = TARGET = None
HOST = "127.0.0.1"
TARGET_PORT = 18000
EXTRA_PORT_BASE = 18040
CLK = os.sysconf("SC_CLK_TCK")
GIB = float(1 << 30)
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra"]
# loadgen Popen objects still running (killed if we are interrupted)
_LIVE_LOADGENS = set()

# kind: direct (no proxy), relay (fixed-target TCP relay, loadgen --direct at
#       its port; no CONNECT parsing), connect (HTTP CONNECT proxy)
# group: baseline | relay | peer (third-party CONNECT proxies) | ref (the plain
#        Twisted references) | ours (this repository) | candidate (--extra)
# config: template in configs/, filled in and written to <workdir>/configs/
#         ({config} in cmd)
# needs: what must be installed; a proxy whose needs are missing is skipped
#        with a note.  "bin:X" = program X on PATH, "venv:X" = program X in the
#        peers venv, "self:twistd" = twistd next to sys.executable,
#        "flag:--X" = `twistd connect-proxy --help` lists --X (options a later
#        version may add).
OURS = (
    "{twistd} -n --pidfile= connect-proxy --listen tcp:{port}:interface={host}"
    " --allow-port any --allow-to 127.0.0.0/8 --allow-to ::1 --idle-timeout 600"
)
OURS_NOTE = (
    "this repository (twistd connect-proxy), policy opened to loopback and any"
    " port, no line per connection in the twistd log (--no-tunnel-log, as Squid"
    " runs with access_log none and tinyproxy with LogLevel Warning here),"
    " otherwise defaults"
)
BUILTIN = {
    "direct": {
        "kind": "direct",
        "group": "baseline",
        "port": TARGET_PORT,
        "cmd": None,
        "needs": [],
        "note": "no proxy: loadgen talks to the target directly (physical limit)",
    },
    "socat": {
        "kind": "relay",
        "group": "relay",
        "port": 18011,
        "needs": ["bin:socat"],
        "cmd": "socat TCP-LISTEN:{port},bind={host},reuseaddr,fork,backlog=4096"
        " TCP:{host}:{target_port}",
        "note": "fixed-target relay, fork per connection, default 8 KiB buffer",
    },
    "socat-128k": {
        "kind": "relay",
        "group": "relay",
        "port": 18023,
        "needs": ["bin:socat"],
        "cmd": "socat -b 131072"
        " TCP-LISTEN:{port},bind={host},reuseaddr,fork,backlog=4096"
        " TCP:{host}:{target_port}",
        "note": "socat with -b 131072 (tuned buffer)",
    },
    "haproxy": {
        "kind": "relay",
        "group": "relay",
        "port": 18012,
        "needs": ["bin:haproxy"],
        "config": "haproxy.cfg",
        "cmd": "haproxy -db -f {config}",
        "note": "tcp mode, nbthread 1, default 16 KiB buffers, no splice",
    },
    "haproxy-splice": {
        "kind": "relay",
        "group": "relay",
        "port": 18020,
        "needs": ["bin:haproxy"],
        "config": "haproxy-splice.cfg",
        "cmd": "haproxy -db -f {config}",
        "note": "tcp mode, nbthread 1, splice-request+splice-response",
    },
    "tinyproxy": {
        "kind": "connect",
        "group": "peer",
        "port": 18013,
        "needs": ["bin:tinyproxy"],
        "config": "tinyproxy.conf",
        "cmd": "tinyproxy -d -c {config}",
        "note": "thread per client, MaxClients 10000",
    },
    "squid": {
        "kind": "connect",
        "group": "peer",
        "port": 18014,
        "needs": ["bin:squid"],
        "config": "squid.conf",
        "cmd": "squid -N -f {config}",
        "note": "-N single process, memory-only, no access log",
    },
    "squid-logged": {
        "kind": "connect",
        "group": "peer",
        "port": 18017,
        "needs": ["bin:squid"],
        "config": "squid-logged.conf",
        "cmd": "squid -N -f {config}",
        "note": "squid with its access log, as installed (access_log daemon:, the"
        " squid format, written by its log_file_daemon helper)",
    },
    "proxypy": {
        "kind": "connect",
        "group": "peer",
        "port": 18015,
        "needs": ["venv:proxy"],
        "cmd": "{venv}/bin/proxy --hostname {host} --port {port} --log-level WARNING"
        " --open-file-limit 20000 --backlog 4096 --timeout 600"
        " --data-dir {logdir}/proxypy-data",
        "note": "proxy.py default mode: threadless, 2 acceptor + 2 worker processes; "
        "--timeout 600 (the default 10 s drops idle tunnels)",
    },
    "proxypy-1w": {
        "kind": "connect",
        "group": "peer",
        "port": 18016,
        "needs": ["venv:proxy"],
        "cmd": "{venv}/bin/proxy --hostname {host} --port {port} --num-workers 1"
        " --num-acceptors 1 --log-level WARNING --open-file-limit 20000"
        " --backlog 4096 --timeout 600 --data-dir {logdir}/proxypy-data",
        "note": "proxy.py threadless, --num-workers 1 --num-acceptors 1",
    },
    "proxypy-threaded": {
        "kind": "connect",
        "group": "peer",
        "port": 18024,
        "needs": ["venv:proxy"],
        "cmd": "{venv}/bin/proxy --threaded --hostname {host} --port {port}"
        " --num-acceptors 1 --log-level WARNING --open-file-limit 20000"
        " --backlog 4096 --timeout 600 --data-dir {logdir}/proxypy-data",
        "note": "proxy.py --threaded (thread per connection), 1 acceptor",
    },
    "twisted": {
        "kind": "connect",
        "group": "ref",
        "port": 18018,
        "needs": [],
        "cmd": "{python} {bench}/twisted_ref.py --port {port}",
        "note": "twisted_ref.py (a plain-Twisted relay, same Python and Twisted as"
        " ours), epoll reactor, producer/consumer relay",
    },
    "twisted-splice": {
        "kind": "connect",
        "group": "ref",
        "port": 18021,
        "needs": [],
        "cmd": "{python} {bench}/twisted_ref.py --port {port} --splice",
        "note": "twisted_ref.py, epoll reactor, tunnel bytes moved with os.splice "
        "(twisted_splice.py, pooled pipes)",
    },
    "python-floor": {
        "kind": "connect",
        "group": "ref",
        "port": 18019,
        "needs": [],
        "cmd": "{python} {bench}/python_floor.py --port {port}",
        "note": "python_floor.py: a CONNECT relay on bare select.epoll, no framework,"
        " checks, timeouts or logging: the least CPython does per tunnel",
    },
    "python-floor-w2": {
        "kind": "connect",
        "group": "ref",
        "port": 18022,
        "needs": [],
        "cmd": "{python} {bench}/python_floor.py --port {port} --workers 2",
        "note": "python_floor.py --workers 2 (forked after listen, one shared socket)",
    },
    "reactor-floor": {
        "kind": "connect",
        "group": "ref",
        "port": 18029,
        "needs": [],
        "cmd": "{python} {bench}/python_floor.py --port {port} --reactor",
        "note": "python_floor.py --reactor: the same sockets dispatched by Twisted's"
        " epoll reactor, without Twisted's transports or protocols",
    },
    "checks-floor": {
        "kind": "connect",
        "group": "ref",
        "port": 18031,
        "needs": [],
        "cmd": "{python} {bench}/python_floor.py --port {port} --reactor --checks",
        "note": "python_floor.py --reactor --checks: the reactor floor plus tunnel's"
        " own parser, policy and header/connect timers, still without Twisted's"
        " transports: a bound on any hand-written handshake path",
    },
    "checks-floor-w2": {
        "kind": "connect",
        "group": "ref",
        "port": 18032,
        "needs": [],
        "cmd": "{python} {bench}/python_floor.py --port {port} --reactor --checks"
        " --workers 2",
        "note": "python_floor.py --reactor --checks --workers 2",
    },
    "ours": {
        "kind": "connect",
        "group": "ours",
        "port": 18025,
        "needs": ["self:twistd", "flag:--no-tunnel-log"],
        "cmd": OURS + " --no-tunnel-log",
        "note": OURS_NOTE,
    },
    "ours-w2": {
        "kind": "connect",
        "group": "ours",
        "port": 18026,
        "needs": ["self:twistd", "flag:--workers", "flag:--no-tunnel-log"],
        "cmd": OURS + " --no-tunnel-log --workers 2",
        "note": OURS_NOTE + "; --workers 2",
    },
    "ours-nosplice": {
        "kind": "connect",
        "group": "ours",
        "port": 18027,
        "needs": ["self:twistd", "flag:--no-splice", "flag:--no-tunnel-log"],
        "cmd": OURS + " --no-tunnel-log --no-splice",
        "note": OURS_NOTE + "; --no-splice",
    },
    "ours-logged": {
        "kind": "connect",
        "group": "ours",
        "port": 18028,
        "needs": ["self:twistd"],
        "cmd": OURS,
        "note": "this repository as `ours`, but with its default line per"
        " connection in the twistd log (to the bench's log file)",
    },
    "ours-access": {
        "kind": "connect",
        "group": "ours",
        "port": 18030,
        "needs": ["self:twistd", "flag:--access-log", "flag:--no-tunnel-log"],
        "cmd": OURS + " --no-tunnel-log --access-log {logdir}/access-ours.log",
        "note": "this repository as `ours`, with a line per connection in an"
        " access log file (--access-log) instead of the twistd log",
    },
}
DEFAULT_PROXIES = ["direct", "ours", "squid", "tinyproxy", "proxypy", "twisted"]
# measured against everything else in the ratio tables (--subject)
DEFAULT_SUBJECT = "ours"

STEADY_WORKLOADS = ["down", "up", "k8", "both", "latency", "handshake"]
DEFAULT_WORKLOADS = ["down", "up", "k8", "latency", "handshake", "idle", "stall"]
# Each run on a freshly started proxy, after the steady workloads.
FRESH_WORKLOADS = ["idle", "stall"]
KIND_WORKLOADS = {
    "direct": {"down", "up", "k8", "both", "latency", "handshake"},
    "relay": {"down", "up", "k8", "both", "latency", "stall"},
    "connect": {"down", "up", "k8", "both", "latency", "handshake", "idle", "stall"},
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------- work dir, build, configs
def default_workdir():
    return Path(
        os.environ.get("BENCH_WORKDIR")
        or Path(os.environ.get("TMPDIR") or "/tmp") / "tunnel-bench"
    )


def setup_paths(workdir, peers_venv):
    """Point the module-level paths at the (writable) work dir."""
    global WORK, BUILD, LOGDIR, CONFDIR, VENV, LOADGEN, TARGET
    WORK = Path(workdir).absolute()
    BUILD = WORK / "build"
    LOGDIR = WORK / "logs"
    CONFDIR = WORK / "configs"
    LOADGEN = BUILD / "loadgen"
    TARGET = BUILD / "target"
    VENV = Path(
        peers_venv or os.environ.get("PEERS_VENV") or WORK / "peers-venv"
    ).absolute()


def build_tools():
    """Compile loadgen and target into <workdir>/build unless an up-to-date
    build is there."""
    sources = ["common.h", "loadgen.c", "target.c"]
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for name in sources:
        h.update((BENCH / name).read_bytes())
    stamp = BUILD / ".stamp"
    digest = h.hexdigest()
    if (
        LOADGEN.exists()
        and TARGET.exists()
        and stamp.exists()
        and stamp.read_text().strip() == digest
    ):
        return
    if shutil.which("gcc") is None:
        sys.exit(
            "gcc not found: it is needed to build the load generator and the target"
        )
    BUILD.mkdir(parents=True, exist_ok=True)
    for out, src, libs in ((LOADGEN, "loadgen.c", ["-lm"]), (TARGET, "target.c", [])):
        tmp = out.with_name(out.name + ".tmp")
        r = subprocess.run(
            ["gcc", *CFLAGS, "-o", str(tmp), str(BENCH / src), *libs],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            sys.exit(f"building {src} failed:\n{r.stderr}")
        os.replace(tmp, out)
    stamp.write_text(digest + "\n")
    log(f"built {LOADGEN} and {TARGET}")


def fill(template, **values):
    """Replace {name} for the known names only (configs may contain other braces)."""
    return re.sub(
        r"\{(\w+)\}",
        lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
        template,
    )


def render_config(name, port):
    """Fill in configs/<name> for a proxy on `port`; return the path of the
    filled-in copy."""
    CONFDIR.mkdir(parents=True, exist_ok=True)
    text = fill(
        (BENCH / "configs" / name).read_text(),
        host=HOST,
        port=port,
        target_port=TARGET_PORT,
        logdir=LOGDIR,
        workdir=WORK,
    )
    out = CONFDIR / name
    out.write_text(text)
    return out


_OURS_HELP = []


def ours_help():
    """`twistd connect-proxy --help` of the twistd under test ("" if it fails)."""
    if not _OURS_HELP:
        try:
            r = subprocess.run(
                [TWISTD, "connect-proxy", "--help"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            _OURS_HELP.append(r.stdout if r.returncode == 0 else "")
        except (OSError, subprocess.TimeoutExpired):
            _OURS_HELP.append("")
    return _OURS_HELP[0]


def missing_needs(needs):
    """None if everything in `needs` is installed, else a short reason."""
    for need in needs:
        kind, _, what = need.partition(":")
        if kind == "bin" and shutil.which(what) is None:
            return f"`{what}` not installed"
        if kind == "venv" and not os.access(VENV / "bin" / what, os.X_OK):
            return f"{VENV}/bin/{what} missing"
        if kind == "self" and not os.access(TWISTD, os.X_OK):
            return (
                f"{TWISTD} missing: run the bench with the Python of an env that"
                " has this project installed (tox -e bench)"
            )
        if kind == "self" and not ours_help():
            return f"{TWISTD} connect-proxy --help failed"
        if kind == "flag" and not re.search(
            re.escape(what) + r"(?![\w-])", ours_help()
        ):
            return f"`twistd connect-proxy --help` does not list {what} (not yet built)"
    return None


# ---------------------------------------------------------------- /proc readers
def read_procs():
    """pid -> (ppid, sid, cpu_ticks incl. reaped children, state, starttime,
    user-mode share of cpu_ticks)"""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2 :].split()
        out[int(d)] = (
            int(rest[1]),
            int(rest[3]),
            sum(int(x) for x in rest[11:15]),
            rest[0],
            int(rest[19]),
            int(rest[11]) + int(rest[13]),
        )
    return out


def tree_pids(root, procs):
    """Processes whose sid is root (its setsid group), plus all descendants of root."""
    pids = {p for p, v in procs.items() if v[1] == root}
    if root in procs:
        pids.add(root)
    changed = True
    while changed:
        changed = False
        for p, v in procs.items():
            if v[0] in pids and p not in pids:
                pids.add(p)
                changed = True
    return pids


def cpu_seconds(root):
    return cpu_split(root)[0]


def cpu_split(root):
    """(CPU seconds, of which in user mode) of root's tree."""
    if root is None:
        return 0.0, 0.0
    procs = read_procs()
    tree = tree_pids(root, procs)
    return (
        sum(procs[p][2] for p in tree) / CLK,
        sum(procs[p][5] for p in tree) / CLK,
    )


def settle_tree(root, timeout=1.0):
    """Wait (bounded) until no process in root's tree is a zombie: a zombie's
    /proc stat reads 0 CPU until its parent reaps it (socat forks per connection)."""
    if root is None:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        procs = read_procs()
        if not any(
            procs[p][3] == "Z"
            for p in tree_pids(root, procs)
            if p != root and p in procs
        ):
            return
        time.sleep(0.01)


def rss_kib(root):
    if root is None:
        return 0
    procs = read_procs()
    total = 0
    for p in tree_pids(root, procs):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def nprocs_threads(root):
    procs = read_procs()
    pids = tree_pids(root, procs)
    threads = 0
    for p in pids:
        with contextlib.suppress(OSError):
            threads += len(os.listdir(f"/proc/{p}/task"))
    return len(pids), threads


def system_busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK


def port_open(port, host=HOST):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- processes
class Proc:
    def __init__(
        self, name, cmd, port, kind="connect", group="candidate", note="", config=None
    ):
        self.name, self.cmd, self.port, self.kind, self.group, self.note = (
            name,
            cmd,
            port,
            kind,
            group,
            note,
        )
        self.config = config  # filled-in config file (Path) or None
        self.popen = None
        self.starts = 0
        self.deaths = 0

    @property
    def pid(self):
        return self.popen.pid if self.popen else None

    def command(self):
        return fill(
            self.cmd,
            port=self.port,
            host=HOST,
            target_port=TARGET_PORT,
            bench=BENCH,
            venv=VENV,
            logdir=LOGDIR,
            workdir=WORK,
            config=self.config or "",
            twistd=shlex.quote(TWISTD),
            python=shlex.quote(sys.executable),
        )

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def start(self, ready_timeout=30.0):
        if self.cmd is None:
            return True
        if port_open(self.port):
            raise RuntimeError(
                f"{self.name}: port {self.port} already in use by someone else"
            )
        # stray files (twistd.pid, cores) land in the working directory
        workdir = LOGDIR / f"cwd-{self.name}"
        workdir.mkdir(exist_ok=True)
        with open(LOGDIR / f"{self.name}.log", "ab") as logf:
            logf.write(f"\n===== {time.ctime()} start: {self.command()}\n".encode())
            logf.flush()
            self.popen = subprocess.Popen(
                ["/bin/bash", "-c", self.command()],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=workdir,
            )
        self.starts += 1
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name}: exited during start (rc={self.popen.returncode}); "
                    f"see {LOGDIR}/{self.name}.log"
                )
            if port_open(self.port):
                time.sleep(0.5)  # let multi-process servers finish spawning
                return True
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.name}: port {self.port} not accepting after {ready_timeout}s"
        )

    def stop(self):
        """SIGTERM, then SIGKILL, our own process group and any descendants that
        left it.  Only processes started by us are signalled: identity = (pid,
        start time)."""
        if self.popen is None:
            return
        root = self.popen.pid
        procs = read_procs()
        members = {p: procs[p][4] for p in tree_pids(root, procs)}

        def remaining():
            now = read_procs()
            return [
                p
                for p, st in members.items()
                if p in now and now[p][4] == st and now[p][3] != "Z"
            ]

        for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 4.0)):
            for p in remaining():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end:
                self.popen.poll()
                if not remaining():
                    break
                time.sleep(0.1)
            if not remaining():
                break
        try:
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            log(f"!! {self.name}: pid {root} did not exit")
        self.popen = None
        end = time.monotonic() + 5
        while self.cmd and port_open(self.port) and time.monotonic() < end:
            time.sleep(0.1)


# ---------------------------------------------------------------- loadgen
def run_limit(cfg, default):
    """loadgen --timeout for a throughput or latency run: the default, or
    --run-timeout if smaller."""
    limit = getattr(cfg, "run_timeout", None)
    return str(int(min(default, limit))) if limit else str(default)


def loadgen_args(proc, workload, cfg, extra=()):
    if proc.kind == "connect":
        target = getattr(cfg, "target_host", None) or HOST
        dest = [
            "--connect",
            f"{HOST}:{proc.port}",
            "--target",
            f"{target}:{TARGET_PORT}",
        ]
    else:
        dest = ["--connect", f"{HOST}:{proc.port}", "--direct"]
    if workload in ("down", "up", "both"):
        w = [
            "--mode",
            "throughput",
            "--dir",
            workload,
            "--bytes",
            cfg.bytes,
            "--tunnels",
            "1",
            "--timeout",
            run_limit(cfg, 180),
        ]
    elif workload == "k8":
        w = [
            "--mode",
            "throughput",
            "--dir",
            "down",
            "--bytes",
            cfg.k8_bytes,
            "--tunnels",
            str(cfg.k8_tunnels),
            "--timeout",
            run_limit(cfg, 180),
        ]
    elif workload == "latency":
        w = [
            "--mode",
            "latency",
            "--n",
            str(cfg.lat_n),
            "--msg-size",
            "64",
            "--timeout",
            run_limit(cfg, 120),
        ]
    elif workload == "handshake":
        w = [
            "--mode",
            "handshake",
            "--conc",
            str(cfg.hs_conc),
            "--secs",
            str(cfg.hs_secs),
            "--timeout",
            str(cfg.hs_secs + 30),
        ]
    elif workload == "stall":
        w = [
            "--mode",
            "stall",
            "--n",
            str(cfg.stall_n),
            "--hold",
            str(cfg.stall_hold),
            "--bytes",
            str(cfg.stall_bytes),
            "--timeout",
            "150",
        ]
    elif workload == "idle":
        w = [
            "--mode",
            "idle",
            "--n",
            str(cfg.idle_n),
            "--hold",
            str(cfg.idle_hold),
            "--conc",
            str(cfg.idle_conc),
            "--timeout",
            "150",
        ]
    else:
        raise ValueError(workload)
    return [str(LOADGEN), *w, *dest, "--label", f"{proc.name}:{workload}", *list(extra)]


def run_loadgen(argv, timeout, on_ready=None):
    """Run loadgen; returns (json or None, stderr tail, rc)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _LIVE_LOADGENS.add(p)
    try:
        return _collect_loadgen(p, timeout, on_ready)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
        _LIVE_LOADGENS.discard(p)


def _collect_loadgen(p, timeout, on_ready):
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, "out")
    sel.register(p.stderr, selectors.EVENT_READ, "err")
    out_lines, err, bufs = [], [], {"out": "", "err": ""}
    deadline = time.monotonic() + timeout
    open_streams = 2
    while open_streams and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            chunk = os.read(key.fileobj.fileno(), 65536).decode(errors="replace")
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.data == "err":
                err.append(chunk)
                continue
            bufs["out"] += chunk
            while "\n" in bufs["out"]:
                line, bufs["out"] = bufs["out"].split("\n", 1)
                out_lines.append(line)
                if line.startswith("READY") and on_ready:
                    on_ready(line)
    sel.close()
    try:
        p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        err.append(f"\n[runner] loadgen killed after {timeout}s")
    p.wait()
    res = None
    for line in reversed(out_lines):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                res = json.loads(line)
            break
    return res, "".join(err)[-2000:], p.returncode


def measured_run(
    proc, target, workload, cfg, rnd, extra=(), on_ready=None, timeout=None
):
    argv = loadgen_args(proc, workload, cfg, extra)
    if timeout is None:
        timeout = cfg.hs_secs + 60 if workload == "handshake" else 240
        if workload in ("down", "up", "both", "k8", "latency") and getattr(
            cfg, "run_timeout", None
        ):
            timeout = min(timeout, cfg.run_timeout + 30)
    rec = {
        "proxy": proc.name,
        "workload": workload,
        "round": rnd,
        "argv": argv[1:],
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    proxy_pid = proc.pid if proc.cmd else None
    if proxy_pid is not None and not proc.alive():
        rec.update(ok=False, error="proxy not running")
        return rec
    rec["proxy_rss_kib_before"] = rss_kib(proxy_pid)
    settle_tree(proxy_pid)
    (c_p0, u_p0), c_t0, sys0 = (
        cpu_split(proxy_pid),
        cpu_seconds(target.pid),
        system_busy_seconds(),
    )
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res, err, rc = run_loadgen(argv, timeout, on_ready)
    wall = time.monotonic() - t0
    settle_tree(proxy_pid)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    (c_p1, u_p1), c_t1, sys1 = (
        cpu_split(proxy_pid),
        cpu_seconds(target.pid),
        system_busy_seconds(),
    )
    lg_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rec.update(
        wall_s=round(wall, 4),
        rc=rc,
        loadgen=res,
        proxy_cpu_s=round(c_p1 - c_p0, 3),
        proxy_user_cpu_s=round(u_p1 - u_p0, 3),
        target_cpu_s=round(c_t1 - c_t0, 3),
        loadgen_cpu_s=round(lg_cpu, 3),
        system_busy_cpu_s=round(sys1 - sys0, 3),
        proxy_rss_kib_after=rss_kib(proxy_pid),
    )
    rec["other_cpu_s"] = round(
        rec["system_busy_cpu_s"]
        - rec["proxy_cpu_s"]
        - rec["target_cpu_s"]
        - rec["loadgen_cpu_s"],
        3,
    )
    rec["ok"] = bool(res and res.get("ok")) and (proxy_pid is None or proc.alive())
    if not rec["ok"]:
        rec["error"] = (err.strip() or f"rc={rc}")[-500:]
        if proxy_pid is not None and not proc.alive():
            rec["error"] += " | proxy died"
    return rec


def summarize_run(rec):
    """One-line human summary of a run."""
    r = rec.get("loadgen") or {}
    w = rec["workload"]
    if not rec.get("ok"):
        extra = ""
        if r:
            extra = f" errors={ {k: v for k, v in r.get('errors', {}).items() if v} }"
        return f"FAILED{extra} {rec.get('error', '')[:200]}"
    if w in ("down", "up", "k8", "both"):
        return (
            f"{r['MBps']:.0f} MB/s  proxy {rec['proxy_cpu_s']:.2f} cpu-s"
            f"  other {rec['other_cpu_s']:.2f}"
        )
    if w == "latency":
        return (
            f"p50 {r['p50_us']:.0f} us  p99 {r['p99_us']:.0f} us"
            f"  p99.9 {r['p999_us']:.0f} us"
        )
    if w == "handshake":
        return (
            f"{r['rate_per_s']:.0f}/s  p50 {r['p50_us'] / 1000:.2f} ms"
            f"  p99 {r['p99_us'] / 1000:.2f} ms"
            f"  proxy {rec['proxy_cpu_s']:.2f} cpu-s"
        )
    if w == "idle":
        return (
            f"{r['established']}/{r['requested']} up, {r['alive_after_hold']} alive; "
            f"{rec.get('idle_kib_per_tunnel', float('nan')):.2f} KiB/tunnel"
        )
    if w == "stall":
        return (
            f"{r['established']}/{r['requested']} up, {r['alive_after_hold']} alive; "
            f"{rec.get('stall_kib_per_tunnel', float('nan')):.1f} KiB/tunnel RSS, "
            f"{rec.get('stall_tcp_kib_per_tunnel', float('nan')):.0f} KiB/tunnel TCP"
        )
    return "ok"


# ---------------------------------------------------------------- metrics
def metric_values(runs):
    """Per-run metric dicts for one (proxy, workload)."""
    vals = []
    for rec in runs:
        if not rec.get("ok"):
            continue
        r = rec["loadgen"]
        w = rec["workload"]
        m = {}
        if w in ("down", "up", "k8", "both"):
            gib = r["total_bytes"] / GIB
            m["MBps"] = r["MBps"]
            m["cpu_s_per_gib"] = rec["proxy_cpu_s"] / gib if gib else None
            m["proxy_cores"] = (
                rec["proxy_cpu_s"] / r["elapsed_s"] if r["elapsed_s"] else None
            )
            m["MB_per_cpu_s"] = (
                (r["total_bytes"] / 1e6 / rec["proxy_cpu_s"])
                if rec["proxy_cpu_s"] > 0
                else None
            )
        elif w == "handshake":
            m["rate"] = r["rate_per_s"]
            m["p50_ms"] = r["p50_us"] / 1000
            m["p99_ms"] = r["p99_us"] / 1000
            m["cpu_s_per_1k"] = (
                rec["proxy_cpu_s"] / (r["completed"] / 1000) if r["completed"] else None
            )
            m["proxy_cores"] = rec["proxy_cpu_s"] / r["secs"] if r["secs"] else None
            if r["completed"] and "proxy_user_cpu_s" in rec:
                # In microseconds per handshake: what the proxy spends in
                # its own code (user) and in the kernel on its behalf.
                m["user_us"] = rec["proxy_user_cpu_s"] / r["completed"] * 1e6
                m["sys_us"] = (
                    (rec["proxy_cpu_s"] - rec["proxy_user_cpu_s"])
                    / r["completed"]
                    * 1e6
                )
            m["errors"] = sum(r["errors"].values())
        elif w == "latency":
            m["p50_us"], m["p99_us"], m["p999_us"] = (
                r["p50_us"],
                r["p99_us"],
                r["p999_us"],
            )
            m["cpu_s_per_1k"] = rec["proxy_cpu_s"] / (r["n"] / 1000) if r["n"] else None
        elif w == "idle":
            m["kib_per_tunnel"] = rec.get("idle_kib_per_tunnel")
            m["established"] = r["established"]
            m["alive"] = r["alive_after_hold"]
            m["rss_mib_held"] = rec.get("idle_rss_kib_held", 0) / 1024
            m["establish_s"] = r["establish_s"]
        elif w == "stall":
            m["kib_per_stalled"] = rec.get("stall_kib_per_tunnel")
            m["tcp_kib_per_stalled"] = rec.get("stall_tcp_kib_per_tunnel")
            m["stall_cores"] = rec.get("stall_proxy_cores")
            m["established"] = r["established"]
            m["alive"] = r["alive_after_hold"]
        m["other_cores"] = rec["other_cpu_s"] / rec["wall_s"] if rec["wall_s"] else None
        # the load generator's own CPU (its getrusage) per wall second: near 1.0
        # means it was the busy party, far below means it was waiting
        lg_cpu = r.get("cpu_user_s", 0) + r.get("cpu_sys_s", 0)
        m["loadgen_cores"] = lg_cpu / rec["wall_s"] if rec["wall_s"] else None
        m["target_cores"] = (
            rec["target_cpu_s"] / rec["wall_s"] if rec["wall_s"] else None
        )
        m["run_proxy_cores"] = (
            rec["proxy_cpu_s"] / rec["wall_s"] if rec["wall_s"] else None
        )
        m["target_cpu_s"] = rec["target_cpu_s"]
        vals.append(m)
    return vals


def med(vals, key):
    xs = [v[key] for v in vals if v.get(key) is not None]
    return statistics.median(xs) if xs else None


def spread(vals, key):
    xs = [v[key] for v in vals if v.get(key) is not None]
    return (min(xs), max(xs)) if xs else None


COLS = [  # (header, workload, key, fmt, higher_is_better)
    ("down MB/s", "down", "MBps", "{:.0f}", True),
    ("up MB/s", "up", "MBps", "{:.0f}", True),
    ("K8 MB/s", "k8", "MBps", "{:.0f}", True),
    ("both MB/s", "both", "MBps", "{:.0f}", True),
    ("hs/s", "handshake", "rate", "{:.0f}", True),
    ("hs p50 ms", "handshake", "p50_ms", "{:.2f}", False),
    ("hs p99 ms", "handshake", "p99_ms", "{:.2f}", False),
    ("lat p50 µs", "latency", "p50_us", "{:.0f}", False),
    ("lat p99 µs", "latency", "p99_us", "{:.0f}", False),
    ("lat p99.9 µs", "latency", "p999_us", "{:.0f}", False),
    ("idle KiB/tunnel", "idle", "kib_per_tunnel", "{:.2f}", False),
    ("stalled KiB/tunnel", "stall", "kib_per_stalled", "{:.1f}", False),
    ("CPU-s/GiB down", "down", "cpu_s_per_gib", "{:.2f}", False),
    ("CPU-s/GiB up", "up", "cpu_s_per_gib", "{:.2f}", False),
    ("CPU-s/GiB K8", "k8", "cpu_s_per_gib", "{:.2f}", False),
    ("CPU-s/1k hs", "handshake", "cpu_s_per_1k", "{:.3f}", False),
]
RATIO_COLS = [
    "down MB/s",
    "up MB/s",
    "K8 MB/s",
    "hs/s",
    "hs p99 ms",
    "lat p50 µs",
    "lat p99 µs",
    "idle KiB/tunnel",
    "stalled KiB/tunnel",
    "CPU-s/GiB down",
    "CPU-s/1k hs",
]


def build_summary(procs, runs, workloads, baseline):
    summary = {}
    for p in procs:
        summary[p.name] = {}
        for w in workloads:
            rs = [r for r in runs if r["proxy"] == p.name and r["workload"] == w]
            if not rs:
                continue
            vals = metric_values(rs)
            keys = sorted({k for v in vals for k in v})
            summary[p.name][w] = {
                "runs": len(rs),
                "ok_runs": len(vals),
                "median": {k: med(vals, k) for k in keys},
                "range": {k: spread(vals, k) for k in keys},
            }
    return summary


def user_sys(summary, name):
    """The handshake's CPU per handshake in user and in system mode."""
    user = cell(summary, name, "handshake", "user_us")
    system = cell(summary, name, "handshake", "sys_us")
    if user is None or system is None:
        return "-"
    return f"{user:.0f} / {system:.0f}"


def cell(summary, name, w, key):
    s = summary.get(name, {}).get(w)
    if not s:
        return None
    return s["median"].get(key)


def fmt(v, f):
    if v is None:
        return "-"
    return f.format(v)


def per_round(runs, name, w):
    """round -> metric dict of the successful run of (proxy, workload) in it."""
    out = {}
    for rec in runs:
        if rec["proxy"] == name and rec["workload"] == w:
            vals = metric_values([rec])
            if vals:
                out[rec["round"]] = vals[0]
    return out


def subject_section(procs, runs, active, subject):
    """The subject (ours) divided by every other proxy, round by round."""
    names = [p.name for p in procs]
    if subject not in names:
        return []
    others = [p.name for p in procs if p.name != subject and p.kind == "connect"]
    if not others:
        return []
    L = [
        f"## `{subject}` vs each other proxy (median of per-round ratios)",
        "",
        f"Each cell: the median over rounds of ({subject} in round r) / (other in"
        " round r), both measured within minutes of each other. Throughput and"
        f" hs/s: above 1.00x `{subject}` is faster. Latency, KiB/tunnel, CPU-s:"
        f" below 1.00x `{subject}` is cheaper. `n` = rounds with both runs ok.",
        "",
        "| vs | " + " | ".join(c[0] for c in active) + " |",
        "|---|" + "---|" * len(active),
    ]
    for other in others:
        row = [other]
        for _hdr, w, key, _f, _hib in active:
            a, b = per_round(runs, subject, w), per_round(runs, other, w)
            ratios = [
                a[r][key] / b[r][key]
                for r in sorted(set(a) & set(b))
                if a[r].get(key) is not None and b[r].get(key)
            ]
            row.append(
                f"{statistics.median(ratios):.2f}x (n={len(ratios)})" if ratios else "-"
            )
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    return L


def headroom_section(procs, summary, workloads, baseline):
    """Is the load generator the limit?  Compare the no-proxy run with the
    fastest proxy, and show how busy the load generator itself was."""
    if baseline not in summary:
        return []
    connect = [p.name for p in procs if p.kind == "connect"]
    rows = [
        ("down MB/s", "down", "MBps", "{:.0f}"),
        ("up MB/s", "up", "MBps", "{:.0f}"),
        ("K8 MB/s", "k8", "MBps", "{:.0f}"),
        ("both MB/s", "both", "MBps", "{:.0f}"),
        ("hs/s", "handshake", "rate", "{:.0f}"),
    ]
    L = [
        f"## Load generator headroom (`{baseline}` vs the fastest CONNECT proxy)",
        "",
        f"`{baseline}` = the same load generator and target with no proxy. If it"
        " runs several times faster than the fastest proxy, the proxy, not the"
        " load generator, limits the proxy rows. loadgen cores = the load"
        " generator's own CPU-s per wall-s (median); well below 1.00 in the proxy"
        " runs, while the proxy uses about a core, means it was waiting for the"
        " proxy.",
        "",
        f"| workload | {baseline} | fastest proxy | {baseline} / fastest |"
        f" loadgen cores ({baseline}) | loadgen cores (fastest proxy) |"
        " proxy cores (fastest proxy) |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for hdr, w, key, f in rows:
        if w not in workloads:
            continue
        b = cell(summary, baseline, w, key)
        vals = [(cell(summary, n, w, key), n) for n in connect]
        vals = [v for v in vals if v[0] is not None]
        if b is None or not vals:
            continue
        best, best_name = max(vals)
        ratios.append((b / best, hdr))
        L.append(
            "| "
            + " | ".join(
                [
                    hdr,
                    f.format(b),
                    f"{best_name} {f.format(best)}",
                    f"{b / best:.2f}x",
                    fmt(cell(summary, baseline, w, "loadgen_cores"), "{:.2f}"),
                    fmt(cell(summary, best_name, w, "loadgen_cores"), "{:.2f}"),
                    fmt(cell(summary, best_name, w, "proxy_cores"), "{:.2f}"),
                ]
            )
            + " |"
        )
    L.append("")
    if ratios:
        lo, hdr = min(ratios)
        L.append(
            f"Smallest margin: {hdr}, where `{baseline}` is {lo:.2f}x the fastest"
            " proxy."
        )
        L.append("")
    busy = [
        ("down", "down"),
        ("up", "up"),
        ("K8", "k8"),
        ("handshake", "handshake"),
        ("latency", "latency"),
    ]
    busy = [(h, w) for h, w in busy if w in workloads]
    L.append(
        "Who was busy: median cores used by proxy / load generator / target"
        " over each run's wall time (2 = both cores). A proxy near 1.00 with a"
        " single-threaded design, while load generator and target stay low, is"
        " the limit of its row."
    )
    L.append("")
    L.append("| proxy | " + " | ".join(h for h, _ in busy) + " |")
    L.append("|---|" + "---|" * len(busy))
    for p in procs:
        row = [p.name]
        for _h, w in busy:
            if w not in summary.get(p.name, {}):
                row.append("-")
                continue
            row.append(
                " / ".join(
                    fmt(cell(summary, p.name, w, k), "{:.2f}")
                    for k in ("run_proxy_cores", "loadgen_cores", "target_cores")
                )
            )
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    return L


def render_markdown(procs, summary, cfg, meta, sanity, runs, workloads):
    baseline = cfg.baseline
    active = [c for c in COLS if c[1] in workloads]
    L = []
    L.append(f"# CONNECT proxy benchmark — {meta['started']}")
    L.append("")
    L.append(
        f"Host: {meta['cpus']} CPUs, kernel {meta['kernel']},"
        f" Python {meta['python']}. Rounds: {cfg.rounds} (interleaved, proxy"
        " order rotated each round); values are **medians**."
    )
    L.append(
        f"Sizes: down/up {cfg.bytes} per run (1 tunnel),"
        f" K8 = {cfg.k8_tunnels} x {cfg.k8_bytes} down,"
        f" handshake C={cfg.hs_conc} for {cfg.hs_secs}s,"
        f" latency N={cfg.lat_n} x 64 B, idle N={cfg.idle_n}"
        f" held {cfg.idle_hold}s (in-flight {cfg.idle_conc})"
        + (
            # Results from before the stall test have no stall settings.
            f", stall N={cfg.stall_n} x {cfg.stall_bytes} held {cfg.stall_hold}s."
            if "stall" in workloads
            else "."
        )
        + (
            f" CONNECT target: **{cfg.target_host}**:{TARGET_PORT}, a name each"
            " proxy resolves (from /etc/hosts)."
            if getattr(cfg, "target_host", None)
            else ""
        )
    )
    L.append(
        "MB = 10^6 bytes. CPU-s = CPU seconds of the proxy's processes (all"
        " threads/children). '-' = not applicable / not run. Only loopback"
        " (127.0.0.1, ::1) is used."
    )
    L.append("")
    L.append("Command: `" + meta["command"] + "`")
    L.append("")
    if meta.get("checkout"):
        L.append(f"Checkout: {meta['checkout']}.")
        L.append("")
    timed = [r for r in runs if r.get("wall_s")]
    if timed:
        wall = sum(r["wall_s"] for r in timed)
        long = [r["other_cpu_s"] / r["wall_s"] for r in timed if r["wall_s"] >= 1]
        L.append(
            "Interference (CPU used by other programs on the machine during the"
            f" runs): {sum(r['other_cpu_s'] for r in timed) / wall:.2f} cores on"
            " average, max other cores "
            + (f"{max(long):.2f}" if long else "-")
            + " in one run of at least 1 s."
        )
        L.append("")
    L.append(
        f"Load average at start: {meta.get('loadavg_start', '?')};"
        f" at end: {meta.get('loadavg_end', '?')};"
        f" elapsed {meta.get('elapsed_min', '?')} min."
    )
    L.append("")
    L.append("## Results (medians)")
    L.append("")
    L.append("| proxy | kind | " + " | ".join(c[0] for c in active) + " |")
    L.append("|---|---|" + "---|" * len(active))
    for p in procs:
        row = [p.name, p.kind]
        for _hdr, w, key, f, _hib in active:
            row.append(fmt(cell(summary, p.name, w, key), f))
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.extend(subject_section(procs, runs, active, getattr(cfg, "subject", None)))
    L.extend(headroom_section(procs, summary, workloads, baseline))

    # ratios
    rcols = [c for c in active if c[0] in RATIO_COLS]
    peers = [p.name for p in procs if p.group == "peer"]

    def best_peer(w, key, hib):
        vals = [(cell(summary, n, w, key), n) for n in peers]
        vals = [v for v in vals if v[0] is not None]
        if not vals:
            return None, None
        return (max if hib else min)(vals)

    if baseline in summary:
        L.append(f"## Ratio vs `{baseline}` (value / {baseline})")
        L.append("")
        L.append(
            "Throughput & hs/s: higher is better (1.00 = as fast as no proxy)."
            " Latency: lower is better."
        )
        L.append("")
        bcols = [
            c
            for c in rcols
            if cell(summary, baseline, c[1], c[2])
            and not c[0].startswith(("CPU", "idle", "stalled"))
        ]
        L.append("| proxy | " + " | ".join(c[0] for c in bcols) + " |")
        L.append("|---|" + "---|" * len(bcols))
        for p in procs:
            row = [p.name]
            for _hdr, w, key, _f, _hib in bcols:
                v, b = cell(summary, p.name, w, key), cell(summary, baseline, w, key)
                row.append(f"{v / b:.2f}x" if v is not None and b else "-")
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    if peers:
        L.append(
            "## Ratio vs the best third-party CONNECT peer"
            " (value / best peer for that column)"
        )
        L.append("")
        L.append(
            "Peers considered: "
            + ", ".join(peers)
            + ". Best peer per column: "
            + "; ".join(
                f"{c[0]} = {best_peer(c[1], c[2], c[4])[1]}"
                f" ({fmt(best_peer(c[1], c[2], c[4])[0], c[3])})"
                for c in rcols
                if best_peer(c[1], c[2], c[4])[0] is not None
            )
            + "."
        )
        L.append(
            "For throughput/hs/s > 1.00 beats the best peer;"
            " for latency/KiB/CPU < 1.00 beats it."
        )
        L.append("")
        L.append("| proxy | " + " | ".join(c[0] for c in rcols) + " |")
        L.append("|---|" + "---|" * len(rcols))
        for p in procs:
            if p.kind != "connect":
                continue
            row = [p.name]
            for _hdr, w, key, _f, hib in rcols:
                v, (b, _bn) = cell(summary, p.name, w, key), best_peer(w, key, hib)
                row.append(f"{v / b:.2f}x" if v is not None and b else "-")
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    # efficiency
    L.append("## CPU use (medians)")
    L.append("")
    L.append(
        "proxy cores = proxy CPU-s / wall-s during the run (2.0 = both cores)."
        " hs user / sys µs = the proxy's CPU time per handshake in its own"
        " code (user mode) / in the kernel on its behalf (system mode)."
        " MB/CPU-s = work per proxy CPU-second (fairer than raw speed on a 2-core"
        " box where loadgen+target need CPU too). other = CPU used on the machine"
        " by everything except proxy, target and loadgen (other tenants, also in"
        " other containers) — large values mean a noisy run. `other cores` ="
        " its total over all this proxy's runs / their total wall time; `max"
        " other cores` = the largest in one run of at least 1 s (shorter runs are"
        " below the 10 ms accounting tick)."
    )
    L.append("")
    L.append(
        "| proxy | down MB/CPU-s | down proxy cores | up MB/CPU-s | K8 MB/CPU-s"
        " | K8 proxy cores | hs proxy cores | hs user / sys µs | lat CPU-s/1k msgs"
        " | other cores | max other cores |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in procs:
        mine = [r for r in runs if r["proxy"] == p.name and r.get("wall_s")]
        others = [r["other_cpu_s"] / r["wall_s"] for r in mine if r["wall_s"] >= 1]
        wall = sum(r["wall_s"] for r in mine)
        other_avg = sum(r["other_cpu_s"] for r in mine) / wall if wall else None
        L.append(
            "| "
            + " | ".join(
                [
                    p.name,
                    fmt(cell(summary, p.name, "down", "MB_per_cpu_s"), "{:.0f}"),
                    fmt(cell(summary, p.name, "down", "proxy_cores"), "{:.2f}"),
                    fmt(cell(summary, p.name, "up", "MB_per_cpu_s"), "{:.0f}"),
                    fmt(cell(summary, p.name, "k8", "MB_per_cpu_s"), "{:.0f}"),
                    fmt(cell(summary, p.name, "k8", "proxy_cores"), "{:.2f}"),
                    fmt(cell(summary, p.name, "handshake", "proxy_cores"), "{:.2f}"),
                    user_sys(summary, p.name),
                    fmt(cell(summary, p.name, "latency", "cpu_s_per_1k"), "{:.3f}"),
                    fmt(other_avg, "{:.2f}"),
                    fmt(max(others) if others else None, "{:.2f}"),
                ]
            )
            + " |"
        )
    L.append("")

    # spread
    L.append("## Spread (min-max over rounds)")
    L.append("")
    scols = [
        c
        for c in active
        if c[0]
        in (
            "down MB/s",
            "up MB/s",
            "K8 MB/s",
            "hs/s",
            "lat p50 µs",
            "lat p99 µs",
            "idle KiB/tunnel",
            "stalled KiB/tunnel",
        )
    ]
    L.append("| proxy | " + " | ".join(c[0] for c in scols) + " |")
    L.append("|---|" + "---|" * len(scols))
    for p in procs:
        row = [p.name]
        for _hdr, w, key, f, _ in scols:
            s = summary.get(p.name, {}).get(w)
            rg = s["range"].get(key) if s else None
            ok = f"{s['ok_runs']}/{s['runs']}" if s else ""
            row.append(
                f"{f.format(rg[0])}-{f.format(rg[1])} ({ok})"
                if rg
                else (f"- ({ok})" if s else "-")
            )
        L.append("| " + " | ".join(row) + " |")
    L.append("")

    # Both fresh-proxy tests open tunnels, hold them, then check them.
    held_columns = [
        ("established (median)", "established", "{:.0f}"),
        ("alive after hold", "alive", "{:.0f}"),
    ]
    fresh_tables = (
        (
            "idle",
            "Idle tunnels",
            "KiB/tunnel = (proxy RSS with all tunnels held - RSS before, after a"
            " small warm-up) / tunnels established, on a freshly started proxy."
            " Kernel socket/pipe memory is not in RSS.",
            [
                *held_columns,
                ("RSS held MiB", "rss_mib_held", "{:.1f}"),
                ("establish s", "establish_s", "{:.2f}"),
                ("KiB/tunnel", "kib_per_tunnel", "{:.2f}"),
            ],
        ),
        (
            "stall",
            "Slow readers (stalled tunnels)",
            "Each client asks the target for a download and reads none of it, so"
            " the target sends until backpressure stops it. KiB/tunnel (RSS) ="
            " (proxy RSS while stalled - RSS before, after a small warm-up) /"
            " tunnels established, on a freshly started proxy: what the proxy"
            " buffers in its own memory. Host TCP KiB/tunnel = growth of the"
            " kernel's TCP buffer memory (/proc/net/sockstat) / tunnels: the"
            " socket buffers of the client, the proxy and the target together,"
            " set by the kernel's autotuning (pipes are not in it). Proxy cores"
            " = its CPU use while the tunnels stay stalled (a proxy that spins"
            " shows here). Alive = tunnels that still delivered the download's"
            " next bytes, intact, once read after the hold.",
            [
                *held_columns,
                ("KiB/tunnel (RSS)", "kib_per_stalled", "{:.1f}"),
                ("host TCP KiB/tunnel", "tcp_kib_per_stalled", "{:.0f}"),
                ("proxy cores while stalled", "stall_cores", "{:.3f}"),
            ],
        ),
    )
    for w, title, explanation, columns in fresh_tables:
        if w not in workloads:
            continue
        L.extend([f"## {title}", "", explanation, ""])
        L.append("| proxy | " + " | ".join(c[0] for c in columns) + " |")
        L.append("|---|" + "---|" * len(columns))
        for p in procs:
            if w not in summary.get(p.name, {}):
                continue
            cells = [fmt(cell(summary, p.name, w, key), f) for _, key, f in columns]
            L.append("| " + " | ".join([p.name, *cells]) + " |")
        L.append("")

    if sanity:
        L.append("## Sanity / correctness checks (before timing)")
        L.append("")
        L.append(
            "verify = 64 MiB each way at once, every byte checked; early = CONNECT"
            " head and the first 16 tunnel bytes in one write (client does not"
            " wait for the 200); ipv6 = CONNECT [::1]:port."
        )
        L.append("")
        L.append(
            "| proxy | processes/threads idle | idle CPU-s/10s | verify"
            " | early data | ipv6 target | response head |"
        )
        L.append("|---|---|---|---|---|---|---|")
        for p in procs:
            s = sanity.get(p.name, {})
            L.append(
                "| "
                + " | ".join(
                    [
                        p.name,
                        s.get("procs", "-"),
                        fmt(s.get("idle_cpu_s_per_10s"), "{:.3f}"),
                        s.get("verify", "-"),
                        s.get("early", "-"),
                        s.get("ipv6", "-"),
                        "`" + s.get("head", "").replace("|", "/") + "`"
                        if s.get("head")
                        else "-",
                    ]
                )
                + " |"
            )
        L.append("")

    fails = [r for r in runs if not r.get("ok")]
    L.append("## Failed runs")
    L.append("")
    if not fails:
        L.append("None.")
    for r in fails:
        L.append(
            f"- {r['proxy']} {r['workload']} round {r['round']}: {summarize_run(r)}"
        )
    # a handshake run counts as ok while some cycles fail; list those cycles
    for r in runs:
        lg = r.get("loadgen") or {}
        errs = {k: v for k, v in (lg.get("errors") or {}).items() if v}
        if r.get("ok") and r["workload"] == "handshake" and errs:
            L.append(
                f"- {r['proxy']} handshake round {r['round']}: ok, but"
                f" {sum(errs.values())} failed cycles of"
                f" {lg.get('completed', 0) + sum(errs.values())} {errs}"
            )
    L.append("")
    L.append("## Proxies")
    L.append("")
    for p in procs:
        L.append(
            f"- **{p.name}** ({p.kind}, {p.group}, port {p.port}): {p.note}"
            + (f" — `{p.command()}`" if p.cmd else "")
            + (f" — restarted {p.deaths}x after dying" if p.deaths else "")
        )
    L.append("")
    L.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items()))
    if meta.get("skipped"):
        L.append("")
        L.append(
            "Skipped (not installed): "
            + "; ".join(f"{k}: {v}" for k, v in meta["skipped"].items())
        )
    if meta.get("interrupted"):
        L.append("")
        L.append(
            "**Interrupted**: the run was stopped early;"
            " only the runs listed above were made."
        )
    L.append("")
    return "\n".join(L)


def versions(procs):
    """Version lines of the programs behind the selected built-in proxies."""

    def line(cmd, contains=""):
        if shutil.which(cmd[0]) is None:
            return "not installed"
        try:
            # cwd /: `python -c` must import the installed tunnel, not ./tunnel
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=10, cwd="/"
            )
            lines = [
                x
                for x in (out.stdout + out.stderr).splitlines()
                if contains in x and x.strip()
            ]
            return lines[0].strip() if lines else "?"
        except Exception as e:
            return f"? ({e})"

    names = {p.name for p in procs}
    probes = {
        "tinyproxy": (["tinyproxy", "-v"], "", {"tinyproxy"}),
        "squid": (["squid", "-v"], "Version", {"squid", "squid-logged"}),
        "haproxy": (["haproxy", "-v"], "version", {"haproxy", "haproxy-splice"}),
        "socat": (["socat", "-V"], "version", {"socat", "socat-128k"}),
        "proxy.py": (
            [str(VENV / "bin" / "proxy"), "--version"],
            "",
            {"proxypy", "proxypy-1w", "proxypy-threaded"},
        ),
        "python, Twisted (ours and the twisted references)": (
            [
                sys.executable,
                "-c",
                "import sys, twisted;"
                " print(sys.version.split()[0], twisted.__version__)",
            ],
            "",
            {
                "twisted",
                "twisted-splice",
                "ours",
                "ours-w2",
                "ours-nosplice",
                "ours-logged",
                "ours-access",
            },
        ),
        "tunnel": (
            [
                sys.executable,
                "-c",
                "import tunnel, importlib.metadata as m;"
                " print(m.version('tunnel'), tunnel.__file__)",
            ],
            "",
            {"ours", "ours-w2", "ours-nosplice", "ours-logged", "ours-access"},
        ),
    }
    return {
        k: line(cmd, contains)
        for k, (cmd, contains, users) in probes.items()
        if names & users
    }


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().strip()


def checkout():
    """Commit of the repository the bench lives in, and the files under tunnel/
    and twisted/ that differ from it (the code measured as `ours` when it is
    installed from this checkout)."""
    git = ["git", "-C", str(BENCH.parent)]
    try:
        rev = subprocess.run(
            [*git, "log", "-1", "--format=%h %cI %s"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "tunnel", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    if not rev:
        return "?"
    dirty = [d.strip() for d in dirty if d.strip()]
    rev = rev if len(rev) < 100 else rev[:97] + "..."
    return rev + (" + uncommitted: " + ", ".join(dirty) if dirty else "")


# ---------------------------------------------------------------- main
def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--proxies",
        default=",".join(DEFAULT_PROXIES),
        help="comma list of built-in proxies (available: {})".format(",".join(BUILTIN)),
    )
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="extra CONNECT proxy; CMD is run with bash -c after substituting"
        " {port} etc.",
    )
    ap.add_argument(
        "--extra-relay",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="extra fixed-target relay (forwards {port} -> {host}:{target_port})",
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help="writable dir for build/, configs/, logs/, results/ "
        "(default $BENCH_WORKDIR, else ${TMPDIR:-/tmp}/tunnel-bench)",
    )
    ap.add_argument(
        "--peers-venv",
        default=None,
        help="virtualenv with proxy.py "
        "(default $PEERS_VENV, else <workdir>/peers-venv)",
    )
    ap.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help="comma list from: down,up,k8,both,latency,handshake,idle,stall",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bytes", default="1G")
    ap.add_argument("--k8-bytes", default="128M")
    ap.add_argument("--k8-tunnels", type=int, default=8)
    ap.add_argument("--hs-conc", type=int, default=50)
    ap.add_argument("--hs-secs", type=float, default=10)
    ap.add_argument("--lat-n", type=int, default=20000)
    ap.add_argument("--idle-n", type=int, default=5000)
    ap.add_argument("--idle-hold", type=float, default=5)
    ap.add_argument(
        "--idle-conc",
        type=int,
        default=64,
        help="tunnels being opened at once in the idle test",
    )
    ap.add_argument(
        "--stall-n",
        type=int,
        default=20,
        help="tunnels whose client stops reading in the stall test",
    )
    ap.add_argument(
        "--stall-hold",
        type=float,
        default=4,
        help="seconds the stalled tunnels are held (at least 2: the proxy is"
        " measured over the second that ends half a second before)",
    )
    ap.add_argument(
        "--stall-bytes",
        default="64M",
        help="download each stalled client asks for (bounds what a proxy"
        " without flow control can buffer: stall-n times this)",
    )
    ap.add_argument("--baseline", default="direct")
    ap.add_argument(
        "--subject",
        default=DEFAULT_SUBJECT,
        help="the proxy compared with every other one, round by round (default ours)",
    )
    ap.add_argument("--settle", type=float, default=0.3, help="pause between runs (s)")
    ap.add_argument("--no-sanity", action="store_true")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 1 round: checks the harness works",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output path prefix, .json and .md are added "
        "(default <workdir>/results/bench-DATE)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=60,
        help="stop starting new runs after this long",
    )
    ap.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        help="give up a throughput or latency run after this many seconds"
        " (default 180 / 120)",
    )
    ap.add_argument(
        "--target-host",
        metavar="NAME",
        default=None,
        help="ask the CONNECT proxies for NAME:PORT instead of"
        f" {HOST}:PORT, so that each resolves the name (NAME must map to"
        f" {HOST} only in /etc/hosts: no proxy then sends a DNS query)",
    )
    ap.add_argument(
        "--render",
        metavar="JSON",
        help="only re-render the markdown of an earlier results JSON",
    )
    cfg = ap.parse_args()
    if cfg.stall_hold < 2:
        ap.error("--stall-hold must be at least 2 (seconds)")
    if cfg.target_host is not None:
        check_target_host(cfg.target_host)
    if cfg.quick:
        cfg.bytes, cfg.k8_bytes, cfg.hs_secs, cfg.lat_n = "128M", "16M", 2, 2000
        cfg.idle_n, cfg.idle_hold, cfg.rounds = 500, 1, 1
        cfg.stall_n, cfg.stall_bytes = 4, "16M"
    return cfg


def hosts_addresses(name, path="/etc/hosts"):
    """The addresses /etc/hosts gives NAME (names compared without case)."""
    found = set()
    with open(path) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if len(fields) > 1 and name.lower() in (n.lower() for n in fields[1:]):
                found.add(fields[0])
    return found


def check_target_host(name):
    """Refuse a --target-host that could make a proxy query DNS: it must be
    in /etc/hosts, with HOST as its only address."""
    found = hosts_addresses(name)
    if found != {HOST}:
        sys.exit(
            f"--target-host {name}: /etc/hosts gives it {sorted(found) or 'nothing'};"
            f" it must give {HOST} only, so that no proxy sends a DNS query"
        )


def parse_extra(spec):
    name, sep, cmd = spec.partition("=")
    if not sep or not name or not cmd:
        sys.exit(f"--extra needs NAME=CMD, got {spec!r}")
    return name.strip(), cmd.strip()


def render_only(path, out=None):
    with open(path) as f:
        data = json.load(f)
    cfg = argparse.Namespace(**{"subject": DEFAULT_SUBJECT, **data["meta"]["config"]})
    procs = []
    for name, d in data["proxies"].items():
        p = Proc(name, d["command"], d["port"], d["kind"], d["group"], d["note"])
        p.command = (lambda c: lambda: c)(d["command"])
        procs.append(p)
    workloads = [w for w in cfg.workloads.split(",") if w]
    summary = build_summary(procs, data["runs"], workloads, cfg.baseline)
    md = render_markdown(
        procs, summary, cfg, data["meta"], data["sanity"], data["runs"], workloads
    )
    print(md)
    dest = Path(out).with_suffix(".md") if out else Path(path).with_suffix(".md")
    try:
        dest.write_text(md)
        log(f"wrote {dest}")
    except OSError as e:
        log(f"could not write {dest}: {e}")


class Interrupted(Exception):
    pass


def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def main():
    cfg = parse_args()
    if cfg.render:
        return render_only(cfg.render, cfg.out)
    setup_paths(cfg.workdir or default_workdir(), cfg.peers_venv)
    # squid, haproxy: /usr/sbin is not on every user's PATH
    path = os.environ.get("PATH", "").split(":")
    os.environ["PATH"] = ":".join(
        path + [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in path]
    )
    WORK.mkdir(parents=True, exist_ok=True)
    LOGDIR.mkdir(parents=True, exist_ok=True)
    # tinyproxy/squid drop privileges (when started as root) and log here
    os.chmod(LOGDIR, 0o1777)
    build_tools()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workloads = [w for w in cfg.workloads.split(",") if w]
    for w in workloads:
        if w not in [*STEADY_WORKLOADS, *FRESH_WORKLOADS]:
            sys.exit(f"unknown workload {w}")

    procs, skipped = [], {}
    for name in [n for n in cfg.proxies.split(",") if n]:
        if name not in BUILTIN:
            sys.exit(f"unknown proxy {name}; built-ins: {', '.join(BUILTIN)}")
        b = BUILTIN[name]
        why = missing_needs(b["needs"])
        if why:
            skipped[name] = why
            hint = b["needs"][0].startswith(("bin:", "venv:"))
            log(
                f"note: skipping {name}: {why}"
                + (" (see bench/setup-peers.sh)" if hint else "")
            )
            continue
        conf = render_config(b["config"], b["port"]) if b.get("config") else None
        procs.append(
            Proc(name, b["cmd"], b["port"], b["kind"], b["group"], b["note"], conf)
        )
    port = EXTRA_PORT_BASE
    for spec, kind in [(s, "connect") for s in cfg.extra] + [
        (s, "relay") for s in cfg.extra_relay
    ]:
        name, cmd = parse_extra(spec)
        procs.append(
            Proc(
                name,
                cmd,
                port,
                kind,
                "candidate",
                f"--extra{'-relay' if kind == 'relay' else ''}",
            )
        )
        port += 1
    if len({p.name for p in procs}) != len(procs):
        sys.exit("duplicate proxy names")
    if not procs:
        sys.exit("no proxy left to measure")

    started = datetime.datetime.now()
    out = Path(cfg.out) if cfg.out else WORK / "results" / f"bench-{started:%Y-%m-%d}"
    if not cfg.out and (
        out.with_suffix(".json").exists() or out.with_suffix(".md").exists()
    ):
        out = WORK / "results" / f"bench-{started:%Y-%m-%d-%H%M%S}"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
        "versions": versions(procs),
        "checkout": checkout(),
        "skipped": skipped,
        "config": vars(cfg),
    }
    t_begin = time.monotonic()
    deadline = t_begin + cfg.max_minutes * 60

    target = Proc(
        "target",
        f"{TARGET} --listen {HOST}:{TARGET_PORT} --listen [::1]:{TARGET_PORT}",
        TARGET_PORT,
        kind="target",
        group="target",
    )
    runs, sanity = [], {}

    def save():
        meta["loadavg_end"] = loadavg()
        meta["elapsed_min"] = round((time.monotonic() - t_begin) / 60, 2)
        summary = build_summary(procs, runs, workloads, cfg.baseline)
        md = render_markdown(procs, summary, cfg, meta, sanity, runs, workloads)
        with open(out.with_suffix(".json"), "w") as f:
            json.dump(
                {
                    "meta": meta,
                    "proxies": {
                        p.name: {
                            "kind": p.kind,
                            "group": p.group,
                            "port": p.port,
                            "command": p.command() if p.cmd else None,
                            "note": p.note,
                        }
                        for p in procs
                    },
                    "sanity": sanity,
                    "summary": summary,
                    "runs": runs,
                },
                f,
                indent=1,
            )
        with open(out.with_suffix(".md"), "w") as f:
            f.write(md)
        return md

    def ensure_running(p):
        if p.cmd and not p.alive():
            if p.popen is not None:
                p.deaths += 1
                log(f"!! {p.name} died (rc={p.popen.returncode}); restarting")
            p.popen = None
            p.start()

    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    rc = 0
    try:
        target.start()
        for p in procs:
            log(f"starting {p.name} on port {p.port}")
            try:
                p.start()
            except RuntimeError as e:
                log(f"!! {e}")
        if not cfg.no_sanity:
            for p in procs:
                sanity[p.name] = run_sanity(p, target, cfg)
                log(f"sanity {p.name}: {sanity[p.name]}")

        steady = [w for w in workloads if w not in FRESH_WORKLOADS]
        plan = []
        for rnd in range(cfg.rounds):
            for w in steady:
                elig = [p for p in procs if w in KIND_WORKLOADS.get(p.kind, ())]
                if not elig:
                    continue
                k = rnd % len(elig)
                for p in elig[k:] + elig[:k]:
                    plan.append((rnd, w, p))
        for i, (rnd, w, p) in enumerate(plan):
            if time.monotonic() > deadline:
                log("!! --max-minutes reached; skipping the remaining runs")
                break
            try:
                ensure_running(p)
            except RuntimeError as e:
                runs.append(
                    {
                        "proxy": p.name,
                        "workload": w,
                        "round": rnd,
                        "ok": False,
                        "error": str(e),
                    }
                )
                log(f"[{i + 1}/{len(plan)}] r{rnd} {w:9s} {p.name:15s} FAILED {e}")
                continue
            time.sleep(cfg.settle)
            rec = measured_run(p, target, w, cfg, rnd)
            runs.append(rec)
            log(
                f"[{i + 1}/{len(plan)}] r{rnd} {w:9s} {p.name:15s} {summarize_run(rec)}"
            )

        for w, fresh_run in (("idle", idle_run), ("stall", stall_run)):
            if w not in workloads:
                continue
            elig = [p for p in procs if w in KIND_WORKLOADS.get(p.kind, ())]
            for rnd in range(cfg.rounds):
                k = rnd % len(elig) if elig else 0
                for p in elig[k:] + elig[:k]:
                    if time.monotonic() > deadline:
                        break
                    rec = fresh_run(p, target, cfg, rnd)
                    runs.append(rec)
                    log(f"[{w}] r{rnd} {p.name:15s} {summarize_run(rec)}")
    except (Interrupted, KeyboardInterrupt) as e:
        log(
            f"!! interrupted ({e.__class__.__name__} {e}); stopping everything,"
            " saving what was measured"
        )
        meta["interrupted"] = True
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish cleaning up
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for lg in list(_LIVE_LOADGENS):
            lg.kill()
            lg.wait()
        for p in procs:
            p.stop()
        target.stop()
    md = save()
    print(md)
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return rc


def run_sanity(p, target, cfg):
    """Correctness probes (loadgen flags given later override earlier ones)."""
    res = {}
    if p.cmd and not p.alive():
        try:
            p.popen = None
            p.start()
        except RuntimeError as e:
            return {"verify": f"FAIL not running: {e}"}
    if p.cmd and p.alive():
        n, t = nprocs_threads(p.pid)
        res["procs"] = f"{n}/{t}"
        c0 = cpu_seconds(p.pid)
        time.sleep(2)
        res["idle_cpu_s_per_10s"] = (cpu_seconds(p.pid) - c0) * 5
    checks = [("verify", "both", ["--bytes", "64M", "--verify"])]
    if p.kind == "connect":
        checks += [
            ("early", "latency", ["--n", "200", "--warmup", "0", "--early"]),
            (
                "ipv6",
                "latency",
                ["--n", "200", "--warmup", "0", "--target", f"[::1]:{TARGET_PORT}"],
            ),
        ]
    for label, w, extra in checks:
        r, err, _rc = run_loadgen(
            loadgen_args(p, w, cfg, [*extra, "--timeout", "8"]), 20
        )
        if r and r.get("ok"):
            res[label] = "ok"
        elif r:
            errs = {k: v for k, v in r.get("errors", {}).items() if v}
            st = r.get("first_status", -1)
            res[label] = (
                "FAIL "
                + (f"status {st} " if st not in (-1, 200) else "")
                + (f"{r.get('n', '')} msgs " if w == "latency" else "")
                + json.dumps(errs).replace('"', "")
            )
        else:
            res[label] = "FAIL " + err.strip()[-80:]
        if r and r.get("first_head") and "head" not in res:
            res["head"] = r["first_head"].replace("\r\n", " \\r\\n ")
        if p.cmd and not p.alive():
            res[label] += " (proxy died; restarted)"
            p.popen = None
            with contextlib.suppress(RuntimeError):
                p.start()
    return res


def fresh_start(p, workload, cfg, rnd):
    """
    Restart P, warm it up with a second of handshakes, let it settle: returns
    (its RSS in KiB then, None), or (None, a failed run record).
    """
    p.stop()
    try:
        p.start()
    except RuntimeError as e:
        return None, {
            "proxy": p.name,
            "workload": workload,
            "round": rnd,
            "ok": False,
            "error": str(e),
        }
    warm = loadgen_args(p, "handshake", cfg)
    for flag, val in (("--secs", "1"), ("--conc", "8")):
        warm[warm.index(flag) + 1] = val
    run_loadgen(warm, 30)
    time.sleep(1.0)
    samples = []
    for _ in range(3):
        samples.append(rss_kib(p.pid))
        time.sleep(0.1)
    return statistics.median(samples), None


def tcp_mem_kib():
    """The kernel's TCP buffer memory, all sockets (/proc/net/sockstat), KiB."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                pages = int(fields[fields.index("mem") + 1])
                return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    return 0


def idle_run(p, target, cfg, rnd):
    """Fresh proxy, warm-up, RSS before, open N tunnels, RSS while held."""
    rss0, failed = fresh_start(p, "idle", cfg, rnd)
    if failed:
        return failed
    held = {}

    def on_ready(_line):
        time.sleep(min(1.0, cfg.idle_hold / 3))
        held["rss"] = rss_kib(p.pid)
        held["procs"] = nprocs_threads(p.pid)

    rec = measured_run(p, target, "idle", cfg, rnd, on_ready=on_ready, timeout=200)
    rec["idle_rss_kib_before"] = rss0
    if "rss" in held and rec.get("loadgen"):
        est = rec["loadgen"]["established"]
        rec["idle_rss_kib_held"] = held["rss"]
        rec["idle_procs_threads_held"] = held["procs"]
        rec["idle_kib_per_tunnel"] = (held["rss"] - rss0) / est if est else None
    else:
        rec["ok"] = False
        rec.setdefault("error", "no READY line from loadgen")
    return rec


def stall_run(p, target, cfg, rnd):
    """
    Fresh proxy, warm-up, RSS before; N clients ask for a download and read
    nothing; once the floods have had most of the hold to fill every buffer,
    the proxy's RSS, the host's TCP memory and the proxy's CPU over a second
    that ends before the hold does.
    """
    rss0, failed = fresh_start(p, "stall", cfg, rnd)
    if failed:
        return failed
    tcp0 = tcp_mem_kib()
    held = {}

    def on_ready(_line):
        # Let the floods fill every buffer, and end the second of samples
        # half a second before the hold does (--stall-hold is at least 2).
        time.sleep(max(0.5, cfg.stall_hold - 1.5))
        cpu0, rss1, tcp1 = cpu_seconds(p.pid), rss_kib(p.pid), tcp_mem_kib()
        time.sleep(1.0)
        cpu1, rss2, tcp2 = cpu_seconds(p.pid), rss_kib(p.pid), tcp_mem_kib()
        held["rss"], held["tcp"] = max(rss1, rss2), max(tcp1, tcp2)
        held["cores"] = cpu1 - cpu0

    rec = measured_run(p, target, "stall", cfg, rnd, on_ready=on_ready, timeout=200)
    rec["stall_rss_kib_before"] = rss0
    if "rss" in held and rec.get("loadgen"):
        est = rec["loadgen"]["established"]
        rec["stall_rss_kib_held"] = held["rss"]
        rec["stall_proxy_cores"] = held["cores"]
        rec["stall_kib_per_tunnel"] = (held["rss"] - rss0) / est if est else None
        rec["stall_tcp_kib_per_tunnel"] = (held["tcp"] - tcp0) / est if est else None
    else:
        rec["ok"] = False
        rec.setdefault("error", "no READY line from loadgen")
    return rec


if __name__ == "__main__":
    sys.exit(main())
