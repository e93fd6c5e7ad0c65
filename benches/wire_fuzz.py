"""The wire fuzzer (tests/kernel/wire_fuzz.py) at full size against a live kernel: 100,000 frames
or more across its five sockets. Reports frames, cases, crashes, probes answered, replays refused
and the kernel's RSS before fuzzing, after a warm-up and at the end; writes
benches/results/wire-fuzz-<time>.json. Reports only: exits 1 when the kernel crashed, a valid
request went unanswered, a replay was answered or RSS grew more than 10 % after the warm-up.

    PIVOT_KERNEL_BIN=... .venv/bin/python benches/wire_fuzz.py [--frames 100000] [--seed 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "kernel"), str(ROOT / "tests")]

from pivot_testing import built_binary  # noqa: E402
from wire_fuzz import WireFuzzer  # noqa: E402
from zmtp import LiveKernel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=20_000, help="frames before the RSS baseline")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    binary = built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")
    with tempfile.TemporaryDirectory(prefix="pivot-wire-fuzz-") as tmp, LiveKernel(binary, Path(tmp)) as k:
        rss_start = k.rss_kib()
        fuzzer = WireFuzzer(k, seed=args.seed)
        t0 = time.monotonic()
        fuzzer.run(frames=args.warmup)
        rss_warm = k.rss_kib()
        # RSS every tenth of the run, to tell a plateau from a leak.
        curve = []
        for i in range(1, 11):
            stats = fuzzer.run(frames=args.warmup + args.frames * i // 10)
            if not k.alive() or stats.failures:
                break
            curve.append([stats.frames, k.rss_kib()])
            print(f"{stats.frames} frames, rss {curve[-1][1]} KiB", file=sys.stderr)
        seconds = time.monotonic() - t0
        alive = k.alive()
        rss_end = k.rss_kib() if alive else None
        dropped_log = k.stderr().count("pivot-kernel: dropped")
    growth = (rss_end - rss_warm) / rss_warm if rss_end else None
    result = {
        "frames": stats.frames, "messages": stats.messages, "cases": stats.cases, "connections": stats.connections, "seconds": round(seconds, 1),
        "crashes": 0 if alive else 1, "probes": stats.probes, "probes_answered": stats.probes_answered,
        "heartbeats": stats.heartbeats, "heartbeats_answered": stats.heartbeats_answered,
        "replays": stats.replays, "replays_answered": stats.replays_answered, "failures": stats.failures[:20],
        "kernel_log_drops": dropped_log,
        "rss_kib": {"start": rss_start, "after_warmup": rss_warm, "end": rss_end},
        "rss_curve_frames_kib": curve,
        "rss_growth_after_warmup": None if growth is None else round(growth, 4),
        "seed": args.seed, "warmup_frames": args.warmup,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_end": os.getloadavg()},
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
    }
    out = ROOT / "benches" / "results" / f"wire-fuzz-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    ok = alive and stats.ok() and growth is not None and growth <= 0.10
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
