"""Reliability: arbitrary data never escapes as anything but DataError; locks; kill -9 and resume; divergence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kit.data import read_jsonl
from lora_kit.errors import DataError, LoraKitError
from lora_kit.rundir import RunFolder

from test_train import tiny_params

ROW = st.fixed_dictionaries({}, optional={
    "messages": st.one_of(st.none(), st.text(max_size=5), st.lists(st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]),
                               "content": st.one_of(st.text(max_size=12), st.just("<image>x"), st.integers())}),
        st.integers(), st.text(max_size=3)), max_size=4)),
    "images": st.one_of(st.none(), st.lists(st.one_of(st.sampled_from(["a.png", "missing.png", "/etc/passwd"]),
                                                      st.integers()), max_size=3)),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(ROW.map(lambda r: json.dumps(r)), st.text(max_size=30)), max_size=4))
def test_data_reader_raises_only_its_own_errors(tmp_path, lines):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n", encoding="utf-8")
    try:
        samples, _ = read_jsonl(path)
    except DataError as e:
        assert str(path) in str(e)
    samples, skipped = read_jsonl(path, on_bad_sample="skip")
    with open(path, encoding="utf-8") as f:  # every non-blank line is either a sample or a counted skip
        assert len(samples) + len(skipped) == sum(bool(line.strip()) for line in f)


def test_a_second_process_on_the_same_variant_is_refused_and_a_stale_lock_is_taken(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "V"
        run.mkdir()
        (run / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "since": 0}))
        with pytest.raises(LoraKitError, match="in use by another process"):
            RunFolder(run).claim()
    finally:
        live.kill()
        live.wait()
    folder = RunFolder(run)
    folder.claim()  # that process is gone: its lock is stale
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    folder.release()


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_matches_an_uninterrupted_run(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=10, eval_steps=2, save_steps=2,
                         variant="K1", llm_last=2, vit_last=2, early_stopping=False)
    cmd = [sys.executable, "-m", "lora_kit", "train", "-f", str(params)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "runs" / "K1" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 400
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "runs" / "K1" / "summary.json").read_text())["status"] == "running"
    assert RunFolder(tmp_path / "runs" / "K1").status() == "stale"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from checkpoint-" in again.stdout
    reference = subprocess.run(cmd[:-2] + ["-f", str(params), "--set", "variant=K2"], capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0
    read = lambda v: [json.loads(l) for l in (tmp_path / "runs" / v / "metrics.jsonl").read_text().splitlines()]
    resumed, uninterrupted = read("K1"), read("K2")
    assert [m["step"] for m in resumed] == [m["step"] for m in uninterrupted] == [0, 2, 4, 6, 8, 10]
    # tolerance: the same seed and data order; float summation order may differ after a restart
    assert abs(resumed[-1]["eval_loss"] - uninterrupted[-1]["eval_loss"]) < 1e-3


@pytest.mark.slow
def test_a_diverging_run_stops_with_non_finite_loss(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=12, variant="N1", llm_last=2, vit_last=2,
                         learning_rate=1e6, vit_lr=1e6, lora_dropout=0.0)
    proc = subprocess.run([sys.executable, "-m", "lora_kit", "train", "-f", str(params)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "N1" / "summary.json").read_text())
    assert summary["status"] == "stopped_early" and summary["stop_reason"] == "non_finite_loss"
    assert summary["steps"] < 12


def _with_long_row(world, tmp_path, name: str) -> tuple[Path, int]:
    """A copy of a mini-world file plus one row far longer than max_length=256 tokens; (path, its line)."""
    rows = []
    for line in (world / name).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)  # the copy lives elsewhere: make its image paths absolute
        rows.append({**row, "images": [str((world / p).resolve()) for p in row["images"]]})
    long_row = json.loads(json.dumps(rows[0]))
    long_row["messages"][-1]["content"] = "红色圆形" * 200
    rows.append(long_row)
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, len(rows)


def test_a_too_long_sample_is_an_error_naming_its_line_or_skipped_and_counted(toy_ckpt, mini_world, tmp_path):
    from lora_kit.config import load_config
    from lora_kit.train import train

    train_file, line = _with_long_row(mini_world, tmp_path, "task_train.jsonl")
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, variant="L1", llm_last=1, vit_last=0,
                         train_file=str(train_file))
    with pytest.raises(DataError, match=rf"task_train.jsonl:{line}: \d+ tokens, longer than max_length=256.*"
                                        "on_bad_sample: skip"):
        train(load_config([params]), log=lambda *a: None)
    assert not (tmp_path / "runs" / "L1").exists()  # screened before the run folder is claimed: nothing failed

    run = train(load_config([params], {"on_bad_sample": "skip", "variant": "L2"}), log=lambda *a: None)
    skipped = json.loads((run / "params.json").read_text())["skipped_samples"]
    assert len(skipped["train"]) == 1 and f"task_train.jsonl:{line}:" in skipped["train"][0]
    assert skipped["val"] == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_samples"] == 1


def test_bad_inputs_are_refused_before_the_run_folder_exists(toy_ckpt, mini_world, tmp_path):
    """A bad data line in any file, a regex peft would refuse, or a modules_to_save entry that names nothing:
    the error names the line or parameter and no run folder is claimed (it used to be left 'failed')."""
    from lora_kit.config import load_config
    from lora_kit.errors import TargetingError
    from lora_kit.train import train

    lines = (mini_world / "bench.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[1])
    row["images"] = ["missing.png"]
    bench = tmp_path / "bench.jsonl"  # the copy keeps resolving images against the world's folder
    bench.write_text("\n".join([json.dumps({**json.loads(l), "images": [str(mini_world / p) for p in
                                                                         json.loads(l)["images"]]})
                                 for l in lines[:1]] + [json.dumps(row)]) + "\n", encoding="utf-8")
    quiet = lambda *_: None  # noqa: E731
    cases = [({"bench_file": str(bench)}, DataError, r"bench.jsonl:2: image .*missing.png.* does not exist"),
             ({"target_regex": r"model\.language_model\.layers\.(6|7)\..*", "llm_last": 0, "variant": "X"},
              TargetingError, "not Linear layers"),
             ({"modules_to_save": ["visual.mergr"], "freeze_aligner": False}, TargetingError, "matches no module")]
    for overrides, error, message in cases:
        params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, variant="BAD", llm_last=1, vit_last=0)
        with pytest.raises(error, match=message):
            train(load_config([params], overrides), log=quiet)
        assert not (tmp_path / "runs").exists(), overrides


def test_a_run_that_turns_non_finite_stops_and_keeps_its_best_finite_checkpoint(toy_ckpt, mini_world, tmp_path,
                                                                               monkeypatch):
    import math

    from safetensors.torch import load_file

    from lora_kit.config import load_config
    from lora_kit.train import StudyTrainer, train

    poison_from = 5  # the 6th optimizer step gets a NaN loss; steps 2 and 4 were evaluated and saved before
    original = StudyTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        out = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step < poison_from:
            return out
        return (out[0] * math.nan, *out[1:]) if isinstance(out, tuple) else out * math.nan

    monkeypatch.setattr(StudyTrainer, "compute_loss", poisoned)
    # Only the non-finite trigger may stop this run, and every finite checkpoint is feasible: the random
    # toy's rates wander, which is not what this test is about.
    quiet = {f"{name}_patience": 99 for name in ("irrelevant", "hallucination", "gap", "caption")}
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=12, variant="N2", llm_last=2, vit_last=0,
                         lora_dropout=0.0, best_irrelevant_margin=1.0, best_hallucination_margin=1.0, **quiet)
    run = train(load_config([params]), log=lambda *a: None)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped_early" and summary["stop_reason"] == "non_finite_loss"
    assert summary["steps"] == poison_from + 1 < 12
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finite_saved = {m["checkpoint"]: m["eval_loss"] for m in metrics
                    if m.get("checkpoint") and isinstance(m.get("eval_loss"), float) and math.isfinite(m["eval_loss"])}
    assert set(finite_saved) == {"checkpoints/checkpoint-2", "checkpoints/checkpoint-4"}
    best = summary["best"]
    assert best["checkpoint"] in finite_saved and best["step"] < poison_from
    weights = load_file(str(run / best["checkpoint"] / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def _file_size_limit(limit: int):
    """For a child process: files may not grow past `limit` bytes, and writing past it is an error
    (EFBIG), not a signal: what a full disk looks like to the writer."""
    def apply():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_fails_cleanly_and_the_rerun_finishes(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=4, variant="F1", llm_last=2, vit_last=2)
    cmd = [sys.executable, "-m", "lora_kit", "train", "-f", str(params)]
    # JSON files, metrics lines and evaluation samples fit under 48 kB; the LoRA checkpoint does not
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=_file_size_limit(48_000))
    run = tmp_path / "runs" / "F1"
    assert full.returncode != 0 and (run / "summary.json").exists(), full.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert "free disk space" in summary["fix"] and "run the same command again" in summary["fix"]
    assert not list(run.glob(".*.tmp"))  # no half-written JSON left behind
    assert json.loads((run / "params.json").read_text())["variant"] == "F1"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][:2] == [0, 2]  # what was measured before the failure is kept
    assert RunFolder(run).last_checkpoint() is None  # the torn checkpoint is never resumed from
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] in ("completed", "stopped_early") and "error" not in summary
    assert [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [0, 2, 4]


def test_a_finished_run_asked_with_other_values_suggests_a_new_variant_name(tmp_path):
    """The README's tweak (`train -f params/C2.yaml --set learning_rate=2e-4` after `make demo`) was refused with
    overwrite: true as the fix, which would replace the demo's C2."""
    from lora_kit.config import load_config
    from lora_kit.errors import ConfigError
    from lora_kit.inputs import resume_decision
    from lora_kit.paths import PARAMS_DIR
    from lora_kit.rundir import RunFolder, write_json_atomic

    finished = load_config([PARAMS_DIR / "C2.yaml"])
    run = RunFolder(tmp_path / "C2")
    run.path.mkdir()
    write_json_atomic(run.path / "params.json", {"config": finished.to_dict()})
    write_json_atomic(run.path / "summary.json", {"status": "stopped_early"})
    tweak = load_config([PARAMS_DIR / "C2.yaml"], {"learning_rate": 2e-4})
    with pytest.raises(ConfigError) as err:
        resume_decision(run, tweak, tmp_path / "model", {})
    text = str(err.value)
    assert f"learning_rate: {finished.learning_rate!r} -> 0.0002" in text
    assert "--set variant=C2_learning_rate0.0002" in text and "overwrite: true to replace" in text
    renamed = load_config([PARAMS_DIR / "C2.yaml"], {"learning_rate": 2e-4, "variant": "C2_learning_rate0.0002"})
    assert renamed.variant_name == "C2_learning_rate0.0002"  # the suggested name is a valid one
    with pytest.raises(ConfigError, match="holds this finished run already"):
        resume_decision(run, finished, tmp_path / "model", {})
