"""Guardrails on synthetic evaluation records: triggers, caption sanity, baseline, best checkpoint, metrics.jsonl.

Every expected number is worked out by hand in the comment next to it. Defaults (RunConfig): irrelevant
drop 20% or below 80% for 2 evaluations, hallucination +15 points for 2, gap +0.06 and worsening for 2,
caption degraded 2 in a row, best-checkpoint margins 10 points.
"""
from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from lora_kit.config import RunConfig
from lora_kit.errors import DataError, LoraKitError
from lora_kit.guardrails import (
    Trigger, active_triggers, append_metrics, baseline_record, caption_sanity, check_triggers,
    choose_best, guardrails_that_cannot_act, read_metrics, recorded_triggers,
)
from lora_kit.setups import DATA_FILES, describe_setup

CFG = RunConfig()
TERMS = {"colours": ["红色", "蓝色"], "shapes": ["圆形", "三角形"]}


def r(rate, n=32):
    """A Rate dict; rate None = nothing measured (n = 0)."""
    if rate is None:
        return {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    return {"k": round(rate * n), "n": n, "rate": rate, "lo": 0.0, "hi": 1.0}


def rec(step, irr=0.9, hal=0.1, eval_loss=0.5, train_loss=None, gap=None, caption=None, checkpoint=None):
    return {"step": step, "eval_loss": eval_loss, "train_loss": train_loss, "gap": gap,
            "irrelevant_pass": r(irr), "hallucination": r(hal), "caption": caption,
            "checkpoint": checkpoint}


BASE = rec(0, irr=0.9, hal=0.1)


def names(history, baseline=BASE, cfg=CFG):
    return [t.name for t in active_triggers(history, baseline, cfg)]


# ---- irrelevant_drop -----------------------------------------------------------------------------


def test_irrelevant_relative_branch_fires_on_the_second_bad_evaluation():
    cfg = dataclasses.replace(CFG, irrelevant_min=0.5)  # only the relative bound: 0.9 * (1 - 0.2) = 0.72
    history = [BASE, rec(25, irr=0.70)]
    assert check_triggers(history, BASE, cfg) is None  # first bad evaluation: not yet
    history.append(rec(50, irr=0.70))
    trigger = check_triggers(history, BASE, cfg)
    assert isinstance(trigger, Trigger) and trigger.name == "irrelevant_drop" and trigger.step == 50
    assert trigger.values["steps"] == [25, 50] and trigger.values["rates"] == [0.70, 0.70]
    assert trigger.values["baseline"] == 0.9
    assert trigger.values["relative_threshold"] == pytest.approx(0.72)
    assert trigger.values["threshold"] == pytest.approx(0.72)
    assert "72.0%" in trigger.message and "90.0%" in trigger.message
    # 0.73 is a drop of 18.9% only: not bad
    assert check_triggers([BASE, rec(25, irr=0.73), rec(50, irr=0.73)], BASE, cfg) is None


def test_irrelevant_absolute_branch():
    cfg = dataclasses.replace(CFG, irrelevant_drop_max=0.5)  # relative bound 0.45; absolute 0.80 rules
    assert check_triggers([BASE, rec(25, irr=0.75)], BASE, cfg) is None
    trigger = check_triggers([BASE, rec(25, irr=0.75), rec(50, irr=0.78)], BASE, cfg)
    assert trigger.name == "irrelevant_drop" and trigger.values["threshold"] == 0.8
    assert trigger.values["relative_threshold"] == pytest.approx(0.45)
    assert check_triggers([BASE, rec(25, irr=0.8), rec(50, irr=0.8)], BASE, cfg) is None  # not below 80%
    # without a baseline rate only the absolute bound applies
    no_base = rec(0, irr=None)
    assert check_triggers([no_base, rec(25, irr=0.75), rec(50, irr=0.75)], no_base, cfg).name == "irrelevant_drop"


def test_a_drop_of_exactly_twenty_percent_does_not_count():
    base = rec(0, irr=30 / 32)  # 0.9375 * 0.8 = 0.75 (0.7500000000000001 in floats)
    cfg = dataclasses.replace(CFG, irrelevant_min=0.5)
    assert check_triggers([base, rec(25, irr=24 / 32), rec(50, irr=24 / 32)], base, cfg) is None
    assert check_triggers([base, rec(25, irr=23 / 32), rec(50, irr=23 / 32)], base, cfg).name == "irrelevant_drop"


def test_a_good_evaluation_resets_the_streak():
    bad, good = 0.5, 0.9
    assert names([BASE, rec(25, irr=bad), rec(50, irr=good), rec(75, irr=bad)]) == []
    history = [BASE, rec(25, irr=bad), rec(50, irr=good), rec(75, irr=bad), rec(100, irr=bad)]
    assert names(history) == ["irrelevant_drop"]
    # a trigger holds while the streak lasts: reported again at the third bad evaluation
    trigger = check_triggers([BASE, rec(25, irr=bad), rec(50, irr=bad), rec(75, irr=bad)], BASE, CFG)
    assert trigger.values["steps"] == [25, 50, 75]


def test_step_zero_is_never_a_bad_evaluation():
    own = rec(0, irr=0.5)  # a base model that already fails: its own step 0 is the baseline
    assert names([own, rec(25, irr=0.5)], own) == []  # one bad evaluation after step 0
    assert names([own, rec(25, irr=0.5), rec(50, irr=0.5)], own) == ["irrelevant_drop"]


def test_missing_rates_never_fire():
    history = [BASE, rec(25, irr=None, hal=None), rec(50, irr=None, hal=None), rec(75, irr=None, hal=None)]
    assert names(history) == []
    # None or NaN as the rate, a missing key: no evidence either
    odd = [BASE, {"step": 25, "irrelevant_pass": {"n": 32, "rate": float("nan")}}, {"step": 50}]
    assert names(odd) == []
    # a missing evaluation ends a streak: bad, missing, bad is not two in a row
    assert names([BASE, rec(25, irr=0.5), rec(50, irr=None), rec(75, irr=0.5)]) == []


def test_a_repeated_step_counts_its_later_record():
    # a resumed run evaluates step 50 again: the good re-evaluation replaces the bad one
    history = [BASE, rec(25, irr=0.5), rec(50, irr=0.5), rec(50, irr=0.9)]
    assert names(history) == []


# ---- hallucination_rise ------------------------------------------------------------------------


def test_hallucination_rise():
    # bound 0.10 + 0.15 = 0.25
    assert names([BASE, rec(25, hal=0.30)]) == []
    trigger = check_triggers([BASE, rec(25, hal=0.30), rec(50, hal=0.40)], BASE, CFG)
    assert trigger.name == "hallucination_rise" and trigger.step == 50
    assert trigger.values["threshold"] == pytest.approx(0.25) and trigger.values["rates"] == [0.30, 0.40]
    assert "25.0%" in trigger.message and "15 points" in trigger.message
    assert names([BASE, rec(25, hal=0.25), rec(50, hal=0.25)]) == []  # not more than 15 points
    assert names([BASE, rec(25, hal=0.30), rec(50, hal=0.20), rec(75, hal=0.30)]) == []  # reset
    no_base = rec(0, hal=None)
    assert names([no_base, rec(25, hal=0.9), rec(50, hal=0.9)], no_base) == []  # nothing to rise from


def test_hallucination_patience_is_a_parameter():
    cfg = dataclasses.replace(CFG, hallucination_patience=3)
    assert names([BASE, rec(25, hal=0.3), rec(50, hal=0.3)], cfg=cfg) == []
    assert names([BASE, rec(25, hal=0.3), rec(50, hal=0.3), rec(75, hal=0.3)], cfg=cfg) == ["hallucination_rise"]


# ---- gap_widening --------------------------------------------------------------------------------


def gaps(*values):
    return [BASE] + [rec(25 * (i + 1), gap=g) for i, g in enumerate(values)]


def test_gap_widening_that_keeps_worsening_fires():
    # best 0.00 (step 25); 0.10 > 0.06 and rising (bad 1); 0.12 > 0.06 and rising (bad 2)
    assert names(gaps(0.00, 0.10)) == []
    trigger = check_triggers(gaps(0.00, 0.10, 0.12), BASE, CFG)
    assert trigger.name == "gap_widening" and trigger.step == 75
    assert trigger.values["best_gap"] == 0.0 and trigger.values["best_step"] == 25
    assert trigger.values["threshold"] == pytest.approx(0.06)
    assert trigger.values["gaps"] == [0.10, 0.12] and trigger.values["previous_gap"] == 0.0


def test_gap_widening_that_does_not_keep_worsening_does_not_fire():
    assert names(gaps(0.00, 0.10, 0.10)) == []  # widened, then held
    assert names(gaps(0.00, 0.10, 0.09, 0.12)) == []  # widened, shrank, rose again once
    assert names(gaps(0.00, 0.10, 0.10, 0.11)) == []  # only the last interval worsened
    assert names(gaps(0.00, 0.03, 0.05, 0.06)) == []  # worsening but never more than 0.06 over best
    # a missing gap is no evidence: 0.12 has no previous gap, so the streak restarts at 0.13
    assert names(gaps(0.00, 0.10, None, 0.12, 0.13)) == []
    assert names(gaps(0.00, 0.10, None, 0.12, 0.13, 0.14)) == ["gap_widening"]


def test_gap_from_the_losses_when_no_gap_is_recorded():
    # eval - train: 0.75 - 0.75 = 0, 1.0 - 0.875 = 0.125, 1.25 - 1.0 = 0.25 (exact in binary)
    history = [BASE, rec(25, eval_loss=0.75, train_loss=0.75), rec(50, eval_loss=1.0, train_loss=0.875),
               rec(75, eval_loss=1.25, train_loss=1.0)]
    trigger = check_triggers(history, BASE, CFG)
    assert trigger.name == "gap_widening" and trigger.values["gaps"] == [0.125, 0.25]


# ---- caption_degraded ----------------------------------------------------------------------------


def cap(degraded, source="proxy", chrf=30.0):
    return {"n": 5, "mean_chrf_vs_baseline": chrf, "hallucinated": 0, "blind": 0, "degraded": degraded,
            "source": source}


def test_caption_degraded_twice_in_a_row():
    assert names([BASE, rec(25, caption=cap(True))]) == []
    trigger = check_triggers([BASE, rec(25, caption=cap(True)), rec(50, caption=cap(True, "manual"))], BASE, CFG)
    assert trigger.name == "caption_degraded" and trigger.values["sources"] == ["proxy", "manual"]
    assert names([BASE, rec(25, caption=cap(True)), rec(50, caption=cap(False)), rec(75, caption=cap(True))]) == []
    # no verdict (no captions, no manual rows) is no evidence
    assert names([BASE, rec(25, caption=cap(True)), rec(50, caption=cap(None)), rec(75, caption=cap(True))]) == []
    assert names([BASE, rec(25, caption=None), rec(50, caption=None)]) == []


# ---- non_finite_loss and several at once ----------------------------------------------------------


def test_non_finite_eval_loss_fires_at_once():
    trigger = check_triggers([BASE, rec(25, eval_loss=float("nan"))], BASE, CFG)
    assert trigger.name == "non_finite_loss" and trigger.step == 25 and trigger.values["baseline_eval_loss"] == 0.5
    assert names([BASE, rec(25, eval_loss=float("inf"))]) == ["non_finite_loss"]
    assert names([BASE, rec(25, eval_loss=None)]) == []  # not measured
    empty_val = rec(0, eval_loss=float("nan"))  # an empty validation set: NaN from the start
    assert names([empty_val, rec(25, eval_loss=float("nan"))], empty_val) == []
    assert names([rec(0, eval_loss=float("nan"))]) == []  # step 0 is never a trigger


def test_several_triggers_come_in_a_fixed_order():
    history = [BASE, rec(25, irr=0.5, hal=0.5), rec(50, irr=0.5, hal=0.5)]
    assert names(history) == ["irrelevant_drop", "hallucination_rise"]
    assert check_triggers(history, BASE, CFG).name == "irrelevant_drop"
    assert check_triggers([], BASE, CFG) is None and check_triggers([BASE], BASE, CFG) is None


def test_cfg_can_be_any_object_with_the_guardrail_fields():
    cfg = SimpleNamespace(irrelevant_drop_max=0.2, irrelevant_min=0.8, irrelevant_patience=1,
                          hallucination_rise_max=0.15, hallucination_patience=1, gap_widen_max=0.06,
                          gap_patience=1, caption_patience=1)
    assert check_triggers([BASE, rec(25, irr=0.5)], BASE, cfg).name == "irrelevant_drop"
    json.dumps(check_triggers([BASE, rec(25, irr=0.5)], BASE, cfg).as_dict())


def test_a_record_without_a_step_is_refused():
    with pytest.raises(DataError, match="step"):
        check_triggers([BASE, {"eval_loss": 0.3}], BASE, CFG)


# ---- caption_sanity ------------------------------------------------------------------------------

BASELINE_CAPTIONS = ["图中有一个红色的圆形。", "图中有一个蓝色的三角形。"]
OBJECTS = [["红色圆形"], ["蓝色三角形"]]


def test_caption_proxy():
    same = caption_sanity(BASELINE_CAPTIONS, BASELINE_CAPTIONS, TERMS, OBJECTS)
    assert same["mean_chrf_vs_baseline"] == 100.0 and same["degraded"] is False and same["source"] == "proxy"
    assert same["n"] == 2 and same["hallucinated"] == 0 and same["blind"] == 0 and same["disagree"] is None
    # second caption shares no character with its reference: chrF 0, mean (100 + 0) / 2 = 50
    half = caption_sanity([BASELINE_CAPTIONS[0], "好好"], BASELINE_CAPTIONS, TERMS, OBJECTS)
    assert half["mean_chrf_vs_baseline"] == 50.0 and half["degraded"] is False  # 50 >= 40
    assert caption_sanity([BASELINE_CAPTIONS[0], "好好"], BASELINE_CAPTIONS, TERMS, OBJECTS, chrf_min=60)["degraded"]
    # names a blue circle where the circle is red: one hallucinated caption more than the baseline
    wrong = caption_sanity(["图中有一个蓝色的圆形。", BASELINE_CAPTIONS[1]], BASELINE_CAPTIONS, TERMS, OBJECTS)
    assert wrong["hallucinated"] == 1 and wrong["baseline_hallucinated"] == 0 and wrong["degraded"] is True
    assert wrong["mean_chrf_vs_baseline"] > 40
    # without objects every colour or shape is a hallucination: the baseline's too, so no rise
    ood = caption_sanity(BASELINE_CAPTIONS, BASELINE_CAPTIONS, TERMS)
    assert ood["hallucinated"] == ood["baseline_hallucinated"] == 2 and ood["degraded"] is False
    # an empty caption is blind; the baseline's were not
    blind = caption_sanity(["", BASELINE_CAPTIONS[1]], BASELINE_CAPTIONS, TERMS, OBJECTS, chrf_min=0)
    assert blind["blind"] == 1 and blind["baseline_blind"] == 0 and blind["degraded"] is True


def test_caption_without_captions_has_no_verdict():
    none = caption_sanity([], [], TERMS)
    assert none["n"] == 0 and none["degraded"] is None and none["mean_chrf_vs_baseline"] is None
    with pytest.raises(ValueError, match="parallel"):
        caption_sanity(["a"], [], TERMS)


def row(image, verdict, checkpoint="checkpoints/checkpoint-25"):
    return {"checkpoint": checkpoint, "image": image, "verdict": verdict, "note": "", "who": "me",
            "when": "2025-01-01T00:00:00"}


def test_manual_verdicts_decide_and_disagreement_is_reported():
    degraded_proxy = ([BASELINE_CAPTIONS[0], "好好"], BASELINE_CAPTIONS, TERMS, OBJECTS)
    rows = [row("a.png", "ok"), row("b.png", "degraded"), row("b.png", "ok"),  # b's latest verdict: ok
            row("c.png", "blind", checkpoint="checkpoints/checkpoint-50")]  # another checkpoint
    out = caption_sanity(*degraded_proxy, manual=rows, chrf_min=60, checkpoint="checkpoint-25")
    assert out["proxy_degraded"] is True and out["manual_degraded"] is False
    assert out["degraded"] is False and out["source"] == "manual" and out["disagree"] is True
    assert out["manual_verdicts"] == {"a.png": "ok", "b.png": "ok"}
    # the latest verdict on a is "hallucinated": manual and proxy agree
    out = caption_sanity(*degraded_proxy, manual=rows + [row("a.png", "hallucinated")], chrf_min=60,
                         checkpoint="checkpoints/checkpoint-25")
    assert out["degraded"] is True and out["source"] == "manual" and out["disagree"] is False
    # rows of other checkpoints only: the proxy decides
    out = caption_sanity(*degraded_proxy, manual=rows, chrf_min=60, checkpoint="checkpoints/checkpoint-75")
    assert out["source"] == "proxy" and out["degraded"] is True and out["disagree"] is None
    # manual verdicts alone (no captions) still decide
    out = caption_sanity([], [], TERMS, manual=[row("a.png", "blind")])
    assert out["degraded"] is True and out["source"] == "manual" and out["disagree"] is None
    with pytest.raises(DataError, match="verdict"):
        caption_sanity([], [], TERMS, manual=[row("a.png", "degarded")])


# ---- choose_best ---------------------------------------------------------------------------------


def ck(step, loss, irr=0.9, hal=0.1):
    return rec(step, irr=irr, hal=hal, eval_loss=loss, checkpoint=f"checkpoints/checkpoint-{step}")


def test_choose_best_lowest_eval_loss_among_feasible_only():
    # baseline irrelevant 0.9, hallucination 0.1: feasible = irrelevant >= 0.8 and hallucination <= 0.2
    history = [BASE, ck(25, 0.50), ck(50, 0.30, irr=0.70), ck(75, 0.40, hal=0.25), ck(100, 0.45, irr=0.8, hal=0.2)]
    best = choose_best(history, BASE, CFG)
    assert best["step"] == 100 and best["checkpoint"] == "checkpoints/checkpoint-100" and best["eval_loss"] == 0.45
    assert best["feasible_steps"] == [25, 100] and best["metrics"]["step"] == 100
    assert [x["step"] for x in best["rejected"]] == [50, 75]
    assert "irrelevant pass under the general prompt 70.0% < 80.0%" in best["rejected"][0]["why"]
    assert "hallucination under the general prompt 25.0% > 20.0%" in best["rejected"][1]["why"]
    assert "step 100" in best["reason"]


def test_choose_best_tie_goes_to_the_earliest_step():
    history = [BASE, ck(25, 0.5), ck(50, 0.4), ck(75, 0.4)]
    assert choose_best(history, BASE, CFG)["step"] == 50
    assert choose_best(list(reversed(history)), BASE, CFG)["step"] == 50


def test_choose_best_none_with_reasons():
    history = [BASE, ck(25, 0.3, irr=0.5), ck(50, 0.2, hal=0.5), ck(75, float("nan")), ck(100, 0.1, irr=None)]
    best = choose_best(history, BASE, CFG)
    assert best["checkpoint"] is None and best["step"] is None and best["feasible_steps"] == []
    for text in ("step 25", "irrelevant pass under the general prompt 50.0% < 80.0%", "step 50", "hallucination under the general prompt 50.0% > 20.0%",
                 "step 75", "eval loss is nan", "step 100", "irrelevant pass under the general prompt not measured"):
        assert text in best["reason"]
    assert "no evaluation record has a checkpoint" in choose_best([BASE, rec(25)], BASE, CFG)["reason"]


def test_choose_best_without_a_baseline_rate_skips_that_constraint():
    base = rec(0, irr=None, hal=0.1)
    best = choose_best([base, ck(25, 0.3, irr=None)], base, CFG)
    assert best["step"] == 25 and "irrelevant pass under the general prompt not constrained" in best["reason"]


# ---- guardrails that cannot act, triggers over a run (issue 17 case 10) ---------------------------


def test_a_baseline_under_irrelevant_min_cannot_hold_and_says_the_fix():
    base = rec(0, irr=0.0)  # 0/32: the user's benchmark, answered with another label by the base
    [problem] = guardrails_that_cannot_act(base, CFG)
    assert problem["guardrail"] == "irrelevant_drop" and problem["problem"] == "cannot_hold"
    assert "0/32" in problem["message"] and "irrelevant_min = 0.8" in problem["message"]
    assert "fires at evaluation 2" in problem["message"] and "irrelevant_label" in problem["message"]
    # what it predicts: every later evaluation is bad, so the trigger holds at the second whatever is learned
    assert names([base, rec(25, irr=0.7), rec(50, irr=0.75)], base) == ["irrelevant_drop"]
    # at the bound it holds (0.8 is not below 0.8), and a lower minimum leaves only the relative drop
    assert guardrails_that_cannot_act(rec(0, irr=0.8), CFG) == []
    assert guardrails_that_cannot_act(base, dataclasses.replace(CFG, irrelevant_min=0.0)) == []


def test_guardrails_that_can_never_fire_are_named():
    no_rows = {"step": 0, "irrelevant_pass": r(None), "hallucination": r(None)}
    assert [(p["guardrail"], p["problem"]) for p in guardrails_that_cannot_act(no_rows, CFG)] == [
        ("irrelevant_drop", "cannot_fire"), ("hallucination_rise", "cannot_fire")]
    # 0.85 + 0.15 = 1.0: no rate can be above it
    [problem] = guardrails_that_cannot_act(rec(0, irr=0.9, hal=0.85), CFG)
    assert problem["guardrail"] == "hallucination_rise" and "100%" in problem["message"]
    assert guardrails_that_cannot_act(rec(0, irr=0.9, hal=0.84), CFG) == []


def test_recorded_triggers_lists_every_evaluation_where_one_held():
    # bad at 25, 50 and 75 (< 0.72), good at 100, bad at 125: patience 2 holds at 50 and 75 only
    history = [BASE, rec(25, irr=0.5), rec(50, irr=0.5), rec(75, irr=0.6), rec(100, irr=0.9), rec(125, irr=0.5)]
    found = recorded_triggers(history, BASE, CFG)
    assert [(t.name, t.step) for t in found] == [("irrelevant_drop", 50), ("irrelevant_drop", 75)]
    assert recorded_triggers([BASE], BASE, CFG) == []


# ---- baseline_record -----------------------------------------------------------------------------


def make_run(folder, status=None, records=(), params=None):
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        append_metrics(folder / "metrics.jsonl", record)
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status}))
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))
    return folder


@pytest.fixture
def study_files(tmp_path):
    """A model folder and the six data files of a study, as describe_setup reads them."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights" * 1000)
    files = {}
    for name in DATA_FILES:  # each in its format (load_config checks it), each with its own content
        files[name] = tmp_path / "data" / f"{name}.{'json' if name == 'terms_file' else 'jsonl'}"
        files[name].parent.mkdir(exist_ok=True)
        files[name].write_text(json.dumps({"colours": ["红色"], "shapes": [name]}) if name == "terms_file" else
                               json.dumps({"messages": [{"role": "user", "content": name}], "images": []}) + "\n",
                               encoding="utf-8")
    return model, files


def params_of(model, files, trainable=0, code=None, **cfg):
    """A params.json as train() writes it, with its setup described from the files."""
    config = RunConfig(model=str(model), profile="none", **cfg)
    return {"config": config.to_dict(), "trainable_parameters": trainable, "code": code or {"commit": "abc"},
            "setup": describe_setup(config, model, files)}


def test_baseline_from_a_completed_a0(tmp_path, study_files):
    a0 = make_run(tmp_path / "A0", "completed", [rec(0, irr=0.95), rec(25, irr=0.9)], params_of(*study_files))
    mine = params_of(*study_files, trainable=1000, llm_last=2, learning_rate=1e-3)  # training settings may differ
    run = make_run(tmp_path / "C2", None, [rec(0, irr=0.7)], mine)
    record, source = baseline_record(run, tmp_path, params=mine)
    assert record["irrelevant_pass"]["rate"] == 0.95 and source.startswith(f"A0 ({a0}): the same model, data files")


def test_baseline_from_own_step_zero(tmp_path, study_files):
    mine = params_of(*study_files, trainable=1000)
    run = make_run(tmp_path / "C2", None, [rec(0, irr=0.7), rec(25, irr=0.6)], mine)
    record, source = baseline_record(run, tmp_path, params=mine)  # no A0 at all
    assert record["irrelevant_pass"]["rate"] == 0.7 and source.startswith("own step 0")
    make_run(tmp_path / "A0", "running", [rec(0, irr=0.95)], params_of(*study_files))  # A0 not completed
    record, source = baseline_record(run, tmp_path, params=mine)
    assert record["irrelevant_pass"]["rate"] == 0.7 and "'stale'" in source  # 'running', its process gone
    a0 = make_run(tmp_path / "A0", "completed")
    record, source = baseline_record(a0, tmp_path, params=params_of(*study_files))  # A0 itself: its own step 0
    assert record["irrelevant_pass"]["rate"] == 0.95 and source == "own step 0 (this run is A0)"


@pytest.mark.parametrize("change, expected", [
    ("bench_file", "bench_file: "),                     # the user's own benchmark beside the toy study's A0
    ("train_file", "train_file: "),                     # same paths, other content: a rebuilt world
    ("weights", "model: "),                             # the model folder rewritten with other weights
    ("max_new_tokens", "max_new_tokens: 256 vs 8"),     # an evaluation setting
    ("profile", "profile: 'none' vs 'toy'"),
    ("code", "code commit: 'abc' vs 'def'"),
    ("trained", "trained 1000 parameters"),
    ("legacy", "sha256 not recorded"),                  # an A0 recorded before setups were: paths only
])
def test_an_a0_of_another_setup_is_not_the_baseline(tmp_path, study_files, change, expected):
    """Issue 17 case 7: a run on the user's own data beside the toy study's completed A0 took A0's baseline."""
    model, files = study_files
    a0_params = params_of(model, files, trainable=1000 if change == "trained" else 0)
    if change == "legacy":
        a0_params = {k: v for k, v in a0_params.items() if k != "setup"}
        a0_params["data_files"] = {k: str(v) for k, v in files.items()}
        a0_params["model_path"] = str(model)
    make_run(tmp_path / "A0", "completed", [rec(0, irr=1.0, eval_loss=4.48)], a0_params)
    cfg, code = {}, None
    if change == "bench_file":
        files = {**files, "bench_file": tmp_path / "receipts_bench.jsonl"}
        files["bench_file"].write_text('{"receipt": 1}\n', encoding="utf-8")
    elif change == "train_file":
        files["train_file"].write_text('{"rebuilt": true}\n', encoding="utf-8")
    elif change == "weights":
        (model / "model.safetensors").write_bytes(b"other!!" * 1000)
    elif change == "max_new_tokens":
        cfg = {"max_new_tokens": 8}
    elif change == "code":
        code = {"commit": "def"}
    mine = params_of(model, files, trainable=1000, code=code, **cfg)
    if change == "profile":  # (RunConfig refuses the toy profile for a model folder; only the record matters)
        mine["setup"]["profile"] = mine["config"]["profile"] = "toy"
    run = make_run(tmp_path / "C2", None, [rec(0, irr=0.0, eval_loss=13.4)], mine)
    record, source = baseline_record(run, tmp_path, params=mine)
    assert record["irrelevant_pass"]["rate"] == 0.0 and record["eval_loss"] == 13.4  # its own step 0
    assert source.startswith("own step 0 (A0 ") and expected in source, source


def test_evaluate_takes_baseline_captions_only_from_an_a0_of_its_setup(tmp_path, study_files):
    """`python -m lora_kit evaluate` compared a checkpoint's captions with any completed A0's."""
    from lora_kit.evaluate import study_baseline_captions
    from lora_kit.train import code_version

    model, files = study_files
    cfg = RunConfig(model=str(model), profile="none", output_dir=str(tmp_path / "runs"),
                    **{k: str(v) for k, v in files.items()})
    make_run(tmp_path / "runs" / "A0", "completed", [{**rec(0), "captions": ["一个红色的圆形"]}],
             params_of(model, files, code=code_version()))
    captions, why = study_baseline_captions(cfg)
    assert captions == ["一个红色的圆形"] and why.startswith("A0 (")
    own_bench = tmp_path / "receipts.jsonl"
    own_bench.write_text(json.dumps({"messages": [{"role": "user", "content": "receipt"}], "images": []}) + "\n",
                         encoding="utf-8")
    captions, why = study_baseline_captions(dataclasses.replace(cfg, bench_file=str(own_bench)))
    assert captions is None and "bench_file: " in why and "receipts.jsonl" in why


def test_no_baseline_is_a_clear_error(tmp_path, study_files):
    run = make_run(tmp_path / "C2")
    with pytest.raises(LoraKitError, match="no guardrail baseline") as info:
        baseline_record(run, tmp_path, params=params_of(*study_files))
    assert "params/A0.yaml" in str(info.value) and "step 0" in str(info.value)


# ---- metrics.jsonl -------------------------------------------------------------------------------


def test_read_metrics_drops_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, rec(0))
    append_metrics(path, rec(25, eval_loss=float("nan")))
    whole = path.read_bytes()
    line = json.dumps({"step": 50, "note": "无关图片"}, ensure_ascii=False).encode()
    path.write_bytes(whole + line[: line.index("无".encode()) + 1])  # killed mid-character
    records = read_metrics(path)
    assert [x["step"] for x in records] == [0, 25] and math.isnan(records[1]["eval_loss"])
    # the next append cuts the fragment off and starts on its own line
    append_metrics(path, rec(50))
    assert [x["step"] for x in read_metrics(path)] == [0, 25, 50]
    assert path.read_bytes().count(b"\n") == 3
    # a whole record that only lacks its newline is kept
    path.write_bytes(path.read_bytes() + json.dumps(rec(75)).encode())
    assert [x["step"] for x in read_metrics(path)] == [0, 25, 50, 75]
    append_metrics(path, rec(100))
    assert [x["step"] for x in read_metrics(path)] == [0, 25, 50, 75, 100]


def test_read_metrics_refuses_a_bad_line_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 25\n{"step": 50}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    with pytest.raises(ValueError, match="step"):
        append_metrics(path, {"eval_loss": 0.3})


# ---- probe groups ----------------------------------------------------------------------------------


def grouped(step, general=(0.9, 0.1), task=(0.9, 0.1), eval_loss=0.5, checkpoint=None):
    """A record whose benchmark was asked under two prompts: (irrelevant pass, hallucination) per group."""
    return {"step": step, "eval_loss": eval_loss, "checkpoint": checkpoint,
            "probes": {"general": {"irrelevant_pass": r(general[0]), "hallucination": r(general[1])},
                       "task": {"irrelevant_pass": r(task[0]), "hallucination": r(task[1])}}}


GROUPED_BASE = grouped(0, general=(1.0, 0.0), task=(0.95, 0.05))


def test_a_trigger_fires_in_one_probe_group_alone():
    # task group: hallucination 0.05 -> 0.5 twice, above 0.05 + 0.15 = 0.20; the general group holds at 0.0
    history = [GROUPED_BASE, grouped(25, general=(1.0, 0.0), task=(0.95, 0.5)),
               grouped(50, general=(1.0, 0.0), task=(0.95, 0.5))]
    triggers = active_triggers(history, GROUPED_BASE, CFG)
    assert [(t.name, t.probe) for t in triggers] == [("hallucination_rise", "task")]
    assert triggers[0].values["baseline"] == 0.05 and triggers[0].values["threshold"] == pytest.approx(0.20)
    assert "under the task prompt" in triggers[0].message
    # watching only the general group, nothing fires
    assert active_triggers(history, GROUPED_BASE, dataclasses.replace(CFG, guardrail_probes=("general",))) == []


def test_the_irrelevant_bound_of_each_group_comes_from_its_own_baseline():
    # general baseline 1.0 -> bound max(0.8, 0.8) = 0.8; task baseline 0.95 -> bound max(0.76, 0.8) = 0.8;
    # 0.78 in the task group alone, twice, fires there and only there
    history = [GROUPED_BASE, grouped(25, task=(0.78, 0.05)), grouped(50, task=(0.78, 0.05))]
    assert [(t.name, t.probe) for t in active_triggers(history, GROUPED_BASE, CFG)] == [("irrelevant_drop", "task")]


def test_the_best_checkpoint_constraint_excludes_a_checkpoint_failing_in_one_group():
    # step 50 has the lowest loss but its task-prompt irrelevant pass 0.7 < 0.95 - 0.10 = 0.85
    history = [GROUPED_BASE, grouped(25, eval_loss=0.4, checkpoint="checkpoints/checkpoint-25"),
               grouped(50, task=(0.7, 0.05), eval_loss=0.3, checkpoint="checkpoints/checkpoint-50")]
    best = choose_best(history, GROUPED_BASE, CFG)
    assert best["step"] == 25 and best["feasible_steps"] == [25]
    assert best["rejected"] == [{"step": 50, "checkpoint": "checkpoints/checkpoint-50",
                                 "why": "irrelevant pass under the task prompt 70.0% < 85.0%"}]
    # gating the general group alone, step 50 is feasible and wins
    assert choose_best(history, GROUPED_BASE, dataclasses.replace(CFG, guardrail_probes=("general",)))["step"] == 50


def test_first_bad_steps_say_where_each_guardrail_first_moved():
    # task hallucination bad at 25 (0.3 > 0.20), fine at 50, bad at 75 and 100: first moved at 25, fired at 100;
    # general irrelevant pass 0.7 < 0.8 once at 50 (patience 2: never fired)
    history = [GROUPED_BASE, grouped(25, task=(0.95, 0.3)), grouped(50, general=(0.7, 0.0)),
               grouped(75, task=(0.95, 0.3)), grouped(100, task=(0.95, 0.3))]
    from lora_kit.guardrails import first_bad_steps

    assert first_bad_steps(history, GROUPED_BASE, CFG) == {"hallucination_rise@task": 25, "irrelevant_drop@general": 50}
    assert [t.key for t in active_triggers(history, GROUPED_BASE, CFG)] == ["hallucination_rise@task"]


def test_eval_loss_plateau_after_patience_evaluations_without_a_relative_improvement():
    from lora_kit.guardrails import eval_loss_plateau

    losses = [4.0, 2.0, 1.0, 0.50, 0.495, 0.49, 0.30, 0.296, 0.2955]
    history = [rec(20 * i, eval_loss=loss) for i, loss in enumerate(losses)]
    # threshold 2%: 0.495 and 0.49 are within 2% of 0.50 (>= 0.49), so with patience 2 the plateau holds at step 100
    assert eval_loss_plateau(history[:6], 2, 0.02) == {
        "step": 100, "best_step": 60, "best_eval_loss": 0.5,
        "message": "Eval loss plateaued: no evaluation since step 60 (0.5000) lowered it by more than 2% "
                   "(2 evaluations, plateau_patience 2)."}
    assert eval_loss_plateau(history[:5], 2, 0.02) is None  # one evaluation without improvement so far
    assert eval_loss_plateau(history[:7], 2, 0.02) is None  # 0.30 improved again
    assert eval_loss_plateau(history, 2, 0.02)["best_step"] == 120
    assert eval_loss_plateau(history, 0, 0.02) is None  # off
    assert eval_loss_plateau(history[:6], 2, 0.005) is None  # 0.49 is 2% below 0.50: an improvement at 0.5%
