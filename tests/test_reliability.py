"""Reliability: arbitrary data never escapes as anything but DataError; locks; kill -9 and resume; divergence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
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
