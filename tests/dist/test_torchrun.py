"""Data parallelism over c10d Gloo: `pivot-train` under `torchrun --standalone --no-python` at 2
ranks on the CPU, 1 thread each, against the same binary run alone.

The binary comes from PIVOT_TRAIN_BIN, else the prelude's test build in warm slot 0 (the Makefile's
`cargo test -p pivot` builds it there). torchrun is the venv's (the torch that libtorch comes from).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

TIMEOUT = 240  # seconds per launch; a hung collective fails the test instead of the suite


def host_triple() -> str:
    out = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    return re.search(r"^host: (\S+)", out, re.M).group(1)


def train_bin() -> Path:
    env = os.environ.get("PIVOT_TRAIN_BIN")
    if env:
        return Path(env)
    cache = Path(os.environ.get("PIVOT_CACHE_DIR", Path.home() / ".cache/pivot-lab"))
    path = cache / "slots/0/target" / host_triple() / "debug/pivot-train"
    if not path.exists():
        raise RuntimeError(f"pivot-train is not built at {path}: run the prelude's tests (make test) or set PIVOT_TRAIN_BIN")
    return path


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PIVOT_INJECT_NAN", "PIVOT_INJECT_INTERRUPT", "PIVOT_INJECT_KILL", "TORCHELASTIC_RESTART_COUNT")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def torchrun(nproc: int, *args: str, extra: dict[str, str] | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(restarts), "--no-python", str(train_bin()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env() | (extra or {}))


def alone(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(train_bin()), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env())


def write_config(tmp: Path, name: str, stage: str, batch_size: int, grad_accum: int, steps: int = 3, train: str = "", dtype: str = "fp32", top: str = "") -> Path:
    """`train`: more lines of the stage's train table (TOML); `top`: more top-level lines."""
    out = tmp / name
    section = "[dpo.train]" if stage == "dpo" else "[train]"
    text = f"""stage = "{stage}"
threads = 1
{top}
[model]
seed = 0
dtype = "{dtype}"
output = "{out}"
[data]
world = {{ seed = 0, samples = 16 }}
{section}
lr = 1e-3
warmup_ratio = 0.0
batch_size = {batch_size}
grad_accum = {grad_accum}
max_steps = {steps}
live = false
{train}"""
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def digests(p: subprocess.CompletedProcess) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"pivot-train rank (\d+)/\d+: .* weights digest ([0-9a-f]+)", p.stdout)}


def assert_same_model(a: Path, b: Path) -> None:
    """Equal up to float rounding. AdamW divides each gradient by its own running RMS, so a
    coordinate whose gradient is nearly zero turns rounding noise into an update of order lr:
    the bound on the largest difference is 3 % of what 3 steps at lr 1e-3 can move a weight
    (a run that skipped the all-reduce differs by about lr almost everywhere), and nearly all
    coordinates must agree to float precision."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    diff = np.concatenate([np.abs(wa[k].astype(np.float64) - wb[k]).ravel() for k in wa])
    assert diff.max() <= 1e-4, f"weights differ by up to {diff.max():.2e}"
    assert np.quantile(diff, 0.999) <= 1e-6, f"0.1 % of the weights differ by more than {np.quantile(diff, 0.999):.2e}"


def losses(out: Path, column: str = "loss") -> np.ndarray:
    lines = (out / "log.csv").read_text().splitlines()
    col = lines[0].split(",").index(column)
    return np.array([float(l.split(",")[col]) for l in lines[1:]])


def test_collectives_give_correct_values():
    p = ok(torchrun(2, "--check-dist"))
    assert len(re.findall(r"rank \d/2: collectives ok", p.stdout)) == 2, p.stdout


def test_dpo_two_ranks_of_b_pairs_equal_one_rank_of_2b(tmp_path):
    one = ok(alone(str(write_config(tmp_path, "one", "dpo", batch_size=4, grad_accum=1))))
    two = ok(torchrun(2, str(write_config(tmp_path, "two", "dpo", batch_size=2, grad_accum=1))))
    d = digests(two)
    assert set(d) == {0, 1} and d[0] == d[1], f"the ranks' weights differ after 3 steps: {d}"
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    assert_same_model(tmp_path / "two", tmp_path / "one")
    # Once per step the fp32 gradients of every weight the loss reaches, plus a few flags and
    # metrics: within 1 % of the saved model's size (it also keeps a few weights the loss does not
    # reach, such as the tower's final norm), not a multiple of it.
    model_bytes = 4 * sum(w.size for w in load_file(str(tmp_path / "two" / "model.safetensors")).values())
    sent = [int(b) for b in re.findall(r"rank \d/2: .* (\d+) bytes all-reduced per step", two.stdout)]
    assert len(sent) == 2 and all(0.99 * model_bytes <= b <= 1.01 * model_bytes for b in sent), (sent, model_bytes)


def test_sft_two_ranks_equal_one_rank_with_doubled_accumulation(tmp_path):
    ok(alone(str(write_config(tmp_path, "one", "sft", batch_size=2, grad_accum=2))))
    two = ok(torchrun(2, str(write_config(tmp_path, "two", "sft", batch_size=2, grad_accum=1))))
    d = digests(two)
    assert set(d) == {0, 1} and d[0] == d[1], f"the ranks' weights differ after 3 steps: {d}"
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    assert_same_model(tmp_path / "two", tmp_path / "one")


def test_a_nan_on_rank_1_stops_both_ranks_naming_the_step(tmp_path):
    cfg = write_config(tmp_path, "nan", "dpo", batch_size=2, grad_accum=2, steps=4)
    p = torchrun(2, str(cfg), extra={"PIVOT_INJECT_NAN": "2@1"})
    assert p.returncode != 0, p.stdout
    for rank in (0, 1):
        line = next((l for l in p.stderr.splitlines() if f"pivot-train rank {rank}:" in l), None)
        assert line is not None, f"rank {rank} did not report its exit:\n{p.stderr}"
        assert "non-finite" in line and "at step 2" in line, line
    assert "another rank" in next(l for l in p.stderr.splitlines() if "pivot-train rank 0:" in l)
    assert not (tmp_path / "nan").exists(), "a failed run must not save a model"


def test_an_interrupt_on_rank_1_stops_both_ranks_mid_step(tmp_path):
    cfg = write_config(tmp_path, "int", "sft", batch_size=2, grad_accum=2, steps=4)
    p = torchrun(2, str(cfg), extra={"PIVOT_INJECT_INTERRUPT": "2@1"})
    assert p.returncode != 0, p.stdout
    for rank in (0, 1):
        line = next((l for l in p.stderr.splitlines() if f"pivot-train rank {rank}:" in l), None)
        assert line is not None, f"rank {rank} did not report its exit:\n{p.stderr}"
        assert "interrupted" in line and "step 2 of 4, micro-batch 2 of 2" in line, line
    assert "interrupt on another rank" in next(l for l in p.stderr.splitlines() if "pivot-train rank 0:" in l)


def sent_per_step(p: subprocess.CompletedProcess, what: str) -> list[int]:
    return [int(b) for b in re.findall(rf"rank \d/2: .* (\d+) bytes {what}", p.stdout)]


def test_zero1_equals_plain_data_parallel(tmp_path):
    """ZeRO-1 (optimizer state sharded over the 2 ranks) against the whole state on each rank."""
    plain = ok(torchrun(2, str(write_config(tmp_path, "plain", "dpo", batch_size=2, grad_accum=2))))
    zero = ok(torchrun(2, str(write_config(tmp_path, "zero", "dpo", batch_size=2, grad_accum=2, train="zero_stage = 1\n"))))
    d = digests(zero)
    assert set(d) == {0, 1} and d[0] == d[1], f"the ranks' weights differ after 3 ZeRO-1 steps: {d}"
    np.testing.assert_allclose(losses(tmp_path / "zero"), losses(tmp_path / "plain"), rtol=1e-5, atol=1e-6)
    # From the chunks' norms, over the averaged gradients (Adam's update barely notices a gradient
    # summed instead of averaged; the norm doubles). fp32 norms of chunks against norms of whole
    # buffers differ by rounding (4.5e-6 relative seen at step 1), later steps also by the weights'
    # rounding differences that Adam amplifies (5e-5 seen).
    np.testing.assert_allclose(losses(tmp_path / "zero", "grad_norm"), losses(tmp_path / "plain", "grad_norm"), rtol=1e-3)
    assert_same_model(tmp_path / "zero", tmp_path / "plain")
    # The gradients go out once per step as a reduce-scatter and the weights come back as an
    # all-gather, each about the size of the model (padded to 2 chunks), instead of an all-reduce.
    model_bytes = 4 * sum(w.size for w in load_file(str(tmp_path / "zero" / "model.safetensors")).values())
    for what in ("reduce-scattered", "all-gathered"):
        b = sent_per_step(zero, what)
        assert len(b) == 2 and all(0.99 * model_bytes <= x <= 1.01 * model_bytes for x in b), (what, b, model_bytes)
    assert all(x < 0.001 * model_bytes for x in sent_per_step(zero, "all-reduced")), zero.stdout
    assert all(x == 0 for x in sent_per_step(plain, "reduce-scattered")), plain.stdout


def test_zero1_checkpoints_reshard_between_two_ranks_and_one(tmp_path):
    """Saved at 2 ranks (ZeRO-1) and resumed alone, or saved alone and resumed at 2 ranks
    (ZeRO-1): both equal the uninterrupted run alone. Same samples per step throughout (4 pairs:
    2 per rank, or 4 alone). The ZeRO-1 saves are per rank: each rank writes its shard of the
    optimizer state and nothing gathers it."""
    ck = "checkpoint_every = 2\ncheckpoint_dir = \"{}\"\n"
    whole = ok(alone(str(write_config(tmp_path, "whole", "dpo", batch_size=4, grad_accum=1, steps=4, train=ck.format(tmp_path / "ck1")))))
    two = ok(torchrun(2, str(write_config(tmp_path, "two", "dpo", batch_size=2, grad_accum=1, steps=4, train="zero_stage = 1\n" + ck.format(tmp_path / "ck2")))))
    resume = "resume_from = \"{}\"\n"
    ok(alone(str(write_config(tmp_path, "2to1", "dpo", batch_size=4, grad_accum=1, steps=4, train=resume.format(tmp_path / "ck2/step-000002")))))
    one_to_two = ok(torchrun(2, str(write_config(tmp_path, "1to2", "dpo", batch_size=2, grad_accum=1, steps=4, train="zero_stage = 1\n" + resume.format(tmp_path / "ck1/step-000002")))))
    d = digests(one_to_two)
    assert set(d) == {0, 1} and d[0] == d[1], d
    for resumed in ("2to1", "1to2"):
        np.testing.assert_allclose(losses(tmp_path / resumed), losses(tmp_path / "whole"), rtol=1e-5, atol=1e-6)
        assert_same_model(tmp_path / resumed, tmp_path / "whole")
    # Alone, the whole state in one file; at 2 ranks (ZeRO-1) one shard per rank, each holding its
    # half of every flat buffer (padded to 2 ranks): together the elements of the whole state.
    step2 = tmp_path / "ck2/step-000002"
    assert not (step2 / "optimizer.safetensors").exists()
    layout = json.loads((step2 / "optimizer_shards.json").read_text())
    assert layout["world"] == 2 and [(s["rank"], s["file"]) for s in layout["shards"]] == [(r, f"optimizer-rank{r:05}-of-00002.safetensors") for r in (0, 1)]
    shards = [load_file(str(step2 / s["file"])) for s in layout["shards"]]
    whole_elems = sum(t.size for t in load_file(str(tmp_path / "ck1/step-000002/optimizer.safetensors")).values())
    for i, seg in enumerate(layout["segments"]):
        n, chunk = sum(k for _, k in seg["params"]), seg["chunk"]
        assert chunk == (n + 1) // 2 and [s["ranges"][i] for s in layout["shards"]] == [[0, chunk], [chunk, 2 * chunk]], (seg, layout["shards"])
        assert all(s[f"m.{i}"].shape == s[f"v.{i}"].shape == (chunk,) for s in shards)
    assert sum(sum(t.size for t in s.values()) for s in shards) - whole_elems <= 2 * len(layout["segments"]), "the shards are not halves of the state"
    # Nothing is gathered for a save: the weights' all-gather per step only (a gather of the moments
    # at each of the 2 saves would add the model's size again per step) ...
    model_bytes = 4 * sum(w.size for w in load_file(str(tmp_path / "two" / "model.safetensors")).values())
    assert all(0.99 * model_bytes <= b <= 1.01 * model_bytes for b in sent_per_step(two, "all-gathered")), (sent_per_step(two, "all-gathered"), model_bytes)
    # ... and each rank wrote its own files of both saves (steps 2 and 4), rank 1 its shards only.
    written = {int(r): int(b) for r, b in re.findall(r"pivot-train rank (\d)/2: .* (\d+) bytes written to checkpoints", two.stdout)}
    saves = [tmp_path / "ck2/step-000002", tmp_path / "ck2/step-000004"]
    rank1 = sum((d / layout["shards"][1]["file"]).stat().st_size for d in saves)
    everything = sum(f.stat().st_size for d in saves for f in d.iterdir())
    assert written == {0: everything - rank1, 1: rank1}, (written, everything, rank1)
    # A missing or mismatched shard is refused by name, rank and range.
    resume_alone = lambda name, d: alone(str(write_config(tmp_path, name, "dpo", batch_size=4, grad_accum=1, steps=4, train=resume.format(d))))
    shard1 = layout["shards"][1]["file"]
    missing = tmp_path / "missing"
    shutil.copytree(step2, missing)
    (missing / shard1).unlink()
    p = resume_alone("missing-run", missing)
    assert p.returncode != 0 and f"optimizer shard {shard1} (rank 1 of 2, elements" in p.stderr and "is missing" in p.stderr, p.stderr
    mismatched = tmp_path / "mismatched"
    shutil.copytree(step2, mismatched)
    save_file({k: v[:-1] for k, v in shards[1].items()}, str(mismatched / shard1), metadata={"format": "pt"})
    manifest = json.loads((mismatched / "MANIFEST.json").read_text())
    manifest["files"][shard1] = (mismatched / shard1).stat().st_size  # a size-only entry (format 1), so the check below is the layout's
    (mismatched / "MANIFEST.json").write_text(json.dumps(manifest))
    p = resume_alone("mismatched-run", mismatched)
    assert p.returncode != 0 and shard1 in p.stderr and "rank 1 of 2" in p.stderr and "does not match optimizer_shards.json" in p.stderr, p.stderr


def test_a_killed_rank_is_restarted_and_the_run_resumes_from_its_last_checkpoint(tmp_path):
    """Rank 1 SIGKILLs itself in step 3 of 4 (after the checkpoint of step 2); torchrun
    (--max-restarts 1) stops rank 0 and starts both again, which resume from step 2 and finish
    with the weights of a run that was never killed."""
    def cfg(name: str) -> Path:
        ck = f"zero_stage = 1\ncheckpoint_every = 2\ncheckpoint_dir = \"{tmp_path / (name + '-ck')}\"\n"
        return write_config(tmp_path, name, "dpo", batch_size=2, grad_accum=2, steps=4, train=ck)

    whole = ok(torchrun(2, str(cfg("whole"))))
    killed = ok(torchrun(2, str(cfg("killed")), extra={"PIVOT_INJECT_KILL": "3@1"}, restarts=1))
    assert "restart 1: resuming from" in killed.stderr and "killed-ck/step-000002" in killed.stderr, killed.stderr
    assert re.search(r"Signals\.SIGKILL|exitcode\s*:\s*-9", killed.stderr), f"rank 1 was not killed:\n{killed.stderr}"
    d, w = digests(killed), digests(whole)
    assert set(d) == {0, 1} and d[0] == d[1] == w[0], f"killed and restarted {d}, never killed {w}"
    assert_same_model(tmp_path / "killed", tmp_path / "whole")
    assert len(losses(tmp_path / "killed")) == 4, "the resumed log keeps the steps before the kill"


def safetensors_header(path: Path) -> dict:
    """The header (name → dtype, shape) without reading tensors (numpy has no bf16)."""
    import json
    import struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def test_zero1_in_bf16_equals_plain_bit_for_bit_and_its_fp32_master_reshards(tmp_path):
    """bf16 weights, so AdamW keeps an fp32 master copy, sharded by ZeRO-1. Without clipping (the
    only place where chunked and whole gradient norms round differently) ZeRO-1 and plain data
    parallel do the same arithmetic per element: bitwise-equal weights. A ZeRO-1 checkpoint (each
    rank's chunk of the fp32 master and moments) resumes under plain data parallel, where each rank
    rebuilds the whole state from both shards, again bit for bit."""
    def cfg(name: str, zero: int, extra: str = "") -> Path:
        train = f"zero_stage = {zero}\nmax_grad_norm = 1e9\n" + extra
        return write_config(tmp_path, name, "dpo", batch_size=2, grad_accum=1, steps=3, train=train, dtype="bf16")

    zero = ok(torchrun(2, str(cfg("zero", 1, f"checkpoint_every = 2\ncheckpoint_dir = \"{tmp_path / 'ck'}\"\n"))))
    plain = ok(torchrun(2, str(cfg("plain", 0))))
    resumed = ok(torchrun(2, str(cfg("resumed", 0, f"resume_from = \"{tmp_path / 'ck/step-000002'}\"\n"))))
    z, p, r = digests(zero), digests(plain), digests(resumed)
    assert set(z) == {0, 1} and len({*z.values(), *p.values(), *r.values()}) == 1, f"ZeRO-1 {z}, plain {p}, resumed {r}"
    assert all(b > 0 for b in sent_per_step(zero, "reduce-scattered")) and all(b == 0 for b in sent_per_step(plain, "reduce-scattered"))
    step = tmp_path / "ck/step-000002"
    model = safetensors_header(step / "model.safetensors")
    layout = json.loads((step / "optimizer_shards.json").read_text())
    name = "lm.model.embed_tokens.weight"
    i = next(i for i, seg in enumerate(layout["segments"]) if name in dict(seg["params"]))
    assert model[name]["dtype"] == "BF16" and layout["segments"][i]["master"], (model[name], layout["segments"][i])
    for shard in layout["shards"]:
        state = safetensors_header(step / shard["file"])
        chunk = layout["segments"][i]["chunk"]
        assert state[f"master.{i}"]["dtype"] == "F32" and state[f"master.{i}"]["shape"] == state[f"m.{i}"]["shape"] == [chunk], state


def test_nccl_names_a_missing_gpu_instead_of_crashing(tmp_path):
    """`backend = "nccl"` in a one-rank launch (the variables torchrun sets, without torchrun: this
    only checks set-up). Without a GPU: exit 1 (not a signal) naming the cause; with one (a GPU
    machine): the DPO steps run over NCCL."""
    cfg = write_config(tmp_path, "nccl", "dpo", 2, 1, steps=2, top='backend = "nccl"')
    gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    launch = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    p = subprocess.run([str(train_bin()), str(cfg)], capture_output=True, text=True, timeout=TIMEOUT, env=env() | launch)
    if gpu:
        assert re.search(r"rank 0/1: 2 steps, .* weights digest", ok(p).stdout), p.stdout
    else:
        assert p.returncode == 1, f"exit {p.returncode}\n{p.stderr}"
        assert "c10d NCCL needs a CUDA device, and none is visible" in p.stderr, p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage1_reports_both_parts_steps_as_one_count(tmp_path):
    """PIVOT_METRICS_JSONL (what `train::launch` follows) gets every step of stage 1: the projector
    part's, then the full part's numbered after them, with the losses log.csv records."""
    out, metrics = tmp_path / "s1", tmp_path / "metrics.jsonl"
    parts = "".join(f"[stage1.{part}]\nbatch_size = 2\nmax_steps = 2\nwarmup_ratio = 0.0\nlive = false\n" for part in ("projector", "full"))
    cfg = tmp_path / "s1.toml"
    cfg.write_text(f'stage = "stage1"\nthreads = 1\n[model]\nseed = 0\noutput = "{out}"\n[data]\nworld = {{ seed = 0, samples = 8 }}\n{parts}')
    ok(subprocess.run([str(train_bin()), str(cfg)], capture_output=True, text=True, timeout=TIMEOUT, env=env() | {"PIVOT_METRICS_JSONL": str(metrics)}))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4], rows
    np.testing.assert_allclose([dict(r["values"])["loss"] for r in rows], losses(out), rtol=1e-6)
