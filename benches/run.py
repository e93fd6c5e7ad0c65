"""Runs every benchmark of one size back to back (reference, then ours, per task), prints a table
and writes JSON with the machine details. Benchmarks report; they never fail on speed.

    python benches/run.py                       # CPU size on this machine (what `make bench` runs)
    python benches/run.py --size gpu --device cuda --bin ./bench_train   # on a GPU box, see README
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_TFLOPS = {"h100": 989e12, "h200": 989e12}  # dense bf16, SXM


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except Exception:
        return ""


def machine(device):
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    info = {
        "cpu_model": cpu or platform.processor(),
        "cpu_cores": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": sh("git rev-parse HEAD"),
        "git_dirty": bool(sh("git status --porcelain -- prelude benches")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for mod in ("transformers", "sklearn", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    if device == "cuda":
        info["gpu"] = sh("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader")
    return info


class GpuMemPoll:
    """Peak per-process GPU memory from nvidia-smi (the same measure for both sides)."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = str(pid), 0.0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            out = sh("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits")
            for line in out.splitlines():
                p = [x.strip() for x in line.split(",")]
                if len(p) == 2 and p[0] == self.pid:
                    self.peak = max(self.peak, float(p[1]))
            time.sleep(0.2)


def run_json(cmd, device, label):
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    poll = GpuMemPoll(p.pid) if device == "cuda" else None
    out, err = p.communicate()
    if poll:
        poll.stop = True
    wall = time.perf_counter() - t0
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        print(f"  {label} failed (rc {p.returncode}):\n{err[-3000:]}", file=sys.stderr)
        return {"label": label, "error": err[-3000:], "rc": p.returncode}
    r = json.loads(lines[-1])
    r["label"], r["wall_s"] = label, wall
    if poll:
        r["gpu_peak_mib_nvidia_smi"] = poll.peak
    print(f"  {label}: {wall:.0f} s", file=sys.stderr, flush=True)
    return r


def flops(shapes, labelled, task, side, variant):
    """Counted matmul + attention FLOPs of one step (fwd = 2·MACs, bwd = 2 × fwd). Attention
    scores are counted over the full T×T square (no causal halving), as on both sides' kernels'
    inputs. `labelled` = mean labelled positions per sequence (chosen, rejected)."""
    v, l = shapes["vision_hf"], shapes["lm_hf"]
    n_img = shapes["image_tokens"]
    dv, iv = v["hidden_size"], v["intermediate_size"]
    lv = v["num_hidden_layers"] - 1  # PIVOT feeds layer L-1; the last layer never runs
    p = v["patch_size"]
    img = 2 * n_img * 3 * p * p * dv + lv * (2 * n_img * (4 * dv * dv + 2 * dv * iv) + 4 * n_img * n_img * dv)
    d, i, vocab = l["hidden_size"], l["intermediate_size"], l["vocab_size"]
    q = l["num_attention_heads"] * l["head_dim"]
    kv = l["num_key_value_heads"] * l["head_dim"]
    dl = d
    proj = 2 * n_img * (dv * dl + dl * dl)
    per_tok_layers = l["num_hidden_layers"] * 2 * (d * q + 2 * d * kv + q * d + 3 * d * i)

    def seq(text_len):
        t = text_len - 1 + n_img
        return t * per_tok_layers + l["num_hidden_layers"] * 4 * t * t * q, t

    def forward(images, seqs, head_rows):
        return images * (img + proj) + sum(seq(s)[0] for s in seqs) + head_rows * 2 * d * vocab

    c, r = shapes["chosen_len"], shapes["rejected_len"]
    if task == "dpo":
        b = shapes["dpo_pairs"]
        seqs = [c] * b + [r] * b
        t_all = max(seq(c)[1], seq(r)[1])  # padded to a common length: the reference's head sees the padding
        if side == "reference":
            rows = 2 * b * t_all
            pol = forward(2 * b, seqs, rows)
            return 3 * pol + pol
        rows = b * (labelled[0] + labelled[1])
        images = b if variant.startswith("single") else 2 * b
        pol = forward(images, seqs, rows)
        ref = 0 if "cached" in variant else forward(b, seqs, rows)
        return 3 * pol + ref
    b = shapes["sft_batch"]
    rows = b * seq(c)[1] if side == "reference" else b * labelled[0]
    return 3 * forward(b, [c] * b, rows)


def labelled_counts(data_dir):
    from safetensors.torch import load_file

    t = load_file(os.path.join(data_dir, "batch.safetensors"))
    f = lambda k: float((t[k] != -100).sum(1).float().mean())
    return f("chosen_labels"), f("rejected_labels")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch / BLAS threads on both sides (default 1: on a shared machine, more threads spin at barriers and swamp the ratios; 0 = all cores)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug/examples/bench_train"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benches/results"))
    ap.add_argument("--skip", default="", help="comma list of tasks to skip: dpo,sft,probe")
    ap.add_argument("--gpu-peak", type=float, default=0.0, help="peak FLOP/s for MFU (default: from the GPU name)")
    a = ap.parse_args()
    threads = a.threads or os.cpu_count()
    skip = set(filter(None, a.skip.split(",")))
    py = sys.executable
    data = os.path.join(ROOT, "out/bench", a.size)
    os.makedirs(a.out, exist_ok=True)
    info = machine(a.device)
    print(f"PIVOT benches: size {a.size} on {a.device}, {threads} threads, {info['cpu_model']} ({info['cpu_cores']} cores), "
          f"load average {info['load_average_start'][0]:.2f}", file=sys.stderr)

    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(threads), "--device", a.device]
    results = []
    r = run_json([a.bin, "export", "--size", a.size, "--out", data], a.device, "export")
    if "error" in r:
        sys.exit("export failed: build the binary first (cargo build -p pivot --example bench_train)")
    shapes = json.load(open(os.path.join(data, "shapes.json")))
    labelled = labelled_counts(data)
    ref_py = os.path.join(ROOT, "benches/ref_train.py")
    if "dpo" not in skip:
        results.append(run_json([py, ref_py, "dpo", "--data", data] + common, a.device, "dpo reference (TRL-style)"))
        for v in ("pivot", "single", "cached", "single_cached"):
            results.append(run_json([a.bin, "dpo", "--size", a.size, "--variant", v] + common, a.device, f"dpo ours {v}"))
        # The same PIVOT-exact step with each batch prepared inside the step (no prefetch thread).
        r = run_json([a.bin, "dpo", "--size", a.size, "--variant", "pivot", "--prefetch", "0"] + common, a.device, "dpo ours pivot, inline data")
        if "variant" in r:
            r["variant"] = "pivot_inline_data"
        results.append(r)
    if "sft" not in skip:
        results.append(run_json([py, ref_py, "sft", "--data", data] + common, a.device, "sft reference (HF)"))
        results.append(run_json([a.bin, "sft", "--size", a.size] + common, a.device, "sft ours"))
    if "probe" not in skip:
        feats = os.path.join(ROOT, "out/bench/probe_features.safetensors")
        probe_py = os.path.join(ROOT, "benches/ref_probe.py")
        if not os.path.exists(feats):
            subprocess.run([py, probe_py, "make", "--out", feats], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        results.append(run_json([py, probe_py, "fit", "--features", feats, "--threads", str(threads), "--repeats", "3"], "cpu", "probe reference (sklearn)"))
        results.append(run_json([a.bin, "probe", "--features", feats, "--threads", str(threads), "--device", a.device, "--repeats", "3"], a.device, "probe ours"))

    peak = a.gpu_peak or next((v for k, v in PEAK_TFLOPS.items() if k in info.get("gpu", "").lower()), 0.0)
    for r in results:
        if r.get("task") in ("dpo", "sft") and "step_s" in r:
            f = flops(shapes, labelled, r["task"], r["side"], r["variant"])
            r["flops_per_step"] = f
            r["achieved_tflops"] = f / r["step_s"] / 1e12
            if a.device == "cuda" and peak:
                r["mfu"] = f / r["step_s"] / peak

    # Table
    rows = []
    for task in ("dpo", "sft"):
        ref = next((r for r in results if r.get("task") == task and r.get("side") == "reference" and "step_s" in r), None)
        for r in results:
            if r.get("task") != task or "step_s" not in r:
                continue
            ratio = ref["step_s"] / r["step_s"] if ref else float("nan")
            cratio = ref["step_cpu_s"] / r["step_cpu_s"] if ref else float("nan")
            r["throughput_ratio_vs_reference"] = ratio
            r["cpu_time_ratio_vs_reference"] = cratio
            mem = r.get("gpu_peak_mib_nvidia_smi") or r.get("peak_rss_mib")
            util = f"{100 * r['mfu']:.1f}% MFU" if "mfu" in r else f"{r['achieved_tflops'] * 1e3:.1f} GFLOP/s"
            rows.append((task, f"{r['side']} {r['variant']}", f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                         f"{r['samples_per_s']:.3f}", f"{mem:.0f}", util, f"{ratio:.2f}x", f"{r['step_cpu_s']:.2f}", f"{cratio:.2f}x"))
    probe_ref = next((r for r in results if r.get("task") == "probe" and r.get("side") == "reference" and "fits" in r), None)
    for r in results:
        if r.get("task") != "probe" or "fits" not in r:
            continue
        for fit in r["fits"]:
            rf = probe_ref["fits"][0] if probe_ref else None
            ratio = rf["fit_s"] / fit["fit_s"] if rf else float("nan")
            fit["speed_ratio_vs_reference"] = ratio
            fit["top1_diff_pp"] = 100 * (fit["top1"] - rf["top1"]) if rf else float("nan")
            rows.append(("probe", fit["name"], f"{fit['fit_s']:.2f}", f"{fit['iterations']} it", f"top1 {100 * fit['top1']:.2f}%",
                         f"{r['peak_rss_mib']:.0f}", f"obj {fit['objective']:.6f}", f"{ratio:.2f}x", "", ""))
    head = ("task", "side / variant", "step|fit s", "tokens/s", "samples/s", "peak MiB", "utilisation", "vs ref", "cpu s/step", "vs ref (cpu)")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    info["load_average_end"] = os.getloadavg()
    print()
    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))
    profiled = [r for r in results if r.get("phases_s")]
    if profiled:
        # PIVOT_PROFILE_STEPS=1: median milliseconds per phase (each phase ends with a device sync).
        names = list(dict.fromkeys(n for r in profiled for n in r["phases_s"]))
        print("\nphases (ms, median):")
        label = lambda r: f"{r['task']} {r['side']} {r.get('variant', '')}".strip()
        w = max(len(label(r)) for r in profiled)
        print(" " * w + "  " + "  ".join(f"{n:>14}" for n in names))
        for r in profiled:
            print(label(r).ljust(w) + "  " + "  ".join(f"{1e3 * r['phases_s'][n]:14.1f}" if n in r["phases_s"] else " " * 14 for n in names))
    print(f"\nload average start {info['load_average_start'][0]:.2f}, end {info['load_average_end'][0]:.2f} on {info['cpu_cores']} cores "
          "(above the core count, other work shared the CPU: compare ratios, not absolute times)")

    doc = {"machine": info, "size": a.size, "device": a.device, "threads": threads, "steps": a.steps, "warmup": a.warmup,
           "shapes": shapes, "labelled_per_sequence": labelled, "results": results}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(a.out, f"bench-{a.size}-{a.device}-{stamp}.json")
    for p in (path, os.path.join(a.out, f"latest-{a.size}-{a.device}.json")):
        with open(p, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
