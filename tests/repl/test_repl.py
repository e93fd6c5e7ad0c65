"""End-to-end tests of `pivot-repl`: an interactive session driven through tmux, and the
non-interactive modes (script file, piped stdin).

The binary comes from PIVOT_REPL_BIN, else the kernel's cargo target dir. Each start takes a
free build slot (PIVOT_CACHE_DIR, default ~/.cache/pivot-lab); a warm slot 0 (`pivot-kernel
warm`) makes a start take ~20 s. The tmux test needs `tmux` (apt-get install -y tmux).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from pivot_testing import STARTUP_TIMEOUT, Spare, SpareChain, built_binary, stop_pids

ROOT = Path(__file__).resolve().parents[2]
CELL_TIMEOUT = 240.0


def repl_bin() -> Path:
    return built_binary("pivot-repl", "PIVOT_REPL_BIN")


BIN = repl_bin()


# PIVOT_TEST_SPARE=1: every REPL here first gets a spare engine of its configuration (`pivot-repl
# --spare`) and must adopt it, so these tests check that an adopted REPL behaves as a normal one.
WITH_SPARE = os.environ.get("PIVOT_TEST_SPARE") == "1"


class ReplChain:
    """The script and piped-input REPLs of this module share one configuration (a working
    directory and an environment with PIVOT_SPARE_ENGINE=1) and so one engine: `pivot-repl --spare
    --detach` starts it before the first, each REPL adopts it, and at its end gives it back to be
    recycled (a fresh child process and evcxr state; rust-analyzer and the build slot stay warm)
    for the next. One engine start instead of one per test, and each test checks that a recycled
    engine runs its REPL as a fresh one would. The normal start is the tmux session's below."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="pivot-repl-chain-"))
        self.chain = SpareChain(wait_s=120, idle_s=1800)
        self.figs = self.home / "figs"
        self.env = dict(os.environ, NO_COLOR="1", PIVOT_FIGURES_DIR=str(self.figs), PIVOT_REPL_TIMINGS="1", **self.chain.env)
        r = subprocess.run([str(BIN), "--spare", "--detach", "--timeout", str(int(STARTUP_TIMEOUT))], env=self.env, cwd=self.home,
                           capture_output=True, text=True, timeout=STARTUP_TIMEOUT + 60)
        ready = re.search(r"^spare engine pid (\d+) ", r.stdout, re.M)
        assert r.returncode == 0 and ready, (r.returncode, r.stdout, r.stderr)
        self.pid = int(ready.group(1))

    def run(self, args, stdin: str | None, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
        assert all(self.env.get(k) == v for k, v in extra_env.items()), f"{extra_env} is not the chain's configuration"
        shutil.rmtree(self.figs, ignore_errors=True)
        r = subprocess.run([str(BIN), *args], input=stdin if stdin is not None else "", capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT, cwd=self.home, env=self.env)
        assert f"adopted spare engine pid {self.pid}" in r.stderr, (r.stdout, r.stderr)
        return r

    def stop(self) -> None:
        self.chain.stop()
        shutil.rmtree(self.home, ignore_errors=True)


_CHAIN: ReplChain | None = None


@pytest.fixture(scope="module", autouse=True)
def repl_chain_ends():
    global _CHAIN
    yield
    if _CHAIN is not None:
        _CHAIN.stop()
        _CHAIN = None


def figures_dir(tmp_path: Path) -> Path:
    """Where `run_repl`'s REPL saves figures."""
    return tmp_path / "figs" if WITH_SPARE else _CHAIN.figs


def run_repl(args, tmp_path: Path, stdin: str | None = None, **extra_env: str):
    """`pivot-repl ARGS` with `stdin`: on the module's `ReplChain`, or (PIVOT_TEST_SPARE=1) in
    `tmp_path` on a spare of its own."""
    global _CHAIN
    if not WITH_SPARE:
        if _CHAIN is None:
            _CHAIN = ReplChain()
        return _CHAIN.run(args, stdin, extra_env)
    env = dict(os.environ, NO_COLOR="1", PIVOT_FIGURES_DIR=str(tmp_path / "figs"), **extra_env)
    spare = Spare([str(BIN), "--spare"], env, cwd=str(tmp_path))
    try:
        r = subprocess.run([str(BIN), *args], input=stdin if stdin is not None else "", capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT, cwd=tmp_path, env=env)
        assert f"adopted spare engine pid {spare.pid}" in r.stderr, r.stderr
        return r
    finally:
        spare.stop()


# ---------------------------------------------------------------------------------------------
# Script mode and piped stdin


def test_script_success(tmp_path: Path):
    script = tmp_path / "ok.rs"
    script.write_text(
        """#!/usr/bin/env pivot-repl
// %% data
let xs: Vec<f64> = (1..=4).map(|i| i as f64).collect();

let total: f64 = xs.iter().sum();
// %% progress (a bar on a terminal, one final line otherwise)
let mut p = Progress::new("steps", 5);
for i in 0..5 { p.set(i + 1, format!("step {i}")); }
p.finish();
// %% a figure: saved as PNG when the terminal shows no images
show(&MimeBundle::text("tiny figure").with_png(&[137, 80, 78, 71, 13, 10, 26, 10]));
// %% the prelude is one shared library that every cell links (prelude/dylib); a tensor op
// inlined into the cell calls torch-sys's C API, which that library must export
let t = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
println!("tensor sum = {}", t.sum(Kind::Float).double_value(&[]));
let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
println!("prelude libraries mapped: {}", maps.lines().filter(|l| l.ends_with("/libpivot.so")).map(|l| l.split_whitespace().last().unwrap()).collect::<std::collections::BTreeSet<_>>().len());
// %%
println!("total = {total}");
total * 2.0
"""
    )
    r = run_repl([str(script)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tensor sum = 15" in r.stdout, r.stdout
    assert "prelude libraries mapped: 1" in r.stdout, r.stdout
    assert "total = 10" in r.stdout
    assert re.search(r"^20(\.0)?$", r.stdout, re.M), r.stdout
    assert "steps 5/5" in r.stderr, r.stderr
    figs = list(figures_dir(tmp_path).glob("fig-*.png"))
    assert len(figs) == 1 and figs[0].read_bytes().startswith(b"\x89PNG"), figs
    assert f"[tiny figure] saved to {figs[0]}" in r.stdout


def test_script_compile_error(tmp_path: Path):
    script = tmp_path / "bad.rs"
    script.write_text('println!("first cell runs");\n\nfn f() -> i32 { "text" }\n\nprintln!("never reached");\n')
    r = run_repl([str(script)], tmp_path)
    assert r.returncode != 0
    assert "first cell runs" in r.stdout
    assert "never reached" not in r.stdout
    assert "mismatched types" in r.stderr, r.stderr
    # The report quotes the cell and points at the span.
    assert 'fn f() -> i32 { "text" }' in r.stderr
    assert "expected `i32`, found `&str`" in r.stderr


def test_script_panic(tmp_path: Path):
    # No `let` in these scripts: the first `let` of a session loads rust-analyzer (~13 s).
    script = tmp_path / "panic.rs"
    script.write_text('println!("before");\n\nstd::hint::black_box(vec![1, 2])[5]\n\nprintln!("never reached");\n')
    r = run_repl([str(script)], tmp_path)
    assert r.returncode != 0
    assert "before" in r.stdout
    assert "never reached" not in r.stdout
    assert "index out of bounds: the len is 2 but the index is 5" in r.stderr, r.stderr
    assert "panic" in r.stderr.lower()


def test_piped_stdin(tmp_path: Path):
    # Not a terminal: each statement runs once the scanner says it is complete.
    # The final expressions are std types that evcxr shows with `Debug`: the prelude's displays
    # for them let each cell build once (evcxr alone builds twice: its first try, calling
    # `evcxr_display`, fails to compile). The `?` cell builds once too: the engine has turned on
    # evcxr's `Result` wrapper at its start (evcxr alone turns it on after a failed build).
    r = run_repl(
        [],
        tmp_path,
        stdin='println!("piped");\nformat!("{}",\n    2 * 21)\n6 * 7\n(1.5f64, "pair")\nlet parsed: u8 = "17".parse()?;\nparsed\n',
        PIVOT_REPL_TIMINGS="1",
    )
    assert r.returncode == 0, r.stderr
    assert "piped" in r.stdout
    assert '"42"' in r.stdout, r.stdout
    assert re.search(r"^42$", r.stdout, re.M), r.stdout
    assert '(1.5, "pair")' in r.stdout, r.stdout
    assert re.search(r"^17$", r.stdout, re.M), r.stdout
    builds = re.findall(r"\[timings\].*this input [0-9.]+ s, (\d+) builds?, code ran", r.stderr)
    assert builds == ["1", "1", "1", "1", "1", "1"], r.stderr


# ---------------------------------------------------------------------------------------------
# Interactive, through tmux


class Tmux:
    """A detached tmux session on a private server, with a fixed size."""

    def __init__(self, command: str, cwd: Path):
        self.socket = f"pivot-repl-test-{os.getpid()}"
        self.name = "repl-" + uuid.uuid4().hex[:8]
        self.tmux("new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", "-c", str(cwd), command)
        self.tmux("set-option", "-t", self.name, "history-limit", "5000")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def type(self, text: str):
        """Types text literally (tmux would read a trailing `;` as a command separator)."""
        for i, piece in enumerate(text.split(";")):
            if i > 0:
                self.tmux("send-keys", "-t", self.name, "-H", "3b")
            if piece:
                self.tmux("send-keys", "-t", self.name, "-l", piece)

    def keys(self, *keys: str):
        self.tmux("send-keys", "-t", self.name, *keys)

    def line(self, text: str):
        self.type(text)
        self.keys("Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-5000", "-t", self.name)

    def wait_for(self, pattern: str, timeout: float = CELL_TIMEOUT, after: int = 0) -> re.Match:
        """Waits until `pattern` matches the screen text after offset `after`."""
        deadline = time.time() + timeout
        while True:
            s = self.screen()
            m = re.compile(pattern, re.M).search(s, after)
            if m:
                return m
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen:\n{s}")
            time.sleep(0.2)

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def terminal_env(tmp_path: Path, hist: Path, **extra: str) -> tuple[dict[str, str], str]:
    """A REPL's whole environment in a tmux pane (`env -i` + these), and it as shell assignments."""
    env = {"PIVOT_REPL_HISTORY": str(hist), "PIVOT_FIGURES_DIR": str(tmp_path / "figs"), "TERM": "xterm-256color", **extra}
    passthrough = ["PATH", "HOME", "PIVOT_CACHE_DIR", "PIVOT_PYTHON", "LIBTORCH", "LIBTORCH_USE_PYTORCH", "PIVOT_PRELUDE", "CARGO_HOME", "RUSTUP_HOME"]
    for k in passthrough:
        if k in os.environ:
            env[k] = os.environ[k]
    return env, " ".join(f"{k}='{v}'" for k, v in env.items())


@pytest.fixture
def tmux_repl(tmp_path: Path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    hist = tmp_path / "history.txt"
    env, assign = terminal_env(tmp_path, hist, PIVOT_REPL_TIMINGS="1")
    # `; sleep` keeps the pane (and its last screen) after the REPL exits.
    spare = Spare([str(BIN), "--spare"], env, cwd=str(tmp_path)) if WITH_SPARE else None
    t = Tmux(f"env -i {assign} {BIN}; echo REPL-EXITED-$?; sleep 600", tmp_path)
    try:
        yield t, hist, tmp_path
        if spare is not None:
            assert "adopted a spare engine" in t.screen(), t.screen()
    finally:
        t.close()
        if spare is not None:
            spare.stop()


def test_interactive_session(tmux_repl):
    t, hist, tmp = tmux_repl
    t0 = time.time()
    t.wait_for(r"^>> ", timeout=30)
    prompt_after = time.time() - t0

    # Multi-line input: the open bracket keeps the editor open; the result comes back.
    t.line("let v = vec![1, 2,")
    t.line("    3, 4];")
    t.line("v.iter().sum::<i32>() * 10")
    t.wait_for(r"^100$", timeout=STARTUP_TIMEOUT)
    first_result_after = time.time() - t0

    # Lines typed ahead while a cell runs reach the prompt in one read: none may be lost.
    t.line("std::thread::sleep(std::time::Duration::from_secs(2)); 7")
    t.line("let ahead = 40;")
    t.line("ahead + 2")
    t.wait_for(r"^42$", timeout=120)

    # Ctrl-C during a loop that polls check_interrupt: the cell stops, its variable lives on.
    t.line("let mut n = 0u64;")
    t.line('println!("spinning"); while check_interrupt("spin").is_ok() { n += 1; std::thread::sleep(std::time::Duration::from_millis(2)); }')
    spin = t.wait_for(r"^spinning$")
    time.sleep(1.0)
    t.keys("C-c")
    t.wait_for(r"interrupting", after=spin.end())
    t.line('format!("n={} v={}", n > 10, v.len())')
    t.wait_for(r'^"n=true v=4"$', after=spin.end())

    # Ctrl-C at the prompt drops the line; the next input runs normally.
    t.type("this line is thrown away")
    t.keys("C-c")
    t.line(":save session.rs")
    t.wait_for(r"saved \d+ inputs to session.rs")
    saved = (tmp / "session.rs").read_text()
    assert "// %%\nlet v = vec![1, 2,\n    3, 4];" in saved, saved
    assert "this line is thrown away" not in saved

    # History: every accepted input, written as it was accepted (multi-line entries escaped).
    text = hist.read_text()
    assert "let mut n = 0u64;" in text, text
    assert "let v = vec![1, 2,\\n    3, 4];" in text, text
    assert "this line is thrown away" not in text

    # Ctrl-D exits cleanly.
    t.keys("C-d")
    t.wait_for(r"REPL-EXITED-0", timeout=30)
    print(f"\nprompt after {prompt_after:.2f} s, first result after {first_result_after:.1f} s")


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat: T when stopped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def wait_state(pid: int, state: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while proc_state(pid) != state:
        if time.time() > deadline:
            raise AssertionError(f"pid {pid} is {proc_state(pid)!r}, not {state!r}")
        time.sleep(0.05)


def test_ctrl_z_suspends_an_adopted_repl_with_its_engine_and_fg_resumes_it(tmp_path: Path):
    """Job control through a spare's adoption (engine/src/jobctl.rs). The adopted engine runs in a
    session of its own, where a stop signal does nothing; Ctrl-Z must still suspend the REPL as
    the shell sees it (the launcher) and the engine with it, and `fg` must bring both back with
    the session's variables. Both at the prompt (rustyline reads Ctrl-Z as a key) and while a
    cell runs (the terminal sends SIGTSTP to the launcher). The spare is started as a user starts
    one by hand, `pivot-repl --spare --detach`, which returns once it is ready. Cost: one spare's
    start."""
    if shutil.which("tmux") is None or shutil.which("bash") is None:
        pytest.skip("tmux and bash are needed (apt-get install -y tmux)")
    env, assign = terminal_env(tmp_path, tmp_path / "h.txt")
    r = subprocess.run([str(BIN), "--spare", "--detach", "--timeout", str(int(STARTUP_TIMEOUT))], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=STARTUP_TIMEOUT + 60)
    ready = re.search(r"^spare engine pid (\d+) started, ready after [0-9.]+ s$", r.stdout, re.M)
    assert r.returncode == 0 and ready, (r.returncode, r.stdout, r.stderr)
    spare_pid = int(ready.group(1))
    # A second call finds it waiting instead of starting another.
    again = subprocess.run([str(BIN), "--spare", "--detach"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == f"spare engine pid {spare_pid} found waiting, ready after 0.0 s", (again.stdout, again.stderr)
    # An interactive shell: job control (Ctrl-Z, fg) is what is tested.
    t = Tmux("env -i TERM=xterm-256color PS1='$ ' bash --norc --noprofile -i", tmp_path)
    try:
        t.wait_for(r"^\$ ", timeout=30)
        t.line(f"env -i {assign} {BIN}")
        t.wait_for(r"^>> ", timeout=60)
        assert "adopted a spare engine" in t.screen(), t.screen()
        t.line("let keep = 41;")
        t.line("keep + 1")
        first = t.wait_for(r"^42$", timeout=STARTUP_TIMEOUT)

        # At the prompt.
        t.keys("C-z")
        stopped = t.wait_for(r"Stopped", after=first.end())
        wait_state(spare_pid, "T")
        t.line("fg")
        wait_state(spare_pid, "S")
        t.line("keep * 2")
        second = t.wait_for(r"^82$", after=stopped.end())

        # While a cell runs: the cell finishes after `fg`, with its result.
        t.line('println!("sleeping"); std::thread::sleep(std::time::Duration::from_secs(4)); keep + 100')
        running = t.wait_for(r"^sleeping$", after=second.end())
        t.keys("C-z")
        stopped = t.wait_for(r"Stopped", after=running.end())
        wait_state(spare_pid, "T")
        time.sleep(1.0)
        assert not re.search(r"^141$", t.screen()[stopped.end():], re.M), "the cell went on while stopped"
        t.line("fg")
        t.wait_for(r"^141$", after=stopped.end(), timeout=60)

        # `bg` with the REPL reading the terminal: it stops again (as a background reader would)
        # and leaves the engine stopped, rather than read what is typed at the shell.
        t.keys("C-z")
        stopped = t.wait_for(r"Stopped", after=stopped.end())
        t.line("bg")
        time.sleep(1.0)
        t.line("jobs")
        listed = t.wait_for(r"^\$ jobs$", after=stopped.end())
        t.wait_for(r"Stopped", after=listed.end())
        assert "Running" not in t.screen()[listed.end():], t.screen()
        assert proc_state(spare_pid) == "T"
        t.line("fg")
        wait_state(spare_pid, "S")
        t.line("keep - 1")
        last = t.wait_for(r"^40$", after=stopped.end())
        t.keys("C-d")
        # Keys typed before the REPL has exited would be the REPL's: wait for the shell's prompt.
        t.wait_for(r"^\$ ", after=last.end(), timeout=30)
        t.line("echo REPL-EXITED-$?")
        t.wait_for(r"^REPL-EXITED-0", after=last.end(), timeout=30)
        # A clean exit is not a launcher that died (the engine's watcher used to say so, racing the exit).
        assert "is gone" not in t.screen()[last.end():], t.screen()
    finally:
        t.close()
        stop_pids([spare_pid])
