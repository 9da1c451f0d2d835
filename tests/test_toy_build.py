"""A miniature toy build (few images, few steps): files, caching, and the report's scoring path."""
from __future__ import annotations

import json

import pytest

from lora_kit.toy import ToyBuild, build_toy, resolve_model
from lora_kit.toy.model import ToySpec
from lora_kit.toy.pretrain import PretrainSpec, lr_at
from lora_kit.toy.world import WorldSpec

pytestmark = pytest.mark.slow

MINI = ToyBuild(
    world=WorldSpec(seed=5, n_pretrain=32, n_pretrain_val=8, n_task_train=8, n_task_val=4, n_bench_per_kind=3,
                    n_general_eval=4),
    model=ToySpec(text_hidden=32, text_heads=2, text_kv_heads=1, text_intermediate=64, vision_hidden=32,
                  vision_heads=2, vision_intermediate=64),
    pretrain=PretrainSpec(steps=4, stage2_step=2, batch_size=4, warmup_steps=1),
)


def test_miniature_build_writes_both_stages_and_a_report_with_n(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KIT_OUTPUTS", str(tmp_path))
    report = build_toy(build=MINI, progress=False)
    root = MINI.root()
    assert root.parent == tmp_path / "toy"
    for stage in ("stage2", "stage3"):
        assert (root / stage / "config.json").is_file() and (root / stage / "model.safetensors").is_file()
    m = report["stage3"]["metrics"]
    assert sorted(m["probes"]) == ["general", "task"]  # the benchmark under the general and the task prompt
    for group in m["probes"].values():
        assert group["irrelevant_pass"]["n"] == 3 and group["hallucination"]["n"] == 3 and group["object_accuracy"]["n"] == 3
    assert m["task_exact_match"]["n"] == MINI.world.n_task_val
    assert len(report["stage3"]["spotcheck_captions"]) == 5
    # the same key can give other weights on another CPU: the report says what it was built on
    import torch
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["torch_threads"] == torch.get_num_threads()
    assert report["machine"]["cpu"]
    assert json.loads((root / "base_report.json").read_text())["key"] == MINI.key()
    # a second call returns the cached report without training again
    assert build_toy(build=MINI, progress=False) == report
    assert resolve_model("toy", build=MINI) == root / "stage3"
    assert resolve_model("toy-stage2", build=MINI) == root / "stage2"


def test_the_base_report_scores_with_the_guardrails_functions():
    import lora_kit.evaluate as evaluate
    import lora_kit.toy.report as report
    import lora_kit.train as train

    def names(code):  # globals a function (and the lambdas inside it) refers to
        out = set(code.co_names)
        for const in code.co_consts:
            if hasattr(const, "co_names"):
                out |= names(const)
        return out

    for name in ("benchmark_metrics", "generate", "mean_loss"):
        assert getattr(report, name) is getattr(evaluate, name)
        assert name in names(evaluate.guardrail_record.__code__)  # what every training evaluation calls
    assert train.guardrail_record is evaluate.guardrail_record


def test_key_changes_with_any_setting_and_the_code_versions(monkeypatch):
    import lora_kit.toy as toy

    other = ToyBuild(world=MINI.world, model=MINI.model, pretrain=PretrainSpec(steps=5, stage2_step=2))
    assert MINI.key() != other.key() and MINI.key() == ToyBuild(MINI.world, MINI.model, MINI.pretrain).key()
    before = MINI.key()
    monkeypatch.setattr(toy, "WORLD_VERSION", toy.WORLD_VERSION + 1)
    assert MINI.key() != before


def test_learning_rate_schedule():
    spec = PretrainSpec(steps=100, warmup_steps=10, learning_rate=1.0, decay_fraction=0.2)
    assert lr_at(0, spec) == pytest.approx(0.1) and lr_at(9, spec) == pytest.approx(1.0)
    assert lr_at(50, spec) == 1.0 and lr_at(90, spec) == pytest.approx(0.5) and lr_at(99, spec) == pytest.approx(0.05)
