"""The README's paper-size command (section "Real inputs") as `tools/run_study.py` would run it:
every `-p NAME=...` must be a parameter its notebooks declare (a misspelt name would be injected as
an unused variable and the run would silently use the default), and each injected `let` must carry
the declared type (an unannotated `let n_captions = 558128;` is an i32, and the notebook's later
cells, written for usize, fail to compile). No kernel runs: this reads the README and the notebooks."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tools" / "run_study.py"


def run_study():
    spec = importlib.util.spec_from_file_location("run_study", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_commands() -> list[list[str]]:
    """The run_study command lines of the README's paper-size block, shell variables expanded."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("At paper size"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    variables: dict[str, str] = {}
    for assignment in lines[0].split(";"):
        name, value = assignment.strip().split("=", 1)
        variables[name] = " ".join(shlex.split(value))
    commands = []
    for line in lines[1:]:
        if not line.strip():
            continue
        expanded = re.sub(r"\$([A-Z])\b", lambda m: variables[m.group(1)], line)
        commands.append(shlex.split(expanded))
    return commands


def test_the_readme_paper_size_command_sets_only_declared_parameters_with_their_types():
    rs = run_study()
    commands = readme_commands()
    assert len(commands) >= 3, commands
    notebooks = {p.name[:2]: p for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
    covered = set()
    for argv in commands:
        assert argv[1].endswith("run_study.py"), argv
        only = [argv[i + 1] for i, a in enumerate(argv) if a == "--only"]
        params = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-p")
        assert only and params, argv
        for prefix in only:
            nb = nbformat.read(notebooks[prefix], as_version=4)
            declared = rs.declared_types(nb)
            cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
            names = set(re.findall(r"^let\s+(?:mut\s+)?([A-Za-z_][A-Za-z0-9_]*)", cell.source, re.M))
            for name in params:
                assert name in names, f"README: -p {name} is not a parameter of notebook {prefix}"
            rs.inject(nb, params)
            injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
            for name, value in params.items():
                line = f"let {name}: {declared[name]} = {value};" if name in declared else f"let {name} = {value};"
                assert line in injected.source.splitlines(), (prefix, line, injected.source)
                # Numbers must be annotated: a bare integer literal would be an i32.
                if re.fullmatch(r"[0-9][0-9_.e-]*", value):
                    assert name in declared, f"notebook {prefix} declares {name} without a type"
            covered.add(prefix)
    assert {"02", "03", "09"} <= covered, covered
