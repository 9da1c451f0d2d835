"""Every metric of an evaluation record, defined once: name, direction, kind, thresholds, where it is shown.

The guardrails, the trackers (trainer_logs), the run view, the study table and the plots all read METRICS, so a new metric
or a new probe group needs no other list kept in step (PEFT's method_comparison keeps the same kind of
"higher / lower is better" map).

Benchmark metrics (scope "probe") are measured once per probe group: the benchmark's rows carry a `probe`
field naming the prompt they were asked under (the toy's `general` and `task`; a benchmark without the field
is one group, `general`). In a record they sit under record["probes"][probe][metric]; as a table column
they are `<metric>@<probe>` (`irrelevant_pass@task`), with `_n`, `_lo` and `_hi` for a rate's n and Wilson
95% interval. Run-scope metrics (losses, task exact match) are one number per evaluation.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

DEFAULT_PROBE = "general"  # the probe group of benchmark rows without a `probe` field
PROBE_SEPARATOR = "@"


@dataclass(frozen=True)
class Metric:
    """One metric of an evaluation record."""

    name: str
    title: str  # what a reader sees on an axis or a table header
    better: Literal["max", "min"]
    kind: Literal["rate", "loss"]  # a rate has n and a Wilson interval; a loss is nats per token
    scope: Literal["run", "probe"]  # "probe": measured on the benchmark once per probe group
    guardrail: str | None = None  # the trigger that watches it (guardrails.TRIGGER_NAMES)
    params: tuple[str, ...] = ()  # the RunConfig fields that set its thresholds
    show: frozenset[str] = frozenset()  # where it appears: table, frontier, heatmap, curves, run


_EVERYWHERE = frozenset({"table", "frontier", "heatmap", "curves", "run"})
METRICS: tuple[Metric, ...] = (
    Metric("eval_loss", "eval loss (task, nats/token)", "min", "loss", "run", show=frozenset({"curves", "run"})),
    Metric("train_loss", "train loss (nats/token)", "min", "loss", "run", show=frozenset({"run"})),
    Metric("gap", "generalization gap (eval - train)", "min", "loss", "run", guardrail="gap_widening",
           params=("gap_widen_max", "gap_patience"), show=frozenset({"table", "run"})),
    Metric("general_loss", "general loss (text, nats/token)", "min", "loss", "run",
           show=frozenset({"table", "heatmap", "curves", "run"})),
    Metric("task_exact_match", "task exact match (validation)", "max", "rate", "run",
           show=frozenset({"table", "heatmap", "curves", "run"})),
    Metric("irrelevant_pass", "irrelevant-image pass", "max", "rate", "probe", guardrail="irrelevant_drop",
           params=("irrelevant_drop_max", "irrelevant_min", "irrelevant_patience", "best_irrelevant_margin"),
           show=_EVERYWHERE),
    Metric("hallucination", "hallucination on OOD images", "min", "rate", "probe", guardrail="hallucination_rise",
           params=("hallucination_rise_max", "hallucination_patience", "best_hallucination_margin"),
           show=_EVERYWHERE),
    Metric("object_accuracy", "object accuracy (in-domain)", "max", "rate", "probe",
           show=frozenset({"table", "curves", "run"})),
    Metric("false_refusal", "false refusal (in-domain)", "min", "rate", "probe", show=frozenset({"table"})),
    Metric("hallucination_in_domain", "hallucination (in-domain)", "min", "rate", "probe",
           show=frozenset({"table"})),
    Metric("object_recall", "object recall (in-domain)", "max", "rate", "probe"),
    Metric("blindness", "blind answers", "min", "rate", "probe", show=frozenset({"table"})),
    Metric("ood_label_rate", "OOD images answered with the label", "min", "rate", "probe"),
    # evaluate.kl_to_base: KL(start model || current) on the start model's greedy answers; its token count is
    # kl_base_tokens beside it in the probe group's record
    Metric("kl_base", "KL to the start model (nats/token)", "min", "loss", "probe", guardrail="kl_rise",
           params=("kl_base_max", "kl_patience"), show=frozenset({"table", "curves", "run"})),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
# The study table's name for the eval loss at the best checkpoint.
ALIASES = {"best_eval_loss": "eval_loss"}
# H1 and H4 watch these: language generality, the irrelevant rule and hallucination.
GENERALITY = ("general_loss", "irrelevant_pass", "hallucination")


def column(metric: str, probe: str | None = None) -> str:
    """The table column of a metric: `irrelevant_pass@task` for a probe metric, the name otherwise."""
    return f"{metric}{PROBE_SEPARATOR}{probe}" if probe else metric


def split_column(col: str) -> tuple[str, str | None]:
    """(metric name, probe or None) of a table column; `_n`/`_lo`/`_hi` suffixes are not stripped."""
    name, _, probe = col.partition(PROBE_SEPARATOR)
    return ALIASES.get(name, name), probe or None


def metric_of(col: str) -> Metric | None:
    """The Metric behind a column (`hallucination@task`, `best_eval_loss`), or None."""
    return BY_NAME.get(split_column(col)[0])


def direction(col: str) -> str:
    """'min' or 'max' for a metric column; '' for a column that is no metric."""
    m = metric_of(col)
    return m.better if m else ""


def is_rate(col: str) -> bool:
    m = metric_of(col)
    return m is not None and m.kind == "rate"


def title(col: str) -> str:
    """`irrelevant-image pass [task prompt]` for `irrelevant_pass@task`."""
    m, (_, probe) = metric_of(col), split_column(col)
    text = m.title if m else col
    return f"{text} [{probe} prompt]" if probe else text


def shown(where: str) -> list[Metric]:
    """The metrics shown in one place (table, frontier, heatmap, curves, run), in METRICS order."""
    return [m for m in METRICS if where in m.show]


def probe_metrics(record: Mapping | None) -> dict[str, Mapping]:
    """probe -> {metric: value} of a record; a record written before probe groups is the one group `general`."""
    if not record:
        return {}
    probes = record.get("probes")
    if isinstance(probes, Mapping):
        return {str(k): v for k, v in probes.items() if isinstance(v, Mapping)}
    return {DEFAULT_PROBE: record} if any(m.name in record for m in METRICS if m.scope == "probe") else {}


def value(record: Mapping | None, metric: str, probe: str | None = None):
    """The raw value (a rate dict or a number) of a metric in a record; probe metrics need their probe."""
    if not record:
        return None
    if BY_NAME[metric].scope == "run":
        return record.get(metric)
    return (probe_metrics(record).get(probe or DEFAULT_PROBE) or {}).get(metric)


def columns(where: str, probes: list[str]) -> list[str]:
    """The table columns of the metrics shown in `where`, a probe metric once per probe."""
    out = []
    for m in shown(where):
        out += [column(m.name, p) for p in probes] if m.scope == "probe" else [m.name]
    return out


# The caption-sanity and crop-consistency numbers of a record the trackers receive too: record[part][key].
LOGGED_PARTS = (("caption", ("mean_chrf_vs_baseline",)), ("crop", ("agreement_rate", "label_flip_rate", "mean_chrf")))


def trainer_logs(record: Mapping) -> dict[str, float]:
    """One evaluation record as the Trainer's logs, which every report_to integration receives at the record's step.

    Keys: `eval_<metric>` for a run metric (eval_loss, eval_gap, eval_task_exact_match), `eval_<probe>/<metric>`
    for a probe metric (eval_task/irrelevant_pass); a rate has its n beside it (`..._n`: eval_task/irrelevant_pass_n,
    eval_task_exact_match_n), the KL its token count (eval_task/kl_base_tokens); then eval_caption_<key> and
    eval_crop_<key> (LOGGED_PARTS). Only finite numbers: a metric not measured (null) or NaN is left out.

    `eval_` is the Trainer's own prefix for evaluation metrics: TensorBoard and W&B show these as `eval/<...>`
    (transformers' rewrite_logs: eval/loss, eval/task/irrelevant_pass), MLflow under the keys as written. The
    keys hold only characters every integration keeps, but a probe group's own name: MLflow writes `_` for any
    character other than letters, digits and `_-. :/` in it. metrics.jsonl keeps the record as it is.
    """
    logs: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, Mapping):  # a rate: {k, n, rate, lo, hi}
            put(f"{key}_n", value.get("n"))
            value = value.get("rate")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            logs[key] = value

    for m in METRICS:  # every metric of the table, a probe metric once per probe group
        if m.scope == "run":  # eval_loss keeps its name, the Trainer's own for the eval loss
            put(m.name if m.name.startswith("eval_") else f"eval_{m.name}", record.get(m.name))
            continue
        for probe, values in probe_metrics(record).items():
            put(f"eval_{probe}/{m.name}", values.get(m.name))
            if f"{m.name}_tokens" in values:  # kl_base: the tokens it averages over
                put(f"eval_{probe}/{m.name}_tokens", values[f"{m.name}_tokens"])
    for part, keys in LOGGED_PARTS:
        for key in keys:
            put(f"eval_{part}_{key}", (record.get(part) or {}).get(key))
    return logs
