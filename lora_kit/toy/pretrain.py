"""Pretraining the toy base (stage 2 and stage 3) so it has general ability that fine-tuning can erode.

A plain loop, nanoGPT style: the whole model trains from random weights on the pretraining mix of the
toy world, at a high constant learning rate with a short warmup and a final linear decay (the recipe
measured in DESIGN.md). Stage 2 is the checkpoint at `stage2_step`, stage 3 the final one.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import Encoder, collate_padded, read_jsonl


@dataclass(frozen=True)
class PretrainSpec:
    """How the toy base is pretrained; part of the toy cache key."""

    steps: int = 1700            # 0.54-0.63 s/step on 2 threads: the build took 17-19 min; 1450 steps missed 0.80
    stage2_step: int = 700       # stage 2: an earlier, weaker base for the restart baseline
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.4   # linear decay to 0 over the last 40% (0.15 left 2-object scenes 0.53 vs 0.59)
    weight_decay: float = 0.01
    max_length: int = 256
    threads: int = 2
    progress_every: int = 300     # a quick benchmark check (object accuracy, hallucination) in the log


def lr_at(step: int, spec: PretrainSpec) -> float:
    """Warmup, then constant, then a linear decay over the last `decay_fraction` of the steps."""
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    decay_start = spec.steps * (1 - spec.decay_fraction)
    if step >= decay_start:
        return spec.learning_rate * max(0.0, (spec.steps - step) / (spec.steps - decay_start))
    return spec.learning_rate


def pretrain(init_dir: Path, train_file: Path, stage2_dir: Path, stage3_dir: Path, spec: PretrainSpec,
             seed: int, log=print, progress=None) -> dict:
    """Train the randomly initialised toy on the pretraining mix; save stage 2 and stage 3 as HF folders."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(spec.threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = AutoProcessor.from_pretrained(init_dir)
    model = AutoModelForImageTextToText.from_pretrained(init_dir)
    model.train()
    encoder = Encoder(processor, spec.max_length)
    samples, _ = read_jsonl(train_file)
    t0 = time.time()
    encoded = [encoder.encode(s) for s in samples]
    log(f"encoded {len(encoded)} pretraining samples in {time.time() - t0:.0f}s")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=spec.learning_rate, betas=(0.9, 0.95))
    pad, image_id = processor.tokenizer.pad_token_id, processor.image_token_id
    losses, checks, t0 = [], [], time.time()
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec)
        # Padded, not packed: measured here, packing these ~85-token samples into 512-token rows made a step
        # 16% slower (0.52 vs 0.45 s) since CPU attention then works on the whole row with a block mask.
        batch = collate_padded(rng.sample(encoded, spec.batch_size), pad, image_id)
        loss = model(**batch, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"toy pretraining diverged at step {step} (loss {loss.item()})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == spec.steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            elapsed = time.time() - t0
            log(f"pretrain step {step + 1}/{spec.steps}  loss {recent:.3f}  lr {lr_at(step, spec):.1e}  "
                f"{elapsed / (step + 1):.2f}s/step  eta {elapsed / (step + 1) * (spec.steps - step - 1) / 60:.1f} min")
        if progress is not None and (step + 1) % spec.progress_every == 0:
            checks.append({"step": step + 1, **progress(model, processor)})
            log(f"  check at step {step + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in checks[-1].items()
                                                             if k != "step"))
        if step + 1 == spec.stage2_step:
            _save(model, processor, stage2_dir)
    _save(model, processor, stage3_dir)
    return {"steps": spec.steps, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "seconds": time.time() - t0, "loss_curve": losses[::10], "checks": checks}


def _save(model, processor, out_dir: Path) -> None:
    """Save as a normal HF folder, via a temporary folder so a half-written checkpoint never appears."""
    import os
    import shutil
    import tempfile

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
