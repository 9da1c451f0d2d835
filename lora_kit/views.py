"""What the notebooks show: parameter handling, the target table, run curves and guardrail plots."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .metrics import BY_NAME, column, probe_metrics, shown, title
from .rundir import RunFolder, read_jsonl_records


_NOTEBOOK_NAMES = ("params_file", "Optional", "RunConfig", "load_config", "notebook_overrides", "show_plan",
                   "show_run")  # what the train notebook itself defines up to its overrides cell


def notebook_overrides(namespace: dict, config_cls, before: set | None = None) -> dict:
    """The notebook parameters that were set (not None), to apply on top of the params files, checked by
    load_config like `lora_kit train -f` / `--set` checks them.

    `before`: the names defined before the parameters cell; any other plain value that appeared since (papermill's
    injected `-p` / `-y` / `-f` values) and is no parameter is passed on too, so that load_config refuses it with a
    suggestion (`learnig_rate` -> learning_rate) instead of the notebook ignoring it. A string given for a number
    (papermill reads -f / -y files as YAML 1.1, where `2e-4` is a string) is read as `--set` reads it (2e-4 -> 0.0002).
    """
    import dataclasses

    from .config import coerce_text

    fields = {f.name for f in dataclasses.fields(config_cls)}
    out = {name: coerce_text(name, namespace[name]) for name in fields if namespace.get(name) is not None}
    if before is not None:
        plain = (bool, int, float, str, list, dict, tuple, type(None))
        for name, value in namespace.items():
            if (name not in before and name not in fields and name not in _NOTEBOOK_NAMES
                    and not name.startswith("_") and isinstance(value, plain)):
                out[name] = value
    return out


def plan_table(cfg) -> pd.DataFrame:
    """The targeted modules of a config's variant (model built on the meta device: no weights read)."""
    from .targeting import find_towers, meta_model, plan_for, plan_rows
    from .toy import resolve_model

    towers = find_towers(meta_model(resolve_model(cfg.model, weights=False), cfg.trust_remote_code))
    plan = plan_for(towers, cfg.llm_last, cfg.vit_last, cfg.target_regex)
    return pd.DataFrame(plan_rows(plan, towers, cfg.lora_rank), columns=[
        "tower", "layer", "module", "parameters", "lora_parameters", "name"])


def show_plan(cfg) -> pd.DataFrame:
    table = plan_table(cfg)
    if table.empty:
        print("nothing targeted: an evaluation-only baseline run")
    else:
        print(table.groupby("tower").agg(modules=("name", "count"), layers=("layer", lambda s: sorted(set(s))),
                                         lora_parameters=("lora_parameters", "sum")).to_string())
    return table


def flatten_record(record: dict) -> dict:
    """One metrics.jsonl record as flat columns: a rate gives <m>, <m>_n, <m>_lo, <m>_hi; a probe group's
    metrics are columns <m>@<probe> (metrics.column); another dict gives <key>_<field> for its scalar
    fields; lists (captions) are left out."""
    flat = {}
    for probe, values in probe_metrics(record).items():
        flat |= flatten_record({column(m, probe): v for m, v in values.items()})
    for k, v in record.items():
        if k == "probes" or (k in BY_NAME and BY_NAME[k].scope == "probe"):
            continue  # the probe groups' metrics, flattened above
        if isinstance(v, dict) and "rate" in v:
            flat |= {k: v.get("rate"), f"{k}_n": v.get("n"), f"{k}_lo": v.get("lo"), f"{k}_hi": v.get("hi")}
        elif isinstance(v, dict):
            flat |= {f"{k}_{kk}": vv for kk, vv in v.items() if vv is None or isinstance(vv, (bool, int, float, str))}
        elif v is None or isinstance(v, (bool, int, float, str)):
            flat[k] = v
    return flat


def metrics_frame(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl as a flat table (see flatten_record)."""
    return pd.DataFrame([flatten_record(r) for r in read_jsonl_records(Path(run_dir) / "metrics.jsonl")])


def plot_run(run_dir: str | Path):
    """Loss curves and guardrail trajectories against their thresholds; saved as run_dir/curves.png."""
    import matplotlib

    matplotlib.use("Agg") if not in_notebook() else None
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    df = metrics_frame(run_dir)
    run = RunFolder(run_dir)
    summary, params = run.summary(), run.params()["config"]
    base = summary.get("baseline") or {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for col in ("eval_loss", "train_loss", "general_loss"):
        if col in df:
            ax.plot(df["step"], df[col], marker="o", label=col)
    ax.set(title="losses", xlabel="step")
    ax.legend()
    ax = axes[1]
    base_groups = probe_metrics(base)
    for i, probe in enumerate(summary.get("guardrail_probes") or list(base_groups)):
        styles = {"irrelevant_pass": ("o", "-"), "hallucination": ("s", "--")}
        for metric, (marker, ls) in styles.items():
            col = column(metric, probe)
            if col not in df:
                continue
            colour = f"C{2 * i + (metric == 'hallucination')}"
            ax.plot(df["step"], df[col], marker=marker, ls=ls, c=colour, label=title(col))
            ax.fill_between(df["step"], df[f"{col}_lo"].astype(float), df[f"{col}_hi"].astype(float), alpha=0.15,
                            color=colour)
            b = ((base_groups.get(probe) or {}).get(metric) or {}).get("rate")
            if b is None:
                continue
            bound = (max(b * (1 - params["irrelevant_drop_max"]), params["irrelevant_min"]) if metric == "irrelevant_pass"
                     else b + params["hallucination_rise_max"])
            ax.axhline(bound, ls=":", c=colour, lw=1, label=f"trigger bound [{probe}]")
    ax.set(title="guardrail rates per probe group (bands: Wilson 95%)", xlabel="step", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
    ax = axes[2]
    if "gap" in df:
        ax.plot(df["step"], df["gap"], marker="o", label="gap (eval - train)")
        ax.plot(df["step"], df["gap"].cummin() + params["gap_widen_max"], ls="--", label="best gap + threshold")
    ax.set(title="generalization gap", xlabel="step")
    ax.legend(fontsize=7)
    stop = summary.get("stop_step")
    boundaries = stage_boundaries(summary)
    for ax in axes:
        if stop is not None:
            ax.axvline(stop, c="k", lw=1, alpha=0.6)
        for step, label in boundaries:  # progressive unfreezing: where each later stage began
            ax.axvline(step, c="tab:purple", ls="--", lw=1, alpha=0.7)
            ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="tab:purple")
    fig.suptitle(f"{summary['variant']}: {summary['status']}"
                 + (f" ({summary['stop_reason']} at step {stop})" if stop is not None else "")
                 + (f"; stages: {stage_line(summary)}" if summary.get("stages") else ""))
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    return fig


def stage_boundaries(summary: dict) -> list[tuple[int, str]]:
    """(step, label) where each stage after the first began, from summary.json's `stages` ([] unstaged)."""
    return [(s["start_step"], f"stage {s['stage']}: {_targets(s)}") for s in summary.get("stages") or []
            if s["stage"] > 1]


def _targets(stage: dict) -> str:
    return f"L{stage['llm_last']}/V{stage['vit_last']}"


def stage_line(summary: dict) -> str:
    """One line of a staged run's stages: targets, steps and outcome each, e.g. `1 L0/V2 steps 0-40 advanced;
    2 L0/V4 steps 40-60 stopped (kl_rise@general at step 60)`; '' for an unstaged run."""
    parts = []
    for s in summary.get("stages") or []:
        why = ""
        if s.get("outcome") == "stopped" and s.get("triggers"):
            t = s["triggers"][0]
            why = f" ({t['name']}{'@' + t['probe'] if t.get('probe') else ''} at step {t['step']})"
        elif s.get("plateau"):
            why = " (plateau)"
        parts.append(f"{s['stage']} {_targets(s)} steps {s['start_step']}-{s.get('end_step')} {s.get('outcome')}{why}")
    return "; ".join(parts)


def show_run(run_dir: str | Path) -> pd.DataFrame:
    """Plot a finished run and print its outcome; returns the metrics table."""
    run_dir = Path(run_dir)
    summary = RunFolder(run_dir).summary()
    plot_run(run_dir)
    best = summary.get("best") or {}
    print(f"status: {summary['status']}" + (f", stopped by {summary['stop_reason']} at step {summary['stop_step']}: "
                                            f"{summary.get('stop_message')}" if summary.get("stop_reason") else ""))
    unstopped = [t for t in summary.get("triggers") or [] if summary.get("stop_reason") is None]
    if unstopped:  # early_stopping: false, or a trigger at the last step: recorded, training went on
        print("triggers recorded without stopping: " + ", ".join(f"{t['name']} at step {t['step']}" for t in unstopped))
    for problem in summary.get("guardrail_problems") or []:
        print(f"WARNING: {problem['message']}")
    print(f"baseline: {summary.get('baseline_source')}; guardrails watch the probe groups "
          f"{', '.join(summary.get('guardrail_probes') or []) or 'of the benchmark'}")
    for stage in summary.get("stages") or []:  # progressive unfreezing: each stage and why it advanced or stopped
        print(f"stage {stage['stage']} ({_targets(stage)}, steps {stage['start_step']}-{stage.get('end_step')}): "
              f"{stage.get('outcome')}: {stage.get('why')}")
    print(f"best checkpoint: {best.get('checkpoint')} ({best.get('reason')})")
    df = metrics_frame(run_dir)
    cols = ["step"] + [c for c in df.columns if c.split("@")[0] in {m.name for m in shown("run")}
                       and not c.endswith(("_n", "_lo", "_hi"))] + [c for c in ("caption_degraded",) if c in df]
    return df[cols]


def in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except ImportError:
        return False
