"""Interrupt of long prelude operations from a real Jupyter client: the operation stops at its
next check (between micro-batches, L-BFGS iterations), the cell fails with `Interrupted`, and the
model, the probe and unrelated variables are still there and usable. The kernel runs with a 3 s
grace period, so an operation that does not check in time is killed, and the test sees
"restarted" instead. A torchrun launch of `pivot-train` (`pivot::train::launch`) must also end
every rank it started."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from pivot_testing import STARTUP_TIMEOUT, chained_kernel_env

# The chain's interrupt grace period (`chained_kernel_env`).
GRACE_SECS = int(chained_kernel_env()["PIVOT_INTERRUPT_GRACE_SECS"])


def run(kc, code: str, timeout: float = 120):
    outputs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append)
    return reply["content"], outputs


def stdout_of(msgs) -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def ok(kc, code: str) -> str:
    reply, msgs = run(kc, code)
    assert reply["status"] == "ok", reply
    return stdout_of(msgs)


def interrupt_after_marker(km, kc, code: str, marker: str, delay: float = 1.5):
    """Runs `code`, interrupts `delay` s after it printed `marker` (so it is running, not
    compiling); returns (reply content, seconds from the interrupt to the reply)."""
    msg_id = kc.execute(code)
    interrupted_at = None
    deadline = time.time() + 300
    while time.time() < deadline:
        m = kc.get_iopub_msg(timeout=300)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
        if interrupted_at is None and m["msg_type"] == "stream" and marker in m["content"]["text"]:
            time.sleep(delay)
            km.interrupt_kernel()
            interrupted_at = time.time()
    assert interrupted_at is not None, f"the cell never printed {marker!r}"
    reply = kc.get_shell_msg(timeout=60)
    return reply["content"], time.time() - interrupted_at


@pytest.fixture(scope="module")
def kernel():
    import os

    km = KernelManager(kernel_name="pivot")
    # The suite's chain (`chained_kernel_env`), whose interrupt grace is GRACE_SECS.
    km.start_kernel(env=chained_kernel_env())
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    reply, _ = run(kc, "let _warm = 1;", timeout=STARTUP_TIMEOUT)
    assert reply["status"] == "ok", reply
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def assert_cooperative(reply):
    assert reply["status"] == "error", reply
    assert reply["ename"] == "Interrupted", reply
    # Stopped by its own check, not by the kill after the grace period.
    assert "restarted" not in reply["evalue"], reply["evalue"]
    assert "interrupted by the user at" in reply["evalue"], reply["evalue"]


def test_interrupt_stops_a_long_training_step_and_keeps_the_model(kernel):
    """One SFT step of 4096 micro-batches on the tiny model (far longer than 20 s), interrupted
    1.5 s in: it stops at the next micro-batch; the model has its weights of before the step."""
    km, kc = kernel
    ok(
        kc,
        "let keep_me: Vec<u32> = vec![4, 5, 6];\n"
        "let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(0));\n"
        "let mut mllm: Mllm = Mllm::tiny(Device::Cpu);\n"
        "let data: VqaDataset = VqaDataset::new(world.vqa(Split::Train, 64).samples.iter().cycle().take(4096).cloned().collect());\n"
        "let logp_before: f64 = {\n"
        "    let s = &data.samples[0];\n"
        "    let px = mllm.preprocess(&[s.image.load()?])?;\n"
        "    let enc = mllm.encode_chat(&s.question, Some(&s.answer))?;\n"
        "    mllm.sequence_logps(&mllm.forward(&px, &[enc], &[0])?)?.double_value(&[0])\n"
        "};",
    )
    step = (
        "let mut sft = SftTrainer::new(SftConfig::default().max_steps(1).batch_size(1).grad_accum(4096).lr(1e-3).quiet());\n"
        'println!("training");\n'
        "sft.run(&mut mllm, &data)?;"
    )
    reply, _ = interrupt_after_marker(km, kc, step, "training")
    assert_cooperative(reply)
    out = ok(
        kc,
        "let logp_after: f64 = {\n"
        "    let s = &data.samples[0];\n"
        "    let px = mllm.preprocess(&[s.image.load()?])?;\n"
        "    let enc = mllm.encode_chat(&s.question, Some(&s.answer))?;\n"
        "    mllm.sequence_logps(&mllm.forward(&px, &[enc], &[0])?)?.double_value(&[0])\n"
        "};\n"
        'println!("{} {} {}", logp_after == logp_before, keep_me.iter().sum::<u32>(), world.vqa(Split::Val, 2).len());',
    )
    assert out.split() == ["true", "15", "2"], out


def test_interrupt_stops_an_lbfgs_fit_and_keeps_the_probe(kernel):
    """A logistic-regression fit on ill-conditioned features with no stopping tolerance (it would
    run for minutes), warm-started from an earlier probe: interrupted, the earlier probe predicts
    as before and the data and an unrelated variable are intact."""
    km, kc = kernel
    ok(
        kc,
        "let keep_me_too: Vec<u32> = vec![7, 8, 9];\n"
        "tch::manual_seed(0);\n"
        "let xs: Tensor = Tensor::randn(&[20000, 256], (Kind::Float, Device::Cpu)) * Tensor::linspace(-6.9, 6.9, 256, (Kind::Float, Device::Cpu)).exp();\n"
        "let ys: Tensor = Tensor::randint(10, &[20000], (Kind::Int64, Device::Cpu));\n"
        "let few: LbfgsOptions = LbfgsOptions { max_iter: 5, ..Default::default() };\n"
        "let probe: LogisticRegression = LogisticRegression::fit_with(&xs.narrow(0, 0, 500), &ys.narrow(0, 0, 500), 1.0, few, Some(10), None)?;\n"
        "let pred_before: Tensor = probe.predict(&xs.narrow(0, 0, 100));",
    )
    fit = (
        "let endless = LbfgsOptions { max_iter: 1_000_000, max_eval: 100_000_000, tolerance_grad: 0.0, tolerance_change: 0.0, ..Default::default() };\n"
        'println!("fitting");\n'
        "let big: LogisticRegression = LogisticRegression::fit_with(&xs, &ys, 1e4, endless, Some(10), Some(&probe))?;"
    )
    reply, _ = interrupt_after_marker(km, kc, fit, "fitting")
    assert_cooperative(reply)
    assert "L-BFGS iteration" in reply["evalue"], reply["evalue"]
    out = ok(kc, 'println!("{} {} {}", probe.predict(&xs.narrow(0, 0, 100)).equal(&pred_before), keep_me_too.iter().sum::<u32>(), ys.size()[0]);')
    assert out.split() == ["true", "24", "20000"], out


def pivot_train_bin() -> Path:
    """PIVOT_TRAIN_BIN (the Makefile sets it), else the prelude's test build in warm slot 0."""
    env = os.environ.get("PIVOT_TRAIN_BIN")
    if env:
        return Path(env)
    host = re.search(r"^host: (\S+)", subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout, re.M).group(1)
    cache = Path(os.environ.get("PIVOT_CACHE_DIR", Path.home() / ".cache/pivot-lab"))
    path = cache / "slots/0/target" / host / "debug/pivot-train"
    if not path.exists():
        raise RuntimeError(f"pivot-train is not built at {path}: run `make train-bin` or set PIVOT_TRAIN_BIN")
    return path


def live_processes_naming(needle: str) -> dict[int, list[str]]:
    """pid -> argv of every live (not zombie) process whose command line names `needle`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if state not in ("Z", "X") and any(needle in a for a in args):
            found[int(entry)] = args
    return found


def test_interrupt_stops_every_rank_of_a_launched_run(kernel, tmp_path):
    """A 2-rank torchrun run of pivot-train (DPO, 100000 steps) launched from a cell, interrupted
    after its second step: the cell fails with `Interrupted` (the launcher's own stop, not the
    kernel's kill), torchrun and both ranks seen running before are gone when it has, and the
    variables of before are usable, as is the run's last checkpoint."""
    km, kc = kernel
    config = tmp_path / "endless.toml"
    config.write_text(
        'stage = "dpo"\nthreads = 1\n[model]\nseed = 0\n[data]\nworld = { seed = 0, samples = 16 }\n'
        "[dpo.train]\nlr = 1e-3\nbatch_size = 1\nmax_steps = 100000\nlive = false\n"
        f"checkpoint_every = 1\ncheckpoint_dir = {json.dumps(str(tmp_path / 'ckpt'))}\n"
    )
    ok(kc, "let keep_launch: Vec<u32> = vec![1, 2, 3];\nlet mllm_launch: Mllm = Mllm::tiny(Device::Cpu);")
    launch = (
        f"let run = pivot::train::launch::Launch::new({json.dumps(str(config))}, 2).bin({json.dumps(str(pivot_train_bin()))})\n"
        '    .env("OMP_NUM_THREADS", "1").grace(std::time::Duration::from_secs(2))\n'
        '    .on_step(|r| println!("launched step {}", r.step)).run()?;'
    )
    msg_id = kc.execute(launch)
    running, interrupted_at, said = {}, None, []
    deadline = time.time() + 300
    while time.time() < deadline:
        m = kc.get_iopub_msg(timeout=300)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
        if m["msg_type"] in ("stream", "error"):
            said.append(m["content"].get("text") or "\n".join(m["content"].get("traceback", [])))
        if interrupted_at is None and m["msg_type"] == "stream" and "launched step 2" in m["content"]["text"]:
            running = live_processes_naming(str(config))
            km.interrupt_kernel()
            interrupted_at = time.time()
    assert interrupted_at is not None, "the launched run never reached step 2"
    reply = kc.get_shell_msg(timeout=60)["content"]
    took = time.time() - interrupted_at
    ranks = [pid for pid, argv in running.items() if Path(argv[0]).name == "pivot-train"]
    assert len(ranks) == 2 and len(running) >= 3, f"expected torchrun and 2 ranks running: {running}"
    assert reply["status"] == "error" and reply["ename"] == "Interrupted", (reply, "".join(said)[-3000:])
    assert_cooperative(reply)
    assert "pivot-train ×2" in reply["evalue"] and "every rank has ended" in reply["evalue"], reply["evalue"]
    assert took < 30, f"the cell took {took:.1f} s to end after the interrupt"
    left = {pid: argv for pid, argv in live_processes_naming(str(config)).items()}
    assert not left, f"processes of the interrupted launch outlive the cell: {left} (running before: {running})"
    out = ok(
        kc,
        f"let state = pivot::train::launch::load_checkpoint(&mllm_launch, {json.dumps(str(tmp_path / 'ckpt'))})?;\n"
        'println!("{} {} {}", state.step >= 1, keep_launch.iter().sum::<u32>(), mllm_launch.summary().is_empty());',
    )
    assert out.split() == ["true", "6", "false"], out
