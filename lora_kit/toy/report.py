"""The toy base report: the numbers that show the base has general ability to lose.

It uses exactly the guardrails' functions (evaluate.generate, evaluate.benchmark_metrics, mean_loss).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import scoring
from ..data import Encoder, read_jsonl
from ..evaluate import benchmark_metrics, generate, mean_loss, samples_record
from .world import IRRELEVANT_LABEL


@torch.no_grad()
def base_report(model_dir: Path, world: Path, *, label: str = IRRELEVANT_LABEL, max_new_tokens: int = 40) -> dict:
    """Benchmark metrics, held-out losses and the spot-check captions of one toy base."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    encoder = Encoder(processor, max_length=512)
    terms = scoring.load_terms(world / "terms.json")
    bench, _ = read_jsonl(world / "bench.jsonl", need_assistant=False)
    gens = generate(model, encoder, bench, max_new_tokens=max_new_tokens)
    metrics = benchmark_metrics(bench, gens, terms, label)
    spot, _ = read_jsonl(world / "spotcheck.jsonl", need_assistant=False)
    captions = [g.answer for g in generate(model, encoder, spot, max_new_tokens=max_new_tokens)]
    losses = {}
    for name in ("pretrain_val", "task_val", "general_eval"):
        samples, _ = read_jsonl(world / f"{name}.jsonl")
        losses[name] = mean_loss(model, [encoder.encode(s) for s in samples], image_token_id=encoder.image_token_id,
                                 pad_id=processor.tokenizer.pad_token_id)
    examples = samples_record(bench, gens)
    by_kind = {}
    for e in examples:  # a few answers of each kind, so the report can be read, not only trusted
        by_kind.setdefault(e["image_kind"], [])
        if len(by_kind[e["image_kind"]]) < 3:
            by_kind[e["image_kind"]].append(e["answer"])
    return {"model": str(model_dir), "metrics": metrics, "losses": losses, "spotcheck_captions": captions,
            "examples": by_kind}


def quick_check(world: Path, *, n: int = 12, label: str = IRRELEVANT_LABEL):
    """A progress probe for pretraining: rates on a few benchmark images of each kind (same functions)."""
    terms = scoring.load_terms(world / "terms.json")
    bench, _ = read_jsonl(world / "bench.jsonl", need_assistant=False)
    by_kind = {}
    for s in bench:
        by_kind.setdefault(s.extra["kind"], [])
        if len(by_kind[s.extra["kind"]]) < n:
            by_kind[s.extra["kind"]].append(s)
    subset = [s for kind in sorted(by_kind) for s in by_kind[kind]]

    def check(model, processor) -> dict:
        gens = generate(model, Encoder(processor, max_length=512), subset, max_new_tokens=40)
        m = benchmark_metrics(subset, gens, terms, label)
        return {k: m[k]["rate"] for k in ("object_accuracy", "hallucination", "irrelevant_pass")}
    return check
