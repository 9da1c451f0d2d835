"""The committed notebooks are what lora_kit.notebooks renders, without outputs, with every parameter."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from lora_kit.config import RunConfig
from lora_kit.notebooks import NOTEBOOKS, render
from lora_kit.paths import NOTEBOOKS_DIR


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_committed_notebook_equals_its_source_and_has_no_outputs(name):
    text = (NOTEBOOKS_DIR / name).read_text(encoding="utf-8")
    assert text == render(name), f"run: python -m lora_kit.notebooks (notebooks/{name} is stale)"
    nb = json.loads(text)
    assert nb["metadata"]["kernelspec"]["name"] == "lora_kit"
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb["cells"])


def test_help_notebook_documents_every_parameter():
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(NOTEBOOKS_DIR / "train.ipynb")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for f in dataclasses.fields(RunConfig):
        assert f"  {f.name}:" in out.stdout, f.name
    # each parameter's type as papermill shows it, e.g. "  lora_rank: Optional[int] (default None)"
    shown = dict(re.findall(r"^  (\w+): Optional\[(\w+)\]", out.stdout, re.M))
    assert shown["lora_rank"] == "int" and shown["vit_lr"] == "float" and shown["init_adapter"] == "str"
    for choice in ("augmentation", "on_bad_sample", "lr_scheduler_type"):  # Literal choices are strings
        assert shown[choice] == "str", choice
    assert "params_file:" in out.stdout and "LoRA on the last N decoder layers" in out.stdout
