"""The frozen-prefix fast path: what the frozen layers at the input end compute, once per sample.

LoRA on the last N decoder layers and the last M vision blocks leaves everything before them frozen,
and a frozen layer without dropout gives the same output for the same input at every step. So:

- `llm` (A variants: the vision tower, the aligner and decoder layers before the first LoRA layer
  frozen): the hidden state entering the first trained decoder layer is computed once per sample and
  cached; every step runs only the trained decoder layers.
- `vision` (B and C variants, or A variants whose trained layers reach the deepstack layers): the
  output of the frozen vision blocks (all of them when the tower is frozen) and the deepstack
  features tapped among them are cached per image; every step runs the trained vision blocks, the
  merger and the decoder.
- `none`: nothing cached (image augmentation draws new pixels at every step, dropout inside the
  frozen part, several processes, sliding-window decoder layers, a family the kit does not know).

What differs between model families (Qwen3-VL's deepstack taps, Qwen2.5-VL's windowed vision attention, the
image-feature type the model takes back) comes from the model's family (lora_kit/families/).

In every case only the supervised positions go through lm_head (the loss needs no other logits).
The cache is keyed by the sample's source and token ids, so an augmented or re-encoded sample never
hits a stale entry; it lives in CPU memory and stops growing at half of the memory available when the
run started. `FrozenPrefix.check` compares the fast loss with the model's own on a real batch before
training relies on it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Encoded, collate_padded
from .families import family_of_model


@dataclass(frozen=True)
class PrefixPlan:
    """Which frozen prefix a run caches: `mode` is llm, vision or none; `why` says why, for the log."""

    mode: str
    llm_start: int | None = None   # llm: first decoder layer run at every step
    vit_start: int | None = None   # vision: first vision block run at every step (depth: the whole tower cached)
    why: str = ""
    # vision: first decoder layer run for a batch without images (every layer before it frozen, the embeddings too;
    # the decoder's depth when no layer trains: only the final norm and lm_head run); None: such batches run whole
    text_start: int | None = None

    def as_dict(self) -> dict:
        return {"mode": self.mode, "llm_start": self.llm_start, "vit_start": self.vit_start,
                "text_start": self.text_start, "why": self.why}


def core_model(model):
    """The Hugging Face model under a peft wrapper (LoRA layers are injected in place, so it runs them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trains(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _has_dropout(modules) -> bool:
    """A module whose training-mode output is random: an active nn.Dropout or attention dropout."""
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, torch.nn.Dropout) and sub.p > 0:
                return True
            if float(getattr(sub, "attention_dropout", 0.0) or 0.0) > 0:
                return True
    return False


def plan_prefix(model, *, augmentation: str = "none", world_size: int = 1) -> PrefixPlan:
    """The largest frozen prefix of this LoRA-wrapped model that can be cached, read from requires_grad."""
    from .errors import ConfigError

    core = core_model(model)
    try:
        family = family_of_model(model)
    except ConfigError as e:
        return PrefixPlan("none", why=str(e))
    inner = core.model
    visual, text = inner.visual, inner.language_model
    if world_size > 1:
        return PrefixPlan("none", why=f"{world_size} processes: the fast path would call the model around DDP")
    if augmentation != "none":
        return PrefixPlan("none", why=f"augmentation={augmentation} draws new pixels at every step, so no image "
                                      "feature is ever reused")
    if getattr(text, "has_sliding_layers", False):
        return PrefixPlan("none", why="sliding-window decoder layers (use_sliding_window): the decoder suffix runs "
                                      "full causal attention only")
    blocks, layers = list(visual.blocks), list(text.layers)
    vit_start = next((i for i, b in enumerate(blocks) if _trains(b)), len(blocks))
    llm_start = next((i for i, l in enumerate(layers) if _trains(l)), len(layers))
    unfrozen = _vision_input_trains(visual, family)
    if unfrozen:
        return PrefixPlan("none", why=unfrozen)
    if vit_start == len(blocks) and not _trains(text.embed_tokens) and llm_start >= len(family.taps(visual)) \
            and not _has_dropout(blocks + layers[:llm_start]):
        return PrefixPlan("llm", llm_start=llm_start,
                          why=f"vision tower and decoder layers 0-{llm_start - 1} frozen: their output is cached "
                              "per sample")
    if vit_start == 0:
        return PrefixPlan("none", why="the first vision block trains: no frozen prefix")
    if _has_dropout(blocks[:vit_start]):
        return PrefixPlan("none", why="dropout inside the frozen vision blocks makes their output random")
    cached = "their output and deepstack taps are" if family.taps(visual) else "their output is"
    # A text-only sample never meets the vision tower (nor the deepstack taps, which add to image tokens only), so
    # its hidden state entering the first trained decoder layer is as fixed as in llm mode.
    text_start = (llm_start if llm_start > 0 and not _trains(text.embed_tokens)
                  and not _has_dropout(layers[:llm_start]) else None)
    return PrefixPlan("vision", vit_start=vit_start, text_start=text_start,
                      why=f"vision blocks 0-{vit_start - 1} frozen: {cached} cached per image"
                          + (f"; text-only samples: decoder layers 0-{text_start - 1} cached" if text_start else ""))


def _vision_input_trains(visual, family) -> str | None:
    """Why no vision block's output can be cached (the patch embedding or the aligner trains), or None."""
    aligner = family.aligner(visual)
    # the patch embedding and position embeddings: every child of the tower that is neither a block nor aligner
    before_blocks = [m for m in visual.children()
                     if m is not visual.blocks and not any(a is x for x in m.modules() for a in aligner)]
    if any(_trains(m) for m in before_blocks):
        return "the patch embedding trains, so nothing in the vision tower is frozen"
    if any(_trains(m) for m in aligner):
        return "the aligner trains (modules_to_save), so vision features change every step"
    return None


def plan_images(model) -> PrefixPlan:
    """What generation can cache of the vision tower, per image (`vision` mode, or `none` with why).

    Generation runs in eval mode, so dropout does not matter here; the frozen vision blocks (all of them while
    the tower is frozen, then the cache holds the merger's output and deepstack features) give the same output
    for the same pixels at every evaluation. A trained patch embedding or aligner leaves nothing to cache."""
    from .errors import ConfigError

    try:
        family = family_of_model(model)
    except ConfigError as e:
        return PrefixPlan("none", why=str(e))
    visual = core_model(model).model.visual
    blocks = list(visual.blocks)
    unfrozen = _vision_input_trains(visual, family)
    if unfrozen:
        return PrefixPlan("none", why=unfrozen)
    vit_start = next((i for i, b in enumerate(blocks) if _trains(b)), len(blocks))
    if vit_start == 0:
        return PrefixPlan("none", why="the first vision block trains")
    return PrefixPlan("vision", vit_start=vit_start,
                      why="vision tower frozen: its output is cached per image" if vit_start == len(blocks) else
                      f"vision blocks 0-{vit_start - 1} frozen: their output is cached per image")


# ---------------------------------------------------------------- running parts of the model

class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once the prefix output is captured."""


def _run_until(module, run) -> torch.Tensor:
    """The hidden states entering `module` during `run()`, which is cut short there."""
    captured = {}

    def hook(_mod, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def decoder_suffix(text, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask, start: int) -> torch.Tensor:
    """Decoder layers start.. and the final norm, as every Qwen-VL text model's forward runs them without a cache
    (past the deepstack layers, which plan_prefix keeps in the cached prefix; full attention only)."""
    from transformers.masking_utils import create_causal_mask

    if position_ids.shape[0] == 4:  # packed rows: row 0 holds the per-sample text positions
        text_positions, rope_positions = position_ids[0], position_ids[1:]
    else:
        text_positions, rope_positions = None, position_ids
    mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                              position_ids=text_positions)
    position_embeddings = text.rotary_emb(hidden, rope_positions)
    for layer in text.layers[start:]:
        hidden = layer(hidden, attention_mask=mask, position_ids=text_positions,
                       position_embeddings=position_embeddings)
    return text.norm(hidden)


def supervised_loss(lm_head, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of the next token where a label is supervised, with logits only at those positions.

    The model's own loss (shift, ignore -100, float logits, mean over supervised tokens) computed from
    hidden states instead of the logits of every position.
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction=reduction)


# ---------------------------------------------------------------- the cache

def _key(e: Encoded) -> tuple:
    return (e.source, len(e.input_ids), hash(tuple(e.input_ids)))


def image_key(e: Encoded) -> tuple:
    """A key by the sample's pixels alone: prompts that show the same image under other words share its entry,
    and an augmented crop (other pixels) gets its own."""
    pixels = e.pixel_values.detach().to("cpu").contiguous().flatten().view(torch.uint8)
    return (tuple(e.image_grid_thw.flatten().tolist()), str(e.pixel_values.dtype),
            hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).hexdigest())


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class FrozenPrefix:
    """The cache of one run's frozen prefix and the forward pass that uses it (see the module docstring)."""

    def __init__(self, model, plan: PrefixPlan, *, max_bytes: int | None = None, log=print, key=_key):
        self.plan = plan
        self.key = key  # what an entry is keyed by: the sample (training, losses) or its pixels (image_key)
        self.cache: dict[tuple, object] = {}
        self.bytes = 0
        self.max_bytes = _available_bytes() // 2 if max_bytes is None else max_bytes
        self.hits = self.misses = 0
        self.log = log
        core = core_model(model)
        self.lm_head, self.inner = core.lm_head, core.model
        self.family = family_of_model(core) if plan.mode != "none" else None

    # ---- public

    def loss(self, batch: dict, rows: list[list[Encoded]], reduction: str = "mean") -> torch.Tensor:
        """The batch's loss (labels in `batch`); `rows` are the samples of each batch row, in order."""
        return supervised_loss(self.lm_head, self.last_hidden(batch, rows), batch["labels"], reduction)

    def last_hidden(self, batch: dict, rows: list[list[Encoded]]) -> torch.Tensor:
        """The decoder's final (normed) hidden states of the batch, through the cheapest exact route."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "use_cache")}
        if self.plan.mode == "llm":
            return self._llm_route(inputs, rows, self.plan.llm_start)
        if self.plan.mode == "vision" and inputs.get("pixel_values") is None and self.plan.text_start is not None:
            return self._llm_route(inputs, rows, self.plan.text_start)
        if self.plan.mode == "vision" and inputs.get("pixel_values") is not None:
            images = self._vision_outputs(inputs, rows)
            inputs.pop("pixel_values")
            return self.inner(**inputs, mm_encoder_outputs={"image": images}, use_cache=False).last_hidden_state
        return self.inner(**inputs, use_cache=False).last_hidden_state

    @torch.no_grad()
    def image_outputs(self, prompts: list[Encoded], image_grid_thw: torch.Tensor):
        """What the model's get_image_features returns for the images of `prompts` (in order, the batch's
        `image_grid_thw`), from the cache of the frozen vision blocks; vision mode only."""
        return self._vision_outputs({"image_grid_thw": image_grid_thw}, [[e] for e in prompts])

    @torch.no_grad()
    def check(self, model, batch: dict, rows: list[list[Encoded]]) -> float:
        """|fast loss - the model's own loss| on one batch, in eval mode (no dropout)."""
        was_training = model.training
        model.eval()
        try:
            plain = float(model(**{**batch, "use_cache": False}).loss)
            fast = float(self.loss(batch, rows))
        finally:
            model.train(was_training)
        return abs(fast - plain)

    def stats(self) -> dict:
        return {**self.plan.as_dict(), "entries": len(self.cache), "bytes": self.bytes, "hits": self.hits,
                "misses": self.misses}

    # ---- llm: hidden states entering decoder layer llm_start, per sample

    def _llm_route(self, inputs: dict, rows: list[list[Encoded]], start: int) -> torch.Tensor:
        found = iter(self._lookup([e for row in rows for e in row], lambda samples: self._llm_prefix(samples, start)))
        entries = [[next(found) for _ in row] for row in rows]
        width = inputs["input_ids"].shape[1]
        hidden0, _ = entries[0][0]
        hidden = hidden0.new_zeros((len(rows), width, hidden0.shape[-1]))
        positions = torch.zeros((3, len(rows), width), dtype=torch.long, device=hidden.device)
        for r, row in enumerate(rows):
            col = 0
            for e, entry in zip(row, entries[r]):
                n = len(e.input_ids)
                hidden[r, col:col + n], positions[:, r, col:col + n] = entry
                col += n
        # packed rows bring their per-sample positions; padded rows get each sample's own rope positions
        # from the cache (what get_rope_index gives a right-padded batch, without recomputing it per step)
        position_ids = inputs.get("position_ids")
        return decoder_suffix(self.inner.language_model, hidden, positions if position_ids is None else position_ids,
                              inputs.get("attention_mask"), start)

    @torch.no_grad()
    def _llm_prefix(self, samples: list[Encoded], start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample: (hidden states entering decoder layer `start`, its 3-D rope positions)."""
        text = self.inner.language_model
        target = text.layers[start] if start < len(text.layers) else text.norm
        # right padding: real tokens never attend to the pads, so the pad id does not matter
        batch = collate_padded(samples, pad_id=0, image_token_id=self.inner.config.image_token_id)
        batch.pop("labels")
        device = self.lm_head.weight.device
        batch = {k: v.to(device) for k, v in batch.items()}
        positions, _ = self.inner.get_rope_index(batch["input_ids"], image_grid_thw=batch.get("image_grid_thw"),
                                                 attention_mask=batch["attention_mask"],
                                                 mm_token_type_ids=batch["mm_token_type_ids"])
        hidden = _run_until(target, lambda: self.inner(**batch, position_ids=positions, use_cache=False))
        return [(hidden[i, :len(e.input_ids)], positions[:, i, :len(e.input_ids)])  # right padding: real tokens first
                for i, e in enumerate(samples)]

    # ---- vision: output of the frozen vision blocks and their taps (Qwen3-VL's deepstack), per image

    def _vision_outputs(self, inputs: dict, rows: list[list[Encoded]]):
        visual = self.inner.visual
        samples = [e for row in rows for e in row if e.pixel_values is not None]
        parts = self._lookup(samples, self._vision_prefix)
        hidden = torch.cat([p[0] for p in parts])
        taps = [torch.cat([p[1][k] for p in parts]) for k in range(len(parts[0][1]))]
        grid = inputs["image_grid_thw"]
        if self.plan.vit_start < len(visual.blocks):
            merged, taps = self.family.vision_suffix(visual, hidden, grid, self.plan.vit_start, taps)
        else:
            merged = hidden  # the whole tower is frozen: the cache holds the merger's output
        split = (grid.prod(-1) // visual.spatial_merge_size ** 2).tolist()
        return self.family.image_outputs(torch.split(merged, split), [torch.split(t, split) for t in taps])

    @torch.no_grad()
    def _vision_prefix(self, samples: list[Encoded]) -> list[tuple]:
        """Per sample: (its images' hidden states, [taps]) after the frozen blocks."""
        visual = self.inner.visual
        device = self.lm_head.weight.device
        pixels = torch.cat([e.pixel_values for e in samples]).to(device, visual.dtype)
        grid = torch.cat([e.image_grid_thw for e in samples]).to(device)
        start = self.plan.vit_start
        tokens = [int(e.image_grid_thw.prod(-1).sum()) // visual.spatial_merge_size ** 2 for e in samples]
        if start == len(visual.blocks):  # the whole tower: the merger's output per image token
            out = self.inner.get_image_features(pixels, grid, return_dict=True)
            hidden = torch.cat(out.pooler_output)
            taps = [torch.cat(t) for t in getattr(out, "deepstack_features", None) or []]
            sizes = tokens
        else:  # the input of block `start` per patch, and the taps before it per image token
            taps = []
            hooks = [module.register_forward_hook(lambda _m, _a, out: taps.append(out))
                     for i, module in self.family.taps(visual) if i < start]
            try:
                hidden = _run_until(visual.blocks[start], lambda: visual(pixels, grid_thw=grid))
            finally:
                for h in hooks:
                    h.remove()
            # per image in order: Qwen2.5-VL's window order keeps each image's patches together
            sizes = [int(e.image_grid_thw.prod(-1).sum()) for e in samples]
        hs = torch.split(hidden, sizes)
        ts = [torch.split(t, tokens) for t in taps]
        return [(hs[i], [t[i] for t in ts]) for i in range(len(samples))]

    # ---- storage

    def _lookup(self, samples: list[Encoded], compute) -> list:
        """The cached entries of the samples, in order, computing the missing ones (in one batch) and storing them."""
        device = self.lm_head.weight.device
        keys = [self.key(e) for e in samples]
        missing = {k: e for k, e in zip(keys, samples) if k not in self.cache}
        self.hits += len(samples) - len(missing)
        self.misses += len(missing)
        found = dict(zip(missing, compute(list(missing.values())))) if missing else {}
        for k, value in found.items():
            self._store(k, value)
        return [found[k] if k in found else _to(self.cache[k], device) for k in keys]

    def _store(self, key, value) -> None:
        size = sum(t.numel() * t.element_size() for t in _tensors(value))
        if self.bytes + size > self.max_bytes:
            if self.bytes <= self.max_bytes:  # say it once
                self.log(f"frozen-prefix cache full ({self.bytes / 2**20:.0f} MiB): further samples are computed "
                         "at every step")
                self.bytes = self.max_bytes + 1
            return
        self.cache[key] = _to(value, "cpu", clone=True)
        self.bytes += size


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)]


def _to(value, device, clone: bool = False):
    if isinstance(value, torch.Tensor):
        out = value.to(device)
        return out.clone() if clone and out.data_ptr() == value.data_ptr() else out
    if isinstance(value, tuple):
        return tuple(_to(v, device, clone) for v in value)
    return [_to(v, device, clone) for v in value]
