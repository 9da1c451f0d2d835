"""The study on real (tiny) toy runs: the matrix writes run folders through papermill, summary.ipynb reads them."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kit.matrix import plan_jobs, run_matrix
from lora_kit.paths import NOTEBOOKS_DIR

from test_train import tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(toy_ckpt, mini_world, tmp_path_factory):
    """A0, A1 and C2 run by the matrix runner (one papermill process each) on the tiny toy."""
    tmp = tmp_path_factory.mktemp("study")
    params = tiny_params(toy_ckpt, mini_world, tmp, max_steps=4)
    overrides = {k: v for k, v in json.loads(params.read_text()).items() if k != "output_dir"}
    # the model given relative to the caller's folder, as on a command line: the kernel must read it the same way
    overrides["model"] = toy_ckpt.name
    with _in(toy_ckpt.parent):
        statuses = run_matrix(plan_jobs(["A1", "C2"], overrides=overrides), runs_root=tmp / "runs", log=lambda *_: None)
    return tmp, statuses, overrides


@contextlib.contextmanager
def _in(folder):
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def test_matrix_runs_every_variant_and_keeps_the_executed_notebook(study):
    tmp, statuses, overrides = study
    assert set(statuses) == {"A0", "A1", "C2"}
    assert set(statuses.values()) <= {"completed", "stopped_early"}
    for v in ("A0", "A1", "C2"):
        nb = json.loads((tmp / "runs" / v / "train.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"])  # the executed copy, with its outputs
    # a second matrix run of the same jobs skips them all (other parameters would be refused: test_matrix)
    with _in(Path(json.loads((tmp / "runs" / "A1" / "params.json").read_text())["model_path"]).parent):
        again = run_matrix(plan_jobs(["A1", "C2"], overrides=overrides), runs_root=tmp / "runs", log=lambda *_: None)
    assert again == statuses
    # the run recorded where its model was, whatever folder the matrix ran in
    assert Path(json.loads((tmp / "runs" / "A1" / "params.json").read_text())["model_path"]).is_absolute()


def test_summary_notebook_on_real_runs(study):
    tmp, _, _ = study
    out = tmp / "summary"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / "summary.ipynb"),
                           str(tmp / "summary.ipynb"), "-p", "runs_root", str(tmp / "runs"), "-p", "out_dir", str(out),
                           "-k", "lora_kit"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd
    table = pd.read_csv(out / "study.csv")
    assert set(table["variant"]) == {"A0", "A1", "C2"}
    row = table.set_index("variant").loc["C2"]
    assert row["n_llm_modules"] == 14 and row["n_vit_modules"] == 16
    assert (out / "frontier_irrelevant.png").stat().st_size > 0 and (out / "heatmaps.png").exists()
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["hypothesis"] for v in verdicts] == ["H1", "H2", "H3", "H4"]
    h3 = next(v for v in verdicts if v["hypothesis"] == "H3")
    assert h3["verdict"] == "not tested"  # no learning-rate sweep in this study


def test_papermill_with_a_params_file_and_no_output_path(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2)
    proc = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / "train.ipynb"),
                           "-f", str(NOTEBOOKS_DIR.parent / "params" / "C2.yaml"), "-p", "params_file", str(params),
                           "-k", "lora_kit", "--no-progress-bar"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["cells"]  # the executed notebook went to stdout
    summary = json.loads((tmp_path / "runs" / "C2" / "summary.json").read_text())
    assert summary["status"] in ("completed", "stopped_early") and summary["targets"]["counts"] == {"llm": 14, "vit": 16}
