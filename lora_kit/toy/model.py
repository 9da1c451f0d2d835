"""The embedded default's model: a tiny Qwen3-VL checkpoint built offline and saved as a normal HF folder.

Everything here produces files that a real Qwen3-VL checkpoint folder also has (config.json,
model.safetensors, tokenizer.json, processor and chat template), so the kit loads the toy through
exactly the same `from_pretrained` calls as Qwen3-VL-4B. `ToySpec.family` builds the same toy as a
Qwen2.5-VL or Qwen2-VL checkpoint instead (each family's own config, model and processor classes).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

# Qwen's special tokens, in Qwen's order, so prompts look like a real checkpoint's.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# Qwen3-VL's chat template, reduced to what the kit uses: text and image parts, system prompt,
# generation prompt. String content may hold <|vision_start|><|image_pad|><|vision_end|> directly.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


from ..config import TOY_FAMILIES  # config.json model_type of each family the toy builds (qwen3_vl first)


@dataclass(frozen=True)
class ToySpec:
    """Size of the toy Qwen3-VL. Defaults keep every study variant meaningful on a 2-core CPU."""

    seed: int = 0
    family: str = "qwen3_vl"         # or qwen2_5_vl / qwen2_vl: the same sizes as that family's checkpoint
    text_hidden: int = 128
    text_layers: int = 8            # LLM last-0/2/4 all leave a frozen prefix
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384
    vision_hidden: int = 64
    vision_depth: int = 12          # vision last-6 stays behind the deepstack taps, as in the 4B model
    vision_heads: int = 4
    vision_intermediate: int = 256
    deepstack: tuple[int, ...] = (1, 3, 5)   # Qwen3-VL's early taps; 4B: (5, 11, 17) of 24
    patch_size: int = 16
    image_size: int = 128            # 128x128 → 8x8 patches → 16 tokens after the 2x2 merge


def build_tokenizer(corpus: Iterable[str]):
    """A character-level tokenizer with byte fallback: one token per character of the toy corpus and of
    printable ASCII, and any other text as UTF-8 byte tokens, so nothing a user writes is unknown.

    Characters rather than learned merges keep Chinese at about one token per character (as in Qwen's
    tokenizer) instead of whole toy phrases becoming single tokens. The vocabulary is sorted, so the
    tokenizer is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for text in corpus for c in text} | {chr(i) for i in range(32, 127)} | {"\n", "\t"})
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=4096,
        padding_side="left",  # generation pads on the left
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer, spec: ToySpec):
    """The family's real processor around the toy tokenizer; images are resized to spec.image_size squared."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    pixels = spec.image_size * spec.image_size
    image_processor = Qwen2VLImageProcessor(  # every Qwen-VL family's image processor
        patch_size=spec.patch_size, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor_cls, video_cls = {"qwen3_vl": (Qwen3VLProcessor, Qwen3VLVideoProcessor),
                                "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
                                "qwen2_vl": (Qwen2VLProcessor, Qwen2VLVideoProcessor)}[_family(spec)]
    video_processor = video_cls(patch_size=spec.patch_size, temporal_patch_size=2, merge_size=2)
    return processor_cls(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=video_processor, chat_template=CHAT_TEMPLATE,
    )


def _family(spec: ToySpec) -> str:
    if spec.family not in TOY_FAMILIES:
        from ..errors import ConfigError

        raise ConfigError(f"toy family={spec.family!r}: the toy builds {', '.join(TOY_FAMILIES)}; use one of them.")
    return spec.family


def build_config(tokenizer, spec: ToySpec):
    """The family's config (Qwen3VLConfig by default) of the toy's size whose special-token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec.text_hidden // spec.text_heads
    # mrope splits head_dim/2 frequencies over (time, height, width) like the 4B's [24, 20, 20] of 64.
    quarter = head_dim // 2
    mrope = [quarter - 2 * (quarter * 5 // 16), quarter * 5 // 16, quarter * 5 // 16]
    family = _family(spec)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                         **({"mrope_interleaved": True} if family == "qwen3_vl" else {})},
        pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"],
    )
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=True)
    vision = dict(depth=spec.vision_depth, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                  spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        return Qwen2VLConfig(text_config=text, **tokens, vision_config=dict(
            vision, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
            mlp_ratio=max(1, spec.vision_intermediate // spec.vision_hidden)))
    if family == "qwen2_5_vl":
        # windows of 2x2 image tokens (a 128 px image: 4 windows) and full attention in every 4th block, as the
        # real model's 8x8-token windows with full attention in blocks 7, 15, 23, 31 of 32
        return Qwen2_5_VLConfig(text_config=text, **tokens, vision_config=dict(
            vision, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            out_hidden_size=spec.text_hidden, window_size=spec.patch_size * 2 * 2,
            fullatt_block_indexes=list(range(3, spec.vision_depth, 4))))
    return Qwen3VLConfig(
        text_config=dict(text, head_dim=head_dim),
        vision_config=dict(
            vision, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            out_hidden_size=spec.text_hidden, num_position_embeddings=(spec.image_size // spec.patch_size) ** 2,
            deepstack_visual_indexes=list(spec.deepstack),
        ),
        **tokens,
    )


def build_toy_checkpoint(out_dir: str | Path, corpus: Iterable[str], spec: ToySpec = ToySpec()) -> Path:
    """Build tokenizer, processor and randomly initialised model from a seed and save them as an HF folder.

    Written to a temporary folder first and renamed, so a half-built checkpoint is never left behind.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus)
    processor = build_processor(tokenizer, spec)
    config = build_config(tokenizer, spec)
    torch.manual_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id,
        do_sample=False, max_new_tokens=48,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "toy_spec.json").write_text(json.dumps(asdict(spec), indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
