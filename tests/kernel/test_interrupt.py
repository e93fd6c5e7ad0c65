"""Interrupt of long prelude operations from a real Jupyter client: the operation stops at its
next check (between micro-batches, L-BFGS iterations), the cell fails with `Interrupted`, and the
model, the probe and unrelated variables are still there and usable. The kernel runs with a 3 s
grace period, so an operation that does not check in time is killed, and the test sees
"restarted" instead."""
from __future__ import annotations

import time

import pytest
from jupyter_client.manager import KernelManager

from pivot_testing import STARTUP_TIMEOUT

GRACE_SECS = 3


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
    km.start_kernel(env={**os.environ, "PIVOT_INTERRUPT_GRACE_SECS": str(GRACE_SECS)})
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
