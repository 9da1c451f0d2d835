"""Guardrail evaluation with sharded weights (FSDP, ZeRO-3): every rank evaluates its share, and the
record equals the one a single process computes with the whole model. Run with torchrun on CPU (gloo),
with torch's own FSDP1 wrapper and FSDP2's fully_shard, the two forms the Trainer hands to callbacks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lora_kit.config import load_config
from lora_kit.errors import ConfigError
from lora_kit.paths import REPO_ROOT

from test_train import tiny_params

# Each FSDP form, on every rank: guardrail_record through the kit's sharded path, then one evaluation
# at step 2 through GuardrailCallback.on_step_end (rank 0 keeps it in the run folder). Rank 0 writes what
# it measured; every rank writes how many prompts it encoded.
WORKER = '''
import dataclasses, functools, json, os, sys
from pathlib import Path
from types import SimpleNamespace
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerControl
from lora_kit.config import load_config
from lora_kit.data import Encoder
from lora_kit.distributed import init_ranks
from lora_kit.evaluate import build_evalset, guardrail_record
from lora_kit.rundir import RunFolder
from lora_kit.train import GuardrailCallback, data_files

params, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config([params])
ranks = dataclasses.replace(init_ranks(1), sharded=True)
processor = AutoProcessor.from_pretrained(cfg.model)
encoder = Encoder(processor, cfg.max_length)
evalset = build_evalset(cfg, encoder, data_files(cfg))
prompts = [0]
encode_prompt = Encoder.encode_prompt
def counting(self, *args, **kwargs):
    prompts[0] += 1
    return encode_prompt(self, *args, **kwargs)
Encoder.encode_prompt = counting


def sharded(form):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock
    model = AutoModelForImageTextToText.from_pretrained(cfg.model)
    if form == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        policy = functools.partial(transformer_auto_wrap_policy,
                                   transformer_layer_cls={Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock})
        return model, FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                               use_orig_params=True)
    from torch.distributed.fsdp import fully_shard
    for m in model.modules():
        if isinstance(m, (Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock)):
            fully_shard(m)
    return model, fully_shard(model)


result = {}
for form in ("fsdp1", "fsdp2"):
    inner, wrapped = sharded(form)
    prompts[0] = 0
    record, gens, captions = guardrail_record(wrapped, encoder, evalset, cfg, step=None, baseline_captions=None,
                                              ranks=ranks)
    result[form] = {"record": record, "answers": [g.answer for g in gens], "captions": captions,
                    "prompts": prompts[0]}
    run = RunFolder(Path(cfg.output_dir) / form)
    ranks.on_rank0(run.claim)
    callback = GuardrailCallback(run, cfg, encoder, evalset, ranks)
    control = TrainerControl()
    state = SimpleNamespace(global_step=0, epoch=0.0, max_steps=4)
    logged = []  # what rank 0 hands the Trainer's log (every report_to integration)
    callback.trainer = SimpleNamespace(model=wrapped, state=state, control=control, log=logged.append)
    ranks.on_rank0(callback.check, callback.measure(wrapped, 0), 0, 0.0)  # step 0, measured by all ranks
    callback.on_train_begin(None, state, control)  # step 0 reaches the log once the Trainer has begun
    state.global_step, state.epoch = 2, 0.5  # step 2: an evaluation step, not the last
    callback.on_step_end(None, state, control, model=inner)
    result[form]["logged_eval_loss"] = [logs.get("eval_loss") for logs in logged]
    result[form]["stop"] = control.should_training_stop
    ranks.on_rank0(run.release)
(out / f"rank{ranks.rank}.json").write_text(json.dumps(result, ensure_ascii=False))
ranks.close()
'''

LOSSES = ("eval_loss", "train_loss", "general_loss")
RATES = ("irrelevant_pass", "false_refusal", "hallucination", "object_accuracy", "blindness")


@pytest.mark.slow
def test_sharded_evaluation_equals_the_single_process_record(toy_ckpt, mini_world, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lora_kit.data import Encoder
    from lora_kit.evaluate import build_evalset, guardrail_record
    from lora_kit.train import data_files

    params = tiny_params(toy_ckpt, mini_world, tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(params), str(out)], capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # The reference: one process, the whole model, no sharding.
    cfg = load_config([params])
    processor = AutoProcessor.from_pretrained(cfg.model)
    encoder = Encoder(processor, cfg.max_length)
    evalset = build_evalset(cfg, encoder, data_files(cfg))
    model = AutoModelForImageTextToText.from_pretrained(cfg.model)
    ref, ref_gens, ref_captions = guardrail_record(model, encoder, evalset, cfg, step=None, baseline_captions=None)
    n_prompts = (len(evalset.bench) + len(evalset.exact) + len(evalset.spotcheck)
                 + len(evalset.crops) * (1 + cfg.crop_jitter_k))

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for form in ("fsdp1", "fsdp2"):
        got = ranks[0][form]
        for key in LOSSES:
            assert math.isclose(got["record"][key], ref[key], rel_tol=1e-4), (form, key, got["record"][key], ref[key])
        assert got["answers"] == [g.answer for g in ref_gens], form
        assert got["captions"] == ref_captions, form
        for probe, group in ref["probes"].items():
            for key in RATES:
                assert (got["record"]["probes"][probe][key]["k"], got["record"]["probes"][probe][key]["n"]) == \
                    (group[key]["k"], group[key]["n"]), (form, probe, key)
        assert got["record"]["task_exact_match"] == ref["task_exact_match"]
        assert got["record"]["crop"]["agreement_rate"] == pytest.approx(ref["crop"]["agreement_rate"])
        # every rank returns the same record, and each prompt was encoded once (plus at most one pad per call)
        assert ranks[1][form]["answers"] == got["answers"]
        counts = [r[form]["prompts"] for r in ranks]
        assert sum(counts) - n_prompts in range(0, 4), (counts, n_prompts)
        assert abs(counts[0] - counts[1]) <= 3, counts
        # the callback: rank 0 kept steps 0 and 2 in the run folder, once each, with the same losses
        lines = [json.loads(line) for line in (tmp_path / "runs" / form / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [0, 2]
        for key in LOSSES:
            assert math.isclose(lines[1][key], ref[key], rel_tol=1e-4), (form, key)
        assert ranks[0][form]["stop"] == ranks[1][form]["stop"]
        # rank 0 logged steps 0 and 2 (what metrics.jsonl holds), the other rank nothing
        assert ranks[0][form]["logged_eval_loss"] == [r["eval_loss"] for r in lines]
        assert not ranks[1][form]["logged_eval_loss"]


def test_fsdp_and_deepspeed_parameters_are_checked(tmp_path):
    (tmp_path / "ds3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (tmp_path / "fsdp.json").write_text(json.dumps({"version": 2}))
    (tmp_path / "list.json").write_text("[1]")
    assert load_config([], {"deepspeed": str(tmp_path / "ds3.json")}).deepspeed == str(tmp_path / "ds3.json")
    cfg = load_config([], {"fsdp": "full_shard auto_wrap", "fsdp_config": str(tmp_path / "fsdp.json")})
    assert (cfg.fsdp, cfg.fsdp_config) == ("full_shard auto_wrap", str(tmp_path / "fsdp.json"))
    with pytest.raises(ConfigError, match=r"fsdp = .* and deepspeed = .*at most one.*Fix: set fsdp: null"):
        load_config([], {"fsdp": "full_shard", "deepspeed": str(tmp_path / "ds3.json")})
    with pytest.raises(ConfigError, match=r"fsdp_config = .*set together with fsdp.*Fix"):
        load_config([], {"fsdp_config": str(tmp_path / "fsdp.json")})
    with pytest.raises(ConfigError, match=r"fsdp_config = .*list.json.*readable JSON file holding an object"):
        load_config([], {"fsdp": "full_shard", "fsdp_config": str(tmp_path / "list.json")})
    with pytest.raises(ConfigError, match=r"fsdp = .*FSDP option"):
        load_config([], {"fsdp": " "})


def test_fsdp_checkpoints_must_hold_whole_adapters():
    from lora_kit.train import check_sharded_checkpoints

    def trainer(kind):
        plugin = SimpleNamespace(state_dict_type=kind)
        state = SimpleNamespace(fsdp_plugin=plugin)
        return SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=state))
    check_sharded_checkpoints(trainer("StateDictType.FULL_STATE_DICT"))
    with pytest.raises(ConfigError, match=r"SHARDED_STATE_DICT.*Fix: set state_dict_type: FULL_STATE_DICT"):
        check_sharded_checkpoints(trainer("StateDictType.SHARDED_STATE_DICT"))


def test_fsdp_needs_several_processes(toy_ckpt, mini_world, tmp_path):
    from lora_kit.train import train

    params = tiny_params(toy_ckpt, mini_world, tmp_path, variant="F1", llm_last=2, vit_last=0)
    with pytest.raises(ConfigError, match=r"fsdp = 'full_shard auto_wrap' .* one process\. Fix: set nproc"):
        train(load_config([params], {"fsdp": "full_shard auto_wrap"}), log=lambda *_: None)
    assert not (tmp_path / "runs" / "F1").exists()  # refused before a run folder exists


@pytest.mark.slow
def test_fsdp_that_accelerate_does_not_enable_is_an_error(toy_ckpt, mini_world, tmp_path):
    # On CPU accelerate runs plain data parallel whatever fsdp says; training on silently unsharded
    # would misreport the run, so it stops with the reason.
    params = tiny_params(toy_ckpt, mini_world, tmp_path, variant="F2", llm_last=2, vit_last=0)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lora_kit", "train", "-f", str(params), "--set", "fsdp=full_shard auto_wrap"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "but the Trainer did not enable FSDP" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "runs" / "F2" / "summary.json").read_text())
    assert summary["status"] == "failed" and "did not enable FSDP" in summary["error"]


def test_share_and_gather_give_every_item_to_one_rank_and_restore_the_order(monkeypatch):
    from lora_kit.distributed import Ranks

    for world in (1, 2, 3):
        for n in range(8):
            items = [f"s{i}" for i in range(n)]
            shares = [Ranks(rank=r, world_size=world, sharded=True).share(items, pad="pad") for r in range(world)]
            assert len({len(s) for s in shares}) == 1  # the same number of forward passes on every rank
            assert sorted(x for s in shares for x in s if x != "pad") == sorted(items)
            answers = [[x.upper() for x in s] for s in shares]  # each rank's work on its share
            monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj, group: out.__setitem__(
                slice(None), answers))
            assert Ranks(rank=0, world_size=world, sharded=True).gather(answers[0], n) == [x.upper() for x in items]
