"""The forgetting signal: KL(start model || current) per probe group, from the same model with adapters off."""
from __future__ import annotations

import math

import torch

from lora_kit.config import RunConfig
from lora_kit.data import IGNORE_INDEX, Encoder, collate_padded, read_jsonl
from lora_kit.evaluate import EvalSet, _answered, generate, kl_to_base, probe_of
from lora_kit.targeting import find_towers, plan_targets
from lora_kit.train import attach_lora


def test_kl_equals_a_direct_computation_with_a_separate_base_model(toy_ckpt, mini_world):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(toy_ckpt)
    encoder = Encoder(processor, 256)
    bench, _ = read_jsonl(mini_world / "bench.jsonl", need_assistant=False)
    bench = [s for p in ("general", "task") for s in [b for b in bench if probe_of(b) == p][:3]]
    cfg = RunConfig(model=str(toy_ckpt), profile="none", llm_last=2, vit_last=2, lora_dropout=0.0,
                    per_device_eval_batch_size=4, max_new_tokens=6)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    towers = find_towers(model)
    model, _ = attach_lora(model, plan_targets(towers, 2, 2), towers, cfg)
    for name, p in model.named_parameters():  # B starts at zero (KL 0); move the model away from its base
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    es = EvalSet(val=[], train_subset=[], general=[], bench=bench, spotcheck=[], terms={})
    got = kl_to_base(model, encoder, es, cfg)

    base = AutoModelForImageTextToText.from_pretrained(toy_ckpt).eval()  # a second copy, read from the same folder
    assert es.base_answers == [g.answer for g in generate(base, encoder, bench, max_new_tokens=6)]
    sums, counts = {}, {}
    with torch.no_grad():
        for s, answer in zip(bench, es.base_answers):  # one sample at a time: no padding involved
            e = encoder.encode(_answered(s, answer))
            inputs = collate_padded([e], processor.tokenizer.pad_token_id, encoder.image_token_id)  # one row: no padding
            inputs.pop("labels")
            keep = torch.tensor(e.labels[1:]) != IGNORE_INDEX
            lp = base(**inputs).logits[0, :-1][keep].double().log_softmax(-1)
            lq = model(**inputs).logits[0, :-1][keep].double().log_softmax(-1)
            probe = probe_of(s)
            sums[probe] = sums.get(probe, 0.0) + float((lp.exp() * (lp - lq)).sum())
            counts[probe] = counts.get(probe, 0) + int(keep.sum())
    assert sorted(got) == ["general", "task"]
    for probe in got:
        assert got[probe]["kl_base_tokens"] == counts[probe] > 0
        assert math.isclose(got[probe]["kl_base"], sums[probe] / counts[probe], rel_tol=0, abs_tol=1e-5)
        assert got[probe]["kl_base"] > 1e-4  # the perturbed adapter moved the model: the test can fail
    # with the adapter at zero the model is its base: KL 0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)
    assert all(abs(v["kl_base"]) < 1e-6 for v in kl_to_base(model, encoder, es, cfg).values())


def test_kl_rise_fires_only_when_its_threshold_is_set():
    """kl_base_max null: KL is a metric, never a trigger; set: bad above it for kl_patience evaluations."""
    from lora_kit.guardrails import active_triggers

    def rec(step, kl_task):
        return {"step": step, "eval_loss": 1.0, "train_loss": 1.0,
                "probes": {"general": {"kl_base": 0.01, "kl_base_tokens": 40},
                           "task": {"kl_base": kl_task, "kl_base_tokens": 40}}}

    history = [rec(0, 0.0), rec(2, 0.6), rec(4, 0.3), rec(6, 0.7), rec(8, 0.8)]
    baseline = history[0]
    assert not [t for t in active_triggers(history, baseline, RunConfig(profile="none")) if t.name == "kl_rise"]
    cfg = RunConfig(profile="none", kl_base_max=0.5, kl_patience=2)
    fired = [t for t in active_triggers(history, baseline, cfg) if t.name == "kl_rise"]
    assert [(t.step, t.probe, t.values["values"]) for t in fired] == [(8, "task", [0.7, 0.8])]
    assert not [t for t in active_triggers(history[:4], baseline, cfg) if t.name == "kl_rise"]  # 0.3 reset the run


def test_kl_prediction_is_a_rank_correlation_with_next_evaluation_forgetting():
    """Pairs: KL at evaluation i and (irrelevant drop + hallucination rise) from i to i+1; step 0 left out."""
    import pandas as pd
    from scipy import stats

    from lora_kit.frontier import kl_prediction

    def frame(kl, irr, hal):
        return pd.DataFrame({"step": [0, 2, 4, 6], "kl_base@task": kl, "irrelevant_pass@task": irr,
                             "hallucination@task": hal})

    curves = {"B1": (frame([0.0, 0.1, 0.4, 0.2], [0.9, 0.9, 0.8, 0.4], [0.1, 0.1, 0.1, 0.2]), {}),
              "B2": (frame([0.0, 0.05, 0.3, 0.9], [0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.15, 0.15]), {})}
    got = kl_prediction(curves)
    # by hand: B1 pairs (0.1, 0.1), (0.4, 0.5); B2 pairs (0.05, 0.05), (0.3, 0.0)
    x, y = [0.1, 0.4, 0.05, 0.3], [0.1, 0.5, 0.05, 0.0]
    assert got["n"] == 4 and got["runs"] == 2
    assert abs(got["rho"] - stats.spearmanr(x, y).statistic) < 1e-12 and abs(got["rho"] - 0.4) < 1e-12
    assert kl_prediction({"A0": (frame([0.0] * 4, [0.9] * 4, [0.1] * 4), {})})["rho"] is None  # no spread
