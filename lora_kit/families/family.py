"""The interface every model family gives the rest of the kit (see lora_kit/families/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Family:
    """What is specific to one model family. Instances live in the family modules (qwen3_vl.py, qwen2_vl.py).

    `taps(visual)` lists the vision features fed into the decoder besides the merged image tokens, as
    (vision block index, tap module) pairs whose k-th output is added after decoder layer k (Qwen3-VL's
    deepstack; empty for Qwen2-VL and Qwen2.5-VL). `vision_suffix(visual, hidden, grid_thw, start, taps)` runs
    vision blocks start.. and the merger exactly as the family's vision forward does, from the hidden states
    entering block `start` (per patch, as the vision forward orders them) and the taps of the blocks before it;
    it returns (merged image tokens, all taps). `image_outputs(pooler, taps)` wraps per-image features in the
    output type the family's model takes back through `mm_encoder_outputs={"image": ...}`.
    """

    name: str                            # as people write it: "Qwen2.5-VL"
    model_types: tuple[str, ...]          # config.json model_type values it covers
    processor_classes: tuple[str, ...]    # AutoProcessor classes its checkpoints ship
    taps: Callable[[Any], list[tuple[int, Any]]]
    vision_suffix: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]
    image_outputs: Callable[[tuple, list], Any]
    vision_start: str = "<|vision_start|>"   # Qwen's chat templates wrap each image's pads in these
    vision_end: str = "<|vision_end|>"

    # ---------------------------------------------------------------- the chat and the image tokens

    def placeholder(self, processor) -> str:
        """The text one `<image>` mark becomes before the pads are expanded: start, one pad, end."""
        return self.vision_start + processor.image_token + self.vision_end

    @staticmethod
    def merge_size(processor) -> int:
        """Patches merged per side into one image token (2 for every Qwen-VL)."""
        return int(processor.image_processor.merge_size)

    def image_tokens(self, grid_thw: torch.Tensor | None, processor) -> list[int]:
        """Image pad tokens per image of an image_grid_thw (images, 3): t*h*w patches / merge_size**2."""
        if grid_thw is None:
            return []
        return [int(g.prod()) // self.merge_size(processor) ** 2 for g in grid_thw]

    def check_processor(self, processor, config, where: str) -> None:
        """Refuse a processor whose special tokens, patch or merge size disagree with the model's config.

        `where` names the folder the processor came from. Every problem is listed at once, with the fix.
        """
        problems = []
        for attr in ("image_token", "image_token_id", "tokenizer", "image_processor"):
            if getattr(processor, attr, None) is None:
                problems.append(f"the processor ({type(processor).__name__}) has no {attr}")
        if problems:
            raise ConfigError(f"{where}: {'; '.join(problems)}; lora_kit trains {self.name} with the processor "
                              f"classes {', '.join(self.processor_classes)}. Fix: save the checkpoint's own processor "
                              "in the folder (processor.save_pretrained).")
        tokenizer = processor.tokenizer
        for token, key in ((self.vision_start, "vision_start_token_id"), (processor.image_token, "image_token_id"),
                           (self.vision_end, "vision_end_token_id")):
            token_id = tokenizer.convert_tokens_to_ids(token)
            expected = getattr(config, key, None)
            if token_id is None or (token_id == tokenizer.unk_token_id and token_id != expected):
                problems.append(f"the tokenizer has no {token} token")
            elif expected is not None and token_id != expected:
                problems.append(f"the tokenizer gives {token} the id {token_id}, config.json's {key} is {expected}")
        vision = getattr(config, "vision_config", None)
        image_processor = processor.image_processor
        for attr, key in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size")):
            have, want = getattr(image_processor, attr, None), getattr(vision, key, None)
            if have != want:
                problems.append(f"the image processor's {attr} is {have}, config.json's vision_config.{key} is {want}")
        if problems:
            raise ConfigError(f"{where}: the processor does not fit the {self.name} model: {'; '.join(problems)}. "
                              "Fix: use the tokenizer and processor files saved with this checkpoint.")

    # ---------------------------------------------------------------- the model

    @staticmethod
    def rope_index(model) -> Callable:
        """The model's own multimodal rope index (`get_rope_index`), found through peft wrappers; packing uses it
        for each sample's 3-D positions. Every Qwen-VL takes (input_ids, mm_token_type_ids, image_grid_thw,
        attention_mask) and returns ((3, batch, length) positions, deltas)."""
        inner = model
        for _ in range(4):
            if hasattr(inner, "get_rope_index"):
                return inner.get_rope_index
            inner = getattr(inner, "model", None) or getattr(inner, "base_model", None)
            if inner is None:
                break
        raise ConfigError(f"packing=true needs the model's multimodal rope index (get_rope_index), which this "
                          f"{type(model).__name__} does not have; set packing: false.")

    def aligner(self, visual) -> list:
        """The modules between the vision blocks and the decoder: the merger and every tap."""
        return [visual.merger, *(module for _, module in self.taps(visual))]
