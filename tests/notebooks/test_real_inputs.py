"""The study notebooks on real-format inputs, through papermill and its Rust translator.

tests/python/make_study_fixtures.py makes checkpoints shaped as published at small sizes (a full
`SiglipModel` with its text tower, a `Qwen2ForCausalLM` with a byte-level BPE tokenizer.json and a
chat template) and data files in the formats the prelude reads. 02 builds its base MLLM from the
SigLIP and Qwen2 folders on caption JSONL + LLaVA conversation JSON, 03 trains SFT on LLaVA JSON and
DPO on MMPR-field JSONL from that base and scores two-way choice on PIVOT's DPO JSON list: only paths
and sizes differ from the embedded-data runs. A data file with a bad line stops 03 at its data cell
with the file and the line named, before any training.

Cost: three kernel starts and short cells. Measured 20 min 4 s on the 2-core machine at load 14-15
(other helpers' builds; 975 s for 02 + 03, 157 s for the bad line, 39 s for the fixtures); expect a
few minutes on a quiet box, where a warm kernel start takes about half a minute.

04, 05 and 08 on the probe / evaluation formats (ImageFolder, ADE20K layout, caption JSONL, LLaVA JSON,
PIVOT's DPO JSON) and a bad data parameter in 05 and 08: measured 1090 s for the three notebooks and 222 s
+ 247 s for the two bad parameters at load 10+ on the 2-core machine (each kernel start 99-123 s of it).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
TIMEOUT = 1500


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    out = tmp_path_factory.mktemp("study-fixtures")
    subprocess.run([sys.executable, str(ROOT / "tests/python/make_study_fixtures.py"), str(out)], check=True,
                   capture_output=True)
    return out


# Every kernel runs in the session's `kernel_cwd` on the session's chain of recycled engines
# (conftest.py); `launches` counts them for the last test.
SESSION = {"cwd": None, "launches": 0, "adoptions_before": 0}


@pytest.fixture(scope="module", autouse=True)
def on_the_chain(chain, kernel_cwd):
    SESSION.update(cwd=str(kernel_cwd), launches=0, adoptions_before=len(chain.adoptions()))


def run(name: str, out: Path, params: dict) -> nbformat.NotebookNode:
    dst = out / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    SESSION["launches"] += 1
    papermill.execute_notebook(str(NB_DIR / name), str(dst), parameters=params, kernel_name="pivot",
                               cwd=SESSION["cwd"], progress_bar=False, execution_timeout=TIMEOUT,
                               start_timeout=TIMEOUT)
    return nbformat.read(dst, as_version=4)


def text_of(nb) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values()) + o.get("evalue", ""))
    return "\n".join(parts)


def test_base_and_stage2_from_published_layouts(fx, jupyter_path, tmp_path):
    data = fx / "data"
    out = tmp_path / "study"
    out.mkdir()
    nb02 = run("02_base_mllm.ipynb", out, {
        "out_dir": str(out), "tower_path": str(fx / "siglip"), "lm_path": str(fx / "qwen2"),
        "caption_data": str(data / "captions.jsonl"), "vqa_data": str(data / "llava_sft.json"),
        "vqa_eval_data": str(data / "llava_sft.json"), "n_captions": 16, "n_vqa": 16, "n_eval": 4, "batch_size": 4,
        "proj_steps": 6, "full_steps": 6,
    })
    log02 = text_of(nb02)
    assert "base MLLM: all checks passed" in log02, log02[-3000:]
    # The tower came out of the full SiglipModel (its text tower left behind), the LM with its BPE tokenizer.
    assert "VisionTower Siglip" in log02 and "LanguageModel Qwen2" in log02, log02[:3000]
    assert (out / "base" / "config.json").is_file()

    nb03 = run("03_sft_vs_dpo.ipynb", out, {
        "out_dir": str(out), "sft_data": str(data / "llava_sft.json"), "dpo_data": str(data / "mmpr.jsonl"),
        "vqa_eval_data": str(data / "llava_sft.json"), "choice_data": str(data / "pivot_dpo.json"),
        "n_train": 16, "n_eval": 4, "n_choice": 8, "sft_steps": 3, "dpo_steps": 3, "batch_size": 4,
    })
    log03 = text_of(nb03)
    assert "SFT vs DPO: all checks passed" in log03, log03[-3000:]
    assert "SFT 16 samples, DPO 16 pairs; held out: 4 VQA questions, 8 choice pairs" in log03, log03[:3000]
    assert "loading the base MLLM from" in log03


def test_a_bad_data_line_stops_the_notebook_at_its_data_cell(fx, jupyter_path, tmp_path):
    bad = fx / "data" / "bad_line.jsonl"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        run("03_sft_vs_dpo.ipynb", tmp_path, {"out_dir": str(tmp_path), "dpo_data": str(bad)})
    message = str(err.value)
    assert "bad_line.jsonl:3:" in message, message  # file:line: field: message
    nb = nbformat.read(tmp_path / "03_sft_vs_dpo.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    # parameters, injected parameters, then the data cell: nothing trained before the error.
    assert failed == [2], failed
    assert not (tmp_path / "base").exists()


def test_probes_and_transplant_read_their_data_sets_from_parameters(fx, jupyter_path, tmp_path):
    """04 probes on two ImageFolders, 05 on the ADE20K layout, 08 transplants on caption JSONL and
    LLaVA JSON and evaluates on PIVOT's DPO JSON, LLaVA JSON and the ImageFolders. Their towers come
    from the fallback (1 step per stage, made by 04 and reused), so only the data is real-format."""
    data = fx / "data"
    out = tmp_path / "probes"
    out.mkdir()
    small = {"out_dir": str(out), "fallback_steps": 1, "batch_size": 4}
    folders = {"probe_train_data": str(data / "imagefolder"), "probe_val_data": str(data / "imagefolder_val")}

    log04 = text_of(run("04_linear_probe.ipynb", out, {**small, **folders, "n_train": 12, "n_val": 8}))
    assert "linear probe: all checks passed" in log04, log04[-3000:]
    # 3 images of each of the 4 colour folders, 2 of each held out.
    assert (f"probe data: ImageFolder {data / 'imagefolder'}: 12 train, {data / 'imagefolder_val'}: 8 val; 4 classes"
            in log04), log04[:3000]

    log05 = text_of(run("05_seg_probe.ipynb", out, {
        **small, "seg_data": str(data / "ADEChallengeData2016"), "n_train": 8, "n_val": 4, "epochs": 3,
        "patch_seg_epochs": 2, "patch_seg_hidden": 16, "show": 2,
    }))
    assert "segmentation probe: all checks passed" in log05, log05[-3000:]
    assert "segmentation data: 8 train, 4 val images, 150 classes" in log05, log05[:3000]

    log08 = text_of(run("08_transplant.ipynb", out, {
        **small, **folders, "caption_data": str(data / "captions.jsonl"), "vqa_data": str(data / "llava_sft.json"),
        "choice_data": str(data / "pivot_dpo.json"), "vqa_eval_data": str(data / "llava_sft.json"),
        "n_train": 8, "proj_steps": 2, "full_steps": 2, "n_choice": 8, "n_eval": 2, "n_probe_train": 12, "n_probe_val": 8,
    }))
    assert "PIVOT transplant: all checks passed" in log08, log08[-3000:]
    assert "transplant 8 captions, 8 VQA; held out: 8 choice pairs, 2 VQA questions; probe 12 / 8 images" in log08, log08[:3000]
    # 04 probed the same ImageFolders, so 08 reads its results instead of fitting again.
    assert "04 (the same frozen tower)" in log08 and "fitted here" not in log08, log08[-3000:]


@pytest.mark.parametrize("name, params, named", [
    ("05_seg_probe.ipynb", {"seg_data": "{tmp}/no-such-ade"}, "parameter seg_data: {tmp}/no-such-ade does not exist"),
    ("08_transplant.ipynb", {"choice_data": "{data}/bad_line.jsonl"}, "bad_line.jsonl:3:"),
])
def test_a_bad_data_parameter_stops_04_05_08_at_their_data_cell(fx, jupyter_path, tmp_path, name, params, named):
    fill = {"tmp": str(tmp_path), "data": str(fx / "data")}
    with pytest.raises(papermill.PapermillExecutionError) as err:
        run(name, tmp_path, {"out_dir": str(tmp_path), **{k: v.format(**fill) for k, v in params.items()}})
    message = str(err.value)
    assert named.format(**fill) in message, message
    nb = nbformat.read(tmp_path / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    # parameters, injected parameters, then the data cell: no model loaded or trained before the error.
    assert failed == [2], failed
    assert not (tmp_path / "base").exists()


def test_every_kernel_here_ran_on_the_recycled_engine(chain):
    """All but possibly the session's first kernel adopted the chain's engine, recycled each time."""
    adopted = chain.adoptions()[SESSION["adoptions_before"]:]
    first = 0 if SESSION["adoptions_before"] else 1
    assert len(adopted) == SESSION["launches"] - first, (SESSION, adopted)
    numbers = [a["kernel_of_this_engine"] for a in adopted]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), adopted
