"""Guardrails: the baseline, the early-stopping triggers, caption sanity and the best checkpoint.

Pure logic on evaluation records, one line of a run's metrics.jsonl each (DESIGN.md, "Run folder"):
the training loop appends a record with `append_metrics` after every evaluation, asks
`check_triggers` whether to stop, and calls `choose_best` at the end.

Conventions every function here follows:
- A rate is *missing* when its dict is absent, its n is 0, or its rate is None or NaN. A missing
  rate is no evidence: it never makes an evaluation bad (so it ends a run of bad evaluations), and
  a missing baseline rate switches off the comparison that needs it.
- Step 0 is the evaluation before training: it can be the baseline, never a bad evaluation.
- Records count in step order; when a step appears twice (a resumed run evaluates it again), the
  later record of that step counts.
- The rate guardrails (irrelevant pass, hallucination) and the best-checkpoint constraint apply per
  probe group (metrics.py): each gating group (guardrail_probes, default every group of the baseline)
  against the same group of the baseline. A trigger names its group in `probe`.
- Thresholds are crossed only strictly ("drops more than 20%"), with 1e-9 of slack for float
  rounding: 24/32 against a baseline of 30/32 less 20% (0.9375 * 0.8 = 0.7500000000000001 in
  floats) is exactly a 20% drop and does not count.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import scoring
from .errors import DataError, LoraKitError
from .metrics import DEFAULT_PROBE, probe_metrics
from .metrics import value as metric_value
from .rundir import RunFolder, append_jsonl, read_jsonl_records

TRIGGER_NAMES = ("non_finite_loss", "irrelevant_drop", "hallucination_rise", "gap_widening",
                 "caption_degraded", "kl_rise")  # also the order in which check_triggers reports them
VERDICTS = ("ok", "degraded", "hallucinated", "blind")  # manual spot-check verdicts
_EPS = 1e-9


@dataclass
class Trigger:
    """A guardrail that fired: which one, at which step, the numbers behind it, one sentence."""

    name: str  # one of TRIGGER_NAMES
    step: int
    values: dict[str, Any]  # the numbers that fired it, baseline and threshold included
    message: str
    probe: str | None = None  # the probe group whose rates fired it (rate guardrails only)

    @property
    def key(self) -> str:
        """The guardrail's name, with its probe group for a rate guardrail: `hallucination_rise@task`."""
        return f"{self.name}@{self.probe}" if self.probe else self.name

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for summary.json."""
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Reading records


def _number(value: Any) -> float | None:
    """A finite float, or None (absent, None, NaN, ±inf, a bool or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _rate(record: Mapping | None, key: str, probe: str = DEFAULT_PROBE) -> float | None:
    """The rate of a Rate dict (or a bare number) in the record (in `probe`'s group for a benchmark metric);
    None when missing (see module doc)."""
    value = metric_value(record, key, probe)
    if isinstance(value, Mapping):
        if value.get("n") == 0:
            return None
        value = value.get("rate")
    return _number(value)


def _gap(record: Mapping) -> float | None:
    """Generalization gap: the record's `gap`, else eval_loss - train_loss; None when not finite."""
    gap = _number(record.get("gap"))
    if gap is None:
        eval_loss, train_loss = _number(record.get("eval_loss")), _number(record.get("train_loss"))
        if eval_loss is not None and train_loss is not None:
            gap = eval_loss - train_loss
    return gap


def _caption_degraded(record: Mapping) -> bool | None:
    """The caption-sanity verdict of the record (see caption_sanity); None when not judged."""
    caption = record.get("caption")
    degraded = caption.get("degraded") if isinstance(caption, Mapping) else None
    return degraded if isinstance(degraded, bool) else None


def gating_probes(baseline: Mapping | None, cfg: Any) -> list[str]:
    """The probe groups the rate guardrails and the best-checkpoint constraint watch: cfg.guardrail_probes,
    else every group the baseline measured (DEFAULT_PROBE when it has none)."""
    chosen = list(getattr(cfg, "guardrail_probes", ()) or ())
    return chosen or list(probe_metrics(baseline)) or [DEFAULT_PROBE]


def _evaluations(history: Sequence[Mapping]) -> list[Mapping]:
    """The records in step order, the later one where a step repeats."""
    by_step: dict[int, Mapping] = {}
    for i, record in enumerate(history):
        step = record.get("step") if isinstance(record, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise DataError(
                f"evaluation record {i + 1} has step = {step!r}: expected an integer step "
                "(0 = before training). Fix: write records with append_metrics from the training loop")
        by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def _trailing_bad(evals: list[Mapping], bad: list[bool]) -> list[Mapping]:
    """The run of consecutive bad evaluations ending at the latest one, oldest first; step 0 never counts."""
    run: list[Mapping] = []
    for record, is_bad in zip(reversed(evals), reversed(bad)):
        if record["step"] <= 0 or not is_bad:
            break
        run.append(record)
    return run[::-1]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _at_steps(values: Sequence[float], records: Sequence[Mapping], fmt: Callable[[float], str]) -> str:
    parts = [f"{fmt(v)} at step {r['step']}" for v, r in zip(values, records)]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


# ------------------------------------------------------------------------------------------------
# Triggers


def check_triggers(history: Sequence[Mapping], baseline: Mapping, cfg: Any,
                   verdicts: Sequence[Mapping] | None = None) -> Trigger | None:
    """The guardrail trigger that holds at the latest evaluation, or None.

    `history`: every evaluation record so far (step 0 included); `baseline`: the baseline record
    (see baseline_record); `cfg`: a RunConfig or any object with its guardrail fields; `verdicts`:
    the run's spot-check rows (RunFolder.verdicts()), given when a person may have judged earlier
    checkpoints since their records were written (see apply_verdicts). When several
    hold at once, the first in TRIGGER_NAMES order is returned; `active_triggers` lists them all.
    A trigger holds while its run of bad evaluations is at least its patience long, so with
    early_stopping off it is reported again at every further bad evaluation.

    Definitions (DESIGN.md; "for N evaluations" = the latest N evaluations after step 0 are all bad):
    - irrelevant_drop: irrelevant pass < baseline * (1 - irrelevant_drop_max), or < irrelevant_min,
      i.e. below the larger of the two bounds, for irrelevant_patience evaluations. Without a
      baseline rate only the absolute bound applies. A baseline already below irrelevant_min makes
      every evaluation bad: the absolute bound is a floor, not relative to the base model.
    - hallucination_rise: hallucination (the OOD-image rate, `hallucination`) > baseline +
      hallucination_rise_max for hallucination_patience evaluations; needs a baseline rate.
    - gap_widening: an evaluation is bad when its gap exceeds the lowest gap of the run so far
      (step 0 included, when it has one) by more than gap_widen_max AND is strictly larger than the
      previous evaluation's gap; gap_patience bad evaluations in a row = the gap kept worsening over
      that many evaluation intervals. A gap that widens and then holds or shrinks resets.
    - caption_degraded: the record's caption["degraded"] is true (decided by caption_sanity, manual
      verdicts first) for caption_patience evaluations.
    - kl_rise (only when kl_base_max is set): KL to the start model (kl_base, nats/token) under a probe group
      > kl_base_max for kl_patience evaluations; an absolute bound, since the start model's KL is 0.
    - non_finite_loss: eval_loss is NaN or ±inf at a step after 0 while the baseline's eval_loss
      is finite. Fires on the first such evaluation, unlike the others: NaN weights do not recover
      and make every other metric of the evaluation meaningless. A NaN eval loss in the baseline
      too (an empty validation set) is no evidence. The training loss is not used: with fp16 loss
      scaling a skipped overflow step can log an inf training loss while the weights are fine.
    """
    triggers = active_triggers(history, baseline, cfg, verdicts)
    return triggers[0] if triggers else None


def active_triggers(history: Sequence[Mapping], baseline: Mapping, cfg: Any,
                    verdicts: Sequence[Mapping] | None = None) -> list[Trigger]:
    """Every trigger that holds at the latest evaluation, in TRIGGER_NAMES order (see check_triggers)."""
    evals = _evaluations(apply_verdicts(history, verdicts) if verdicts is not None else history)
    if not evals:
        return []
    probes = gating_probes(baseline, cfg)
    found = [
        _non_finite_loss(evals[-1], baseline),
        *(_irrelevant_drop(evals, baseline, cfg, p) for p in probes),
        *(_hallucination_rise(evals, baseline, cfg, p) for p in probes),
        _gap_widening(evals, cfg),
        _caption_degraded_trigger(evals, cfg),
        *(_kl_rise(evals, cfg, p) for p in probes),
    ]
    return [t for t in found if t is not None]


def first_bad_steps(history: Sequence[Mapping], baseline: Mapping, cfg: Any,
                    verdicts: Sequence[Mapping] | None = None) -> dict[str, int]:
    """Where each guardrail first moved: guardrail key -> the first step after 0 whose evaluation was bad by
    that guardrail's own test, whether or not it went on to fire (its patience); guardrails that never moved
    are absent. A rate guardrail is keyed per probe group (`irrelevant_drop@task`), as Trigger.key gives."""
    evals = _evaluations(apply_verdicts(history, verdicts) if verdicts is not None else history)
    eager = _Eager(cfg)
    first: dict[str, int] = {}
    for i in range(1, len(evals)):
        for trigger in active_triggers(evals[:i + 1], baseline, eager):
            first.setdefault(trigger.key, evals[i]["step"])
    return first


class _Eager:
    """A config whose every patience is 1: its triggers hold at the first bad evaluation."""

    def __init__(self, cfg: Any):
        self._cfg = cfg

    def __getattr__(self, name: str) -> Any:
        return 1 if name.endswith("_patience") else getattr(self._cfg, name)


def recorded_triggers(history: Sequence[Mapping], baseline: Mapping, cfg: Any,
                      verdicts: Sequence[Mapping] | None = None) -> list[Trigger]:
    """Every trigger that held at each evaluation after step 0, in step order: what active_triggers said at
    each one, computed again from the records (a run with early_stopping false, or resumed, lists them all)."""
    evals = _evaluations(apply_verdicts(history, verdicts) if verdicts is not None else history)
    return [t for i, record in enumerate(evals) if record["step"] > 0
            for t in active_triggers(evals[:i + 1], baseline, cfg)]


def _non_finite_loss(latest: Mapping, baseline: Mapping) -> Trigger | None:
    loss = latest.get("eval_loss")
    if latest["step"] <= 0 or isinstance(loss, bool) or not isinstance(loss, float) or math.isfinite(loss):
        return None
    base = _number(baseline.get("eval_loss"))
    if base is None:
        return None
    return Trigger("non_finite_loss", latest["step"],
                   {"eval_loss": loss, "train_loss": latest.get("train_loss"), "baseline_eval_loss": base},
                   f"Eval loss is {loss} at step {latest['step']} (baseline {base:.4f}): the weights no longer "
                   "give finite numbers (this trigger does not wait for a second evaluation).")


def _under(probe: str) -> str:
    return f"under the {probe} prompt"


def _irrelevant_drop(evals: list[Mapping], baseline: Mapping, cfg: Any, probe: str = DEFAULT_PROBE) -> Trigger | None:
    base = _rate(baseline, "irrelevant_pass", probe)
    relative = base * (1 - cfg.irrelevant_drop_max) if base is not None else None
    bound = max(relative, cfg.irrelevant_min) if relative is not None else cfg.irrelevant_min
    rates = [_rate(r, "irrelevant_pass", probe) for r in evals]
    run = _trailing_bad(evals, [x is not None and x < bound - _EPS for x in rates])
    if len(run) < cfg.irrelevant_patience:
        return None
    run_rates = [_rate(r, "irrelevant_pass", probe) for r in run]
    if relative is None:
        why = f"the {_pct(cfg.irrelevant_min)} minimum (no baseline rate)"
    else:
        why = (f"{_pct(bound)}, the larger of baseline {_pct(base)} less "
               f"{cfg.irrelevant_drop_max:.0%} ({_pct(relative)}) and the {_pct(cfg.irrelevant_min)} minimum")
    return Trigger(
        "irrelevant_drop", run[-1]["step"],
        {"rates": run_rates, "steps": [r["step"] for r in run], "baseline": base,
         "relative_threshold": relative, "irrelevant_min": cfg.irrelevant_min, "threshold": bound,
         "drop_max": cfg.irrelevant_drop_max, "patience": cfg.irrelevant_patience, "probe": probe},
        f"Irrelevant-image pass rate {_under(probe)} was {_at_steps(run_rates, run, _pct)}, below {why}, "
        f"for {len(run)} consecutive evaluations.", probe)


def _hallucination_rise(evals: list[Mapping], baseline: Mapping, cfg: Any, probe: str = DEFAULT_PROBE
                        ) -> Trigger | None:
    base = _rate(baseline, "hallucination", probe)
    if base is None:
        return None
    bound = base + cfg.hallucination_rise_max
    rates = [_rate(r, "hallucination", probe) for r in evals]
    run = _trailing_bad(evals, [x is not None and x > bound + _EPS for x in rates])
    if len(run) < cfg.hallucination_patience:
        return None
    run_rates = [_rate(r, "hallucination", probe) for r in run]
    return Trigger(
        "hallucination_rise", run[-1]["step"],
        {"rates": run_rates, "steps": [r["step"] for r in run], "baseline": base, "threshold": bound,
         "rise_max": cfg.hallucination_rise_max, "patience": cfg.hallucination_patience, "probe": probe},
        f"Hallucination rate on OOD images {_under(probe)} was {_at_steps(run_rates, run, _pct)}, above "
        f"{_pct(bound)} (baseline {_pct(base)} plus {cfg.hallucination_rise_max * 100:g} points), "
        f"for {len(run)} consecutive evaluations.", probe)


def _kl_rise(evals: list[Mapping], cfg: Any, probe: str = DEFAULT_PROBE) -> Trigger | None:
    bound = getattr(cfg, "kl_base_max", None)
    if bound is None:
        return None
    kl = [_number(metric_value(r, "kl_base", probe)) for r in evals]
    run = _trailing_bad(evals, [x is not None and x > bound + _EPS for x in kl])
    if len(run) < cfg.kl_patience:
        return None
    values = [_number(metric_value(r, "kl_base", probe)) for r in run]
    return Trigger(
        "kl_rise", run[-1]["step"],
        {"values": values, "steps": [r["step"] for r in run], "threshold": bound, "patience": cfg.kl_patience,
         "probe": probe},
        f"KL to the start model {_under(probe)} was {_at_steps(values, run, lambda x: f'{x:.3f}')} nats/token, above "
        f"kl_base_max {bound:g}, for {len(run)} consecutive evaluations.", probe)


def _gap_widening(evals: list[Mapping], cfg: Any) -> Trigger | None:
    gaps = [_gap(r) for r in evals]
    best, best_step = math.inf, None
    bad, bests = [], []
    for i, (record, gap) in enumerate(zip(evals, gaps)):
        if gap is not None and gap < best:
            best, best_step = gap, record["step"]
        previous = gaps[i - 1] if i else None
        bad.append(gap is not None and previous is not None
                   and gap > best + cfg.gap_widen_max + _EPS and gap > previous + _EPS)
        bests.append((best, best_step))
    run = _trailing_bad(evals, bad)
    if len(run) < cfg.gap_patience:
        return None
    first = len(evals) - len(run)
    run_gaps = [_gap(r) for r in run]
    best, best_step = bests[-1]
    return Trigger(
        "gap_widening", run[-1]["step"],
        {"gaps": run_gaps, "steps": [r["step"] for r in run], "previous_gap": gaps[first - 1],
         "best_gap": best, "best_step": best_step, "threshold": best + cfg.gap_widen_max,
         "widen_max": cfg.gap_widen_max, "patience": cfg.gap_patience},
        f"Generalization gap (eval - train loss) rose from {gaps[first - 1]:.4f} to "
        f"{_at_steps(run_gaps, run, lambda g: f'{g:.4f}')}, more than {cfg.gap_widen_max} above its best "
        f"{best:.4f} (step {best_step}) and worsening over {len(run)} consecutive evaluation intervals.")


def _caption_degraded_trigger(evals: list[Mapping], cfg: Any) -> Trigger | None:
    run = _trailing_bad(evals, [_caption_degraded(r) is True for r in evals])
    if len(run) < cfg.caption_patience:
        return None
    captions = [r["caption"] for r in run]
    chrfs = [c.get("mean_chrf_vs_baseline") for c in captions]
    return Trigger(
        "caption_degraded", run[-1]["step"],
        {"steps": [r["step"] for r in run], "sources": [c.get("source") for c in captions],
         "mean_chrf_vs_baseline": chrfs, "hallucinated": [c.get("hallucinated") for c in captions],
         "blind": [c.get("blind") for c in captions], "chrf_min": captions[-1].get("chrf_min"),
         "patience": cfg.caption_patience},
        f"Free-form captions were judged degraded at {len(run)} consecutive evaluations, steps "
        f"{', '.join(str(r['step']) for r in run)} (by {', '.join(str(c.get('source')) for c in captions)}; "
        f"mean chrF vs baseline {', '.join('n/a' if x is None else f'{x:.1f}' for x in chrfs)}).")


def eval_loss_plateau(history: Sequence[Mapping], patience: int, threshold: float) -> dict | None:
    """The task is fitted as far as this run goes: the latest `patience` evaluations did not lower the eval
    loss below its best so far by more than `threshold` (relative: 0.02 = 2%). Not a guardrail: the run ends
    as completed (transformers' EarlyStoppingCallback, early_stopping_patience / _threshold, on eval loss).
    Returns {"step", "best_step", "best_eval_loss", "message"}, or None (also with patience 0 = off)."""
    if patience < 1:
        return None
    best, best_step, since, last = math.inf, None, 0, None
    for record in _evaluations(history):
        loss = _number(record.get("eval_loss"))
        if loss is None:
            continue
        last = record["step"]
        if best_step is None or loss < best * (1 - threshold) - _EPS:
            best, best_step, since = loss, record["step"], 0
        else:
            since += 1
    if since < patience:
        return None
    return {"step": last, "best_step": best_step, "best_eval_loss": best,
            "message": f"Eval loss plateaued: no evaluation since step {best_step} ({best:.4f}) lowered it by more "
                       f"than {threshold:.0%} ({since} evaluations, plateau_patience {patience})."}


def guardrails_that_cannot_act(baseline: Mapping, cfg: Any) -> list[dict[str, str]]:
    """The guardrails that cannot work as meant from the baseline on, each {"guardrail", "probe", "problem",
    "message"}, for every gating probe group (gating_probes).

    problem "cannot_hold": the baseline itself already breaks it, so every evaluation counts as bad and the
    trigger fires at its patience-th evaluation whatever training does (irrelevant pass below irrelevant_min).
    problem "cannot_fire": it can never trigger (no irrelevant or OOD samples in the group, or a bound
    beyond 100%), so the run goes unguarded there. Each message names the parameter and the fix.
    """
    out = []
    for probe in gating_probes(baseline, cfg):
        under = _under(probe)
        base_irr, base_hal = _rate(baseline, "irrelevant_pass", probe), _rate(baseline, "hallucination", probe)
        if base_irr is None:
            out.append({"guardrail": "irrelevant_drop", "probe": probe, "problem": "cannot_fire", "message": (
                f"irrelevant_drop {under} cannot fire: the baseline has no irrelevant-image pass rate there (no "
                f"sample of kind 'irrelevant' with probe {probe!r} in bench_file). Fix: add chat screenshots or other "
                "irrelevant images answered with irrelevant_label to that group, or leave it out of "
                "guardrail_probes.")})
        elif base_irr < cfg.irrelevant_min - _EPS:
            k, n = _count(baseline, "irrelevant_pass", probe)
            out.append({"guardrail": "irrelevant_drop", "probe": probe, "problem": "cannot_hold", "message": (
                f"irrelevant_drop {under} cannot hold: the baseline already passes only {k}/{n} ({_pct(base_irr)}) "
                f"irrelevant images, below irrelevant_min = {cfg.irrelevant_min:g}, so every evaluation counts as a "
                f"drop and the trigger fires at evaluation {cfg.irrelevant_patience} whatever the run learns. Fix: "
                f"set irrelevant_min at or below the baseline's {base_irr:.2f} (irrelevant_min: 0 keeps only the relative "
                f"drop of irrelevant_drop_max = {cfg.irrelevant_drop_max:g}), use a benchmark whose irrelevant "
                f"images the base answers with irrelevant_label = {cfg.irrelevant_label!r}, or leave {probe!r} out "
                "of guardrail_probes.")})
        if base_hal is None:
            out.append({"guardrail": "hallucination_rise", "probe": probe, "problem": "cannot_fire", "message": (
                f"hallucination_rise {under} cannot fire: the baseline has no hallucination rate there (no sample "
                f"of kind 'ood' with probe {probe!r} in bench_file). Fix: add out-of-domain images to that group.")})
        elif base_hal + cfg.hallucination_rise_max >= 1 - _EPS:
            out.append({"guardrail": "hallucination_rise", "probe": probe, "problem": "cannot_fire", "message": (
                f"hallucination_rise {under} cannot fire: baseline {_pct(base_hal)} plus hallucination_rise_max = "
                f"{cfg.hallucination_rise_max:g} is 100% or more. Fix: lower hallucination_rise_max, or use a "
                "benchmark on which the base hallucinates less.")})
    return out


def _count(record: Mapping, key: str, probe: str = DEFAULT_PROBE) -> tuple[Any, Any]:
    value = metric_value(record, key, probe)
    return (value.get("k"), value.get("n")) if isinstance(value, Mapping) else ("?", "?")


# ------------------------------------------------------------------------------------------------
# Caption sanity


def caption_sanity(captions: list[str], baseline_captions: list[str], terms: dict,
                   present_objects: list[list[str]] | None = None, manual: list[dict] | None = None,
                   chrf_min: float = 40.0, *, checkpoint: str | None = None) -> dict:
    """Whether free-form captions degraded against the baseline's captions of the same images.

    Automatic proxy, over the n images: mean chrF of each caption against the baseline's caption
    of the same image; captions that hallucinate (scoring.hallucinated with the image's objects,
    `present_objects` None = no objects anywhere, as for OOD images); blind captions
    (scoring.is_blind on the text; whether generation hit the token limit is not known here).
    Proxy degraded = mean chrF < chrf_min, or more hallucinated, or more blind captions than the
    baseline's captions of the same images. With n = 0 the proxy has no verdict (None).

    Manual verdicts: rows of spotcheck.jsonl ({"checkpoint", "image", "verdict", ...}). Only rows
    of `checkpoint` count (compared by folder name, so "checkpoints/checkpoint-25" matches
    "checkpoint-25"); checkpoint None = every row given is this checkpoint's. The latest row per
    image (file order: the spot-check appends) is its verdict; manual degraded = any of those is
    not "ok". When any manual verdict counts it decides `degraded` (source "manual"), else the
    proxy does (source "proxy"); `disagree` is True/False when both have a verdict, else None.
    Raises DataError on a counted row whose verdict is not one of VERDICTS.
    """
    if len(captions) != len(baseline_captions):
        raise ValueError(f"captions and baseline_captions must be parallel lists (one per image), got "
                         f"lengths {len(captions)} and {len(baseline_captions)}")
    if present_objects is None:
        present_objects = [[] for _ in captions]
    elif len(present_objects) != len(captions):
        raise ValueError(f"present_objects must have one list per caption, got {len(present_objects)} "
                         f"for {len(captions)} captions")
    n = len(captions)
    mean_chrf = (sum(scoring.chrf(c, b) for c, b in zip(captions, baseline_captions)) / n) if n else None
    hallucinated = sum(scoring.hallucinated(c, o, terms) for c, o in zip(captions, present_objects))
    base_hallucinated = sum(scoring.hallucinated(b, o, terms) for b, o in zip(baseline_captions, present_objects))
    blind = sum(scoring.is_blind(c) for c in captions)
    base_blind = sum(scoring.is_blind(b) for b in baseline_captions)
    proxy = (mean_chrf < chrf_min or hallucinated > base_hallucinated or blind > base_blind) if n else None
    return _with_manual({
        "n": n, "mean_chrf_vs_baseline": mean_chrf, "hallucinated": hallucinated, "blind": blind,
        "baseline_hallucinated": base_hallucinated, "baseline_blind": base_blind, "chrf_min": chrf_min,
        "proxy_degraded": proxy}, manual or [], checkpoint)


def _with_manual(caption: dict, rows: Sequence[Mapping], checkpoint: str | None) -> dict:
    """The caption verdict with the manual verdicts of `checkpoint` among `rows` (see caption_sanity)."""
    proxy = caption["proxy_degraded"]
    verdicts = _latest_verdicts(rows, checkpoint)
    manual_degraded = any(v != "ok" for v in verdicts.values()) if verdicts else None
    both = proxy is not None and manual_degraded is not None
    return caption | {
        "degraded": manual_degraded if verdicts else proxy, "source": "manual" if verdicts else "proxy",
        "proxy_degraded": proxy, "manual_degraded": manual_degraded, "manual_verdicts": verdicts,
        "disagree": (proxy != manual_degraded) if both else None,
    }


def apply_verdicts(history: Sequence[Mapping], verdicts: Sequence[Mapping]) -> list[dict]:
    """The records with their caption verdict re-decided by the spot-check rows given so far.

    A record's caption verdict was decided when it was written, usually before anyone had judged
    that checkpoint; the spot-check appends verdicts later. Each record's manual verdicts are
    re-read from `verdicts` (rows of spotcheck.jsonl) for checkpoint-<step>, the name the
    spot-check writes, and decide `degraded` where present; the proxy decides elsewhere (a record
    written before the caption carried `proxy_degraded` has its proxy in `degraded`). Records
    without a caption dict are returned as they are; nothing is modified in place.
    """
    out = []
    for record in history:
        caption = record.get("caption") if isinstance(record, Mapping) else None
        step = record.get("step") if isinstance(record, Mapping) else None
        if isinstance(caption, Mapping) and isinstance(step, int) and not isinstance(step, bool):
            proxy = caption["proxy_degraded"] if "proxy_degraded" in caption else (
                caption.get("degraded") if caption.get("source") != "manual" else None)
            record = {**record, "caption": _with_manual({**caption, "proxy_degraded": proxy}, verdicts,
                                                        f"checkpoint-{step}")}
        out.append(record)
    return out


def _latest_verdicts(rows: Sequence[Mapping], checkpoint: str | None) -> dict[str, str]:
    """image -> its latest verdict among the rows of this checkpoint."""
    latest: dict[str, str] = {}
    for i, row in enumerate(rows, 1):
        if checkpoint is not None and not _same_checkpoint(row.get("checkpoint"), checkpoint):
            continue
        image, verdict = row.get("image"), row.get("verdict")
        if not isinstance(image, str) or not image or verdict not in VERDICTS:
            raise DataError(
                f"spot-check row {i} (checkpoint {row.get('checkpoint')!r}): image = {image!r}, verdict = "
                f"{verdict!r}: expected an image path and one of {', '.join(VERDICTS)}. Fix: correct or "
                "delete that line of spotcheck.jsonl")
        latest[image] = verdict
    return latest


def _same_checkpoint(a: Any, b: Any) -> bool:
    return a is not None and Path(str(a)).name == Path(str(b)).name


# ------------------------------------------------------------------------------------------------
# Baseline


def baseline_record(run_dir: Path, runs_root: Path, a0_variant: str = "A0", *, params: Mapping
                    ) -> tuple[dict, str]:
    """The guardrail baseline: (step-0 record, where it came from and why).

    A0's step-0 record (runs_root/A0/metrics.jsonl) when comparable_a0 accepts A0 for this run (`params`:
    this run's params.json, whose setup and code A0's must equal); else this run's own step-0 record
    (run_dir/metrics.jsonl). The source reads "A0 (outputs/runs/A0): why" or "own step 0 (why A0 was not
    used)". Raises LoraKitError when neither exists.
    """
    run_dir, runs_root = Path(run_dir), Path(runs_root)
    a0_dir, why = comparable_a0(run_dir, runs_root, params, a0_variant)
    if a0_dir is not None:
        record = step0_record(a0_dir / "metrics.jsonl")
        if record is not None:
            return record, f"{a0_variant} ({a0_dir}): {why}"
        why = f"{a0_dir / 'metrics.jsonl'} has no step-0 evaluation"
    own = run_dir / "metrics.jsonl"
    record = step0_record(own)
    if record is not None:
        return record, f"own step 0 ({why})"
    raise LoraKitError(
        f"no guardrail baseline for {run_dir}: {why}, and {own} has no step-0 evaluation. "
        f"Fix: run {a0_variant} to completion first (python -m lora_kit train -f params/{a0_variant}.yaml), "
        "or evaluate this run at step 0 (before training) before checking guardrails")


def comparable_a0(run_dir: Path, runs_root: Path, params: Mapping, a0_variant: str = "A0"
                  ) -> tuple[Path | None, str]:
    """(A0's folder, why it may stand for this run's step 0), or (None, why not).

    A0 qualifies when it completed, trained nothing, and ran the same setup (setups.py: model, data files,
    benchmark, evaluation settings, profile) with the same code as this run, whose params.json is `params`.
    The guardrail baseline (baseline_record) and the copied step 0 (train.shared_step0) both ask this.
    """
    from .setups import code_differences, setup_differences, setup_of

    a0_dir = Path(runs_root) / a0_variant
    why_not = _why_not_a0(a0_dir, Path(run_dir), a0_variant)
    if why_not is not None:
        return None, why_not
    try:
        theirs = RunFolder(a0_dir).params()
    except DataError as err:
        return None, str(err)
    if theirs is None:
        return None, f"{a0_dir / 'params.json'} does not exist, so {a0_variant}'s setup is unknown"
    if theirs.get("trainable_parameters") != 0:
        return None, f"{a0_variant} trained {theirs.get('trainable_parameters')!r} parameters: it is not the base"
    differences = (setup_differences(setup_of(theirs), setup_of(dict(params)))
                   + code_differences(theirs.get("code"), params.get("code")))
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        return None, f"{a0_variant} at {a0_dir} ran another setup or code ({a0_variant} vs this run: {shown})"
    return a0_dir, ("the same model, data files, benchmark, evaluation settings and profile (setups.py) and the "
                    "same code")


def _why_not_a0(a0_dir: Path, run_dir: Path, a0_variant: str) -> str | None:
    """Why A0's folder cannot be the baseline whatever its setup (this run, absent, not completed), or None."""
    if a0_dir.resolve() == run_dir.resolve():
        return f"this run is {a0_variant}"
    if not (a0_dir / "summary.json").is_file():
        return f"no {a0_variant} run at {a0_dir}"
    try:
        status = RunFolder(a0_dir).status()
    except (OSError, ValueError, AttributeError) as err:
        return f"{a0_dir / 'summary.json'} cannot be read ({err})"
    if status != "completed":
        return f"{a0_variant} at {a0_dir} has status {status!r}, not 'completed'"
    return None


def step0_record(path: Path) -> dict | None:
    """The step-0 record of a metrics.jsonl, or None."""
    if not path.is_file():
        return None
    return next((r for r in read_metrics(path) if r.get("step") == 0), None)


# ------------------------------------------------------------------------------------------------
# Best checkpoint


def choose_best(history: Sequence[Mapping], baseline: Mapping, cfg: Any) -> dict:
    """The best checkpoint: lowest eval loss among the feasible ones, the earliest step on a tie.

    Feasible = a record with a checkpoint, a finite eval_loss, irrelevant pass >= baseline -
    best_irrelevant_margin and hallucination <= baseline + best_hallucination_margin. Both
    margins are absolute (0.1 = 10 points, as DESIGN.md's "baseline - 10%"). A checkpoint whose
    rate is missing cannot show it is feasible and is rejected; a constraint whose baseline rate is
    missing is not applied (said in `reason`). Returns {"checkpoint", "step", "eval_loss",
    "metrics" (the record), "feasible_steps", "rejected" ([{"step", "checkpoint", "why"}]),
    "reason"}; checkpoint, step, eval_loss and metrics are None when no checkpoint qualifies.
    """
    bounds = []  # (probe, floor of irrelevant pass, ceiling of hallucination) per gating group
    rules = []
    for probe in gating_probes(baseline, cfg):
        base_irr, base_hal = _rate(baseline, "irrelevant_pass", probe), _rate(baseline, "hallucination", probe)
        floor = base_irr - cfg.best_irrelevant_margin if base_irr is not None else None
        ceiling = base_hal + cfg.best_hallucination_margin if base_hal is not None else None
        bounds.append((probe, floor, ceiling))
        under = f" {_under(probe)}"
        rules.append(f"irrelevant pass{under} >= {_pct(floor)} (baseline {_pct(base_irr)} - "
                     f"{_pct(cfg.best_irrelevant_margin)})" if floor is not None
                     else f"irrelevant pass{under} not constrained (the baseline has no rate)")
        rules.append(f"hallucination{under} <= {_pct(ceiling)} (baseline {_pct(base_hal)} + "
                     f"{_pct(cfg.best_hallucination_margin)})" if ceiling is not None
                     else f"hallucination{under} not constrained (the baseline has no rate)")
    rules_text = " and ".join(rules)

    feasible: list[tuple[float, int, Mapping]] = []
    rejected: list[dict] = []
    for record in _evaluations(history):
        if not record.get("checkpoint"):
            continue
        why = []
        loss = _number(record.get("eval_loss"))
        if loss is None:
            why.append(f"eval loss is {record.get('eval_loss')!r}")
        for probe, floor, ceiling in bounds:
            under = f" {_under(probe)}"
            if floor is not None:
                x = _rate(record, "irrelevant_pass", probe)
                if x is None:
                    why.append(f"irrelevant pass{under} not measured")
                elif x < floor - _EPS:
                    why.append(f"irrelevant pass{under} {_pct(x)} < {_pct(floor)}")
            if ceiling is not None:
                x = _rate(record, "hallucination", probe)
                if x is None:
                    why.append(f"hallucination{under} not measured")
                elif x > ceiling + _EPS:
                    why.append(f"hallucination{under} {_pct(x)} > {_pct(ceiling)}")
        if why:
            rejected.append({"step": record["step"], "checkpoint": record["checkpoint"], "why": "; ".join(why)})
        else:
            feasible.append((loss, record["step"], record))  # type: ignore[arg-type]

    rejected_text = "; ".join(f"step {r['step']} ({r['checkpoint']}): {r['why']}" for r in rejected)
    result: dict[str, Any] = {"checkpoint": None, "step": None, "eval_loss": None, "metrics": None,
                              "feasible_steps": sorted(step for _, step, _ in feasible), "rejected": rejected}
    if not feasible:
        if not rejected:
            result["reason"] = "no checkpoint satisfies the guardrails: no evaluation record has a checkpoint"
        else:
            result["reason"] = f"no checkpoint satisfies {rules_text}: {rejected_text}"
        return result
    loss, step, record = min(feasible, key=lambda f: (f[0], f[1]))
    reason = (f"lowest eval loss {loss:.4f} at step {step} among {len(feasible)} checkpoint(s) with "
              f"{rules_text}")
    result.update(checkpoint=record["checkpoint"], step=step, eval_loss=loss, metrics=dict(record),
                  reason=reason + (f"; rejected: {rejected_text}" if rejected else ""))
    return result


# ------------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl (see rundir.read_jsonl_records: a killed writer's last line is left out)."""
    return read_jsonl_records(path)


def append_metrics(path: str | Path, record: Mapping) -> None:
    """Append one evaluation record (it needs an integer 'step') as one JSON line, flushed and fsynced."""
    step = record.get("step") if isinstance(record, Mapping) else None
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"an evaluation record needs an integer 'step', got {step!r}")
    append_jsonl(path, record)
