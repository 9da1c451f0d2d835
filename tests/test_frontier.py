"""The study summary on fake run folders and synthetic tables: frontier, collection, verdicts, files.

Run folders are written by hand in the shapes train.py writes (summary.json, params.json, metrics.jsonl);
nothing here trains a model.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_kit.errors import LoraKitError
from lora_kit.frontier import (collect_runs, hypothesis_verdicts, one_setup, pareto_front, study_table,
                               write_summary)
from lora_kit.scoring import rate


# ---------------------------------------------------------------- pareto_front

def brute_front(df: pd.DataFrame, objectives: dict[str, str]) -> list[bool]:
    """The definition, pair by pair."""
    rows = [[(v if d == "min" else -v) for v, d in zip(r, objectives.values())]
            for r in df[list(objectives)].to_numpy(dtype=float)]
    ok = [not any(math.isnan(v) for v in r) for r in rows]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [ok[i] and not any(ok[j] and dominates(rows[j], rows[i]) for j in range(len(rows)) if j != i)
            for i in range(len(rows))]


# small integers make ties and identical rows common; NaN stands for a missing metric
values = st.one_of(st.integers(0, 3).map(float), st.just(math.nan))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3).flatmap(lambda k: st.tuples(
    st.lists(st.lists(values, min_size=k, max_size=k), min_size=0, max_size=9),
    st.lists(st.sampled_from(["min", "max"]), min_size=k, max_size=k))))
def test_pareto_front_matches_brute_force(case):
    rows, directions = case
    cols = [f"m{i}" for i in range(len(directions))]
    df = pd.DataFrame(rows, columns=cols, index=[f"r{i}" for i in range(len(rows))])
    objectives = dict(zip(cols, directions))
    front = pareto_front(df, objectives)
    assert list(front.index) == list(df.index) and front.dtype == bool
    assert front.tolist() == brute_front(df, objectives)


def test_pareto_front_seeded_tables():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        df = pd.DataFrame({"loss": rng.integers(0, 6, n).astype(float), "irr": rng.integers(0, 6, n) / 5,
                           "hal": rng.random(n)})
        df.loc[rng.random(n) < 0.15, "irr"] = np.nan
        objectives = {"loss": "min", "irr": "max", "hal": "min"}
        assert pareto_front(df, objectives).tolist() == brute_front(df, objectives)


def test_pareto_front_cases_by_hand():
    df = pd.DataFrame({"loss": [0.5, 0.5, 0.4, 0.6, np.nan, 0.3],
                       "irr": [0.9, 0.9, 0.8, 0.95, 1.0, np.nan]})
    # identical rows 0 and 1 are both on the front; NaN rows never are and do not dominate
    assert pareto_front(df, {"loss": "min", "irr": "max"}).tolist() == [True, True, True, True, False, False]
    assert pareto_front(df.iloc[[3]], {"loss": "min"}).tolist() == [True]  # a single run
    assert pareto_front(df.iloc[[4]], {"loss": "min", "irr": "max"}).tolist() == [False]
    assert pareto_front(df.iloc[:0], {"loss": "min"}).tolist() == []
    with pytest.raises(LoraKitError, match="'min' or 'max'"):
        pareto_front(df, {"loss": "lower"})
    with pytest.raises(LoraKitError, match="not columns"):
        pareto_front(df, {"eval": "min"})


# ---------------------------------------------------------------- fake run folders

def rated(p: float, n: int = 40) -> dict:
    return rate(round(p * n), n).as_dict()


def record(step, eval_loss, irr=0.95, hal=0.1, general=1.0, checkpoint=True, n=40):
    return {"step": step, "epoch": step / 100, "eval_loss": eval_loss, "train_loss": eval_loss - 0.05, "gap": 0.05,
            "general_loss": general, "irrelevant_pass": rated(irr, n), "false_refusal": rated(0.0, n),
            "hallucination": rated(hal, n), "hallucination_in_domain": rated(hal, n),
            "object_accuracy": rated(0.5, n), "object_recall": rated(0.6, n), "blindness": rated(0.0, n),
            "ood_label_rate": rate(0, 0).as_dict(), "crop": None,
            "caption": {"degraded": False, "mean_chrf_vs_baseline": 80.0, "source": "proxy", "n": 4,
                        "manual_verdicts": {}},
            "checkpoint": f"checkpoints/checkpoint-{step}" if checkpoint and step else None, "eval_seconds": 1.0}


def write_run(root, variant, llm, vit, records, *, status="completed", best_step="lowest", model="toy", lr=1e-3,
              vit_lr=3e-3, stop=None, truncate=False, bench_file="world/bench.jsonl", seed=42):
    """A run folder as train.py leaves it; best_step 'lowest' = the lowest-loss checkpoint, None = none feasible."""
    d = root / variant
    d.mkdir(parents=True)
    params = {"config": {"variant": variant, "llm_last": llm, "vit_last": vit, "model": model, "lora_rank": 16, "seed": seed,
                         "learning_rate": lr, "vit_lr": vit_lr}, "code": {}, "packages": {},
              "data_files": {"train_file": "world/task_train.jsonl", "bench_file": bench_file}}
    (d / "params.json").write_text(json.dumps(params))
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if truncate:
        lines += '{"step": 999, "eval_loss": 0.0, "irrelev'  # a writer killed mid-line
    (d / "metrics.jsonl").write_text(lines)
    trainable = 0 if llm == vit == 0 else 1000 * (llm + vit)
    if trainable == 0:
        best = {"checkpoint": None, "step": 0, "eval_loss": records[0]["eval_loss"], "reason": "evaluation-only"}
    elif best_step is None or status == "failed":
        best = {"checkpoint": None, "step": None, "eval_loss": None, "metrics": None, "feasible_steps": [],
                "reason": "no checkpoint satisfies the guardrails"}
    else:
        r = min((r for r in records if r["checkpoint"]), key=lambda r: r["eval_loss"])
        best = {"checkpoint": r["checkpoint"], "step": r["step"], "eval_loss": r["eval_loss"], "metrics": r,
                "feasible_steps": [r["step"]], "reason": "lowest"}
    summary = {"variant": variant, "status": status, "stop_reason": stop and "irrelevant_drop",
               "stop_step": stop, "stop_values": None, "stop_message": None, "steps": records[-1]["step"],
               "baseline_source": "A0", "baseline": {}, "best": best,
               "targets": {"counts": {"llm": 7 * llm, "vit": 4 * vit}, "llm_layers": [], "vit_blocks": []},
               "llm_last": llm, "vit_last": vit, "trainable_parameters": trainable,
               "timings": {"wall_seconds": 60.0, "eval_seconds": 15.0, "encode_seconds": 1.0, "eval_share": 0.25},
               "skipped_samples": 0}
    if status == "failed":
        summary = {"variant": variant, "status": "failed", "failure": "failed", "error": "RuntimeError: boom"}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "A0", 0, 0, [record(0, 1.0, checkpoint=False)])
    write_run(root, "A1", 2, 0, [record(0, 1.0), record(25, 0.6), record(50, 0.5, irr=0.9)])
    write_run(root, "A2", 4, 0, [record(0, 1.0), record(25, 0.5, irr=0.5, general=1.3),
                                 record(50, 0.45, irr=0.3, hal=0.6, general=1.5)],
              status="stopped_early", best_step=None, stop=50)
    write_run(root, "C2", 2, 4, [record(0, 1.0), record(25, 0.55), record(50, 0.48)], truncate=True)
    write_run(root, "C2_restart", 2, 4, [record(0, 1.2), record(25, 0.7), record(50, 0.6)], model="toy-stage2")
    write_run(root, "B2", 0, 4, [record(0, 1.0)], status="failed")
    (root / "notes").mkdir()  # no summary.json: not a run
    return root


def test_collect_runs(runs):
    df = collect_runs(runs).set_index("variant")
    assert sorted(df.index) == ["A0", "A1", "A2", "B2", "C2", "C2_restart"]
    a1 = df.loc["A1"]
    assert a1["feasible"] and a1["best_step"] == 50 and a1["best_checkpoint"] == "checkpoints/checkpoint-50"
    assert a1["best_eval_loss"] == 0.5 and a1["irrelevant_pass@general"] == 0.9 and a1["irrelevant_pass@general_n"] == 40
    assert a1["irrelevant_pass@general_lo"] < 0.9 < a1["irrelevant_pass@general_hi"]
    assert (a1["n_llm_modules"], a1["n_vit_modules"], a1["learning_rate"], a1["model"]) == (14, 0, 1e-3, "toy")
    assert a1["general_loss"] == 1.0 and a1["gap"] == 0.05 and a1["eval_share"] == 0.25
    assert a1["caption_degraded"] == False  # noqa: E712  (numpy bool)
    a0 = df.loc["A0"]  # evaluation-only: feasible, metrics of step 0
    assert a0["feasible"] and a0["best_step"] == 0 and a0["best_eval_loss"] == 1.0 and a0["irrelevant_pass@general"] == 0.95
    a2 = df.loc["A2"]  # no feasible checkpoint: its last evaluation, marked infeasible
    assert not a2["feasible"] and a2["best_step"] == 50 and a2["best_eval_loss"] == 0.45
    assert a2["irrelevant_pass@general"] == 0.3 and a2["status"] == "stopped_early" and a2["stop_step"] == 50
    assert a2["best_checkpoint"] is None or pd.isna(a2["best_checkpoint"])
    assert df.loc["C2", "best_step"] == 50  # the truncated last line is ignored
    b2 = df.loc["B2"]
    assert b2["status"] == "failed" and not b2["feasible"] and b2["vit_last"] == 4 and b2["best_step"] == 0
    assert math.isnan(df.loc["A0", "ood_label_rate@general"]) and df.loc["A0", "ood_label_rate@general_n"] == 0
    table = study_table(collect_runs(runs))
    irr = table.loc["A1", "irrelevant_pass@general"]
    assert irr.startswith("90% [") and irr.endswith("n=40")


def test_collect_runs_refuses_a_missing_folder(tmp_path):
    with pytest.raises(LoraKitError, match="not a folder"):
        collect_runs(tmp_path / "nowhere")


def test_write_summary(runs, tmp_path):
    paths = write_summary(runs, tmp_path / "summary", log=lambda *_: None)
    names = {"table", "left_out", "frontier", "frontier_irrelevant", "frontier_hallucination", "heatmaps", "curves",
             "restart", "verdicts", "kl_prediction"}
    assert set(paths) == names
    # these synthetic runs record no KL: no pairs, no correlation claimed
    assert json.loads(paths["kl_prediction"].read_text())["n"] == 0
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0 and path.parent == tmp_path / "summary"
    assert len(pd.read_csv(paths["table"])) == 6
    # the restart starts from another model: left out of the comparison (but in its own figure), as is failed B2
    left_out = pd.read_csv(paths["left_out"]).set_index("variant")
    assert sorted(left_out.index) == ["B2", "C2_restart"]
    assert "model: toy (weights not recorded) vs toy-stage2" in left_out.loc["C2_restart", "why"]
    # the front of the feasible runs of the setup: C2 (0.48, 95%, 10%) dominates A1 (0.50, 90%) and A0 (1.0, 95%);
    # A2 is infeasible, B2 failed, C2_restart is another setup
    front = pd.read_csv(paths["frontier"])
    assert front["variant"].tolist() == ["C2"] and front["trained"].tolist() == [True]
    assert front.loc[0, "best_eval_loss"] == 0.48 and front.loc[0, "irrelevant_pass@general_n"] == 40
    assert front.loc[0, "objectives"] == ("best_eval_loss min; irrelevant_pass@general max; "
                                          "hallucination@general min")
    assert left_out.loc["B2", "why"].startswith("status failed")
    verdicts = json.loads(paths["verdicts"].read_text())
    assert [v["hypothesis"] for v in verdicts] == ["H1", "H2", "H3", "H4"]
    assert all(v["verdict"] in ("supported", "not supported", "not enough data", "not tested") and v["evidence"]
               for v in verdicts)
    by = {v["hypothesis"]: v for v in verdicts}
    assert by["H3"]["verdict"] == "not tested" and "lora_kit next" in by["H3"]["evidence"]  # no LR sweep here
    # A2 degraded at step 25 and eval loss still improved 0.50 -> 0.45 afterwards (10% > 2%)
    assert by["H4"]["verdict"] == "not supported" and "A2" in by["H4"]["evidence"]


def test_runs_of_another_setup_are_left_out_of_frontiers_and_verdicts(runs, tmp_path):
    """Issue 17 case 8: a run on the user's own data (eval loss 13.4, its own benchmark) beside the toy study
    swayed H3 to "supported": footprints seemed to span 12.9 nats against the learning rates' 0.2."""
    write_run(runs, "C2_lr2", 2, 4, [record(0, 1.0), record(25, 0.4), record(50, 0.3)], lr=2e-3, vit_lr=6e-3)
    write_run(runs, "L3_V0", 3, 0, [record(0, 14.0), record(25, 13.6), record(50, 13.4)],
              bench_file="/home/me/receipts/bench.jsonl")
    df = collect_runs(runs)
    study, left_out = one_setup(df)
    assert sorted(study["variant"]) == ["A0", "A1", "A2", "B2", "C2", "C2_lr2"]
    why = left_out.set_index("variant")["why"]
    assert "bench_file: world/bench.jsonl (sha256 not recorded) vs /home/me/receipts/bench.jsonl" in why["L3_V0"]
    # within the setup: footprints at the default LR span 0.05 (A1 0.50, C2 0.48, infeasible A2's last 0.45)
    # against the learning rate's 0.18 (C2 0.48 -> C2_lr2 0.30): not supported; pooled, L3_V0's 13.4 made it 12.95
    paths = write_summary(runs, tmp_path / "summary", log=lambda *_: None)
    h3 = next(v for v in json.loads(paths["verdicts"].read_text()) if v["hypothesis"] == "H3")
    assert h3["verdict"] == "not supported" and "13.4" not in h3["evidence"], h3
    assert "L3_V0" in pd.read_csv(paths["left_out"])["variant"].tolist()
    assert "L3_V0" in pd.read_csv(paths["table"])["variant"].tolist()  # the table still lists every run
    # comparing runs of several setups is refused where it would pool them
    with pytest.raises(LoraKitError, match="3 setups.*one_setup"):
        hypothesis_verdicts(df)
    # the other setup can be chosen by its id (a unique prefix)
    other = df.set_index("variant").loc["L3_V0", "setup"]
    mine, out = one_setup(df, other[:5])
    assert mine["variant"].tolist() == ["L3_V0"] and "A1" in out["variant"].tolist()
    with pytest.raises(LoraKitError, match="matches 0 of the runs' setups"):
        one_setup(df, "zzz")


def test_write_summary_without_runs(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(LoraKitError, match="no run folders"):
        write_summary(tmp_path / "runs", tmp_path / "out")


# ---------------------------------------------------------------- verdicts on synthetic tables

def row(variant, llm, vit, loss, irr=0.95, hal=0.1, general=1.0, *, lr=1e-3, vit_lr=3e-3, feasible=True, n=200):
    r = {"variant": variant, "llm_last": llm, "vit_last": vit, "model": "toy", "lora_rank": 16, "learning_rate": lr,
         "vit_lr": vit_lr, "status": "completed", "n_llm_modules": 7 * llm, "n_vit_modules": 4 * vit,
         "best_eval_loss": loss, "feasible": feasible, "general_loss": general}
    for m, p in (("irrelevant_pass", irr), ("hallucination", hal)):
        x = rate(round(p * n), n)
        m = f"{m}@general"  # the benchmark's one probe group
        r |= {m: x.rate, f"{m}_n": n, f"{m}_lo": x.lo, f"{m}_hi": x.hi}
    return r


def verdicts(rows, curves=None):
    return {v["hypothesis"]: v for v in hypothesis_verdicts(pd.DataFrame(rows), curves or {})}


STUDY = [row("A0", 0, 0, 1.0), row("A1", 2, 0, 0.60), row("A2", 4, 0, 0.58, irr=0.7, general=1.2),
         row("B2", 0, 4, 0.70), row("B3", 0, 6, 0.69, hal=0.3), row("C1", 2, 2, 0.50), row("C2", 2, 4, 0.45),
         row("C3", 2, 6, 0.449, irr=0.6, hal=0.4, general=1.3)]


def test_h3_is_not_tested_without_a_modest_lr_sweep():
    v = verdicts(STUDY)["H3"]
    assert v["verdict"] == "not tested" and "python -m lora_kit next" in v["evidence"], v
    assert "matrix --params-dir outputs/next" in v["evidence"]
    # x10 is no modest change: left out, and said so
    v = verdicts(STUDY + [row("C2_lr10", 2, 4, 0.9, lr=1e-2, vit_lr=3e-2)])["H3"]
    assert v["verdict"] == "not tested" and "1 learning-rate changes beyond x2 left out" in v["evidence"], v


@pytest.mark.parametrize("lr_losses, expected, told", [
    # LR moves eval loss by 0.01 at most; count by 0.25 (C2 0.45 -> B2 0.70), and only count moves generality
    ((0.46, 0.44), "supported", "count dominates task fit, count dominates generality"),
    # LR moves eval loss by 0.35 (C2 0.45 -> C2_lr2x 0.80) > count's 0.25: LR dominates task fit
    ((0.20, 0.80), "not supported", "LR dominates task fit, count dominates generality")])
def test_h3_from_a_follow_up_sweep(lr_losses, expected, told):
    sweep = [row("C2_lr0.5x", 2, 4, lr_losses[0], lr=5e-4, vit_lr=1.5e-3),
             row("C2_lr2x", 2, 4, lr_losses[1], lr=2e-3, vit_lr=6e-3)]
    v = verdicts(STUDY + sweep)["H3"]
    assert v["verdict"] == expected and f"So: {told}." in v["evidence"], v
    # the anchor is C2 (at the learning rates all study footprints share); its one-tower neighbours there are
    # A1 (2, 0), B2 (0, 4), C1 (2, 2) and C3 (2, 6); A2 (4, 0) and B3 (0, 6) differ in both towers
    assert "Around C2: 2 modest learning-rate changes (C2->C2_lr0.5x, C2->C2_lr2x)" in v["evidence"]
    assert ("4 one-tower target-count changes at the same learning rates (C2->A1, C2->B2, C2->C1, C2->C3)"
            in v["evidence"])
    lr_move = max(abs(x - 0.45) for x in lr_losses)
    assert f"best_eval_loss moves 0.25 by count (C2 0.450 -> B2 0.700) vs {lr_move:.3g} by LR" in v["evidence"]
    # generality with n and intervals: C3's irrelevant pass 60% of 200 against C2's 95%, beyond noise
    assert "irrelevant_pass@general moves 0.35 by count (C2 95% [" in v["evidence"]
    assert "n=200 -> C3 60% [" in v["evidence"]


def test_h3_lr_dominating_generality_and_noise():
    # the LR change breaks the irrelevant pass (95% -> 50%, n = 200) and hallucination (10% -> 50%) more than any
    # count change (C3: 60%, 40%); general loss moves by count only: LR wins 2 of the 3 generality metrics
    sweep = [row("C2_lr2x", 2, 4, 0.45, irr=0.5, hal=0.5, lr=2e-3, vit_lr=6e-3)]
    v = verdicts(STUDY + sweep)["H3"]
    assert v["verdict"] == "not supported" and "irrelevant_pass@general moves 0.35 by count" in v["evidence"]
    assert "vs 0.45 by LR (C2 95% [" in v["evidence"] and "hallucination@general moves 0.3 by count" in v["evidence"]
    assert "So: count dominates task fit, LR dominates generality." in v["evidence"], v
    # every move within noise: a loss within 2%, rates within their Wilson intervals (n = 200)
    quiet = [row("C1", 2, 2, 0.451, irr=0.93), row("C2", 2, 4, 0.45), row("C2_lr2x", 2, 4, 0.452, hal=0.12,
                                                                                lr=2e-3, vit_lr=6e-3)]
    v = verdicts(quiet)["H3"]
    assert v["verdict"] == "not enough data" and "Nothing moved beyond noise" in v["evidence"], v
    # an LR sweep without another footprint at the anchor's learning rates
    v = verdicts([row("C2", 2, 4, 0.45), row("C2_lr2x", 2, 4, 0.40, lr=2e-3, vit_lr=6e-3)])["H3"]
    assert v["verdict"] == "not enough data" and "0 one-tower target-count changes" in v["evidence"], v
    # a progressive run (stages) has no one footprint: it is no LR change of C2
    staged = row("C2_progressive", 2, 4, 0.1, lr=2e-3, vit_lr=6e-3) | {"stages": '[{"vit_last": 2}]'}
    assert verdicts(STUDY + [staged])["H3"]["verdict"] == "not tested"


def test_h1_degradation_beyond_noise():
    v = verdicts(STUDY)["H1"]
    # 7 pairs (A1->A2, A1->C1, C1->C2, C2->C3, B2->B3, B2->C2, B3->C3); A1->A2, C2->C3, B2->B3 and B3->C3
    # degrade beyond noise: 4 of 7 >= half
    assert v["verdict"] == "supported" and "4 of 7" in v["evidence"] and "A1->A2" in v["evidence"], v
    flat = [row("A1", 2, 0, 0.6), row("A2", 4, 0, 0.55), row("C1", 2, 2, 0.5), row("C2", 2, 4, 0.45)]
    assert verdicts(flat)["H1"]["verdict"] == "not enough data"  # nothing moves beyond noise
    better = [row("A1", 2, 0, 0.6, irr=0.7), row("A2", 4, 0, 0.55, irr=0.95), row("C1", 2, 2, 0.5, hal=0.4),
              row("C2", 2, 4, 0.45, hal=0.1)]
    assert verdicts(better)["H1"]["verdict"] == "not supported"
    # the same differences on a benchmark of 10 images are within the Wilson intervals
    small = [row("A1", 2, 0, 0.6, n=10), row("A2", 4, 0, 0.55, irr=0.7, n=10)]
    assert verdicts(small)["H1"]["verdict"] == "not enough data"
    assert verdicts([row("A1", 2, 0, 0.6)])["H1"]["verdict"] == "not enough data"


def test_h2_narrow_footprint():
    v = verdicts(STUDY)["H2"]
    # C2 (2, 4) is within 2% of C3's 0.449 and on the front; llm 2 < 4 and vit 4 < 6 tried
    assert v["verdict"] == "supported" and "C2" in v["evidence"], v
    widest = [r for r in STUDY if r["variant"] != "C2"] + [row("C2", 2, 4, 0.60)]
    widest[-2] = row("C3", 2, 6, 0.40)  # the widest vision footprint is clearly best
    assert verdicts(widest)["H2"]["verdict"] == "not supported"
    only_llm = [row("A1", 2, 0, 0.6), row("A2", 4, 0, 0.5)]
    assert verdicts(only_llm)["H2"]["verdict"] == "not supported"  # A2 is best and the widest decoder tried
    assert verdicts([row("A0", 0, 0, 1.0)])["H2"]["verdict"] == "not enough data"


def curve(losses, general):
    """A metrics table as views.metrics_frame gives it: step, eval_loss, general_loss, rates with intervals."""
    rows = []
    for i, (loss, g) in enumerate(zip(losses, general)):
        rows.append({"step": 25 * i, "eval_loss": loss, **{k: v for k, v in row("x", 2, 4, loss, general=g).items()
                                                            if k.startswith(("irrelevant", "halluc", "general"))}})
    return pd.DataFrame(rows), {}


def test_h4_from_curves():
    study = [row("C2", 2, 4, 0.45), row("C3", 2, 6, 0.45)]
    stalls = {"C2": curve([1.0, 0.6, 0.45, 0.45, 0.46], [1.0, 1.0, 1.0, 1.2, 1.3]),
              "C3": curve([1.0, 0.5, 0.45, 0.452], [1.0, 1.0, 1.3, 1.4])}
    assert verdicts(study, stalls)["H4"]["verdict"] == "supported"
    keeps = {"C2": curve([1.0, 0.6, 0.5, 0.4, 0.3], [1.0, 1.2, 1.3, 1.4, 1.5]), "C3": stalls["C3"]}
    v = verdicts(study, keeps)["H4"]
    assert v["verdict"] == "supported"  # 1 of 2 stalled: half counts as support
    keeps["C3"] = curve([1.0, 0.6, 0.5, 0.4], [1.0, 1.2, 1.3, 1.4])
    assert verdicts(study, keeps)["H4"]["verdict"] == "not supported"
    held = {"C2": curve([1.0, 0.6, 0.5], [1.0, 1.0, 1.01]), "C3": curve([1.0, 0.6, 0.5], [1.0, 1.0, 1.3])}
    v = verdicts(study, held)["H4"]  # C3 degrades only at its last evaluation: nothing after it
    assert v["verdict"] == "not enough data" and "early_stopping" in v["evidence"]


def test_seed_table_means_intervals_and_frontier_share(tmp_path):
    from lora_kit.frontier import seed_table

    root = tmp_path / "runs"
    write_run(root, "A0", 0, 0, [record(0, 1.0)])
    # C2 under three seeds: best eval losses 0.4, 0.5, 0.6; A2 under three seeds: 0.45, 0.45, 0.45 but with its
    # irrelevant pass 0.5 at seed 43
    for seed, c2, a2_irr in ((42, 0.4, 0.95), (43, 0.6, 0.5), (44, 0.5, 0.95)):
        suffix = "" if seed == 42 else f"_seed{seed}"
        write_run(root, f"C2{suffix}", 2, 4, [record(0, 1.0), record(50, c2)], seed=seed)
        write_run(root, f"A2{suffix}", 4, 0, [record(0, 1.0), record(50, 0.45, irr=a2_irr)], seed=seed)
    table = seed_table(collect_runs(root)).set_index("variant")
    c2 = table.loc["C2"]
    # mean 0.5, sd 0.1, t(0.975, 2 df) = 4.302653: half width 4.302653 * 0.1 / sqrt(3) = 0.248414
    assert c2["n_seeds"] == 3 and c2["seeds"] == "42,43,44"
    assert c2["best_eval_loss"] == pytest.approx(0.5) and c2["best_eval_loss_sd"] == pytest.approx(0.1)
    assert (c2["best_eval_loss_lo"], c2["best_eval_loss_hi"]) == pytest.approx((0.5 - 0.248414, 0.5 + 0.248414),
                                                                                abs=1e-5)
    # seed 42: C2 0.4 dominates A2 0.45 (same rates); seed 43: A2's loss 0.45 beats C2's 0.6, its irrelevant pass
    # 0.5 is worse, so both are on the front; seed 44: C2 0.5 vs A2 0.45 with equal rates: A2 only
    assert c2["frontier_share"] == "2/3" and table.loc["A2", "frontier_share"] == "2/3"
    # A2's irrelevant pass: mean of 0.95, 0.5, 0.95 = 0.8, clipped interval, pooled n
    a2 = table.loc["A2"]
    assert a2["irrelevant_pass@general"] == pytest.approx(0.8) and a2["irrelevant_pass@general_n"] == 120
    assert a2["irrelevant_pass@general_hi"] == 1.0 and 0 <= a2["irrelevant_pass@general_lo"] < 0.8
    assert table.loc["A0", "n_seeds"] == 1
    # C2's irrelevant pass is 0.95 (38/40) in every seed: the t-interval has width 0, so the pooled counts' Wilson
    # interval (114/120) is the interval
    c2_irr = (table.loc["C2", "irrelevant_pass@general_lo"], table.loc["C2", "irrelevant_pass@general_hi"])
    assert c2_irr == pytest.approx((rate(114, 120).lo, rate(114, 120).hi))


def test_h4_reads_the_trajectory_after_the_first_guardrail_movement():
    study = [row("C2", 2, 4, 0.45), row("C3", 2, 6, 0.45)]
    flat = [1.0] * 5  # general loss never moves: only the runs' own guardrail records say when they moved
    # C2's guardrails first moved at step 50 (eval loss 0.5) and its loss fell to 0.3 after: kept improving;
    # C3's first moved at step 25 (0.6) and its loss stayed within 2%: stalled
    curves = {"C2": (curve([1.0, 0.6, 0.5, 0.4, 0.3], flat)[0], {"first_bad_steps": {"hallucination_rise@task": 50}}),
              "C3": (curve([1.0, 0.6, 0.595, 0.598, 0.60], flat)[0], {"first_bad_steps": {"irrelevant_drop@task": 25,
                                                                                          "gap_widening": 75}})}
    v = verdicts(study, curves)["H4"]
    assert v["verdict"] == "supported" and "1 of 2" in v["evidence"] and "C3 from step 25: 0.600->0.595" in v["evidence"]
    curves["C3"] = (curves["C3"][0], {"first_bad_steps": {}})  # C3's guardrails never moved: it held
    v = verdicts(study, curves)["H4"]
    assert v["verdict"] == "not supported" and "C2 from step 50: 0.500->0.300" in v["evidence"]


def test_heatmap_marks_differences_within_noise():
    """The issue's case: general loss 0.232-0.235 (within the verdicts' 2% tolerance) is one colour band and
    marked as noise; a rate whose Wilson interval overlaps the best's is marked, one apart is not."""
    from lora_kit.frontier import colour_limits, near_best

    losses = pd.Series([0.232, 0.235, 0.2345])
    assert colour_limits(losses, "general_loss") == pytest.approx({"vmin": 0.232, "vmax": 0.232 * 1.02})
    assert colour_limits(pd.Series([0.2, 0.5]), "general_loss") == {"vmin": 0.2, "vmax": 0.5}
    assert colour_limits(pd.Series([0.97, 1.0]), "irrelevant_pass@general") == {"vmin": 0.0, "vmax": 1.0}
    table = pd.DataFrame([row("A1", 2, 0, 0.232), row("C2", 2, 4, 0.235), row("C3", 2, 6, 0.30)])
    assert near_best(table, "best_eval_loss").tolist() == [True, True, False]  # 0.235/0.232 - 1 = 1.3% < 2%
    # n=200: 95% [0.910, 0.973] vs 90% [0.851, 0.934] overlap; 60% [0.531, 0.665] does not
    rates = pd.DataFrame([row("A1", 2, 0, 0.5, irr=0.95), row("C2", 2, 4, 0.5, irr=0.90),
                          row("C3", 2, 6, 0.5, irr=0.60)])
    assert rates["irrelevant_pass@general_lo"].iloc[0] < rates["irrelevant_pass@general_hi"].iloc[1]
    assert near_best(rates, "irrelevant_pass@general").tolist() == [True, True, False]
    assert near_best(rates, "hallucination@general").tolist() == [True, True, True]  # all equal


def test_h3_moves_within_each_others_noise_are_comparable():
    # LR and count move general loss by 0.30 and 0.295 (within 2% of C2's 1.0): comparable, so count does not
    # dominate generality; task fit goes to count (0.25 against 0.01)
    sweep = [row("C2_lr2x", 2, 4, 0.46, general=1.295, lr=2e-3, vit_lr=6e-3)]
    study = [r for r in STUDY if r["variant"] in ("A0", "A1", "C2")] + [row("C3", 2, 6, 0.7, general=1.3)]
    v = verdicts(study + sweep)["H3"]
    assert "general_loss moves 0.3 by count (C2 1.000 -> C3 1.300) vs 0.295 by LR" in v["evidence"], v
    assert v["verdict"] == "not supported" and v["evidence"].endswith(
        "So: count dominates task fit, count and LR move generality comparably."), v
