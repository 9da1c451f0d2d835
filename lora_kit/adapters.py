"""peft adapters loaded so that every saved tensor lands in a module it adapts, or an error that says why.

peft loads an adapter's weights with `strict=False` and only warns about missing keys, so an adapter
saved for another module layout "loads" as a no-op: the model stays the bare base, and a run that
continues or merges it starts from the base while saying it did not. Every adapter the kit loads (a
run's init_adapter, `lora_kit evaluate`'s checkpoint, the spot-check's columns) goes through
`load_adapter`, which compares the adapter's keys with what the wrapped model expects; `check_adapter`
does the same on a meta-device model before any weight is read (train calls it before the run folder
is claimed).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import AdapterError

WEIGHTS = "adapter_model.safetensors"

# transformers before 4.52 held Qwen2-VL / Qwen2.5-VL's decoder at model.* and the vision tower at visual.*;
# 4.52 moved them to model.language_model.* and model.visual.* and loaded old checkpoints through this
# `_checkpoint_conversion_mapping`. Adapters trained then (peft, ms-swift) carry the old names; peft's
# key_mapping applies the same rules to adapter keys (after removing "base_model.model."). Qwen3-VL came
# after the move, but adapters renamed by tools that still write the old layout exist for it too.
QWEN_VL_PRE_4_52 = {r"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}


@dataclass(frozen=True)
class AdapterCheck:
    """What an adapter folder will do to a model, known before its weights are read."""

    path: Path | None
    wrapped: list[str]            # modules its LoRA wraps (names as in the base model)
    modules_to_save: list[str]    # modules it trains in full (names as in the base model)
    renamed: int                  # saved keys mapped from an older layout (QWEN_VL_PRE_4_52)


def key_mapping(model: nn.Module) -> dict[str, str]:
    """peft `key_mapping` for adapters saved in an older layout of this model's family: the model's own
    `_checkpoint_conversion_mapping` when it has one, Qwen-VL's pre-4.52 layout for a Qwen-VL layout
    (model.language_model and model.visual), else none."""
    own = getattr(model, "_checkpoint_conversion_mapping", None)
    if own:
        return dict(own)
    names = {name for name, _ in model.named_modules()}
    return dict(QWEN_VL_PRE_4_52) if {"model.language_model", "model.visual"} <= names else {}


def remap_keys(keys: list[str], mapping: dict[str, str]) -> dict[str, str]:
    """saved key -> the key peft loads it as, by peft's own rule (peft.utils.save_and_load.load_peft_weights):
    without the "base_model.model." prefix, the first pattern that matches is substituted."""
    out = {}
    for key in keys:
        prefix = "base_model.model." if key.startswith("base_model.model.") else (
            "base_model." if key.startswith("base_model.") else "")
        rest = key.removeprefix(prefix)
        for pattern, replacement in mapping.items():
            new, n = re.subn(pattern, replacement, rest)
            if n:
                rest = new
                break
        out[key] = prefix + rest
    return out


def saved_keys(folder: Path, what: str) -> list[str]:
    """The tensor names of an adapter folder's weights file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        other = sorted(p.name for p in Path(folder).glob("adapter_model*"))
        raise AdapterError(f"{what} {str(folder)!r}: no {WEIGHTS}" + (f" (found {', '.join(other)})" if other else "")
                           + ". The kit reads adapter weights as safetensors only. Fix: point it at a folder saved "
                             "by peft's save_pretrained (safe_serialization, the default).")
    with safe_open(str(weights), "pt") as f:
        return list(f.keys())


def _expected_keys(peft_model, adapter_name: str) -> set[str]:
    from peft import get_peft_model_state_dict

    return set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False))


def check_keys(peft_model, folder: Path, mapping: dict[str, str], *, what: str,
               adapter_name: str = "default") -> int:
    """Raise AdapterError unless every tensor of the adapter file fills a parameter of the wrapped model
    and every adapter parameter of it is in the file; returns how many keys were mapped from an older layout."""
    found = remap_keys(saved_keys(folder, what), mapping)
    expected = _expected_keys(peft_model, adapter_name)
    unexpected = sorted(k for k, mapped in found.items() if mapped not in expected)
    missing = sorted(expected - set(found.values()))
    if unexpected or missing:
        raise AdapterError(_mismatch_message(folder, what, found, expected, unexpected, missing))
    return sum(k != v for k, v in found.items())


def _mismatch_message(folder, what, found, expected, unexpected, missing) -> str:
    loaded = len(found) - len(unexpected)
    if not loaded:
        cause = ("none of its tensors names a module of this model: it was saved for another model or module "
                 "layout (another architecture, or a transformers version whose names this kit does not map)")
    elif unexpected and missing:
        cause = ("part of its tensors name other modules than the model wraps: saved for a model with other "
                 "module names or layer counts, or its adapter_config.json was edited")
    elif unexpected:
        cause = ("it holds weights for modules its adapter_config.json does not target (target_modules or "
                 "modules_to_save edited after saving, or saved for another base model)")
    else:
        cause = ("its weights file lacks modules its adapter_config.json targets (a partial or interrupted save, "
                 "or target_modules edited after saving)")
    show = lambda keys: "\n".join(f"      {k}" for k in keys[:4]) + (  # noqa: E731
        f"\n      ... ({len(keys) - 4} more)" if len(keys) > 4 else "")
    return (f"{what} {str(folder)!r} does not fit this model: {len(unexpected)} of its {len(found)} tensors "
            f"fill no parameter and {len(missing)} of the {len(expected)} adapter parameters the model expects "
            f"are not in it; peft would load it anyway (it only warns), leaving those modules at the base.\n"
            + (f"  in the adapter, not in the model:\n{show(unexpected)}\n" if unexpected else "")
            + (f"  expected by the model, not in the adapter:\n{show(missing)}\n" if missing else "")
            + f"  likely cause: {cause}.\n"
            "Fix: use the adapter with the base model it was trained on (base_model_name_or_path in its "
            "adapter_config.json), or retrain it for this one.")


def adapter_config(folder: Path, what: str):
    """The adapter's peft config, or AdapterError naming the folder and file."""
    from peft import PeftConfig

    path = Path(folder) / "adapter_config.json"
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise AdapterError(f"{what} {str(folder)!r}: {path.name} cannot be read as a peft adapter config "
                           f"({type(e).__name__}: {e}). Fix: point it at a folder saved by peft.") from None


def check_adapter(meta: nn.Module, folder: str | Path, *, what: str) -> AdapterCheck:
    """What the adapter in `folder` wraps on this model, its keys checked against them, from a meta-device
    model (targeting.meta_model): nothing is loaded and `meta` is not modified."""
    from peft import get_peft_model

    folder = Path(folder)
    config = adapter_config(folder, what)
    mapping = key_mapping(meta)
    try:
        peft_meta = get_peft_model(copy.deepcopy(meta), config)
    except (ValueError, TypeError) as e:  # peft: "Target modules ... not found", unsupported module kinds
        raise AdapterError(f"{what} {str(folder)!r}: its adapter_config.json (target_modules "
                           f"{_short(config.target_modules)}, modules_to_save {config.modules_to_save}) does not "
                           f"apply to this model: {e}. Likely cause: saved for another model or module layout. "
                           "Fix: use the base model it was trained on, or retrain it.") from None
    renamed = check_keys(peft_meta, folder, mapping, what=what)
    return adapted_modules(peft_meta, folder, renamed)


def adapted_modules(peft_model, folder: Path | None = None, renamed: int = 0) -> AdapterCheck:
    """The modules a peft model's adapter wraps with LoRA and trains in full (names as in the base model)."""
    from peft.utils import ModulesToSaveWrapper

    from .targeting import wrapped_modules

    saved = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                   if isinstance(m, ModulesToSaveWrapper))
    return AdapterCheck(folder, sorted(wrapped_modules(peft_model)), saved, renamed)


def _short(value) -> str:
    text = repr(sorted(value) if isinstance(value, (set, frozenset)) else value)
    return text if len(text) <= 160 else text[:157] + "..."


def load_adapter(model: nn.Module, folder: str | Path, *, is_trainable: bool = False, what: str = "adapter"):
    """PeftModel.from_pretrained with the family's key_mapping, then every key checked (AdapterError)."""
    from peft import PeftModel

    mapping = key_mapping(model)
    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable, key_mapping=mapping)
    check_keys(peft_model, Path(folder), mapping, what=what)
    return peft_model
