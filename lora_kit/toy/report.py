"""The toy base report: the numbers that show the base has general ability to lose.

It uses exactly the guardrails' functions (evaluate.generate, evaluate.benchmark_metrics, mean_loss).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import scoring
from ..data import Encoder, read_jsonl, text_of
from ..evaluate import benchmark_metrics, generate, mean_loss, probe_of, samples_record
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
    metrics = {"probes": benchmark_metrics(bench, gens, terms, label)}
    spot, _ = read_jsonl(world / "spotcheck.jsonl", need_assistant=False)
    captions = [g.answer for g in generate(model, encoder, spot, max_new_tokens=max_new_tokens)]
    losses = {}
    for name in ("pretrain_val", "task_val", "general_eval"):
        samples, _ = read_jsonl(world / f"{name}.jsonl")
        losses[name] = mean_loss(model, [encoder.encode(s) for s in samples], image_token_id=encoder.image_token_id,
                                 pad_id=processor.tokenizer.pad_token_id)
    task_val, _ = read_jsonl(world / "task_val.jsonl")
    task_answers = [g.answer for g in generate(model, encoder, task_val, max_new_tokens=max_new_tokens)]
    metrics["task_exact_match"] = scoring.exact_match_rate(task_answers, [text_of(s) for s in task_val]).as_dict()
    examples = samples_record(bench, gens)
    by_kind = {}
    for e in examples:  # a few answers of each kind and probe, so the report can be read, not only trusted
        key = f"{e['probe']}/{e['image_kind']}"
        by_kind.setdefault(key, [])
        if len(by_kind[key]) < 3:
            by_kind[key].append(e["answer"])
    by_kind["task_val"] = task_answers[:3]
    return {"model": str(model_dir), "metrics": metrics, "losses": losses, "spotcheck_captions": captions,
            "examples": by_kind}


def quick_check(world: Path, *, n: int = 12, label: str = IRRELEVANT_LABEL):
    """A progress probe for pretraining: rates on a few benchmark images of each kind (same functions)."""
    terms = scoring.load_terms(world / "terms.json")
    bench, _ = read_jsonl(world / "bench.jsonl", need_assistant=False)
    by_kind = {}
    for s in bench:
        key = (probe_of(s), s.extra["kind"])
        by_kind.setdefault(key, [])
        if len(by_kind[key]) < n:
            by_kind[key].append(s)
    subset = [s for key in sorted(by_kind) for s in by_kind[key]]

    def check(model, processor) -> dict:
        gens = generate(model, Encoder(processor, max_length=512), subset, max_new_tokens=40)
        m = benchmark_metrics(subset, gens, terms, label)
        return {f"{k}@{probe}": m[probe][k]["rate"] for probe in m
                for k in ("object_accuracy", "hallucination", "irrelevant_pass")}
    return check
