"""The embedded toy world: file format, determinism, split hygiene, answer logic."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_kit.toy import world as W

TINY = W.WorldSpec(seed=0, n_pretrain=120, n_pretrain_val=20, n_task_train=50, n_task_val=10,
                   n_bench_per_kind=8, n_general_eval=6)
JSONL = ["pretrain", "pretrain_val", "task_train", "task_val", "bench", "general_eval", "spotcheck"]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return W.build_world(TINY, tmp_path_factory.mktemp("w") / "world")


def test_rows_have_the_chat_format(tiny):
    for name in JSONL:
        for row in read_jsonl(tiny[name]):
            msgs = row["messages"]
            assert [m["role"] for m in msgs[:2]] == ["system", "user"]
            assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
            assert msgs[0]["content"] == W.system_prompt(TINY.label)
            assert msgs[1]["content"].count("<image>") == len(row["images"])
            if row.get("expected", "") is None:  # ood rows: nothing to imitate, no assistant turn
                assert len(msgs) == 2
            else:
                assert [m["role"] for m in msgs[2:]] == ["assistant"]
    assert all(row["images"] == [] for row in read_jsonl(tiny["general_eval"]))


def test_counts_terms_and_world_json(tiny):
    counts = tiny["counts"]
    for name in JSONL:
        assert counts[f"{name}.jsonl"] == len(read_jsonl(tiny[name]))
    assert counts["pretrain.jsonl"] == TINY.n_pretrain and counts["bench.jsonl"] == len(W.PROBES) * 3 * TINY.n_bench_per_kind
    assert counts["spotcheck.jsonl"] == 5
    assert json.loads(tiny["terms"].read_text(encoding="utf-8")) == {"colours": ["红色", "绿色", "蓝色", "黄色"],
                                                                     "shapes": ["圆形", "三角形"]}
    saved = json.loads(tiny["world"].read_text(encoding="utf-8"))
    assert saved["spec"]["n_pretrain"] == TINY.n_pretrain and saved["counts"] == counts


def test_every_image_exists_and_is_128_rgb(tiny):
    n = 0
    for name in JSONL:
        for row in read_jsonl(tiny[name]):
            for rel in row["images"]:
                with Image.open(tiny["out_dir"] / rel) as img:
                    assert img.size == (128, 128) and img.mode == "RGB"
                n += 1
    assert n > 0


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tiny, tmp_path):
    again = W.build_world(TINY, tmp_path / "again")
    assert all_files(tiny["out_dir"]) == all_files(again["out_dir"])
    other = W.build_world(W.WorldSpec(**{**TINY.__dict__, "seed": 1}), tmp_path / "other")
    a, b = all_files(tiny["out_dir"]), all_files(other["out_dir"])
    assert a["pretrain.jsonl"] != b["pretrain.jsonl"]
    assert a["images/pretrain_00000.png"] != b["images/pretrain_00000.png"]


def test_task_split_is_structured_only_and_new_to_the_base(tiny):
    terse = {c + s for c in W.COLOURS for s in W.SHAPES}
    pretrain = read_jsonl(tiny["pretrain"])
    # the base knows the task prompt only from screenshots (the label) and images without shapes (没有图形):
    # the system rule holds under it, and the stage-4 answer format is never shown
    under_task = [r for r in pretrain if r["messages"][1]["content"].endswith(W.STRUCTURED_PROMPT)]
    assert under_task and {r["messages"][2]["content"] for r in under_task} == {TINY.label, W.NO_SHAPES_ANSWER}
    assert not any(r["messages"][-1]["content"].startswith("图形：") for r in pretrain)
    for name in ["task_train", "task_val"]:
        rows = read_jsonl(tiny[name])
        irrelevant = 0
        for row in rows:
            user, answer = row["messages"][1]["content"], row["messages"][2]["content"]
            assert W.DESCRIBE_PROMPT not in user and user.endswith(W.STRUCTURED_PROMPT)
            if answer == TINY.label:
                irrelevant += 1
            else:
                assert answer.startswith("图形：")
                assert set(answer.removeprefix("图形：").split("，")) <= terse
        assert irrelevant <= max(1, 0.03 * len(rows))


def test_bench_objects_match_their_expected_description(tiny):
    rows = read_jsonl(tiny["bench"])
    groups = [(r["probe"], r["kind"]) for r in rows]
    assert {k: groups.count(k) for k in set(groups)} == {(p, k): TINY.n_bench_per_kind for p in W.PROBES for k in
                                                         ["irrelevant", "ood", "in_domain"]}
    for row in rows:
        assert row["messages"][1]["content"].endswith(W.PROBES[row["probe"]])
        if row["kind"] == "in_domain":
            found = ["".join(m) for m in W.OBJECT_PATTERN.findall(row["expected"])]
            # described left to right; the structured answer lists them in task_answer's fixed order
            assert (found if row["probe"] == "general" else sorted(found)) == (
                row["objects"] if row["probe"] == "general" else sorted(row["objects"]))
            assert row["messages"][2]["content"] == row["expected"]
            assert row["expected"] == (W.describe(row["objects"]) if row["probe"] == "general"
                                       else W.structured_answer(row["objects"]))
        elif row["kind"] == "irrelevant":
            assert row["expected"] == TINY.label and row["objects"] == []
        else:
            assert row["expected"] is None and row["objects"] == []


def test_every_bench_image_is_asked_under_every_probe(tiny):
    rows = read_jsonl(tiny["bench"])
    by_probe = {p: [(r["kind"], r["images"], r["objects"]) for r in rows if r["probe"] == p] for p in W.PROBES}
    assert by_probe["general"] == by_probe["task"] and len(by_probe["task"]) == 3 * TINY.n_bench_per_kind


def test_no_image_is_shared_between_splits(tiny):
    owner = {}
    for name in JSONL:
        for row in read_jsonl(tiny[name]):
            for rel in set(row["images"]):
                assert owner.get(rel, name) == name, f"{rel} in {owner.get(rel)} and {name}"
                owner[rel] = name
    assert len(owner) == tiny["counts"]["images"]


def test_pretrain_mix_has_every_category_and_repeated_screenshots(tiny):
    rows = read_jsonl(tiny["pretrain"])
    answers = [r["messages"][2]["content"] for r in rows]
    repeated = [r for r in rows if len(r["images"]) == 2 and r["images"][0] == r["images"][1]]
    assert repeated and all(r["messages"][2]["content"] == TINY.label for r in repeated)
    assert all(r["messages"][1]["content"].startswith("<image><image>") for r in repeated)
    assert sum(a == TINY.label for a in answers) == round(0.20 * TINY.n_pretrain)
    assert sum(r["images"] == [] for r in rows) == round(0.10 * TINY.n_pretrain)
    assert any(a in W.OTHER_ANSWERS.values() for a in answers)
    assert any(a.startswith("图中") or a.startswith("这张") or a.startswith("画面") for a in answers)


def test_describe_and_task_answer():
    assert W.describe(["红色圆形"]) == "图中有一个红色的圆形。"
    assert W.describe(["蓝色三角形", "红色圆形"]) == "图中有一个蓝色的三角形和一个红色的圆形。"
    assert W.task_answer(["蓝色三角形", "红色圆形"]) == "红色圆形；蓝色三角形"
    assert W.task_answer(["红色三角形", "红色圆形"]) == "红色圆形；红色三角形"
    assert W.task_answer([]) == W.NO_SHAPES_ANSWER
    rng = random.Random(0)
    for _ in range(20):
        objects = ["绿色三角形", "黄色圆形"]
        assert ["".join(m) for m in W.OBJECT_PATTERN.findall(W.describe(objects, rng))] == objects


def test_scenes_have_distinct_objects_of_the_domain():
    rng = random.Random(1)
    for _ in range(200):
        img, objects = W.sample_scene(rng)
        assert img.size == (128, 128) and 1 <= len(objects) <= 2 and len(set(objects)) == len(objects)
        assert all(W.OBJECT_PATTERN.fullmatch(o) for o in objects)


def test_colour_area_never_tells_a_circle_from_a_triangle_wrongly():
    """Every triangle covers fewer pixels than every circle, over the whole size range (measured by drawing).

    With overlapping areas (sides 36-56 px, world v3) the base learnt area as its shape cue and called small
    circles triangles; SHAPE_SIZE keeps the two ranges apart."""
    from PIL import ImageDraw

    def area(shape, side):
        img = Image.new("L", (W.CANVAS, W.CANVAS), 0)
        W._draw_object(ImageDraw.Draw(img), (10, 10, 10 + side, 10 + side), 255, shape)
        return int((np.asarray(img) > 0).sum())

    low, high = W.SHAPE_SIZE
    triangles = [area("三角形", side) for side in range(low, high + 1)]
    circles = [area("圆形", side) for side in range(low, high + 1)]
    assert max(triangles) < min(circles), (max(triangles), min(circles))
    assert area("三角形", 56) > area("圆形", 36)  # the v3 range overlapped: this is what the size range fixes


def test_non_shape_images_have_no_blobs_of_shape_colours():
    """UI and OOD images must not show large areas a model could fairly call 红色/绿色/蓝色/黄色."""
    rng = random.Random(2)
    shape_rgb = np.array(list(W.COLOURS.values()), dtype=float)
    drawers = [W.draw_chat_screenshot, W.draw_settings_page, W.draw_list_page, W.draw_calculator, W.draw_map,
               W.draw_photo]
    for draw in drawers:
        for _ in range(10):
            pixels = np.asarray(draw(rng), dtype=float).reshape(-1, 1, 3)
            near = (np.linalg.norm(pixels - shape_rgb[None], axis=2) < 60).any(axis=1).mean()
            assert near < 0.01, f"{draw.__name__}: {near:.1%} of pixels look like a shape colour"


def test_text_slice_arithmetic_is_right():
    rng = random.Random(3)
    value = {W.number_word(n): n for n in range(30)}
    for _ in range(200):
        question, answer = W.sample_text_qa(rng)
        if "加" in question or "减" in question:
            expr, result = answer.rstrip("。").split("等于")
            a, b = expr.split("加") if "加" in expr else expr.split("减")
            want = value[a] + value[b] if "加" in expr else value[a] - value[b]
            assert value[result] == want, answer
    assert [W.number_word(n) for n in (0, 10, 12, 20, 21)] == ["零", "十", "十二", "二十", "二十一"]


def test_build_world_replaces_a_world_but_refuses_other_folders(tmp_path):
    spec = W.WorldSpec(n_pretrain=10, n_pretrain_val=2, n_task_train=4, n_task_val=2, n_bench_per_kind=2,
                       n_general_eval=2)
    W.build_world(spec, tmp_path / "w")
    W.build_world(W.WorldSpec(**{**spec.__dict__, "seed": 3}), tmp_path / "w")
    assert json.loads((tmp_path / "w" / "world.json").read_text())["spec"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp folders left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a toy world"):
        W.build_world(spec, tmp_path / "other")


def test_contact_sheet(tiny, tmp_path):
    out = W.contact_sheet(tiny["bench"], tmp_path / "sheet.png", n=12)
    with Image.open(out) as img:
        assert img.width > 128 * 4
