"""`python -m lora_kit next`: the follow-up sweep written from a summary of fake run folders, and run by the matrix.

Nothing trains: the run folders are written by hand (test_frontier's helpers), with each run's params.json holding
the full resolved config, as train.py records it.
"""
from __future__ import annotations

import json
import math
import os
import time

import pandas as pd
import pytest
import yaml

from lora_kit.config import ConfigError, load_config
from lora_kit.errors import LoraKitError
from lora_kit.followup import write_next
from lora_kit.frontier import collect_runs, hypothesis_verdicts, one_setup, write_summary
from lora_kit.matrix import check_jobs, plan_jobs

from test_frontier import record, write_run



def run(root, variant, llm, vit, best, irr=0.95, hal=0.1, **kw):
    """A finished run whose best checkpoint (step 50) has eval loss `best`; params.json's config as train.py writes
    it (load_config's resolved values, the toy profile's learning rates unless given)."""
    lr = kw.pop("lr", 1e-3)
    vit_lr = kw.pop("vit_lr", 3e-3)
    d = write_run(root, variant, llm, vit, [record(0, 1.0), record(25, best + 0.1, irr=irr, hal=hal),
                                            record(50, best, irr=irr, hal=hal)], lr=lr, vit_lr=vit_lr, **kw)
    return resolved(d, llm_last=llm, vit_last=vit, learning_rate=lr, vit_lr=vit_lr)


def resolved(d, **values):
    """The run folder d with params.json's config as train.py records it (every parameter, resolved)."""
    params = json.loads((d / "params.json").read_text())
    params["config"] = load_config([], {"variant": d.name, **values}).to_dict()
    (d / "params.json").write_text(json.dumps(params))
    return d


@pytest.fixture
def summary(tmp_path):
    """A study whose Pareto front (loss min, irrelevant pass max, hallucination min) is A1, C2 and B2.

    A1 (0.40, 90%, 10%), C2 (0.48, 95%, 10%), B2 (0.60, 95%, 5%): none dominates another; A0 (1.0, 95%, 10%),
    B3 (0.70, 90%, 10%) and C2_lr2 (0.50, 90%, 10%) are dominated; A2 has no feasible checkpoint."""
    root = tmp_path / "runs"
    resolved(write_run(root, "A0", 0, 0, [record(0, 1.0, checkpoint=False)]))
    run(root, "A1", 2, 0, 0.40, irr=0.9)
    resolved(write_run(root, "A2", 4, 0, [record(0, 1.0), record(25, 0.5, irr=0.5), record(50, 0.45, irr=0.3, hal=0.6)],
                       status="stopped_early", best_step=None, stop=50), llm_last=4)
    run(root, "B2", 0, 4, 0.60, hal=0.05)
    run(root, "B3", 0, 6, 0.70, irr=0.9)
    run(root, "C2", 2, 4, 0.48)
    run(root, "C2_lr2", 2, 4, 0.50, irr=0.9, lr=2e-3, vit_lr=6e-3)  # an earlier LR change: C2_lr2x is not written
    write_summary(root, tmp_path / "summary", log=lambda *_: None)
    return tmp_path


def expected_sweep() -> dict[str, dict]:
    """The follow-up's files, from the plan's rules: ranks 8/16/32, each trained tower's LR x0.5/x2, llm_last 1 for
    a decoder winner, and progressive unfreezing along the winner's tower through the counts the study tried."""
    lr, vit_lr = 1e-3, 3e-3  # every winner's (the toy profile's)
    per_stage = math.ceil(max(50, 2 * 20) / 20) * 20  # best step 50; patience 2 x eval_steps 20 (toy profile) -> 60
    out = {}
    for w, llm, vit in (("A1", 2, 0), ("C2", 2, 4), ("B2", 0, 4)):
        base = {"derived_from": w, "llm_last": llm, "vit_last": vit, "lora_rank": 16, "learning_rate": lr,
                "vit_lr": vit_lr}
        out[f"{w}_r8"] = base | {"lora_rank": 8}
        out[f"{w}_r32"] = base | {"lora_rank": 32}
        for f, tag in ((0.5, "0.5x"), (2.0, "2x")):
            scaled = ({"learning_rate": lr * f} if llm else {}) | ({"vit_lr": vit_lr * f} if vit else {})
            out[f"{w}_lr{tag}"] = base | scaled  # the rate of each tower the winner trains
        if llm > 1:
            out[f"{w}_llm_last1"] = base | {"llm_last": 1}
        tower, tried = ("vit_last", [4, 6]) if vit else ("llm_last", [2, 4])  # A2 tried llm_last 4 (infeasible)
        out[f"{w}_progressive"] = base | {tower: tried[0], "stages": [{tower: n, "max_steps": per_stage}
                                                                      for n in tried]}
    del out["C2_lr2x"]  # C2_lr2 ran it (learning_rate 2e-3, vit_lr 6e-3)
    return out


def test_next_writes_the_sweep_around_the_frontier_and_the_matrix_accepts_it(summary):
    out, lines = summary / "next", []
    paths = write_next(summary / "summary", out, log=lines.append)
    expected = expected_sweep()
    assert set(paths) == {"A0", *expected}
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{v}.yaml" for v in ["A0", *expected]] + ["next.txt"])
    text = "\n".join(lines)
    assert text == (out / "next.txt").read_text(encoding="utf-8").rstrip("\n")
    assert f"Pareto front of {summary / 'summary' / 'frontier.csv'}" in text
    assert "Winners (the trained runs on it): A1, C2, B2." in text  # lowest eval loss first
    assert "Not written: C2_lr2x: already run as C2_lr2" in text
    assert f"matrix --params-dir {out}" in text
    for name, want in expected.items():
        raw = yaml.safe_load(paths[name].read_text(encoding="utf-8"))
        assert raw == {"variant": name, **want}, name  # the file sets exactly these
        lines = paths[name].read_text(encoding="utf-8").splitlines()
        comment = " ".join(line[2:] for line in lines if line.startswith("# "))
        assert lines[0].startswith(f"# {name}: {want['derived_from']} (llm_last "), lines[0]
        assert f"Derived from {want['derived_from']}, on the Pareto front in {summary / 'summary'}" in comment
        cfg = load_config([paths[name]], {"output_dir": str(summary / "runs")})
        assert cfg.variant_name == name and cfg.derived_from == want["derived_from"]
        for key, value in want.items():
            got = [s.to_dict() for s in cfg.stages] if key == "stages" else getattr(cfg, key)
            assert got == (value if key == "stages" else tuple(value) if isinstance(value, list) else value), (name, key)
    runnable = ["A0", *expected]
    jobs = plan_jobs(runnable, params_dir=out)
    assert [j.variant for j in jobs][0] == "A0" and {j.params_file for j in jobs} == {paths[v] for v in runnable}
    check_jobs(jobs, summary / "runs")  # every written file loads and passes the matrix's checks
    # by default --params-dir runs every file of the folder
    assert {j.variant for j in plan_jobs([], params_dir=out)} == {"A0", *expected}


def test_the_matrix_refuses_a_follow_up_run_under_other_settings_than_its_winner(summary):
    out = summary / "next"
    write_next(summary / "summary", out, log=lambda *_: None)
    jobs = plan_jobs(["A1_lr2x"], params_dir=out, overrides={"eval_steps": 10, "save_steps": 10})
    with pytest.raises(ConfigError, match=r"A1_lr2x .*derived_from A1, which ran with other values.*eval_steps: 20 -> "
                                          r"10; save_steps: 20 -> 10\. Fix: give the matrix the study's -f files"):
        check_jobs(jobs, summary / "runs")
    with pytest.raises(ConfigError, match="holds no params.json"):  # in another runs folder, A1 is not there
        check_jobs(plan_jobs(["A1_lr2x"], params_dir=out), summary / "elsewhere")
    # a file whose variant is not its name would write another run folder than the one the matrix watches
    (out / "mine.yaml").write_text("variant: theirs\nllm_last: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="variant = 'theirs'.*Fix: set variant: mine"):
        check_jobs(plan_jobs(["mine"], params_dir=out), summary / "runs")
    with pytest.raises(ConfigError, match="--all names the study's variants"):
        plan_jobs([], all_variants=True, params_dir=out)
    with pytest.raises(ConfigError, match="no such folder"):
        plan_jobs([], params_dir=summary / "nowhere")


def test_next_refuses_a_missing_or_stale_summary_and_a_used_folder(summary, tmp_path):
    with pytest.raises(LoraKitError, match="no frontier.csv in .*Fix: run the study, then python -m lora_kit summary"):
        write_next(tmp_path / "no_summary", tmp_path / "n0", log=lambda *_: None)
    out = summary / "next"
    write_next(summary / "summary", out, log=lambda *_: None)
    with pytest.raises(LoraKitError, match="already holds .*--overwrite"):
        write_next(summary / "summary", out, log=lambda *_: None)
    (out / "stray.yaml").write_text("variant: stray\n", encoding="utf-8")
    write_next(summary / "summary", out, overwrite=True, log=lambda *_: None)
    assert not (out / "stray.yaml").exists()  # a stale variant file would have run with the sweep
    later = time.time() + 5
    os.utime(summary / "runs" / "C2" / "summary.json", (later, later))  # C2 changed after the summary
    with pytest.raises(LoraKitError, match=r"older than the runs .*changed since it was written: C2\. Fix: wait for "
                                           r"running runs to finish, then python -m lora_kit summary"):
        write_next(summary / "summary", tmp_path / "n1", log=lambda *_: None)
    write_summary(summary / "runs", summary / "summary", log=lambda *_: None)
    run(summary / "runs", "D1", 4, 2, 0.9)  # a run the summary has not read
    with pytest.raises(LoraKitError, match="not in it: D1"):
        write_next(summary / "summary", tmp_path / "n2", log=lambda *_: None)


def test_next_on_the_cli_and_h3_after_the_sweep(summary, capsys):
    from lora_kit.__main__ import main

    assert main(["next", "--summary-dir", str(summary / "summary"), "--out", str(summary / "next")]) == 0
    assert "Winners (the trained runs on it): A1, C2, B2." in capsys.readouterr().out
    assert main(["matrix", "--params-dir", str(summary / "nowhere"), "--dry-run"]) == 2
    assert "no such folder" in capsys.readouterr().err
    # the sweep's LR runs as the matrix would leave them: H3 now compares C2's learning rates with its neighbours
    runs = summary / "runs"
    run(runs, "C2_lr0.5x", 2, 4, 0.49, lr=5e-4, vit_lr=1.5e-3)
    df = collect_runs(runs)
    h3 = next(v for v in hypothesis_verdicts(one_setup(df)[0]) if v["hypothesis"] == "H3")
    # count: C2 (0.48) -> A1 (2, 0) 0.40 and B2 (0, 4) 0.60: 0.12; LR: C2 -> C2_lr2 0.50, C2_lr0.5x 0.49: 0.02
    assert "Around C2: 2 modest learning-rate changes (C2->C2_lr0.5x, C2->C2_lr2)" in h3["evidence"], h3
    assert "best_eval_loss moves 0.12 by count (C2 0.480 -> B2 0.600) vs 0.02 by LR" in h3["evidence"], h3
    # no generality metric moved beyond noise (n = 40): task fit alone decides
    assert h3["verdict"] == "supported" and h3["evidence"].endswith("So: count dominates task fit."), h3
    assert pd.read_csv(summary / "summary" / "study.csv")["derived_from"].isna().all()  # the study's own runs


def test_a_progressive_winner_keeps_its_stages_and_gets_no_ladder_of_its_own(tmp_path):
    from lora_kit.followup import plan_next

    stages = [{"vit_last": 2, "max_steps": 40}, {"vit_last": 4, "max_steps": 40}]
    d = run(tmp_path / "runs", "C2_progressive", 2, 2, 0.4)
    params = json.loads((d / "params.json").read_text())
    params["config"]["stages"] = stages
    (d / "params.json").write_text(json.dumps(params))
    front = pd.DataFrame([{"variant": "C2_progressive", "trained": True, "best_step": 50, "run_dir": str(d),
                           "setup": "s"}])
    study = pd.DataFrame([{"variant": "C2_progressive", "status": "completed", "setup": "s", "llm_last": 2,
                           "vit_last": 2, "lora_rank": 16, "learning_rate": 1e-3, "vit_lr": 3e-3,
                           "stages": json.dumps(stages)}])
    variants, skipped = plan_next(front, study)
    assert [v.name for v in variants] == ["C2_progressive_r8", "C2_progressive_r32", "C2_progressive_lr0.5x",
                                          "C2_progressive_lr2x"]
    assert all(v.stages == stages for v in variants)
    assert skipped == ["C2_progressive: no llm_last-1 or progressive variant (it is a progressive run)"]


def test_a_finished_follow_up_of_a_regex_winner_counts_as_already_run():
    """study.csv's row of a run targeted by regex has the same key as the follow-up variant that made it, so `next`
    skips it instead of refusing its folder as another run (the key held None for every run's regex)."""
    from lora_kit.followup import Variant, _run_key

    regex = r"model\.language_model\.layers\.7\.self_attn\.(q|v)_proj"
    values = {"llm_last": 0, "vit_last": 0, "lora_rank": 8, "learning_rate": 1e-3, "vit_lr": 3e-3,
              "target_regex": regex}
    row = pd.Series({**values, "variant": "R_r8", "stages": float("nan")})
    assert _run_key(row) == Variant("R_r8", "R", values, "rank 8").key()
    assert _run_key(row.drop("target_regex")) != Variant("R_r8", "R", values, "rank 8").key()
