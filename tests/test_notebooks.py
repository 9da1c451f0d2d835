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


def _papermill_parameters(name: str) -> dict:
    """What papermill's own parser reads from a notebook's parameters cell: name -> (type, default, help)."""
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node

    return {p.name: p for p in _infer_parameters(load_notebook_node(str(NOTEBOOKS_DIR / name)))}


def test_help_shows_each_parameters_whole_description_and_effective_default():
    import yaml

    from lora_kit.config import field_docs, load_config

    shown = _papermill_parameters("train.ipynb")
    toy, bare = load_config([]).to_dict(), load_config([], {"profile": "none"}).to_dict()
    docs = field_docs()
    for f in dataclasses.fields(RunConfig):
        help_text = shown[f.name].help
        # the effective default, computed here from the loader (defaults.yaml, then the toy profile)
        if f.name != "variant":
            token = re.search(r"\[default (.+?)(?: \(toy profile;.*)?\]$", help_text).group(1)
            assert yaml.safe_load(token.replace("e-", ".0e-") if re.fullmatch(r"\d+e-\d+", token) else token) \
                == (list(toy[f.name]) if isinstance(toy[f.name], tuple) else toy[f.name]), (f.name, help_text)
        if toy[f.name] != bare[f.name] and f.name != "profile":
            assert "(toy profile;" in help_text, f.name
        # a whole description: none cut at "e.g", no "=" mangled into "<:", none empty
        body = help_text.split(" [default")[0]
        assert body and not body.endswith(("(e.g", "e.g")), (f.name, help_text)
        assert "<:" not in help_text and ">:" not in help_text, f.name
        words = docs[f.name].lstrip(". ").split()[:3]
        assert " ".join(words).replace("=", "＝").replace("<＝", "≤").replace(">＝", "≥") in help_text, (f.name, help_text)
    assert shown["lora_rank"].help.endswith("[default 16]")
    assert shown["eval_steps"].help.endswith("[default 20 (toy profile; 50 without)]")
    assert shown["model"].help.count("(e.g.") == 1 and shown["model"].help.rstrip().endswith("[default toy]")
    assert "0 ≤ seed < 2**32" in shown["seed"].help
    assert shown["irrelevant_min"].help.startswith("with irrelevant_drop_max: or below this absolute pass rate")


def test_papermill_parameters_go_through_the_cli_loader(tmp_path):
    """`papermill train.ipynb out.ipynb -f my.yaml`: a typo is refused with the suggestion (it ran to the end,
    ignoring it), and `2e-4`, a string in papermill's YAML 1.1, is a number as for `lora_kit train -f`."""
    params = tmp_path / "my.yaml"
    params.write_text("learnig_rate: 2.0e-4\nlearning_rate: 2e-4\nwarmup_ratio: 1e-1\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "papermill", "train.ipynb", str(tmp_path / "out.ipynb"), "-f",
                          str(params), "-k", "lora_kit", "--no-progress-bar"],
                         cwd=NOTEBOOKS_DIR, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "1 problem in the run parameters" in text  # the typo only: 2e-4 and 1e-1 were read as numbers
    assert "learnig_rate = 0.0002: expected a known parameter name. Fix: did you mean learning_rate?" in text
    assert "papermill's -p, -y or -f" in text


def test_notebook_values_read_numbers_as_the_cli_does():
    from lora_kit.config import load_config
    from lora_kit.views import notebook_overrides

    before = {"In", "Out"}
    namespace = {"In": [], "Out": {}, "learning_rate": "2e-4", "max_steps": "7", "model": "123", "params_file": None,
                 "learnig_rate": 1.0, "_hidden": 3, "show_plan": print}
    got = notebook_overrides(namespace, RunConfig, before=before)
    assert got == {"learning_rate": 2e-4, "max_steps": 7, "model": "123", "learnig_rate": 1.0}
    cfg = load_config([], {"learning_rate": got["learning_rate"]}, overrides_source="notebook parameters")
    assert cfg.learning_rate == 0.0002
    import pytest as _pytest

    from lora_kit.errors import ConfigError
    with _pytest.raises(ConfigError, match=r"vit_lr = fast: expected a finite number\. Fix: write it like `papermill -p vit_lr 3\.0e-4`"):
        load_config([], {"vit_lr": "fast"}, overrides_source="notebook parameters")
