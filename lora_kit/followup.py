"""The follow-up study, written from the summary's results: `python -m lora_kit next`.

    paths = write_next()  # reads outputs/summary/frontier.csv and study.csv, writes outputs/next/*.yaml
    # then: python -m lora_kit matrix --params-dir outputs/next   (with the study's -f files and --set values)

The plan's next step is a narrow sweep around the frontier's winners. For each trained run on the Pareto front
that the summary wrote (frontier.csv), one params file per change, each named after its winner:

- `<W>_r8`, `<W>_r16`, `<W>_r32`: LoRA ranks 8 / 16 / 32 (but the winner's own); lora_alpha stays the winner's;
- `<W>_lr0.5x`, `<W>_lr2x`: the learning rate of each tower the winner trains (learning_rate for the decoder,
  vit_lr for the vision tower) halved and doubled, which is what H3 (target count against modest LR changes) needs;
- `<W>_llm_last1`: the decoder narrowed to its last layer, when the winner trains more decoder layers than one;
- `<W>_progressive`: progressive unfreezing along the winner's tower (its vision tower when it trains one, else
  its decoder), through the counts the study tried in that tower, as `stages: [{vit_last: 2, max_steps: N}, ...]`.

Every file sets the winner's footprint, rank and learning rates in full and names the winner in `derived_from`,
so the matrix can refuse to run it with any other parameter than the winner's (matrix.check_jobs). A0.yaml is
copied beside them (the guardrail baseline; a finished A0 in the runs folder is skipped). A change that a
finished run of the study already made is not written again (the report says which run made it).

The summary's files are read, never recomputed: `next` refuses a summary folder without frontier.csv and a
summary older than a run folder (a run finished, resumed or started since), with the command that renews it.
"""
from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import RunConfig, _yaml_value
from .errors import LoraKitError
from .paths import outputs_dir, params_dir, runs_dir
from .rundir import RunFolder

RANKS = (8, 16, 32)
LR_FACTORS = (0.5, 2.0)
FINISHED = ("completed", "stopped_early")
_KEYS = ("llm_last", "vit_last", "lora_rank", "learning_rate", "vit_lr")  # what a change of the sweep sets


@dataclass
class Variant:
    """One follow-up params file: its name, the values it sets (in file order) and why it is in the sweep."""

    name: str
    winner: str
    values: dict
    why: str
    stages: list[dict] | None = None  # a progressive-unfreezing run's stages

    def key(self) -> tuple:
        """What makes two variants the same run (the values of _KEYS, target_regex and the stages)."""
        return (*(_plain(self.values.get(k)) for k in _KEYS), self.values.get("target_regex"),
                json.dumps(self.stages, sort_keys=True) if self.stages else None)


def _plain(x):
    return None if x is None or (isinstance(x, float) and x != x) else float(x)


# ---------------------------------------------------------------- reading the summary

def read_summary(summary_dir=None, runs_root=None) -> tuple[pd.DataFrame, pd.DataFrame, Path, Path]:
    """(frontier.csv, study.csv, the summary folder, the runs folder), refused when missing or stale.

    `summary_dir` defaults to outputs/summary; `runs_root` to the one folder holding study.csv's run folders. Stale:
    a run folder whose summary.json or metrics.jsonl is newer than frontier.csv, one the summary does not list, or
    one it lists that is gone. Raises LoraKitError with the command that writes a current summary.
    """
    folder = Path(summary_dir) if summary_dir else outputs_dir() / "summary"
    front_path, study_path = folder / "frontier.csv", folder / "study.csv"
    renew = ("python -m lora_kit summary" + (f" --runs-root {runs_root}" if runs_root else "")
             + (f" --out-dir {folder}" if summary_dir else ""))
    for path in (front_path, study_path):
        if not path.is_file():
            raise LoraKitError(f"no {path.name} in {folder}: `next` reads the summary's files (the Pareto front in "
                               f"frontier.csv, every run in study.csv). Fix: run the study, then {renew} "
                               "(make demo does both), or pass --summary-dir")
    front, study = pd.read_csv(front_path), pd.read_csv(study_path)
    listed = {Path(p).resolve(): p for p in study["run_dir"].dropna()}
    if runs_root is None:
        parents = sorted({str(p.parent) for p in listed})
        if len(parents) != 1:
            raise LoraKitError(f"study.csv in {folder} lists run folders in {len(parents)} folders "
                               f"({', '.join(parents) or 'none'}). Fix: pass --runs-root, the folder the summary read")
        runs_root = Path(parents[0])
    runs_root = Path(runs_root)
    written = front_path.stat().st_mtime
    newer, unlisted = [], []
    for d in sorted(p for p in runs_root.iterdir() if (p / "summary.json").is_file()) if runs_root.is_dir() else []:
        changed = max((d / f).stat().st_mtime for f in ("summary.json", "metrics.jsonl") if (d / f).is_file())
        if d.resolve() not in listed:
            unlisted.append(d.name)
        elif changed > written:
            newer.append(d.name)
    gone = [Path(p).name for p in listed.values() if not (Path(p) / "summary.json").is_file()]
    problems = ([f"changed since it was written: {', '.join(newer)}"] if newer else []) + \
               ([f"not in it: {', '.join(unlisted)}"] if unlisted else []) + \
               ([f"listed but gone: {', '.join(gone)}"] if gone else [])
    if problems:
        raise LoraKitError(f"the summary in {folder} (written {_when(written)}) is older than the runs in {runs_root}: "
                           + "; ".join(problems) + f". Fix: wait for running runs to finish, then {renew}")
    return front, study, folder, runs_root


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


# ---------------------------------------------------------------- the sweep

def plan_next(front: pd.DataFrame, study: pd.DataFrame) -> tuple[list[Variant], list[str]]:
    """(the follow-up variants, what was left out and why) around each trained run of `front` (frontier.csv).

    Each winner's settings come from its run folder's params.json (run_dir). Raises LoraKitError when the front
    holds no trained run or a winner's params.json cannot be read.
    """
    winners = front[front["trained"].astype(bool)] if "trained" in front else front.iloc[0:0]
    if winners.empty:
        shown = ", ".join(front["variant"].astype(str)) or "no run"
        raise LoraKitError(f"the Pareto front in frontier.csv holds no trained run ({shown}): nothing to sweep "
                           "around. Fix: run the study's variants (python -m lora_kit matrix), then the summary")
    setup = front["setup"].iloc[0] if "setup" in front and len(front) else None
    done = study[study["status"].isin(FINISHED)]
    if setup is not None and "setup" in done:
        done = done[done["setup"] == setup]
    variants, skipped = [], []
    for _, w in winners.iterrows():
        config = _winner_config(w)
        for v in _around(w, config, done):
            if isinstance(v, str):
                skipped.append(v)
            else:
                variants.append(v)
    seen, keep = {}, []
    ran = {_run_key(r): r["variant"] for _, r in done.iterrows()}
    for v in variants:
        if v.key() in seen:
            skipped.append(f"{v.name}: the same run as {seen[v.key()]}, written once")
        elif v.key() in ran:
            skipped.append(f"{v.name}: already run as {ran[v.key()]} (the same {', '.join(_KEYS)} in study.csv)")
        else:
            seen[v.key()] = v.name
            keep.append(v)
    clashes = sorted(set(v.name for v in keep) & set(study["variant"].astype(str)))
    if clashes:
        raise LoraKitError(f"run folders named {', '.join(clashes)} hold other runs than these follow-up variants "
                           "(study.csv), and the matrix would refuse them. Fix: rename or delete those run folders, "
                           "or run the follow-up in another --runs-root")
    return keep, skipped


def _winner_config(w) -> dict:
    params = RunFolder(Path(str(w["run_dir"]))).params() if isinstance(w.get("run_dir"), str) else None
    if not params or not isinstance(params.get("config"), dict):
        raise LoraKitError(f"winner {w['variant']}: no params.json with its settings in {w.get('run_dir')}; the "
                           "follow-up copies them from there. Fix: restore that run folder, or run the summary on "
                           "the runs folder that holds it")
    defaults = RunConfig().to_dict()  # a run recorded before a parameter existed ran its default
    return {**defaults, **params["config"]}


def _run_key(r) -> tuple:
    stages = r.get("stages") if isinstance(r.get("stages"), str) else None
    if stages:
        stages = json.dumps(json.loads(stages), sort_keys=True)
    regex = r.get("target_regex") if isinstance(r.get("target_regex"), str) else None  # NaN in a CSV: none
    return (*(_plain(r.get(k)) for k in _KEYS), regex, stages)


def _around(w, c: dict, done: pd.DataFrame) -> list:
    """The follow-up variants of one winner (row w of frontier.csv, its resolved config c), and strings saying
    what was not written for it and why."""
    name, llm, vit, regex = str(w["variant"]), int(c["llm_last"]), int(c["vit_last"]), c.get("target_regex")
    base = {"variant": None, "derived_from": name, "llm_last": llm, "vit_last": vit,
            **({"target_regex": regex} if regex else {}), "lora_rank": int(c["lora_rank"]),
            "learning_rate": float(c["learning_rate"]), "vit_lr": float(c["vit_lr"])}
    at = f"{name} (llm_last {llm}, vit_last {vit}{', target_regex' if regex else ''}, lora_rank {c['lora_rank']}, " \
         f"learning_rate {c['learning_rate']:g}, vit_lr {c['vit_lr']:g})"
    out: list = []

    staged = list(c.get("stages") or [])  # a progressive winner: its variants keep its stages

    def variant(suffix: str, why: str, **changes) -> Variant:
        v = f"{name}_{suffix}"
        return Variant(v, name, {**base, **changes, "variant": v}, f"{at}: {why}", staged or None)

    for r in RANKS:
        if r != c["lora_rank"]:
            out.append(variant(f"r{r}", f"lora_rank {c['lora_rank']} -> {r}; lora_alpha stays {c['lora_alpha']:g}, so "
                               f"the update scale alpha/r goes {c['lora_alpha'] / c['lora_rank']:g} -> "
                               f"{c['lora_alpha'] / r:g}", lora_rank=r))
    towers = [k for k, n in (("learning_rate", llm), ("vit_lr", vit)) if n] or ["learning_rate", "vit_lr"]
    for f in LR_FACTORS:
        changes = {k: float(c[k]) * f for k in towers}
        out.append(variant(f"lr{f:g}x", " and ".join(f"{k} x{f:g}: {c[k]:g} -> {v:g}" for k, v in changes.items())
                           + " (a modest learning-rate change for H3; the untrained tower's rate is left)", **changes))
    if regex or staged:
        out.append(f"{name}: no llm_last-1 or progressive variant ("
                   + ("it targets modules by target_regex, not by counts)" if regex else "it is a progressive run)"))
        return out
    if llm > 1:
        out.append(variant("llm_last1", f"llm_last {llm} -> 1 (the plan's LLM last-1: does the last decoder layer "
                           "alone keep the task fit?)", llm_last=1))
    elif llm == 1:
        out.append(f"{name}: no llm_last-1 variant (it trains the last decoder layer only already)")
    tower = "vit_last" if vit else "llm_last"
    tried = sorted({int(n) for n in pd.to_numeric(done.get(tower, pd.Series(dtype=float)), errors="coerce").dropna()
                    if n > 0} | {vit if vit else llm})
    if len(tried) < 2:
        out.append(f"{name}: no progressive variant ({tower} {tried[0]} is the only count the study tried in that "
                   "tower; progressive unfreezing goes through the tried counts)")
        return out
    patience = max(int(c.get(k) or 1) for k in ("irrelevant_patience", "hallucination_patience", "gap_patience",
                                                "caption_patience"))
    eval_steps = int(c["eval_steps"])
    best = int(w["best_step"]) if pd.notna(w.get("best_step")) else 0
    budget = -(-max(best, patience * eval_steps) // eval_steps) * eval_steps  # a multiple of eval_steps
    stages = [{tower: n, "max_steps": budget} for n in tried]
    v = variant("progressive", f"progressive unfreezing of the {'vision tower' if tower == 'vit_last' else 'decoder'}"
                f" through the study's tried counts {tower} {' -> '.join(map(str, tried))}, {budget} steps a stage "
                f"({name}'s best step {best}, at least {patience} evaluations of every {eval_steps} steps so that a "
                "guardrail can stop a stage); a stage starts only while every guardrail held",
                **{tower: tried[0]})
    v.stages = stages
    out.append(v)
    return out


# ---------------------------------------------------------------- writing it

def render(v: Variant, source: Path, front_row, target: Path) -> str:
    """One follow-up params file: a comment saying where it comes from and why, then its values."""
    probes = [c for c in front_row.index if "@" in c and not c.endswith(("_n", "_lo", "_hi"))]
    shown = ", ".join([f"best_eval_loss {front_row['best_eval_loss']:.3f}"] + [_rate(front_row, c) for c in probes])
    wrap = lambda text: textwrap.wrap(text, 116, initial_indent="# ", subsequent_indent="# ",  # noqa: E731
                                      break_long_words=False, break_on_hyphens=False)  # paths stay whole
    lines = [*wrap(f"{v.name}: {v.why}."),
             *wrap(f"Derived from {v.winner}, on the Pareto front in {source} ({shown})."),
             "# Written by `python -m lora_kit next`; run the sweep with the study's -f files and --set values:",
             f"#   python -m lora_kit matrix --params-dir {target}"]
    values = dict(v.values)
    lines += [f"{k}: {_yaml_value(x)}" for k, x in values.items()]
    if v.stages:
        lines += ["# Each stage continues the previous stage's adapter and adds LoRA to the newly listed layers "
                  "(issue 21 item 1).", "stages:"]
        lines += ["  - {" + ", ".join(f"{k}: {_yaml_value(x)}" for k, x in stage.items()) + "}" for stage in v.stages]
    return "\n".join(lines) + "\n"


def _rate(row, c: str) -> str:
    v = row.get(c)
    if not (isinstance(v, float) and v == v):
        return f"{c} n/a"
    text = f"{c} {v:.0%}"
    if pd.notna(row.get(f"{c}_lo")) and pd.notna(row.get(f"{c}_hi")):
        text += f" [{row[f'{c}_lo']:.0%}-{row[f'{c}_hi']:.0%}]"
    return text + (f" n={int(row[f'{c}_n'])}" if pd.notna(row.get(f"{c}_n")) else "")


def write_next(summary_dir=None, out=None, runs_root=None, *, overwrite: bool = False,
               log=print) -> dict[str, Path]:
    """Write the follow-up study's params folder (default outputs/next) from the summary; {variant: file}.

    Also writes A0.yaml (the baseline, copied from params/) and next.txt (what `log` was told: which winners, from
    which table, each file and why, and what was left out). Refuses a non-empty folder unless `overwrite` (which
    replaces its *.yaml and next.txt). See read_summary for the summary checks.
    """
    front, study, folder, runs_root = read_summary(summary_dir, runs_root)
    variants, skipped = plan_next(front, study)
    target = Path(out) if out else outputs_dir() / "next"
    old = sorted(target.glob("*.yaml")) + ([target / "next.txt"] if (target / "next.txt").exists() else [])
    if old and not overwrite:
        raise LoraKitError(f"{target} already holds {len(old)} follow-up files ({', '.join(p.name for p in old[:4])}"
                           f"{', ...' if len(old) > 4 else ''}). Fix: --out another folder, or --overwrite to "
                           "replace them")
    target.mkdir(parents=True, exist_ok=True)
    for p in old:
        p.unlink()
    winners = front[front["trained"].astype(bool)]
    text = [f"The follow-up study around the Pareto front of {folder / 'frontier.csv'} "
            f"(written {_when((folder / 'frontier.csv').stat().st_mtime)}, setup {front['setup'].iloc[0]}; "
            f"objectives: {front['objectives'].iloc[0]}; runs in {runs_root}).",
            f"Winners (the trained runs on it): {', '.join(winners['variant'].astype(str))}"
            + (f"; left out untrained {', '.join(front.loc[~front['trained'].astype(bool), 'variant'].astype(str))}"
               if (~front["trained"].astype(bool)).any() else "") + "."]
    paths = {}
    a0 = params_dir() / "A0.yaml"  # the study folder's own (the clone's params/)
    paths["A0"] = target / "A0.yaml"
    paths["A0"].write_text("# The guardrail baseline, copied from params/A0.yaml (a finished A0 in the runs folder is "
                           "skipped).\n" + a0.read_text(encoding="utf-8"), encoding="utf-8")
    text.append("  A0.yaml: the guardrail baseline (params/A0.yaml)")
    rows = {str(r["variant"]): r for _, r in front.iterrows()}
    for v in variants:
        paths[v.name] = target / f"{v.name}.yaml"
        paths[v.name].write_text(render(v, folder / "frontier.csv", rows[v.winner], target), encoding="utf-8")
        text.append(f"  {v.name}.yaml: {v.why}")
    text += [f"Not written: {s}" for s in skipped]
    text.append(f"Run it (with the study's -f files and --set values): python -m lora_kit matrix --params-dir "
                f"{target}" + (f" --runs-root {runs_root}" if runs_root.resolve() != runs_dir(None).resolve() else "") +
                "; then python -m lora_kit summary: H3 reads the learning-rate changes against the target-count "
                "changes.")
    (target / "next.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    for line in text:
        log(line)
    return paths
