"""The kernel driven by real Jupyter clients: nbclient notebooks, raw sockets, interrupts,
several kernels at once, and the headless `pivot-kernel run`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import nbformat
import pytest
import zmq
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from pivot_testing import STARTUP_TIMEOUT, Spare, chained_kernel_env

# A 1x1 PNG, as a plot would produce.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a5f64a5a0000000049454e44ae426082"
)


def start_kernel():
    """A kernel of the suite's chain (`chained_kernel_env`: 3 s interrupt grace, a recycled engine
    when one is waiting)."""
    km = KernelManager(kernel_name="pivot")
    # jupyter_client uses `env` as the whole environment, not as additions.
    km.start_kernel(env=chained_kernel_env())
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc


def run(kc, code: str, timeout: float = 60, **kw):
    """Executes `code`; returns (reply content, list of iopub messages before idle)."""
    outputs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append, **kw)
    return reply["content"], outputs


def of_type(msgs, t):
    return [m for m in msgs if m["msg_type"] == t]


def text_of(msgs, name="stdout"):
    return "".join(m["content"]["text"] for m in of_type(msgs, "stream") if m["content"]["name"] == name)


@pytest.fixture(scope="module")
def kernel():
    km, kc = start_kernel()
    reply, _ = run(kc, "let _warm = 1;", timeout=STARTUP_TIMEOUT)
    assert reply["status"] == "ok", reply
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


# ------------------------------------------------------------------------------------------
# Errors


def test_compile_error_has_name_value_traceback(kernel):
    _, kc = kernel
    reply, msgs = run(kc, 'let x: i32 = "a";')
    assert reply["status"] == "error"
    assert reply["ename"].startswith("CompileError")
    assert "mismatched types" in reply["evalue"]
    assert reply["traceback"]
    assert len(of_type(msgs, "error")) == 1


def test_question_mark_error_is_an_error(kernel):
    _, kc = kernel
    reply, msgs = run(kc, 'let r: Result<i32, String> = Err("bad input".to_string());\nlet v = r?;')
    assert reply["status"] == "error", reply
    assert "bad input" in reply["evalue"]
    # The text is the error, not stray stderr.
    assert "bad input" not in text_of(msgs, "stderr")


def test_panic_keeps_earlier_variables(kernel):
    _, kc = kernel
    assert run(kc, "let kept = vec![1, 2, 3];")[0]["status"] == "ok"
    reply, msgs = run(kc, 'let lost = 5;\nif kept.len() == 3 { panic!("boom {}", kept.len()); }')
    assert reply["status"] == "error" and reply["ename"] == "Panic"
    assert reply["evalue"] == "boom 3"
    reply, msgs = run(kc, 'println!("{}", kept.len());')
    assert reply["status"] == "ok"
    assert text_of(msgs).strip() == "3"


def test_stop_on_error_aborts_queued_cells(kernel):
    _, kc = kernel
    first = kc.execute('panic!("first fails");')
    second = kc.execute("1 + 1")
    replies = {}
    while len(replies) < 2:
        msg = kc.get_shell_msg(timeout=60)
        replies[msg["parent_header"]["msg_id"]] = msg["content"]
    assert replies[first]["status"] == "error"
    assert replies[second]["status"] == "aborted"
    # Drain iopub so later tests start clean.
    time.sleep(0.5)
    while True:
        try:
            kc.get_iopub_msg(timeout=0.2)
        except Exception:
            break


def test_execution_count_only_counts_stored_history(kernel):
    _, kc = kernel
    a, _ = run(kc, "1")
    b, _ = run(kc, "2", store_history=False)
    c, _ = run(kc, "3", silent=True)
    d, _ = run(kc, "4")
    assert b["execution_count"] == a["execution_count"]
    assert c["execution_count"] == a["execution_count"]
    assert d["execution_count"] == a["execution_count"] + 1


def test_silent_publishes_no_input_or_result(kernel):
    _, kc = kernel
    reply, msgs = run(kc, "40 + 2", silent=True)
    assert reply["status"] == "ok"
    assert not of_type(msgs, "execute_input") and not of_type(msgs, "execute_result")


# ------------------------------------------------------------------------------------------
# user_expressions and stdin


def test_user_expressions_ok_and_error(kernel):
    _, kc = kernel
    exprs = {
        "len": "ue_v.len()",
        "text": '"a:b".to_string()',
        "vec": "ue_v.iter().map(|x| x * 10).collect::<Vec<_>>()",
        "bad": "no_such_variable + 1",
        "panics": "ue_v[10]",
    }
    reply, msgs = run(kc, "let ue_v = vec![1, 2, 3];", user_expressions=exprs)
    assert reply["status"] == "ok", reply
    ue = reply["user_expressions"]
    assert set(ue) == set(exprs)
    assert ue["len"] == {"status": "ok", "data": {"text/plain": "3"}, "metadata": {}}
    assert ue["text"]["data"]["text/plain"] == '"a:b"'
    assert ue["vec"]["data"]["text/plain"] == "[10, 20, 30]"
    assert ue["bad"]["status"] == "error"
    assert ue["bad"]["ename"].startswith("CompileError")
    assert "no_such_variable" in ue["bad"]["evalue"]
    assert isinstance(ue["bad"]["traceback"], list) and ue["bad"]["traceback"]
    assert ue["panics"]["status"] == "error" and ue["panics"]["ename"] == "Panic", ue["panics"]
    # Nothing of the expressions reaches iopub: no output, no error, no second execute_input.
    assert [m["msg_type"] for m in msgs if m["msg_type"] != "status"] == ["execute_input"], msgs
    # Neither the counter nor the session suffered.
    after, out = run(kc, "ue_v.len()")
    assert after["status"] == "ok"
    assert after["execution_count"] == reply["execution_count"] + 1
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "3"


def test_user_expressions_skipped_when_cell_fails(kernel):
    _, kc = kernel
    reply, _ = run(kc, 'panic!("cell fails");', user_expressions={"x": "1 + 1"})
    assert reply["status"] == "error"
    assert not reply.get("user_expressions")


def test_stdin_input_request_is_answered(kernel):
    _, kc = kernel
    requests = []

    def answer(msg):
        requests.append(msg)
        kc.input("Ada Lovelace" if not msg["content"]["password"] else "s3cret")

    code = (
        'let who = pivot::runtime::input("Your name: ");\n'
        'let pw = pivot::runtime::input_password("Password: ");\n'
        'println!("hello {who} ({} chars)", pw.len());'
    )
    reply, msgs = run(kc, code, allow_stdin=True, stdin_hook=answer)
    assert reply["status"] == "ok", reply
    assert [m["content"] for m in requests] == [
        {"prompt": "Your name: ", "password": False},
        {"prompt": "Password: ", "password": True},
    ]
    assert requests[0]["parent_header"]["msg_type"] == "execute_request"
    assert text_of(msgs).strip() == "hello Ada Lovelace (6 chars)"
    after, out = run(kc, "who.len()")
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "12"


def test_stdin_not_allowed_gives_empty_string(kernel):
    _, kc = kernel

    def unexpected(msg):
        raise AssertionError(f"input_request although allow_stdin=False: {msg}")

    reply, msgs = run(kc, 'let got = pivot::runtime::input("Name: ");\nprintln!("[{got}]");', allow_stdin=False, stdin_hook=unexpected)
    assert reply["status"] == "ok", reply
    assert text_of(msgs).strip() == "[]"
    assert "does not allow stdin" in text_of(msgs, "stderr")


def test_outputs_in_order_with_parent(kernel):
    _, kc = kernel
    code = 'println!("a");\ndisplay(&MimeBundle::text("mid"));\nprintln!("b");\nclear_output(true);\nprintln!("c");'
    msg_id = kc.execute(code)
    seen = []
    while True:
        m = kc.get_iopub_msg(timeout=60)
        assert m["parent_header"].get("msg_id") == msg_id, m
        seen.append(m)
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    kinds = [m["msg_type"] for m in seen]
    assert kinds[0] == "status" and kinds[1] == "execute_input"
    body = [(m["msg_type"], m["content"].get("text") or m["content"].get("data", {}).get("text/plain")) for m in seen[2:-1]]
    assert body == [("stream", "a\n"), ("display_data", "mid"), ("stream", "b\n"), ("clear_output", None), ("stream", "c\n")]
    assert kc.get_shell_msg(timeout=10)["content"]["status"] == "ok"


def test_tensor_value_shows_its_values(kernel):
    """A cell ending in a tensor shows PyTorch-style values (not tch's `Tensor[[1, 2], Float]`),
    from a fresh expression and from a stored variable, and a later `{:?}` cell still works."""
    _, kc = kernel
    reply, msgs = run(kc, "Tensor::from_slice(&[1.5f32, 2.0]).reshape([1, 2])")
    assert reply["status"] == "ok", reply
    results = of_type(msgs, "execute_result")
    assert [r["content"]["data"]["text/plain"] for r in results] == ["tensor([[1.5000, 2.0000]])"]
    reply, msgs = run(kc, "let shown = Tensor::from_slice(&[1i64, 2, 3]).to_kind(Kind::Int);\nshown")
    assert reply["status"] == "ok", reply
    assert [r["content"]["data"]["text/plain"] for r in of_type(msgs, "execute_result")] == ["tensor([1, 2, 3], dtype=Int)"]
    reply, msgs = run(kc, "shown.size()")
    assert [r["content"]["data"]["text/plain"] for r in of_type(msgs, "execute_result")] == ["[3]"]


def test_engine_types_lets_over_the_prelude(kernel):
    """The engine's own analysis names the types of a cell's `let`s over the prelude (evcxr's
    rust-analyzer sees only the standard library): a destructuring `let`, a `mut` one and a
    shadowed one keep their variables, which later cells use; completion and hover know the
    prelude; a compile error on the line of a typed `let` shows the line as the user wrote it."""
    _, kc = kernel
    reply, _ = run(kc, "let (typed_t, typed_n) = (Tensor::ones([2, 3], (Kind::Float, Device::Cpu)), 3usize);\n"
                       "let mut typed_v = vec![typed_t.shallow_clone()];\nlet typed_n = typed_n as f64 * 0.5;")
    assert reply["status"] == "ok", reply
    reply, msgs = run(kc, "typed_v.push(typed_t.shallow_clone());\n(typed_v.len(), typed_n, typed_t.size())")
    assert reply["status"] == "ok", reply
    assert [r["content"]["data"]["text/plain"] for r in of_type(msgs, "execute_result")] == ["(2, 1.5, [2, 3])"]
    reply, msgs = run(kc, ":vars")
    listing = text_of(msgs) + "".join(r["content"]["data"].get("text/plain", "") for r in of_type(msgs, "display_data") + of_type(msgs, "execute_result"))
    for name, ty in [("typed_t", "Tensor"), ("typed_n", "f64"), ("typed_v", "Vec<Tensor>")]:
        assert name in listing and ty in listing, listing

    code = "typed_t.si"
    msg_id = kc.complete(code, len(code))
    reply = kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    content = reply["content"]
    assert content["status"] == "ok" and "size" in [m.split("(")[0] for m in content["matches"]], content
    assert (content["cursor_start"], content["cursor_end"]) == (len("typed_t."), len(code))
    code = "Tensor::ones"
    kc.inspect(code, len(code))
    reply = kc.get_shell_msg(timeout=60)["content"]
    assert reply["status"] == "ok" and reply["found"], reply
    assert "ones" in reply["data"]["text/plain"], reply

    reply, _ = run(kc, "let typed_s = typed_t.size();\nlet typed_bad: u8 = typed_s;")
    assert reply["status"] == "error" and "mismatched types" in reply["evalue"], reply
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["traceback"]))
    assert "2 │ let typed_bad: u8 = typed_s;\n" in shown and "= typed_bad;" not in shown, shown


def test_comms_and_unknown_targets(kernel):
    _, kc = kernel
    msg = kc.session.msg("comm_info_request", {})
    kc.shell_channel.send(msg)
    reply = kc.get_shell_msg(timeout=10)
    assert reply["content"] == {"status": "ok", "comms": {}}
    comm_id = uuid.uuid4().hex
    kc.shell_channel.send(kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "nope", "data": {}}))
    deadline = time.time() + 10
    while time.time() < deadline:
        m = kc.get_iopub_msg(timeout=10)
        if m["msg_type"] == "comm_close":
            assert m["content"]["comm_id"] == comm_id
            break
    else:
        pytest.fail("no comm_close for an unknown target")


# ------------------------------------------------------------------------------------------
# Malformed input on the wire


def _raw_shell(km):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    info = km.get_connection_info()
    sock.connect(f"{info['transport']}://{info['ip']}:{info['shell_port']}")
    return sock


@pytest.mark.parametrize("kind", ["forged", "truncated", "garbage"])
def test_bad_messages_are_dropped_and_kernel_keeps_serving(kernel, kind):
    km, kc = kernel
    sock = _raw_shell(km)
    session = kc.session
    header = session.pack(session.msg_header("kernel_info_request"))
    parts = [header, b"{}", b"{}", b"{}"]
    if kind == "forged":
        frames = [b"<IDS|MSG>", b"0" * 64] + parts
    elif kind == "truncated":
        frames = [b"<IDS|MSG>", session.sign(parts), header]
    else:
        garbage = [b"{not json", b"{}", b"{}", b"{}"]
        frames = [b"<IDS|MSG>", session.sign(garbage)] + garbage
    sock.send_multipart(frames)
    assert sock.poll(1500) == 0, "the kernel answered a message it should have dropped"
    sock.close(linger=0)
    # Still alive and answering.
    assert km.is_alive()
    kc.kernel_info()
    reply = kc.get_shell_msg(timeout=10)
    assert reply["msg_type"] == "kernel_info_reply"
    assert run(kc, "2 * 21")[0]["status"] == "ok"


# ------------------------------------------------------------------------------------------
# Interrupt


def run_and_interrupt_when(km, kc, code: str, ready, timeout: float = 300):
    """Runs `code`, interrupts once an iopub message satisfies `ready` (so the cell is running,
    not compiling), and returns (reply content, outputs)."""
    msg_id = kc.execute(code)
    outputs, interrupted = [], False
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = kc.get_iopub_msg(timeout=timeout)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
        outputs.append(m)
        if not interrupted and ready(m):
            time.sleep(0.5)
            km.interrupt_kernel()
            interrupted = True
    assert interrupted, "the cell never showed that it runs"
    reply = kc.get_shell_msg(timeout=30)
    return reply["content"], outputs


def test_interrupt_stops_training_loop_and_keeps_state(kernel):
    km, kc = kernel
    assert run(kc, "let mut losses: Vec<f64> = Vec::new();\nlet mut w = Tensor::zeros(&[2], (Kind::Float, Device::Cpu));")[0]["status"] == "ok"
    loop = (
        "let mut bar = Progress::new(\"train\", 0);\n"
        "loop {\n"
        "    check_interrupt(\"training\")?;\n"
        "    w += 1.0;\n"
        "    losses.push(1.0 / (losses.len() as f64 + 1.0));\n"
        "    bar.set(losses.len() as u64, format!(\"loss {:.3}\", losses.last().unwrap()));\n"
        "    std::thread::sleep(std::time::Duration::from_millis(20));\n"
        "}"
    )
    t0 = time.time()
    reply, msgs = run_and_interrupt_when(km, kc, loop, lambda m: m["msg_type"] in ("display_data", "update_display_data"))
    assert reply["status"] == "error", reply
    assert reply["ename"] == "Interrupted", reply
    # The live progress bar was updated in place while the loop ran.
    assert of_type(msgs, "update_display_data")
    reply, msgs = run(kc, 'println!("{} {}", losses.len(), w.sum(Kind::Float).double_value(&[]));')
    assert reply["status"] == "ok", reply
    n, s = text_of(msgs).split()
    assert int(n) > 0 and float(s) == 2 * int(n)


def test_interrupt_escalates_when_cell_ignores_it(kernel):
    km, kc = kernel
    assert run(kc, "let before = 7;")[0]["status"] == "ok"
    code = 'println!("looping");\nloop { std::thread::sleep(std::time::Duration::from_millis(50)); }'
    reply, msgs = run_and_interrupt_when(km, kc, code, lambda m: m["msg_type"] == "stream")
    assert reply["status"] == "error"
    assert reply["ename"] == "Interrupted" and "restarted" in reply["evalue"]
    assert "before" in reply["evalue"]
    # The user was warned before the kill, with what would be lost and how to restart at once.
    warning = text_of(msgs, "stderr")
    assert "still running" in warning and "before" in warning and "Interrupt again" in warning, warning
    # The kernel lives on with a fresh process; the prelude is still in scope.
    reply, msgs = run(kc, 'display(&MimeBundle::text("after restart"));')
    assert reply["status"] == "ok", reply
    reply, msgs = run(kc, 'panic!("hook back");')
    assert reply["ename"] == "Panic"


# ------------------------------------------------------------------------------------------
# Notebooks


def make_notebook(cells: list[str]):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "pivot", "display_name": "Rust (PIVOT)", "language": "rust"}
    return nb


NOTEBOOK_CELLS = [
    f"let png: Vec<u8> = vec!{list(PNG)};\nlet plot = display(&MimeBundle::text(\"<plot>\").with_png(&png));",
    'display(&MimeBundle::text("a table").with_html("<table><tr><th>lr</th><th>acc</th></tr><tr><td>1e-3</td><td>0.91</td></tr></table>"));',
    'let live = display(&MimeBundle::text("epoch 0"));\nfor i in 1..=3 { live.update(&MimeBundle::text(format!("epoch {i}"))); }',
    'let mut p = Progress::new("steps", 5);\nfor _ in 0..5 { p.inc(); }\np.finish();',
    'println!("done");\n6 * 7',
]


def check_notebook_outputs(nb):
    c = nb.cells
    png = c[0].outputs[0]
    assert png.output_type == "display_data" and "image/png" in png.data
    assert "<table>" in c[1].outputs[0].data["text/html"]
    assert c[2].outputs[0].data["text/plain"] == "epoch 3"
    assert "<progress" in c[3].outputs[0].data["text/html"]
    assert "5/5" in c[3].outputs[0].data["text/plain"]
    kinds = [o.output_type for o in c[4].outputs]
    assert kinds == ["stream", "execute_result"]
    assert c[4].outputs[1].data["text/plain"] == "42"


def test_nbclient_executes_notebook_with_rich_outputs(tmp_path):
    nb = make_notebook(NOTEBOOK_CELLS)
    NotebookClient(nb, kernel_name="pivot", timeout=STARTUP_TIMEOUT, startup_timeout=120).execute(env=chained_kernel_env())
    check_notebook_outputs(nb)
    assert nb.metadata["language_info"]["name"] == "rust"
    path = tmp_path / "out.ipynb"
    nbformat.write(nb, path)
    nbformat.validate(nbformat.read(path, as_version=4))


def test_nbclient_raises_on_panicking_cell():
    nb = make_notebook(['println!("ok");', 'panic!("cell failed on purpose");', 'println!("never");'])
    client = NotebookClient(nb, kernel_name="pivot", timeout=STARTUP_TIMEOUT, startup_timeout=120)
    with pytest.raises(CellExecutionError) as e:
        client.execute(env=chained_kernel_env())
    assert "cell failed on purpose" in str(e.value)
    assert nb.cells[2].outputs == []


def test_headless_run_writes_outputs_and_fails_on_error(tmp_path, kernel_bin_path):
    """`pivot-kernel run`: the first run starts its own engine (PIVOT_NO_SPARE=1). Meanwhile a spare
    of the runs' configuration warms up (`pivot-kernel spare`, PIVOT_SPARE_ENGINE=1); the second
    run adopts it and the third the same engine, recycled after the second. Each launcher exits
    with its own run's status."""
    env = {**os.environ, "PIVOT_SPARE_ENGINE": "1"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(make_notebook(NOTEBOOK_CELLS), path)
    first = subprocess.Popen([str(kernel_bin_path), "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env={**env, "PIVOT_NO_SPARE": "1"})
    spare = Spare([str(kernel_bin_path), "spare"], env, cwd=str(tmp_path))
    try:
        out, err = first.communicate(timeout=STARTUP_TIMEOUT)
        assert first.returncode == 0, err
        assert "adopted spare engine" not in err, err
        check_notebook_outputs(nbformat.read(path, as_version=4))

        bad = tmp_path / "bad.ipynb"
        nbformat.write(make_notebook(["let a = 1;", 'panic!("nope");', "a"]), bad)
        r = subprocess.run([str(kernel_bin_path), "run", str(bad)], capture_output=True, text=True, timeout=STARTUP_TIMEOUT, cwd=tmp_path, env=env)
        assert f"adopted spare engine pid {spare.pid} for run {bad}" in r.stderr, r.stderr
        assert r.returncode != 0 and "cell 2 failed" in r.stderr, r.stderr
        out = nbformat.read(bad, as_version=4)
        assert out.cells[1].outputs[0].output_type == "error"
        r = subprocess.run([str(kernel_bin_path), "run", str(bad), "--allow-errors", "-p", "a=41"], capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT, cwd=tmp_path, env=env)
        assert f"adopted spare engine pid {spare.pid} for run {bad}" in r.stderr, r.stderr
        assert r.returncode == 0, r.stderr
        # Past the failing cell: the injected parameter cell comes first, then `let a = 1;`.
        cells = nbformat.read(bad, as_version=4).cells
        assert cells[0].source == "let a = 41;\n" and cells[3].outputs[0].data["text/plain"] == "1", cells
    finally:
        spare.stop()
        if first.poll() is None:
            first.kill()


# ------------------------------------------------------------------------------------------
# Several kernels


def test_two_kernels_at_once_use_separate_slots():
    kernels = [start_kernel(), start_kernel()]
    try:
        results = [None, None]

        def go(i):
            _, kc = kernels[i]
            results[i] = run(kc, 'println!("{}", std::env::var("EVCXR_TMPDIR").unwrap());', timeout=STARTUP_TIMEOUT)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        dirs = []
        for reply, msgs in results:
            assert reply["status"] == "ok", reply
            dirs.append(text_of(msgs).strip())
        assert dirs[0] != dirs[1] and all("slots" in d for d in dirs)
    finally:
        for km, kc in kernels:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
