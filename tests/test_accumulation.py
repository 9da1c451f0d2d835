"""An optimizer step's loss is the token-weighted mean over the whole step's supervised tokens, whatever the split.

The same two samples (answers of very different lengths) trained for one step as batch 2 x accumulation 1 and as
batch 1 x accumulation 2 must give the same gradients, the same logged loss and grad norm, on the model's own path
and on the frozen-prefix path, packed and padded. The reference is computed independently: the model's own loss
of one padded batch holding both samples (a mean over all their supervised tokens) and its gradients.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import TrainerCallback

from lora_kit.config import RunConfig
from lora_kit.data import Encoder, collate_padded, read_jsonl
from lora_kit.train import Collator, StudyTrainer, attach_lora, frozen_prefix, training_arguments
from lora_kit.targeting import find_towers, plan_targets

LLM_LAST, VIT_LAST = 2, 4  # C2: the fast path caches the frozen vision blocks


@pytest.fixture(scope="module")
def short_and_long(toy_ckpt, mini_world):
    """Two encoded samples whose answers differ ~20-fold in length (a terse label and a long caption)."""
    from transformers import AutoProcessor

    samples, _ = read_jsonl(mini_world / "task_train.jsonl")
    first = samples[0]
    short = dataclasses.replace(first, messages=[*first.messages[:-1], {"role": "assistant", "content": "无关"}])
    long_text = "图中有一个红色的圆形和一个蓝色的三角形。" * 4
    long = dataclasses.replace(samples[1], messages=[*samples[1].messages[:-1],
                                                     {"role": "assistant", "content": long_text}])
    encoder = Encoder(AutoProcessor.from_pretrained(toy_ckpt), 512)
    pair = [encoder.encode(short), encoder.encode(long)]
    assert pair[1].n_supervised > 10 * pair[0].n_supervised
    return pair


def lora_model(toy_ckpt, cfg: RunConfig):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    towers = find_towers(model)
    model, _ = attach_lora(model, plan_targets(towers, cfg.llm_last, cfg.vit_last), towers, cfg)
    for name, p in model.named_parameters():  # B starts at zero; give every LoRA factor a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model, towers


class StepRecorder(TrainerCallback):
    """The gradients just before the optimizer step (after clipping, here a no-op) and the logged values."""

    def __init__(self):
        self.grads, self.logs = {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.update(logs or {})


def one_step(toy_ckpt, pair, tmp_path, *, batch: int, accumulation: int, packing: bool, fast: bool):
    from transformers import AutoProcessor

    cfg = RunConfig(model=str(toy_ckpt), profile="none", llm_last=LLM_LAST, vit_last=VIT_LAST, lora_dropout=0.0,
                    per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                    packing=packing, max_length=512, logging_steps=1, learning_rate=1e-3, vit_lr=1e-3)
    model, towers = lora_model(toy_ckpt, cfg)
    processor = AutoProcessor.from_pretrained(toy_ckpt)
    collator = Collator(processor, model, packing, cfg.max_length, rows=True)
    prefix = frozen_prefix(model, cfg, collator, pair, log=lambda *_: None) if fast else None
    assert (prefix is not None) == fast
    args = dataclasses.replace(training_arguments(cfg, tmp_path), save_strategy="no", report_to=[],
                               max_grad_norm=1e9, disable_tqdm=True)
    recorder = StepRecorder()
    trainer = StudyTrainer(model=model, args=args, train_dataset=pair, data_collator=collator, towers=towers,
                           run_cfg=cfg, prefix=prefix, callbacks=[recorder])
    trainer.train()
    if fast:  # the step ran on the cache that the fast path's check filled
        assert prefix.hits >= len(pair), prefix.stats()
    return recorder


def reference_step(toy_ckpt, pair):
    """Loss and gradients of both samples in one padded batch: the model's own mean over all their tokens."""
    from transformers import AutoProcessor

    cfg = RunConfig(model=str(toy_ckpt), profile="none", llm_last=LLM_LAST, vit_last=VIT_LAST, lora_dropout=0.0)
    model, _ = lora_model(toy_ckpt, cfg)
    processor = AutoProcessor.from_pretrained(toy_ckpt)
    batch = collate_padded(pair, processor.tokenizer.pad_token_id, processor.image_token_id)
    loss = model.train()(**batch, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    return float(loss.detach()), grads, float(norm)


@pytest.mark.parametrize("fast", [False, True], ids=["own_path", "frozen_prefix"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_a_step_has_the_same_loss_and_gradients_however_the_batch_is_split(toy_ckpt, short_and_long, tmp_path,
                                                                          packing, fast):
    loss, grads, norm = reference_step(toy_ckpt, short_and_long)
    for batch, accumulation in ((2, 1), (1, 2)):
        step = one_step(toy_ckpt, short_and_long, tmp_path / f"{batch}x{accumulation}", batch=batch,
                        accumulation=accumulation, packing=packing, fast=fast)
        split = f"batch {batch} x accumulation {accumulation}"
        assert step.logs["loss"] == pytest.approx(loss, rel=1e-5), split
        assert step.logs["grad_norm"] == pytest.approx(norm, rel=1e-4), split
        assert step.grads.keys() == grads.keys()
        for name, g in step.grads.items():
            torch.testing.assert_close(g, grads[name], rtol=1e-4, atol=1e-7, msg=f"{split}: {name}")
