"""Generation on the OOD / irrelevant mini-benchmark and the metrics computed from it.

The toy base report and the guardrails call the same functions, so a number means the same thing
wherever it appears. Rates come with their n and a Wilson 95% interval (see scoring.Rate).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import scoring
from .metrics import DEFAULT_PROBE
from .data import IGNORE_INDEX, Encoded, Encoder, Sample, collate_padded, encode_all, read_jsonl, text_of


@dataclass
class Generation:
    """One generated answer and whether it stopped because it hit max_new_tokens."""

    answer: str
    hit_limit: bool
    n_tokens: int


def to_device(batch: dict, model) -> dict:
    """The batch's tensors on the model's device (a real checkpoint evaluates on its GPU; the toy on CPU)."""
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _generation_context(model):
    """What generate() needs around model.generate: FSDP1's root weights (embeddings, lm_head) gathered,
    since generate runs the wrapped model's own forward and FSDP1 gathers them only in its forward.
    The decoder layers, wrapped on their own, still gather theirs one at a time."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch without distributed support
        return contextlib.nullcontext()
    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(model, encoder: Encoder, samples: list[Sample], *, batch_size: int = 16,
             max_new_tokens: int = 32, augments: list | None = None, ranks=None, images=None,
             prompts: list[Encoded] | None = None) -> list[Generation]:
    """Greedy answers for the samples' prompts, batched (left padding) with the KV cache.

    `augments`, when given, holds one image transform per sample (the crop-jitter metric).
    `ranks` (a distributed.Ranks whose weights are sharded): this rank answers its share of the samples
    and every rank returns all answers. model.generate keeps the ranks in step (synced_gpus), since
    transformers detects FSDP and ZeRO-3.
    `images` (an EvalImages): the vision tower's output per image computed once for all the prompts showing it,
    instead of once per prompt.
    `prompts`: the samples' prompts already encoded (encoder.encode_prompt, with their augments), e.g. EvalSet's.
    """
    if ranks is not None and ranks.shares_evaluation:
        share = ranks.share(list(range(len(samples))), pad=0)
        mine = generate(model, encoder, [samples[i] for i in share], batch_size=batch_size,
                        max_new_tokens=max_new_tokens, augments=[augments[i] for i in share] if augments else None)
        return ranks.gather(mine, len(samples))
    tok = encoder.tokenizer
    eos = tok.eos_token_id
    if prompts is None:
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
            batch = to_device(batch, model)
            if images is not None and batch.get("pixel_values") is not None:
                # what model.generate would compute from the pixels before its prefill, from the cache
                batch["mm_encoder_outputs"] = {"image": images.outputs([prompts[i] for i in idx], model.device)}
                batch.pop("pixel_values")
            with _generation_context(model):
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


def image_cache(model, *, log=print):
    """A run's per-image cache of its frozen vision blocks, kept across evaluations (EvalImages reads it), or None
    when nothing of the vision tower is frozen (prefix.plan_images says why, logged): while the blocks stay
    frozen, the same pixels give the same output, and the crops (the same ones at every evaluation) hit too."""
    from .prefix import FrozenPrefix, _available_bytes, image_key, plan_images

    plan = plan_images(model)
    log(f"generation's vision cache: {plan.mode} ({plan.why})")
    if plan.mode == "none":
        return None
    # a quarter of the memory free now, beside the training cache's half of it
    return FrozenPrefix(model, plan, key=image_key, max_bytes=_available_bytes() // 4, log=log)


class EvalImages:
    """What the model's get_image_features returns, per image, for the generations of one guardrail evaluation.

    The weights do not change during an evaluation, so an image's output is computed once for all its prompts
    (the benchmark's probe groups ask the same images, the crops' uncropped prompts are benchmark images), from
    `frozen` (image_cache: the frozen blocks' cache kept across evaluations) or the whole tower.
    """

    def __init__(self, model, frozen=None):
        from .families import family_of_model
        from .prefix import core_model

        self.inner, self.frozen, self.family = core_model(model).model, frozen, family_of_model(model)
        self.memo: dict = {}  # image_key -> (pooler per image, [taps per image] per tap)
        self._keys: dict[int, tuple] = {}  # id(pixel tensor) -> (the tensor, kept so the id stays its own; its key)
        self.hits = self.misses = 0

    def _key(self, e: Encoded) -> tuple:
        from .prefix import image_key

        held = self._keys.get(id(e.pixel_values))
        if held is None or held[0] is not e.pixel_values:
            held = self._keys[id(e.pixel_values)] = (e.pixel_values, image_key(e))
        return held[1]

    @torch.no_grad()
    def outputs(self, prompts: list[Encoded], device):
        """The image outputs of a batch of prompts (in row order), as model.generate's mm_encoder_outputs["image"]."""
        with_images = [e for e in prompts if e.pixel_values is not None]
        keys = [self._key(e) for e in with_images]
        missing = {k: e for k, e in zip(keys, with_images) if k not in self.memo}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            samples = list(missing.values())
            grid = torch.cat([e.image_grid_thw for e in samples]).to(device)
            if self.frozen is not None:
                out = self.frozen.image_outputs(samples, grid)
            else:
                pixels = torch.cat([e.pixel_values for e in samples]).to(device)
                out = self.inner.get_image_features(pixels, grid, return_dict=True)
            pooler, taps = list(out.pooler_output), [list(t) for t in getattr(out, "deepstack_features", None) or []]
            at = 0
            for k, e in missing.items():
                n = len(e.image_grid_thw)
                self.memo[k] = (pooler[at:at + n], [t[at:at + n] for t in taps])
                at += n
        entries = [self.memo[k] for k in keys]
        pooler = tuple(p for entry in entries for p in entry[0])
        taps = [tuple(p for entry in entries for p in entry[1][i]) for i in range(len(entries[0][1]))]
        return self.family.image_outputs(pooler, taps)


@torch.no_grad()
def mean_loss(model, encoded: list, *, batch_size: int = 16, image_token_id: int, pad_id: int,
              prefix=None, ranks=None) -> float:
    """Token-weighted mean cross-entropy over the supervised (assistant) tokens of encoded samples.

    `prefix` (a prefix.FrozenPrefix) computes the same loss from its cache of the frozen layers' output.
    `ranks` (a distributed.Ranks whose weights are sharded): each rank sums the loss of its share of the
    samples and every rank returns the mean over all of them.
    """
    sharded = ranks is not None and ranks.shares_evaluation
    if sharded and encoded:  # padding: a copy of the first sample with nothing supervised adds 0 and 0
        unsupervised = dataclasses.replace(encoded[0], labels=[IGNORE_INDEX] * len(encoded[0].labels))
        encoded = ranks.share(encoded, pad=unsupervised)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            batch = to_device(collate_padded(chunk, pad_id, image_token_id), model)
            target = batch["labels"][:, 1:]
            if prefix is not None:
                loss = prefix.loss(batch, [[e] for e in chunk], reduction="sum")
            else:
                batch.pop("labels")  # the loss below uses target, the shifted labels
                logits = model(**batch, use_cache=False).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         target.reshape(-1), ignore_index=IGNORE_INDEX,
                                                         reduction="sum")
            total += float(loss)
            count += int((target != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if sharded:
        total, count = ranks.sum(total, count)
    return total / count if count else math.nan


def probe_of(sample: Sample) -> str:
    """The probe group of a benchmark row: its `probe` field (e.g. general, task), else DEFAULT_PROBE."""
    return str(sample.extra.get("probe") or DEFAULT_PROBE)


def benchmark_metrics(samples: list[Sample], generations: list[Generation], terms: dict, label: str) -> dict:
    """Every answer-based guardrail metric of one pass over the benchmark, per probe group.

    Returns {probe: {metric: rate dict with n and interval}}; rows are grouped by their `probe` field
    (the prompt they were asked under; DEFAULT_PROBE when absent), so each group is scored on its own.
    """
    groups: dict[str, list[tuple[Sample, Generation]]] = {}
    for s, g in zip(samples, generations):
        groups.setdefault(probe_of(s), []).append((s, g))
    return {probe: _group_metrics(pairs, terms, label) for probe, pairs in sorted(groups.items())}


def _group_metrics(pairs: list[tuple[Sample, Generation]], terms: dict, label: str) -> dict:
    """The answer-based metrics of one probe group's (sample, generation) pairs."""
    by_kind: dict[str, list[tuple[Sample, Generation]]] = {}
    for s, g in pairs:
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
        "blindness": scoring.blindness_rate([g.answer for _, g in pairs], [g.hit_limit for _, g in pairs]),
        "ood_label_rate": scoring.irrelevant_pass_rate(answers(ood), label),
    }
    return {k: v.as_dict() if isinstance(v, scoring.Rate) else v for k, v in metrics.items()}


def task_exact_match(samples: list[Sample], generations: list[Generation]) -> scoring.Rate:
    """Generated answers equal to the samples' reference answers (their last assistant turn), normalized."""
    return scoring.exact_match_rate([g.answer for g in generations], [text_of(s) for s in samples])


def samples_record(samples: list[Sample], generations: list[Generation]) -> list[dict]:
    """What gets saved under samples/: every prompt's source, kind, reference and generated answer."""
    return [{"source": s.source, "kind": s.extra.get("kind"), "probe": probe_of(s), "image_kind": s.extra.get("image_kind"),
             "objects": s.extra.get("objects"), "reference": text_of(s) if s.messages[-1]["role"] == "assistant"
             else None, **asdict(g)} for s, g in zip(samples, generations)]


def caption_answers(model, encoder: Encoder, samples: list[Sample], cfg, ranks=None, images=None,
                    prompts: list[Encoded] | None = None) -> list[str]:
    """Free-form captions of the fixed spot-check images (their prompt is in the file)."""
    return [g.answer for g in generate(model, encoder, samples, batch_size=cfg.per_device_eval_batch_size,
                                       max_new_tokens=cfg.max_new_tokens, ranks=ranks, images=images,
                                       prompts=prompts)]


def crop_augments(samples: list[Sample], k: int) -> tuple[list[Sample], list]:
    """(each sample K times, one fixed crop jitter per copy): the same crops at every evaluation."""
    from .augment import crop_jitter

    jittered = [s for s in samples for _ in range(k)]
    rngs = [random.Random(EVAL_SEED * 1000 + i) for i in range(len(jittered))]
    return jittered, [lambda im, r=r: crop_jitter(im, r, 0.5) for r in rngs]


def crop_consistency(model, encoder: Encoder, samples: list[Sample], cfg, ranks=None, images=None,
                     evalset: "EvalSet | None" = None) -> dict:
    """K small crop jitters per image: agreement with the uncropped answer, label flips, mean chrF.

    With `evalset`, the prompts (crops included) are encoded once there and reused at later evaluations."""
    k = cfg.crop_jitter_k
    jittered, augments = crop_augments(samples, k)
    encoded = (lambda part, ss, aug=None: evalset.prompts(part, encoder, ss, aug)) if evalset is not None else \
        (lambda part, ss, aug=None: None)  # noqa: E731
    full = generate(model, encoder, samples, batch_size=cfg.per_device_eval_batch_size,
                    max_new_tokens=cfg.max_new_tokens, ranks=ranks, images=images,
                    prompts=encoded("crops_full", samples))
    crops = generate(model, encoder, jittered, batch_size=cfg.per_device_eval_batch_size,
                     max_new_tokens=cfg.max_new_tokens, augments=augments, ranks=ranks, images=images,
                     prompts=encoded("crops", jittered, augments))
    per_image = [scoring.consistency([c.answer for c in crops[i * k:(i + 1) * k]], full[i].answer,
                                     cfg.irrelevant_label) for i in range(len(samples))]
    mean = lambda key: sum(p[key] for p in per_image) / len(per_image) if per_image else math.nan  # noqa: E731
    return {"n_images": len(samples), "k": k, "agreement_rate": mean("agreement_rate"),
            "label_flip_rate": mean("label_flip_rate"), "mean_chrf": mean("mean_chrf")}


# ---------------------------------------------------------------- KL to the start model (forgetting signal)

def _answered(sample: Sample, answer: str) -> Sample:
    """The benchmark row's prompt with `answer` as its assistant turn (replacing any reference answer)."""
    messages = sample.messages[:-1] if sample.messages[-1]["role"] == "assistant" else list(sample.messages)
    return dataclasses.replace(sample, messages=[*messages, {"role": "assistant", "content": answer}])


# The start model's log-probabilities are kept across evaluations only while they take at most this share of
# the memory free when they are first computed (tokens x vocab x 4 bytes: ~0.25 GB for 400 answer tokens of a
# 152k vocabulary); otherwise they are recomputed at every evaluation, with the same result.
KL_BASE_CACHE_SHARE = 8


@torch.no_grad()
def kl_to_base(model, encoder: Encoder, es: "EvalSet", cfg, ranks=None, *, prefix=None,
               cache: bool = True) -> dict[str, dict]:
    """Forward KL(start || current) of next-token distributions on the benchmark's probe prompts, per probe group.

    Returns {probe: {"kl_base": nats per token, "kl_base_tokens": n}}; {} when `model` has no adapter to switch off
    (no peft `disable_adapter`: A0, or a full model given to `evaluate`). The start model is the same model with
    its adapters disabled (peft's disable_adapter context; no second copy in memory): the base, with an
    init_adapter folded in when the run merged one (a run that continues its init_adapter compares with the
    bare base).

    Tokens: every benchmark prompt with the start model's own greedy answer appended (generated once per run,
    kept in es.base_answers), teacher-forced; KL is summed over the positions that predict the answer's tokens
    and its end-of-turn token (the positions mean_loss supervises), and divided by their count. Why these: they
    are where the start model puts its mass, so KL(start || current) there estimates E_start[log p_start/p_cur]
    on the start model's own behaviour (the quantity RL's Razor relates to forgetting), the token set is the same
    at every evaluation (numbers compare along a run and across runs of one setup), and prompt positions
    (system text, image placeholders) are never sampled by either model. Distributions in float32, logits only
    at those positions.

    With `cache` (the default) the answered prompts are encoded once per run, the start model's
    log-probabilities [answer tokens, vocab] are computed once and kept on the CPU (es.kl_base_logprobs) while
    they fit in 1/KL_BASE_CACHE_SHARE of the free memory, and `prefix` (the run's prefix.FrozenPrefix) computes
    the current model's hidden states from its cache of the frozen layers. cache=False recomputes all of it.
    """
    from .prefix import _available_bytes, core_model

    if not hasattr(model, "disable_adapter"):
        return {}
    if es.base_answers is None:
        with model.disable_adapter():
            gens = generate(model, encoder, es.bench, batch_size=cfg.per_device_eval_batch_size,
                            max_new_tokens=cfg.max_new_tokens, ranks=ranks)
        es.base_answers = [g.answer for g in gens]
    answered = lambda: [encoder.encode(_answered(s, a)) for s, a in zip(es.bench, es.base_answers)]  # noqa: E731
    if cache and "kl" not in es._prompts:
        es._prompts["kl"] = answered()
    encoded = es._prompts["kl"] if cache else answered()
    core = core_model(model)
    keep_base = cache and es.kl_base_logprobs is None and (  # sized once, at the evaluation that would keep them
        sum(label != IGNORE_INDEX for e in encoded for label in e.labels) * core.lm_head.out_features * 4
        <= _available_bytes() // KL_BASE_CACHE_SHARE)
    cached_base = es.kl_base_logprobs if cache else None
    new_base: list[torch.Tensor] = []
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    probes = [probe_of(s) for s in es.bench]
    pad, image = encoder.tokenizer.pad_token_id, encoder.image_token_id

    def log_probs(batch, mask, rows, fast) -> torch.Tensor:  # [masked positions, vocab], row by row
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not cache:  # the model's own forward (the path sharded weights need)
            return model(**inputs, use_cache=False).logits[:, :-1][mask].float().log_softmax(-1)
        hidden = (fast.last_hidden(batch, rows) if fast is not None
                  else core.model(**inputs, use_cache=False).last_hidden_state)
        return core.lm_head(hidden[:, :-1][mask]).float().log_softmax(-1)  # logits at the answer positions only

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), cfg.per_device_eval_batch_size):
            chunk = encoded[start:start + cfg.per_device_eval_batch_size]
            batch = to_device(collate_padded(chunk, pad, image), model)
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            rows = [[e] for e in chunk]
            current = log_probs(batch, mask, rows, prefix if cache else None)
            if cached_base is not None:
                base = torch.cat(cached_base[start:start + len(chunk)]).to(current.device)
            else:
                with model.disable_adapter():
                    base = log_probs(batch, mask, rows, None)
                if keep_base:
                    new_base += [t.cpu() for t in base.split(mask.sum(-1).tolist())]
            per_token = (base.exp() * (base - current)).sum(-1)  # [masked positions], nats
            for row, (kl, n) in enumerate(zip(per_token.split(mask.sum(-1).tolist()), mask.sum(-1).tolist())):
                probe = probes[start + row]
                sums[probe] = sums.get(probe, 0.0) + float(kl.sum())
                counts[probe] = counts.get(probe, 0) + int(n)
    finally:
        model.train(was_training)
    if keep_base:
        es.kl_base_logprobs = new_base
    return {p: {"kl_base": sums[p] / counts[p] if counts[p] else math.nan, "kl_base_tokens": counts[p]}
            for p in sorted(sums)}


# ---------------------------------------------------------------- one guardrail evaluation

@dataclass
class EvalSet:
    """Everything one guardrail evaluation needs, read and encoded once."""

    val: list[Encoded]
    train_subset: list[Encoded]
    general: list[Encoded]
    bench: list[Sample]
    spotcheck: list[Sample]
    terms: dict
    crops: list[Sample] = field(default_factory=list)
    exact: list[Sample] = field(default_factory=list)  # validation samples whose generated answer is scored
    skipped_val: list[str] = field(default_factory=list)  # validation samples that could not be encoded
    base_answers: list[str] | None = None  # the start model's greedy benchmark answers (kl_to_base), once per run
    kl_base_logprobs: list | None = None  # per benchmark row: the start model's [answer tokens, vocab] log-probs
    _prompts: dict = field(default_factory=dict, repr=False)

    def prompts(self, part: str, encoder: Encoder, samples: list[Sample], augments: list | None = None) -> list[Encoded]:
        """The prompts of one part of the evaluation (bench, exact, captions, crops...), encoded at its first
        evaluation and reused after: the samples and their augments (fixed crops) are the same every time."""
        if part not in self._prompts:
            self._prompts[part] = [encoder.encode_prompt(s, augments[i] if augments else None)
                                   for i, s in enumerate(samples)]
        return self._prompts[part]


# The evaluation samples (benchmark, training subset, exact-match subset, crops) are drawn with this seed, not the
# run's: replicate runs under other seeds are then measured on the same samples as each other and as A0.
EVAL_SEED = 0


def _subset(items: list, n: int, seed: int) -> list:
    if len(items) <= n:
        return list(items)
    return random.Random(seed).sample(items, n)


def _bench_subset(samples: list[Sample], per_kind: int, seed: int) -> list[Sample]:
    """At most `per_kind` samples of each benchmark kind in each probe group, the same ones at every
    evaluation (groups that ask the same images in the same order keep the same images)."""
    out = []
    for probe in sorted({probe_of(s) for s in samples}):
        for kind in ("irrelevant", "ood", "in_domain"):
            out += _subset([s for s in samples if probe_of(s) == probe and s.extra.get("kind", "in_domain") == kind],
                           per_kind, seed)
    return out



def build_evalset(cfg, encoder: Encoder, files: dict[str, Path], train_samples: list[Sample] | None = None,
                  val_samples: list[Sample] | None = None) -> EvalSet:
    """Read and encode the evaluation data named in `files` (the *_file parameters, resolved); training
    and validation samples the caller already read are not read again."""
    if train_samples is None:
        train_samples, _ = read_jsonl(files["train_file"], on_bad_sample=cfg.on_bad_sample)
    if val_samples is None:
        val_samples, _ = read_jsonl(files["val_file"], on_bad_sample=cfg.on_bad_sample)
    val = val_samples
    bench, _ = read_jsonl(files["bench_file"], need_assistant=False)
    general, _ = read_jsonl(files["general_file"])
    spot, _ = read_jsonl(files["spotcheck_file"], need_assistant=False)
    encode = lambda samples: encode_all(encoder, samples, on_bad_sample=cfg.on_bad_sample)  # noqa: E731
    val_encoded, _, skipped_val = encode(val)
    crops = [s for s in _bench_subset(bench, 8, EVAL_SEED) if s.extra.get("kind") == "ood"] if cfg.crop_jitter_k else []
    probes = {probe_of(s) for s in bench}
    unknown = sorted(set(cfg.guardrail_probes) - probes)
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"guardrail_probes = {list(cfg.guardrail_probes)}: {', '.join(unknown)} not among the probe "
                          f"groups of bench_file {files['bench_file']} ({', '.join(sorted(probes))}). Fix: name groups "
                          "the benchmark's `probe` fields use, or [] for all of them.")
    return EvalSet(val=val_encoded, train_subset=encode(_subset(train_samples, len(val), EVAL_SEED))[0],
                   general=encode(general)[0], bench=_bench_subset(bench, cfg.eval_max_samples, EVAL_SEED),
                   spotcheck=spot, terms=scoring.load_terms(files["terms_file"]), crops=crops,
                   exact=_subset(val, cfg.exact_match_samples, EVAL_SEED), skipped_val=skipped_val)


def guardrail_record(model, encoder: Encoder, es: EvalSet, cfg, *, step: int | None,
                     baseline_captions: list[str] | None, verdicts: list[dict] = (),
                     prefix=None, ranks=None, images=None, cache: bool = True) -> tuple[dict, list, list]:
    """Every guardrail metric of one model state: (metrics record, benchmark generations, captions).

    Losses use one estimator (token-weighted, eval mode) for validation, the training subset and the
    general slice, so the generalization gap compares like with like; `prefix` (the training run's
    frozen-prefix cache) computes them without repeating the frozen layers. Generation encodes each prompt once
    (kept in `es`) and runs the vision tower once per image of the evaluation (EvalImages), its frozen blocks
    from `images` (the run's image_cache) when given. cache=False is the straightforward path (every prompt
    encoded, every image through the whole tower, for every prompt), which the tests compare with. With `ranks`
    whose weights are sharded, every rank must call this: each evaluates its share (without these caches), and
    all return the same record.
    """
    from . import guardrails

    t0 = time.time()
    parts: dict[str, float] = {}  # seconds per part, for the benchmark's profile of an evaluation

    def timed(part, fn, *args):
        t = time.time()
        out = fn(*args)
        parts[part] = parts.get(part, 0.0) + time.time() - t
        return out

    cache = cache and not (ranks is not None and ranks.shares_evaluation)
    images = EvalImages(model, images) if cache else None  # a model of a family the kit knows (start_model checks)
    gen = lambda part, samples: generate(  # noqa: E731
        model, encoder, samples, batch_size=cfg.per_device_eval_batch_size, max_new_tokens=cfg.max_new_tokens,
        ranks=ranks, images=images, prompts=es.prompts(part, encoder, samples) if cache else None)
    pad = encoder.tokenizer.pad_token_id
    loss = lambda data: timed("losses", lambda: mean_loss(  # noqa: E731
        model, data, batch_size=cfg.per_device_eval_batch_size, image_token_id=encoder.image_token_id, pad_id=pad,
        prefix=prefix, ranks=ranks))
    eval_loss, train_loss = loss(es.val), loss(es.train_subset)
    gens = timed("benchmark", lambda: gen("bench", es.bench))
    record = {"step": step, "eval_loss": eval_loss, "train_loss": train_loss, "gap": eval_loss - train_loss,
              "general_loss": loss(es.general)}
    record["probes"] = benchmark_metrics(es.bench, gens, es.terms, cfg.irrelevant_label)
    if es.exact:
        answers = timed("exact match", lambda: gen("exact", es.exact))
        record["task_exact_match"] = task_exact_match(es.exact, answers).as_dict()
    for probe, kl in timed("kl", lambda: kl_to_base(model, encoder, es, cfg, ranks, prefix=prefix,
                                                    cache=cache)).items():
        record["probes"].setdefault(probe, {}).update(kl)
    captions = timed("captions", lambda: [g.answer for g in gen("captions", es.spotcheck)])
    record["crop"] = timed("crops", lambda: crop_consistency(model, encoder, es.crops, cfg, ranks, images,
                                                            es if cache else None)) if es.crops else None
    record["captions"] = captions  # the caption baseline of later runs when this is A0's step 0
    record["caption"] = guardrails.caption_sanity(
        captions, baseline_captions if baseline_captions is not None else captions, es.terms,
        manual=list(verdicts), chrf_min=cfg.caption_chrf_min,
        checkpoint=f"checkpoint-{step}" if step is not None else None)
    record["eval_parts"] = parts
    record["eval_seconds"] = time.time() - t0
    return record, gens, captions


def start_model(base_path: str | Path, init_adapter: str | Path | None = None, *, continued: bool = False,
                dtype=None, trust_remote_code: bool = False):
    """A run's model before its own LoRA: the base with init_adapter folded in, as train.attach_lora builds it.

    A "continued" run trained init_adapter itself, so its checkpoints hold it whole and go on the bare base.
    A model of a family the kit does not train is refused before its weights are read."""
    from transformers import AutoModelForImageTextToText

    from .families import family_of_folder

    family_of_folder(base_path, trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if init_adapter and not continued:
        from .adapters import load_adapter

        model = load_adapter(model, init_adapter, what="init_adapter").merge_and_unload()
    return model


def run_of_checkpoint(checkpoint: Path) -> dict | None:
    """The params.json of the run folder a checkpoint sits in (runs/<variant>/checkpoints/<name>), if any."""
    import json

    params = checkpoint.parent.parent / "params.json"
    if checkpoint.parent.name != "checkpoints" or not params.is_file():
        return None
    try:
        return json.loads(params.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _same_targets(adapter_a: Path, adapter_b: Path) -> bool:
    """Whether two peft adapters wrap the same modules (then a run from one continued it instead of merging)."""
    import json

    read = lambda folder: json.loads((Path(folder) / "adapter_config.json").read_text())  # noqa: E731
    a, b = read(adapter_a), read(adapter_b)
    as_set = lambda t: sorted(t) if isinstance(t, list) else t  # noqa: E731
    return (as_set(a.get("target_modules")) == as_set(b.get("target_modules"))
            and as_set(a.get("modules_to_save") or []) == as_set(b.get("modules_to_save") or []))


def load_for_evaluation(checkpoint: str | Path, *, base: str | None, default_model: str,
                        init_adapter: str | None = None, trust_remote_code=False):
    """(model, processor, base path) for a peft adapter folder (ours, ms-swift's, any peft's) or a full model.

    An adapter trained on top of an init_adapter (stage 3) is evaluated on the model it trained on: init_adapter
    folded into the base first, unless the run continued training init_adapter itself. A checkpoint inside one of
    our run folders says which from its params.json (and names its init_adapter); elsewhere the adapter is taken
    as a continuation when it wraps the same modules as init_adapter, the rule train.attach_lora follows.
    """
    import json

    from .device import compute_device, compute_dtype
    from .errors import ConfigError
    from .families import folder_processor
    from .toy import resolve_model

    checkpoint = Path(checkpoint)
    adapter_config = checkpoint / "adapter_config.json"
    if adapter_config.is_file():
        recorded = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if base is None and recorded and Path(recorded).is_dir():
            base = recorded
        base_path = resolve_model(base or default_model)
        run = run_of_checkpoint(checkpoint)
        if run is not None:
            init_adapter = (run.get("config") or {}).get("init_adapter")
            continued = (run.get("targets") or {}).get("adapter") == "continued"
        else:
            continued = bool(init_adapter) and _same_targets(checkpoint, Path(init_adapter))
        model = start_model(base_path, init_adapter, continued=continued, dtype=compute_dtype(),
                            trust_remote_code=trust_remote_code)
        from .adapters import load_adapter

        model = load_adapter(model, checkpoint, what="checkpoint")
    elif (checkpoint / "config.json").is_file():
        base_path = checkpoint
        model = start_model(checkpoint, dtype=compute_dtype(), trust_remote_code=trust_remote_code)
    else:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} holds neither adapter_config.json (a peft adapter) nor "
                          "config.json (a full model); point it at a checkpoint folder.")
    processor_dir = checkpoint if (checkpoint / "preprocessor_config.json").exists() or \
        (checkpoint / "processor_config.json").exists() else base_path
    _, processor = folder_processor(processor_dir, base_path, trust_remote_code)
    return model.to(compute_device()).eval(), processor, base_path


def image_bounds_for(cfg, checkpoint: str | Path) -> dict:
    """min_pixels / max_pixels to evaluate a checkpoint with: its run's own (params.json) when it sits in a run
    folder, so that its numbers compare with the run's metrics; otherwise the config's. A config value that
    contradicts the run's is refused, naming both."""
    from .errors import ConfigError

    mine = {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}
    run = run_of_checkpoint(Path(checkpoint))
    if run is None:
        return mine
    theirs = {k: (run.get("config") or {}).get(k) for k in mine}
    clash = [k for k in mine if mine[k] is not None and mine[k] != theirs[k]]
    if clash:
        raise ConfigError(
            "; ".join(f"{k} = {mine[k]}, but {checkpoint} was trained with {k} = {theirs[k]} (its run's params.json)"
                      for k in clash)
            + ". Evaluating a run's checkpoint uses the run's image size, so that its numbers compare with the run's "
              "metrics. Fix: leave " + " and ".join(clash) + " unset, or copy the checkpoint out of its run folder "
              "to evaluate it at another size.")
    return theirs


def study_baseline_captions(cfg, base: str | None = None) -> tuple[list[str] | None, str]:
    """(A0's step-0 captions, why) for caption sanity of a checkpoint evaluated with `cfg` (and `base`), or
    (None, why not): only from an A0 of the same setup and code (guardrails.comparable_a0), never one that
    ran on other data or settings."""
    from .guardrails import comparable_a0, step0_record
    from .paths import runs_dir
    from .setups import describe_setup
    from .toy import resolve_model
    from .train import code_version, data_files

    root = runs_dir(cfg.output_dir)
    # weights=False: an unbuilt toy is not built for this (no A0 can have run on it then)
    setup = describe_setup(cfg, resolve_model(base or cfg.model, weights=False), data_files(cfg))
    a0, why = comparable_a0(root / "_evaluate", root, {"setup": setup, "code": code_version()})
    if a0 is None:
        return None, why
    captions = (step0_record(a0 / "metrics.jsonl") or {}).get("captions")
    return captions, (f"A0 ({a0}): {why}" if captions is not None else f"A0 at {a0} recorded no step-0 captions")


def evaluate_checkpoint(checkpoint: str | Path, cfg, *, base: str | None = None, files: dict | None = None,
                        baseline_captions: list[str] | None = None, out: str | Path | None = None) -> dict:
    """`python -m lora_kit evaluate`: every guardrail metric of any checkpoint, written as JSON."""
    from .rundir import write_json_atomic

    from .families import family_of_model

    bounds = image_bounds_for(cfg, checkpoint)  # before any weight is read
    model, processor, base_path = load_for_evaluation(checkpoint, base=base, default_model=cfg.model,
                                                      init_adapter=cfg.init_adapter,
                                                      trust_remote_code=cfg.trust_remote_code)
    encoder = Encoder.for_run(processor, {"max_length": cfg.max_length, **bounds}, family_of_model(model))
    es = build_evalset(cfg, encoder, files)
    record, gens, _ = guardrail_record(model, encoder, es, cfg, step=None, baseline_captions=baseline_captions)
    result = {"checkpoint": str(checkpoint), "base": str(base_path), "image_resolution": encoder.resolution,
              "metrics": record,
              "data_files": {k: str(v) for k, v in files.items()}, "samples": samples_record(es.bench, gens)}
    out = Path(out) if out else Path(checkpoint) / "lora_kit_eval.json"
    write_json_atomic(out, result)
    result["written_to"] = str(out)
    return result
