"""One variant on two processes: torchrun on CPU (gloo) against a single process with the same global batch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kit.distributed import check_nproc, init_ranks
from lora_kit.errors import ConfigError
from lora_kit.paths import NOTEBOOKS_DIR, REPO_ROOT

from test_train import tiny_params

# lora_kit's CLI with the Trainer's collator recording, per rank, which samples each training batch holds.
SPY = '''
import json, os, sys
from lora_kit import train
from lora_kit.__main__ import main


class Recording:
    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name):
        return getattr(self.collator, name)

    def __call__(self, batch):
        with open(os.path.join(os.environ["SPY_DIR"], "rank" + os.environ.get("RANK", "0") + ".jsonl"), "a") as f:
            f.write(json.dumps([e.source for e in batch]) + "\\n")
        return self.collator(batch)


init = train.StudyTrainer.__init__

def spy(self, *args, data_collator, **kwargs):
    init(self, *args, data_collator=Recording(data_collator), **kwargs)

train.StudyTrainer.__init__ = spy
sys.exit(main(sys.argv[1:]))
'''


def _run(cmd, spy_dir: Path) -> subprocess.CompletedProcess:
    spy_dir.mkdir()
    env = {**os.environ, "SPY_DIR": str(spy_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _batches(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(run: Path) -> set[str]:
    """The run folder's files, with names that hold a timestamp, a host or a rank made generic."""
    names = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    return {re.sub(r"events\.out\.tfevents\..*", "EVENTS", re.sub(r"rng_state(_\d+)?\.pth", "rng_state.pth", n))
            for n in names}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one_process_with_the_same_global_batch(toy_ckpt, mini_world, tmp_path):
    # 24 training samples, 8 per optimizer step: 4 per rank on two ranks, or 8 in one process.
    # No dropout, so that the two runs differ only in how the batch is split.
    params = tiny_params(toy_ckpt, mini_world, tmp_path, variant="P1", llm_last=2, vit_last=0,
                         gradient_accumulation_steps=1, per_device_train_batch_size=4, lora_dropout=0.0)
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    _run([sys.executable, str(spy), "train", "-f", str(params), "--set", "per_device_train_batch_size=8"],
         tmp_path / "one")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(spy),
          "train", "-f", str(params), "--set", "variant=P2"], tmp_path / "two")
    one, two = tmp_path / "runs" / "P1", tmp_path / "runs" / "P2"

    # Both ranks saw different samples, and together exactly the single process's batch of each step.
    single = _batches(tmp_path / "one" / "rank0.jsonl")
    rank0, rank1 = _batches(tmp_path / "two" / "rank0.jsonl"), _batches(tmp_path / "two" / "rank1.jsonl")
    # (the data loader collates one batch ahead, so each may hold a fifth one that was never trained on)
    single, rank0, rank1 = single[:4], rank0[:4], rank1[:4]
    assert len(single) == len(rank0) == len(rank1) == 4
    for step, (a, b, s) in enumerate(zip(rank0, rank1, single)):
        assert len(a) == len(b) == 4 and not set(a) & set(b), step
        assert set(a) | set(b) == set(s), step
    epoch = [x for batch in rank0[:3] + rank1[:3] for x in batch]  # 3 steps of 8 = the 24 samples once
    assert len(set(epoch)) == 24

    # The run folder has the single-process format; rank 0 alone wrote it, each evaluation once.
    assert _files(two) == _files(one)
    # one TensorBoard file, rank 0's, with every evaluation in it (the guardrail metrics go through the Trainer's log)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (events,) = (two / "tb").glob("events.out.tfevents.*")
    assert [e.step for e in EventAccumulator(str(events)).Reload().Scalars("eval/loss")] == [0, 2, 4]
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == [0, 2, 4]
    assert [set(m) for m in m2] == [set(m) for m in m1]
    p1, p2 = (json.loads((run / "params.json").read_text()) for run in (one, two))
    assert set(p2) == set(p1)
    assert p1["processes"]["world_size"] == 1
    assert (p2["processes"]["world_size"], p2["processes"]["backend"]) == (2, "gloo")
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert set(s2) == set(s1) and s2["steps"] == 4 and s2["status"] in ("completed", "stopped_early")
    assert not (two / ".lock").exists()

    # Data parallel: the same updates up to float summation order (Adam amplifies rounding a little).
    assert m2[0]["eval_loss"] == pytest.approx(m1[0]["eval_loss"], abs=1e-6)  # same initial weights
    for a, b in zip(m1[1:], m2[1:]):
        change = a["eval_loss"] - m1[0]["eval_loss"]
        assert abs(b["eval_loss"] - a["eval_loss"]) < 0.02 * abs(change), (a["step"], a["eval_loss"], b["eval_loss"])


@pytest.mark.slow
def test_train_notebook_with_nproc_2_launches_torchrun_and_reads_the_run_folder(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, variant="N2", llm_last=2, vit_last=0,
                         per_device_train_batch_size=2, gradient_accumulation_steps=1)
    out = tmp_path / "out.ipynb"
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", "train.ipynb", str(out), "-p", "params_file", str(params),
         "-p", "nproc", "2", "-k", "lora_kit", "--no-progress-bar"],
        cwd=NOTEBOOKS_DIR, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "N2"
    params_json = json.loads((run / "params.json").read_text())
    assert params_json["processes"]["world_size"] == 2 and params_json["config"]["nproc"] == 2
    assert [m["step"] for m in _metrics(run)] == [0, 2]
    nb = json.loads(out.read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "--nproc_per_node 2" in text  # it went through torchrun
    assert (run / "curves.png").is_file()  # and the notebook's last cell read the run folder


def test_nproc_that_contradicts_the_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"nproc = 3 but the launcher started 2 process\(es\): set nproc to 2"):
        init_ranks(3)


def test_nproc_above_the_gpu_count_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_nproc(2)
    with pytest.raises(ConfigError, match=r"nproc = 4: expected 1 to 2 .*Fix: set nproc to at most 2"):
        check_nproc(4)


def test_deepspeed_config_must_be_readable(tmp_path):
    from lora_kit.config import load_config

    (tmp_path / "ds2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert load_config([], {"deepspeed": str(tmp_path / "ds2.json")}).deepspeed == str(tmp_path / "ds2.json")
    with pytest.raises(ConfigError, match=r"deepspeed = .*a readable DeepSpeed JSON config"):
        load_config([], {"deepspeed": str(tmp_path / "missing.json")})
