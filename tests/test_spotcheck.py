"""The caption spot-check without a browser: state, widgets through .click() and value changes, files, guardrails.

A run folder is made as train.py leaves one (params.json, checkpoints/ with peft adapters, metrics.jsonl,
summary.json), with seeded random LoRA weights on the toy checkpoint instead of a training run; the browser
test (test_spotcheck_browser.py) uses a real training run.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from lora_kit.config import RunConfig
from lora_kit.errors import ConfigError, DataError
from lora_kit.guardrails import check_triggers
from lora_kit.rundir import RunFolder
from lora_kit.spotcheck import CAPTION_FILE, DEFAULT_PROMPT, VERDICT_FILE, SpotCheck, SpotCheckView

STEPS = (2, 4)


def caption(step: int, proxy_degraded: bool) -> dict:
    """A metrics record's caption verdict as train.py writes it before anyone has judged."""
    return {"n": 5, "mean_chrf_vs_baseline": 20.0 if proxy_degraded else 80.0, "degraded": proxy_degraded,
            "source": "proxy", "proxy_degraded": proxy_degraded, "manual_degraded": None, "manual_verdicts": {},
            "disagree": None}


def write_run(root: Path, toy_ckpt: Path, world: Path, variant: str = "C2", *, proxy=(False, False, False)) -> Path:
    """A finished run folder with a LoRA adapter at every step of STEPS (seeded random weights, large enough to
    change the captions) and one metrics record per evaluation (steps 0, *STEPS) whose proxy says `proxy`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    run = root / variant
    (run / "checkpoints").mkdir(parents=True)
    config = RunConfig().to_dict() | {"model": str(toy_ckpt), "variant": variant, "max_new_tokens": 6,
                                      "per_device_eval_batch_size": 8, "max_length": 512, "seed": 7}
    files = {k: str(world / name) for k, name in (("spotcheck_file", "spotcheck.jsonl"), ("bench_file", "bench.jsonl"),
                                                   ("terms_file", "terms.json"))}
    (run / "params.json").write_text(json.dumps({"config": config, "variant": variant, "model_path": str(toy_ckpt),
                                                 "data_files": files, "targets": {"adapter": "new"}}))
    for step in STEPS:
        torch.manual_seed(step)
        model = get_peft_model(AutoModelForImageTextToText.from_pretrained(toy_ckpt),
                               LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        model.save_pretrained(run / "checkpoints" / f"checkpoint-{step}")
    records = [{"step": s, "eval_loss": 1.0 - 0.1 * i, "caption": caption(s, d),
                "checkpoint": f"checkpoints/checkpoint-{s}" if s else None} for i, (s, d) in enumerate(zip((0,) + STEPS, proxy))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = records[-1]
    (run / "summary.json").write_text(json.dumps({
        "variant": variant, "status": "completed", "llm_last": 2, "vit_last": 4, "steps": best["step"],
        "best": {"checkpoint": best["checkpoint"], "step": best["step"], "eval_loss": best["eval_loss"],
                 "metrics": best}, "trainable_parameters": 1000}))
    return run


def spot_rows(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "spotcheck.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def generated(toy_ckpt, mini_world, tmp_path_factory) -> Path:
    """A run folder whose captions (default prompt) are generated and cached once for the module."""
    root = tmp_path_factory.mktemp("spot") / "runs"
    write_run(root, toy_ckpt, mini_world)
    SpotCheck.open("C2", runs_root=str(root), log=lambda *_: None).generate_missing(log=lambda *_: None)
    return root


@pytest.fixture
def runs_root(generated, tmp_path) -> Path:
    """A fresh copy of the generated run (its own spotcheck.jsonl) for one test."""
    shutil.copytree(generated, tmp_path / "runs")
    return tmp_path / "runs"


def open_check(root: Path, **kw) -> SpotCheck:
    return SpotCheck.open("C2", runs_root=str(root), who="tester", log=lambda *_: None, **kw)


# ---------------------------------------------------------------- what is shown

def test_baseline_first_then_every_checkpoint_on_the_fixed_images(toy_ckpt, mini_world, tmp_path):
    write_run(tmp_path, toy_ckpt, mini_world)
    check = open_check(tmp_path)
    assert [c.label(False) for c in check.columns] == ["baseline", "checkpoint-2", "checkpoint-4"]
    assert [c.checkpoint for c in check.columns] == ["checkpoint-0", "checkpoint-2", "checkpoint-4"]
    rows = spot_rows(mini_world)
    assert len(rows) == 5  # the toy world's 5 fixed OOD images
    assert [im.key for im in check.images] == [str((mini_world / r["images"][0]).resolve()) for r in rows]
    system = [m for m in rows[0]["messages"] if m["role"] == "system"]
    assert check.images[0].sample.messages == system + [{"role": "user", "content": "<image>" + DEFAULT_PROMPT}]
    # image-major: one image's captions side by side, baseline first
    assert [(c.image.key, c.column.step) for c in check.cells[:4]] == [
        (check.images[0].key, 0), (check.images[0].key, 2), (check.images[0].key, 4), (check.images[1].key, 0)]
    assert check.progress() == (0, 15) and len(check.missing()) == 15

    only4 = open_check(tmp_path, steps="4", prompt="这是什么")
    assert [c.checkpoint for c in only4.columns] == ["checkpoint-0", "checkpoint-4"]
    assert only4.images[0].sample.messages[-1]["content"] == "<image>这是什么"
    with pytest.raises(ConfigError, match=r"steps = \[9\].*pick from \[2, 4\]"):
        open_check(tmp_path, steps=[9])


def test_other_images_runs_and_bad_parameters(toy_ckpt, mini_world, tmp_path):
    write_run(tmp_path, toy_ckpt, mini_world)
    bench = [json.loads(line) for line in (mini_world / "bench.jsonl").read_text().splitlines() if line.strip()]
    ood = [r for r in bench if r.get("kind") == "ood"]
    check = open_check(tmp_path, images="bench")
    assert [im.key for im in check.images] == [str((mini_world / r["images"][0]).resolve()) for r in ood]

    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("b.png", "a.png"):
        shutil.copy(mini_world / spot_rows(mini_world)[0]["images"][0], folder / name)
    (folder / "notes.txt").write_text("not an image")
    check = open_check(tmp_path, images=str(folder))
    assert [Path(im.key).name for im in check.images] == ["a.png", "b.png"]
    assert check.images[0].sample.messages[0]["role"] == "system"  # the run's spot-check system turn

    logged = []
    assert [r.variant for r in SpotCheck.open(runs_root=str(tmp_path), log=logged.append).runs] == ["C2"]
    assert "runs not set: showing C2" in logged[0]

    # several variants: one baseline for their common start model, then each run's checkpoints; a verdict goes
    # to the run folder of its column
    write_run(tmp_path, toy_ckpt, mini_world, "C3")
    both = SpotCheck.open("C2, C3", runs_root=str(tmp_path), steps="4", log=lambda *_: None)
    assert [c.label(True) for c in both.columns] == ["baseline (C2)", "C2 · checkpoint-4", "C3 · checkpoint-4"]
    both.judge("blind", index=2)
    assert [r["variant"] for r in RunFolder(tmp_path / "C3").verdicts()] == ["C3"]
    assert RunFolder(tmp_path / "C2").verdicts() == []
    with pytest.raises(ConfigError, match=r"runs: 'C9' is not a run folder.*\(C2, C3\)"):
        SpotCheck.open("C9", runs_root=str(tmp_path))
    with pytest.raises(ConfigError, match="images = 'nowhere'"):
        open_check(tmp_path, images="nowhere")
    with pytest.raises(ConfigError, match="prompt = '<image>hi'"):
        open_check(tmp_path, prompt="<image>hi")
    with pytest.raises(ConfigError, match="max_new_tokens = 0"):
        open_check(tmp_path, max_new_tokens=0)


# ---------------------------------------------------------------- captions

def test_captions_are_generated_once_cached_and_match_an_independent_generation(generated, toy_ckpt, mini_world,
                                                                                 monkeypatch):
    from lora_kit import spotcheck
    from lora_kit.data import Encoder, Sample
    from lora_kit.evaluate import generate, load_for_evaluation

    run = generated / "C2"
    cache = [json.loads(line) for line in (run / CAPTION_FILE).read_text().splitlines()]
    assert len(cache) == 15 and {(r["checkpoint"], r["prompt"], r["max_new_tokens"]) for r in cache} == {
        (f"checkpoint-{s}", DEFAULT_PROMPT, 6) for s in (0, *STEPS)}

    check = open_check(generated)
    assert check.missing() == []
    monkeypatch.setattr(spotcheck, "load_column", lambda *a, **k: pytest.fail("a cached caption was generated again"))
    assert check.generate_missing(log=lambda *_: None) == 0

    # the same captions from the kit's evaluation loader, on conversations built here from the world's rows
    samples = [Sample([m for m in r["messages"] if m["role"] == "system"]
                      + [{"role": "user", "content": "<image>" + DEFAULT_PROMPT}],
                      [mini_world / r["images"][0]], "test") for r in spot_rows(mini_world)]
    by_column = {}
    for step, folder in ((0, toy_ckpt), (4, run / "checkpoints" / "checkpoint-4")):
        model, processor, _ = load_for_evaluation(folder, base=str(toy_ckpt), default_model=str(toy_ckpt))
        expected = [g.answer for g in generate(model, Encoder(processor, 512), samples, max_new_tokens=6)]
        by_column[step] = [c.caption for c in check.cells if c.column.step == step]
        assert by_column[step] == expected, step
    assert by_column[0] != by_column[4]  # the adapter is applied: the checkpoint captions differently

    other = open_check(generated, prompt="这是什么")  # the cache is keyed by prompt
    assert len(other.missing()) == 15


# ---------------------------------------------------------------- widgets and verdict rows

def test_buttons_and_notes_append_verdict_rows_that_survive_a_restart(runs_root):
    run = runs_root / "C2"
    check = open_check(runs_root)
    view = SpotCheckView(check)
    assert view.progress_label.value.startswith("judged 0 / 15") and view.progress.max == 15
    cell = view.cells[1]  # image 1, checkpoint-2
    cell.note.value = "repeats one character"  # a note before the verdict is kept for it
    assert not (run / VERDICT_FILE).exists()
    before = datetime.now(timezone.utc).replace(microsecond=0)
    cell.buttons["degraded"].click()
    rows = [json.loads(line) for line in (run / VERDICT_FILE).read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert {k: row[k] for k in ("checkpoint", "step", "image", "verdict", "note", "who", "variant", "prompt")} == {
        "checkpoint": "checkpoint-2", "step": 2, "image": check.images[0].key, "verdict": "degraded",
        "note": "repeats one character", "who": "tester", "variant": "C2", "prompt": DEFAULT_PROMPT}
    assert row["caption"] == check.cells[1].caption is not None
    assert before <= datetime.fromisoformat(row["when"]) <= before + timedelta(minutes=1)
    assert {v: b.button_style for v, b in cell.buttons.items()} == {
        "ok": "", "degraded": "warning", "hallucinated": "", "blind": ""}
    assert view.progress.value == 1 and view.progress_label.value.startswith("judged 1 / 15")

    cell.buttons["ok"].click()  # a changed mind: a new line, the latest counts
    cell.note.value = "fine after all"  # a note on a judged caption: a new line with the same verdict
    view.cells[5].buttons["hallucinated"].click()  # image 2, checkpoint-4
    rows = [json.loads(line) for line in (run / VERDICT_FILE).read_text().splitlines()]
    assert [(r["checkpoint"], r["verdict"], r["note"]) for r in rows] == [
        ("checkpoint-2", "degraded", "repeats one character"), ("checkpoint-2", "ok", "repeats one character"),
        ("checkpoint-2", "ok", "fine after all"), ("checkpoint-4", "hallucinated", "")]
    assert rows[3]["image"] == check.images[1].key
    assert view.progress_label.value.startswith("judged 2 / 15")

    # a kernel restart: new objects read the run folder again
    again = SpotCheckView(open_check(runs_root))
    assert again.check.progress() == (2, 15) and again.progress_label.value.startswith("judged 2 / 15")
    assert (again.check.cells[1].verdict, again.check.cells[1].note) == ("ok", "fine after all")
    assert again.cells[1].note.value == "fine after all" and again.cells[1].buttons["ok"].button_style == "success"
    assert again.cells[5].buttons["hallucinated"].button_style == "danger"
    assert RunFolder(run).verdicts() == rows  # what the guardrails read


def test_keyboard_box_judges_the_framed_caption_and_moves(runs_root):
    view = SpotCheckView(open_check(runs_root))
    check = view.check
    view.keys.value = "1"  # ok for cell 0, then the cursor moves on
    assert view.keys.value == "" and check.cells[0].verdict == "ok" and check.cursor == 1
    assert view.cells[1].box.layout.border.startswith("2px") and view.cells[0].box.layout.border.startswith("1px")
    view.keys.value = "j"
    view.keys.value = "j"
    view.keys.value = "k"
    assert check.cursor == 2
    view.keys.value = "4"
    assert check.cells[2].verdict == "blind" and check.cursor == 3
    check.cursor = 14
    view.keys.value = "n"  # wraps around to the first unjudged caption
    assert check.cursor == 1
    view.keys.value = "x"
    assert "does nothing" in view.status.value and check.progress() == (2, 15)
    for _ in range(13):
        view.keys.value = "n"
        view.keys.value = "2"
    view.keys.value = "n"
    assert check.progress() == (15, 15) and view.status.value == "every caption is judged"
    rows = RunFolder(runs_root / "C2").verdicts()
    assert [r["verdict"] for r in rows] == ["ok", "blind"] + ["degraded"] * 13


def test_bad_verdicts_are_clear_errors(runs_root):
    check = open_check(runs_root)
    with pytest.raises(ValueError, match="verdict = 'meh': expected one of ok, degraded, hallucinated, blind"):
        check.judge("meh")
    with pytest.raises(IndexError, match="cells 0..14"):
        check.judge("ok", index=15)
    check.judge("ok")
    path = runs_root / "C2" / VERDICT_FILE
    with path.open("a") as f:
        f.write(json.dumps({"checkpoint": "checkpoint-2", "image": "x.png", "verdict": "meh"}) + "\n")
    with pytest.raises(DataError, match=r"spotcheck.jsonl: record 2 .*verdict = 'meh'.*correct or delete that line"):
        open_check(runs_root)


# ---------------------------------------------------------------- the guardrails and the summary read the verdicts

@pytest.mark.parametrize("proxy, person", [((False, False, False), "degraded"), ((False, True, True), "ok")])
def test_person_verdicts_decide_the_caption_trigger_and_show_in_the_summary(proxy, person, generated, tmp_path):
    from lora_kit.frontier import collect_runs, study_table

    root = tmp_path / "runs"
    shutil.copytree(generated, root)
    run = root / "C2"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r, d in zip(records, proxy):
        r["caption"] = caption(r["step"], d)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = json.loads((run / "summary.json").read_text())
    summary["best"]["metrics"] = records[-1]
    (run / "summary.json").write_text(json.dumps(summary))
    cfg = RunConfig()  # caption_patience 2: twice in a row
    proxy_fires = check_triggers(records, records[0], cfg)
    assert (proxy_fires is not None) == (proxy[1] and proxy[2])

    check = open_check(root)
    for i, cell in enumerate(check.cells):  # the person judges every image of both checkpoints
        if cell.column.step in STEPS:
            check.judge(person if cell.image == check.images[0] else "ok", index=i)
    verdicts = RunFolder(run).verdicts()
    trigger = check_triggers(records, records[0], cfg, verdicts)
    if person == "degraded":  # the proxy saw nothing, the person saw degradation at 2 and 4
        assert trigger.name == "caption_degraded" and trigger.step == 4
        assert trigger.values["sources"] == ["manual", "manual"]
    else:  # the proxy fired, the person overrules it
        assert trigger is None

    table = check.guardrail_table()
    assert table["step"].tolist() == [0, *STEPS]
    assert table["proxy"].tolist() == ["degraded" if d else "ok" for d in proxy]
    assert table["person"].tolist() == ["—", person, person]
    assert table["images judged"].tolist() == [0, 5, 5]
    assert table["disagree"].tolist() == [False, True, True]
    assert table["caption trigger"].tolist() == [False, False, person == "degraded"]

    row = collect_runs(root).set_index("variant").loc["C2"]
    assert bool(row["caption_manual_degraded"]) == (person == "degraded")
    assert bool(row["caption_proxy_degraded"]) == proxy[2] and bool(row["caption_disagree"])
    assert row["caption_source"] == "manual" and row["caption_disagree_steps"] == "2, 4"
    shown = study_table(collect_runs(root)).loc["C2"]
    assert shown["caption person / proxy"] == f"{person} / {'degraded' if proxy[2] else 'ok'} (disagree)"
    assert shown["person ≠ proxy at steps"] == "2, 4"
