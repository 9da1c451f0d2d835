"""Every family the kit trains, end to end on a tiny toy of that family; the families it does not train are refused
before any weight is read; the image-size cap means what the processor says and is the same everywhere."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora_kit.config import load_config
from lora_kit.data import Encoder, read_jsonl
from lora_kit.errors import ConfigError, DataError

from test_train import tiny_params

QUIET = lambda *_: None  # noqa: E731


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- train -> evaluate -> spot-check, per family

@pytest.mark.slow
@pytest.mark.parametrize("family, name, fast_path", [("qwen2_vl", "Qwen2-VL", "vision"),
                                                     ("qwen2_5_vl", "Qwen2.5-VL", "vision")])
def test_train_evaluate_and_spotcheck_each_family(family_ckpt, mini_world, tmp_path, family, name, fast_path):
    """C1 (decoder 2 + vision 2) with packing: the run completes on the family's own fast path, `evaluate` of its
    checkpoint gives the run's own numbers, and the spot-check captions the run's images as its evaluation did."""
    from lora_kit.evaluate import evaluate_checkpoint
    from lora_kit.spotcheck import SpotCheck
    from lora_kit.train import data_files, train

    ckpt = family_ckpt(family)
    params = tiny_params(ckpt, mini_world, tmp_path, max_steps=2, llm_last=2, vit_last=2, packing=True)
    cfg = load_config([params])
    run = train(cfg, log=QUIET)
    summary = json.loads((run / "summary.json").read_text())
    recorded = json.loads((run / "params.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert recorded["family"] == name
    assert summary["fast_path"]["mode"] == fast_path and summary["fast_path"]["hits"] > 0
    last = _metrics(run)[-1]
    assert last["step"] == 2 and last["checkpoint"] == "checkpoints/checkpoint-2"

    result = evaluate_checkpoint(run / last["checkpoint"], cfg, files=data_files(cfg), out=tmp_path / "eval.json")
    assert result["metrics"]["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-4)
    assert result["metrics"]["probes"] == last["probes"]

    check = SpotCheck.open(str(run), log=QUIET)
    assert check.generate_missing(log=QUIET) == 2 * 5  # the baseline and checkpoint-2, 5 images each
    trained = [c.caption for c in check.cells if c.column.step == 2]
    assert trained == last["captions"]  # what the run's own evaluation generated at step 2


# ---------------------------------------------------------------- families the kit does not train

def _config_only_folder(tmp_path: Path, family: str) -> Path:
    from test_targeting import small_model

    folder = tmp_path / family
    model = small_model(family)
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it into a checkpoint
    model.config.save_pretrained(folder)  # config.json alone: nothing to load weights from
    return folder


@pytest.mark.parametrize("family, architecture", [("llava", "LlavaForConditionalGeneration"),
                                                  ("idefics3", "Idefics3ForConditionalGeneration")])
def test_families_the_kit_does_not_train_are_refused_before_any_weight_is_read(tmp_path, mini_world, family,
                                                                             architecture):
    from lora_kit.evaluate import start_model
    from lora_kit.targeting import targets_report
    from lora_kit.train import train

    folder = _config_only_folder(tmp_path, family)
    params = tiny_params(folder, mini_world, tmp_path, llm_last=2, vit_last=0)
    with pytest.raises(ConfigError) as e:
        train(load_config([params]), log=QUIET)
    msg = str(e.value)
    assert f"model_type {family!r} ({architecture}) is not a family lora_kit trains" in msg
    assert "Qwen3-VL (qwen3_vl), Qwen2.5-VL (qwen2_5_vl), Qwen2-VL (qwen2_vl)" in msg
    assert "rope index" in msg and "frozen-prefix runners" in msg and "--format swift" in msg
    assert not (tmp_path / "runs").exists()  # refused before a run folder was claimed
    with pytest.raises(ConfigError, match="is not a family lora_kit trains"):
        start_model(folder)  # evaluate and the spot-check load through it
    assert "not trained by lora_kit" in targets_report(str(folder), 2, 0)  # planning still works, and says so


def test_a_processor_that_does_not_fit_the_config_is_refused(family_ckpt):
    from transformers import AutoConfig, AutoProcessor

    from lora_kit.families import family_of_config

    ckpt = family_ckpt("qwen2_5_vl")
    config = AutoConfig.from_pretrained(ckpt)
    family = family_of_config(config, str(ckpt))
    processor = AutoProcessor.from_pretrained(ckpt)
    family.check_processor(processor, config, str(ckpt))  # the toy's own fits
    config.vision_start_token_id += 1
    config.vision_config.patch_size = 14
    with pytest.raises(ConfigError) as e:
        family.check_processor(processor, config, str(ckpt))
    assert "<|vision_start|> the id" in str(e.value) and "patch_size is 16, config.json's vision_config.patch_size " \
                                                          "is 14" in str(e.value)


# ---------------------------------------------------------------- the image-size cap

def _image(tmp_path: Path, width: int, height: int) -> Path:
    path = tmp_path / f"im_{width}x{height}.png"
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def _sample_file(tmp_path: Path, image: Path) -> Path:
    row = {"messages": [{"role": "user", "content": "<image>请用自然语言描述一下这些图片"},
                        {"role": "assistant", "content": "红色圆形"}], "images": [image.name]}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _smart_resize_tokens(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """Qwen-VL's resize rule written out (round to factor; scale down to max_pixels or up to min_pixels)."""
    import math

    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("min_pixels, max_pixels", [(None, None), (1024, 64 * 1024), (1024, 4096), (1024, None),
                                                    (None, 256 * 1024)])
def test_the_cap_changes_the_image_tokens_as_the_processor_says(family_ckpt, tmp_path, family, min_pixels, max_pixels):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(family_ckpt(family))
    own = processor.image_processor.size  # the toy's own: every image to 128x128 (16 tokens)
    samples, _ = read_jsonl(_sample_file(tmp_path, _image(tmp_path, 3000, 2000)))
    encoded = Encoder(processor, 10_000, min_pixels=min_pixels, max_pixels=max_pixels).encode(samples[0])
    bounds = (min_pixels or own["shortest_edge"], max_pixels or own["longest_edge"])
    expected = _smart_resize_tokens(2000, 3000, 32, *bounds)
    assert encoded.input_ids.count(processor.image_token_id) == expected
    assert int(encoded.image_grid_thw.prod()) == 4 * expected == encoded.pixel_values.shape[0]
    # the processor's own call with the same size gives the same tokens
    text = Encoder(processor, 10_000)._chat(samples[0].messages)
    with Image.open(samples[0].images[0]) as im:
        ref = processor(text=[text], images=[im.convert("RGB")], return_tensors="pt",
                        size={"shortest_edge": bounds[0], "longest_edge": bounds[1]})
    assert encoded.input_ids == ref["input_ids"][0].tolist()


def test_a_cap_below_the_processors_own_min_pixels_is_refused_before_the_run_folder(toy_ckpt, mini_world, tmp_path):
    """max_pixels 4096 alone on the toy, whose processor's own min_pixels is 128 x 128 = 16384: images smaller than
    16384 px were scaled up to 16384 px (16 tokens), four times the cap, while params.json recorded max_pixels 4096."""
    from transformers import AutoProcessor

    from lora_kit.train import train

    processor = AutoProcessor.from_pretrained(toy_ckpt)
    samples, _ = read_jsonl(_sample_file(tmp_path, _image(tmp_path, 40, 40)))
    with pytest.raises(ConfigError) as e:
        Encoder(processor, 10_000, max_pixels=4096).encode(samples[0])
    assert str(e.value).startswith("min_pixels = 16384 (null: the processor's own size.shortest_edge) is above "
                                   "max_pixels = 4096:") and "set min_pixels to at most 4096" in str(e.value)
    # with both bounds the cap holds: a 40x40 image takes at most 4096 px (4 tokens of 32 x 32 px)
    fitted = Encoder(processor, 10_000, min_pixels=1024, max_pixels=4096).encode(samples[0])
    assert fitted.input_ids.count(processor.image_token_id) == _smart_resize_tokens(40, 40, 32, 1024, 4096) <= 4
    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_pixels=4096, variant="P1")
    with pytest.raises(ConfigError, match="is above max_pixels = 4096"):
        train(load_config([params]), log=QUIET)
    assert not (tmp_path / "runs" / "P1").exists()


def test_a_too_long_sample_names_its_image_tokens_and_the_cap_that_fits(toy_ckpt, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(toy_ckpt)
    samples, _ = read_jsonl(_sample_file(tmp_path, _image(tmp_path, 3000, 2000)))
    huge = 3000 * 2000  # a cap that keeps this image at about full resolution
    image_tokens = _smart_resize_tokens(2000, 3000, 32, 1024, huge)
    with pytest.raises(DataError) as e:
        Encoder(processor, 512, min_pixels=1024, max_pixels=huge).encode(samples[0])
    msg = str(e.value)
    n_text = len(Encoder(processor, 10_000, min_pixels=1024, max_pixels=huge).encode(samples[0]).input_ids) \
        - image_tokens
    assert f"{image_tokens + n_text} tokens, longer than max_length=512; {image_tokens} of them are image tokens" in msg
    assert f"3000x2000 px -> {image_tokens} tokens at max_pixels={huge}), {n_text} text tokens" in msg
    cap = int(msg.split("max_pixels=")[-1].split(" ")[0])
    fitted = Encoder(processor, 512, min_pixels=1024, max_pixels=cap).encode(samples[0])  # the named cap fits
    assert len(fitted.input_ids) <= 512
    assert fitted.input_ids.count(processor.image_token_id) >= 0.9 * (512 - n_text)  # and keeps most of the room
    assert "or raise max_length to" in msg


@pytest.mark.slow
def test_the_cap_is_the_same_in_training_evaluation_and_the_spotcheck(toy_ckpt, mini_world, tmp_path):
    """max_pixels 4096 makes the world's 128x128 images 64x64 (4 tokens instead of the toy's 16) in training,
    in `evaluate` of the run's checkpoint and in the spot-check; evaluating a copy at the processor's own size
    gives other numbers, so the run's size is what made them equal."""
    from lora_kit.evaluate import evaluate_checkpoint
    from lora_kit.spotcheck import Column, Run, load_column
    from lora_kit.train import data_files, train

    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, llm_last=2, vit_last=0, min_pixels=1024,
                         max_pixels=4096)
    cfg = load_config([params])
    run = train(cfg, log=QUIET)
    recorded = json.loads((run / "params.json").read_text())
    assert recorded["config"]["max_pixels"] == 4096
    assert recorded["image_resolution"] == {"min_pixels": 1024, "max_pixels": 4096, "patch_size": 16,
                                            "merge_size": 2}
    last = _metrics(run)[-1]
    ckpt = run / last["checkpoint"]

    # evaluate without naming the size: the run's is used
    unset = load_config([params], {"min_pixels": None, "max_pixels": None})
    result = evaluate_checkpoint(ckpt, unset, files=data_files(unset), out=tmp_path / "eval.json")
    assert result["image_resolution"]["max_pixels"] == 4096
    assert result["metrics"]["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-4)
    with pytest.raises(ConfigError, match=r"max_pixels = 8192, but .* was trained with max_pixels = 4096"):
        evaluate_checkpoint(ckpt, load_config([params], {"max_pixels": 8192}), files=data_files(unset))

    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)  # outside its run folder: the config's size (the processor's own here)
    other = evaluate_checkpoint(copy, unset, files=data_files(unset), out=tmp_path / "other.json")
    assert other["image_resolution"]["max_pixels"] == 128 * 128
    assert abs(other["metrics"]["eval_loss"] - last["eval_loss"]) > 1e-3

    _, encoder = load_column(Column(Run.read(run), 2, ckpt))
    assert encoder.resolution == recorded["image_resolution"]
    samples, _ = read_jsonl(mini_world / "task_val.jsonl")
    assert encoder.encode(samples[0]).input_ids.count(encoder.image_token_id) == 4


# ---------------------------------------------------------------- the toy per family

def test_toy_names_of_each_family_and_the_default_key():
    import dataclasses
    import hashlib

    from lora_kit.config import TOY_MODELS
    from lora_kit.toy import DEFAULT, TOY_VERSION, WORLD_VERSION, build_of_family, toy_build_and_stage

    # the Qwen3-VL toy keeps the key it had before families existed (its cached build stays valid)
    old = dataclasses.asdict(DEFAULT)
    del old["model"]["family"]
    blob = json.dumps({"toy_version": TOY_VERSION, "world_version": WORLD_VERSION, **old}, sort_keys=True)
    assert DEFAULT.key() == hashlib.sha256(blob.encode()).hexdigest()[:10]
    assert build_of_family("qwen3_vl") == DEFAULT
    keys = {DEFAULT.key(), build_of_family("qwen2_5_vl").key(), build_of_family("qwen2_vl").key()}
    assert len(keys) == 3
    assert toy_build_and_stage("toy") == (DEFAULT, "stage3")
    assert toy_build_and_stage("toy-qwen2_5_vl-stage2") == (build_of_family("qwen2_5_vl"), "stage2")
    assert toy_build_and_stage("toy-qwen2_vl") == (build_of_family("qwen2_vl"), "stage3")
    assert toy_build_and_stage("/models/qwen2.5-vl") is None
    assert set(TOY_MODELS) == {"toy", "toy-stage2", "toy-qwen2_5_vl", "toy-qwen2_5_vl-stage2", "toy-qwen2_vl",
                               "toy-qwen2_vl-stage2"}
    assert load_config([], {"model": "toy-qwen2_5_vl"}).profile == "toy"  # a toy name keeps the toy profile


def test_a_folder_built_by_toy_build_is_a_toy(family_ckpt, mini_world, tmp_path):
    """A toy checkpoint folder with its world beside it takes the toy profile and the world's data files."""
    from lora_kit.train import data_files

    root = tmp_path / "toy"
    shutil.copytree(family_ckpt("qwen2_5_vl"), root / "init")
    shutil.copytree(mini_world, root / "world")
    cfg = load_config([], {"model": str(root / "init")})
    assert cfg.profile == "toy" and data_files(cfg)["train_file"] == root / "world" / "task_train.jsonl"
    (root / "world" / "world.json").unlink()  # no world beside it: an ordinary folder, refused with the toy profile
    with pytest.raises(ConfigError, match="the toy profile only with a toy model"):
        load_config([], {"model": str(root / "init")})


@pytest.mark.slow
def test_a_miniature_toy_of_another_family_builds_pretrains_and_reports(tmp_path, monkeypatch):
    import dataclasses

    from transformers import AutoConfig

    from lora_kit.toy import build_toy, resolve_model
    from test_toy_build import MINI

    monkeypatch.setenv("LORA_KIT_OUTPUTS", str(tmp_path))
    mini = dataclasses.replace(MINI, model=dataclasses.replace(MINI.model, family="qwen2_5_vl"))
    report = build_toy(build=mini, progress=False)
    assert all(g["irrelevant_pass"]["n"] == 3 for g in report["stage3"]["metrics"]["probes"].values())
    stage3 = resolve_model("toy", build=mini)
    assert AutoConfig.from_pretrained(stage3).model_type == "qwen2_5_vl"
    assert (stage3 / "toy_spec.json").is_file()
