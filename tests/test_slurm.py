"""The matrix on Slurm, driven through submitit's local executor: A0 first, one job per variant, status from run folders."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_kit.errors import ConfigError
from lora_kit.matrix import plan_jobs, run_status, slurm_executor, status_table, submit_matrix

from test_train import tiny_params


@pytest.mark.slow
def test_submitted_matrix_runs_a0_first_then_the_array_and_reports_from_run_folders(toy_ckpt, mini_world, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs inherit it: one thread each on a shared CPU
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2)
    overrides = {k: v for k, v in json.loads(params.read_text()).items() if k != "output_dir"}
    runs = tmp_path / "runs"
    jobs = plan_jobs(["A1"], overrides=overrides)
    executor = slurm_executor(tmp_path / "slurm", time_min=10, cluster="local")
    log = []
    submitted = submit_matrix(jobs, executor, runs_root=runs, log=log.append)
    assert list(submitted) == ["A0", "A1"]
    # A0's job ended before the array was submitted; A1's folder says so until its job starts
    assert run_status(runs, "A0") == "completed"
    assert run_status(runs, "A1") in ("queued", "running")
    assert f"[A1] submitted as job {submitted['A1'].job_id}" in log

    assert [submitted[v].result() for v in ("A0", "A1")] == ["completed", "completed"]
    a1 = json.loads((runs / "A1" / "summary.json").read_text())
    assert a1["status"] == "completed" and a1["baseline_source"].startswith("A0 (")  # judged against A0's baseline
    assert json.loads((runs / "A1" / "params.json").read_text())["processes"]["world_size"] == 1
    for v in ("A0", "A1"):  # each ran as its own job, through the notebook, with a log of its own
        assert (runs / v / "train.ipynb").is_file()
        assert submitted[v].paths.stdout.is_file()
    table = status_table(runs).splitlines()
    assert [line.split()[:2] for line in table[1:]] == [["A0", "completed"], ["A1", "completed"]]

    # finished runs are not submitted again
    assert submit_matrix(jobs, executor, runs_root=runs, log=log.append) == {}
    assert "[A1] completed: skipped" in log


def test_queued_runs_show_in_the_status_table_and_are_not_submitted_twice(tmp_path):
    from lora_kit.matrix import mark_queued, unfinished

    runs = tmp_path / "runs"
    mark_queued(runs / "C2", "4242")
    assert run_status(runs, "C2") == "queued"
    assert status_table(runs).splitlines()[1].split()[:2] == ["C2", "queued"]
    log = []
    _, todo = unfinished(plan_jobs(["C2"]), runs, log.append)
    assert [j.variant for j in todo] == ["A0"]
    assert any("[C2] queued as Slurm job 4242: skipped" in line for line in log)


def test_gpus_per_job_above_one_trains_each_variant_data_parallel(tmp_path):
    class Recorder:  # stands in for a submitit executor: what would be submitted, with which parameters
        cluster = "slurm"

        def __init__(self):
            self.params, self.calls = {}, []

        def update_parameters(self, **kw):
            self.params |= kw

        def submit(self, fn, job, runs_root):
            self.calls.append((job.variant, job.overrides.get("nproc"), self.params["gpus_per_node"]))
            return type("J", (), {"job_id": "100"})()

        def map_array(self, fn, jobs, roots):
            self.calls += [(j.variant, j.overrides.get("nproc"), self.params["gpus_per_node"]) for j in jobs]
            assert self.params["slurm_additional_parameters"] == {"dependency": "afterany:100"}
            return [type("J", (), {"job_id": f"101_{i}"})() for i in range(len(jobs))]

    executor = Recorder()
    submit_matrix(plan_jobs(["C2", "C3"]), executor, runs_root=tmp_path / "runs", gpus_per_job=4, log=lambda *_: None)
    # A0 only evaluates: one GPU; the others train on four, as four processes
    assert executor.calls == [("A0", None, 1), ("C2", 4, 4), ("C3", 4, 4)]


@pytest.mark.parametrize("argv, message", [
    (["--backend", "foo"], "argument --backend: invalid choice: 'foo' (choose from"),
    (["--partition", "gpu"], "--partition: options of Slurm jobs. Fix: add --backend slurm"),
    (["--backend", "slurm", "--jobs", "2"], "--jobs 2 is for --backend local. Fix"),
    (["--backend", "slurm", "--gpus-per-job", "0"], "--gpus-per-job 0: expected a number >= 1. Fix"),
    (["--backend", "slurm", "--time", "0"], "--time 0: expected a number >= 1. Fix"),
])
def test_bad_matrix_options_are_refused_naming_the_option_and_the_fix(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_kit", "matrix", "A1", "--runs-root", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was submitted or written


def test_slurm_backend_without_slurm_says_where_to_run_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun / sbatch on the PATH
    with pytest.raises(ConfigError, match="no Slurm on this machine .*Fix: run the matrix on the cluster's login node"):
        slurm_executor(tmp_path / "slurm")
