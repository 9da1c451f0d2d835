"""Qwen2-VL and Qwen2.5-VL: no deepstack (only the merged image tokens reach the decoder). Qwen2-VL's vision
blocks all attend over the whole image; Qwen2.5-VL's attend within windows except its `fullatt_block_indexes`,
over patches reordered window by window (the merger's output is put back in image order)."""
from __future__ import annotations

import torch

from .family import Family


def no_taps(visual) -> list:
    return []


def vision_suffix(visual, hidden: torch.Tensor, grid_thw: torch.Tensor, start: int,
                  taps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Vision blocks start.. and the merger, as Qwen2VisionTransformerPretrainedModel.forward runs them."""
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

    positions = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
    position_embeddings = visual.rotary_pos_emb(hidden, positions)
    for block in visual.blocks[start:]:
        hidden = block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=position_embeddings)
    return visual.merger(hidden), []


def windowed_vision_suffix(visual, hidden: torch.Tensor, grid_thw: torch.Tensor, start: int,
                           taps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Vision blocks start.. and the merger, as Qwen2_5_VisionTransformerPretrainedModel.forward runs them:
    `hidden` is in window order (as block `start` receives it), the merged tokens come back in image order.
    Each image's patches stay a contiguous run in window order, so per-image cached states concatenate."""
    from transformers.utils.generic import get_max_seqlen
    from transformers.vision_utils import (get_vision_attention_seqlens, get_vision_position_ids,
                                           get_vision_window_index)

    positions = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size)
    max_window_seqlen = get_max_seqlen(cu_window_seqlens, visual.config)
    seq_len = hidden.shape[0]
    position_embeddings = tuple(visual.permute_input_for_window_attn(f, window_index, seq_len=seq_len)
                                for f in visual.rotary_pos_emb(hidden, positions))
    for i in range(start, len(visual.blocks)):
        full = i in visual.fullatt_block_indexes
        hidden = visual.blocks[i](hidden, cu_seqlens=cu_seqlens if full else cu_window_seqlens,
                                  max_seqlen=max_seqlen if full else max_window_seqlen,
                                  position_embeddings=position_embeddings)
    return visual.merger(hidden)[torch.argsort(window_index)], []


def image_outputs(pooler: tuple, taps: list[tuple]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=pooler)


QWEN2_VL = Family(name="Qwen2-VL", model_types=("qwen2_vl",), processor_classes=("Qwen2VLProcessor",),
                  taps=no_taps, vision_suffix=vision_suffix, image_outputs=image_outputs)
QWEN2_5_VL = Family(name="Qwen2.5-VL", model_types=("qwen2_5_vl",),
                    processor_classes=("Qwen2_5_VLProcessor", "Qwen2VLProcessor"),
                    taps=no_taps, vision_suffix=windowed_vision_suffix, image_outputs=image_outputs)
