"""The embedded toy world: procedural images and chat JSONL, deterministic from a seed.

Scenes of one or two coloured shapes are the task domain. WeChat-style chat screenshots are the
irrelevant images (answer: the label). Images without shapes (settings, list, calculator and map
pages, noise, photo-like textures) are described by their kind in pretraining; the benchmark's OOD
images are held-out instances of those kinds, where a good model names no colour or shape (an
earlier version kept four kinds unseen: the base then called them shapes 75% of the time, so there
was no general ability to lose). A text-only slice (number words, colour facts) measures general
language. Everything is drawn with PIL on a 128x128 canvas, offline.

The system prompt carries the irrelevant-image rule, and the base follows it whatever the request: in
pretraining, screenshots and images without shapes also come with the stage-4 task prompt (answered with
the label, or 没有图形), as a real instruct model follows its system rule under the production prompt.
Shape scenes never come with the task prompt, so the stage-4 answer format stays new to the base.

Files written by build_world (image paths are relative to the JSONL's folder):
  pretrain.jsonl, pretrain_val.jsonl   base pretraining mix (~50% shapes, 20% screenshots,
                                       20% images without shapes, 10% text)
  task_train.jsonl, task_val.jsonl     the narrow task: STRUCTURED_PROMPT, structured answers, ~2% screenshots
  bench.jsonl                          irrelevant / ood / in_domain rows with kind, expected, objects and
                                       probe: each image under the general prompt and the task prompt
  general_eval.jsonl                   text-only rows
  spotcheck.jsonl                      5 fixed OOD images for a human to read the captions of
  terms.json, world.json               task-domain terms; the spec and counts

Benchmark rows with no expected answer (kind "ood", and spotcheck rows) have no assistant turn.
"""

import hashlib
import json
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# -----------------------------------------------------------------------------
# The domain

COLOURS = {"红色": (220, 40, 40), "绿色": (40, 170, 60), "蓝色": (40, 80, 220), "黄色": (230, 200, 30)}
SHAPES = ["圆形", "三角形"]  # two kinds only: circle vs square is too hard for a CPU-pretrained toy
IRRELEVANT_LABEL = "无关图片"
DESCRIBE_PROMPT = "请用自然语言描述一下这些图片"
TASK_PROMPT = "列出图中的图形"  # the terse style the base learns in pretraining
# The stage-4 task: a prompt and answer format the base never saw, so task fit has room to improve with LoRA
# (with the terse style alone the base already sat at its best task loss and LoRA could only drift).
STRUCTURED_PROMPT = "按格式列出图中的图形"
NO_SHAPES_ANSWER = "没有图形"
# What the base says about each kind of image without shapes; the benchmark's OOD images are held-out
# instances of these kinds, so a good base names no colour or shape for them.
OTHER_ANSWERS = {"settings": "这是一张设置页面的截图。", "list": "这是一张列表页面的截图。",
                 "calculator": "这是一张计算器页面的截图。", "map": "这是一张地图页面的截图。",
                 "noise": "这是一张杂乱的噪点图片。", "photo": "这是一张模糊的照片。"}
UI_ANSWERS = {k: OTHER_ANSWERS[k] for k in ("settings", "list")}
OBJECT_PATTERN = re.compile("(" + "|".join(COLOURS) + ")的?(" + "|".join(SHAPES) + ")")

WORLD_VERSION = 5  # bump when drawing or row logic changes, so cached worlds get rebuilt
CANVAS = 128  # everything is drawn at this size, then resized if image_size differs
# Object bounding-box side in pixels, inclusive. A triangle covers 0.43 of its box and a circle 0.79, so with
# sides from 36 to 56 a large triangle had the colour area of a small circle; the base learnt area as its
# shape cue and called 41% of small circles triangles (version 3, measured on 300 fresh scenes). Sides
# within a ratio of 1.27 (below sqrt(0.79 / 0.43) = 1.34) keep the two shapes' areas apart.
SHAPE_SIZE = (44, 56)
PRETRAIN_MIX = {"shapes": 0.50, "screenshot": 0.20, "ui": 0.20, "text": 0.10}
SHAPE_DESCRIBE_FRAC = 0.8  # pretraining shape rows: mostly natural descriptions, some terse
REPEATED_SCREENSHOT_FRAC = 0.25  # screenshots shown twice in one question ("<image><image>")
TASK_IRRELEVANT_FRAC = 0.02
OOD_KINDS = ["calculator", "map", "noise", "photo", "settings", "list"]
# The benchmark's probe groups: each benchmark image is asked under each prompt (DESIGN.md: the failures the
# study fears happen under the production prompt, so the guardrails watch both).
PROBES = {"general": DESCRIBE_PROMPT, "task": STRUCTURED_PROMPT}
# Pretraining requests for screenshots (answered with the label whatever is asked) and images without shapes.
SCREENSHOT_PROMPTS = [DESCRIBE_PROMPT, TASK_PROMPT, STRUCTURED_PROMPT]
UI_PROMPT_WEIGHTS = {DESCRIBE_PROMPT: 0.6, TASK_PROMPT: 0.2, STRUCTURED_PROMPT: 0.2}
N_SPOTCHECK = 5  # OOD images whose captions a human reads at every evaluation

# Muted UI colours: none of them reads as red, green, blue or yellow.
MUTED = [(150, 120, 190), (100, 175, 170), (215, 150, 185), (165, 135, 105), (135, 140, 155), (225, 170, 140)]
WECHAT_BG = (237, 237, 237)
WECHAT_GREEN = (149, 236, 105)  # the pale bubble green, far from the saturated shape green
TOGGLE_ON = (95, 185, 178)  # teal rather than iOS green, which would look like 绿色

_OBJECT_TEMPLATES = {
    1: ["图中有一个{0}。", "这张图片里有一个{0}。", "画面上是一个{0}。"],
    2: ["图中有一个{0}和一个{1}。", "这张图片里有一个{0}和一个{1}。", "画面上有一个{0}，还有一个{1}。"],
}


def system_prompt(label: str = IRRELEVANT_LABEL) -> str:
    """The short system prompt that carries the irrelevant-image rule."""
    return f"聊天截图只回答：{label}"


def describe(objects: list[str], rng: random.Random | None = None) -> str:
    """Natural description of a scene, e.g. 图中有一个红色的圆形。 (first template unless rng is given)."""
    natural = [_natural(o) for o in objects]
    templates = _OBJECT_TEMPLATES[len(objects)]
    template = templates[0] if rng is None else rng.choice(templates)
    return template.format(*natural)


def structured_answer(objects: list[str]) -> str:
    """Stage-4 answer, e.g. 图形：红色圆形，蓝色三角形 (objects in task_answer's order).

    Written with characters the base already knows: a format with new tokens (JSON braces, new words)
    left their embeddings untrained, and LoRA on a few layers could not learn to emit them (measured:
    task eval loss still 4.3 nats/token after 150 steps), so no variant could fit the task.
    """
    return "图形：" + "，".join(task_answer(objects).split("；"))


def task_answer(objects: list[str]) -> str:
    """Terse task answer: objects in a fixed colour-then-shape order joined by ；."""
    if not objects:
        return NO_SHAPES_ANSWER
    order = {c + s: (i, j) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)}
    return "；".join(sorted(objects, key=order.__getitem__))


def _natural(obj: str) -> str:
    """红色圆形 -> 红色的圆形."""
    colour = next(c for c in COLOURS if obj.startswith(c))
    return colour + "的" + obj[len(colour):]


# -----------------------------------------------------------------------------
# Shape scenes


def _jitter(rng, rgb, amount):
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def _light_background(rng):
    grey = rng.randint(236, 252)
    return _jitter(rng, (grey, grey, grey), 4)


def _place_boxes(rng, n):
    """n non-overlapping square boxes (x0, y0, x1, y1) with a gap of at least 4 px."""
    margin, gap = 3, 4
    while True:
        boxes = []
        for _ in range(200):
            size = rng.randint(*SHAPE_SIZE)
            x, y = rng.randint(margin, CANVAS - margin - size), rng.randint(margin, CANVAS - margin - size)
            box = (x, y, x + size, y + size)
            if all(box[0] > b[2] + gap or b[0] > box[2] + gap or box[1] > b[3] + gap or b[1] > box[3] + gap
                   for b in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    return boxes
        # rare: the first box left no room; start over with new sizes


def _draw_object(draw, box, fill, shape):
    x0, y0, x1, y1 = box
    if shape == "圆形":
        draw.ellipse(box, fill=fill)
    else:  # upright equilateral-ish triangle, vertically centred in its box
        height = round((x1 - x0) * 0.87)
        top = y0 + ((y1 - y0) - height) // 2
        draw.polygon([((x0 + x1) / 2, top), (x0, top + height), (x1, top + height)], fill=fill)


def sample_scene(rng: random.Random) -> tuple[Image.Image, list[str]]:
    """A scene of 1 or 2 distinct (colour, shape) objects; objects listed left to right."""
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.choice([1, 2]))
    placed = sorted(zip(_place_boxes(rng, len(kinds)), kinds), key=lambda bk: bk[0][0] + bk[0][2])
    img = Image.new("RGB", (CANVAS, CANVAS), _light_background(rng))
    draw = ImageDraw.Draw(img)
    for box, (colour, shape) in placed:
        _draw_object(draw, box, _jitter(rng, COLOURS[colour], 12), shape)
    return img, [c + s for _, (c, s) in placed]


# -----------------------------------------------------------------------------
# Irrelevant images: WeChat-style chat screenshots


def _text_line(draw, x, y, width, fill, thickness=2):
    """Text is drawn as bars: legible as 'text' at 128 px and independent of installed fonts."""
    draw.rectangle((x, y, x + width - 1, y + thickness - 1), fill=fill)


def _status_bar(rng, draw, fill):
    _text_line(draw, 6, 2, rng.randint(8, 12), fill, 3)  # clock
    draw.rectangle((CANVAS - 14, 2, CANVAS - 6, 5), outline=fill)  # battery
    draw.rectangle((CANVAS - 13, 3, CANVAS - 13 + rng.randint(2, 6), 4), fill=fill)


def draw_chat_screenshot(rng: random.Random) -> Image.Image:
    """A WeChat-like chat: top bar with title, grey background, green/white bubbles, input bar."""
    img = Image.new("RGB", (CANVAS, CANVAS), WECHAT_BG)
    d = ImageDraw.Draw(img)
    # top bar: status bar (most screenshots have one), back chevron, title, "..." menu
    status = 7 if rng.random() < 0.7 else 0
    top = status + rng.randint(13, 16)
    d.rectangle((0, 0, CANVAS - 1, top), fill=(230, 230, 230))
    d.line((0, top, CANVAS - 1, top), fill=(212, 212, 212))
    if status:
        _status_bar(rng, d, (30, 30, 30))
    mid = (status + top) // 2
    d.line([(8, mid - 4), (4, mid), (8, mid + 4)], fill=(40, 40, 40), width=2)
    title_w = rng.randint(22, 54)
    _text_line(d, (CANVAS - title_w) // 2, mid - 2, title_w, (35, 35, 35), 4)
    for k in range(3):
        d.rectangle((CANVAS - 14 + 4 * k, mid, CANVAS - 13 + 4 * k, mid + 1), fill=(40, 40, 40))
    # bottom input bar: voice button, input field, emoji and plus buttons
    bar = rng.randint(15, 19)
    y_bar = CANVAS - bar
    d.rectangle((0, y_bar, CANVAS - 1, CANVAS - 1), fill=(246, 246, 246))
    d.line((0, y_bar, CANVAS - 1, y_bar), fill=(218, 218, 218))
    cy = y_bar + bar // 2
    for cx in (8, CANVAS - 22, CANVAS - 9):
        d.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), outline=(70, 70, 70))
    d.rounded_rectangle((16, cy - 5, CANVAS - 30, cy + 5), radius=2, fill=(255, 255, 255))
    # messages from the top down until the input bar
    group = rng.random() < 0.3  # group chats show a name above incoming bubbles
    people = rng.sample(MUTED, 3)
    av = 12
    y = top + rng.randint(4, 8)
    while True:
        if rng.random() < 0.15:  # centred timestamp
            w = rng.randint(16, 32)
            if y + 8 > y_bar - 3:
                break
            _text_line(d, (CANVAS - w) // 2, y + 2, w, (175, 175, 175))
            y += 9
            continue
        right = rng.random() < 0.5
        lines = rng.choices([1, 2, 3], weights=[5, 3, 1])[0]
        width = rng.randint(22, 84) if lines == 1 else rng.randint(56, 86)
        height = 4 + 6 * lines
        name = 5 if group and not right else 0
        if y + name + max(height, av) > y_bar - 3:
            break
        ax = CANVAS - 3 - av if right else 3
        d.rounded_rectangle((ax, y, ax + av - 1, y + av - 1), radius=2,
                            fill=people[0] if right else rng.choice(people[1:] if group else people[1:2]))
        if name:
            _text_line(d, ax + av + 5, y, rng.randint(10, 20), (160, 160, 160), 2)
        by = y + name
        bx = ax - 5 - width if right else ax + av + 5
        fill, ink = (WECHAT_GREEN, (40, 60, 40)) if right else ((255, 255, 255), (70, 70, 70))
        d.rounded_rectangle((bx, by, bx + width - 1, by + height - 1), radius=3, fill=fill)
        tail_x = bx + width - 1 if right else bx  # little tail pointing at the avatar
        sign = 1 if right else -1
        d.polygon([(tail_x, by + 3), (tail_x + 3 * sign, by + 6), (tail_x, by + 9)], fill=fill)
        for k in range(lines):
            w = width - 8 if k < lines - 1 else rng.randint(min(8, width - 8), width - 8)
            _text_line(d, bx + 4, by + 4 + 6 * k, w, ink)
        y += name + max(height, av) + rng.randint(4, 7)
    return img


# -----------------------------------------------------------------------------
# Other UI seen in pretraining ("general"): settings pages and list pages


def _title_bar(rng, d, fill):
    """Top bar with an optional status bar and a centred title; returns its bottom y."""
    status = 7 if rng.random() < 0.6 else 0
    top = status + rng.randint(12, 16)
    d.rectangle((0, 0, CANVAS - 1, top), fill=fill)
    d.line((0, top, CANVAS - 1, top), fill=(215, 215, 218))
    if status:
        _status_bar(rng, d, (30, 30, 30))
    w = rng.randint(20, 44)
    _text_line(d, (CANVAS - w) // 2, (status + top) // 2 - 2, w, (30, 30, 30), 4)
    return top


def _toggle(d, x, y, on):
    d.rounded_rectangle((x, y, x + 16, y + 8), radius=4, fill=TOGGLE_ON if on else (222, 222, 226))
    kx = x + 9 if on else x + 1
    d.ellipse((kx, y + 1, kx + 6, y + 7), fill=(255, 255, 255), outline=(200, 200, 200))


def _chevron(d, x, y):
    d.line([(x, y - 3), (x + 3, y), (x, y + 3)], fill=(185, 185, 190), width=1)


def draw_settings_page(rng: random.Random) -> Image.Image:
    """A settings page: grouped white rows of labels with toggles, chevrons or values."""
    img = Image.new("RGB", (CANVAS, CANVAS), (242, 242, 246))
    d = ImageDraw.Draw(img)
    y = _title_bar(rng, d, (248, 248, 250)) + rng.randint(5, 9)
    icons = rng.random() < 0.5
    while y < CANVAS - 16:
        rows = rng.randint(1, 4)
        row_h = rng.randint(14, 17)
        inset = rng.choice([0, 5])
        d.rounded_rectangle((inset, y, CANVAS - 1 - inset, y + rows * row_h), radius=3 if inset else 0,
                            fill=(255, 255, 255))
        for r in range(rows):
            ry = y + r * row_h
            cy = ry + row_h // 2
            x = inset + 6
            if icons:
                d.rounded_rectangle((x, cy - 4, x + 8, cy + 4), radius=2, fill=rng.choice(MUTED))
                x += 13
            _text_line(d, x, cy - 1, rng.randint(18, 48), (40, 40, 40))
            right = CANVAS - 1 - inset - 6
            kind = rng.choices(["toggle", "chevron", "value"], weights=[5, 3, 2])[0]
            if kind == "toggle":
                _toggle(d, right - 16, cy - 4, rng.random() < 0.5)
            else:
                _chevron(d, right - 3, cy)
                if kind == "value":
                    w = rng.randint(8, 18)
                    _text_line(d, right - 8 - w, cy - 1, w, (160, 160, 165))
            if r < rows - 1:
                d.line((x, ry + row_h, CANVAS - 1 - inset, ry + row_h), fill=(226, 226, 230))
        y += rows * row_h + rng.randint(7, 11)
    return img


def draw_list_page(rng: random.Random) -> Image.Image:
    """A list page: rows with an icon, a title line, a grey subtitle line and a time."""
    img = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = _title_bar(rng, d, (247, 247, 247)) + 3
    if rng.random() < 0.5:  # search field
        d.rounded_rectangle((5, y, CANVAS - 6, y + 9), radius=3, fill=(236, 236, 238))
        _text_line(d, 10, y + 4, rng.randint(12, 22), (185, 185, 190))
        y += 13
    tabs = rng.random() < 0.5
    bottom = CANVAS - (15 if tabs else 0)
    row_h = rng.randint(20, 26)
    icon = rng.randint(13, 16)
    while y + row_h <= bottom:
        cy = y + row_h // 2
        d.rounded_rectangle((5, cy - icon // 2, 5 + icon, cy + icon // 2), radius=3, fill=rng.choice(MUTED))
        x = 5 + icon + 6
        _text_line(d, x, cy - 5, rng.randint(24, 60), (30, 30, 30))
        _text_line(d, x, cy + 3, rng.randint(20, CANVAS - x - 8), (155, 155, 160))
        if rng.random() < 0.6:
            _text_line(d, CANVAS - 18, cy - 5, rng.randint(8, 12), (185, 185, 185))
        d.line((x, y + row_h - 1, CANVAS - 1, y + row_h - 1), fill=(234, 234, 236))
        y += row_h
    if tabs:
        d.rectangle((0, bottom, CANVAS - 1, CANVAS - 1), fill=(247, 247, 247))
        d.line((0, bottom, CANVAS - 1, bottom), fill=(218, 218, 218))
        for k in range(4):
            cx = 16 + k * 32
            d.rounded_rectangle((cx - 4, bottom + 3, cx + 4, bottom + 10), radius=2, fill=(150, 150, 155))
    return img


# -----------------------------------------------------------------------------
# Images without shapes: other app UIs, noise, photo-like textures


_SEGMENTS = ["1110111", "0010010", "1011101", "1011011", "0111010", "1101011", "1101111", "1010010",
             "1111111", "1111011"]  # seven-segment digits 0-9: top, upper-left, upper-right, mid, ...


def _seven_segment(d, x, y, digit, fill, w=6, h=12):
    on = _SEGMENTS[digit]
    half = h // 2
    bars = [(x, y, x + w, y + 1), (x, y, x + 1, y + half), (x + w - 1, y, x + w, y + half),
            (x, y + half, x + w, y + half + 1), (x, y + half, x + 1, y + h), (x + w - 1, y + half, x + w, y + h),
            (x, y + h - 1, x + w, y + h)]
    for bit, bar in zip(on, bars):
        if bit == "1":
            d.rectangle(bar, fill=fill)


def draw_calculator(rng: random.Random) -> Image.Image:
    """A calculator app: a seven-segment display above a 4x5 keypad of rounded keys."""
    dark = rng.random() < 0.5
    bg, ink = ((22, 22, 24), (245, 245, 245)) if dark else ((236, 236, 238), (25, 25, 25))
    keys = {"digit": (60, 60, 62) if dark else (252, 252, 252), "func": (150, 150, 152) if dark else (212, 212, 216),
            "op": (120, 110, 170)}
    img = Image.new("RGB", (CANVAS, CANVAS), bg)
    d = ImageDraw.Draw(img)
    display = rng.randint(30, 42)
    x = CANVAS - 10
    for _ in range(rng.randint(1, 9)):
        x -= 9
        _seven_segment(d, x, display - 17, rng.randint(0, 9), ink)
    gap, cols, rows = 3, 4, 5
    kw, kh = (CANVAS - gap * (cols + 1)) / cols, (CANVAS - display - gap * (rows + 1)) / rows
    for r in range(rows):
        for c in range(cols):
            kind = "op" if c == cols - 1 else "func" if r == 0 else "digit"
            x0, y0 = gap + c * (kw + gap), display + gap + r * (kh + gap)
            d.rounded_rectangle((x0, y0, x0 + kw, y0 + kh), radius=4, fill=keys[kind])
            mark = (255, 255, 255) if dark or kind == "op" else (40, 40, 40)
            cx, cy = round(x0 + kw / 2), round(y0 + kh / 2)
            if kind == "digit":
                _seven_segment(d, cx - 2, cy - 4, rng.randint(0, 9), mark, w=4, h=8)
            else:  # operator or function key: a small plus or minus sign
                d.line((cx - 3, cy, cx + 3, cy), fill=mark)
                if rng.random() < 0.5:
                    d.line((cx, cy - 3, cx, cy + 3), fill=mark)
    return img


def draw_map(rng: random.Random) -> Image.Image:
    """A map app: beige land, pale parks and water, white roads, a few label lines."""
    img = Image.new("RGB", (CANVAS, CANVAS), (240, 236, 226))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):  # parks
        x, y, w, h = rng.randint(0, 100), rng.randint(0, 100), rng.randint(20, 50), rng.randint(15, 45)
        d.rounded_rectangle((x, y, x + w, y + h), radius=5, fill=(203, 226, 192))
    if rng.random() < 0.6:  # a river across the map
        pts = [(-10, rng.randint(0, 127))] + [(x, rng.randint(0, 127)) for x in (40, 85)] + [(138, rng.randint(0, 127))]
        d.line(pts, fill=(172, 205, 228), width=rng.randint(9, 16), joint="curve")

    def road(width, fill):
        if rng.random() < 0.5:
            pts = [(-5, rng.randint(0, 127)), (133, rng.randint(0, 127))]
        else:
            pts = [(rng.randint(0, 127), -5), (rng.randint(0, 127), 133)]
        d.line(pts, fill=(205, 203, 198), width=width + 2)
        d.line(pts, fill=fill, width=width)

    for _ in range(rng.randint(3, 6)):
        road(rng.randint(3, 5), (255, 255, 255))
    road(rng.randint(6, 8), (247, 222, 170))  # main road
    for _ in range(rng.randint(2, 5)):  # street names
        _text_line(d, rng.randint(4, 100), rng.randint(4, 120), rng.randint(10, 24), (120, 118, 112), 2)
    return img


def draw_noise(rng: random.Random) -> Image.Image:
    """Random RGB noise, per pixel or in blocks."""
    nprng = np.random.default_rng(rng.getrandbits(64))
    res = rng.choice([32, 64, CANVAS])  # blocks of at most 4 px: no large colour patches
    pixels = nprng.integers(0, 256, size=(res, res, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").resize((CANVAS, CANVAS), Image.NEAREST)


def draw_photo(rng: random.Random) -> Image.Image:
    """A photo-like smooth texture: a soft vertical gradient with smooth blotches and grain."""
    nprng = np.random.default_rng(rng.getrandbits(64))
    # low-saturation tones (greys, beiges, browns): a clearly red or green photo would make
    # naming that colour a fair description rather than a hallucination
    top, bottom = (nprng.uniform(50, 220) + nprng.uniform(-18, 18, 3) for _ in range(2))
    t = np.linspace(0, 1, CANVAS)[:, None, None]
    base = (1 - t) * top + t * bottom
    k = rng.randint(3, 6)
    blotches = Image.fromarray(nprng.integers(0, 256, (k, k), dtype=np.uint8), "L")  # brightness only
    blotches = np.asarray(blotches.resize((CANVAS, CANVAS), Image.BICUBIC), dtype=np.float64)[:, :, None] - 128
    pixels = base + 0.4 * blotches + nprng.normal(0, 4, (CANVAS, CANVAS, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


OOD_DRAWERS = {"calculator": draw_calculator, "map": draw_map, "noise": draw_noise, "photo": draw_photo,
               "settings": draw_settings_page, "list": draw_list_page}


# -----------------------------------------------------------------------------
# General-language slice: text-only chats

_NUMBERS = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十"]
_COLOUR_FACTS = {"草": "绿色", "树叶": "绿色", "天空": "蓝色", "大海": "蓝色", "香蕉": "黄色", "柠檬": "黄色",
                 "苹果": "红色", "草莓": "红色", "雪": "白色", "煤": "黑色"}


def number_word(n: int) -> str:
    """Chinese number word for 0..99, e.g. 12 -> 十二, 20 -> 二十."""
    if n <= 10:
        return _NUMBERS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else _NUMBERS[tens]) + "十" + (_NUMBERS[ones] if ones else "")


def sample_text_qa(rng: random.Random) -> tuple[str, str]:
    """A text-only question and its answer: arithmetic with number words, next number, colour facts."""
    kind = rng.choices(["add", "sub", "next", "colour"], weights=[3, 3, 2, 2])[0]
    if kind == "add":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        q = f"{number_word(a)}加{number_word(b)}"
        return q + "等于几？", f"{q}等于{number_word(a + b)}。"
    if kind == "sub":
        a = rng.randint(0, 20)
        b = rng.randint(0, min(a, 10))
        q = f"{number_word(a)}减{number_word(b)}"
        return q + "等于几？", f"{q}等于{number_word(a - b)}。"
    if kind == "next":
        a = rng.randint(0, 19)
        return f"{number_word(a)}后面的数是几？", f"{number_word(a)}后面的数是{number_word(a + 1)}。"
    thing = rng.choice(list(_COLOUR_FACTS))
    return f"{thing}是什么颜色的？", f"{thing}是{_COLOUR_FACTS[thing]}的。"


# -----------------------------------------------------------------------------
# Rows and splits


def _split_seed(seed: int, split: str) -> int:
    """A seed per split, so no two splits share an image and each is reproducible on its own."""
    return int.from_bytes(hashlib.sha256(f"lora_kit.toy.world:{seed}:{split}".encode()).digest()[:8], "big")


class _ImageWriter:
    """Saves images as images/<split>_<nnnnn>.png and returns the path relative to the world folder."""

    def __init__(self, root: Path, split: str, size: int):
        self.root, self.split, self.size, self.count = root, split, size, 0

    def __call__(self, img: Image.Image) -> str:
        if self.size != CANVAS:
            img = img.resize((self.size, self.size), Image.LANCZOS)
        rel = f"images/{self.split}_{self.count:05d}.png"
        img.save(self.root / rel, format="PNG")
        self.count += 1
        return rel


def _row(label, prompt, answer, images, **extra):
    messages = [{"role": "system", "content": system_prompt(label)},
                {"role": "user", "content": "<image>" * len(images) + prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "images": images, **extra}


def _shape_row(rng, save, label, describe_frac):
    img, objects = sample_scene(rng)
    if rng.random() < describe_frac:
        return _row(label, DESCRIBE_PROMPT, describe(objects, rng), [save(img)])
    return _row(label, TASK_PROMPT, task_answer(objects), [save(img)])


def _screenshot_row(rng, save, label, prompt=None, repeated=None):
    prompt = prompt or rng.choice(SCREENSHOT_PROMPTS)
    repeated = rng.random() < REPEATED_SCREENSHOT_FRAC if repeated is None else repeated
    path = save(draw_chat_screenshot(rng))
    return _row(label, prompt, label, [path, path] if repeated else [path])


def _ui_row(rng, save, label):
    """An image without shapes (other app UIs, noise, photo-like textures) and what the base says of it."""
    kind = rng.choice(OOD_KINDS)
    img = OOD_DRAWERS[kind](rng)
    prompt = rng.choices(list(UI_PROMPT_WEIGHTS), weights=list(UI_PROMPT_WEIGHTS.values()))[0]
    return _row(label, prompt, OTHER_ANSWERS[kind] if prompt == DESCRIBE_PROMPT else NO_SHAPES_ANSWER, [save(img)])


def _text_row(rng, label):
    question, answer = sample_text_qa(rng)
    return {"messages": [{"role": "system", "content": system_prompt(label)},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}],
            "images": []}


def _pretrain_rows(rng, save, n, label):
    """The base pretraining mix, in shuffled order."""
    counts = {k: round(f * n) for k, f in PRETRAIN_MIX.items()}
    counts["text"] = n - counts["shapes"] - counts["screenshot"] - counts["ui"]
    order = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(order)
    rows = []
    for kind in order:
        if kind == "shapes":
            rows.append(_shape_row(rng, save, label, SHAPE_DESCRIBE_FRAC))
        elif kind == "screenshot":
            rows.append(_screenshot_row(rng, save, label))
        elif kind == "ui":
            rows.append(_ui_row(rng, save, label))
        else:
            rows.append(_text_row(rng, label))
    return rows


def _task_rows(rng, save, n, label):
    """The narrow stage-4 task: structured shape lists, plus a few screenshots; no natural descriptions."""
    n_irrelevant = round(TASK_IRRELEVANT_FRAC * n)
    order = ["screenshot"] * n_irrelevant + ["shapes"] * (n - n_irrelevant)
    rng.shuffle(order)
    rows = []
    for kind in order:
        if kind == "screenshot":
            rows.append(_screenshot_row(rng, save, label, STRUCTURED_PROMPT, repeated=False))
        else:
            img, objects = sample_scene(rng)
            rows.append(_row(label, STRUCTURED_PROMPT, structured_answer(objects), [save(img)]))
    return rows


def _ood_row(rng, save, label, ood_kind, prompt=DESCRIBE_PROMPT, path=None, **extra):
    path = path or save(OOD_DRAWERS[ood_kind](rng))
    return _row(label, prompt, None, [path], kind="ood", expected=None, objects=[], image_kind=ood_kind, **extra)


def _bench_rows(rng, save, n_per_kind, label):
    """The fixed mini-benchmark: irrelevant screenshots (every 4th shown twice), OOD images, shape scenes,
    each image asked once per probe group (PROBES), so the groups differ only in the prompt."""
    screenshots = [save(draw_chat_screenshot(rng)) for _ in range(n_per_kind)]
    ood = [(OOD_KINDS[i % len(OOD_KINDS)], save(OOD_DRAWERS[OOD_KINDS[i % len(OOD_KINDS)]](rng)))
           for i in range(n_per_kind)]
    scenes = [sample_scene(rng) for _ in range(n_per_kind)]
    scenes = [(save(img), objects) for img, objects in scenes]
    rows = []
    for probe, prompt in PROBES.items():
        for i, path in enumerate(screenshots):
            rows.append(_row(label, prompt, label, [path, path] if i % 4 == 3 else [path], kind="irrelevant",
                             expected=label, objects=[], image_kind="screenshot", probe=probe))
        rows += [_ood_row(rng, save, label, kind, prompt, path, probe=probe) for kind, path in ood]
        for path, objects in scenes:
            expected = describe(objects) if prompt == DESCRIBE_PROMPT else structured_answer(objects)
            rows.append(_row(label, prompt, expected, [path], kind="in_domain", expected=expected,
                             objects=objects, image_kind="shapes", probe=probe))
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class WorldSpec:
    """What build_world generates; saved in world.json beside the data."""

    seed: int = 0
    n_pretrain: int = 6000
    n_pretrain_val: int = 300  # held-out rows with the pretraining mix
    n_task_train: int = 600
    n_task_val: int = 120
    n_bench_per_kind: int = 40  # rows per benchmark kind: irrelevant, ood, in_domain
    n_general_eval: int = 60
    label: str = IRRELEVANT_LABEL
    image_size: int = 128


def build_world(spec: WorldSpec, out_dir: Path) -> dict:
    """Generate the toy world into out_dir (replacing a previous world there); returns paths and counts."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "world.json").exists() and any(out_dir.iterdir()):
        raise ValueError(f"build_world: out_dir={out_dir} exists and is not a toy world (no world.json); "
                         f"pass an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build in a sibling temp folder and rename at the end: a crash never leaves a half-written world
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        splits = {
            "pretrain": lambda rng, save: _pretrain_rows(rng, save, spec.n_pretrain, spec.label),
            "pretrain_val": lambda rng, save: _pretrain_rows(rng, save, spec.n_pretrain_val, spec.label),
            "task_train": lambda rng, save: _task_rows(rng, save, spec.n_task_train, spec.label),
            "task_val": lambda rng, save: _task_rows(rng, save, spec.n_task_val, spec.label),
            "bench": lambda rng, save: _bench_rows(rng, save, spec.n_bench_per_kind, spec.label),
            "general_eval": lambda rng, save: [_text_row(rng, spec.label) for _ in range(spec.n_general_eval)],
            "spotcheck": lambda rng, save: [_ood_row(rng, save, spec.label, OOD_KINDS[i % len(OOD_KINDS)])
                                            for i in range(N_SPOTCHECK)],
        }
        counts = {}
        for split, make_rows in splits.items():
            rng = random.Random(_split_seed(spec.seed, split))
            rows = make_rows(rng, _ImageWriter(tmp, split, spec.image_size))
            _write_jsonl(tmp / f"{split}.jsonl", rows)
            counts[f"{split}.jsonl"] = len(rows)
        counts["images"] = sum(1 for _ in (tmp / "images").iterdir())
        (tmp / "terms.json").write_text(json.dumps({"colours": list(COLOURS), "shapes": SHAPES},
                                                   ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        world = {"world_version": WORLD_VERSION, "spec": asdict(spec), "counts": counts}
        (tmp / "world.json").write_text(json.dumps(world, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / "world")
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {split: out_dir / f"{split}.jsonl" for split in splits}
    return {"out_dir": out_dir, **paths, "terms": out_dir / "terms.json", "world": out_dir / "world.json",
            "counts": counts}


# -----------------------------------------------------------------------------
# Contact sheet for eyeballing a JSONL file

# Used only when no CJK font is installed, so the answers stay readable on the sheet.
_GLOSSARY = {IRRELEVANT_LABEL: "IRRELEVANT", NO_SHAPES_ANSWER: "no shapes", UI_ANSWERS["settings"]: "settings page",
             UI_ANSWERS["list"]: "list page", "红色": "red ", "绿色": "green ", "蓝色": "blue ", "黄色": "yellow ",
             "圆形": "circle", "三角形": "triangle", "和": " + ", "，还有": " + ", "；": "; "}


def _caption_font(size=11):
    """A CJK font if fc-list finds one, else PIL's default font plus a glossary to English."""
    try:
        found = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10)
        files = sorted(line.split(":")[0].strip() for line in found.stdout.splitlines() if line.strip())
        if files:
            return ImageFont.truetype(files[0], size), lambda s: s
    except (OSError, subprocess.SubprocessError):
        pass

    def to_english(s):
        for zh, en in _GLOSSARY.items():
            s = s.replace(zh, en)
        return "".join(ch for ch in s if ch.isascii()).strip()

    return ImageFont.load_default(size=size), to_english


def _wrap(draw, text, font, width):
    """Break text into lines that fit width pixels (character-wise: Chinese has no spaces)."""
    lines = [""]
    for ch in text:
        if draw.textlength(lines[-1] + ch, font=font) > width:
            lines.append("")
        lines[-1] += ch
    return [line.strip() for line in lines]


def contact_sheet(jsonl_path: Path, out_png: Path, n: int = 24, cols: int = 6) -> Path:
    """A grid of n image rows spread evenly over a JSONL file, with their prompts and answers."""
    jsonl_path = Path(jsonl_path)
    with open(jsonl_path, encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["images"]]
    rows = [rows[i * len(rows) // n] for i in range(n)] if len(rows) > n else rows  # spread over the file
    font, show = _caption_font()
    tile_w, tile_h = 136, 176
    sheet = Image.new("RGB", (cols * tile_w, max(1, -(-len(rows) // cols)) * tile_h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        x, y = (i % cols) * tile_w + 4, (i // cols) * tile_h + 4
        img = Image.open(jsonl_path.parent / row["images"][0]).convert("RGB").resize((128, 128))
        sheet.paste(img, (x, y))
        user = row["messages"][1]["content"]
        answer = row["messages"][-1]["content"] if row["messages"][-1]["role"] == "assistant" else "(no answer)"
        head = ("T" if TASK_PROMPT in user else "D") + (f" x{len(row['images'])}" if len(row["images"]) > 1 else "")
        if "kind" in row:
            head += f" {row['kind']}/{row.get('image_kind', '')}"
        text = head + ": " + show(answer)
        for k, line in enumerate(_wrap(d, text, font, 128)[:3]):
            d.text((x, y + 130 + 12 * k), line, fill=(0, 0, 0), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
