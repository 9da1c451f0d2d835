"""Chat JSONL in, model tensors out: reading and checking samples, tokenization, assistant-only labels, batches.

The format is the one ms-swift and similar tools use (see DESIGN.md): one JSON object per line with
`messages` (system / user / assistant turns, `<image>` marking each image) and `images` (paths relative
to the JSONL file's folder). Benchmark files add fields such as `kind`, `expected` and `objects`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DataError

IMAGE_MARK = "<image>"
IGNORE_INDEX = -100  # label value the loss ignores
ROLES = {"system", "user", "assistant"}
IMAGE_ROLES = {"system", "user"}  # turns that may hold <image>: the model sees images, it never writes them


@dataclass
class Sample:
    """One conversation with its images, and where it came from (for error messages)."""

    messages: list[dict[str, str]]
    images: list[Path]
    source: str                      # "file:line"
    extra: dict[str, Any] = field(default_factory=dict)  # kind, expected, objects, ...


@dataclass
class Encoded:
    """Token ids, labels and the image tensors of one sample."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None   # (patches, patch_dim)
    image_grid_thw: torch.Tensor | None  # (images, 3)
    source: str = ""

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _check_row(row: Any, where: str, folder: Path, need_assistant: bool) -> Sample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages' and 'images', got {type(row).__name__}.")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {sorted(ROLES)}, \"content\": str}}, "
                            f"got {json.dumps(m, ensure_ascii=False)[:120]}.")
    images = row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: 'images' must be a list of image paths (strings).")
    for i, m in enumerate(messages):
        if m["role"] not in IMAGE_ROLES and IMAGE_MARK in m["content"]:
            raise DataError(f"{where}: messages[{i}] is an {m['role']} turn holding '{IMAGE_MARK}'; images go in "
                            f"{' or '.join(sorted(IMAGE_ROLES))} turns only (an answer is text the model learns to "
                            "write). Fix: move the <image> mark to the user turn.")
    marks = sum(m["content"].count(IMAGE_MARK) for m in messages)
    if marks != len(images):
        raise DataError(f"{where}: the messages hold {marks} '{IMAGE_MARK}' marks but 'images' lists {len(images)} "
                        "paths; put one <image> in the user text for each image.")
    if need_assistant and (messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip()):
        raise DataError(f"{where}: the last message must be a non-empty assistant turn (the answer to learn).")
    paths = [(folder / p) if not Path(p).is_absolute() else Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{where}: image {str(p)!r} does not exist (relative paths resolve against the "
                            "JSONL file's folder).")
    extra = {k: v for k, v in row.items() if k not in ("messages", "images")}
    return Sample(messages=messages, images=paths, source=where, extra=extra)


def read_jsonl(path: str | Path, *, on_bad_sample: str = "error", need_assistant: bool = True
               ) -> tuple[list[Sample], list[str]]:
    """Read and check a chat JSONL file; returns (samples, skipped) where skipped lists 'file:line: why'."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the *_file parameters.")
    samples, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
                samples.append(_check_row(row, where, path.parent, need_assistant))
            except DataError as e:
                if on_bad_sample != "skip":
                    raise DataError(f"{e} (set on_bad_sample: skip to skip bad samples and count them)") from None
                skipped.append(str(e))
    return samples, skipped


def load_images(sample: Sample) -> list:
    """The sample's images as RGB PIL images; an undecodable file is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in sample.images:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{sample.source}: image {str(p)!r} cannot be decoded ({e}).") from None
    return images


def image_resolution(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """The image-size bounds an encoding uses, in the processor's own meaning: each image is resized (aspect kept,
    sides multiples of patch_size * merge_size) so that its area lies in [min_pixels, max_pixels]; None takes the
    processor's own value (its size's shortest_edge / longest_edge). Returned with the patch and merge size, so
    that params.json records the resolution a model was trained at.

    ConfigError when the resolved min_pixels exceeds max_pixels (one of them the processor's own): the processor
    would then scale every image smaller than min_pixels up past max_pixels, so the cap would not hold."""
    ip = processor.image_processor
    size = ip.size
    out = {"min_pixels": int(min_pixels if min_pixels is not None else size["shortest_edge"]),
           "max_pixels": int(max_pixels if max_pixels is not None else size["longest_edge"]),
           "patch_size": int(ip.patch_size), "merge_size": int(ip.merge_size)}
    if out["min_pixels"] > out["max_pixels"]:
        from .errors import ConfigError

        said = lambda name, given, key: (f"{name} = {out[name]}" + (  # noqa: E731
            f" (null: the processor's own size.{key})" if given is None else ""))
        raise ConfigError(
            f"{said('min_pixels', min_pixels, 'shortest_edge')} is above "
            f"{said('max_pixels', max_pixels, 'longest_edge')}: "
            f"the processor would scale every image smaller than {out['min_pixels']} px up to that area, past the "
            f"cap. Fix: set min_pixels to at most {out['max_pixels']} (min_pixels: {out['max_pixels']} gives every "
            f"image about that area), or raise max_pixels to at least {out['min_pixels']}.")
    return out


class Encoder:
    """Turns samples into token ids with assistant-only labels, through the checkpoint's own processor.

    `family` (default: the processor's, see lora_kit.families) gives the image placeholder and the image-token
    count of a grid. `min_pixels` / `max_pixels` bound each image's area as the processor's own parameters do
    (None: the processor's setting); training, every evaluation and the spot-check encode through an Encoder,
    so an image becomes the same tokens in all of them.
    """

    def __init__(self, processor, max_length: int, *, family=None, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        from .families import family_of_processor

        self.processor = processor
        self.family = family if family is not None else family_of_processor(processor)
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.image_pad = processor.image_token
        self.vision_placeholder = self.family.placeholder(processor)
        self.image_token_id = processor.image_token_id
        self.resolution = image_resolution(processor, min_pixels, max_pixels)
        # The vision placeholders (start, image pads, end, and video pads): input the model is shown, never
        # a target, whatever turn they sit in.
        placeholders = [self.family.vision_start, processor.image_token, self.family.vision_end,
                        getattr(processor, "video_token", None)]
        self.placeholder_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in placeholders if t}
        # Special tokens written literally in a message would be read as chat or image structure.
        self.special_tokens = [t for t in self.tokenizer.all_special_tokens + placeholders if t and len(t) > 1]

    @classmethod
    def for_run(cls, processor, params, family=None) -> "Encoder":
        """The encoder of a run: its max_length and image-size bounds (min_pixels, max_pixels), from a RunConfig
        or the `config` of a run's params.json, so that training, evaluation and the spot-check encode alike."""
        get = params.get if isinstance(params, dict) else (lambda key, default=None: getattr(params, key, default))
        return cls(processor, int(get("max_length", 2048)), family=family, min_pixels=get("min_pixels"),
                   max_pixels=get("max_pixels"))

    def _chat(self, messages, add_generation_prompt=False) -> str:
        converted = [{"role": m["role"], "content": m["content"].replace(IMAGE_MARK, self.vision_placeholder)}
                     for m in messages]
        return self.processor.apply_chat_template(converted, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def pixels(self, images, augment=None):
        """pixel_values and image_grid_thw of a list of PIL images (None, None when there are none)."""
        if not images:
            return None, None
        if augment is not None:
            images = [augment(im) for im in images]
        size = {"shortest_edge": self.resolution["min_pixels"], "longest_edge": self.resolution["max_pixels"]}
        out = self.processor.image_processor(images=images, size=size, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def _tokenize(self, text: str, grid) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets (in `text`) with each image pad expanded to its token count."""
        counts = self.family.image_tokens(grid, self.processor)
        pieces = text.split(self.image_pad)
        if len(pieces) - 1 != len(counts):
            raise DataError(f"internal: {len(pieces) - 1} image pads for {len(counts)} images")
        ids, offsets, pos = [], [], 0
        for k, piece in enumerate(pieces):
            enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            offsets += [(pos + a, pos + b) for a, b in enc["offset_mapping"]]
            pos += len(piece)
            if k < len(counts):
                ids += [self.image_token_id] * counts[k]
                offsets += [(pos, pos + len(self.image_pad))] * counts[k]
                pos += len(self.image_pad)
        return ids, offsets

    def check_text(self, sample: Sample) -> None:
        """DataError (file:line) for a message that writes one of the tokenizer's special tokens literally:
        the chat template would read it as a turn boundary or an image placeholder."""
        for i, m in enumerate(sample.messages):
            written = [t for t in self.special_tokens if t in m["content"]]
            if written:
                raise DataError(f"{sample.source}: messages[{i}] ({m['role']}) writes the special token(s) "
                                f"{', '.join(sorted(set(written)))} as text; the template would read them as chat "
                                "or image structure. Fix: mark images with <image> and remove the other tokens.")

    def encode(self, sample: Sample, augment=None) -> Encoded:
        """Ids and labels of the whole conversation; only assistant turns (and their end token) are supervised,
        never a vision placeholder token."""
        self.check_text(sample)
        text = self._chat(sample.messages)
        spans = []
        for i, m in enumerate(sample.messages):
            if m["role"] != "assistant":
                continue
            prefix = self._chat(sample.messages[:i], add_generation_prompt=True)
            upto = self._chat(sample.messages[:i + 1])
            if not (text.startswith(upto) and upto.startswith(prefix)):
                raise DataError(f"{sample.source}: the chat template does not render turns as prefixes; "
                                "lora_kit cannot find the assistant tokens to supervise.")
            end = len(upto.rstrip())  # the newline after the end-of-turn token is not learned
            spans.append((len(prefix), end))
        images = load_images(sample)
        pixel_values, grid = self.pixels(images, augment)
        ids, offsets = self._tokenize(text, grid)
        labels = [tok if any(a <= s < b for a, b in spans) and tok not in self.placeholder_ids else IGNORE_INDEX
                  for tok, (s, _) in zip(ids, offsets)]
        if len(ids) > self.max_length:
            raise DataError(self._too_long(sample.source, len(ids), images, grid))
        return Encoded(ids, labels, pixel_values, grid, sample.source)

    def _too_long(self, source: str, n_tokens: int, images: list, grid) -> str:
        """Why a sample exceeds max_length: how many of its tokens are image tokens, and the cap that fits."""
        counts = self.family.image_tokens(grid, self.processor)
        head = f"{source}: {n_tokens} tokens, longer than max_length={self.max_length}"
        if not counts:
            return head + "; raise max_length or shorten the sample."
        n_text = n_tokens - sum(counts)
        sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
        head += (f"; {sum(counts)} of them are image tokens ({len(counts)} image{'s' if len(counts) > 1 else ''} of "
                 f"{sizes} px -> {'+'.join(map(str, counts))} tokens at max_pixels={self.resolution['max_pixels']}), "
                 f"{n_text} text tokens")
        budget = self.max_length - n_text
        cap = self.max_pixels_that_fit(images, budget)
        if cap is None and budget < len(counts):
            return head + f". The text alone leaves no room for the images: shorten it or raise max_length to at " \
                          f"least {n_tokens}."
        if cap is None:  # min_pixels scales small images up past every cap
            return head + (f". No max_pixels fits them while min_pixels={self.resolution['min_pixels']} keeps each "
                           f"image at least that large: lower min_pixels too, or raise max_length to {n_tokens}.")
        per_side = self.resolution["patch_size"] * self.resolution["merge_size"]
        return head + (f". The image-size cap max_pixels={cap} (at most {cap // per_side ** 2} tokens per image, one "
                       f"token per {per_side}x{per_side} px) fits it into max_length; or raise max_length to {n_tokens} "
                       "to keep this resolution.")

    def image_tokens_at(self, images: list, max_pixels: int) -> int:
        """Image tokens the processor gives these PIL images under max_pixels (and this encoder's min_pixels)."""
        ip = self.processor.image_processor
        bounds = {"min_pixels": self.resolution["min_pixels"], "max_pixels": max_pixels}
        merge = self.resolution["merge_size"] ** 2
        return sum(ip.get_number_of_image_patches(im.height, im.width, bounds) // merge for im in images)

    def max_pixels_that_fit(self, images: list, budget: int) -> int | None:
        """The largest max_pixels (a multiple of one image token's area) whose images take at most `budget`
        tokens, as the processor resizes them; None when not even one token per image fits."""
        per_token = (self.resolution["patch_size"] * self.resolution["merge_size"]) ** 2
        tokens = budget // len(images) if images else 0
        while tokens >= 1:  # usually the first try: each image then has at most `tokens` tokens
            if self.image_tokens_at(images, tokens * per_token) <= budget:
                return tokens * per_token
            tokens -= 1
        return None

    def encode_prompt(self, sample: Sample, augment=None) -> Encoded:
        """The conversation up to (not including) its final assistant turn, ending with the generation prompt."""
        messages = sample.messages[:-1] if sample.messages[-1]["role"] == "assistant" else sample.messages
        self.check_text(sample)
        text = self._chat(messages, add_generation_prompt=True)
        pixel_values, grid = self.pixels(load_images(sample), augment)
        ids, _ = self._tokenize(text, grid)
        return Encoded(ids, [IGNORE_INDEX] * len(ids), pixel_values, grid, sample.source)


def encode_all(encoder: Encoder, samples: list[Sample], *, on_bad_sample: str = "error"
               ) -> tuple[list[Encoded], list[Sample], list[str]]:
    """Encode every sample: (encoded, the samples kept, skipped reasons).

    A sample that reads fine but cannot be encoded (longer than max_length, an undecodable image) is an
    error naming its file and line, or with on_bad_sample: skip is left out and counted like read_jsonl's.
    """
    encoded, kept, skipped = [], [], []
    for sample in samples:
        try:
            encoded.append(encoder.encode(sample))
        except DataError as e:
            if on_bad_sample != "skip":
                raise DataError(f"{e} (set on_bad_sample: skip to skip bad samples and count them)") from None
            skipped.append(str(e))
            continue
        kept.append(sample)
    return encoded, kept, skipped


class AugmentedDataset(torch.utils.data.Dataset):
    """Training samples encoded when drawn, so each epoch sees a new augmentation of every image."""

    def __init__(self, samples: list[Sample], encoder: Encoder, augment):
        self.samples, self.encoder, self.augment = samples, encoder, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Encoded:
        return self.encoder.encode(self.samples[i], self.augment)


def _cat_images(batch: list[Encoded]):
    pv = [e.pixel_values for e in batch if e.pixel_values is not None]
    grid = [e.image_grid_thw for e in batch if e.image_grid_thw is not None]
    return (torch.cat(pv), torch.cat(grid)) if pv else (None, None)


def collate_padded(batch: list[Encoded], pad_id: int, image_token_id: int, padding_side: str = "right") -> dict:
    """A padded batch with attention mask; left padding for generation, right padding for training."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(e.input_ids)
        labels[row, cols] = torch.tensor(e.labels)
        mask[row, cols] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "mm_token_type_ids": (ids == image_token_id).int()}
    pixel_values, grid = _cat_images(batch)
    if pixel_values is not None:
        out["pixel_values"], out["image_grid_thw"] = pixel_values, grid
    return out


def rope_index_fn(model):
    """The model's own multimodal rope index (the family's `get_rope_index`), found through peft wrappers."""
    from .families import Family

    return Family.rope_index(model)


def pack_rows(batch: list[Encoded], max_length: int) -> list[list[Encoded]]:
    """The samples of each packed row of at most max_length tokens (first-fit decreasing)."""
    rows: list[list[Encoded]] = []
    for e in sorted(batch, key=lambda e: -len(e.input_ids)):
        for row in rows:
            if sum(len(x.input_ids) for x in row) + len(e.input_ids) <= max_length:
                row.append(e)
                break
        else:
            rows.append([e])
    return rows


def collate_packed(batch: list[Encoded], pad_id: int, image_token_id: int, max_length: int, rope_index) -> dict:
    """Concatenate samples into rows of at most max_length with per-sample position ids (see collate_rows)."""
    return collate_rows(pack_rows(batch, max_length), pad_id, image_token_id, rope_index)


def collate_rows(rows: list[list[Encoded]], pad_id: int, image_token_id: int, rope_index) -> dict:
    """One packed row per list of samples, with per-sample position ids.

    Positions restart at 0 for each sample (row 0 of the (4, rows, length) position ids is the text
    position, rows 1-3 the sample's own 3-D rope positions), attention_mask is None and use_cache is
    False: transformers then detects the restarts and builds a block-diagonal causal mask, so samples
    never see each other.
    """
    width = max(sum(len(x.input_ids) for x in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((4, len(rows), width), dtype=torch.long)
    ordered: list[Encoded] = []
    for r, row in enumerate(rows):
        col = 0
        for e in row:
            n = len(e.input_ids)
            t = torch.tensor(e.input_ids)
            ids[r, col:col + n] = t
            labels[r, col:col + n] = torch.tensor(e.labels)
            mm = (t == image_token_id).int()[None]
            p3, _ = rope_index(t[None], mm_token_type_ids=mm, image_grid_thw=e.image_grid_thw)
            pos[0, r, col:col + n] = torch.arange(n)
            pos[1:, r, col:col + n] = p3[:, 0]
            col += n
            ordered.append(e)
        if col < width:  # padding continues as its own "sample" so it attends to nothing real
            pos[:, r, col:] = torch.arange(width - col)
    # use_cache=False belongs to the batch: with a cache (the model's default, in training too) transformers
    # skips the restart detection and the samples of a row silently attend to each other.
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": None,
           "mm_token_type_ids": (ids == image_token_id).int(), "use_cache": False}
    pv = [e.pixel_values for e in ordered if e.pixel_values is not None]
    if pv:
        out["pixel_values"] = torch.cat(pv)
        out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in ordered if e.image_grid_thw is not None])
    return out


def text_of(sample: Sample, role: str = "assistant") -> str:
    """The content of the sample's last message of `role` (the reference answer for assistants)."""
    return next((m["content"] for m in reversed(sample.messages) if m["role"] == role), "")


def corpus_texts(paths: list[Path]) -> list[str]:
    """Every message text of some JSONL files (with <image> marks removed), e.g. to train a tokenizer."""
    texts = []
    for p in paths:
        for line in open(p, encoding="utf-8"):
            if line.strip():
                texts += [re.sub(re.escape(IMAGE_MARK), "", m["content"]) for m in json.loads(line)["messages"]]
    return texts
