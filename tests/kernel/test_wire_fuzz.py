"""A short fixed-budget run of the structure-aware wire fuzzer (wire_fuzz.py) against a live
kernel: 0 crashes, every valid request answered, no replay answered. benches/wire_fuzz.py runs
the same fuzzer for 100,000+ frames and reports RSS. Cost: a few seconds (engine disabled)."""
from __future__ import annotations

import os

from wire_fuzz import WireFuzzer
from zmtp import LiveKernel

FRAMES = int(os.environ.get("PIVOT_WIRE_FUZZ_FRAMES", "20000"))


def test_wire_fuzzer_fixed_budget(kernel_bin_path, tmp_path):
    with LiveKernel(kernel_bin_path, tmp_path) as k:
        stats = WireFuzzer(k, seed=20261206).run(frames=FRAMES)
        alive = k.alive()
        err = k.stderr()
    assert alive, err[-3000:]
    assert stats.ok(), (stats, err[-3000:])
    assert stats.frames >= FRAMES and stats.probes > 0 and stats.replays > 0
