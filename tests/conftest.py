"""Shared fixtures: a session-wide outputs folder and a small toy checkpoint built from its config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the user's outputs/: everything the kit writes goes to a per-session folder.
_SESSION_OUTPUTS = Path(os.environ.setdefault("LORA_KIT_OUTPUTS", str(
    Path(__import__("tempfile").mkdtemp(prefix="lora_kit_test_outputs_")))))

import torch  # noqa: E402

torch.set_num_threads(2)

CORPUS = [
    "你是看图助手。如果图片是聊天截图，只回答：无关图片",
    "请用自然语言描述一下这些图片", "列出图中的图形",
    "图中有一个红色的圆形和一个蓝色的三角形。", "红色圆形；蓝色三角形", "system user assistant",
]


@pytest.fixture(scope="session")
def toy_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised toy Qwen3-VL checkpoint folder of the default size."""
    from lora_kit.toy.model import build_toy_checkpoint

    return build_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", CORPUS)


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory) -> Path:
    """A miniature toy world (few images) written like real data."""
    from lora_kit.toy.world import WorldSpec, build_world

    out = tmp_path_factory.mktemp("world") / "world"
    build_world(WorldSpec(seed=3, n_pretrain=40, n_pretrain_val=10, n_task_train=24, n_task_val=8,
                          n_bench_per_kind=4, n_general_eval=6), out)
    return out


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory, toy_ckpt):
    """family -> a randomly initialised toy checkpoint of that family (qwen3_vl: toy_ckpt), built on first use."""
    from lora_kit.toy.model import ToySpec, build_toy_checkpoint

    built = {"qwen3_vl": toy_ckpt}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_toy_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", CORPUS,
                                                 ToySpec(family=family))
        return built[family]
    return get
