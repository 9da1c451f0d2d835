"""What is specific to a model family, in one module per family (as torchtune keeps models/<family>/).

The rest of the kit asks the family (a `Family`, family.py) and never reads a family-specific attribute of a
processor or model itself:
- the text an `<image>` mark becomes (vision start, image pad, vision end), the processor's special tokens
  checked against config.json, and how many pad tokens an image grid becomes (the merge size);
- the multimodal rope index used for packing;
- the frozen-prefix runners (prefix.py): the aligner, the vision taps into the decoder, the vision blocks
  after a cached prefix, and the image features the model takes back.

The families lora_kit trains: Qwen3-VL (qwen3_vl.py), Qwen2.5-VL and Qwen2-VL (qwen2_vl.py). A checkpoint of
any other family (LLaVA, Idefics3/SmolVLM, ...) is refused before any weight is read, naming what the kit lacks
for it; `python -m lora_kit targets` still plans its LoRA targets (for ms-swift, say).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .family import Family
from .qwen2_vl import QWEN2_5_VL, QWEN2_VL
from .qwen3_vl import QWEN3_VL

FAMILIES: tuple[Family, ...] = (QWEN3_VL, QWEN2_5_VL, QWEN2_VL)
TRAINED = ", ".join(f"{f.name} ({f.model_types[0]})" for f in FAMILIES)  # for messages and the README
WHAT_A_FAMILY_GIVES = ("the image placeholder and the processor's special tokens, the image-token count per "
                       "grid, the multimodal rope index for packing and the frozen-prefix runners")


def family_for(model_type: str | None, where: str, architecture: str | None = None) -> Family:
    """The family of a config.json model_type; a ConfigError naming what is missing for any other."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    named = f"model_type {model_type!r}" + (f" ({architecture})" if architecture else "")
    raise ConfigError(
        f"{where}: {named} is not a family lora_kit trains. It trains {TRAINED}; for {model_type} it has no family "
        f"module (lora_kit/families/) giving {WHAT_A_FAMILY_GIVES}. Fix: use a checkpoint of a trained family, or "
        f"plan the targets with `python -m lora_kit targets --model {where} --format swift` and train with ms-swift.")


def family_of_config(config, where: str) -> Family:
    """The family of a loaded config (AutoConfig or model.config)."""
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    return family_for(getattr(config, "model_type", None), where, architectures[0])


def family_of_model(model) -> Family:
    """The family of a model (peft-wrapped or not), from its config."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_of_config(inner.config, type(inner).__name__)


def family_of_folder(path: str | Path, trust_remote_code: bool = False) -> Family:
    """The family of a checkpoint folder, from config.json alone: nothing else is read."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model={str(path)!r}: no config.json in that folder; point it at a checkpoint folder.")
    return family_of_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), str(path))


def family_of_processor(processor) -> Family:
    """The family whose checkpoints ship this processor class (for an Encoder built from a processor alone)."""
    name = type(processor).__name__
    for family in FAMILIES:
        if name in family.processor_classes:
            return family
    raise ConfigError(f"processor {name} belongs to no family lora_kit trains ({TRAINED}); it has no family module "
                      f"giving {WHAT_A_FAMILY_GIVES}. Fix: use a checkpoint of a trained family.")


def load_processor(path: str | Path, family: Family, config, trust_remote_code: bool = False):
    """AutoProcessor.from_pretrained(path), checked against the model's config (config.json) for this family."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    family.check_processor(processor, config, str(path))
    return processor


def folder_processor(processor_dir: str | Path, model_dir: str | Path, trust_remote_code: bool = False):
    """(family, processor) of a model folder, the processor read from `processor_dir` and checked against the
    model's config.json; no weight is read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    family = family_of_config(config, str(model_dir))
    return family, load_processor(processor_dir, family, config, trust_remote_code)


__all__ = ["FAMILIES", "Family", "TRAINED", "family_for", "family_of_config", "family_of_folder", "family_of_model",
           "family_of_processor", "folder_processor", "load_processor"]
