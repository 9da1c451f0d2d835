"""Where a run computes: this process's GPU when there is one, else the CPU (the toy's default here)."""
from __future__ import annotations

import os

import torch


def compute_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun / accelerate launch, else GPU 0), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype() -> torch.dtype:
    """bfloat16 on a GPU that supports it (how Qwen3-VL is trained and served), float32 otherwise."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
