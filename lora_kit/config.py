"""Run parameters: defaults → profile → variant files → overrides, validated and frozen in a RunConfig.

`RunConfig` is the one definition of every parameter: its type, its default and its meaning (the
docstring under the field). params/defaults.yaml is rendered from it — edit the dataclass, then run
`python -m lora_kit.config > params/defaults.yaml`; tests/test_config.py fails while the two differ.

Everything is checked before any model is loaded, and every problem is reported at once in one
ConfigError: where the value came from (file:line, "--set" or "override"), the parameter, the value,
what was expected and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import textwrap
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lora_kit.errors import ConfigError
from lora_kit import paths
# Embedded models: the toy (Qwen3-VL) and the same toy built as another family; any other `model` is a folder.
TOY_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl")  # config.json model_type of each family the toy builds
TOY_MODELS = ("toy", "toy-stage2") + tuple(f"toy-{family}{stage}" for family in TOY_FAMILIES[1:]
                                          for stage in ("", "-stage2"))

# The study (DESIGN.md): variant -> (llm_last, vit_last).
STUDY_VARIANTS: dict[str, tuple[int, int]] = {
    "A0": (0, 0), "A1": (2, 0), "A2": (4, 0),
    "B1": (0, 2), "B2": (0, 4), "B3": (0, 6),
    "C1": (2, 2), "C2": (2, 4), "C3": (2, 6),
    "D1": (4, 2), "D2": (4, 4), "D3": (4, 6),
}
# Run order: A0 first (its metrics are the guardrail baseline); B1, C1 and the D row only on request.
STUDY_PRIORITY = ("A0", "A1", "A2", "B2", "B3", "C2", "C3")


@dataclass(frozen=True)
class Stage:
    """One stage of a progressive-unfreezing run (RunConfig.stages): its targets and its step budget.

    A count left out (None) is the previous stage's, the first stage's the run's llm_last / vit_last; a
    max_steps left out is the run's max_steps. Written in YAML as a mapping, e.g. `{vit_last: 4, max_steps: 60}`.
    """

    llm_last: int | None = None
    vit_last: int | None = None
    max_steps: int | None = None

    def to_dict(self) -> dict[str, int]:
        """The keys that were given, as the params file wrote them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


STAGE_KEYS = tuple(f.name for f in dataclasses.fields(Stage))


@dataclass(frozen=True)
class RunConfig:
    """Every parameter of one run. Build it with `load_config`; direct construction is validated too."""

    # ---- variant and model ----
    variant: str | None = None
    """Run name, also the run folder outputs/runs/<variant>. null: load_config derives it from
    llm_last/vit_last — the study's name for that pair (2/4 -> C2), otherwise L<llm_last>_V<vit_last>
    (e.g. L3_V0). A study name must match its pair: C2 with llm_last 4 is an error."""
    derived_from: str | None = None
    """The variant this one varies, in the same runs folder (`python -m lora_kit next` writes it into
    each follow-up file, e.g. A2 for A2_lr2x); the matrix then refuses to run it with any other
    parameter than that run's, but those its own file sets. null: a variant of its own."""
    llm_last: int = 0
    """LoRA on the last N decoder layers of the language model (0 = LLM tower untouched)."""
    vit_last: int = 0
    """LoRA on the last M blocks of the vision tower (0 = vision tower untouched). Counts larger than
    a tower are reported when the model is loaded (targeting), not here."""
    target_regex: str | None = None
    """Instead of llm_last/vit_last: a regex matched with re.fullmatch against full module names, as
    peft does (names start with `model.`). Needs llm_last 0, vit_last 0 and an explicit variant."""
    model: str = "toy"
    """Base model: `toy` (embedded stage-3 toy base), `toy-stage2` (its stage-2 checkpoint), the same
    toy as a Qwen2.5-VL or Qwen2-VL (`toy-qwen2_5_vl`, `toy-qwen2_vl`, each with `-stage2`), or a local
    Hugging Face model folder (e.g. a merged stage-3 Qwen3-VL-4B) with a config.json. Trained families:
    Qwen3-VL, Qwen2.5-VL, Qwen2-VL."""
    profile: str = "toy"
    """Parameter profile applied right after these defaults: params/profiles/<profile>.yaml, or
    `none`. `toy` makes runs on the toy model show something in minutes on a CPU and is refused for
    a real model folder."""
    init_adapter: str | None = None
    """peft adapter folder (adapter_config.json, adapter_model.safetensors) to start LoRA from; null =
    fresh LoRA. Every tensor must fit a module of the model (the pre-transformers-4.52 Qwen-VL layout is
    mapped); it is trained further when it adapts exactly the variant's modules, else merged first."""
    trust_remote_code: bool = False
    """Passed to from_pretrained; only for model folders whose code you have read."""

    # ---- data ----
    train_file: str | None = None
    """Training data, chat JSONL (messages + images); null = the toy world's file."""
    val_file: str | None = None
    """Validation data for eval loss, chat JSONL; null = the toy world's file."""
    bench_file: str | None = None
    """OOD / irrelevant mini-benchmark, chat JSONL with kind/expected/objects; null = the toy world's."""
    general_file: str | None = None
    """General-ability probes (free-form captions) for the caption-sanity guardrail; null = the toy
    world's."""
    spotcheck_file: str | None = None
    """Images and prompts for the manual caption spot-check; null = the toy world's."""
    terms_file: str | None = None
    """Domain terms the in-domain metrics look for: a UTF-8 JSON file {"colours": [...], "shapes":
    [...]}; an object is a colour then a shape (红色圆形). Put your domain's terms in the two lists.
    null = the toy world's terms.json."""
    irrelevant_label: str = "无关图片"
    """The answer expected for an irrelevant image (compared after NFKC/punctuation normalisation)."""
    max_length: int = 2048
    """Longest tokenized sample (or packed row), image tokens included."""
    min_pixels: int | None = None
    """Smallest area (height x width, in pixels) an image is resized to, in the image processor's own meaning
    (Qwen-VL smart_resize: aspect ratio kept, sides multiples of patch_size x merge_size); null = the
    processor's own (its size.shortest_edge). At most max_pixels, the processor's own included (a toy's own is
    128 x 128: with a smaller max_pixels set min_pixels too). Applied alike in training, every evaluation and the
    spot-check, and recorded in params.json (image_resolution)."""
    max_pixels: int | None = None
    """Largest area an image is resized to, in the same meaning; each image token covers (patch_size x
    merge_size)^2 pixels (32x32 on Qwen3-VL, 28x28 on Qwen2-VL / Qwen2.5-VL), so this caps the image tokens
    per image. null = the processor's own (size.longest_edge). An ms-swift run's cap: MAX_PIXELS (Qwen2-VL,
    Qwen2.5-VL) is this value; IMAGE_MAX_TOKEN_NUM (Qwen3-VL) is this value / 1024."""
    packing: bool = True
    """Pack several samples into one row with a block-diagonal mask (exact on SDPA, see DESIGN.md)."""
    augmentation: Literal["none", "crop_jitter"] = "none"
    """Training-image augmentation: none, or crop_jitter (random crops around the full image)."""
    augment_strength: float = 0.5
    """How far crop_jitter may crop, as a fraction of the image side (0..1); unused with none."""
    crop_jitter_k: int = 4
    """Distinct jittered crops drawn per training image with crop_jitter."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """A data line that cannot be used (missing image, no assistant turn): stop with an error, or
    skip it and count it in summary.json."""

    # ---- LoRA ----
    lora_rank: int = 16
    """LoRA rank r of every adapted linear layer."""
    lora_alpha: int = 32
    """LoRA alpha; the update is scaled by alpha / rank."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input, in [0, 1)."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full and saved with the adapter, each a full module name or a dotted suffix of
    one (merger is model.visual.merger; a module list such as deepstack_merger_list stands for its
    members). The aligner needs freeze_aligner false and trains at aligner_lr; lm_head trains at
    learning_rate. A name that matches nothing is refused with the choices."""
    freeze_llm: bool = False
    """Assert the LLM tower stays frozen: true requires llm_last 0 (a guard for variant files)."""
    freeze_vit: bool = False
    """Assert the vision tower stays frozen: true requires vit_last 0."""
    freeze_aligner: bool = True
    """Keep the aligner (visual.merger, deepstack mergers) frozen; false lets modules_to_save train it."""

    # ---- optimisation ----
    learning_rate: float = 1e-4
    """Learning rate of the LLM-tower parameters (and anything not vision or aligner)."""
    vit_lr: float = 3e-4
    """Learning rate of the vision-tower parameters."""
    aligner_lr: float = 1e-4
    """Learning rate of the aligner parameters (only when the aligner trains)."""
    weight_decay: float = 0.1
    """AdamW weight decay; biases and norms are in the no-decay groups."""
    warmup_ratio: float = 0.2
    """Fraction of the optimizer steps spent warming the learning rate up, in [0, 1]."""
    lr_scheduler_type: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    num_train_epochs: float = 3.0
    """Passes over the training data; used when max_steps is -1."""
    max_steps: int = -1
    """Optimizer steps to train; -1 = run num_train_epochs instead."""
    per_device_train_batch_size: int = 2
    """Training samples (or packed rows) per device per step."""
    gradient_accumulation_steps: int = 8
    """Micro-batches accumulated into one optimizer step."""
    seed: int = 42
    """Seed of every training random generator (data order, LoRA init, dropout, augmentation), 0 <= seed <
    2**32. The evaluation samples do not depend on it, so replicates under other seeds are comparable."""

    # ---- evaluation and checkpoints ----
    per_device_eval_batch_size: int = 4
    """Samples per device per evaluation batch (loss and generation)."""
    eval_steps: int = 50
    """Evaluate (eval loss + every guardrail metric) every N optimizer steps."""
    save_steps: int = 50
    """Save a checkpoint every N steps; a multiple of eval_steps, so that every checkpoint has the
    guardrail metrics the best-checkpoint choice needs."""
    logging_steps: int = 5
    """Log training loss and learning rates to the report_to integrations every N steps."""
    report_to: tuple[str, ...] = ("tensorboard",)
    """The Trainer's report_to: the integrations (transformers' names, e.g. tensorboard, mlflow, wandb) that receive
    the training logs and every guardrail metric at its evaluation step; [] = none. TensorBoard writes to the run's
    tb/ folder; the others read their usual settings from the environment (e.g. MLFLOW_TRACKING_URI,
    MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, WANDB_MODE) and must be installed. An A0 run, which has no Trainer,
    reports its step-0 evaluation to the same integrations."""
    max_new_tokens: int = 256
    """Longest generated answer on the benchmark and the caption probes."""
    eval_max_samples: int = 200
    """At most this many samples per benchmark kind (irrelevant, ood, in_domain) and probe group per
    evaluation."""
    exact_match_samples: int = 200
    """Validation samples whose generated answer is compared with their reference at every evaluation
    (task exact match, normalized like the label); 0 = not measured."""

    # ---- guardrails (checked at every evaluation) ----
    irrelevant_drop_max: float = 0.2
    """Trigger when the irrelevant-image pass rate falls more than this fraction below baseline
    (relative: 0.2 = a 20% drop), or below irrelevant_min, for irrelevant_patience consecutive evaluations."""
    irrelevant_min: float = 0.8
    """The irrelevant-image trigger also counts an evaluation whose pass rate is below this absolute rate (a
    baseline already below it makes every evaluation a drop: a run that would train with early_stopping is
    refused at step 0)."""
    irrelevant_patience: int = 2
    """Consecutive evaluations with a dropped irrelevant-image pass rate (irrelevant_drop_max,
    irrelevant_min) before that guardrail triggers."""
    hallucination_rise_max: float = 0.15
    """Trigger when the hallucination rate rises more than this (absolute, 0.15 = 15 points) over
    baseline for hallucination_patience consecutive evaluations."""
    hallucination_patience: int = 2
    """Consecutive evaluations with a risen hallucination rate (hallucination_rise_max) before that
    guardrail triggers."""
    gap_widen_max: float = 0.06
    """Trigger when the generalization gap (eval - train loss) widens more than this above its
    best (lowest) value and keeps worsening for gap_patience evaluation intervals."""
    gap_patience: int = 2
    """Evaluation intervals in which a widened generalization gap (gap_widen_max) keeps worsening before
    that guardrail triggers."""
    caption_chrf_min: float = 40.0
    """Caption sanity (automatic proxy): captions whose mean chrF (0-100) against the baseline's
    captions of the same images is below this count as degraded; so do more hallucinated or more
    blind captions than the baseline's. Manual spot-check verdicts, when present, decide instead."""
    caption_patience: int = 2
    """Trigger when free-form caption sanity degrades this many evaluations in a row."""
    kl_base_max: float | None = None
    """Trigger when the KL to the start model (metric kl_base: nats per token on the start model's greedy
    benchmark answers, per probe group) exceeds this for kl_patience consecutive evaluations; null = no trigger,
    KL is still measured and reported."""
    kl_patience: int = 2
    """Consecutive evaluations with the KL to the start model above kl_base_max before that guardrail triggers."""
    best_irrelevant_margin: float = 0.1
    """Best checkpoint: only among checkpoints with irrelevant pass >= baseline - this (absolute:
    0.1 = 10 points) and hallucination within best_hallucination_margin; then the lowest eval loss wins."""
    best_hallucination_margin: float = 0.1
    """Best checkpoint: only among checkpoints with hallucination <= baseline + this (absolute: 0.1 = 10
    points) and irrelevant pass within best_irrelevant_margin; then the lowest eval loss wins."""
    guardrail_probes: tuple[str, ...] = ()
    """Benchmark probe groups (the rows' `probe` field, e.g. general, task) whose rates the triggers and
    the best-checkpoint constraint watch, each against its own baseline; [] = every group."""
    early_stopping: bool = True
    """Stop the run when a guardrail triggers; false: record the triggers and train to the last step
    (status completed)."""
    plateau_patience: int = 0
    """End training (status completed) once the eval loss has not improved on its best by more than
    plateau_threshold for this many evaluations: the task is fitted as far as the run goes
    (transformers' EarlyStoppingCallback on eval loss); 0 = train to max_steps or num_train_epochs."""
    plateau_threshold: float = 0.02
    """Relative eval-loss improvement that counts for plateau_patience (0.02 = 2% below the best)."""
    stages: tuple[Stage, ...] = ()
    """Progressive unfreezing: a list of stages run one after the other, each a mapping of llm_last, vit_last and
    max_steps, e.g. [{vit_last: 2}, {vit_last: 4}, {vit_last: 6}]; [] = one stage with the run's targets. A stage
    keeps the previous stage's adapter and optimizer state and adds LoRA (starting at zero) to the layers it adds,
    at its tower's learning rate, with its own warmup and schedule over its max_steps (left out: the run's
    max_steps; plateau_patience ends a stage early). The next stage starts only when no guardrail triggered
    in the current one. A count left out is the previous stage's; the first stage's must be the run's
    llm_last/vit_last, each later stage must add layers; needs an explicit variant name, one process, no
    target_regex. The run folder's stages.json records each stage."""

    # ---- output and runtime ----
    output_dir: str | None = None
    """Folder holding one run folder per variant. null: <outputs>/runs, where <outputs> is
    $LORA_KIT_OUTPUTS when set, else the outputs/ of the study folder in use (the clone, or a folder
    written by `python -m lora_kit init`, found from the current folder up), else ./outputs. A
    relative path is relative to the current folder."""
    overwrite: bool = False
    """Replace an existing run folder of the same variant (a finished run, or an unfinished one that
    would otherwise be resumed) instead of refusing to start or resuming it."""
    nproc: int = 1
    """Processes (one per GPU) that train this run data-parallel. Above 1, `python -m lora_kit train` and
    train.ipynb start torchrun with that many; under torchrun or accelerate launch the launcher decides
    (leave 1, or give the same number)."""
    deepspeed: str | None = None
    """DeepSpeed JSON config for a multi-GPU run, handed to the Trainer unchanged (any ZeRO stage; with
    stage 3 every rank evaluates its share of each guardrail evaluation). null: plain data parallel."""
    fsdp: str | None = None
    """The Trainer's FSDP option for a multi-GPU run, handed over unchanged, e.g. "full_shard auto_wrap"
    (every rank then evaluates its share of each guardrail evaluation). null: no FSDP, unless an
    accelerate config turns it on."""
    fsdp_config: str | None = None
    """The Trainer's FSDP JSON config (version, wrap policy, ...), handed over unchanged; needs fsdp.
    Checkpoints must be FULL_STATE_DICT (the default), so that the kit can read the adapters back."""

    def __post_init__(self) -> None:
        values, problems = {}, []
        for name, hint in _hints().items():
            value, expected = _coerce(getattr(self, name), hint)
            if expected is not None:
                problems.append(_type_problem(name, getattr(self, name), expected, "RunConfig"))
            elif value is not getattr(self, name):
                object.__setattr__(self, name, value)  # int -> float, list -> tuple
            values[name] = value
        if not problems:
            problems = _value_problems(values)
        if problems:
            for problem in problems:
                problem.where = problem.where or "RunConfig(...)"
            raise _config_error(problems)

    @property
    def variant_name(self) -> str:
        """The run's name: `variant`, or the name derived from llm_last/vit_last when it is None."""
        if self.variant is not None:
            return self.variant
        return derive_variant(self.llm_last, self.vit_last)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict of every parameter (lists, not tuples)."""
        return {
            f.name: [x.to_dict() if isinstance(x, Stage) else x for x in v]
            if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


def derive_variant(llm_last: int, vit_last: int) -> str:
    """The study's name for (llm_last, vit_last), e.g. (2, 4) -> "C2"; otherwise "L{llm}_V{vit}"."""
    for name, pair in STUDY_VARIANTS.items():
        if pair == (llm_last, vit_last):
            return name
    return f"L{llm_last}_V{vit_last}"


# Not part of a run's identity: where it is written, whether an old one is replaced and which trackers see it.
_NOT_HASHED = ("output_dir", "overwrite", "report_to")

# What a resumed run may change against its params.json (inputs.resume_decision refuses any other change):
# where the runs folder is and whether to start over, how often the training loss is logged and to which
# trackers (a resumed run reports from its resumed step on, as the Trainer does). Every
# other parameter shapes the checkpoint (ranks, targets, modules_to_save), the optimizer (learning rates,
# decay), the data (files, batch, packing, processes), the schedule (steps, warmup) or what the metrics and
# guardrails measure and decide, so changing it midway would leave one run made of two.
RESUME_SAFE = ("output_dir", "overwrite", "logging_steps", "report_to")


def config_hash(cfg: RunConfig) -> str:
    """Stable 12-hex-digit hash of the resolved parameters (all but output_dir and overwrite).

    Paths are hashed as written, not by content.
    """
    data = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_HASHED}
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# Loading


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    params_dir: str | Path | None = None,
    overrides_source: str = "override",
) -> RunConfig:
    """Merge defaults.yaml → profile → each file in order → overrides, validate, and freeze.

    defaults.yaml and profiles/<profile>.yaml are read from `params_dir`; None (the default) means
    `lora_kit.paths.params_dir()`: the params/ of the study folder in use (the nearest folder from the
    current one up holding params/defaults.yaml: the clone, or one written by `python -m lora_kit init`),
    else the kit's own files (the clone's params/, or the copy inside an installed package).
    Relative `files` start at the current folder.
    The profile is the last `profile` set by overrides or files (default `toy`; `none` = no
    profile). `overrides_source` names the overrides in error messages (the CLI passes "--set").
    A None `variant` is replaced by `derive_variant(llm_last, vit_last)`.
    Raises ConfigError listing every problem, each with the file looked for and the fix.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    params_dir = Path(params_dir) if params_dir is not None else paths.params_dir()
    problems: list[_Problem] = []

    defaults = _read_layer(params_dir / "defaults.yaml", problems, missing_fix=_defaults_fix(params_dir))
    file_layers = [_read_layer(Path(f), problems, params_dir) for f in files]
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        problems.append(_Problem(
            f"overrides = {_show(overrides)}", "a dict of parameter names to values",
            "pass e.g. {'learning_rate': 2e-4}", where=overrides_source))
        overrides = {}
    override_layer = _Layer(overrides_source, dict(overrides), {})
    profile_layer = _profile_layer([defaults, *file_layers, override_layer], params_dir, problems)

    values = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    origins = {name: "RunConfig default" for name in values}
    layers = [defaults, *([profile_layer] if profile_layer else []), *file_layers, override_layer]
    for layer in layers:
        for key, value in layer.values.items():
            where = layer.where(key)
            if key not in _hints():
                problems.append(_unknown_problem(key, value, where))
                continue
            if layer is profile_layer and key == "profile":
                problems.append(_Problem(
                    f"profile = {_show(value)}", "no `profile` inside a profile file",
                    "delete this line; choose the profile in a variant file or with --set",
                    where=where))
                continue
            coerced, expected = _coerce(value, _hints()[key])
            if expected is not None:
                problems.append(_type_problem(key, value, expected, layer.source, where))
                continue
            values[key] = coerced
            origins[key] = where

    checks = _value_problems(values)
    if values["profile"] == "toy" and values["model"] not in TOY_MODELS and not is_toy_folder(values["model"]):
        checks.append(_Problem(
            f"profile = toy and model = {_show(values['model'])}",
            "the toy profile only with a toy model (toy, toy-stage2, toy-<family>, or a folder built by "
            "`python -m lora_kit toy build`: its learning rates and step "
            "counts are tuned for the embedded toy model)",
            "set profile: none for a real model folder", params=("profile", "model")))
    for problem in checks:
        problem.where = " and ".join(dict.fromkeys(origins[p] for p in problem.params))
    problems += checks
    if problems:
        raise _config_error(problems)

    if values["variant"] is None:
        values["variant"] = derive_variant(values["llm_last"], values["vit_last"])
    return RunConfig(**values)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """Parse CLI `--set key=value` items into overrides.

    Values are YAML, read safely (never eval'd): `true`, `3e-4` (a float here, unlike plain
    yaml.safe_load), `[merger]`, `null`; an empty value is null. Keys are checked by load_config.
    """
    out: dict[str, Any] = {}
    problems: list[_Problem] = []
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(_Problem(
                f"{_show(item)}", "key=value", "write e.g. --set learning_rate=2e-4",
                where="--set"))
            continue
        try:
            value = yaml.load(text, Loader=_Loader)
        except _YAML_ERRORS as err:
            problems.append(_Problem(
                f"{key} = {_show(text)}", f"a YAML value ({_one_line(err)})",
                f"quote the value, e.g. --set '{key}=\"...\"'", where="--set"))
            continue
        if key in out:
            problems.append(_Problem(
                f"{key} = {_show(value)}", "each parameter once",
                f"drop one of the --set {key}=... items", where="--set"))
            continue
        out[key] = value
    if problems:
        raise _config_error(problems)
    return out


# ------------------------------------------------------------------------------------------------
# defaults.yaml is rendered from RunConfig

_DEFAULTS_HEADER = """\
# lora_kit run parameters: every parameter with its default (the stage-3 winner) and its meaning.
# Launch a variant:   python -m lora_kit train -f params/C2.yaml
# Change a value:     python -m lora_kit train -f params/C2.yaml --set learning_rate=2e-4
# Merge order: this file -> params/profiles/<profile>.yaml -> each -f file -> --set.
# Generated from RunConfig in lora_kit/config.py: edit the defaults there, then run
#   python -m lora_kit.config > params/defaults.yaml
# In a study folder written by `python -m lora_kit init`, this copy is the study's own, merged first there."""

# First field of each section -> its title.
_SECTIONS = {
    "variant": "variant and model", "train_file": "data", "lora_rank": "LoRA",
    "learning_rate": "optimisation", "per_device_eval_batch_size": "evaluation and checkpoints",
    "irrelevant_drop_max": "guardrails (checked at every evaluation)",
    "output_dir": "output and runtime",
}


@functools.cache
def field_docs() -> dict[str, str]:
    """Each RunConfig field's docstring, one paragraph per field (read from this file's source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(RunConfig)))
    except (OSError, TypeError):  # source not shipped
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def defaults_yaml() -> str:
    """The text params/defaults.yaml must hold: each field's doc as a comment, then its default."""
    lines = [_DEFAULTS_HEADER]
    docs = field_docs()
    for f in dataclasses.fields(RunConfig):
        if f.name in _SECTIONS:
            lines += ["", f"# ==== {_SECTIONS[f.name]} ===="]
        lines.append("")
        lines += [f"# {line}" for line in textwrap.wrap(docs.get(f.name, ""), 98)]
        lines.append(f"{f.name}: {_yaml_value(f.default)}")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    if isinstance(value, float) and 0 < abs(value) < 1e-2:  # 1.0e-4 reads better than 0.0001
        mantissa, exponent = f"{value:.12e}".split("e")
        mantissa = mantissa.rstrip("0")
        mantissa += "0" if mantissa.endswith(".") else ""
        text = f"{mantissa}e{int(exponent)}"
        if float(text) == value:
            return text
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                          allow_unicode=True, default_flow_style=True, width=10**6)
    return text.removesuffix("\n...\n").rstrip("\n")


# ------------------------------------------------------------------------------------------------
# Reading YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 / 3E5 as floats (YAML 1.1 wants a dot: 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

# What parsing untrusted text can raise: PyYAML's own errors, plus ValueError for impossible
# dates (2024-13-01), RecursionError for very deep nesting.
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError)
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass
class _Layer:
    source: str  # a file as shown to the user, "--set" or "override"
    values: dict[Any, Any]
    lines: dict[str, int]  # key -> line number in the file

    def where(self, key: Any) -> str:
        line = self.lines.get(key) if isinstance(key, str) else None
        return f"{self.source}:{line}" if line else self.source


def _defaults_fix(params_dir: Path) -> str:
    """How to get the defaults.yaml that `params_dir` lacks."""
    if params_dir == paths.PARAMS_DIR:  # the kit's own copy is missing: a broken installation
        return ("the kit's installation lacks its parameter files: reinstall lora_kit (`pip install .` or "
                "`pip install -e .` from its clone)")
    return (f"write it with `python -m lora_kit.config > {_display(params_dir / 'defaults.yaml')}`, "
            "or start a study folder with `python -m lora_kit init DIR`")


def _missing_file_fix(path: Path, params_dir: Path | None) -> str:
    """The fix for a params file that does not exist: the same name in the params folder in use, if there."""
    fix = "check the path (relative paths start at the current folder)"
    if params_dir is None or not (params_dir / f"{path.stem}.yaml").is_file() \
            or path.absolute() == (params_dir / f"{path.stem}.yaml").absolute():
        return fix
    if paths.study_root() is None:  # an installed kit run outside any study folder: its own files
        return (f"no study folder here ({_display(Path.cwd())} and the folders above it hold no "
                f"params/defaults.yaml): start one with `python -m lora_kit init DIR` and run from DIR, "
                f"or pass the kit's own {_display(params_dir / f'{path.stem}.yaml')}")
    return f"did you mean {_display(params_dir / f'{path.stem}.yaml')}?"


def _read_layer(path: Path, problems: list[_Problem], params_dir: Path | None = None,
                missing_fix: str | None = None) -> _Layer:
    """Read one YAML parameter file; its problems go to `problems` and it then counts as empty."""
    shown = _display(path)
    empty = _Layer(shown, {}, {})
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fix = missing_fix or _missing_file_fix(path, params_dir)
        problems.append(_Problem("file not found", "an existing YAML file", fix, where=shown))
        return empty
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problems.append(_Problem(
            f"file cannot be read ({_one_line(err)})", "a UTF-8 YAML file",
            "check the path and save the file as UTF-8", where=shown))
        return empty

    loader = None
    try:
        loader = _Loader(text)  # checks for unprintable characters already
        node = loader.get_single_node()
        if node is None:  # empty or comments only
            return empty
        if not isinstance(node, yaml.MappingNode):
            kind = "list" if isinstance(node, yaml.SequenceNode) else "single value"
            problems.append(_Problem(
                f"the top level is a {kind}", "a mapping of parameter names to values",
                "write one `name: value` per line, e.g. `learning_rate: 1.0e-4`",
                where=f"{shown}:{node.start_mark.line + 1}"))
            return empty
        lines: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in lines:
                problems.append(_Problem(
                    f"{key} is set twice (also on line {lines[key]})", "each parameter once per file",
                    "delete one of the two lines", where=f"{shown}:{line}"))
            lines[key] = line  # the value that counts is the last one
        values = loader.construct_document(node)
    except _YAML_ERRORS as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        if mark is not None:
            where = f"{shown}:{mark.line + 1}"
        elif isinstance(err, yaml.reader.ReaderError):
            where = f"{shown}:{text[: err.position].count(chr(10)) + 1}"
        else:
            where = shown
        problems.append(_Problem(
            f"malformed YAML ({_one_line(err)})", "valid YAML, one `name: value` per line",
            "correct the syntax there; quote values that contain ': ' or ' #'", where=where))
        return empty
    finally:
        if loader is not None:
            loader.dispose()
    return _Layer(shown, values, lines)


def _profile_layer(layers: list[_Layer], params_dir: Path, problems: list[_Problem]) -> _Layer | None:
    """The profile file named by the last layer that sets `profile` (RunConfig's default if none)."""
    name, where = RunConfig.profile, "RunConfig default"
    for layer in layers:
        if "profile" in layer.values:
            name, where = layer.values["profile"], layer.where("profile")
    if not isinstance(name, str) or name == "none" or not _NAME.fullmatch(name):
        return None  # type / name problems are reported with the other values
    path = params_dir / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (params_dir / "profiles").glob("*.yaml"))
        fix = f"use one of: none, {', '.join(known) or '(no profile files found)'}"
        kit_own = paths.PARAMS_DIR / "profiles" / f"{name}.yaml"
        if kit_own.is_file() and kit_own.absolute() != path.absolute():
            fix += f"; or copy the kit's own {_display(kit_own)} there"
        problems.append(_Problem(
            f"profile = {_show(name)}", f"none or a file in {_display(params_dir / 'profiles')}", fix,
            where=where))
        return None
    return _read_layer(path, problems)


# ------------------------------------------------------------------------------------------------
# Validation


@dataclass
class _Problem:
    what: str  # "learning_rate = -1.0", or what is wrong with a file
    expected: str
    fix: str
    params: tuple[str, ...] = ()  # the parameters involved, to look up where each was set
    where: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: expected {self.expected}. Fix: {self.fix}"


def _config_error(problems: list[_Problem]) -> ConfigError:
    lines = [str(p) for p in problems]
    s = "" if len(lines) == 1 else "s"
    err = ConfigError(
        f"{len(lines)} problem{s} in the run parameters:\n" + "\n".join(f"  - {x}" for x in lines))
    err.problems = lines  # the same lines one by one
    return err


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(RunConfig)


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """(value converted to `hint`, None), or (None, what was expected)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None, None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        converted, expected = _coerce(value, inner)
        return (converted, None) if expected is None else (None, f"null or {expected}")
    if origin is Literal:
        choices = get_args(hint)
        if isinstance(value, str) and value in choices:
            return value, None
        return None, "one of " + ", ".join(choices)
    if origin is tuple and get_args(hint)[0] is Stage:
        return _coerce_stages(value)
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
            return tuple(value), None
        return None, "a list of strings"
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, "an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if math.isfinite(value):
                    return float(value), None
            except OverflowError:
                pass
        return None, "a finite number"
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, "a string")
    raise TypeError(f"RunConfig field type {hint!r} has no check")  # a bug in this file


_STAGES_EXPECTED = ("a list of stages, each a mapping of " + ", ".join(STAGE_KEYS) + " to integers (e.g. "
                    "[{vit_last: 2, max_steps: 60}, {vit_last: 4}])")


def _coerce_stages(value: Any) -> tuple[Any, str | None]:
    """(a tuple of Stage, None) from a list of mappings (or of Stage), or (None, what was expected)."""
    if not isinstance(value, (list, tuple)):
        return None, _STAGES_EXPECTED
    out = []
    for item in value:
        if isinstance(item, Stage):
            item = item.to_dict()
        if not isinstance(item, Mapping) or not set(item) <= set(STAGE_KEYS) or any(
                v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in item.values()):
            return None, _STAGES_EXPECTED
        out.append(Stage(**item))
    return tuple(out), None


def coerce_text(key: str, value: Any) -> Any:
    """A string given for a number or a bool read as `--set` reads it (`2e-4` -> 0.0002, `true` -> True); anything
    else unchanged. For papermill, which reads -f / -y files as YAML 1.1 (where `2e-4` is a string)."""
    hint = _hints().get(key)
    if not isinstance(value, str) or hint is None:
        return value
    inner = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, types.UnionType) else [hint]
    if inner and inner[0] in (int, float, bool):
        try:
            parsed = yaml.load(value, Loader=_Loader)
        except _YAML_ERRORS:
            return value
        if isinstance(parsed, (int, float, bool)):
            return parsed
    return value


NOTEBOOK_SOURCE = "notebook parameters"  # overrides_source of train.ipynb's values (papermill -p / -y / -f)


def _type_problem(key: str, value: Any, expected: str, source: str, where: str = "") -> _Problem:
    example = _yaml_value(_example(key))
    if source == "--set":
        fix = f"--set {key}={example}"
    elif source == NOTEBOOK_SOURCE:
        command = (f"papermill -p {key} {example}" if not isinstance(_example(key), (list, tuple))
                   else f"papermill -y '{key}: {example}'")
        return _Problem(f"{key} = {_show(value)}", expected,
                        f"write it like `{command}` (or `{key}: {example}` in the -f file)", where=where)
    else:
        fix = f"{key}: {example}"
    if isinstance(value, str) and "string" not in expected and not expected.startswith("one of"):
        fix += " (unquoted)"
    return _Problem(f"{key} = {_show(value)}", expected, f"write it like `{fix}`", where=where)


def _example(key: str) -> Any:
    default = next(f.default for f in dataclasses.fields(RunConfig) if f.name == key)
    examples = {"modules_to_save": ["merger"], "init_adapter": "path/to/adapter",
                "stages": [{"vit_last": 2, "max_steps": 60}, {"vit_last": 4}],
                "target_regex": r"model\.language_model\.layers\.(34|35)\..*_proj"}
    return examples.get(key, default) if default in (None, ()) else default


def _unknown_problem(key: Any, value: Any, where: str) -> _Problem:
    close = difflib.get_close_matches(str(key), list(_hints()), n=1, cutoff=0.6)
    fix = f"did you mean {close[0]}?" if close else "see params/defaults.yaml for every parameter"
    if where == NOTEBOOK_SOURCE:
        fix += (" (from papermill's -p, -y or -f; `papermill --help-notebook notebooks/train.ipynb` lists them; "
                "`-p params_file my.yaml` instead of `-f my.yaml` also gives the file's line numbers)")
    return _Problem(f"{key} = {_show(value)}" if isinstance(key, str) else f"key {_show(key)}",
                    "a known parameter name", fix, params=(), where=where)


# Smallest allowed value of each integer count.
_AT_LEAST = {
    "llm_last": 0, "vit_last": 0, "lora_rank": 1, "lora_alpha": 1, "crop_jitter_k": 1,
    "max_length": 1, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1, "seed": 0, "eval_steps": 1, "save_steps": 1,
    "logging_steps": 1, "max_new_tokens": 1, "eval_max_samples": 1, "exact_match_samples": 0, "irrelevant_patience": 1,
    "hallucination_patience": 1, "gap_patience": 1, "caption_patience": 1, "kl_patience": 1, "nproc": 1, "plateau_patience": 0,
}
_LEARNING_RATES = ("learning_rate", "vit_lr", "aligner_lr")  # > 0
_FRACTIONS = (  # in [0, 1]
    "warmup_ratio", "augment_strength", "irrelevant_drop_max", "irrelevant_min",
    "hallucination_rise_max", "best_irrelevant_margin", "best_hallucination_margin", "plateau_threshold",
)
_NON_NEGATIVE = ("weight_decay", "gap_widen_max", "num_train_epochs")
_DATA_FILES = ("train_file", "val_file", "bench_file", "general_file", "spotcheck_file", "terms_file")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # variant and profile names: folder-safe
_ALIGNER = "merger"  # visual.merger and visual.deepstack_merger_list


def _value_problems(c: dict[str, Any]) -> list[_Problem]:
    """Range checks, contradictions and missing files on correctly typed values."""
    out: list[_Problem] = []

    def bad(params: Sequence[str], expected: str, fix: str) -> None:
        what = " and ".join(f"{p} = {_show(c[p])}" for p in params)
        out.append(_Problem(what, expected, fix, tuple(params)))

    def default(name: str) -> Any:
        return getattr(RunConfig, name)

    for name, low in _AT_LEAST.items():
        if c[name] < low:
            bad([name], f"an integer >= {low}", f"set {name} to {low} or more (default {default(name)})")
    if c["seed"] >= 2**32:
        bad(["seed"], "an integer below 2**32", f"use a smaller seed, e.g. {default('seed')}")
    for name in _LEARNING_RATES:
        if c[name] <= 0:
            bad([name], "a learning rate > 0", f"set {name} to e.g. {default(name)}")
    for name in _FRACTIONS:
        if not 0 <= c[name] <= 1:
            bad([name], "a fraction in [0, 1]", f"set {name} to e.g. {default(name)}")
    if c["kl_base_max"] is not None and not c["kl_base_max"] > 0:
        bad(["kl_base_max"], "null (no KL trigger) or a KL > 0 in nats per token",
            "set kl_base_max to null, or to a KL a run should not exceed, e.g. 0.5")
    for name in _NON_NEGATIVE:
        if c[name] < 0:
            bad([name], "a number >= 0", f"set {name} to e.g. {default(name)}")
    for name in ("min_pixels", "max_pixels"):
        if c[name] is not None and c[name] < 1:
            bad([name], "null (the processor's own) or an image area in pixels >= 1",
                f"set {name}: null, or e.g. {name}: {1024 * (4 if name == 'min_pixels' else 1280)}")
    if c["min_pixels"] is not None and c["max_pixels"] is not None and c["min_pixels"] > c["max_pixels"]:
        bad(["min_pixels", "max_pixels"], "min_pixels <= max_pixels",
            "lower min_pixels or raise max_pixels")
    if not 0 <= c["caption_chrf_min"] <= 100:
        bad(["caption_chrf_min"], "a chrF score in [0, 100]",
            f"set caption_chrf_min to e.g. {default('caption_chrf_min')}")
    if not 0 <= c["lora_dropout"] < 1:
        bad(["lora_dropout"], "a dropout in [0, 1)", f"set lora_dropout to e.g. {default('lora_dropout')}")
    if c["max_steps"] == 0 or c["max_steps"] < -1:
        bad(["max_steps"], "-1 (train num_train_epochs) or a step count >= 1",
            "set max_steps to -1 or a positive number of steps")
    elif c["max_steps"] == -1 and c["num_train_epochs"] <= 0:
        bad(["max_steps", "num_train_epochs"], "num_train_epochs > 0 when max_steps is -1",
            "set num_train_epochs > 0, or max_steps to a positive step count")
    if c["eval_steps"] >= 1 and c["save_steps"] >= 1 and c["save_steps"] % c["eval_steps"]:
        bad(["save_steps", "eval_steps"],
            "save_steps a multiple of eval_steps (the best checkpoint is chosen on guardrail "
            "metrics, which exist only at evaluation steps)",
            f"set save_steps to {c['eval_steps']} or a multiple of it")

    # variant and targeting
    variant, llm, vit, regex = c["variant"], c["llm_last"], c["vit_last"], c["target_regex"]
    if variant is not None and not _NAME.fullmatch(variant):
        bad(["variant"], "a folder-safe name: letters, digits, _ . - (at most 64, no slash)",
            "rename it, e.g. C2_lr2e-4")
    elif variant in STUDY_VARIANTS and STUDY_VARIANTS[variant] != (llm, vit) and regex is None:
        want = STUDY_VARIANTS[variant]
        bad(["variant", "llm_last", "vit_last"],
            f"llm_last = {want[0]} and vit_last = {want[1]}, the study's {variant}",
            f"set variant: null (derives {derive_variant(llm, vit)}) or a new name for this pair")
    if regex is not None:
        try:
            re.compile(regex)
            compiled = True
        except (re.error, OverflowError, RecursionError, ValueError) as err:
            compiled = False
            bad(["target_regex"], f"a valid regular expression ({_one_line(err)})",
                r"fix the regex, e.g. model\.language_model\.layers\.(34|35)\..*_proj")
        if compiled and not regex:
            bad(["target_regex"], "a non-empty regex", "set target_regex: null to use llm_last/vit_last")
        if llm or vit:
            bad(["target_regex", "llm_last", "vit_last"],
                "either target_regex or llm_last/vit_last, not both",
                "set llm_last: 0 and vit_last: 0, or target_regex: null")
        if variant is None or variant in STUDY_VARIANTS:
            bad(["target_regex", "variant"],
                "an explicit variant name that is not a study name (the run folder is named by it)",
                "set variant to a name of your own, e.g. R_last2_qkv")
    if c["derived_from"] is not None and not _NAME.fullmatch(c["derived_from"]):
        bad(["derived_from"], "null or the name of a variant (a run folder in the same runs folder)",
            "set derived_from to the variant this one varies, e.g. A2, or null")
    if not _NAME.fullmatch(c["profile"]):
        bad(["profile"], "none or the name of a file in params/profiles/", "set profile: toy or profile: none")
    out += _stage_problems(c)

    # freezing
    if c["freeze_llm"] and llm > 0:
        bad(["freeze_llm", "llm_last"], "llm_last = 0 while the LLM tower is frozen",
            "set llm_last: 0, or freeze_llm: false")
    if c["freeze_vit"] and vit > 0:
        bad(["freeze_vit", "vit_last"], "vit_last = 0 while the vision tower is frozen",
            "set vit_last: 0, or freeze_vit: false")
    aligner = [m for m in c["modules_to_save"] if _ALIGNER in m]
    if c["freeze_aligner"] and aligner:
        bad(["freeze_aligner", "modules_to_save"],
            f"no aligner module ({', '.join(aligner)}) in modules_to_save while the aligner is frozen",
            "set freeze_aligner: false to train it, or remove it from modules_to_save")
    if any(not m.strip() for m in c["modules_to_save"]):
        bad(["modules_to_save"], "non-empty module names", "remove the empty entries")
    problem = _report_to_problem(c["report_to"])
    if problem:
        bad(["report_to"], *problem)

    # strings and files
    for name in ("irrelevant_label", "output_dir"):
        if c[name] is not None and not c[name].strip():
            bad([name], "a non-empty string", f"set {name} to e.g. {default(name)}")
    model = c["model"]
    if model not in TOY_MODELS and not _is_file(Path(model) / "config.json"):
        found = "a folder without config.json" if _is_dir(Path(model)) else "no such folder"
        bad(["model"], f"{', '.join(TOY_MODELS)} or a Hugging Face model folder ({found})",
            "give the folder holding config.json and the weights, or model: toy")
    adapter = c["init_adapter"]
    if adapter is not None:
        # the folder's files here; whether its weights fit the model is checked on the meta model (adapters.py)
        files = ("adapter_config.json", "adapter_model.safetensors")
        lacking = [f for f in files if not _is_file(Path(adapter) / f)]
        if not _is_dir(Path(adapter)) or lacking:
            found = f"a folder without {' and '.join(lacking)}" if _is_dir(Path(adapter)) else "no such folder"
            bad(["init_adapter"], f"a peft adapter folder with {' and '.join(files)} ({found})",
                "give a folder saved by peft (e.g. a run's checkpoints/<step>), or init_adapter: null")
        elif not isinstance(_read_json(Path(adapter) / "adapter_config.json"), dict):
            bad(["init_adapter"], "a peft adapter folder whose adapter_config.json is a JSON object",
                "give a folder saved by peft, or init_adapter: null")
    if c["deepspeed"] is not None:
        stage = _zero_stage(Path(c["deepspeed"]))
        if stage is None:
            bad(["deepspeed"], "a readable DeepSpeed JSON config file",
                "check the path, or set deepspeed: null for plain data parallel")
    if c["fsdp"] is not None and c["deepspeed"] is not None:
        bad(["fsdp", "deepspeed"], "at most one of them (the Trainer shards with FSDP or with DeepSpeed)",
            "set fsdp: null or deepspeed: null")
    if c["fsdp"] is not None and not c["fsdp"].strip():
        bad(["fsdp"], 'the Trainer\'s FSDP option, e.g. "full_shard auto_wrap"', "set fsdp: null for no FSDP")
    if c["fsdp_config"] is not None:
        if c["fsdp"] is None:
            bad(["fsdp_config"], "set together with fsdp", 'set fsdp: "full_shard auto_wrap", or fsdp_config: null')
        elif not isinstance(_read_json(Path(c["fsdp_config"])), dict):
            bad(["fsdp_config"], "a readable JSON file holding an object", "check the path, or set fsdp_config: null")
    for name in _DATA_FILES:
        if c[name] is not None and not _is_file(Path(c[name])):
            bad([name], "an existing file (relative paths start at the current folder)",
                f"check the path, or set {name}: null for the toy world's file")
        elif c[name] is not None:  # its format, cheaply: the whole file is read before the model loads
            problem = _file_format_problem(name, Path(c[name]))
            if problem:
                bad([name], problem, f"give {name} a file in that format, or {name}: null for the toy world's")
    return out


# The integrations of the Trainer's report_to whose Python package has another name than the integration
_INTEGRATION_PACKAGES = {"azure_ml": "azureml-core", "flyte": "flytekit flytekitplugins-deck-standard"}


def _report_to_problem(report_to: tuple[str, ...]) -> tuple[str, str] | None:
    """(expected, fix) when report_to names an integration transformers does not know or that is not installed
    (transformers.integrations: INTEGRATION_TO_CALLBACK, get_available_reporting_integrations); None if fine.
    [] and [none] (the Trainer's own spelling) report nowhere.

    tensorboard is one of the kit's own dependencies: only other names import transformers' integrations.
    """
    if len(set(report_to)) < len(report_to):
        return "each integration once", "remove the repeated names"
    if set(report_to) <= {"tensorboard"} or report_to == ("none",):
        return None
    from transformers.integrations import (INTEGRATION_TO_CALLBACK, get_available_reporting_integrations,
                                           is_azureml_available, is_flyte_deck_standard_available)

    installed = get_available_reporting_integrations()
    # the two that transformers' list (its report_to "all") leaves out although their callback works
    installed += [name for name, ok in (("azure_ml", is_azureml_available), ("flyte", is_flyte_deck_standard_available))
                  if name not in installed and ok()]
    expected = (f"a list of the Trainer's integrations ({', '.join(INTEGRATION_TO_CALLBACK)}), each installed "
                f"here (installed: {', '.join(installed) or 'none'}); [] for none")
    if "all" in report_to:
        return expected, ("name the integrations, e.g. report_to: [tensorboard, mlflow], so that params.json says "
                          "which ones received the run")
    if "none" in report_to:
        return expected, "write report_to: [] for none, or remove none from the list"
    unknown = [name for name in report_to if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        close = [difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1) for name in unknown]
        hints = [f"{match[0]} for {name}" for name, match in zip(unknown, close) if match]
        return expected, (f"write {', '.join(hints)}" if len(hints) == len(unknown)
                          else f"remove {', '.join(unknown)} from report_to")
    missing = [name for name in report_to if name not in installed]
    if missing:
        packages = " ".join(_INTEGRATION_PACKAGES.get(name, name) for name in missing)
        return expected, f"pip install {packages}, or remove {', '.join(missing)} from report_to"
    return None


def stage_targets(c: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """(llm_last, vit_last, max_steps) of each stage of a run's parameters (RunConfig or its dict), with what a
    stage leaves out filled in (see Stage)."""
    get = (lambda k: c[k]) if isinstance(c, Mapping) else (lambda k: getattr(c, k))
    llm, vit, out = get("llm_last"), get("vit_last"), []
    for stage in get("stages"):
        llm = stage.llm_last if stage.llm_last is not None else llm
        vit = stage.vit_last if stage.vit_last is not None else vit
        out.append((llm, vit, stage.max_steps if stage.max_steps is not None else get("max_steps")))
    return out


def _stage_problems(c: dict[str, Any]) -> list[_Problem]:
    """What a progressive-unfreezing run (stages) cannot honour: targets that do not grow, no step budget, or a
    setting the stage loop does not support."""
    out: list[_Problem] = []
    if not c["stages"]:
        return out

    def bad(params: Sequence[str], what: str, expected: str, fix: str) -> None:
        out.append(_Problem(what, expected, fix, tuple(params)))

    shown = _show([s.to_dict() for s in c["stages"]], 120)
    for i, stage in enumerate(c["stages"], 1):
        for key, low in (("llm_last", 0), ("vit_last", 0), ("max_steps", 1)):
            value = getattr(stage, key)
            if value is not None and value < low:
                bad(["stages"], f"stages = {shown}", f"stage {i}'s {key} an integer >= {low}",
                    f"set stage {i}'s {key} to {low} or more, or leave it out")
    if out:
        return out
    previous = None
    for i, (llm, vit, steps) in enumerate(stage_targets(c), 1):
        if i == 1 and (llm, vit) != (c["llm_last"], c["vit_last"]):
            bad(["stages", "llm_last", "vit_last"],
                f"llm_last = {c['llm_last']}, vit_last = {c['vit_last']} and stage 1 = llm_last {llm}, vit_last {vit}",
                "the first stage's targets to be the run's llm_last / vit_last (the run starts from them: its "
                "name, params.json and the step-0 evaluation)",
                f"set llm_last: {llm} and vit_last: {vit} (or leave them out of the first stage)")
        if previous is not None and (llm < previous[0] or vit < previous[1]):
            bad(["stages"], f"stages = {shown}",
                f"each stage a superset of the previous one: stage {i} (llm_last {llm}, vit_last {vit}) drops "
                f"layers of stage {i - 1} (llm_last {previous[0]}, vit_last {previous[1]}); a stage keeps every "
                "adapter trained before it",
                "list the stages with llm_last and vit_last never decreasing")
        elif previous is not None and (llm, vit) == previous:
            bad(["stages"], f"stages = {shown}",
                f"each stage adding layers: stage {i} has stage {i - 1}'s targets (llm_last {llm}, vit_last {vit})",
                f"raise stage {i}'s llm_last or vit_last, or merge it into stage {i - 1} (a longer max_steps)")
        if steps < 1:
            bad(["stages", "max_steps"], f"stages = {shown} and max_steps = {c['max_steps']}",
                f"a step budget for stage {i}: its max_steps, or the run's max_steps >= 1 (num_train_epochs does "
                "not split into stages)", f"give stage {i} max_steps: N, or set max_steps: N (every stage's budget)")
        if c["freeze_llm"] and llm > 0 or c["freeze_vit"] and vit > 0:
            tower = "llm" if c["freeze_llm"] and llm > 0 else "vit"
            bad(["stages", f"freeze_{tower}"], f"stages = {shown} and freeze_{tower} = true",
                f"{tower}_last = 0 in every stage while that tower is frozen",
                f"set freeze_{tower}: false, or {tower}_last: 0 in every stage")
        previous = (llm, vit)
    if c["target_regex"] is not None:
        bad(["stages", "target_regex"], "stages and target_regex both set",
            "stages of llm_last / vit_last (a stage grows the last-N targets of the one before)",
            "set target_regex: null and give the targets in the stages")
    if c["nproc"] > 1 or c["deepspeed"] is not None or c["fsdp"] is not None:
        bad(["stages", "nproc", "deepspeed", "fsdp"], "stages with several processes or sharded weights",
            "one process (DDP, FSDP and ZeRO register the trained parameters when they wrap the model, so a "
            "stage could not add LoRA after it)", "set nproc: 1, deepspeed: null and fsdp: null for a staged run")
    if c["variant"] is None or c["variant"] in STUDY_VARIANTS:
        bad(["stages", "variant"], f"variant = {_show(c['variant'])} with stages",
            "an explicit variant name that is not a study name (a staged run is none of the study's "
            "fixed-target variants, and its run folder is named by it)", "set variant, e.g. P_vit")
    return out


def _file_format_problem(name: str, path: Path) -> str | None:
    """What is wrong with the format of a data file parameter (None if nothing): terms_file is read whole,
    a chat JSONL file up to its first record (every line is checked before the model loads)."""
    from lora_kit.errors import DataError
    from lora_kit.scoring import TERMS_FORMAT, load_terms

    if name == "terms_file":
        try:
            load_terms(path)
        except DataError as e:
            return f"{TERMS_FORMAT} ({_one_line(e)})"
        return None
    number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                number += 1
                if line.strip():
                    row = json.loads(line)
                    if isinstance(row, dict) and "messages" in row:
                        return None
                    return (f"chat JSONL, one {{\"messages\": [...], \"images\": [...]}} object per line "
                            f"({_display(path)}:{number} holds {_show(row, 60)})")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"chat JSONL, one JSON object per line ({_display(path)}:{max(number, 1)}: {_one_line(e)})"
    return f"chat JSONL with at least one sample ({_display(path)} is empty)"


# ------------------------------------------------------------------------------------------------
# Small helpers


def is_toy_folder(model: str) -> bool:
    """A checkpoint folder built by `toy build` (toy_spec.json in it, its world beside it): a toy, by path."""
    path = Path(model)
    return _is_file(path / "toy_spec.json") and _is_file(path.parent / "world" / "world.json")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # name too long, NUL byte
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _read_json(path: Path):
    """A JSON file's value; None if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _zero_stage(path: Path) -> int | None:
    """The ZeRO stage of a DeepSpeed JSON config (0 without zero_optimization); None if unreadable."""
    try:
        stage = _read_json(path).get("zero_optimization", {}).get("stage", 0)
    except AttributeError:  # unreadable (None), or not an object
        return None
    return stage if isinstance(stage, int) else None


def _display(path: Path) -> str:
    """A path as the user should read it: relative to the current folder when inside it."""
    try:
        rel = os.path.relpath(os.path.abspath(path))
    except (ValueError, OSError):
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def _show(value: Any, limit: int = 80) -> str:
    """A value as YAML/JSON would write it, cut to `limit` characters."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, str) and value and value == value.strip() and _NAME.fullmatch(value):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (ValueError, TypeError, RecursionError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(err: BaseException) -> str:
    if isinstance(err, yaml.MarkedYAMLError):  # its str() repeats the source with ^ markers
        text = " ".join(str(x) for x in (err.context, err.problem) if x)
    else:
        text = str(err)
    return " ".join(text.split())[:200]


if __name__ == "__main__":
    print(defaults_yaml(), end="")
