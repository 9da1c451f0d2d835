"""The study's answer: every run folder in one table, the Pareto frontier, plots and hypothesis verdicts.

    df = collect_runs("outputs/runs")
    study, left_out = one_setup(df)  # frontiers and verdicts compare runs of one setup (setups.py)
    front = pareto_front(study, {"best_eval_loss": "min", "irrelevant_pass": "max"})
    write_summary()  # outputs/summary/: study.csv, left_out.csv, frontier.csv, frontier_*.png, heatmaps.png,
                     # curves.png, verdicts.json (`python -m lora_kit next` reads frontier.csv and study.csv)

Pure pandas / matplotlib / seaborn on the files train.py writes into each run folder (rundir.py).
A run's guardrail metrics are those of its best checkpoint; a run without a feasible checkpoint
contributes its last evaluation and is marked `feasible` False.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import LoraKitError
from .guardrails import apply_verdicts
from .metrics import BY_NAME, GENERALITY, column, columns, direction, is_rate, metric_of, split_column, title
from .paths import outputs_dir, runs_dir
from .rundir import RunFolder, read_jsonl_records
from .scoring import wilson_interval
from .setups import setup_differences, setup_id, setup_label, setup_of
from .views import flatten_record, in_notebook, metrics_frame, stage_boundaries, stage_line

FINISHED = ("completed", "stopped_early")
# Two runs compare footprints only when everything else that shapes training is equal.
CONTROLS = ("model", "lora_rank", "learning_rate", "vit_lr", "stages")  # a staged run is no fixed-target cell
RUN_COLUMNS = [
    "variant", "llm_last", "vit_last", "model", "lora_rank", "learning_rate", "vit_lr", "seed", "status", "stop_reason",
    "stop_probe", "stop_step", "n_llm_modules", "n_vit_modules", "trainable_parameters", "best_step",
    "best_checkpoint", "best_eval_loss", "feasible", "guardrail_probes", "first_moved", "wall_seconds",
    "eval_share", "steps", "stages", "stage_outcomes", "run_dir", "setup", "setup_label", "derived_from",
    "target_regex"]
_NOT_METRICS = ("step", "epoch", "eval_loss", "checkpoint", "eval_seconds")  # in the record, not guardrails
LOSS_TOLERANCE = 0.02  # relative: two losses within 2% of each other are the same (hypothesis_verdicts)
_TEXT_COLUMNS = ("variant", "model", "status", "stop_reason", "stop_probe", "best_checkpoint", "feasible",
                 "guardrail_probes", "first_moved", "run_dir", "caption_disagree_steps", "setup", "setup_label",
                 "derived_from", "stages", "stage_outcomes", "target_regex")


def study_probes(df: pd.DataFrame) -> list[str]:
    """The probe groups the study's guardrails watched: those the runs name in guardrail_probes, else every
    group with an irrelevant_pass column, in first-seen order."""
    named = [p for text in df.get("guardrail_probes", pd.Series(dtype=object)).dropna()
             for p in str(text).split(",") if p]
    found = [split_column(c)[1] for c in df.columns if c.startswith("irrelevant_pass@")
             and not c.endswith(("_n", "_lo", "_hi"))]
    return list(dict.fromkeys(named or found))


def generality(df: pd.DataFrame) -> dict[str, str]:
    """The columns H1 and H4 watch (metrics.GENERALITY, a probe metric in every watched group) -> direction."""
    out = {}
    for name in GENERALITY:
        cols = [column(name, p) for p in study_probes(df)] if BY_NAME[name].scope == "probe" else [name]
        out |= {c: direction(c) for c in cols}
    return out


def front_objectives(df: pd.DataFrame) -> dict[str, str]:
    """The Pareto front's objectives: eval loss, and irrelevant pass and hallucination in every watched group."""
    return {"best_eval_loss": "min"} | {column(m, p): direction(m) for p in study_probes(df)
                                         for m in ("irrelevant_pass", "hallucination")}


# ---------------------------------------------------------------- the table

def collect_runs(runs_root) -> pd.DataFrame:
    """One row per run folder (those with a summary.json): settings, status, best checkpoint and its metrics.

    Rates come as <metric>, <metric>_n, <metric>_lo, <metric>_hi (Wilson 95%); `feasible` is True when a
    checkpoint passed the guardrail constraints (or for an evaluation-only run); otherwise the metrics are
    those of the last evaluation. A 'running' run whose process is gone has status 'stale'.
    """
    root = Path(runs_root)
    if not root.is_dir():
        raise LoraKitError(f"runs_root {root} is not a folder; pass the folder holding one run folder per variant "
                           "(default outputs/runs), or run variants first: python -m lora_kit matrix")
    rows = [_run_row(d) for d in sorted(root.iterdir()) if (d / "summary.json").is_file()]
    df = pd.DataFrame(rows)
    df = df.reindex(columns=list(dict.fromkeys(RUN_COLUMNS + ["general_loss", "gap", "task_exact_match"]
                                               + list(df.columns))))
    df["feasible"] = df["feasible"].astype(bool)
    numeric = [c for c in df.columns if c not in _TEXT_COLUMNS]
    for c in numeric:  # None (a rate with n = 0, a missing value) becomes NaN in number columns
        converted = pd.to_numeric(df[c], errors="coerce")
        if converted.notna().sum() == df[c].notna().sum():
            df[c] = converted
    return df.copy()  # one block per dtype: columns set one by one leave a frame pandas warns about at each use


def _run_row(folder: Path) -> dict:
    run = RunFolder(folder)
    summary = _read_json(folder / "summary.json")
    params = run.params() or {}
    setup = setup_of(params)
    cfg = params.get("config") or {}
    status = run.status()
    best = summary.get("best") or {}
    counts = (summary.get("targets") or params.get("targets") or {}).get("counts") or {}
    trainable = _first(summary.get("trainable_parameters"), params.get("trainable_parameters"))
    # caption verdicts re-decided with the spot-check verdicts given since the records were written
    verdicts = run.verdicts()
    records = apply_verdicts(read_jsonl_records(folder / "metrics.jsonl"), verdicts)
    feasible = status in FINISHED and (best.get("checkpoint") is not None or trainable == 0)
    if feasible:  # the best checkpoint (step 0 for the evaluation-only A0)
        record = apply_verdicts([best.get("metrics") or _record_at(records, best.get("step")) or {}], verdicts)[0]
        step, loss = best.get("step"), best.get("eval_loss")
    else:  # no checkpoint passed the guardrails (or the run never finished): its last evaluation
        record = records[-1] if records else {}
        step, loss = record.get("step"), record.get("eval_loss")
    timings = summary.get("timings") or {}
    row = {
        "variant": summary.get("variant") or folder.name,
        "llm_last": _first(summary.get("llm_last"), cfg.get("llm_last")),
        "vit_last": _first(summary.get("vit_last"), cfg.get("vit_last")),
        "model": cfg.get("model"), "lora_rank": cfg.get("lora_rank"), "seed": cfg.get("seed"),
        "learning_rate": cfg.get("learning_rate"), "vit_lr": cfg.get("vit_lr"),
        "status": status, "stop_reason": summary.get("stop_reason"), "stop_step": summary.get("stop_step"),
        "stop_probe": summary.get("stop_probe"), "guardrail_probes": ",".join(summary.get("guardrail_probes") or []),
        "first_moved": ", ".join(f"{k} at {v}" for k, v in sorted((summary.get("first_bad_steps") or {}).items(),
                                                                   key=lambda kv: (kv[1], kv[0]))),
        "n_llm_modules": counts.get("llm"), "n_vit_modules": counts.get("vit"), "trainable_parameters": trainable,
        "best_step": step, "best_checkpoint": best.get("checkpoint") if feasible else None,
        "best_eval_loss": loss, "feasible": feasible,
        "wall_seconds": timings.get("wall_seconds"), "eval_share": timings.get("eval_share"),
        "steps": summary.get("steps"), "run_dir": str(folder),
        # progressive unfreezing: what each stage did (targets, steps, outcome; "" unstaged)
        "stage_outcomes": stage_line(summary),
        "setup": setup_id(setup), "setup_label": setup_label(setup),
        "derived_from": cfg.get("derived_from"),  # the variant a follow-up run varies (lora_kit next)
        "target_regex": cfg.get("target_regex"),  # a run targeted by regex instead of llm_last / vit_last
        "stages": json.dumps(cfg["stages"]) if cfg.get("stages") else None,  # a progressive-unfreezing run
        "caption_disagree_steps": ", ".join(str(r["step"]) for r in records
                                            if isinstance(r.get("caption"), dict) and r["caption"].get("disagree")),
    }
    metrics = {k: v for k, v in flatten_record(record).items() if k not in _NOT_METRICS}
    return row | metrics


def one_setup(df: pd.DataFrame, setup: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs of one setup, the runs left out of its frontiers and verdicts, with why).

    Runs compare only within one setup (setups.py: model, data files, benchmark, evaluation settings,
    profile); a run on other data would otherwise sit on the same frontier and sway the verdicts. `setup`:
    an id of the table's `setup` column or its unique prefix; None = the setup with the most finished runs
    (on a tie, the one holding a finished A0). Left out, with a `why` each: every run of another setup (what
    differs from the chosen one) and the chosen setup's unfinished runs.
    """
    columns = ["variant", "setup", "setup_label", "status", "why"]
    if df.empty or "setup" not in df:
        return df, pd.DataFrame(columns=columns)
    chosen = _choose_setup(df, setup)
    study = df[df["setup"] == chosen]
    reference = _setup_of_run(study.iloc[0])
    rows = []
    for _, r in df.iterrows():
        if r["setup"] != chosen:
            why = (f"another setup ({r['setup']}, {r['setup_label']}); the study's vs this run's: "
                   + "; ".join(setup_differences(reference, _setup_of_run(r))))
        elif r["status"] not in FINISHED:
            why = f"status {r['status']}: not finished, so no best checkpoint to compare"
        else:
            continue
        rows.append({"variant": r["variant"], "setup": r["setup"], "setup_label": r["setup_label"],
                     "status": r["status"], "why": why})
    return study, pd.DataFrame(rows, columns=columns)


def _choose_setup(df: pd.DataFrame, setup: str | None) -> str:
    setups = sorted(df["setup"].unique())
    if setup is not None:
        matches = [s for s in setups if s.startswith(str(setup))]
        if len(matches) != 1:
            raise LoraKitError(f"setup = {setup!r} matches {len(matches)} of the runs' setups; expected one of: "
                               + "; ".join(f"{s} ({_label_of(df, s)}, {int((df['setup'] == s).sum())} runs)"
                                           for s in setups))
        return matches[0]
    finished = df[df["status"].isin(FINISHED)]
    counts = (finished if len(finished) else df)["setup"].value_counts()
    top = sorted(counts[counts == counts.max()].index)
    with_a0 = [s for s in top if ((finished["variant"] == "A0") & (finished["setup"] == s)).any()]
    return (with_a0 or top)[0]


def _label_of(df: pd.DataFrame, setup: str) -> str:
    return str(df.loc[df["setup"] == setup, "setup_label"].iloc[0])


def _setup_of_run(row) -> dict:
    return setup_of(RunFolder(Path(row["run_dir"])).params() or {})


def setup_note(study: pd.DataFrame, left_out: pd.DataFrame) -> str:
    """One paragraph for the notebook and the CLI: which setup the summary compares, and what it left out."""
    if study.empty or "setup" not in study:
        return "no runs"
    head = (f"setup {study['setup'].iloc[0]} ({study['setup_label'].iloc[0]}): {len(study)} run(s), "
            f"{int(study['status'].isin(FINISHED).sum())} finished")
    if left_out.empty:
        return head + "; no run left out."
    return head + f"; left out {len(left_out)}:\n" + "\n".join(f"  {r.variant}: {r.why}" for r in left_out.itertuples())


def _require_one_setup(df: pd.DataFrame, what: str) -> None:
    """Refuse a table mixing setups where runs are compared (frontiers, heatmaps, verdicts)."""
    if "setup" in df and df["setup"].nunique() > 1:
        raise LoraKitError(f"{what}: the table holds runs of {df['setup'].nunique()} setups "
                           f"({', '.join(sorted(df['setup'].unique()))}), and runs compare only within one. Fix: "
                           "pass frontier.one_setup(df)[0] (or one_setup(df, '<setup id>')[0])")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LoraKitError(f"{path} is not valid JSON ({err}); run files are written atomically, so it was edited or "
                           "copied half-way: restore it, or delete its run folder and run the variant again") from None


def _record_at(records: list[dict], step) -> dict | None:
    """The last record of `step` (a resumed run may evaluate a step twice; the later one counts)."""
    return next((r for r in reversed(records) if r.get("step") == step), None)


def _first(*values):
    return next((v for v in values if v is not None), None)


def study_table(df: pd.DataFrame) -> pd.DataFrame:
    """The table for reading: one row per variant, each rate as '91% [80-97%] n=32' beside the losses."""
    out = df.set_index("variant")[["llm_last", "vit_last", "status", "stop_reason", "stop_probe", "stop_step",
                                   "first_moved", "feasible", "best_step", "best_eval_loss"]].copy()
    probes = list(dict.fromkeys(study_probes(df) + [split_column(c)[1] for c in df.columns
                                                     if "@" in c and not c.endswith(("_n", "_lo", "_hi"))]))
    for col in columns("table", probes):
        if col in df:
            out[col] = [_rate_text(r, col) for _, r in df.iterrows()] if is_rate(col) else df[col].to_numpy()
    out["caption person / proxy"] = [_caption_text(r) for _, r in df.iterrows()]
    out["person ≠ proxy at steps"] = df.get("caption_disagree_steps", pd.Series("", index=df.index)).fillna("").to_numpy()
    out["wall_seconds"] = df["wall_seconds"].round(0).to_numpy()
    return out


def _caption_text(row) -> str:
    """Caption sanity at the row's checkpoint as 'person / proxy', each degraded, ok or — (no verdict)."""
    def word(key: str) -> str:
        value = row.get(key)
        return "—" if value is None or value != value else "degraded" if value else "ok"  # NaN != NaN

    disagree = row.get("caption_disagree")
    return (f"{word('caption_manual_degraded')} / {word('caption_proxy_degraded')}"
            + (" (disagree)" if disagree is not None and disagree == disagree and disagree else ""))


def _rate_text(row, m: str) -> str:
    if not _finite(row.get(m)):
        return "n/a" if not _finite(row.get(f"{m}_n")) else f"n/a n={int(row[f'{m}_n'])}"
    text = f"{row[m]:.0%}"
    if _finite(row.get(f"{m}_lo")) and _finite(row.get(f"{m}_hi")):
        text += f" [{row[f'{m}_lo']:.0%}-{row[f'{m}_hi']:.0%}]"
    return text + (f" n={int(row[f'{m}_n'])}" if _finite(row.get(f"{m}_n")) else "")


def _measured(df: pd.DataFrame, col: str) -> pd.Series:
    """Boolean mask of rows with a finite number in `col` (a bool Series even for an empty table)."""
    return pd.to_numeric(df[col], errors="coerce").notna() & ~pd.to_numeric(df[col], errors="coerce").isin(
        [np.inf, -np.inf])


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- the frontier

def pareto_front(df: pd.DataFrame, objectives: dict[str, str]) -> pd.Series:
    """True for the rows no other row dominates on `objectives` ({"column": "min" | "max"}).

    a dominates b when a is no worse on every objective and strictly better on one; identical rows do
    not dominate each other, so all of them stay on the front. A row with NaN in any objective is never
    on the front and dominates nothing.
    """
    bad = {c: d for c, d in objectives.items() if d not in ("min", "max")}
    if bad:
        raise LoraKitError(f"pareto_front objectives {bad}: each direction must be 'min' or 'max', e.g. "
                           "{'best_eval_loss': 'min', 'irrelevant_pass': 'max'}")
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise LoraKitError(f"pareto_front objectives {missing} are not columns of the table; it has "
                           f"{list(df.columns)[:30]}")
    if not objectives:
        raise LoraKitError("pareto_front needs at least one objective, e.g. {'best_eval_loss': 'min'}")
    x = df[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    x = x * np.array([1.0 if d == "min" else -1.0 for d in objectives.values()])  # everything minimised
    valid = ~np.isnan(x).any(axis=1)
    v = x[valid]
    no_worse = (v[:, None, :] <= v[None, :, :]).all(axis=2)  # [a, b]: a no worse than b everywhere
    better = (v[:, None, :] < v[None, :, :]).any(axis=2)
    on_front = valid.copy()
    on_front[valid] = ~(no_worse & better).any(axis=0)
    return pd.Series(on_front, index=df.index, name="on_front")


def frontier_table(df: pd.DataFrame) -> pd.DataFrame:
    """The runs on the study's Pareto front, as frontier.csv holds them: one row per run, lowest eval loss first.

    The front of the finished feasible runs of one setup on front_objectives (eval loss, irrelevant pass and
    hallucination in every watched probe group); with replicates, of each variant's mean over its seeds (seed_table,
    as the verdicts read them). Columns: the run's settings, `trained` (False for an evaluation-only A0), its best
    step and eval loss, each objective with its n and Wilson interval, task exact match, `run_dir` (the first seed's
    folder) and `objectives` ("best_eval_loss min; irrelevant_pass@general max; ..."). Empty when no run is feasible.
    """
    _require_one_setup(df, "frontier_table")
    done = df[df["status"].isin(FINISHED)]
    if done.get("seed") is not None and (done.groupby(done["variant"].map(replicate_of)).size() > 1).any():
        done = seed_table(done)
    feasible = done[done["feasible"].astype(bool) & _measured(done, "best_eval_loss")]
    objectives = {c: d for c, d in front_objectives(feasible).items() if c in feasible}
    front = feasible[pareto_front(feasible, objectives)].copy()
    front["trained"] = front.index.isin(_trained(front).index)
    front["objectives"] = "; ".join(f"{c} {d}" for c, d in objectives.items())
    rates = [f"{c}{end}" for c in [*objectives, "task_exact_match"] if c in front
             for end in ("", "_n", "_lo", "_hi") if f"{c}{end}" in front and c != "best_eval_loss"]
    keep = ["variant", "derived_from", "trained", "llm_last", "vit_last", "model", "lora_rank", "learning_rate",
            "vit_lr", "seed", "trainable_parameters", "best_step", "best_eval_loss", *rates, "run_dir", "setup",
            "objectives"]
    return front.reindex(columns=keep).sort_values("best_eval_loss", kind="stable").reset_index(drop=True)


def plot_frontier(df: pd.DataFrame, x: str = "best_eval_loss", y: str = "irrelevant_pass@general", ax=None):
    """Finished runs as points with Wilson error bars, labelled by variant; the Pareto front of the feasible
    runs connected and marked; runs without a feasible checkpoint hollow (their last evaluation)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    _require_one_setup(df, "plot_frontier")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    data = df[df["status"].isin(FINISHED)].copy()
    data = data[_measured(data, x) & _measured(data, y)]
    data[[x, y]] = data[[x, y]].astype(float)
    feasible = data["feasible"].astype(bool)
    front = pareto_front(data[feasible], {x: direction(x) or "min", y: direction(y) or "max"})
    on_front = front.reindex(data.index, fill_value=False)
    ax.errorbar(data[x], data[y], xerr=_error_bars(data, x), yerr=_error_bars(data, y), fmt="none",
                ecolor="0.6", elinewidth=1, capsize=2, zorder=1)
    line = data[on_front].sort_values([x, y])
    ax.plot(line[x], line[y], "-", c="C1", lw=1.5, zorder=2)
    ax.scatter(data.loc[feasible & ~on_front, x], data.loc[feasible & ~on_front, y], c="C0", s=40, zorder=3)
    ax.scatter(line[x], line[y], c="C1", edgecolors="k", s=80, zorder=4)
    ax.scatter(data.loc[~feasible, x], data.loc[~feasible, y], facecolors="none", edgecolors="C3", marker="s",
               s=50, zorder=3)
    labels = [ax.text(r[x], r[y], r["variant"], fontsize=8) for _, r in data.iterrows()]
    if labels:  # runs with near-equal metrics (C2 and C3, B2 and B3) would print their names on top of each other
        from adjustText import adjust_text

        adjust_text(labels, ax=ax, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})
    ax.set_xlabel(f"{title(x)} ({_better(x)})")
    ax.set_ylabel(f"{title(y)} ({_better(y)})")
    ax.set_title(f"{title(y)}\nvs {title(x)}: Pareto front of feasible runs", fontsize=10)
    ax.legend(handles=[
        Line2D([], [], marker="o", ls="", c="C0", label="feasible run (best checkpoint)"),
        Line2D([], [], marker="o", ls="-", c="C1", mec="k", label="Pareto front"),
        Line2D([], [], marker="s", ls="", mfc="none", mec="C3", label="no feasible checkpoint (last evaluation)"),
        Line2D([], [], marker="|", ls="-", c="0.6", label="whiskers: Wilson 95% interval of a rate"),
    ], fontsize=7)
    if not len(data):
        ax.text(0.5, 0.5, "no finished run has both metrics", ha="center", transform=ax.transAxes)
    return ax


def _error_bars(data: pd.DataFrame, col: str):
    """[below, above] distances to the Wilson interval, or None for a column without one."""
    lo, hi = f"{col}_lo", f"{col}_hi"
    if lo not in data or hi not in data:
        return None
    v = data[col].astype(float)
    below = (v - pd.to_numeric(data[lo], errors="coerce")).clip(lower=0).fillna(0)
    above = (pd.to_numeric(data[hi], errors="coerce") - v).clip(lower=0).fillna(0)
    return np.vstack([below.to_numpy(), above.to_numpy()])


def _better(col: str) -> str:
    return {"min": "lower is better", "max": "higher is better"}.get(direction(col), "")


# ---------------------------------------------------------------- the other figures

def plot_heatmaps(df: pd.DataFrame, metrics=None, *, loss_tolerance: float = LOSS_TOLERANCE):
    """Each metric over llm_last x vit_last for the study runs (the most common settings; * = infeasible);
    `metrics` defaults to eval loss and the table's heatmap metrics in every watched probe group.

    Noise is shown as the verdicts judge it (hypothesis_verdicts): a cell marked ≈ is not distinguishable
    from the best cell of its panel (rates: Wilson 95% intervals overlap; losses: within `loss_tolerance`,
    relative, of the best, or overlapping seed intervals). A rate's colour bar spans 0 to 1; any other
    metric's spans at least `loss_tolerance` of its best value, so differences within noise never take the
    whole colour map."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    _require_one_setup(df, "plot_heatmaps")
    if metrics is None:
        metrics = ["best_eval_loss"] + columns("heatmap", study_probes(df))
    data = _reference_runs(df).drop_duplicates(["llm_last", "vit_last"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        values = pd.to_numeric(data[m], errors="coerce") if m in data else pd.Series(np.nan, index=data.index)
        near, best = near_best(data.assign(**{m: values}), m, loss_tolerance), _best_index(values, m)
        cells = data.assign(value=values, text=[
            ("" if not _finite(v) else f"{v:.0%}" if is_rate(m) else f"{v:.3f}") + ("" if f else "*")
            + ("\n≈best" if close and i != best else "")
            for i, v, f, close in zip(values.index, values, data["feasible"], near)])
        grid = cells.pivot(index="llm_last", columns="vit_last", values="value") if len(cells) else pd.DataFrame()
        if grid.isna().all().all():
            ax.text(0.5, 0.5, f"no {m} values", ha="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        text = cells.pivot(index="llm_last", columns="vit_last", values="text").reindex_like(grid).fillna("")
        # the "good" end of the colour map is the same colour whichever way the metric points
        sns.heatmap(grid.astype(float), annot=text.to_numpy(), fmt="", ax=ax, annot_kws={"fontsize": 8},
                    cmap="viridis" if direction(m) == "max" else "viridis_r", cbar=True,
                    **colour_limits(values, m, loss_tolerance))
        ax.invert_yaxis()
        ax.set_title(f"{title(m)}\n({_better(m)})", fontsize=9)
    fig.suptitle("metrics over llm_last (rows) x vit_last (columns); * = no feasible checkpoint (last evaluation); "
                 f"≈best = within noise of the panel's best (rates: Wilson 95% intervals overlap; losses: "
                 f"within {loss_tolerance:.0%})", fontsize=9)
    fig.tight_layout()
    return fig


def _best_index(values: pd.Series, m: str):
    finite = values[values.map(_finite)]
    if finite.empty:
        return None
    return finite.idxmin() if (direction(m) or "min") == "min" else finite.idxmax()


def near_best(data: pd.DataFrame, m: str, loss_tolerance: float = LOSS_TOLERANCE) -> pd.Series:
    """Per row of `data`: True where metric `m` is not distinguishable from the best row's (the verdicts'
    noise rule, _compare), the best row itself included; False where it differs or is not measured."""
    values = pd.to_numeric(data[m], errors="coerce") if m in data else pd.Series(np.nan, index=data.index)
    best = _best_index(values, m)
    if best is None:
        return pd.Series(False, index=data.index)
    ref = data.loc[best]
    return pd.Series([_compare(ref, row, m, direction(m) or "min", loss_tolerance) == "same"
                      for _, row in data.iterrows()], index=data.index)


def colour_limits(values: pd.Series, m: str, loss_tolerance: float = LOSS_TOLERANCE) -> dict:
    """vmin/vmax for a heatmap of `values`: 0 to 1 for a rate; otherwise the values' range widened to at
    least `loss_tolerance` x |best| (so that 0.232 against 0.235, within a 2% tolerance, is not painted as
    the map's two ends); {} when nothing is finite."""
    if is_rate(m):
        return {"vmin": 0.0, "vmax": 1.0}
    finite = values[values.map(_finite)].astype(float)
    if finite.empty:
        return {}
    lo, hi = float(finite.min()), float(finite.max())
    width = loss_tolerance * abs(lo if (direction(m) or "min") == "min" else hi)
    if hi - lo >= width:
        return {"vmin": lo, "vmax": hi}
    return {"vmin": lo, "vmax": lo + width} if (direction(m) or "min") == "min" else {"vmin": hi - width, "vmax": hi}


def _reference_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Finished runs with the study's common settings (leaves out LR-grid and restart runs)."""
    done = df[df["status"].isin(FINISHED)]
    if done.empty:
        return done
    keys = done.apply(_controls_key, axis=1)
    common = keys.value_counts().idxmax()
    return done[keys.map(lambda k: k == common).astype(bool)]  # not `keys == common`: pandas would unpack the tuple


def _controls_key(row) -> tuple:
    return tuple(None if not isinstance(row.get(c), str) and not _finite(row.get(c)) else row.get(c)
                 for c in CONTROLS)


def run_curves(runs) -> dict[str, tuple[pd.DataFrame, dict]]:
    """variant -> (metrics table by step, summary.json) for a runs folder or a collect_runs table."""
    folders = (sorted(d for d in Path(runs).iterdir() if (d / "summary.json").is_file())
               if not isinstance(runs, pd.DataFrame) else [Path(p) for p in runs["run_dir"].dropna()])
    out = {}
    for d in folders:
        mf = metrics_frame(d)
        if not mf.empty:  # a resumed run may hold a step twice; the later record counts
            mf = mf.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
        summary = _read_json(d / "summary.json") or {}
        out[summary.get("variant") or d.name] = (mf, summary)
    return out


def plot_curves(runs, metrics=None):
    """Training and guardrail curves of every run on shared axes; X = where a guardrail stopped it, * = best.
    `metrics` defaults to the table's curve metrics, a probe metric in every watched group (a grid of panels)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    curves = run_curves(runs)
    if metrics is None:
        probes = study_probes(runs) if isinstance(runs, pd.DataFrame) else _curve_probes(curves)
        metrics = columns("curves", probes)
    ncols = min(4, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False, sharex=True)
    axes = axes.reshape(1, -1)
    for ax in axes[0][len(metrics):]:
        ax.set_axis_off()
    colours = {v: plt.get_cmap("tab20")(i % 20) for i, v in enumerate(curves)}
    for ax, m in zip(axes[0], metrics):
        for variant, (mf, summary) in curves.items():
            if m not in mf or mf[m].isna().all():
                continue
            ax.plot(mf["step"], mf[m], marker=".", c=colours[variant], label=variant)
            for step, _ in stage_boundaries(summary):  # a staged run: where each later stage began
                ax.axvline(step, c=colours[variant], ls="--", lw=0.8, alpha=0.7)
            for step, marker, size in ((summary.get("stop_step"), "X", 80),
                                       ((summary.get("best") or {}).get("step"), "*", 120)):
                at = mf[mf["step"] == step]
                if step is not None and len(at):
                    ax.scatter(at["step"], at[m], marker=marker, s=size, color=colours[variant], edgecolors="k",
                               zorder=3)
        ax.set_xlabel("step")
        ax.set_title(f"{title(m)}\n({_better(m)})", fontsize=9)
    handles = [Line2D([], [], c=c, marker=".", label=v) for v, c in colours.items()]
    handles += [Line2D([], [], marker="X", ls="", c="0.5", mec="k", label="guardrail stop"),
                Line2D([], [], marker="*", ls="", c="0.5", mec="k", ms=10, label="best checkpoint")]
    if any(stage_boundaries(summary) for _, summary in curves.values()):
        handles.append(Line2D([], [], ls="--", c="0.5", label="next stage begins"))
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return fig


def _curve_probes(curves: dict) -> list[str]:
    """The watched probe groups of some runs' curves (their summaries' guardrail_probes, else every group)."""
    named = [p for _, summary in curves.values() for p in summary.get("guardrail_probes") or []]
    found = [split_column(c)[1] for mf, _ in curves.values() for c in mf.columns
             if c.startswith("irrelevant_pass@") and not c.endswith(("_n", "_lo", "_hi"))]
    return list(dict.fromkeys(named or found))


def plot_restart(runs, metrics=None):
    """Stage-3 continue (e.g. C2) against stage-2 restart (C2_restart): their curves side by side; None
    when no '<variant>_restart' run has its '<variant>' partner."""
    import matplotlib.pyplot as plt

    curves = run_curves(runs)
    pairs = [(v.removesuffix("_restart"), v) for v in curves
             if v.endswith("_restart") and v.removesuffix("_restart") in curves]
    if not pairs:
        return None
    if metrics is None:
        metrics = columns("curves", _curve_probes(curves))
    fig, axes = plt.subplots(len(pairs), len(metrics), figsize=(4.5 * len(metrics), 3.8 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        for ax, m in zip(row, metrics):
            for variant, c in zip(pair, ("C0", "C1")):
                mf = curves[variant][0]
                if m not in mf:
                    continue
                ax.plot(mf["step"], mf[m], marker=".", c=c, label=variant)
                if f"{m}_lo" in mf:
                    ax.fill_between(mf["step"], mf[f"{m}_lo"].astype(float), mf[f"{m}_hi"].astype(float),
                                    color=c, alpha=0.15)
            ax.set_xlabel("step")
            ax.set_title(f"{title(m)}\n({_better(m)})", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle("stage-3 continue vs stage-2 restart (bands: Wilson 95%)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- replicates across seeds

_SEED_SUFFIX = re.compile(r"_seed\d+$")


def replicate_of(variant: str) -> str:
    """The variant a replicate run belongs to: `C2_seed43` -> `C2` (matrix --seeds names them so)."""
    return _SEED_SUFFIX.sub("", str(variant))


def seed_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per variant over its seeds: each metric's mean with a 95% t-interval across seeds (`_lo`,
    `_hi`; a rate's interval also covers the Wilson interval of its counts pooled over the seeds), `n_seeds`,
    and `frontier_share`: in how many of the seeds the variant
    was on that seed's Pareto front (front_objectives among the feasible runs of that seed, A0 included).
    With one seed a variant keeps its own row, its rates' Wilson intervals and no loss interval."""
    from scipy import stats

    done = df[df["status"].isin(FINISHED)].copy()
    done["replicate_of"] = done["variant"].map(replicate_of)
    objectives = front_objectives(done)
    on_front = pd.Series(False, index=done.index)
    trained_seeds = sorted(done.loc[done.get("trainable_parameters", 1) != 0, "seed"].dropna().unique())
    for seed in trained_seeds:
        study = done[(done["seed"] == seed) | (done.get("trainable_parameters", 1) == 0)]
        feasible = study[study["feasible"].astype(bool)]
        if set(objectives) <= set(feasible.columns):
            on_front = on_front | pareto_front(feasible, objectives).reindex(done.index, fill_value=False)
    done["_on_front"] = on_front
    metric_cols = [c for c in done.columns if metric_of(c) is not None and not c.endswith(("_n", "_lo", "_hi"))]
    rows = []
    for name, group in done.groupby("replicate_of", sort=False):
        first = group.iloc[0]
        row = first.to_dict() | {"variant": name, "n_seeds": len(group),
                                 "seeds": ",".join(str(int(x)) for x in group["seed"].dropna()),
                                 "frontier_share": f"{int(group['_on_front'].sum())}/{len(group)}",
                                 "feasible": bool(group["feasible"].astype(bool).all())}
        if len(group) > 1:
            for col in metric_cols:
                values = pd.to_numeric(group[col], errors="coerce").dropna()
                if len(values) < 2:
                    continue
                mean, half = values.mean(), stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / len(values) ** 0.5
                lo, hi = mean - half, mean + half
                if is_rate(col):
                    # seeds that agree give a t-interval of width 0, which is no evidence of precision: a rate's
                    # interval is at least the Wilson interval of the pooled counts (k and n summed over seeds)
                    n = pd.to_numeric(group.get(f"{col}_n"), errors="coerce")
                    k = (pd.to_numeric(group[col], errors="coerce") * n).round().sum()
                    pooled = wilson_interval(int(k), int(n.sum())) if n.notna().all() and n.sum() > 0 else (lo, hi)
                    lo, hi = max(0.0, min(lo, pooled[0])), min(1.0, max(hi, pooled[1]))
                    row[f"{col}_n"] = n.sum()
                row |= {col: mean, f"{col}_lo": lo, f"{col}_hi": hi, f"{col}_sd": values.std(ddof=1)}
        rows.append(row)
    return pd.DataFrame(rows).drop(columns=["_on_front", "replicate_of"], errors="ignore")


# ---------------------------------------------------------------- hypotheses

STATEMENTS = {
    "H1": "More LoRA beyond a small top subset loses language generality fast and raises hallucination.",
    "H2": "A narrow best footprint per tower exists.",
    "H3": "The target count dominates modest learning-rate changes.",
    "H4": "Continued training helps only while general metrics hold.",
}


def hypothesis_verdicts(df: pd.DataFrame, curves: dict | None = None, *,
                        loss_tolerance: float = LOSS_TOLERANCE) -> list[dict]:
    """A verdict for each hypothesis of the plan, computed from the runs: supported / not supported / not
    enough data (or, for H3, not tested: no run of a learning-rate sweep yet), with the numbers behind it.

    Noise: two rates differ only when their Wilson 95% intervals do not overlap; two losses only when
    they differ by more than `loss_tolerance` (relative, 0.02 = 2%). Only finished runs count.
    `curves` (variant -> (metrics table, summary)) defaults to reading the run folders in df["run_dir"].
    When variants were run under several seeds, the verdicts read seed_table(df): each variant's mean over
    its seeds, and two means differ only when their 95% intervals across seeds do not overlap.
    """
    _require_one_setup(df, "hypothesis_verdicts")
    done = df[df["status"].isin(FINISHED)]
    if done.get("seed") is not None and (done.groupby(done["variant"].map(replicate_of)).size() > 1).any():
        done = seed_table(done)
    if curves is None:
        curves = run_curves(done) if "run_dir" in done and done["run_dir"].notna().any() else {}
    checks = {"H1": _h1, "H2": _h2, "H3": _h3}
    out = [{"hypothesis": h, "statement": STATEMENTS[h], **checks[h](done, loss_tolerance)} for h in checks]
    out.append({"hypothesis": "H4", "statement": STATEMENTS["H4"], **_h4(done, curves, loss_tolerance)})
    return out


def _verdict(verdict: str, evidence: str) -> dict:
    return {"verdict": verdict, "evidence": evidence}


def _trained(df: pd.DataFrame) -> pd.DataFrame:
    counts = df[["n_llm_modules", "n_vit_modules"]].apply(pd.to_numeric, errors="coerce")
    lasts = df[["llm_last", "vit_last"]].apply(pd.to_numeric, errors="coerce")
    total = counts.sum(axis=1).where(counts.notna().any(axis=1), lasts.sum(axis=1))
    return df[total > 0]


def _compare(a, b, metric: str, direction: str, tol: float) -> str | None:
    """How run b stands against run a on one metric: 'worse', 'better', 'same' (within noise) or None."""
    if not (_finite(a.get(metric)) and _finite(b.get(metric))):
        return None
    if is_rate(metric):
        alo, ahi, blo, bhi = (a.get(f"{metric}_lo"), a.get(f"{metric}_hi"), b.get(f"{metric}_lo"),
                              b.get(f"{metric}_hi"))
        if not all(map(_finite, (alo, ahi, blo, bhi))):
            return None
        higher, lower = blo > ahi, bhi < alo  # intervals apart
    elif all(_finite(r.get(f"{metric}_{end}")) for r in (a, b) for end in ("lo", "hi")):
        # a loss with an interval: the spread across seeds of replicated runs (seed_table)
        higher, lower = b[f"{metric}_lo"] > a[f"{metric}_hi"], b[f"{metric}_hi"] < a[f"{metric}_lo"]
    else:
        diff = float(b[metric]) - float(a[metric])
        higher = lower = False
        if abs(diff) > tol * abs(float(a[metric])):
            higher, lower = diff > 0, diff < 0
    if not (higher or lower):
        return "same"
    return "worse" if higher == (direction == "min") else "better"


def _show(row, metric: str) -> str:
    v = row.get(metric)
    if not _finite(v):
        return "n/a"
    if is_rate(metric):
        return f"{v:.0%} [{row.get(metric + '_lo', float('nan')):.0%}-{row.get(metric + '_hi', float('nan')):.0%}]"
    return f"{v:.3f}"


def _footprint_pairs(runs: pd.DataFrame) -> list[tuple]:
    """(smaller, larger) trained runs with equal settings where the larger adds layers in one tower only:
    the next larger count tried in that tower (A1->A2, B2->B3, C1->C2, B1->C1, ...)."""
    pairs = []
    keyed = runs.assign(_key=runs.apply(_controls_key, axis=1))
    for _, group in keyed.groupby("_key", dropna=False, sort=False):
        for tower, other in (("llm_last", "vit_last"), ("vit_last", "llm_last")):
            for _, line in group.groupby(other):
                line = line.drop_duplicates(tower).sort_values(tower)
                rows = [r for _, r in line.iterrows()]
                pairs += list(zip(rows, rows[1:]))
    return pairs


def _h1(done: pd.DataFrame, tol: float) -> dict:
    pairs = _footprint_pairs(_trained(done))
    if not pairs:
        return _verdict("not enough data", "No two finished trained runs with equal settings differ in one tower's "
                        "count; needed: e.g. A1 and A2, B2 and B3, or C1, C2 and C3.")
    outcomes = [(a, b, {m: _compare(a, b, m, d, tol) for m, d in generality(done).items()}) for a, b in pairs]
    measured = [o for o in outcomes if any(v is not None for v in o[2].values())]
    if not measured:
        return _verdict("not enough data", f"{len(pairs)} footprint comparisons, but none has general_loss, "
                        "irrelevant_pass or hallucination measured on both runs.")
    degraded = [o for o in measured if "worse" in o[2].values()]
    moved = [o for o in measured if set(o[2].values()) & {"worse", "better"}]
    hallucinating = [o for o in degraded if any(v == "worse" for m, v in o[2].items()
                                                if split_column(m)[0] == "hallucination")]
    examples = "; ".join(
        f"{a['variant']}->{b['variant']}: " + ", ".join(f"{m} {_show(a, m)}->{_show(b, m)}"
                                                       for m, v in c.items() if v == "worse" or not degraded and v)
        for a, b, c in (degraded or measured)[:3])
    if not moved:
        return _verdict("not enough data", f"All {len(measured)} footprint increases stay within noise (Wilson 95% "
                        f"intervals overlap, losses within {tol:.0%}), e.g. {examples}; a larger benchmark "
                        "(eval_max_samples) or more variants would be needed.")
    verdict = "supported" if 2 * len(degraded) >= len(measured) else "not supported"
    return _verdict(verdict, f"{len(degraded)} of {len(measured)} footprint increases degraded generality beyond "
                    f"noise ({len(hallucinating)} raised hallucination): {examples}.")


def _h2(done: pd.DataFrame, tol: float) -> dict:
    reference = _reference_runs(done)
    trained = _trained(reference)
    feasible = trained[trained["feasible"].astype(bool) & _measured(trained, "best_eval_loss")]
    if feasible.empty:
        return _verdict("not enough data", "No finished trained run has a feasible checkpoint; needed: the study "
                        "variants (A1, A2, B2, B3, C2, C3) run to completion.")
    front = feasible[pareto_front(feasible, front_objectives(feasible))]
    if front.empty:
        return _verdict("not enough data", "No feasible run has eval loss, irrelevant pass and hallucination all "
                        "measured, so none is on the frontier; needed: a benchmark with irrelevant and OOD images.")
    lowest = front["best_eval_loss"].astype(float).min()  # = over feasible runs with every objective measured
    near = front[front["best_eval_loss"].astype(float) <= lowest + tol * abs(lowest)]
    size = near[["llm_last", "vit_last"]].astype(float).sum(axis=1)
    r = near.assign(_size=size).sort_values(["_size", "best_eval_loss"]).iloc[0]
    tried = {t: sorted(int(v) for v in trained[t].dropna().unique()) for t in ("llm_last", "vit_last")}
    towers = []
    for t, name in (("llm_last", "decoder"), ("vit_last", "vision")):
        if len(tried[t]) < 2:
            towers.append((name, "unvaried"))
        else:
            towers.append((name, "narrow" if r[t] < max(tried[t]) else "widest"))
    where = (f"{r['variant']} (llm_last={int(r['llm_last'])}, vit_last={int(r['vit_last'])}) is the smallest "
             f"feasible frontier footprint within {tol:.0%} of the lowest eval loss ({r['best_eval_loss']:.3f} vs "
             f"{lowest:.3f}); tried llm_last {tried['llm_last']}, vit_last {tried['vit_last']}.")
    widest = [n for n, s in towers if s == "widest"]
    unvaried = [n for n, s in towers if s == "unvaried"]
    if widest:
        return _verdict("not supported", where + f" It uses the most {' and '.join(widest)} layers tried.")
    if unvaried:
        return _verdict("not enough data", where + f" Only one {' and '.join(unvaried)} count was tried; needed: "
                        "runs that vary it (A1/A2 for the decoder, B2/B3 or C1-C3 for vision).")
    return _verdict("supported", where + " Wider footprints in either tower buy no eval loss beyond that.")


MODEST_LR = 2.0  # a modest learning-rate change: by at most this factor either way (the follow-up's x0.5, x2)
NOT_TESTED = ("run `python -m lora_kit next` (a sweep around the frontier's winners, learning rates x0.5 / x2 among "
              "it) then `python -m lora_kit matrix --params-dir outputs/next` and the summary again")


def _h3(done: pd.DataFrame, tol: float) -> dict:
    """Target count against modest learning-rate changes, around each footprint trained at several learning rates.

    An anchor is such a footprint's run at the learning rates (learning_rate, vit_lr) most footprints were trained
    at; its LR changes are its footprint's runs at learning rates within MODEST_LR of its own, its count changes
    the runs at its learning rates whose footprint differs in one tower (same model and rank). Per metric, when
    either side moved beyond noise (_compare), the larger move (a rate's change, a loss's difference) wins if it
    exceeds the other by more than the noise (half the anchor's interval, or loss_tolerance of its loss); else the
    two are comparable. Task fit (eval loss, task exact match) and generality (general loss, irrelevant pass,
    hallucination) each go to the side that wins more of their moved metrics than the other side and the
    comparable ones together, else to neither. Supported when count takes every family that moved; not supported
    otherwise; not tested without any modest LR change.
    """
    trained = _trained(done)
    trained = trained[_measured(trained, "best_eval_loss")]
    if "stages" in trained:  # a progressive-unfreezing run trains several footprints in turn
        trained = trained[trained["stages"].isna()]
    rows = [r for _, r in trained.iterrows()]
    footprint = lambda r: (r["llm_last"], r["vit_last"])  # noqa: E731
    lrs = lambda r: (_num(r.get("learning_rate")), _num(r.get("vit_lr")))  # noqa: E731
    base = lambda r: (r.get("model"), _num(r.get("lora_rank")))  # noqa: E731
    spread = {}  # learning rates -> footprints trained at them
    for r in rows:
        spread.setdefault((base(r), lrs(r)), set()).add(footprint(r))
    lr_pairs, count_pairs, too_far = [], [], 0
    for key in dict.fromkeys((base(r), footprint(r)) for r in rows):
        group = [r for r in rows if (base(r), footprint(r)) == key]
        if len({lrs(r) for r in group}) < 2:
            continue
        anchor = max(group, key=lambda r: len(spread[(base(r), lrs(r))]))  # first of the most common LRs
        for r in group:
            if lrs(r) == lrs(anchor):
                continue
            if _lr_factor(lrs(anchor), lrs(r)) <= MODEST_LR * (1 + 1e-9):
                lr_pairs.append((anchor, r))
            else:
                too_far += 1
        if any(a is anchor for a, _ in lr_pairs):
            count_pairs += [(anchor, r) for r in rows if base(r) == base(anchor) and lrs(r) == lrs(anchor)
                            and sum(x != y for x, y in zip(footprint(r), footprint(anchor))) == 1]
    if not lr_pairs:
        beyond = f" ({too_far} learning-rate changes beyond x{MODEST_LR:g} left out)" if too_far else ""
        return _verdict("not tested", f"No footprint was trained at a modest learning-rate change (x{1 / MODEST_LR:g}"
                        f" to x{MODEST_LR:g}) of its learning rates{beyond}: {NOT_TESTED}.")
    anchors = list(dict.fromkeys(a["variant"] for a, _ in lr_pairs))
    pair_text = lambda pairs: ", ".join(f"{a['variant']}->{b['variant']}" for a, b in pairs)  # noqa: E731
    head = (f"Around {', '.join(anchors)}: {len(lr_pairs)} modest learning-rate changes ({pair_text(lr_pairs)}) and "
            f"{len(count_pairs)} one-tower target-count changes at the same learning rates"
            + (f" ({pair_text(count_pairs)})." if count_pairs else "."))
    if not count_pairs:
        return _verdict("not enough data", head + f" Needed: runs of another footprint at {anchors[0]}'s learning "
                        "rates (the study's variants, or the follow-up's llm_last-1 variant).")
    families = {"task fit": ["best_eval_loss"] + (["task_exact_match"] if "task_exact_match" in done else []),
                "generality": list(generality(done))}
    found, winners = [], {}
    for family, metrics in families.items():
        tally = {"count": 0, "LR": 0, "comparable": 0}
        for m in metrics:
            d = direction(m) or "min"
            moves = {side: [(abs(float(b[m]) - float(a[m])), _compare(a, b, m, d, tol), a, b) for a, b in pairs
                            if _finite(a.get(m)) and _finite(b.get(m))]
                     for side, pairs in (("count", count_pairs), ("LR", lr_pairs))}
            if not moves["count"] or not moves["LR"]:
                continue
            top = {side: max(ms, key=lambda x: x[0]) for side, ms in moves.items()}
            moved = any(c in ("worse", "better") for ms in moves.values() for _, c, _, _ in ms)
            gap = top["count"][0] - top["LR"][0]
            side = (None if not moved else "comparable" if abs(gap) <= _noise(top["count"][2], m, tol)
                    else "count" if gap > 0 else "LR")
            if side:
                tally[side] += 1
            found.append(f"{m} moves {top['count'][0]:.3g} by count ({_move(top['count'], m)}) vs "
                         f"{top['LR'][0]:.3g} by LR ({_move(top['LR'], m)}): "
                         + ("within noise" if not side else "comparable" if side == "comparable" else f"{side} larger"))
        if sum(tally.values()):
            others = lambda side: sum(v for k, v in tally.items() if k != side)  # noqa: E731
            winners[family] = next((side for side in ("count", "LR") if tally[side] > others(side)), None)
    evidence = head + " " + "; ".join(found) + "."
    if not winners:
        return _verdict("not enough data", evidence + f" Nothing moved beyond noise (Wilson 95% intervals overlap, "
                        f"losses within {tol:.0%}); a larger benchmark (eval_max_samples) would be needed.")
    told = ", ".join(f"{side} dominates {family}" if side else f"count and LR move {family} comparably"
                     for family, side in winners.items())
    if any(side != "count" for side in winners.values()):
        return _verdict("not supported", evidence + f" So: {told}.")
    return _verdict("supported", evidence + f" So: {told}.")


def _noise(row, metric: str, tol: float) -> float:
    """How far apart two moves of `metric` from `row` must be to differ: half its interval (a rate's Wilson
    interval, or a seed-replicated loss's), else `tol` of its value."""
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    if _finite(lo) and _finite(hi):
        return (float(hi) - float(lo)) / 2
    return tol * abs(float(row[metric]))


def _num(x) -> float | None:
    return float(x) if _finite(x) else None


def _lr_factor(a: tuple, b: tuple) -> float:
    """The largest factor between two runs' learning rates, either way (a missing one counts as unchanged)."""
    return max([max(y / x, x / y) for x, y in zip(a, b) if x and y] or [1.0])


def _move(move: tuple, metric: str) -> str:
    _, _, a, b = move
    n = lambda r: f" n={int(r[metric + '_n'])}" if _finite(r.get(metric + "_n")) else ""  # noqa: E731
    return f"{a['variant']} {_show(a, metric)}{n(a)} -> {b['variant']} {_show(b, metric)}{n(b)}"


def _h4(done: pd.DataFrame, curves: dict, tol: float) -> dict:
    runs = _trained(done)["variant"].tolist()
    watched = generality(done)
    informative, held, kept, stalled = [], [], [], []
    for variant in runs:
        mf, summary = curves.get(variant, (pd.DataFrame(), {}))
        if mf.empty or "eval_loss" not in mf:
            continue
        moved = summary.get("first_bad_steps")
        if moved is not None:  # the run's own guardrails: the first evaluation any of them found bad
            first = min(moved.values(), default=None)
            degraded = [i for i in range(1, len(mf)) if first is not None and int(mf["step"].iloc[i]) >= first]
        else:  # a run from before first_bad_steps: the first evaluation worse than step 0 beyond noise
            start = mf.iloc[0]
            degraded = [i for i in range(1, len(mf))
                        if any(_compare(start, mf.iloc[i], m, d, tol) == "worse" for m, d in watched.items())]
        if not degraded:
            held.append(variant)
            continue
        i = degraded[0]
        after = mf["eval_loss"].iloc[i + 1:].astype(float)
        if after.empty:
            continue  # degraded at its last evaluation: nothing after to compare with
        at = float(mf["eval_loss"].iloc[i])
        row = (variant, int(mf["step"].iloc[i]), at, float(after.min()))
        informative.append(row)
        (kept if after.min() < at - tol * abs(at) else stalled).append(row)
    if not informative:
        return _verdict("not enough data", f"No run has evaluations after its first guardrail movement "
                        f"({len(held)} runs held throughout: {', '.join(held) or 'none'}); needed: a wide variant "
                        "(e.g. C3) trained past its guardrail triggers with early_stopping: false.")
    show = lambda rows: "; ".join(f"{v} from step {s}: {a:.3f}->{b:.3f}" for v, s, a, b in rows[:3])  # noqa: E731
    if 2 * len(stalled) >= len(informative):
        return _verdict("supported", f"In {len(stalled)} of {len(informative)} runs eval loss stopped improving "
                        f"(by more than {tol:.0%}) once a guardrail first moved ({show(stalled)}).")
    return _verdict("not supported", f"In {len(kept)} of {len(informative)} runs eval loss kept improving after "
                    f"a guardrail first moved ({show(kept)}): task fit still grows while generality falls.")


# ---------------------------------------------------------------- everything at once

# ---------------------------------------------------------------- does KL predict forgetting?

def kl_prediction(curves: dict) -> dict:
    """Across the study's runs: does the KL to the start model at one evaluation predict the guardrail
    movement up to the next one? A Spearman rank correlation with its n and p-value.

    Each pair is one run, one probe group and one evaluation i after step 0 with a next evaluation i+1:
    x = kl_base@probe at i; y = forgetting from i to i+1, the drop in irrelevant pass plus the rise in
    hallucination (rates, so y > 0 = the guardrails moved toward a trigger). y is the change after i, not
    the level at i, so it is not information KL already had. `curves`: run_curves' answer.
    Returns {"rho", "p", "n", "runs", "definition"}; rho and p are None with fewer than 3 pairs or no spread.
    """
    import math as _math

    from scipy import stats

    xs, ys, runs = [], [], set()
    for variant, (mf, _) in curves.items():
        if mf.empty or "step" not in mf:
            continue
        mf = mf[mf["step"] > 0].reset_index(drop=True)
        for col in [c for c in mf.columns if split_column(c)[0] == "kl_base" and split_column(c)[1]]:
            probe = split_column(col)[1]
            irr, hal = mf.get(column("irrelevant_pass", probe)), mf.get(column("hallucination", probe))
            for i in range(len(mf) - 1):
                kl = mf[col].iloc[i]
                parts = []
                if irr is not None:
                    parts.append(irr.iloc[i] - irr.iloc[i + 1])
                if hal is not None:
                    parts.append(hal.iloc[i + 1] - hal.iloc[i])
                y = sum(parts) if parts else _math.nan
                if _finite(kl) and _finite(y):
                    xs.append(float(kl))
                    ys.append(float(y))
                    runs.add(variant)
    rho = p = None
    if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
        res = stats.spearmanr(xs, ys)
        rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": rho, "p": p, "n": len(xs), "runs": len(runs),
            "definition": "Spearman(kl_base@probe at evaluation i, irrelevant-pass drop + hallucination rise "
                          "from i to i+1), pooled over runs, probe groups and evaluations after step 0"}


def write_summary(runs_root=None, out_dir=None, setup: str | None = None, *, log=print) -> dict[str, Path]:
    """The table of every run (study.csv, with its setup), the runs left out of the comparison and why
    (left_out.csv), the figures (PNG) and verdicts.json of one setup (see one_setup) under out_dir (default
    outputs/summary). The restart figure pairs a variant with its stage-2 restart, whose model differs by design."""
    import matplotlib

    if not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = runs_dir(runs_root)
    df = collect_runs(root)
    if df.empty:
        raise LoraKitError(f"no run folders with a summary.json under {root}; run variants first "
                           "(python -m lora_kit matrix) or pass runs_root")
    study, left_out = one_setup(df, setup)
    log(setup_note(study, left_out))
    out = Path(out_dir) if out_dir else outputs_dir() / "summary"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "study.csv", "left_out": out / "left_out.csv", "frontier": out / "frontier.csv"}
    df.to_csv(paths["table"], index=False)
    left_out.to_csv(paths["left_out"], index=False)
    frontier_table(study).to_csv(paths["frontier"], index=False)  # what `python -m lora_kit next` sweeps around

    def save(name: str, fig) -> None:
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110, bbox_inches="tight")
        plt.close(fig)

    probes = study_probes(study) or ["general"]
    for name, metric in (("frontier_irrelevant", "irrelevant_pass"), ("frontier_hallucination", "hallucination")):
        fig, axes = plt.subplots(1, len(probes), figsize=(7 * len(probes), 5), squeeze=False)
        for ax, probe in zip(axes[0], probes):  # one panel per watched probe group
            plot_frontier(study, "best_eval_loss", column(metric, probe), ax=ax)
        fig.tight_layout()
        save(name, fig)
    save("heatmaps", plot_heatmaps(study))
    save("curves", plot_curves(study))
    restart = plot_restart(df)
    if restart is not None:
        save("restart", restart)
    if (study["variant"].map(replicate_of).value_counts() > 1).any():  # variants run under several seeds
        paths["replicates"] = out / "replicates.csv"
        seed_table(study).to_csv(paths["replicates"], index=False)
    paths["verdicts"] = out / "verdicts.json"
    paths["verdicts"].write_text(json.dumps(hypothesis_verdicts(study), indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    paths["kl_prediction"] = out / "kl_prediction.json"  # does KL at one evaluation predict later forgetting?
    paths["kl_prediction"].write_text(json.dumps(kl_prediction(run_curves(study) if "run_dir" in study else {}),
                                                 indent=2) + "\n", encoding="utf-8")
    return paths
