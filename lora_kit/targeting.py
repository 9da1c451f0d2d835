"""Which modules get LoRA: tower discovery, last-N plans, anchored regexes and verification.

Towers are found from the model's structure, not from a table of names, so any VLM with a decoder
(an input embedding followed by a list of layers), a vision encoder (a patch-embedding convolution
followed by a list of blocks) and something in between (the aligner) is supported.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import LoraKitError, TargetingError


@dataclass(frozen=True)
class Towers:
    """The module names of a model's decoder layers, vision blocks and aligner containers."""

    llm_layers: list[str]      # e.g. model.language_model.layers.0 ... in order
    vit_blocks: list[str]      # e.g. model.visual.blocks.0 ...
    aligner: list[str]         # e.g. model.visual.merger, model.visual.deepstack_merger_list
    linears: dict[str, nn.Linear] = field(repr=False)  # every Linear of the model by full name
    vit_root: str = ""         # the vision tower's module, e.g. model.visual (its patch embedding, blocks, aligner)
    # every module's full name -> its class name: what peft matches target_modules and modules_to_save against
    module_types: dict[str, str] = field(default_factory=dict, repr=False)
    module_parameters: dict[str, int] = field(default_factory=dict, repr=False)  # name -> parameters it holds


@dataclass(frozen=True)
class TargetPlan:
    """The exact Linear modules to instrument for one variant, and how to say it to peft / ms-swift."""

    llm_last: int
    vit_last: int
    llm_layers: list[int]      # indices of the decoder layers that get LoRA
    vit_blocks: list[int]      # indices of the vision blocks that get LoRA
    modules: list[str]         # full module names, decoder first, in model order
    tower_of: dict[str, str]   # module name -> "llm" | "vit"
    regex: str | None          # anchored; None when nothing is targeted
    shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)

    def lora_parameters(self, rank: int) -> int:
        """Trainable LoRA parameters at this rank: r * (in + out) per module."""
        return sum(rank * (i + o) for i, o in self.shapes.values())

    def counts(self) -> dict[str, int]:
        return {"llm": sum(t == "llm" for t in self.tower_of.values()),
                "vit": sum(t == "vit" for t in self.tower_of.values())}


# ---------------------------------------------------------------- tower discovery

def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _block_list(model: nn.Module, root: str, linears: dict[str, nn.Linear]) -> str | None:
    """The ModuleList under `root` holding the most Linear layers: the repeated transformer blocks."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and _under(name, root) and len(module) > 0:
            count = sum(_under(lin, name) for lin in linears)
            if count > best_count:
                best, best_count = name, count
    return best


def find_towers(model: nn.Module) -> Towers:
    """Discover decoder layers, vision blocks and aligner of a loaded (or meta-device) VLM."""
    modules = dict(model.named_modules())
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    problems = []

    # Decoder: the module that owns the input embedding holds the decoder layer list.
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_name = next((n for n, m in modules.items() if m is embed), None) if embed is not None else None
    llm_root = _parent(embed_name) if embed_name else None
    llm_list = _block_list(model, llm_root, linears) if llm_root is not None else None
    if llm_list is None:
        problems.append("language model (no input embedding followed by a list of decoder layers)")

    # Vision: the patch embedding is the first convolution; its tower holds the vision block list.
    conv_name = next((n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    vit_root, vit_list = None, None
    if conv_name is not None:
        root = _parent(conv_name)
        while vit_list is None and root:
            root = _parent(root)
            candidate = _block_list(model, root, linears)
            if candidate is not None and (llm_list is None or not _under(llm_list, candidate)) \
                    and (llm_root is None or not _under(candidate, llm_root)):
                vit_root, vit_list = root, candidate
    if vit_list is None:
        problems.append("vision encoder (no patch-embedding convolution followed by a list of blocks)")
    if problems:
        raise TargetingError(
            f"unknown architecture {type(model).__name__}: could not find the " + " nor the ".join(problems)
            + ". lora_kit plans targets for VLMs with a decoder-layer list and a vision-block list "
              "(Qwen3-VL, Qwen2.5-VL, Qwen2-VL, LLaVA, Idefics3/SmolVLM) and trains Qwen3-VL, Qwen2.5-VL and "
              "Qwen2-VL; use target_regex for others.")

    # Aligner: containers of Linear layers that belong to neither tower's blocks nor the decoder,
    # i.e. the vision tower's own heads (Qwen mergers) or top-level projectors (LLaVA, Idefics3).
    def container(lin: str) -> str | None:
        if _under(lin, llm_list) or _under(lin, vit_list) or _under(lin, llm_root):
            return None
        if "." not in lin:  # lm_head and other top-level heads
            return None
        base = vit_root if _under(lin, vit_root) else _common_top(lin, llm_root, vit_root)
        rest = lin[len(base) + 1:] if base else lin
        return (base + "." if base else "") + rest.split(".", 1)[0]

    aligner = sorted({c for c in map(container, linears) if c is not None})
    n_llm, n_vit = len(modules[llm_list]), len(modules[vit_list])
    return Towers(
        llm_layers=[f"{llm_list}.{i}" for i in range(n_llm)],
        vit_blocks=[f"{vit_list}.{i}" for i in range(n_vit)],
        aligner=aligner,
        linears=linears,
        vit_root=vit_root or "",
        module_types={n: type(m).__name__ for n, m in modules.items() if n},
        module_parameters=_parameters_per_module(model),
    )


def _parameters_per_module(model: nn.Module) -> dict[str, int]:
    """Parameters held by each module, its children's included. A tied weight counts in each module that
    holds it (lm_head too): trained in full, peft gives each its own copy."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            counts[prefix] = counts.get(prefix, 0) + p.numel()
    return counts


def _common_top(name: str, *roots: str) -> str:
    """The deepest shared prefix of `name` with the tower roots: where a top-level projector hangs."""
    parts, best = name.split("."), ""
    for root in roots:
        rparts = root.split(".") if root else []
        common = []
        for a, b in zip(parts, rparts):
            if a != b:
                break
            common.append(a)
        if len(common) > len(best.split(".")) - (best == ""):
            best = ".".join(common)
    return best


# ---------------------------------------------------------------- plans and regexes

def last_n_modules(towers: Towers, blocks: list[str], n: int) -> list[str]:
    """All Linear modules of the last `n` blocks of a tower, in model order."""
    chosen = blocks[len(blocks) - n:] if n else []
    return [name for name in towers.linears if any(_under(name, b) for b in chosen)]


def _check_count(tower: str, n: int, size: int, param: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > size:
        raise TargetingError(
            f"{param}={n!r}: the {tower} has {size} {'decoder layers' if tower == 'language model' else 'blocks'}; "
            f"use an integer from 0 to {size}.")


def plan_targets(towers: Towers, llm_last: int, vit_last: int) -> TargetPlan:
    """The exact list of Linear modules for `llm_last` decoder layers and `vit_last` vision blocks."""
    _check_count("language model", llm_last, len(towers.llm_layers), "llm_last")
    _check_count("vision encoder", vit_last, len(towers.vit_blocks), "vit_last")
    llm = last_n_modules(towers, towers.llm_layers, llm_last)
    vit = last_n_modules(towers, towers.vit_blocks, vit_last)
    tower_of = {**{m: "llm" for m in llm}, **{m: "vit" for m in vit}}
    modules = llm + vit
    plan = TargetPlan(
        llm_last=llm_last, vit_last=vit_last,
        llm_layers=list(range(len(towers.llm_layers) - llm_last, len(towers.llm_layers))),
        vit_blocks=list(range(len(towers.vit_blocks) - vit_last, len(towers.vit_blocks))),
        modules=modules, tower_of=tower_of,
        regex=build_regex(towers, modules),
        shapes={m: (towers.linears[m].in_features, towers.linears[m].out_features) for m in modules},
    )
    matched = regex_matches(towers, plan.regex) if plan.regex else []
    if set(matched) != set(modules):  # the regex is derived, so check it says exactly the plan (to peft)
        raise AssertionError(f"internal: regex {plan.regex} does not match the plan exactly")
    return plan


def _alternation(items: list[str]) -> str:
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else "(" + "|".join(items) + ")"


def _tower_regex(blocks: list[str], modules: list[str]) -> str | None:
    """`<list>\\.(i|j)\\.(rel1|rel2)` for modules inside the listed blocks, grouped like the study's regexes."""
    by_block: dict[str, list[str]] = {}
    for m in modules:
        block = next((b for b in blocks if _under(m, b)), None)
        if block is not None:
            by_block.setdefault(block, []).append(m[len(block) + 1:])
    if not by_block:
        return None
    list_name = _parent(next(iter(by_block)))
    rels = list(by_block.values())
    indices = [b.rsplit(".", 1)[1] for b in by_block]
    if all(r == rels[0] for r in rels):  # same linears in every block: compact form
        return re.escape(list_name) + r"\." + _alternation(indices) + r"\." + _alternation(
            [re.escape(r) for r in rels[0]])
    return _alternation([re.escape(m) for m in modules if any(_under(m, b) for b in by_block)])


def build_regex(towers: Towers, modules: list[str]) -> str | None:
    """An anchored regex (peft `target_modules` / ms-swift `--target_regex`) matching exactly `modules`."""
    parts = [p for p in (_tower_regex(towers.llm_layers, modules), _tower_regex(towers.vit_blocks, modules)) if p]
    if not parts:
        return None
    return "^(" + "|".join(parts) + ")$" if len(parts) > 1 else "^" + parts[0] + "$"


def regex_matches(towers: Towers, regex: str) -> list[str]:
    """Every module peft would try to wrap for this regex: peft applies re.fullmatch to the full name of
    every module (not only the Linear ones), in model order."""
    pattern = re.compile(regex)
    return [name for name in (towers.module_types or towers.linears) if pattern.fullmatch(name)]


def plan_from_regex(towers: Towers, regex: str) -> TargetPlan:
    """Accept a user's regex (as in the study plan); refuse one that matches nothing or leaves the towers."""
    try:
        re.compile(regex)
    except re.error as e:
        raise TargetingError(f"target_regex={regex!r} is not a valid regular expression: {e}.") from None
    matched = regex_matches(towers, regex)
    not_linear = [m for m in matched if m not in towers.linears]
    matched = [m for m in matched if m in towers.linears]
    if not matched:
        # What the user most likely meant: the same pattern matched at the end of the full names.
        meant = [n for n in towers.linears if re.search(f"(?:{regex})$", n)]
        hint = (f" It matches {len(meant)} modules when anchored to the end of the full name; "
                f"the anchored regex for those is:\n  {build_regex(towers, meant)}") if meant and build_regex(
                    towers, meant) else ""
        raise TargetingError(
            f"target_regex={regex!r} matches no Linear module: peft matches a string target_modules with "
            f"re.fullmatch against full names such as {towers.llm_layers[-1]}.self_attn.q_proj.{hint}")
    tower_of = {}
    outside = []
    for m in matched:
        if any(_under(m, b) for b in towers.llm_layers):
            tower_of[m] = "llm"
        elif any(_under(m, b) for b in towers.vit_blocks):
            tower_of[m] = "vit"
        else:
            outside.append(m)
    if outside:
        inside = [m for m in matched if m in tower_of]
        fixed = build_regex(towers, inside)
        raise TargetingError(
            f"target_regex={regex!r} matches {len(outside)} modules outside the decoder layers and vision blocks "
            f"(e.g. {', '.join(outside[:3])}); the aligner trains only through modules_to_save. "
            + (f"The anchored regex for the tower modules it matches is:\n  {fixed}" if fixed else ""))
    if not_linear:
        # peft wraps every module the regex fullmatches and refuses the kinds it cannot adapt ("Target module
        # ... is not supported") only after the weights are loaded; the study instruments Linear layers only.
        fixed = build_regex(towers, matched)  # all inside the towers by now
        kinds = sorted({towers.module_types.get(m, "?") for m in not_linear})
        raise TargetingError(
            f"target_regex={regex!r} also matches {len(not_linear)} modules that are not Linear layers "
            f"({', '.join(kinds)}; e.g. {', '.join(not_linear[:3])}): peft matches re.fullmatch against every "
            f"module name and cannot adapt those. It matches {len(matched)} Linear modules"
            + (f"; the regex for exactly those is:\n  {fixed}" if fixed else "."))
    index = {b: i for i, b in enumerate(towers.llm_layers)} | {b: i for i, b in enumerate(towers.vit_blocks)}
    layers = lambda blocks: sorted({index[b] for m in matched for b in blocks if _under(m, b)})  # noqa: E731
    llm_layers, vit_blocks = layers(towers.llm_layers), layers(towers.vit_blocks)
    return TargetPlan(
        llm_last=len(llm_layers), vit_last=len(vit_blocks), llm_layers=llm_layers, vit_blocks=vit_blocks,
        modules=matched, tower_of=tower_of, regex=regex,
        shapes={m: (towers.linears[m].in_features, towers.linears[m].out_features) for m in matched},
    )


def plan_for(towers: Towers, llm_last: int, vit_last: int, target_regex: str | None = None) -> TargetPlan:
    """A run's plan: from target_regex when given, else the last llm_last decoder layers and vit_last blocks."""
    return plan_from_regex(towers, target_regex) if target_regex else plan_targets(towers, llm_last, vit_last)


# ---------------------------------------------------------------- modules trained in full

_CONTAINERS = ("ModuleList", "ModuleDict")  # no forward of their own: peft cannot wrap them (TypeError)


def tower_of_module(towers: Towers, name: str) -> str:
    """'aligner', 'vit' or 'llm' for a module or parameter name, as ms-swift's multimodal optimizer groups
    them: the aligner, the rest of the vision tower, and everything else (decoder, embeddings, lm_head)."""
    if any(_under(name, a) for a in towers.aligner):
        return "aligner"
    if (towers.vit_root and _under(name, towers.vit_root)) or any(_under(name, b) for b in towers.vit_blocks):
        return "vit"
    return "llm"


def modules_to_save_choices(towers: Towers) -> list[str]:
    """What modules_to_save usually names: the aligner's modules (a list's members one by one) and the
    top-level heads that hold parameters (lm_head)."""
    out = []
    for a in towers.aligner:
        out += _members(towers, a) if towers.module_types.get(a) in _CONTAINERS else [a]
    out += [n for n in towers.module_types if "." not in n and towers.module_parameters.get(n)
            and n not in {_top(b) for b in towers.llm_layers + towers.vit_blocks}]
    return out


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _members(towers: Towers, container: str) -> list[str]:
    return [n for n in towers.module_types if _parent(n) == container]


def resolve_modules_to_save(towers: Towers, entries: tuple[str, ...] | list[str], plan: TargetPlan, *,
                            freeze_llm: bool = False, freeze_vit: bool = False,
                            freeze_aligner: bool = True) -> dict[str, str]:
    """Each modules_to_save entry resolved to full module names -> tower ('llm', 'vit', 'aligner'), in model order.

    An entry is a full module name or a dotted suffix of one (`merger` is model.visual.merger, never
    deepstack_merger_list); a module list (deepstack_merger_list) stands for its members, since peft
    can wrap only modules with a forward. Refused, all at once (TargetingError): an entry that matches
    nothing (with the choices), a module without parameters, one that overlaps a LoRA-targeted module
    (trained twice), and one in a tower its freeze_* parameter keeps frozen.
    """
    resolved: dict[str, str] = {}
    problems: list[str] = []
    frozen = {"llm": ("freeze_llm", freeze_llm), "vit": ("freeze_vit", freeze_vit),
              "aligner": ("freeze_aligner", freeze_aligner)}
    for entry in entries:
        found = [n for n in towers.module_types if n == entry or n.endswith("." + entry)]
        found = [n for n in found if not any(o != n and _under(n, o) for o in found)]  # the outermost
        if not found:
            import difflib

            choices = modules_to_save_choices(towers)
            last = {c.rsplit(".", 1)[-1]: c for c in choices}
            close = sorted({c for c in choices if entry in c}
                           | {last[w] for w in difflib.get_close_matches(entry.rsplit(".", 1)[-1], list(last), n=3)})
            problems.append(f"{entry!r} matches no module of the model"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + f"; choices: {', '.join(modules_to_save_choices(towers))}, or any module's full "
                              "name or dotted suffix")
            continue
        for name in found:
            members = _members(towers, name) if towers.module_types[name] in _CONTAINERS else [name]
            for m in members:
                if not towers.module_parameters.get(m):
                    problems.append(f"{entry!r} -> {m} ({towers.module_types[m]}) holds no parameters to train")
                    continue
                lora = [p for p in plan.modules if _under(p, m) or _under(m, p)]
                if lora:
                    problems.append(f"{entry!r} -> {m} overlaps {len(lora)} LoRA-targeted modules (e.g. {lora[0]}); "
                                    "a module trains through LoRA or in full, not both")
                    continue
                tower = tower_of_module(towers, m)
                param, is_frozen = frozen[tower]
                if is_frozen:
                    problems.append(f"{entry!r} -> {m} is in the {tower} tower, which {param}: true keeps frozen "
                                    f"(set {param}: false to train it)")
                    continue
                resolved[m] = tower
    if problems:
        raise TargetingError(f"modules_to_save = {list(entries)}:\n" + "\n".join(f"  - {p}" for p in problems)
                             + "\nFix: name modules of the model (python -m lora_kit targets lists the aligner), "
                               "or remove the entry.")
    order = {n: i for i, n in enumerate(towers.module_types)}
    return dict(sorted(resolved.items(), key=lambda kv: order[kv[0]]))


# ---------------------------------------------------------------- verification after peft

def wrapped_modules(peft_model: nn.Module) -> list[str]:
    """Names (as in the base model) of the modules peft turned into LoRA layers."""
    from peft.tuners.lora import LoraLayer

    names = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            names.append(name.removeprefix("base_model.model."))
    return names


def verify_wrapped(peft_model: nn.Module, plan: TargetPlan, modules_to_save=None) -> None:
    """Raise unless the modules peft wrapped with LoRA are exactly the planned ones and, when
    `modules_to_save` (full names) is given, the modules it trains in full are exactly those."""
    from peft.utils import ModulesToSaveWrapper

    checks = [("wrapped", set(wrapped_modules(peft_model)), set(plan.modules), "the plan has")]
    if modules_to_save is not None:
        saved = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                 if isinstance(m, ModulesToSaveWrapper)}
        checks.append(("trains in full", saved, set(modules_to_save), "modules_to_save resolves to"))
    for what, done, asked, says in checks:
        if done != asked:
            missing, extra = sorted(asked - done), sorted(done - asked)
            raise TargetingError(
                f"peft {what} {len(done)} modules, {says} {len(asked)}.\n"
                f"  missing ({len(missing)}): {', '.join(missing[:10]) or '-'}\n"
                f"  extra ({len(extra)}): {', '.join(extra[:10]) or '-'}")


# ---------------------------------------------------------------- models without weights

def meta_model(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of a checkpoint folder built on the meta device from config.json alone: no weights read."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path)
    if not (path / "config.json").is_file():
        raise TargetingError(f"model={str(path)!r}: no config.json in that folder; point it at a checkpoint "
                             "folder (or one holding only its config.json).")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def swift_arguments(plan: TargetPlan, towers: Towers, *, rank: int = 16, alpha: int = 32,
                    learning_rate: float = 1e-4, vit_lr: float = 3e-4, aligner_lr: float = 1e-4) -> list[str]:
    """The ms-swift command-line arguments that train the same modules."""
    args = ["--train_type", "lora", "--lora_rank", str(rank), "--lora_alpha", str(alpha)]
    if plan.regex:
        args += ["--target_regex", plan.regex]
    # freeze_* only matter with all-linear targets, but stating them keeps the aligner frozen in any case.
    args += ["--freeze_llm", str(not plan.llm_layers).lower(), "--freeze_vit", str(not plan.vit_blocks).lower(),
             "--freeze_aligner", "true",
             "--learning_rate", f"{learning_rate:g}", "--vit_lr", f"{vit_lr:g}", "--aligner_lr", f"{aligner_lr:g}"]
    return args


# ---------------------------------------------------------------- reports

def plan_rows(plan: TargetPlan, towers: Towers, rank: int) -> list[dict]:
    """One row per targeted module: tower, layer, module, parameters, LoRA parameters at `rank`."""
    rows = []
    for name in plan.modules:
        blocks = towers.llm_layers if plan.tower_of[name] == "llm" else towers.vit_blocks
        block = next(b for b in blocks if _under(name, b))
        i, o = plan.shapes[name]
        linear = towers.linears[name]
        rows.append({"tower": plan.tower_of[name], "layer": int(block.rsplit(".", 1)[1]),
                     "module": name[len(block) + 1:], "name": name,
                     "parameters": i * o + (o if linear.bias is not None else 0),
                     "lora_parameters": rank * (i + o)})
    return rows


def plan_json(plan: TargetPlan, towers: Towers, rank: int) -> dict:
    """The plan as JSON-ready data (keys: llm_layers, vit_blocks, modules, regex, counts, towers, ...)."""
    return {
        "llm_last": plan.llm_last, "vit_last": plan.vit_last,
        "llm_layers": plan.llm_layers, "vit_blocks": plan.vit_blocks,
        "modules": plan.modules, "regex": plan.regex, "counts": plan.counts(),
        "lora_rank": rank, "lora_parameters": plan.lora_parameters(rank),
        "towers": {"llm_depth": len(towers.llm_layers), "vit_depth": len(towers.vit_blocks),
                   "llm_layer_list": _parent(towers.llm_layers[0]), "vit_block_list": _parent(towers.vit_blocks[0]),
                   "aligner": towers.aligner},
    }


def targets_report(model: str, llm_last: int, vit_last: int, *, rank: int = 16, regex: str | None = None,
                   fmt: str = "table", trust_remote_code: bool = False) -> str:
    """What `python -m lora_kit targets` prints: a table, JSON, or ms-swift arguments."""
    from .toy import resolve_model

    folder = resolve_model(model, weights=False)
    meta = meta_model(folder, trust_remote_code)
    towers = find_towers(meta)
    plan = plan_for(towers, llm_last, vit_last, regex)
    trains = training_note(meta.config)
    planned = planned_for(model, folder, towers)
    if fmt == "json":
        return json.dumps(plan_json(plan, towers, rank) | {"training": trains, "model": model,
                                                            "planned_for": planned}, indent=2)
    if fmt == "swift":
        args = swift_arguments(plan, towers, rank=rank, alpha=2 * rank)
        pairs = [f"{args[i]} {shlex.quote(args[i + 1])}" for i in range(0, len(args), 2)]
        from .config import TOY_MODELS

        where = "<checkpoint>" if model in TOY_MODELS else shlex.quote(str(folder))
        return f"# {planned}\n" + " \\\n  ".join([f"swift sft --model {where} --dataset <train.jsonl>"] + pairs)
    rows = plan_rows(plan, towers, rank)
    header = ("tower", "layer", "module", "parameters", "lora_parameters")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) if rows else len(h) for h in header]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)) for r in rows]
    counts = plan.counts()
    lines.append(f"\n{counts['llm']} decoder modules in layers {plan.llm_layers} of {len(towers.llm_layers)}, "
                 f"{counts['vit']} vision modules in blocks {plan.vit_blocks} of {len(towers.vit_blocks)}; "
                 f"LoRA parameters at rank {rank}: {plan.lora_parameters(rank):,}")
    lines.append(f"aligner (frozen unless in modules_to_save): {', '.join(towers.aligner) or '-'}")
    lines.append(f"regex: {plan.regex or '(nothing targeted)'}")
    lines.append(f"training: {trains}")
    lines.append(planned)
    return "\n".join(lines)


def planned_for(model: str, folder: Path, towers: Towers) -> str:
    """One line naming the model a plan's layer numbers belong to: the toy's are no real checkpoint's."""
    from .config import TOY_MODELS

    shape = f"{len(towers.llm_layers)} decoder layers, {len(towers.vit_blocks)} vision blocks"
    if model in TOY_MODELS:
        return (f"planned for the embedded toy (model {model}: {shape}), not for a real checkpoint: its layer "
                f"numbers differ. Fix: give --model <checkpoint folder> (config.json alone is enough).")
    return f"planned for {folder} ({shape})"


def training_note(config) -> str:
    """Whether lora_kit trains this model's family, in one line (targets are planned for more families)."""
    from .families import TRAINED, family_of_config

    try:
        return f"lora_kit trains this {family_of_config(config, '').name} model"
    except LoraKitError:
        return (f"model_type {getattr(config, 'model_type', None)!r} is not trained by lora_kit (it trains {TRAINED}); "
                "train these targets with ms-swift (--format swift)")
