"""Issue 20 item 5: the kit installed from its wheel (not its clone) works from any folder, and `init` writes a
study folder whose params/ and outputs/ are the ones used from it and every folder below it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

import lora_kit
from lora_kit import paths
from lora_kit.config import load_config
from lora_kit.errors import LoraKitError
from lora_kit.studyfolder import init_study

from test_train import tiny_params

CLONE = paths.REPO_ROOT
PROFILE_LR = yaml.safe_load((CLONE / "params" / "profiles" / "toy.yaml").read_text("utf-8"))["learning_rate"]


def _clone_files() -> dict[str, Path]:
    """Path in the wheel -> the clone's file, for everything the wheel must carry."""
    files = {p.relative_to(CLONE).as_posix(): p for p in (CLONE / "lora_kit").rglob("*.py")
             if "__pycache__" not in p.parts}
    files.update({f"lora_kit/_study/{p.relative_to(CLONE).as_posix()}": p
                  for pattern in ("params/*.yaml", "params/profiles/*.yaml", "notebooks/*.ipynb")
                  for p in CLONE.glob(pattern)})
    return files


def test_a_study_folder_is_found_from_below_and_holds_its_own_params_and_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_KIT_OUTPUTS")
    written = init_study(tmp_path / "study")
    assert sorted(p.as_posix() for p in written) == sorted(k.removeprefix("lora_kit/_study/")
                                                           for k in _clone_files() if "_study" in k)
    study = tmp_path / "study"
    assert (study / "params" / "C2.yaml").read_bytes() == (CLONE / "params" / "C2.yaml").read_bytes()
    monkeypatch.chdir(study / "notebooks")  # where papermill and Jupyter run the study's notebooks
    assert paths.study_root() == study and paths.params_dir() == study / "params"
    assert paths.outputs_dir() == study / "outputs" and paths.notebooks_dir() == study / "notebooks"
    # the study's own profile is the one merged, not the kit's
    (study / "params" / "profiles" / "toy.yaml").write_text("learning_rate: 7.0e-4\n", encoding="utf-8")
    assert load_config([]).learning_rate == 7e-4
    # a notebook runs in the caller's folder (the matrix's relative paths mean the same there), so its kernel finds
    # the same study
    assert paths.notebook_cwd(tmp_path / "elsewhere" / "train.ipynb") == study / "notebooks"
    monkeypatch.setenv("LORA_KIT_OUTPUTS", "rel_out")  # made absolute: a child with another cwd agrees
    assert paths.outputs_dir() == study / "notebooks" / "rel_out"
    monkeypatch.delenv("LORA_KIT_OUTPUTS")
    # outside any study folder: the kit's own params (here the clone's) and, used from the clone, its outputs/
    monkeypatch.chdir(tmp_path)
    assert paths.study_root() is None and paths.params_dir() == paths.PARAMS_DIR
    assert paths.outputs_dir() == CLONE / "outputs"
    assert load_config([]).learning_rate == PROFILE_LR
    with pytest.raises(LoraKitError, match="not empty.*--force"):
        init_study(study)
    assert init_study(study, force=True) == written
    assert (study / "params" / "profiles" / "toy.yaml").read_bytes() == \
        (CLONE / "params" / "profiles" / "toy.yaml").read_bytes()


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_runs_init_targets_and_train(toy_ckpt, mini_world, tmp_path):
    # the wheel, built from a copy of what a clone holds (nothing written into the clone)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CLONE / name, src / name)
    for name in ("lora_kit", "params", "notebooks"):
        shutil.copytree(CLONE / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("lora_kit-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        expected = _clone_files()
        assert set(expected) <= names, sorted(set(expected) - names)  # every module, parameter file and notebook
        assert all(whl.read(k) == p.read_bytes() for k, p in expected.items() if "_study" in k)

    # a fresh venv that reuses this interpreter's installed packages (torch, transformers, ...) through a .pth
    # line, so nothing is downloaded; the .pth files of that folder (the clone's editable install) are not run
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_reuse_installed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)

    env = {k: v for k, v in os.environ.items() if k not in ("LORA_KIT_OUTPUTS", "PYTHONPATH")}
    work = tmp_path / "work"  # outside the clone
    work.mkdir()

    def kit(*args, cwd, **extra_env):
        return subprocess.run([str(python), *args], cwd=cwd, env={**env, **extra_env}, capture_output=True,
                              text=True, timeout=900)

    probe = ("import json, lora_kit; from lora_kit import paths; from lora_kit.config import load_config; "
             "print(json.dumps({'file': lora_kit.__file__, 'params': str(paths.params_dir()), "
             "'outputs': str(paths.outputs_dir()), 'lr': load_config([]).learning_rate}))")
    where = json.loads(kit("-c", probe, cwd=work).stdout)
    assert Path(where["file"]).is_relative_to(site)  # the wheel's lora_kit, not the clone's
    assert where["params"] == str(site / "lora_kit" / "_study" / "params")  # its own defaults and profiles
    assert where["outputs"] == str(work / "outputs") and where["lr"] == PROFILE_LR
    assert json.loads(kit("-c", probe, cwd=work, LORA_KIT_OUTPUTS=str(tmp_path / "o")).stdout)["outputs"] == \
        str(tmp_path / "o")

    made = kit("-m", "lora_kit", "init", "study", cwd=work)
    assert made.returncode == 0, made.stderr[-3000:]
    study = work / "study"
    assert "params/C2.yaml" in made.stdout and "cd study" in made.stdout
    assert (study / "notebooks" / "train.ipynb").read_bytes() == (CLONE / "notebooks" / "train.ipynb").read_bytes()
    assert kit("-m", "lora_kit", "init", "study", cwd=work).returncode == 2  # not empty: refused
    where = json.loads(kit("-c", probe, cwd=study / "notebooks").stdout)
    assert where["params"] == str(study / "params") and where["outputs"] == str(study / "outputs")

    targets = kit("-m", "lora_kit", "targets", "--model", str(toy_ckpt), "--llm-last", "2", "--vit-last", "4",
                  "--format", "json", cwd=study)
    assert targets.returncode == 0, targets.stderr[-3000:]
    planned = json.loads(targets.stdout)
    assert planned["counts"] == {"llm": 14, "vit": 16} and planned["llm_layers"] == [6, 7]  # 7 Linear a layer, 4 a block

    # a tiny train, run from the study's notebooks/ folder: its run folder lands in the study's outputs/
    params = tiny_params(toy_ckpt, mini_world, tmp_path, output_dir=None, max_steps=2, eval_steps=2, save_steps=2)
    run = kit("-m", "lora_kit", "train", "-f", str(params), "--set", "llm_last=2", cwd=study / "notebooks",
              OMP_NUM_THREADS="2")
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = study / "outputs" / "runs" / "A1"
    assert Path(run.stdout.strip().splitlines()[-1]) == run_dir and not (study / "notebooks" / "outputs").exists()
    summary = json.loads((run_dir / "summary.json").read_text("utf-8"))
    assert summary["status"] in ("completed", "stopped_early") and summary["steps"] == 2
    code = json.loads((run_dir / "params.json").read_text("utf-8"))["code"]
    assert code["commit"] is None and code["lora_kit"] == lora_kit.__version__  # an installed kit has no git commit of its own
