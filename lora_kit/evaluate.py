"""Generation on the OOD / irrelevant mini-benchmark and the metrics computed from it.

The toy base report and the guardrails call the same functions, so a number means the same thing
wherever it appears. Rates come with their n and a Wilson 95% interval (see scoring.Rate).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import scoring
from .data import IGNORE_INDEX, Encoder, Sample, collate_padded, text_of


@dataclass
class Generation:
    """One generated answer and whether it stopped because it hit max_new_tokens."""

    answer: str
    hit_limit: bool
    n_tokens: int


@torch.no_grad()
def generate(model, encoder: Encoder, samples: list[Sample], *, batch_size: int = 16,
             max_new_tokens: int = 32, augments: list | None = None) -> list[Generation]:
    """Greedy answers for the samples' prompts, batched (left padding) with the KV cache.

    `augments`, when given, holds one image transform per sample (the crop-jitter metric).
    """
    tok = encoder.tokenizer
    eos = tok.eos_token_id
    prompts = [encoder.encode_prompt(s, augments[i] if augments else None) for i, s in enumerate(samples)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))  # less padding
    out: list[Generation | None] = [None] * len(samples)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate_padded([prompts[i] for i in idx], tok.pad_token_id, encoder.image_token_id,
                                   padding_side="left")
            batch.pop("labels")
            seq = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
            new = seq[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                ids = new[row].tolist()
                ended = eos in ids
                ids = ids[:ids.index(eos)] if ended else [t for t in ids if t != tok.pad_token_id]
                out[i] = Generation(tok.decode(ids, skip_special_tokens=True).strip(), not ended, len(ids))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


@torch.no_grad()
def mean_loss(model, encoded: list, *, batch_size: int = 16, image_token_id: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over the supervised (assistant) tokens of encoded samples."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate_padded(encoded[start:start + batch_size], pad_id, image_token_id)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits[:, :-1]
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     target.reshape(-1), ignore_index=IGNORE_INDEX,
                                                     reduction="sum")
            total += float(loss)
            count += int((target != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def benchmark_metrics(samples: list[Sample], generations: list[Generation], terms: dict, label: str) -> dict:
    """Every answer-based guardrail metric of one pass over the benchmark, each rate with n and interval."""
    by_kind: dict[str, list[tuple[Sample, Generation]]] = {}
    for s, g in zip(samples, generations):
        by_kind.setdefault(s.extra.get("kind", "in_domain"), []).append((s, g))
    irr = by_kind.get("irrelevant", [])
    ood = by_kind.get("ood", [])
    ind = by_kind.get("in_domain", [])
    answers = lambda pairs: [g.answer for _, g in pairs]  # noqa: E731
    objects = lambda pairs: [s.extra.get("objects", []) for s, _ in pairs]  # noqa: E731
    metrics = {
        "irrelevant_pass": scoring.irrelevant_pass_rate(answers(irr), label),
        "false_refusal": scoring.false_refusal_rate(answers(ind), label),
        "hallucination": scoring.hallucination_rate(answers(ood), objects(ood), terms),
        "hallucination_in_domain": scoring.hallucination_rate(answers(ind), objects(ind), terms),
        "object_accuracy": scoring.object_accuracy(answers(ind), objects(ind), terms),
        "object_recall": scoring.object_micro_recall(answers(ind), objects(ind), terms),
        "blindness": scoring.blindness_rate([g.answer for g in generations], [g.hit_limit for g in generations]),
        "ood_label_rate": scoring.irrelevant_pass_rate(answers(ood), label),
    }
    return {k: v.as_dict() if isinstance(v, scoring.Rate) else v for k, v in metrics.items()}


def samples_record(samples: list[Sample], generations: list[Generation]) -> list[dict]:
    """What gets saved under samples/: every prompt's source, kind, reference and generated answer."""
    return [{"source": s.source, "kind": s.extra.get("kind"), "image_kind": s.extra.get("image_kind"),
             "objects": s.extra.get("objects"), "reference": text_of(s) if s.messages[-1]["role"] == "assistant"
             else None, **asdict(g)} for s, g in zip(samples, generations)]


def caption_answers(model, encoder: Encoder, samples: list[Sample], cfg) -> list[str]:
    """Free-form captions of the fixed spot-check images (their prompt is in the file)."""
    return [g.answer for g in generate(model, encoder, samples, batch_size=cfg.per_device_eval_batch_size,
                                       max_new_tokens=cfg.max_new_tokens)]


def crop_consistency(model, encoder: Encoder, samples: list[Sample], cfg) -> dict:
    """K small crop jitters per image: agreement with the uncropped answer, label flips, mean chrF."""
    import random

    from .augment import crop_jitter

    k = cfg.crop_jitter_k
    full = generate(model, encoder, samples, batch_size=cfg.per_device_eval_batch_size,
                    max_new_tokens=cfg.max_new_tokens)
    jittered = [s for s in samples for _ in range(k)]
    rngs = [random.Random(cfg.seed * 1000 + i) for i in range(len(jittered))]  # the same crops every evaluation
    augments = [lambda im, r=r: crop_jitter(im, r, 0.5) for r in rngs]
    crops = generate(model, encoder, jittered, batch_size=cfg.per_device_eval_batch_size,
                     max_new_tokens=cfg.max_new_tokens, augments=augments)
    per_image = [scoring.consistency([c.answer for c in crops[i * k:(i + 1) * k]], full[i].answer,
                                     cfg.irrelevant_label) for i in range(len(samples))]
    mean = lambda key: sum(p[key] for p in per_image) / len(per_image) if per_image else math.nan  # noqa: E731
    return {"n_images": len(samples), "k": k, "agreement_rate": mean("agreement_rate"),
            "label_flip_rate": mean("label_flip_rate"), "mean_chrf": mean("mean_chrf")}
