"""Qwen3-VL: deepstack taps from early vision blocks into the first decoder layers, learned position embeddings
added before the vision blocks, full attention in every vision block."""
from __future__ import annotations

import torch

from .family import Family


def deepstack_taps(visual) -> list[tuple[int, object]]:
    """(vision block index, deepstack merger) pairs; the k-th feature is added after decoder layer k."""
    return list(zip(visual.deepstack_visual_indexes, visual.deepstack_merger_list))


def vision_suffix(visual, hidden: torch.Tensor, grid_thw: torch.Tensor, start: int,
                  taps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Vision blocks start.., the deepstack taps among them and the merger, as Qwen3VLVisionModel.forward
    runs them. `taps` are the deepstack features of the frozen blocks; returns (merged, all taps)."""
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

    positions = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
    position_embeddings = visual.rotary_pos_emb(hidden, positions)
    taps = list(taps)
    for i in range(start, len(visual.blocks)):
        hidden = visual.blocks[i](hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  position_embeddings=position_embeddings)
        if i in visual.deepstack_visual_indexes:
            taps.append(visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(i)](hidden))
    return visual.merger(hidden), taps


def image_outputs(pooler: tuple, taps: list[tuple]):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    return BaseModelOutputWithDeepstackFeatures(pooler_output=pooler, deepstack_features=taps)


QWEN3_VL = Family(name="Qwen3-VL", model_types=("qwen3_vl",), processor_classes=("Qwen3VLProcessor",),
                  taps=deepstack_taps, vision_suffix=vision_suffix, image_outputs=image_outputs)
