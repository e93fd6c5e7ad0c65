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
