"""The matrix runner: order, skipping finished runs, recording failures and carrying on, grids."""
from __future__ import annotations

import json

import pytest

from lora_kit.errors import ConfigError
from lora_kit.matrix import Job, plan_jobs, run_matrix, status_table
from lora_kit.paths import PARAMS_DIR
from lora_kit.rundir import RunFolder, write_json_atomic


def test_priority_order_puts_a0_first():
    jobs = plan_jobs([])
    assert [j.variant for j in jobs] == ["A0", "A1", "A2", "B2", "B3", "C2", "C3"]
    assert [j.variant for j in plan_jobs(["C3", "B2"])] == ["A0", "C3", "B2"]
    assert len(plan_jobs([], all_variants=True)) == 12


def test_grid_expands_around_each_variant():
    jobs = plan_jobs(["C2"], grid=["lora_rank=8,16", "learning_rate=1e-4,2e-4"])
    names = [j.variant for j in jobs]
    assert names[0] == "A0" and len(names) == 5
    assert "C2_lora_rank8_learning_rate0.0001" in names
    job = jobs[names.index("C2_lora_rank16_learning_rate0.0002")]
    assert job.overrides == {"lora_rank": 16, "learning_rate": 2e-4, "variant": "C2_lora_rank16_learning_rate0.0002"}


def test_seeds_replicate_each_trained_variant_and_a0_runs_once():
    jobs = plan_jobs(["C2", "A1"], seeds=3)
    assert [j.variant for j in jobs] == ["A0", "C2", "C2_seed43", "C2_seed44", "A1", "A1_seed43", "A1_seed44"]
    assert jobs[1].overrides == {} and jobs[2].overrides == {"seed": 43, "variant": "C2_seed43"}
    # from a seed given for every run, and combined with a grid
    jobs = plan_jobs(["C2"], grid=["lora_rank=8"], overrides={"seed": 7}, seeds=2)
    assert [(j.variant, j.overrides["seed"]) for j in jobs[1:]] == [("C2_lora_rank8", 7), ("C2_lora_rank8_seed8", 8)]
    with pytest.raises(ConfigError, match="--seeds 0"):
        plan_jobs(["C2"], seeds=0)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ConfigError, match="no params/Z9.yaml; known variants: .*C2"):
        plan_jobs(["Z9"])


def test_finished_runs_are_skipped_and_a_failure_is_recorded_while_the_rest_continue(tmp_path):
    runs = tmp_path / "runs"
    (runs / "A0").mkdir(parents=True)
    write_json_atomic(runs / "A0" / "summary.json", {"variant": "A0", "status": "completed"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("variant: BAD\nlora_rnak: 8\n")  # a typo: the config refuses it
    also_bad = tmp_path / "also_bad.yaml"
    also_bad.write_text("variant: ALSO\nllm_last: -1\n")
    log = []
    statuses = run_matrix([Job("A0", PARAMS_DIR / "A0.yaml"), Job("BAD", bad), Job("ALSO", also_bad)],
                          runs_root=runs, log=log.append)
    assert statuses == {"A0": "completed", "BAD": "failed", "ALSO": "failed"}
    assert "[A0] completed: skipped" in log
    # the failure is recorded in the run folder with where to look, and the config error is in the log
    summary = json.loads((runs / "BAD" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "lora_rnak" in (runs / "BAD" / "papermill.log").read_text()
    table = status_table(runs)
    assert "BAD" in table and "failed" in table and "completed" in table
    # a follow-up's long name keeps its own column (it ran into the status as "A2_progressivestopped_early")
    (runs / "A2_progressive").mkdir()
    write_json_atomic(runs / "A2_progressive" / "summary.json", {"variant": "A2_progressive", "status": "completed"})
    row = next(line for line in status_table(runs).splitlines() if line.startswith("A2_progressive"))
    assert row.split()[:2] == ["A2_progressive", "completed"]


def test_dry_run_reports_resume_and_runs_nothing(tmp_path):
    runs = tmp_path / "runs"
    ckpt = runs / "C2" / "checkpoints" / "checkpoint-50"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    write_json_atomic(runs / "C2" / "summary.json", {"variant": "C2", "status": "running", "pid": 999999})
    log = []
    statuses = run_matrix(plan_jobs(["C2"]), runs_root=runs, dry_run=True, log=log.append)
    assert statuses["C2"] == "stale"  # 'running' but no live process holds the lock
    assert "[C2] stale: will resume from checkpoint-50" in log
    assert RunFolder(runs / "C2").status() == "stale" and not (runs / "A0").exists()


def test_parallel_cpu_jobs_share_the_cores_as_torch_threads(tmp_path, monkeypatch):
    import os
    import subprocess

    import lora_kit.matrix as matrix

    seen = []
    monkeypatch.setattr(matrix, "_gpus", lambda: 0)
    monkeypatch.setattr(subprocess, "run", lambda cmd, env, **kw: seen.append(env) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    matrix.run_job(Job("C2", PARAMS_DIR / "C2.yaml"), tmp_path, parallel=2, log=lambda *_: None)
    matrix.run_job(Job("C3", PARAMS_DIR / "C3.yaml"), tmp_path, parallel=1, log=lambda *_: None)
    assert seen[0]["OMP_NUM_THREADS"] == "4" and "OMP_NUM_THREADS" not in seen[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    matrix.run_job(Job("C2", PARAMS_DIR / "C2.yaml"), tmp_path, parallel=2, log=lambda *_: None)
    assert seen[2]["OMP_NUM_THREADS"] == "3"


def test_a_finished_run_is_redone_with_overwrite_and_refused_when_the_job_differs(toy_ckpt, mini_world, tmp_path):
    """`matrix --set lora_rank=8` (or the same matrix on edited data) beside a finished A1 said "[A1] completed:
    skipped" and the summary then showed the old run as the one asked for; `--set overwrite=true` was skipped too."""
    import hashlib

    from lora_kit.config import load_config
    from lora_kit.inputs import data_files
    from lora_kit.matrix import unfinished
    from lora_kit.setups import describe_setup

    runs = tmp_path / "runs"
    own = {"model": str(toy_ckpt), "profile": "none", **{k: str(mini_world / f) for k, f in (
        ("train_file", "task_train.jsonl"), ("val_file", "task_val.jsonl"), ("bench_file", "bench.jsonl"),
        ("general_file", "general_eval.jsonl"), ("spotcheck_file", "spotcheck.jsonl"), ("terms_file", "terms.json"))}}
    terms = tmp_path / "terms.json"  # a copy the test may edit
    terms.write_text((mini_world / "terms.json").read_text(encoding="utf-8"), encoding="utf-8")
    own["terms_file"] = str(terms)
    cfg = load_config([PARAMS_DIR / "A1.yaml"], {**own, "output_dir": str(runs)})
    files = data_files(cfg)
    (runs / "A1").mkdir(parents=True)
    write_json_atomic(runs / "A1" / "params.json", {  # what train() records, without training
        "config": cfg.to_dict(), "model_path": str(toy_ckpt), "data_files": {k: str(v) for k, v in files.items()},
        "setup": describe_setup(cfg, toy_ckpt, files)})
    write_json_atomic(runs / "A1" / "summary.json", {"variant": "A1", "status": "completed"})
    job = lambda **extra: [Job("A1", PARAMS_DIR / "A1.yaml", {**own, **extra})]  # noqa: E731
    log = []
    assert unfinished(job(), runs, log.append) == ({"A1": "completed"}, []) and "[A1] completed: skipped" in log
    with pytest.raises(ConfigError) as e:
        unfinished(job(lora_rank=8), runs, log.append)
    assert "1 finished run in" in str(e.value) and "  - A1: lora_rank: 16 -> 8" in str(e.value)
    assert "--set overwrite=true" in str(e.value)
    old = hashlib.sha256(terms.read_bytes()).hexdigest()[:12]
    terms.write_text('{"colours": ["红色"], "shapes": ["圆形"]}', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"A1: terms_file \(its content, sha256\): '{old}\.\.\.' -> "):
        unfinished(job(), runs, log.append)
    log.clear()
    statuses, todo = unfinished(job(lora_rank=8, overwrite=True), runs, log.append)
    assert [j.variant for j in todo] == ["A1"] and log == ["[A1] completed: overwrite: true, will run again"]


def test_matrix_takes_f_files_before_each_variant_file_and_checks_every_job_first(toy_ckpt, tmp_path, capsys,
                                                                                   monkeypatch):
    from lora_kit.__main__ import main
    from lora_kit.matrix import check_jobs

    setup = tmp_path / "my_setup.yaml"
    setup.write_text(f"profile: none\nmodel: {toy_ckpt}\nlora_rank: 8\n", encoding="utf-8")
    jobs = plan_jobs(["C2"], files=[setup], seeds=2)
    assert [j.params_files for j in jobs] == [[setup, PARAMS_DIR / "A0.yaml"], [setup, PARAMS_DIR / "C2.yaml"],
                                              [setup, PARAMS_DIR / "C2.yaml"]]
    check_jobs(jobs, tmp_path / "runs")  # a good setup passes
    # what train.ipynb is handed: every file in order, then the job's values
    import subprocess

    import lora_kit.matrix as matrix
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    matrix.run_job(jobs[2], tmp_path / "runs", log=lambda *a: None)
    monkeypatch.undo()
    seen = {"cmd": seen[0]}
    injected = json.loads(seen["cmd"][seen["cmd"].index("-y") + 1])
    assert injected["params_file"] == [str(setup), str(PARAMS_DIR / "C2.yaml")] and injected["seed"] == 43
    # a model folder that does not exist: refused before anything runs, dry run and Slurm included
    runs = tmp_path / "runs2"
    code = main(["matrix", "C2", "--backend", "slurm", "--dry-run", "--runs-root", str(runs),
                 "--set", "profile=none", "--set", f"model={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 2 and "2 of 2 matrix jobs cannot run; nothing was started" in err
    assert "no such folder" in err and "C2 (" in err and not runs.exists()
