#!/usr/bin/env python3
"""Peak RSS of `pivot-train` SFT on the tiny MLLM with and without activation checkpointing
(`recompute_tower`, `recompute_lm`), 1 thread, on the CPU. A micro-batch large enough that the
activations outweigh libtorch's own footprint; the peak is the process's maximum resident set
(getrusage of the child). Reports; never fails on memory or speed.

    benches/recompute_memory.py [--bin PATH] [--batch 64] [--steps 3]

Writes benches/results/recompute-memory-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_bin() -> Path:
    host = re.search(r"^host: (\S+)", subprocess.run(["rustc", "-vV"], capture_output=True, text=True).stdout, re.M).group(1)
    cache = Path(os.environ.get("PIVOT_CACHE_DIR", Path.home() / ".cache/pivot-lab"))
    return cache / "slots/0/target" / host / "debug/pivot-train"


# Runs one child and prints its peak RSS in KiB: a fresh process per measurement, so that
# RUSAGE_CHILDREN holds that child only.
PEAK = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); " \
       "sys.stderr.write(r.stderr); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    binary = args.bin or default_bin()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for tower, lm in ((False, False), (True, True), (False, False), (True, True)):
            name = f"t{int(tower)}l{int(lm)}-{len(rows)}"
            cfg = tmp / f"{name}.toml"
            cfg.write_text(f"""stage = "sft"
threads = 1
[model]
seed = 0
output = "{tmp / name}"
[data]
world = {{ seed = 0, samples = {args.batch * args.steps} }}
[train]
lr = 1e-4
batch_size = {args.batch}
max_steps = {args.steps}
live = false
prefetch = 0
recompute_tower = {str(tower).lower()}
recompute_lm = {str(lm).lower()}
""")
            t0 = time.time()
            p = subprocess.run([sys.executable, "-c", PEAK, str(binary), str(cfg)], capture_output=True, text=True, env=env)
            rc, kib = (int(x) for x in p.stdout.split())
            if rc != 0:
                sys.exit(f"pivot-train {cfg} failed:\n{p.stderr}")
            lines = (tmp / name / "log.csv").read_text().splitlines()
            col = lines[0].split(",").index("step_seconds")
            steps = [float(l.split(",")[col]) for l in lines[1:]]
            rows.append({"recompute_tower": tower, "recompute_lm": lm, "peak_rss_mib": kib / 1024, "median_step_s": statistics.median(steps), "wall_s": time.time() - t0})
    print(f"{'recompute':>9} {'peak RSS MiB':>12} {'median step s':>13}")
    for r in rows:
        print(f"{str(r['recompute_tower'] and r['recompute_lm']):>9} {r['peak_rss_mib']:>12.1f} {r['median_step_s']:>13.3f}")
    res = ROOT / "benches/results" / f"recompute-memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    res.write_text(json.dumps({"args": vars(args) | {"bin": str(binary)}, "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}, "runs": rows}, indent=1, default=str))
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
