#!/usr/bin/env python3
"""Per-cell overhead of real notebook cells: wall time minus the time the cell's code ran.

The engine appends one JSON line per cell to $PIVOT_CELL_STATS (engine/src/session.rs): wall time,
the time the code ran (evcxr's "Execution" phase), builds (and what evcxr fixed before each
rebuild), and the CPU seconds the engine process and its finished children spent (rust-analyzer,
cargo, rustc, the linker; the code's own process is not counted). Collect it while the notebooks run, e.g.

    PIVOT_CELL_STATS=/tmp/cells.jsonl python -m pytest -q tests/notebooks
    python benches/cell_overhead.py /tmp/cells.jsonl [--out benches/results]

Each session's first cell is the prelude's own cell, reported apart; a line with "cell": 0 gives the
phases of the engine start (evcxr's context creation, our settings, the prelude cell: wall and CPU
seconds), reported as medians. Cells that
ran no code (commands only, errors) are left out of the medians.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from collections import Counter
from pathlib import Path


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stats", help="the PIVOT_CELL_STATS file")
    ap.add_argument("--out", default=None, help="folder for a JSON summary")
    a = ap.parse_args()
    lines = [json.loads(l) for l in Path(a.stats).read_text().splitlines() if l.strip()]
    starts = [l for l in lines if l["cell"] == 1]
    cells = [l for l in lines if l["cell"] > 1 and l["run_s"] is not None and not l["error"]]
    if not cells:
        raise SystemExit("no cell that ran code in " + a.stats)
    over = [c["overhead_s"] for c in cells]
    cpu = [c["engine_cpu_s"] for c in cells]
    builds = [c["builds"] for c in cells]
    res = {
        "sessions": len({l["pid"] for l in lines}),
        "cells": len(cells),
        "overhead_p50_s": statistics.median(over),
        "overhead_p95_s": pct(over, 0.95),
        "engine_cpu_per_cell_p50_s": statistics.median(cpu),
        "engine_cpu_per_cell_mean_s": statistics.fmean(cpu),
        "cells_built_once": sum(1 for b in builds if b == 1),
        "cells_built_more": sum(1 for b in builds if b > 1),
        # What evcxr fixed before rebuilding (engine stats from session 15 on; older files lack it).
        "rebuild_fixes": dict(Counter(f for c in cells for f in c.get("fixes", [])).most_common()),
        # Variables whose types the engine wrote into their cells (session 16 on; older files lack it).
        "cells_typed_by_engine": sum(1 for c in cells if c.get("typed", 0) > 0),
        "variables_typed_by_engine": sum(c.get("typed", 0) for c in cells),
        "start_cell_p50_s": statistics.median([s["wall_s"] for s in starts]) if starts else None,
        "load_average": os.getloadavg(),
    }
    print(f"{res['cells']} cells in {res['sessions']} sessions: overhead p50 {res['overhead_p50_s']:.3f} s, "
          f"p95 {res['overhead_p95_s']:.3f} s; engine CPU per cell p50 {res['engine_cpu_per_cell_p50_s']:.3f} s "
          f"(mean {res['engine_cpu_per_cell_mean_s']:.3f} s); built once {res['cells_built_once']}, "
          f"more than once {res['cells_built_more']}; prelude start cell p50 "
          f"{'-' if res['start_cell_p50_s'] is None else format(res['start_cell_p50_s'], '.1f') + ' s'}")
    print(f"types written by the engine: {res['variables_typed_by_engine']} variables in {res['cells_typed_by_engine']} cells")
    if res["rebuild_fixes"]:
        print("rebuilt after: " + ", ".join(f"{name} x{n}" for name, n in res["rebuild_fixes"].items()))
    start_lines = [l for l in lines if l["cell"] == 0 and "start_phases" in l]
    if start_lines:
        names = list(start_lines[0]["start_phases"])
        res["start_phases_p50"] = {
            n: {k: statistics.median([l["start_phases"][n][k] for l in start_lines if n in l["start_phases"]])
                for k in ("wall_s", "engine_cpu_s")}
            for n in names
        }
        print("engine start, median of " + str(len(start_lines)) + ": " + ", ".join(
            f"{n} {v['wall_s']:.1f} s ({v['engine_cpu_s']:.1f} CPU-s)" for n, v in res["start_phases_p50"].items()))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        p = Path(a.out) / f"cell-overhead-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        p.write_text(json.dumps(res, indent=1))
        print(f"results: {p}")


if __name__ == "__main__":
    main()
