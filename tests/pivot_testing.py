"""Helpers shared by the Python test suites (kernel, REPL, notebooks, lab)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# How long a first cell may take: a cold build slot compiles the prelude (minutes on 2 cores).
STARTUP_TIMEOUT = float(os.environ.get("PIVOT_TEST_STARTUP_TIMEOUT", "1500"))


def built_binary(name: str, env_var: str) -> Path:
    """A binary of the kernel workspace: `$env_var` if set, else the first cargo target dir that has it
    (CARGO_TARGET_DIR, the Makefile's kernel target dir, the clone's own target/)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    for target in (
        os.environ.get("CARGO_TARGET_DIR"),
        str(Path.home() / ".cache/pivot-lab/target-kernel"),
        str(ROOT / "target"),
    ):
        if target and (Path(target) / "debug" / name).exists():
            return Path(target) / "debug" / name
    raise RuntimeError(f"{name} is not built: run `make kernel` (or `cargo build -p {name}`) or set {env_var}")


@contextlib.contextmanager
def private_kernelspec(prefix: str):
    """Installs the "pivot" kernelspec from the built binary into a temporary JUPYTER_PATH for the
    duration, so tests never depend on, or touch, the user's kernels. Yields that folder."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    binary = built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")
    subprocess.run([str(binary), "install", "--dir", str(path / "kernels" / "pivot")], check=True, stdout=subprocess.DEVNULL)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
        shutil.rmtree(path, ignore_errors=True)


class Spare:
    """A spare engine (`pivot-kernel spare`, `pivot-repl --spare`) started for a test: it has
    started its session and waits on `socket` for a launch of the same configuration. `log` holds
    its stderr lines until it is adopted (then its stderr is the launcher's)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, timeout: float = STARTUP_TIMEOUT):
        import queue
        import threading

        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.log: list[str] = []
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in self.proc.stderr:
                self.log.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.socket = None
        import time

        deadline = time.time() + timeout
        while self.socket is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("the spare engine did not get ready in time:\n" + "".join(self.log))
            if line is None:
                raise RuntimeError(f"the spare engine exited ({self.proc.wait()}):\n" + "".join(self.log))
            if line.startswith("pivot spare: waiting on "):
                self.socket = Path(line[len("pivot spare: waiting on "):].split(" (key ")[0])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def adopted(self) -> bool:
        """The spare removes its socket when it is adopted (and when it gives up, exiting)."""
        return self.proc.poll() is None and not self.socket.exists()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kernel_launch_env(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """The environment the "pivot" kernelspec in JUPYTER_PATH gives a kernel started with `env`
    (jupyter_client adds the spec's `env`), and the kernel's executable."""
    import json

    spec = json.loads((Path(os.environ["JUPYTER_PATH"]) / "kernels" / "pivot" / "kernel.json").read_text())
    return {**env, **spec.get("env", {})}, spec["argv"][0]


class SpareChain:
    """`make demo`'s chain of spare engines for a run of notebooks in one test module: with
    PIVOT_SPARE_ENGINE=1 the first "pivot" kernel, once its engine is up, starts a spare of its own
    configuration; the next kernel adopts it (waiting for its warm-up if it is not ready), and each
    adopted engine is recycled into the spare again when its kernel shuts down. `adoptions()`
    reads the adoptions from PIVOT_CELL_STATS; `stop()` ends the spare left after the last one."""

    def __init__(self, wait_s: int = 300, idle_s: int = 600):
        import uuid

        self.marker = uuid.uuid4().hex
        self.stats = os.environ.get("PIVOT_CELL_STATS") or str(Path(tempfile.mkdtemp(prefix="pivot-chain-")) / "cells.jsonl")
        self.stats_from = Path(self.stats).stat().st_size if Path(self.stats).exists() else 0
        self.env = {
            "PIVOT_SPARE_ENGINE": "1",
            "PIVOT_SPARE_WAIT_SECS": str(wait_s),
            "PIVOT_SPARE_IDLE_SECS": str(idle_s),
            "PIVOT_CELL_STATS": self.stats,
            # Part of every chained kernel's configuration (so of its spare's key): `stop` finds them by it.
            "PIVOT_TEST_CHAIN": self.marker,
        }

    def adoptions(self) -> list[dict]:
        import json

        if not Path(self.stats).exists():
            return []
        with open(self.stats, "rb") as f:
            f.seek(self.stats_from)
            lines = [json.loads(l) for l in f.read().decode().splitlines() if l.strip()]
        return [l["adopted"] for l in lines if l.get("cell") == 0 and "adopted" in l]

    def spare_pids(self) -> list[int]:
        """Processes of this chain that are still spares (`pivot-kernel spare`, `pivot-repl --spare`)."""
        pids = []
        needle = f"PIVOT_TEST_CHAIN={self.marker}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"spare" not in argv and b"--spare" not in argv:
                    continue
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        stop_pids(self.spare_pids())


_KERNEL_CHAIN: SpareChain | None = None


def chained_kernel_env() -> dict[str, str]:
    """The whole environment for a "pivot" kernel of tests/kernel's chain: the kernels of
    test_clients, test_conformance and test_interrupt all start with this one configuration
    (cwd: the test run's; PIVOT_INTERRUPT_GRACE_SECS=3) on a `SpareChain`. The first starts
    normally and, once its engine is up, a spare; later ones adopt that spare or, most of them,
    the engine a kernel before them gave back at its shutdown (recycled), instead of each paying
    a whole engine start. So these suites also check that a recycled engine serves a kernel as a
    fresh one does; the normal start stays covered by the chain's first kernel, test_spare, the
    REPL and `pivot-kernel run`. PIVOT_TEST_SPARE=1 (each kernel adopts a spare of its own,
    tests/kernel/conftest.py) turns the chain off."""
    global _KERNEL_CHAIN
    env = {**os.environ, "PIVOT_INTERRUPT_GRACE_SECS": "3"}
    if os.environ.get("PIVOT_TEST_SPARE") == "1":
        return env
    if _KERNEL_CHAIN is None:
        # A launch waits up to 90 s for a spare still warming up: inside the 120 s the clients
        # here give a kernel to answer.
        _KERNEL_CHAIN = SpareChain(wait_s=90, idle_s=1800)
    return {**env, **_KERNEL_CHAIN.env}


def stop_kernel_chain() -> None:
    """Ends the spare the kernel chain left, if any (`chained_kernel_env`)."""
    if _KERNEL_CHAIN is not None:
        _KERNEL_CHAIN.stop()


def stop_pids(pids: list[int], grace_s: float = 30.0) -> None:
    """SIGTERM to each process, up to `grace_s` for them to end (a zombie has ended), then SIGKILL
    to those left: for spares that are not this test's children (started detached)."""
    import signal
    import time

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while pids and time.time() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and b"(Z" not in Path(f"/proc/{p}/stat").read_bytes()[:64]]
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def spare_chain(**kw):
    """A `SpareChain` whose variables are in os.environ (so every kernel a client starts gets them)
    for the duration; its last spare is stopped at the end."""
    chain = SpareChain(**kw)
    old = {k: os.environ.get(k) for k in chain.env}
    os.environ.update(chain.env)
    try:
        yield chain
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        chain.stop()
