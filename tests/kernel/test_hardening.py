"""Network input never crashes the kernel; replayed messages are refused; `pivot-kernel run` never
destroys the notebook it rewrites. One test per finding of the hardening review, each against a
live kernel with its engine disabled (see zmtp.LiveKernel: seconds per test, no Rust compiled)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import pytest

from zmtp import FLAG_MORE, LiveKernel, Peer, await_reply, frame, frame_header, request


@pytest.fixture
def kernel(kernel_bin_path, tmp_path):
    with LiveKernel(kernel_bin_path, tmp_path) as k:
        yield k


def assert_serving(k: LiveKernel) -> None:
    time.sleep(0.3)  # a kernel that is aborting gets the time to finish
    assert k.alive(), f"kernel died: {k.stderr()[-2000:]}"
    assert k.heartbeat()
    with Peer(k.ports["shell"]) as shell:
        reply = k.ask(shell, "kernel_info_request", {})
    assert reply and reply["msg_type"] == "kernel_info_reply"


@pytest.mark.parametrize("port", ["hb", "shell", "control", "stdin", "iopub"])
def test_frame_declaring_2_pow_50_bytes_drops_the_peer_not_the_kernel(kernel, port):
    """Before authentication: a 9-byte frame header declaring 2^50 bytes. The kernel used to
    reserve that much at once ('memory allocation of 1125899906908169 bytes failed', abort)."""
    kind = {"hb": b"REQ", "iopub": b"SUB"}.get(port, b"DEALER")
    with Peer(kernel.ports[port], kind) as attacker:
        attacker.send_raw(frame_header(2**50, long=True))
        assert attacker.closed_by_kernel(), "the kernel kept a peer that declared a 2^50-byte frame"
    assert_serving(kernel)


def test_endless_multipart_message_drops_the_peer(kernel):
    """A message of ever more empty frames (2 bytes each on the wire) used to be buffered without
    bound; the kernel now closes the connection once a message has too many frames."""
    with Peer(kernel.ports["shell"]) as attacker:
        attacker.send_raw(frame(b"", more=True) * 20_000)
        assert attacker.closed_by_kernel()
    assert_serving(kernel)


def test_message_over_the_size_limit_drops_the_peer(kernel):
    """Frames that are each allowed but together exceed the message limit (64 MiB)."""
    chunk = b"x" * (8 << 20)
    with Peer(kernel.ports["shell"]) as attacker:
        try:
            for _ in range(9):
                attacker.send_raw(frame_header(len(chunk), more=True) + chunk)
        except OSError:
            pass  # closed by the kernel while we were still sending
        assert attacker.closed_by_kernel()
    assert_serving(kernel)


def test_reserved_flag_bits_drop_the_peer(kernel):
    with Peer(kernel.ports["control"]) as attacker:
        attacker.send_raw(bytes([0xF0 | FLAG_MORE, 1]) + b"x")
        assert attacker.closed_by_kernel()
    assert_serving(kernel)


def test_replayed_signature_is_refused_on_every_socket(kernel):
    """jupyter_client refuses a signature it has seen; so does the kernel now, across sockets."""
    msg_id, frames = request(kernel.signer, "kernel_info_request", {})
    with Peer(kernel.ports["shell"]) as shell, Peer(kernel.ports["control"]) as control:
        shell.send_multipart(frames)
        assert await_reply(shell, msg_id, 10) is not None
        shell.send_multipart(frames)
        assert await_reply(shell, msg_id, 2) is None, "a replayed request was answered"
        control.send_multipart(frames)
        assert await_reply(control, msg_id, 2) is None, "a request replayed on control was answered"
        # A fresh request with the same content (new msg_id, so a new signature) is answered.
        assert kernel.ask(shell, "kernel_info_request", {})["msg_type"] == "kernel_info_reply"
    assert "replay" in kernel.stderr().lower()


def test_unsolicited_input_replies_are_not_kept(kernel):
    """Correctly signed input_reply messages on stdin while no cell waits for input. Each used to
    stay queued for the life of the kernel (with the read buffer its frames pointed into): the
    wire fuzzer's RSS grew 2 KB per such message. Now only the reply to a pending input_request
    is taken; these are dropped."""
    value = "v" * 8192
    with Peer(kernel.ports["stdin"]) as peer:
        for _ in range(50):
            peer.send_multipart(request(kernel.signer, "input_reply", {"value": value})[1])
        time.sleep(0.5)
        before = kernel.rss_kib()
        for _ in range(2000):  # 16 MB of values
            peer.send_multipart(request(kernel.signer, "input_reply", {"value": value})[1])
        assert kernel.heartbeat()
        time.sleep(1)
        grown_kib = kernel.rss_kib() - before
    # Kept, 2,000 replies hold over 16 MB; dropped, what remains is the replay history's
    # 2,000 signatures (about 100 bytes each) and allocator slack.
    assert grown_kib < 4096, f"RSS grew {grown_kib} KiB over 2,000 unsolicited input_reply messages"
    assert "no input_request is waiting" in kernel.stderr()
    assert_serving(kernel)


def warned(k: LiveKernel) -> bool:
    # The warning is printed before the sockets are served, so a ready kernel has printed it.
    text = k.stderr().lower()
    return "warning" in text and "empty key" in text


def test_warns_when_serving_beyond_loopback_without_a_key(kernel_bin_path, tmp_path):
    with LiveKernel(kernel_bin_path, tmp_path / "open", key="", ip="0.0.0.0") as k:
        assert warned(k), k.stderr()
        assert "0.0.0.0" in k.stderr()
    with LiveKernel(kernel_bin_path, tmp_path / "loopback", key="", ip="127.0.0.1") as k:
        assert not warned(k), k.stderr()
    with LiveKernel(kernel_bin_path, tmp_path / "keyed", key="k", ip="0.0.0.0") as k:
        assert not warned(k), k.stderr()


def test_run_never_leaves_a_half_written_notebook(kernel_bin_path, tmp_path):
    """`pivot-kernel run NB` rewrites NB. A write that fails half-way (here: RLIMIT_FSIZE, as a
    full disk would stop it) used to leave NB truncated (or the process killed by SIGXFSZ midway);
    now NB is replaced only by a complete, synced file, and a failed write says so and cleans up."""
    nb = tmp_path / "nb.ipynb"
    # Empty code cells run without compiling anything; the rewritten notebook is larger than the
    # original (indentation, kernelspec, execution counts), so the limit cuts its write. The
    # engine's own start compiles a small crate: the notebook is large (40 MB) so that the limit
    # stays above those files.
    cells = [{"cell_type": "markdown", "metadata": {}, "source": "x" * 40_000_000}]
    cells += [{"cell_type": "code", "metadata": {}, "source": "", "outputs": [], "execution_count": None}] * 200
    original = json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}, separators=(",", ":"))
    nb.write_text(original)
    limit = len(original) + 4096

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PIVOT_NO_PRELUDE": "1", "PIVOT_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(
        [str(kernel_bin_path), "run", str(nb)], env=env, preexec_fn=limit_file_size,
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode != 0, "the write was expected to exceed RLIMIT_FSIZE"
    assert nb.read_text() == original, f"the notebook was damaged (exit {r.returncode}): {r.stderr[-2000:]}"
    assert str(nb) in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["nb.ipynb"]
    # Without the limit the same run succeeds and leaves one complete notebook, no temp files.
    r = subprocess.run([str(kernel_bin_path), "run", str(nb)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads(nb.read_text())
    assert done["cells"][1]["execution_count"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["nb.ipynb"]
