"""Progressive unfreezing (issue 21): stages that grow the vision LoRA 2 -> 4 -> 6, each advance decided by the
guardrails, on a small random toy."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_train import tiny_params

pytestmark = pytest.mark.slow


def _stages_params(toy_ckpt, world, tmp_path, **extra):
    # every guardrail off but the KL one: KL to the start model is 0 at step 0 and > 0 after any update (B != 0),
    # so with a bound of 1e-9 every evaluation after step 0 breaks it, and patience 2 fires it at the second:
    # step 2 (stage 1's last) moves it without firing, step 4 (stage 2's last) fires it
    return tiny_params(toy_ckpt, world, tmp_path, variant="P_test", llm_last=0, vit_last=2,
                       stages=[{"vit_last": 2, "max_steps": 2}, {"vit_last": 4, "max_steps": 2},
                               {"vit_last": 6, "max_steps": 2}],
                       max_steps=2, eval_steps=2, save_steps=2, irrelevant_drop_max=1.0, hallucination_rise_max=1.0,
                       gap_widen_max=100.0, caption_chrf_min=0.0, kl_base_max=1e-9, kl_patience=2,
                       plateau_patience=0, **extra)


def test_stages_grow_from_the_previous_stage_and_a_guardrail_breach_stops_the_next(toy_ckpt, mini_world, tmp_path):
    from lora_kit.config import load_config
    from lora_kit.rundir import RunFolder
    from lora_kit.train import train

    said = []
    run = train(load_config([_stages_params(toy_ckpt, mini_world, tmp_path)]), log=said.append)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    stages = RunFolder(run).stages()
    assert [m["step"] for m in metrics] == [0, 2, 4]  # one step axis across the stages; stage 3 never ran

    # stage 1 advanced: KL moved at step 2 but had not fired (patience 2); stage 2 was stopped by it at step 4
    assert [(s["stage"], s["vit_last"], s["start_step"], s["end_step"], s["outcome"]) for s in stages] == [
        (1, 2, 0, 2, "advanced"), (2, 4, 2, 4, "stopped")]
    assert summary["first_bad_steps"]["kl_rise@general"] == 2 and stages[0]["triggers"] == []
    assert {t["name"] for t in stages[1]["triggers"]} == {"kl_rise"}
    assert "kl_rise@" in stages[1]["why"] and "Stage 3 was not run." in stages[1]["why"]
    assert summary["status"] == "stopped_early" and summary["stop_reason"] == "kl_rise"
    assert summary["stop_step"] == 4 and summary["stages"] == stages
    assert summary["vit_last"] == 4 and summary["targets"]["vit_blocks"] == [8, 9, 10, 11]

    # the model at stage 2's start is stage 1's end: the eval loss measured with the new (zero) modules attached
    # and a rebuilt frozen-prefix cache equals the step-2 evaluation's
    assert stages[1]["previous_eval_loss"] == metrics[1]["eval_loss"]
    assert abs(stages[1]["start_eval_loss"] - metrics[1]["eval_loss"]) < 1e-5
    assert abs(stages[1]["start_eval_loss"] - metrics[2]["eval_loss"]) > 1e-4  # and stage 2 then trained

    # the adapters: stage 1's checkpoint holds blocks 10-11, stage 2's blocks 8-11, whose config names them
    def blocks(step):
        tensors = load_file(str(run / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"))
        return tensors, sorted({int(k.split("blocks.")[1].split(".")[0]) for k in tensors})
    first, first_blocks = blocks(2)
    second, second_blocks = blocks(4)
    assert first_blocks == [10, 11] and second_blocks == [8, 9, 10, 11]
    config = json.loads((run / "checkpoints" / "checkpoint-4" / "adapter_config.json").read_text(encoding="utf-8"))
    planned = json.loads((run / "params.json").read_text(encoding="utf-8"))["stages"]
    assert config["target_modules"] == planned[1]["regex"] == stages[1]["regex"]
    assert all(not torch.equal(first[k], second[k]) for k in first if ".lora_B." in k)  # stage 1's kept training
    assert stages[1]["added_modules"] and all(".blocks.8." in m or ".blocks.9." in m
                                              for m in stages[1]["added_modules"])

    # one AdamW across the stages: stage 1's parameters carry 4 steps of state, stage 2's new groups 2, at vit_lr
    optimizer = torch.load(run / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=False)
    n_first = len(json.loads((run / "params.json").read_text(encoding="utf-8"))["optimizer_groups"])
    groups = optimizer["param_groups"]
    assert len(groups) == n_first + len(stages[1]["optimizer_groups_added"])
    steps = [{float(optimizer["state"][i]["step"]) for i in g["params"]} for g in groups]
    assert steps[:n_first] == [{4.0}] * n_first and steps[n_first:] == [{2.0}] * (len(groups) - n_first)
    assert all(g["tower"] == "vit" and g["initial_lr"] == 5e-3 for g in groups)

    # the best checkpoint is chosen over both stages under the usual constraint
    assert summary["best"]["checkpoint"] in ("checkpoints/checkpoint-2", "checkpoints/checkpoint-4")
    assert any("stage 2: LoRA added to" in line for line in said)


def test_stages_are_refused_unless_they_grow(toy_ckpt, mini_world, tmp_path):
    from lora_kit.config import load_config
    from lora_kit.errors import ConfigError

    params = tiny_params(toy_ckpt, mini_world, tmp_path, variant="P_bad", vit_last=4,
                         stages=[{"vit_last": 4}, {"vit_last": 2}])
    with pytest.raises(ConfigError, match=r"stage 2 \(llm_last 0, vit_last 2\) drops layers of stage 1"):
        load_config([params])
    params = tiny_params(toy_ckpt, mini_world, tmp_path, vit_last=0, stages=[{"vit_last": 2}, {"vit_last": 4}])
    with pytest.raises(ConfigError) as err:
        load_config([params])
    assert "Fix: set llm_last: 0 and vit_last: 2" in str(err.value) and "Fix: set variant, e.g. P_vit" in str(err.value)


def test_an_interrupted_staged_run_is_not_resumed(toy_ckpt, mini_world, tmp_path):
    """A checkpoint does not say which stage's adapter, optimizer groups and schedule it holds: an unfinished
    staged run with checkpoints is refused, with the fix, before the run folder is touched."""
    from lora_kit.config import load_config
    from lora_kit.errors import ConfigError
    from lora_kit.train import train

    run = tmp_path / "runs" / "P_test"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}", encoding="utf-8")
    params = _stages_params(toy_ckpt, mini_world, tmp_path)
    cfg = load_config([params])
    (run / "params.json").write_text(json.dumps({"config": cfg.to_dict()}), encoding="utf-8")  # the same values
    (run / "summary.json").write_text(json.dumps({"variant": "P_test", "status": "running", "pid": 999999}),
                                      encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cannot resume from a checkpoint .* Fix: set overwrite: true"):
        train(cfg, log=lambda *_: None)
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["status"] == "running"
