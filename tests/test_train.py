"""One variant end to end on a small toy: through papermill's train.ipynb and through the CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_kit.paths import NOTEBOOKS_DIR, REPO_ROOT

pytestmark = pytest.mark.slow


def tiny_params(toy_ckpt: Path, world: Path, tmp_path: Path, **extra) -> Path:
    """A params file for a few-step run of the random toy on the mini world."""
    p = {
        "model": str(toy_ckpt), "profile": "none",
        "train_file": str(world / "task_train.jsonl"), "val_file": str(world / "task_val.jsonl"),
        "bench_file": str(world / "bench.jsonl"), "general_file": str(world / "general_eval.jsonl"),
        "spotcheck_file": str(world / "spotcheck.jsonl"), "terms_file": str(world / "terms.json"),
        "max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "eval_max_samples": 4,
        "exact_match_samples": 4, "max_new_tokens": 6, "max_length": 256, "learning_rate": 5e-3, "vit_lr": 5e-3,
        "crop_jitter_k": 2,
        # the random toy passes few irrelevant images: the default 0.8 minimum could not hold from step 0 and a
        # trained run would be refused (test_a_guardrail_that_cannot_hold_...); the relative drop still applies
        "irrelevant_min": 0.0,
        "output_dir": str(tmp_path / "runs"), **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(p))  # JSON is YAML
    return path


def _lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------- what the trackers received (issue 20)

def tracker_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a run that reports to a local MLflow file store and to W&B offline, both under tmp_path."""
    import os
    return {**os.environ, "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_EXPERIMENT_NAME": "lora_kit", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
            "WANDB_PROJECT": "lora_kit", "WANDB_SILENT": "true"}


def expected_logs(record: dict) -> dict[str, float]:
    """Every guardrail number of a metrics.jsonl record under the key the Trainer's log gives it (`eval_` + the
    name; a probe group's metric `eval_<probe>/<metric>`, a rate's n as `<key>_n`), written out from the record
    itself: whatever the record holds must reach the trackers."""
    import math
    out = {}

    def put(key, value):
        if isinstance(value, dict):
            put(f"{key}_n", value["n"])
            value = value["rate"]
        if value is not None and math.isfinite(value):
            out[key] = value
    for name in ("eval_loss", "train_loss", "gap", "general_loss", "task_exact_match"):
        put("eval_" + name.removeprefix("eval_"), record[name])
    for probe, values in record["probes"].items():
        for name, value in values.items():
            put(f"eval_{probe}/{name}", value)
    put("eval_caption_mean_chrf_vs_baseline", (record.get("caption") or {}).get("mean_chrf_vs_baseline"))
    for name in ("agreement_rate", "label_flip_rate", "mean_chrf"):
        put(f"eval_crop_{name}", (record.get("crop") or {}).get(name))
    return out


def mlflow_history(tmp_path: Path, run_name: str) -> dict[str, dict[int, float]]:
    """key -> {step: value} of the MLflow run named `run_name` in the file store of tracker_env."""
    import os
    from unittest import mock

    from mlflow.tracking import MlflowClient
    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("lora_kit").experiment_id],
                                    filter_string=f"attributes.run_name = '{run_name}'")
        return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                for key in run.data.metrics}


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every TensorBoard event file under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[str, dict[int, float]] = {}
    for f in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f)).Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def wandb_offline_history(tmp_path: Path) -> dict[str, dict[int, float]]:
    """key -> {train/global_step: value} of the one offline W&B run under tmp_path, read from its .wandb file: a
    LevelDB-format log (7-byte file header, 32 KiB blocks of records with 7-byte headers) of wandb's protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, chunks, out = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for key, value in row.items():
                    out.setdefault(key, {})[row["train/global_step"]] = value
    return out


def assert_reported(records: list[dict], received: dict[str, dict[int, float]], key=lambda k: k, rel=1e-9) -> None:
    """Every guardrail number of every record, and nothing else under eval, at its record's step."""
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in expected_logs(record).items():
            expected.setdefault(key(name), {})[record["step"]] = value
    got = {k: v for k, v in received.items() if k.startswith(key("eval_"))}
    assert set(got) == set(expected), (sorted(set(got) ^ set(expected)))
    for name, steps in expected.items():
        assert got[name] == pytest.approx(steps, rel=rel), name


def test_train_notebook_with_papermill_writes_a_complete_run_folder(toy_ckpt, mini_world, tmp_path):
    # evaluations at 0, 3 and 4: the last step is no multiple of eval_steps, and is evaluated too
    params = tiny_params(toy_ckpt, mini_world, tmp_path, eval_steps=3, save_steps=3,
                         report_to=["tensorboard", "mlflow", "wandb"])
    out = tmp_path / "out.ipynb"
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", "train.ipynb", str(out), "-p", "params_file", str(params),
         "-p", "llm_last", "2", "-p", "vit_last", "4", "-p", "vit_lr", "0.004", "-k", "lora_kit"],
        cwd=NOTEBOOKS_DIR, capture_output=True, text=True, timeout=900, env=tracker_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "C2"  # named after the study variant of 2 / 4
    # Every guardrail number of every evaluation, per probe group with its n, reached each report_to integration
    # at its step (issue 20): MLflow's file store, W&B offline, and the run's own TensorBoard folder
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 4]
    assert records[-1]["checkpoint"] == "checkpoints/checkpoint-4"
    assert_reported(records, mlflow_history(tmp_path, "C2"))
    assert_reported(records, wandb_offline_history(tmp_path), key=lambda k: k.replace("eval_", "eval/", 1))
    assert_reported(records, tensorboard_scalars(run / "tb"), key=lambda k: k.replace("eval_", "eval/", 1), rel=1e-6)
    assert not (run / "tb" / "guardrails").exists() and len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert records[0]["probes"]["task"]["irrelevant_pass"]["n"] == 4 == \
        mlflow_history(tmp_path, "C2")["eval_task/irrelevant_pass_n"][0]
    # TensorBoard has each tower's learning rate under its parameter name (the Trainer logged only the first
    # optimizer group's, as `learning_rate`), at the schedule's value: cosine after 20% warmup of 4 steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = [EventAccumulator(str(f.parent)).Reload() for f in (run / "tb").rglob("events.out.tfevents.*")]
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for acc in events for tag in acc.Tags()["scalars"]}
    assert len(scalars["train/learning_rate"]) == len(scalars["train/vit_lr"]) == 4
    for llm, vit in zip(scalars["train/learning_rate"], scalars["train/vit_lr"]):
        assert abs(vit - llm * 0.004 / 5e-3) < 1e-9  # the two groups follow one schedule at their own rates
    assert abs(max(scalars["train/learning_rate"]) - 5e-3) < 1e-9 and "train/aligner_lr" not in scalars
    for name in ("params.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    assert (run / "tb").is_dir() and any((run / "samples").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    params_json = json.loads((run / "params.json").read_text())
    assert summary["status"] in ("completed", "stopped_early")
    assert summary["targets"]["counts"] == {"llm": 14, "vit": 16}

    # The adapter wraps exactly the planned modules (14 decoder + 16 vision Linear layers).
    ckpt = run / "checkpoints" / f"checkpoint-{summary['steps']}"
    tensors = _lora_tensors(ckpt)
    wrapped = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in tensors}
    assert wrapped == set(params_json["targets"]["modules"]) and len(wrapped) == 30
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)  # no base weight in the adapter

    # LoRA weights of both towers moved away from their initialisation (B starts at zero).
    for tower in ("language_model", "visual"):
        b = [v for k, v in tensors.items() if tower in k and "lora_B" in k]
        assert b and all(float(v.abs().sum()) > 0 for v in b), tower

    # Base weights did not change: the checkpoint's model equals the base plus the adapter only.
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, ckpt)
    for name, value in peft_model.get_base_model().state_dict().items():
        if "lora_" not in name:
            clean = name.replace(".base_layer", "")
            assert torch.equal(value, reference[clean]), name

    # Every trainable parameter sits in exactly one optimizer group, at its tower's learning rate.
    groups = params_json["optimizer_groups"]
    names = [n for g in groups for n in g["names"]]
    assert len(names) == len(set(names)) == len(tensors)
    assert {n.removesuffix(".default.weight") for n in names} == \
        {k.removesuffix(".weight") for k in tensors}
    cfg = params_json["config"]
    for g in groups:
        expected = {"llm": cfg["learning_rate"], "vit": cfg["vit_lr"], "aligner": cfg["aligner_lr"]}[g["tower"]]
        assert g["lr"] == expected
        assert all(("language_model" in n) == (g["tower"] == "llm") for n in g["names"])
    assert {g["tower"] for g in groups} == {"llm", "vit"}

    # metrics: step 0 plus every eval step, each with the guardrail metrics and their n
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][0] == 0
    for m in metrics:  # per probe group of the mini world's benchmark (general and task prompts)
        assert sorted(m["probes"]) == ["general", "task"]
        assert all(g["irrelevant_pass"]["n"] == 4 and g["hallucination"]["n"] == 4 for g in m["probes"].values())
        assert m["task_exact_match"]["n"] == 4
        assert abs(m["gap"] - (m["eval_loss"] - m["train_loss"])) < 1e-9
    assert params_json["code"]["commit"] and params_json["packages"]["transformers"].startswith("5.")


def test_cli_a0_is_an_evaluation_only_baseline(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, report_to=["tensorboard", "mlflow"])
    proc = subprocess.run([sys.executable, "-m", "lora_kit", "train", "-f", str(params), "-f",
                           str(REPO_ROOT / "params" / "A0.yaml")], capture_output=True, text=True, timeout=600,
                          env=tracker_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "A0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["trainable_parameters"] == 0
    assert summary["steps"] == 0 and not (run / "checkpoints").exists()
    # no Trainer, and still its step 0 in each report_to integration, as a trained run's
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert_reported(records, mlflow_history(tmp_path, "A0"))
    assert_reported(records, tensorboard_scalars(run / "tb"), key=lambda k: k.replace("eval_", "eval/", 1), rel=1e-6)
    # a finished run is not overwritten unless asked
    again = subprocess.run([sys.executable, "-m", "lora_kit", "train", "-f", str(params), "-f",
                            str(REPO_ROOT / "params" / "A0.yaml")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "overwrite: true" in again.stderr


def test_a_guardrail_that_cannot_hold_is_refused_before_training(toy_ckpt, mini_world, tmp_path):
    """Issue 17 case 10: irrelevant_min 1.0, and a random toy that never answers a screenshot with the label
    (0/4 at step 0): every evaluation would count as a drop and the run would stop at its second one. The kit
    says so at step 0, names the parameter and the fix, and trains nothing."""
    from lora_kit.config import load_config
    from lora_kit.errors import ConfigError
    from lora_kit.rundir import RunFolder
    from lora_kit.train import train

    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=6, irrelevant_min=1.0, variant="G1",
                         llm_last=2, vit_last=0)
    with pytest.raises(ConfigError, match=r"irrelevant_drop under the general prompt cannot hold: the baseline already "
                                          r"passes only 0/4 .*"
                                          r"below irrelevant_min = 1.*Fix: set irrelevant_min at or below.*early_stopping"):
        train(load_config([params]), log=lambda *_: None)
    run = RunFolder(tmp_path / "runs" / "G1")
    assert [m["step"] for m in run.read_metrics()] == [0] and not (run.path / "checkpoints").exists()
    assert run.status() == "failed" and "irrelevant_min" in run.summary()["error"]


def test_a_run_that_reaches_its_last_step_is_completed_with_the_triggers_it_recorded(toy_ckpt, mini_world, tmp_path):
    """Issue 17 case 10: with early_stopping false the same unholdable guardrail only warns; the run trains to
    its last step, so it is completed (not stopped_early), and every trigger it recorded is listed. The refusal's
    fix works as said: the refused run left a failed folder without a checkpoint, so the same run with
    early_stopping false starts over there (it was refused as a resume with changed parameters)."""
    from lora_kit.config import load_config
    from lora_kit.errors import ConfigError
    from lora_kit.train import train

    said = []
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=6, irrelevant_min=1.0, variant="G2",
                         llm_last=2, vit_last=0)
    with pytest.raises(ConfigError, match="Or set early_stopping: false"):
        train(load_config([params]), log=said.append)
    assert json.loads((tmp_path / "runs" / "G2" / "summary.json").read_text())["status"] == "failed"
    run = train(load_config([params], {"early_stopping": False}), log=said.append)
    assert any("G2: " in line and "without a checkpoint; it starts over with the new values (early_stopping: True "
               "-> False)" in line for line in said)
    assert json.loads((run / "params.json").read_text())["config"]["early_stopping"] is False
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 2, 4, 6] and summary["steps"] == 6
    assert summary["status"] == "completed" and summary["stop_reason"] is None and summary["stop_step"] is None
    # bad at every evaluation (< 100%); patience 2: the trigger holds from the second bad one on
    assert all(m["probes"][p]["irrelevant_pass"]["rate"] < 1.0 for m in metrics for p in ("general", "task"))
    # the forgetting signal at every evaluation, per probe group, with its token count (0 at step 0: B = 0)
    assert all(m["probes"][p]["kl_base_tokens"] > 0 for m in metrics for p in ("general", "task"))
    assert all(abs(metrics[0]["probes"][p]["kl_base"]) < 1e-6 for p in ("general", "task"))
    assert all(m["probes"][p]["kl_base"] > 0 for m in metrics[1:] for p in ("general", "task"))
    assert [(t["name"], t["step"]) for t in summary["triggers"] if t["name"] == "irrelevant_drop"] == \
        [("irrelevant_drop", 4), ("irrelevant_drop", 4), ("irrelevant_drop", 6), ("irrelevant_drop", 6)]
    problems = [p for p in summary["guardrail_problems"] if p["guardrail"] == "irrelevant_drop"]
    assert [(p["probe"], p["problem"]) for p in problems] == [("general", "cannot_hold"), ("task", "cannot_hold")]
    assert any(line.startswith("WARNING G2: irrelevant_drop under the task prompt cannot hold") for line in said)


def test_evaluate_cli_scores_an_adapter_folder(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, variant="E1", llm_last=2, vit_last=2)
    assert subprocess.run([sys.executable, "-m", "lora_kit", "train", "-f", str(params)],
                          capture_output=True, text=True, timeout=600).returncode == 0
    ckpt = tmp_path / "runs" / "E1" / "checkpoints" / "checkpoint-2"
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "lora_kit", "evaluate", str(ckpt), "--base", str(toy_ckpt),
                           "-f", str(params), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    recorded = [json.loads(l) for l in (tmp_path / "runs" / "E1" / "metrics.jsonl").read_text().splitlines()][-1]
    # the same weights and data give the same numbers as the training run's own evaluation
    assert result["metrics"]["probes"] == recorded["probes"]
    assert result["metrics"]["task_exact_match"] == recorded["task_exact_match"]
    assert abs(result["metrics"]["eval_loss"] - recorded["eval_loss"]) < 1e-4
    assert len(result["samples"]) == sum(g[m]["n"] for g in recorded["probes"].values()
                                         for m in ("irrelevant_pass", "hallucination", "object_accuracy"))


def _train(params, *extra):
    return subprocess.run([sys.executable, "-m", "lora_kit", "train", "-f", str(params), *extra],
                          capture_output=True, text=True, timeout=600)


def test_init_adapter_is_continued_when_targets_match_and_merged_otherwise(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, variant="S3", llm_last=2, vit_last=2)
    assert _train(params).returncode == 0
    stage3 = tmp_path / "runs" / "S3" / "checkpoints" / "checkpoint-2"
    same = _train(params, "--set", "variant=S4", "--set", f"init_adapter={stage3}")
    assert same.returncode == 0, same.stderr[-2000:]
    other = _train(params, "--set", "variant=S5", "--set", "llm_last=0", "--set", f"init_adapter={stage3}")
    assert other.returncode == 0, other.stderr[-2000:]
    how = {v: json.loads((tmp_path / "runs" / v / "params.json").read_text())["targets"]["adapter"]
           for v in ("S4", "S5")}
    assert how == {"S4": "continued", "S5": "merged init_adapter, new LoRA"}
    # continuing starts from the stage-3 adapter's weights: step 0 equals S3's last evaluation
    s3_last = [json.loads(l) for l in (tmp_path / "runs" / "S3" / "metrics.jsonl").read_text().splitlines()][-1]
    s4_first = json.loads((tmp_path / "runs" / "S4" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(s4_first["eval_loss"] - s3_last["eval_loss"]) < 1e-5

    # `lora_kit evaluate` scores a checkpoint on the model it trained on: S5's new LoRA sits on the base with
    # the stage-3 adapter folded in, S4's adapter is the continued stage-3 adapter itself. In a run folder
    # its params.json says which; a copy elsewhere is decided by init_adapter and the adapter's targets.
    import shutil

    def evaluated(folder, init_adapter):
        out = folder.parent / f"{folder.name}-eval.json"
        proc = subprocess.run([sys.executable, "-m", "lora_kit", "evaluate", str(folder), "--base", str(toy_ckpt),
                               "-f", str(params), "--set", f"init_adapter={init_adapter}", "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())["metrics"]["eval_loss"]

    recorded = {v: [json.loads(l) for l in (tmp_path / "runs" / v / "metrics.jsonl").read_text().splitlines()][-1]
                for v in ("S4", "S5")}
    assert recorded["S5"]["step"] == 2 and recorded["S5"]["checkpoint"]
    s5_copy = tmp_path / "S5-checkpoint-2"
    shutil.copytree(tmp_path / "runs" / "S5" / "checkpoints" / "checkpoint-2", s5_copy)
    for variant, folder, init in (("S4", tmp_path / "runs" / "S4" / "checkpoints" / "checkpoint-2", ""),
                                  ("S5", tmp_path / "runs" / "S5" / "checkpoints" / "checkpoint-2", ""),
                                  ("S5", s5_copy, stage3)):
        assert abs(evaluated(folder, init) - recorded[variant]["eval_loss"]) < 1e-4, (variant, folder)
    # without the stage-3 adapter folded in, the same LoRA scores differently: the fold is what makes them equal
    assert abs(evaluated(s5_copy, "") - recorded["S5"]["eval_loss"]) > 1e-3


def test_an_interrupted_run_resumes_from_its_last_checkpoint(toy_ckpt, mini_world, tmp_path):
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=4, variant="R1", llm_last=2, vit_last=0)
    assert _train(params).returncode == 0
    run = tmp_path / "runs" / "R1"
    finished = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    # make it look killed after step 2's checkpoint: no step-4 checkpoint, a 'running' status whose
    # process is gone, and a half-written metrics line
    import shutil
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "running", "pid": 999999}))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "eval_lo')
    again = _train(params)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from checkpoint-2" in again.stdout
    resumed = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [m["step"] for m in finished] == [0, 2, 4]
    assert json.loads((run / "summary.json").read_text())["status"] in ("completed", "stopped_early")
    # the same seed and data order: the resumed run ends where the uninterrupted one did
    assert abs(resumed[-1]["eval_loss"] - finished[-1]["eval_loss"]) < 1e-3


def test_step0_is_taken_from_a0_only_when_it_is_the_same_evaluation(toy_ckpt, mini_world, tmp_path):
    from lora_kit.config import load_config
    from lora_kit.train import train

    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2)
    quiet = lambda *_: None  # noqa: E731
    a0 = train(load_config([params, REPO_ROOT / "params" / "A0.yaml"]), log=quiet)
    a1 = train(load_config([params, REPO_ROOT / "params" / "A1.yaml"]), log=quiet)
    # a different generation length: A0's step 0 is not this run's, so A1b evaluates its own step 0
    a1b = train(load_config([params, REPO_ROOT / "params" / "A1.yaml"], {"variant": "A1b", "max_new_tokens": 5}),
                log=quiet)
    first = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    base, copied, own = first(a0), first(a1), first(a1b)
    assert copied["copied_from"] == f"A0 ({a0})" and copied["eval_seconds"] == 0.0
    assert {k: v for k, v in copied.items() if k not in ("copied_from", "eval_seconds")} == \
        {k: v for k, v in base.items() if k != "eval_seconds"}
    assert (a1 / "samples" / "step-000000.json").read_text() == (a0 / "samples" / "step-000000.json").read_text()
    # the copy is what A1 would have measured: LoRA starts at zero, so A1's own step 0 is the base's
    assert "copied_from" not in own and own["eval_seconds"] > 0
    for key in ("eval_loss", "train_loss", "general_loss"):
        assert own[key] == pytest.approx(base[key], rel=1e-4), key
    # and A1 still trained and was evaluated after step 0
    assert [json.loads(line)["step"] for line in (a1 / "metrics.jsonl").read_text().splitlines()] == [0, 2]
    # the guardrail baseline follows the same rule (issue 17 case 7): A0's for A1, A1b's own step 0, and why
    baseline = lambda run: json.loads((run / "summary.json").read_text())["baseline_source"]  # noqa: E731
    assert baseline(a1).startswith(f"A0 ({a0}): the same model, data files")
    assert baseline(a1b).startswith("own step 0 (A0 at") and "max_new_tokens: 6 vs 5" in baseline(a1b)


def test_a_run_on_other_data_takes_its_own_baseline_not_a0s(toy_ckpt, mini_world, tmp_path):
    """Issue 17 case 7: a run on the user's own benchmark beside the toy study's completed A0 took A0's
    baseline (its pass rate and eval loss) for guardrails measured on another benchmark."""
    from lora_kit.config import load_config
    from lora_kit.rundir import RunFolder
    from lora_kit.train import train

    rows = [json.loads(line) for line in (mini_world / "bench.jsonl").read_text(encoding="utf-8").splitlines()]
    own_bench = tmp_path / "receipts_bench.jsonl"  # another benchmark: the OOD rows only, image paths absolute
    own_bench.write_text("".join(json.dumps({**r, "images": [str(mini_world / p) for p in r["images"]]},
                                            ensure_ascii=False) + "\n" for r in rows if r.get("kind") == "ood"),
                         encoding="utf-8")
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2)
    quiet = lambda *_: None  # noqa: E731
    a0 = train(load_config([params, REPO_ROOT / "params" / "A0.yaml"]), log=quiet)
    run = RunFolder(train(load_config([params, REPO_ROOT / "params" / "A1.yaml"], {"bench_file": str(own_bench)}),
                          log=quiet))
    summary, own = run.summary(), run.read_metrics()[0]
    # no irrelevant rows in this benchmark, in either probe group
    assert "copied_from" not in own and all(g["irrelevant_pass"]["n"] == 0 for g in own["probes"].values())
    assert summary["baseline"]["probes"] == own["probes"]
    assert summary["baseline"]["eval_loss"] == own["eval_loss"]
    assert summary["baseline_source"].startswith(f"own step 0 (A0 at {a0} ran another setup")
    assert "bench_file: " in summary["baseline_source"]
    assert {p["guardrail"]: p["problem"] for p in summary["guardrail_problems"]}["irrelevant_drop"] == "cannot_fire"


# ---------------------------------------------------------------- what the user gives is what runs (issue 17)

def _c2_adapter(toy_ckpt, folder: Path, rename=None) -> Path:
    """A peft adapter on C2's modules with non-zero weights (B random, so it changes the model), saved by peft;
    `rename` maps each saved tensor name to another (an adapter written for another module layout)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from lora_kit.targeting import find_towers, plan_targets

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    plan = plan_targets(find_towers(base), 2, 4)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=plan.regex, init_lora_weights=False)
                   ).save_pretrained(folder)
    if rename:
        tensors = _lora_tensors(folder)
        save_file({rename(k): v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def _pre_4_52(key: str) -> str:
    """The Qwen-VL layout of transformers < 4.52: decoder at model.*, vision tower at visual.*."""
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.").replace(
        "base_model.model.model.visual.", "base_model.model.visual.")


def test_an_adapter_is_loaded_whole_or_refused_in_evaluate_and_train(toy_ckpt, mini_world, tmp_path):
    from lora_kit.config import load_config
    from lora_kit.evaluate import evaluate_checkpoint
    from lora_kit.train import data_files, train

    current = _c2_adapter(toy_ckpt, tmp_path / "current")
    older = _c2_adapter(toy_ckpt, tmp_path / "older", rename=_pre_4_52)
    other = _c2_adapter(toy_ckpt, tmp_path / "other", rename=lambda k: k.replace(".layers.", ".decoder_layers."))
    assert any(k.startswith("base_model.model.visual.blocks.") for k in _lora_tensors(older))
    cfg = load_config([tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, variant="AD", llm_last=2,
                                   vit_last=4)])
    loss = lambda folder: evaluate_checkpoint(folder, cfg, base=str(toy_ckpt), files=data_files(cfg),  # noqa: E731
                                              out=tmp_path / f"{folder.name}.json")["metrics"]["eval_loss"]
    base, fitted = loss(toy_ckpt), loss(current)
    assert abs(fitted - base) > 1e-2  # the adapter changes the model, so a no-op load would show
    # the older layout is mapped as transformers maps old checkpoints: the same weights, the same loss
    assert loss(older) == pytest.approx(fitted, abs=1e-6)
    # an adapter whose tensors name no module of this model is refused, naming it and its keys
    from lora_kit.errors import AdapterError
    with pytest.raises(AdapterError) as e:
        loss(other)
    assert str(other) in str(e.value) and ".decoder_layers.6." in str(e.value) and ".layers.6." in str(e.value)
    quiet = lambda *_: None  # noqa: E731
    with pytest.raises(AdapterError, match="decoder_layers"):
        train(load_config([], {**cfg.to_dict(), "init_adapter": str(other)}), log=quiet)
    assert not (tmp_path / "runs" / "AD").exists()  # refused before the run folder was claimed
    # train continues the older-layout adapter itself: its step 0 is the adapter's model, not the base
    run = train(load_config([], {**cfg.to_dict(), "init_adapter": str(older)}), log=quiet)
    assert json.loads((run / "params.json").read_text())["targets"]["adapter"] == "continued"
    step0 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0 and step0["eval_loss"] == pytest.approx(fitted, abs=1e-4)


def _killed_after_checkpoint_2(run: Path) -> None:
    """Make a finished 4-step run look killed after its step-2 checkpoint (as test_reliability's kill -9 does)."""
    import shutil
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "running", "pid": 999999}))


def test_a_resume_with_changed_parameters_is_refused_and_params_json_stays(toy_ckpt, mini_world, tmp_path):
    from lora_kit.config import load_config
    from lora_kit.errors import ConfigError
    from lora_kit.train import train

    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=4, variant="R2", llm_last=2, vit_last=2)
    logs = []
    run = train(load_config([params]), log=logs.append)
    _killed_after_checkpoint_2(run)
    before = (run / "params.json").read_bytes()
    for change, shown in (({"lora_rank": 8}, "lora_rank: 16 -> 8"), ({"llm_last": 3, "variant": "R2"}, "llm_last: 2 -> 3"),
                          ({"vit_lr": 1e-3}, "vit_lr: 0.005 -> 0.001")):
        with pytest.raises(ConfigError) as e:
            train(load_config([params], change), log=logs.append)
        assert shown in str(e.value) and "overwrite: true" in str(e.value) and "new variant name" in str(e.value)
        assert (run / "params.json").read_bytes() == before
        assert json.loads((run / "summary.json").read_text())["status"] == "running"  # not marked failed
    # logging_steps is harmless (config.RESUME_SAFE): the run resumes, and params.json stays as the run began
    logs.clear()
    train(load_config([params], {"logging_steps": 2}), log=logs.append)
    assert any("resuming from checkpoint-2" in line for line in logs)
    assert (run / "params.json").read_bytes() == before
    # overwrite: true starts an unfinished run over with the new values (it resumed before)
    _killed_after_checkpoint_2(run)
    logs.clear()
    train(load_config([params], {"lora_rank": 8, "overwrite": True}), log=logs.append)
    assert not any("resuming" in line for line in logs)
    assert json.loads((run / "params.json").read_text())["config"]["lora_rank"] == 8
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 2, 4]


def test_a_resume_on_a_data_file_edited_in_place_is_refused(toy_ckpt, mini_world, tmp_path):
    """Same parameters, same paths, but the training file lost half its lines after the kill: the run resumed on 12
    samples instead of 24 (another epoch length and data order) without a word."""
    import hashlib

    from lora_kit.config import load_config
    from lora_kit.errors import ConfigError
    from lora_kit.train import train

    own = tmp_path / "own_train.jsonl"  # absolute image paths, so the copy reads the world's images
    rows = [json.loads(line) for line in (mini_world / "task_train.jsonl").read_text(encoding="utf-8").splitlines()]
    lines = [json.dumps({**r, "images": [str(mini_world / p) for p in r["images"]]}, ensure_ascii=False) for r in rows]
    own.write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=4, variant="R3", llm_last=2, vit_last=0,
                         train_file=str(own))
    run = train(load_config([params]), log=lambda *_: None)
    _killed_after_checkpoint_2(run)
    before = (run / "params.json").read_bytes()
    sha = lambda: hashlib.sha256(own.read_bytes()).hexdigest()[:12]  # noqa: E731
    old = sha()
    own.write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        train(load_config([params]), log=lambda *_: None)
    assert f"train_file (its content, sha256): '{old}...' -> '{sha()}...'" in str(e.value)
    assert "from checkpoint-2" in str(e.value) and "overwrite: true" in str(e.value)
    assert (run / "params.json").read_bytes() == before and (run / "checkpoints" / "checkpoint-2").is_dir()


def test_modules_to_save_train_exactly_what_was_asked(toy_ckpt, mini_world, tmp_path):
    """[visual.merger, deepstack_merger_list, lm_head] beside C2's LoRA: each module trains in full, the aligner
    at aligner_lr, and the saved adapter holds them (it said modules_to_save: null and trained plain C2)."""
    from transformers import AutoModelForImageTextToText

    from lora_kit.config import load_config
    from lora_kit.train import train

    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, variant="MS", llm_last=2, vit_last=4,
                         modules_to_save=["visual.merger", "deepstack_merger_list", "lm_head"],
                         freeze_aligner=False, aligner_lr=1e-3, lora_rank=4)
    run = train(load_config([params]), log=lambda *_: None)
    recorded = json.loads((run / "params.json").read_text())

    # independently: LoRA r * (in + out) on the Linear layers of decoder layers 6-7 and vision blocks 8-11,
    # plus every parameter of the three modules trained in full
    base = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    lora = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and re.match(r"model\.(language_model\.layers\.[67]|visual\.blocks\.(8|9|10|11))\.", n))
    full = {prefix: sum(p.numel() for n, p in base.named_parameters(remove_duplicate=False) if n.startswith(prefix))
            for prefix in ("model.visual.merger.", "model.visual.deepstack_merger_list.", "lm_head.")}
    assert all(full.values())
    assert recorded["trainable_parameters"] == lora + sum(full.values())

    groups = recorded["optimizer_groups"]
    aligner = [g for g in groups if g["tower"] == "aligner"]
    assert aligner and all(g["lr"] == 1e-3 for g in aligner)
    assert sum(g["n_params"] for g in aligner) == full["model.visual.merger."] + full["model.visual.deepstack_merger_list."]
    assert any("lm_head" in n for g in groups if g["tower"] == "llm" for n in g["names"])

    n_deepstack = len(base.model.visual.deepstack_merger_list)
    asked = ["model.visual.merger"] + [f"model.visual.deepstack_merger_list.{i}" for i in range(n_deepstack)] + ["lm_head"]
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "adapter_config.json").read_text())["modules_to_save"] == asked
    saved = _lora_tensors(ckpt)
    assert "base_model.model.model.visual.merger.linear_fc1.weight" in saved and "base_model.model.lm_head.weight" in saved
