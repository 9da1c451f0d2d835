"""The embedded default: procedural world, tiny Qwen3-VL, pretrained toy base, cached under outputs/toy/<key>/.

    outputs/toy/<key>/world/          chat JSONL + images (see world.py)
    outputs/toy/<key>/init/           the randomly initialised checkpoint (HF folder)
    outputs/toy/<key>/stage2/         the base early in pretraining (restart baseline)
    outputs/toy/<key>/stage3/         the final base: what `model: toy` loads
    outputs/toy/<key>/base_report.json

The key hashes every setting and the code versions, so changing any of them builds a new toy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..paths import outputs_dir
from .model import ToySpec, build_toy_checkpoint
from .pretrain import PretrainSpec
from .world import WORLD_VERSION, WorldSpec, build_world

TOY_VERSION = 1  # bump when model building, pretraining or the report change
STAGES = {"": "stage3", "-stage2": "stage2"}  # model name suffix -> the stage folder it loads


@dataclass(frozen=True)
class ToyBuild:
    """Everything that decides the toy base."""

    world: WorldSpec = field(default_factory=WorldSpec)
    model: ToySpec = field(default_factory=ToySpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)

    def key(self) -> str:
        settings = asdict(self)
        if settings["model"]["family"] == ToySpec.family:  # the Qwen3-VL toy keeps the key it had before families
            del settings["model"]["family"]
        blob = json.dumps({"toy_version": TOY_VERSION, "world_version": WORLD_VERSION, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def root(self) -> Path:
        return outputs_dir() / "toy" / self.key()


DEFAULT = ToyBuild()


def build_of_family(family: str) -> ToyBuild:
    """The default toy built as `family` (a config.json model_type in TOY_FAMILIES): same world and sizes."""
    return dataclasses.replace(DEFAULT, model=dataclasses.replace(DEFAULT.model, family=family))


def toy_build_and_stage(model: str, build: ToyBuild = DEFAULT) -> tuple[ToyBuild, str] | None:
    """(build, stage folder name) of a toy model name: toy[-stage2] is `build`, toy-<family>[-stage2] the default
    toy built as that family; None for anything else (a folder)."""
    from ..config import TOY_MODELS

    if model not in TOY_MODELS:
        return None
    rest = model.removeprefix("toy")
    stage = "-stage2" if rest.endswith("-stage2") else ""
    family = rest.removesuffix(stage).removeprefix("-")
    return (build_of_family(family) if family else build), STAGES[stage]


def world_dir(build: ToyBuild = DEFAULT, *, create: bool = True) -> Path:
    """The toy world's folder, generated if missing."""
    out = build.root() / "world"
    if create and not (out / "world.json").exists():
        build_world(build.world, out)
    return out


def init_dir(build: ToyBuild = DEFAULT) -> Path:
    """The randomly initialised toy checkpoint (tokenizer trained on the world's text), built if missing."""
    from ..data import corpus_texts

    out = build.root() / "init"
    if not (out / "config.json").exists():
        world = world_dir(build)
        build_toy_checkpoint(out, corpus_texts(sorted(world.glob("*.jsonl"))), build.model)
    return out


def resolve_model(model: str, *, weights: bool = True, build: ToyBuild = DEFAULT) -> Path:
    """The checkpoint folder for `model`, absolute: 'toy' (stage 3), 'toy-stage2', or a folder path (relative to the
    current folder), so that a run records where its model was and two spellings of one folder compare equal.

    With weights=False (planning targets) the toy's structure is enough, so an unbuilt toy resolves to
    its randomly initialised checkpoint, which has the same modules, instead of pretraining it first.
    """
    toy = toy_build_and_stage(model, build)
    if toy is not None:
        build, stage_name = toy
        stage = build.root() / stage_name
        if (stage / "config.json").exists():
            return stage
        if not weights:
            return init_dir(build)
        build_toy(build=build)
        return stage
    path = Path(model).expanduser()
    if not path.is_dir():
        from ..errors import ConfigError

        raise ConfigError(f"model={model!r}: no such folder; give a local checkpoint folder or 'toy'.")
    return path.absolute()


def build_toy(*, build: ToyBuild = DEFAULT, progress: bool = True) -> dict:
    """Build (once) the toy world, the pretrained stage-2 and stage-3 bases and the base report."""
    from .pretrain import pretrain
    from .report import base_report, quick_check

    root = build.root()
    report_path = root / "base_report.json"
    if report_path.exists():
        return json.loads(report_path.read_text(encoding="utf-8"))
    log = print if progress else (lambda *a, **k: None)
    t0 = time.time()
    log(f"building the toy base in {root} (world, tokenizer, pretraining: minutes on a 2-core CPU)")
    world = world_dir(build)
    log(f"world ready ({time.time() - t0:.0f}s)")
    init = init_dir(build)
    training = pretrain(init, world / "pretrain.jsonl", root / "stage2", root / "stage3", build.pretrain,
                        seed=build.model.seed, log=log, progress=quick_check(world) if progress else None)
    report = {
        "key": build.key(), "build": asdict(build), "pretraining": training,
        "stage3": base_report(root / "stage3", world),
        "stage2": base_report(root / "stage2", world),
    }
    for stage in ("stage2", "stage3"):  # each stage folder says it is a toy (a model path then gets toy defaults)
        shutil.copy(init / "toy_spec.json", root / stage / "toy_spec.json")
    report["build_seconds"] = time.time() - t0
    report["machine"] = build_machine()
    tmp = report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(report_path)  # the report's presence marks a complete build
    return json.loads(report_path.read_text(encoding="utf-8"))  # as JSON, like every later (cached) call returns it


def build_machine() -> dict:
    """What the build ran on. The key fixes the settings, not the weights: the same key pretrained on another
    CPU (other float kernels) or thread count gave other weights (measured 2026-12-03: key 0a626e1cec on an AMD
    EPYC had task_val loss 6.77 and general_eval 0.54 where an earlier machine's build had 6.21 and 0.29; the
    losses part in the 7th digit at pretraining step 2). Studies on two builds are two setups (setups.py)."""
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def toy_files(build: ToyBuild = DEFAULT, world: Path | None = None) -> dict[str, Path]:
    """The toy world's data files, by the config parameter they fill (`world`: a built world folder instead)."""
    world = world_dir(build) if world is None else world
    return {"train_file": world / "task_train.jsonl", "val_file": world / "task_val.jsonl",
            "bench_file": world / "bench.jsonl", "general_file": world / "general_eval.jsonl",
            "spotcheck_file": world / "spotcheck.jsonl", "terms_file": world / "terms.json"}
