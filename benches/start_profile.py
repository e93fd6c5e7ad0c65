#!/usr/bin/env python3
"""Where a warm start goes: the processes the engine starts (strace) and what its CPU did between them (perf).

Record (private warm slot, a script whose first cell is the parameters cell):

    PIVOT_SLOT=7 PIVOT_REPL_NO_WARMUP=1 PIVOT_CELL_STATS=/tmp/p.cells.jsonl \\
      perf record -F 199 -o /tmp/p.perf -- strace -f -tt -e trace=execve,process -o /tmp/p.strace pivot-repl script.rs
    perf script -i /tmp/p.perf -F comm,pid,tid,time,ip,sym,dso > /tmp/p.samples

Then:

    python benches/start_profile.py timeline /tmp/p.strace
        every process the engine (or one of its threads) started: start (s after the engine's start),
        duration, command line; the gaps between them are the engine thread's own work
    python benches/start_profile.py buckets /tmp/p.samples MAIN_PID 0,13.6,...  name1,name2,...
        perf samples per time window (same clock origin: the engine's first sample), grouped into the
        engine's rust-analyzer crates (ra_ap_*, rowan, salsa, ...), the engine's other code, its kernel
        time, and other processes by name; CPU seconds = samples / --hz

benches/README.md ("where a warm start goes") has the windows and results of one such profile.
"""
from __future__ import annotations

import argparse
import collections
import re

RA_CRATES = {"salsa", "rowan", "triomphe", "hashbrown", "intern", "la_arena", "smallvec", "rustc_hash",
             "chalk_ir", "chalk_solve", "memchr", "indexmap"}


def timeline(path: str) -> None:
    def ts(s: str) -> float:
        h, m, x = s.split(":")
        return int(h) * 3600 + int(m) * 60 + float(x)

    parent: dict[int, int] = {}
    start: dict[int, float] = {}
    end: dict[int, float] = {}
    cmd: dict[int, str] = {}
    thread: set[int] = set()
    pending: dict[int, bool] = {}
    main = None
    for line in open(path):
        p = line.rstrip("\n").split(" ", 2)
        if len(p) < 3 or not p[0].isdigit() or p[1].count(":") != 2:
            continue
        pid, t, rest = int(p[0]), ts(p[1]), p[2]
        if main is None:
            main = pid
            start[pid] = t
        m = re.match(r"(clone3?|vfork|fork)\((.*)", rest)
        if m:
            pending[pid] = "CLONE_THREAD" in m.group(2)
        resumed = re.match(r"<\.\.\. (clone3?|vfork|fork) resumed>", rest)
        if m or resumed:
            r = re.search(r"= (\d+)$", rest)
            if r:
                c = int(r.group(1))
                parent[c] = pid
                start.setdefault(c, t)
                if pending.get(pid) or "CLONE_THREAD" in rest:
                    thread.add(c)
        m = re.match(r'execve\("([^"]+)", \[(.*?)\]', rest)
        if m and "= -1" not in rest and pid not in cmd:
            args = re.findall(r'"([^"]*)"', m.group(2))
            cmd[pid] = " ".join([args[0].split("/")[-1]] + args[1:])[:170]
        if "+++ exited" in rest or "+++ killed" in rest:
            end[pid] = t

    def owner(pid: int) -> int:
        while pid in thread:
            pid = parent.get(pid, -1)
        return pid

    t0 = start[main]
    for pid in sorted((p for p in cmd if owner(parent.get(p, -1)) == main), key=lambda p: start[p]):
        e = end.get(pid)
        print(f"{start[pid] - t0:8.2f} {(e - start[pid]) if e else -1:7.2f}  {cmd[pid]}")


def buckets(path: str, main: int, windows: list[float], names: list[str], hz: float) -> None:
    rows = []
    for line in open(path):
        m = re.match(r"\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):\s+\S+\s+(.*?)\s+\((.*)\)$", line)
        if m:
            rows.append((m.group(1), int(m.group(2)), float(m.group(4)), m.group(5), m.group(6)))
    t0 = min(r[2] for r in rows if r[1] == main)

    def category(r) -> str:
        comm, pid, _, sym, dso = r
        if pid != main:
            return "other:" + comm
        if "kallsyms" in dso:
            return "engine-kernel"
        m = re.match(r"(?:<)?([a-z_0-9]+)::", sym)
        crate = m.group(1) if m else ("libc" if "libc" in dso else sym[:20])
        if crate.startswith("ra_ap") or crate in RA_CRATES:
            return "engine-RA:" + crate
        return "engine-libc" if "libc" in dso else "engine:" + crate

    for i, name in enumerate(names):
        a, b = windows[i], windows[i + 1]
        c = collections.Counter(category(r) for r in rows if a <= r[2] - t0 < b)
        print(f"== {name} [{a:.1f},{b:.1f}) wall {b - a:.1f} s, CPU {sum(c.values()) / hz:.1f} s")
        agg = collections.Counter()
        for k, v in c.items():
            agg["engine-RA" if k.startswith("engine-RA") else k] += v
        print("   ", ", ".join(f"{k} {v / hz:.1f}" for k, v in agg.most_common(8)))
        ra = [(k[10:], v) for k, v in c.most_common() if k.startswith("engine-RA")][:6]
        if ra:
            print("    rust-analyzer:", ", ".join(f"{k} {v / hz:.1f}" for k, v in ra))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timeline")
    t.add_argument("strace")
    b = sub.add_parser("buckets")
    b.add_argument("samples")
    b.add_argument("main_pid", type=int)
    b.add_argument("windows", help="comma-separated window edges, seconds after the engine's first sample")
    b.add_argument("names", help="comma-separated names, one per window")
    b.add_argument("--hz", type=float, default=199.0)
    a = ap.parse_args()
    if a.cmd == "timeline":
        timeline(a.strace)
    else:
        buckets(a.samples, a.main_pid, [float(x) for x in a.windows.split(",")], a.names.split(","), a.hz)


if __name__ == "__main__":
    main()
