"""The cached guardrail evaluation (prompts encoded once, each image through the vision tower once per evaluation,
the frozen vision blocks cached across evaluations) gives today's straightforward evaluation's record: the same
generations, token for token, and the same losses."""
from __future__ import annotations

import math

import pytest
import torch

from lora_kit.config import RunConfig
from lora_kit.data import Encoder
from lora_kit.evaluate import EvalImages, build_evalset, guardrail_record, image_cache
from lora_kit.prefix import FrozenPrefix, plan_prefix
from lora_kit.targeting import find_towers, plan_targets
from lora_kit.train import attach_lora, data_files

LOSSES = ("eval_loss", "train_loss", "general_loss")


def config(toy_ckpt, world, llm_last, vit_last) -> RunConfig:
    return RunConfig(model=str(toy_ckpt), profile="none", llm_last=llm_last, vit_last=vit_last, lora_dropout=0.0,
                     train_file=str(world / "task_train.jsonl"), val_file=str(world / "task_val.jsonl"),
                     bench_file=str(world / "bench.jsonl"), general_file=str(world / "general_eval.jsonl"),
                     spotcheck_file=str(world / "spotcheck.jsonl"), terms_file=str(world / "terms.json"),
                     eval_max_samples=2, exact_match_samples=4, crop_jitter_k=1, max_new_tokens=4,
                     per_device_eval_batch_size=8, max_length=256)


def perturb_what_trains(model, seed: int) -> None:
    """A stand-in for training between two evaluations: every trainable parameter moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("llm_last, vit_last, images_mode, vit_start", [
    (2, 0, "vision", 12),   # A1: frozen vision tower (its output cached whole) and frozen decoder layers 0-5
    (0, 4, "vision", 8),    # B2: vision blocks 8-11 train, blocks 0-7 cached
    (2, 4, "vision", 8),    # C2: both towers train
])
def test_cached_evaluation_equals_the_straightforward_one(toy_ckpt, mini_world, llm_last, vit_last, images_mode,
                                                          vit_start):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    cfg = config(toy_ckpt, mini_world, llm_last, vit_last)
    processor = AutoProcessor.from_pretrained(toy_ckpt)
    encoder = Encoder(processor, cfg.max_length)
    es = build_evalset(cfg, encoder, data_files(cfg))
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    towers = find_towers(model)
    model, _ = attach_lora(model, plan_targets(towers, llm_last, vit_last), towers, cfg)
    perturb_what_trains(model, 0)  # LoRA B starts at zero: make the adapters matter from the first evaluation
    prefix = FrozenPrefix(model, plan_prefix(model))
    images = image_cache(model, log=lambda *_: None)
    assert (images.plan.mode, images.plan.vit_start) == (images_mode, vit_start)

    for evaluation in range(2):  # the second evaluation reads the caches the first filled, after "training"
        if evaluation:
            perturb_what_trains(model, evaluation)
        ref, ref_gens, ref_caps = guardrail_record(model, encoder, es, cfg, step=evaluation, baseline_captions=None,
                                                   cache=False)
        got, gens, caps = guardrail_record(model, encoder, es, cfg, step=evaluation, baseline_captions=None,
                                           prefix=prefix, images=images)
        assert [g.answer for g in gens] == [g.answer for g in ref_gens]
        assert [g.n_tokens for g in gens] == [g.n_tokens for g in ref_gens]
        assert caps == ref_caps and got["crop"] == ref["crop"] and got["task_exact_match"] == ref["task_exact_match"]
        # KL from the start model's kept log-probs and the frozen-prefix cache: the same within float error
        kl, kl_ref = ({p: (v.pop("kl_base"), v["kl_base_tokens"]) for p, v in r["probes"].items() if "kl_base" in v}
                      for r in (got, ref))
        assert kl.keys() == kl_ref.keys() and kl
        for p in kl:
            assert kl[p][1] == kl_ref[p][1] and math.isclose(kl[p][0], kl_ref[p][0], rel_tol=0, abs_tol=1e-5), p
            assert evaluation == 0 or kl_ref[p][0] > 1e-3  # after two perturbations the model is away from its base
        assert got["probes"] == ref["probes"]
        for key in LOSSES:
            assert math.isclose(got[key], ref[key], rel_tol=1e-5), (key, got[key], ref[key])
    assert images.hits > 0 and images.misses > 0  # the second evaluation's images came from the cache
    assert es.kl_base_logprobs is not None  # the second evaluation read the start model's log-probs kept by the first

    # After training moved, the image features the cache gives are the tower's own (no stale entry): compared
    # directly, so that a stale cache fails here even where greedy answers would not show it.
    prompts = es.prompts("bench", encoder, es.bench)[:4]
    grid = torch.cat([e.image_grid_thw for e in prompts])
    mine = EvalImages(model, images).outputs(prompts, model.device)
    own = model.get_base_model().model.get_image_features(torch.cat([e.pixel_values for e in prompts]), grid,
                                                          return_dict=True)
    torch.testing.assert_close(torch.cat(mine.pooler_output), torch.cat(own.pooler_output), rtol=1e-5, atol=1e-5)
    for a, b in zip(mine.deepstack_features, own.deepstack_features):
        torch.testing.assert_close(torch.cat(a), torch.cat(b), rtol=1e-5, atol=1e-5)


def test_a_trained_patch_embedding_leaves_nothing_to_cache(toy_ckpt):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    model.requires_grad_(False)
    assert image_cache(model, log=lambda *_: None).plan.vit_start == 12  # nothing trains: the whole tower
    model.model.visual.patch_embed.requires_grad_(True)
    assert image_cache(model, log=lambda *_: None) is None
