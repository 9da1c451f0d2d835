"""The benchmark compares like with like: both arms learn the same thing; the CLI writes its JSON and table.

No timings are asserted (the machine's load decides them); what is checked is what the numbers mean.
"""
from __future__ import annotations

import json

import pytest

from lora_kit.bench import bench_config, bench_training, resolve
from lora_kit.paths import PARAMS_DIR

pytestmark = pytest.mark.slow


def tiny(toy_ckpt, world, **extra) -> dict:
    return {"model": str(toy_ckpt), "profile": "none",
            "train_file": str(world / "task_train.jsonl"), "val_file": str(world / "task_val.jsonl"),
            "bench_file": str(world / "bench.jsonl"), "general_file": str(world / "general_eval.jsonl"),
            "spotcheck_file": str(world / "spotcheck.jsonl"), "terms_file": str(world / "terms.json"),
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 8,
            "max_length": 256,
            "learning_rate": 5e-3, "vit_lr": 5e-3, "eval_max_samples": 2, "max_new_tokens": 4, **extra}


@pytest.mark.parametrize("variant, mode", [("A1", "llm"), ("C2", "vision")])
@pytest.mark.parametrize("packing", [False, True])
def test_both_arms_learn_the_same_without_dropout(toy_ckpt, mini_world, variant, mode, packing):
    """Same start, data order and optimizer: without dropout the final eval loss is the same in both arms,
    so the fast path (and packing) changes the speed, not what is learned."""
    cfg = bench_config(variant, [], tiny(toy_ckpt, mini_world, lora_dropout=0.0, packing=packing), None, False)
    model_path, files = resolve(cfg)
    result = bench_training(cfg, model_path, files, samples=8, epochs=2, repeats=1, log=lambda *_: None)
    ref, kit = result["runs"]["reference"][0], result["runs"]["lora_kit"][0]
    assert ref["steps"] == kit["steps"] == 4 and ref["tokens"] == kit["tokens"] > 0
    assert kit["fast_path"]["mode"] == mode and kit["fast_path"]["hits"] > 0  # the second epoch came from the cache
    assert kit["eval_loss"] == pytest.approx(ref["eval_loss"], abs=2e-4)
    assert result["speedup"] == pytest.approx(kit["tokens_per_s"] / ref["tokens_per_s"])


def test_cli_writes_json_and_table(toy_ckpt, mini_world, tmp_path):
    from lora_kit.__main__ import main

    params = tmp_path / "tiny.yaml"
    params.write_text(json.dumps(tiny(toy_ckpt, mini_world)))
    out = tmp_path / "bench.json"
    assert main(["bench", "A1", "-f", str(params), "--samples", "4", "--epochs", "1", "--repeats", "1",
                 "--no-eval-share", "--no-study", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [t["variant"] for t in result["training"]] == ["A1"]
    assert result["generation"]["prompts"] == 12  # eval_max_samples 2 per kind, 3 kinds, 2 probe groups
    assert result["generation"]["speedup"] > 0 and result["machine"]["cores"]
    # one guardrail evaluation both ways: the cached one gives the straightforward one's answers and losses
    [evaluation] = result["evaluation"]
    assert evaluation["variant"] == "A1" and evaluation["image_cache"] == "vision" and evaluation["fast_path"] == "llm"
    assert evaluation["same_answers"] and evaluation["max_loss_difference"] < 1e-4
    table = out.with_suffix(".md").read_text()
    assert "| A1 |" in table and "one at a time" in table and "One guardrail evaluation of A1" in table


def test_eval_share_run_follows_a0_and_copies_its_step0(toy_ckpt, mini_world, tmp_path):
    from lora_kit.bench import bench_eval_share, table
    from lora_kit.config import load_config

    params = tmp_path / "tiny.yaml"
    params.write_text(json.dumps({**tiny(toy_ckpt, mini_world), "max_steps": 4, "eval_steps": 2, "save_steps": 2}))
    share = bench_eval_share(load_config([params, PARAMS_DIR / "A1.yaml"]))
    assert share["variant"] == "A1" and share["steps"] == 4
    assert share["evaluations"] == 3 and share["step0_copied"]  # steps 0 (A0's), 2 and 4
    assert 0 < share["eval_seconds"] < share["wall_seconds"]
    assert share["eval_share"] == pytest.approx(share["eval_seconds"] / share["wall_seconds"], abs=0.02)
    assert "step 0 copied from A0's" in table({"training": [], "eval_share": share})
