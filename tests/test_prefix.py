"""The frozen-prefix fast path gives the model's own loss and gradients, from a cache that stays valid."""
from __future__ import annotations

import pytest
import torch

from lora_kit.config import RunConfig
from lora_kit.data import Encoder, read_jsonl
from lora_kit.evaluate import mean_loss
from lora_kit.prefix import FrozenPrefix, plan_prefix
from lora_kit.train import Collator, attach_lora
from lora_kit.targeting import find_towers, plan_targets

# The default toy: 8 decoder layers, 12 vision blocks, deepstack taps after vision blocks 1, 3, 5 that
# are added after decoder layers 0, 1, 2.
LAYERS, BLOCKS, TAPS = 8, 12, 3


def lora_model(toy_ckpt, llm_last: int, vit_last: int):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(toy_ckpt)
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    towers = find_towers(model)
    cfg = RunConfig(model=str(toy_ckpt), profile="none", llm_last=llm_last, vit_last=vit_last, lora_dropout=0.0)
    model, _ = attach_lora(model, plan_targets(towers, llm_last, vit_last), towers, cfg)
    for name, p in model.named_parameters():  # B starts at zero; give every LoRA factor a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train(), processor


@pytest.fixture(scope="module")
def encoded(toy_ckpt, mini_world):
    from transformers import AutoProcessor

    samples, _ = read_jsonl(mini_world / "task_train.jsonl")
    encoder = Encoder(AutoProcessor.from_pretrained(toy_ckpt), 256)
    return [encoder.encode(s) for s in samples[:6]]


@pytest.mark.parametrize("llm_last, vit_last, mode, llm_start, vit_start, text_start", [
    (2, 0, "llm", LAYERS - 2, None, None),             # A1: everything before decoder layer 6 is cached
    (0, 6, "vision", None, BLOCKS - 6, LAYERS),        # B3: vision blocks 0-5 (all deepstack taps) cached; text whole
    (2, 4, "vision", None, BLOCKS - 4, LAYERS - 2),    # C2: text-only samples' layers 0-5 too
    (6, 0, "vision", None, BLOCKS, LAYERS - 6),        # decoder LoRA reaches the deepstack layers: vision output only
    (8, 4, "vision", None, BLOCKS - 4, None),          # every decoder layer trains: nothing of the text to cache
])
def test_plan_follows_what_trains(toy_ckpt, llm_last, vit_last, mode, llm_start, vit_start, text_start):
    model, _ = lora_model(toy_ckpt, llm_last, vit_last)
    plan = plan_prefix(model)
    assert (plan.mode, plan.llm_start, plan.vit_start, plan.text_start) == (mode, llm_start, vit_start, text_start)
    assert plan_prefix(model, augmentation="crop_jitter").mode == "none"  # new pixels every step
    assert plan_prefix(model, world_size=2).mode == "none"


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _check_fast_path(model, prefix, collate, encoded) -> None:
    """The fast loss and gradients equal the model's own on two overlapping batches (the second hits the
    cache twice), with an optimizer-like step between them: the trained layers change, the cached prefix
    stays valid."""
    for batch_samples in (encoded[:4], encoded[2:6]):
        batch = collate(batch_samples)
        rows = batch.pop("rows")
        model.zero_grad()
        plain = model(**batch).loss
        plain.backward()
        plain_grads = _grads(model)
        model.zero_grad()
        fast = prefix.loss(batch, rows)
        fast.backward()
        assert float(fast.detach()) == pytest.approx(float(plain.detach()), rel=1e-5, abs=1e-6)
        assert _grads(model).keys() == plain_grads.keys() and plain_grads  # (a text-only batch: no vision grads)
        for name, g in _grads(model).items():
            torch.testing.assert_close(g, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("llm_last, vit_last", [(2, 0), (0, 6), (2, 4), (6, 0)])
@pytest.mark.parametrize("packing", [True, False])
def test_fast_loss_and_gradients_equal_the_models_own(toy_ckpt, encoded, llm_last, vit_last, packing):
    model, processor = lora_model(toy_ckpt, llm_last, vit_last)
    collate = Collator(processor, model, packing, 256, rows=True)
    prefix = FrozenPrefix(model, plan_prefix(model))
    assert prefix.plan.mode != "none"
    _check_fast_path(model, prefix, collate, encoded)
    assert prefix.hits == 2 and prefix.misses == 6  # samples 2 and 3 came from the cache


@pytest.fixture(scope="module")
def text_only(toy_ckpt, mini_world):
    from transformers import AutoProcessor

    samples, _ = read_jsonl(mini_world / "general_eval.jsonl")
    encoder = Encoder(AutoProcessor.from_pretrained(toy_ckpt), 256)
    out = [encoder.encode(s) for s in samples[:6]]
    assert all(e.pixel_values is None for e in out)  # the general slice is text: what this route is for
    return out


@pytest.mark.parametrize("llm_last, vit_last", [(2, 4), (0, 6)])
@pytest.mark.parametrize("packing", [True, False])
def test_text_only_batches_in_vision_mode_equal_the_models_own(toy_ckpt, text_only, llm_last, vit_last, packing):
    """B and C variants: a batch without images runs only the trained decoder layers (none for B) from the
    cache of the frozen ones, with the model's own loss and gradients."""
    model, processor = lora_model(toy_ckpt, llm_last, vit_last)
    collate = Collator(processor, model, packing, 256, rows=True)
    prefix = FrozenPrefix(model, plan_prefix(model))
    assert prefix.plan.mode == "vision" and prefix.plan.text_start == LAYERS - llm_last
    if llm_last:
        _check_fast_path(model, prefix, collate, text_only)
    else:  # no decoder layer trains: the loss is fixed, and has no gradient
        batch = collate(text_only[:4])
        rows = batch.pop("rows")
        with torch.no_grad():
            assert float(prefix.loss(batch, rows)) == pytest.approx(float(model(**batch).loss), rel=1e-5)
    assert prefix.misses == (6 if llm_last else 4) and prefix.hits == (2 if llm_last else 0)


def test_evaluation_loss_from_the_cache_equals_the_plain_one(toy_ckpt, encoded):
    model, processor = lora_model(toy_ckpt, 2, 0)
    args = {"batch_size": 4, "image_token_id": processor.image_token_id, "pad_id": processor.tokenizer.pad_token_id}
    prefix = FrozenPrefix(model, plan_prefix(model))
    plain = mean_loss(model, encoded, **args)
    assert mean_loss(model, encoded, prefix=prefix, **args) == pytest.approx(plain, rel=1e-5)
    assert mean_loss(model, encoded, prefix=prefix, **args) == pytest.approx(plain, rel=1e-5)  # from the cache
    assert prefix.hits == len(encoded) and model.training  # evaluation restores training mode


def test_a_full_cache_still_gives_the_right_loss(toy_ckpt, encoded):
    model, processor = lora_model(toy_ckpt, 2, 4)
    batch = Collator(processor, model, True, 256, rows=True)(encoded[:4])
    rows = batch.pop("rows")
    prefix = FrozenPrefix(model, plan_prefix(model), max_bytes=0, log=lambda *_: None)
    with torch.no_grad():
        assert float(prefix.loss(batch, rows)) == pytest.approx(float(model(**batch).loss), rel=1e-5)
    assert prefix.cache == {} and prefix.bytes > prefix.max_bytes


# ---------------------------------------------------------------- every family the kit trains

# Qwen2-VL and Qwen2.5-VL have no deepstack, so decoder LoRA on layers 2.. still leaves an llm prefix; Qwen2.5-VL's
# toy attends within windows except in vision blocks 3, 7, 11, so a suffix from block 6 or 8 runs both kinds.
OTHER_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("llm_last, vit_last, mode, llm_start, vit_start", [
    (2, 0, "llm", LAYERS - 2, None),
    (6, 0, "llm", LAYERS - 6, None),             # no deepstack layers to keep in the prefix
    (0, 6, "vision", None, BLOCKS - 6),
    (2, 4, "vision", None, BLOCKS - 4),
])
@pytest.mark.parametrize("packing", [True, False])
def test_each_family_fast_loss_and_gradients_equal_the_models_own(family_ckpt, mini_world, family, llm_last,
                                                                   vit_last, mode, llm_start, vit_start, packing):
    ckpt = family_ckpt(family)
    model, processor = lora_model(ckpt, llm_last, vit_last)
    assert model.get_base_model().config.model_type == family
    samples, _ = read_jsonl(mini_world / "task_train.jsonl")
    encoded = [Encoder(processor, 256).encode(s) for s in samples[:6]]
    prefix = FrozenPrefix(model, plan_prefix(model))
    assert (prefix.plan.mode, prefix.plan.llm_start, prefix.plan.vit_start) == (mode, llm_start, vit_start)
    collate = Collator(processor, model, packing, 256, rows=True)
    _check_fast_path(model, prefix, collate, encoded)
    assert prefix.hits == 2 and prefix.misses == 6


def test_sliding_window_decoder_layers_turn_the_fast_path_off_with_the_reason(family_ckpt):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(family_ckpt("qwen2_5_vl"))
    config.text_config.use_sliding_window, config.text_config.sliding_window = True, 64
    config.text_config.max_window_layers = 0
    config.text_config.layer_types = ["sliding_attention"] * config.text_config.num_hidden_layers
    model = AutoModelForImageTextToText.from_config(config)
    towers = find_towers(model)
    cfg = RunConfig(model=str(family_ckpt("qwen2_5_vl")), profile="none", llm_last=2, lora_dropout=0.0)
    model, _ = attach_lora(model, plan_targets(towers, 2, 0), towers, cfg)
    plan = plan_prefix(model)
    assert plan.mode == "none" and "sliding-window" in plan.why
