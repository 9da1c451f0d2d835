"""A run's inputs, resolved once and checked before its run folder is claimed.

    inputs = resolve_inputs(cfg, RunFolder(...)); run.claim(); model = load the weights; train

Everything that can be known without the model's weights is decided here, in one place: the model
folder, its towers and the LoRA plan (built on the meta device), the modules trained in full, what
init_adapter will do (its keys checked against this model), the data files read, checked and encoded,
and whether the run starts, resumes or starts over (the parameters compared with the run's
params.json). A problem with any of them is an error naming the parameter, file or line, raised while
no run folder has been claimed, so it never leaves a failed run behind.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import AdapterCheck, check_adapter
from .config import RESUME_SAFE, RunConfig
from .data import Encoder, Sample, encode_all, read_jsonl
from .errors import ConfigError
from .rundir import RunFolder
from .targeting import TargetPlan, Towers, find_towers, meta_model, plan_for, resolve_modules_to_save

DATA_FILES = ("train_file", "val_file", "bench_file", "general_file", "spotcheck_file", "terms_file")


@dataclass
class Resume:
    """How the run folder is used: a new run, the continuation of an unfinished one, or a fresh start."""

    kind: str                          # "new" | "resume" | "overwrite"
    checkpoint: Path | None = None     # the Trainer checkpoint a resumed run continues from (None: step 0)
    params: dict | None = None         # the resumed run's params.json, kept as it was
    note: str | None = None            # said before the run starts (why an unfinished run starts over)


@dataclass
class RunInputs:
    """Everything a run reads, resolved and checked; only the model's weights are left to load."""

    model_path: Path
    towers: Towers
    plan: TargetPlan
    modules_to_save: dict[str, str]    # full module name -> tower ('llm', 'vit', 'aligner'), trained in full
    adapter: AdapterCheck | None       # init_adapter, checked against this model
    adapter_how: str                   # "none" | "new" | "continued" | "merged init_adapter, new LoRA"
    files: dict[str, Path]
    processor: object
    family: object                     # families.Family: what is specific to the model's family
    encoder: Encoder
    train_samples: list[Sample]
    train_data: object                 # list[Encoded], or an AugmentedDataset drawing new augmentations
    evalset: object                    # evaluate.EvalSet
    resume: Resume
    skipped: dict[str, list[str]] = field(default_factory=dict)  # "train" / "val" -> 'file:line: why'
    encode_seconds: float = 0.0


def data_files(cfg: RunConfig) -> dict[str, Path]:
    """The resolved *_file parameters: the toy world's files where a toy model (a toy name, or a folder built by
    `toy build`) leaves them unset."""
    from .config import is_toy_folder
    from .toy import toy_build_and_stage, toy_files

    files = {k: getattr(cfg, k) for k in DATA_FILES}
    if any(v is None for v in files.values()):
        toy = toy_build_and_stage(cfg.model)
        if toy is None and not is_toy_folder(cfg.model):
            missing = [k for k, v in files.items() if v is None]
            raise ConfigError(f"{', '.join(missing)} not set: a real model needs its data files; "
                              "set them in the variant file or with --set.")
        defaults = toy_files(toy[0]) if toy else toy_files(world=Path(cfg.model).parent / "world")
        files = {k: Path(v) if v is not None else defaults[k] for k, v in files.items()}
    return {k: Path(v).absolute() for k, v in files.items()}  # as resolve_model: where they were, in params.json


def adapter_how(check: AdapterCheck | None, plan: TargetPlan, modules_to_save: dict[str, str]) -> str:
    """What happens to init_adapter: trained further when it adapts exactly the variant's modules (the same
    LoRA targets and modules trained in full), otherwise folded into the base under a new LoRA."""
    if check is None:
        return "new" if plan.modules else "none"
    if plan.modules and set(check.wrapped) == set(plan.modules) \
            and set(check.modules_to_save) == set(modules_to_save):
        return "continued"
    return "merged init_adapter, new LoRA" if plan.modules else "merged init_adapter"


def resume_changes(old: dict, cfg: RunConfig, model_path: Path, files: dict[str, Path]) -> list[tuple]:
    """(name, old value, new value) for each parameter or resolved input that differs from the run's
    params.json, but those in config.RESUME_SAFE."""
    defaults = RunConfig().to_dict()
    before = old.get("config") or {}
    changes = [(k, before.get(k, defaults[k]), v) for k, v in cfg.to_dict().items()
               if k not in RESUME_SAFE and before.get(k, defaults[k]) != v]
    # what the parameters resolve to (the toy's folder, the toy world's files) may move while they do not
    if old.get("model_path") not in (None, str(model_path)):
        changes.append(("model (its folder)", old["model_path"], str(model_path)))
    now = {k: str(v) for k, v in files.items()}
    for k, v in (old.get("data_files") or {}).items():
        if now.get(k) != v:
            changes.append((f"{k} (resolved)", v, now.get(k)))
    return changes + content_changes(old, cfg, model_path, files)


def content_changes(old: dict, cfg: RunConfig, model_path: Path, files: dict[str, Path]) -> list[tuple]:
    """(what, old, new) for each input whose path stayed but whose content changed since the run began: the model's
    and init_adapter's weights, each data file (params.json's setup, setups.describe_setup). A data file edited in
    place would otherwise be resumed on silently, with another sample count, order and epoch boundaries."""
    from .setups import DATA_FILES as SETUP_FILES, describe_setup

    before = old.get("setup")
    if not isinstance(before, dict):  # a run recorded before setups were: its paths are all there is
        return []
    now = describe_setup(cfg, model_path, files)
    adapter_before = (before.get("model") or {}).get("init_adapter")
    pairs = [("model (its weights)", before.get("model"), now["model"]),
             ("init_adapter (its weights)", adapter_before, now["model"]["init_adapter"])]
    pairs += [(f"{k} (its content, sha256)", (before.get("data") or {}).get(k), now["data"][k]) for k in SETUP_FILES]
    changes = []
    for what, a, b in pairs:
        if not a or not b or a.get("path") != b.get("path"):
            continue  # absent, or a changed path (listed above)
        key = "sha256" if "sha256" in b else "weights"
        if a.get(key) is not None and a.get(key) != b.get(key):
            changes.append((what, _short(a.get(key)), _short(b.get(key))))
    return changes


def _short(digest) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) else repr(digest)


def resume_decision(run: RunFolder, cfg: RunConfig, model_path: Path, files: dict[str, Path]) -> Resume:
    """A new run, a resume of the unfinished run in the folder, or (overwrite) a fresh start. A finished run
    without overwrite, and a resume from a checkpoint whose parameters or inputs differ from the run's params.json,
    are refused (ConfigError listing old -> new and the ways out); nothing in the folder is touched. An unfinished
    run without a checkpoint has nothing to keep: with other values it starts over (its `note` says so)."""
    status = run.status()
    params = run.params() if run.path.is_dir() else None
    if status in ("completed", "stopped_early") and not cfg.overwrite:
        changes = resume_changes(params, cfg, model_path, files) if params is not None else []
        if not changes:
            raise ConfigError(f"run folder {run.path} holds this finished run already (status {status}, the same "
                              "parameters and inputs): its results are there. Fix: nothing to run; to repeat it, set "
                              "overwrite: true (it replaces the run).")
        named = [(k, v) for k, _, v in changes if k in cfg.to_dict() and k != "variant"]
        suggestion = cfg.variant_name + "".join(f"_{k}{v}" for k, v in named[:2]) if named else f"{cfg.variant_name}_2"
        raise ConfigError(
            f"run folder {run.path} holds a finished run (status {status}) with other values:\n{_listed(changes)}\n"
            f"Fix: give the new run its own name, e.g. --set variant={suggestion} (variant: {suggestion} in a file), "
            "so both stay comparable in the summary; or set overwrite: true to replace the finished run.")
    if cfg.overwrite:
        return Resume("overwrite" if params is not None or status is not None else "new")
    if params is None:
        return Resume("new")
    changes = resume_changes(params, cfg, model_path, files)
    checkpoint = run.last_checkpoint()
    if changes and checkpoint is None:  # nothing saved to resume (say, a run refused at step 0): start it over
        return Resume("overwrite", note=f"{run.path} holds an unfinished run ({status or 'no status'}) without a "
                                        "checkpoint; it starts over with the new values "
                                        f"({_listed(changes, bullets=False)})")
    if changes:
        raise ConfigError(
            f"run folder {run.path} holds an unfinished run ({status or 'no status'}) that this one would resume "
            f"from {checkpoint.name}, but these differ from its params.json:\n{_listed(changes)}\n"
            "A resumed run keeps its checkpoint, optimizer state, data order and schedule, so these cannot change "
            f"midway (only {', '.join(RESUME_SAFE)} may). Fix: resume with the same values and files; or give the new "
            "ones their own run (a new variant name); or set overwrite: true to start this one over.")
    return Resume("resume", checkpoint, params)


def _listed(changes: list[tuple], *, bullets: bool = True) -> str:
    items = [f"{name}: {old!r} -> {new!r}" for name, old, new in changes]
    return "\n".join(f"  - {item}" for item in items) if bullets else "; ".join(items)


def read_data(cfg: RunConfig, files: dict[str, Path], processor, family) -> dict:
    """Every data file read, checked and encoded (a DataError names file:line): the training samples and
    what every guardrail evaluation needs."""
    from .augment import make_augment
    from .data import AugmentedDataset
    from .evaluate import build_evalset

    train_samples, skipped_train = read_jsonl(files["train_file"], on_bad_sample=cfg.on_bad_sample)
    val_samples, skipped_val = read_jsonl(files["val_file"], on_bad_sample=cfg.on_bad_sample)
    encoder = Encoder.for_run(processor, cfg, family)
    t0 = time.time()
    # Encoding once also screens every sample (length, images) before training starts.
    train_data, train_samples, unencodable = encode_all(encoder, train_samples, on_bad_sample=cfg.on_bad_sample)
    augment = make_augment(cfg.augmentation, cfg.augment_strength, cfg.seed)
    if augment is not None:  # each draw is a new augmentation of the screened samples
        train_data = AugmentedDataset(train_samples, encoder, augment)
    evalset = build_evalset(cfg, encoder, files, train_samples, val_samples)
    return {"encoder": encoder, "train_samples": train_samples, "train_data": train_data, "evalset": evalset,
            "skipped": {"train": skipped_train + unencodable, "val": skipped_val + evalset.skipped_val},
            "encode_seconds": time.time() - t0}


def resolve_inputs(cfg: RunConfig, run: RunFolder, *, log=print) -> RunInputs:
    """Resolve and check a run's inputs (see the module's docstring); nothing is written anywhere."""
    from .families import family_of_config, load_processor
    from .toy import resolve_model

    model_path = resolve_model(cfg.model)  # absolute: params.json records where it was
    # The meta model (config.json only) serves every check that needs names and shapes: bad layer counts,
    # regexes, modules_to_save and adapters are refused before any weight is read; so is a family the kit
    # cannot train (naming what is missing), and a processor that does not fit the config.
    meta = meta_model(model_path, cfg.trust_remote_code)
    family = family_of_config(meta.config, str(model_path))
    towers = find_towers(meta)
    plan = plan_for(towers, cfg.llm_last, cfg.vit_last, cfg.target_regex)
    saved = resolve_modules_to_save(towers, cfg.modules_to_save, plan, freeze_llm=cfg.freeze_llm,
                                    freeze_vit=cfg.freeze_vit, freeze_aligner=cfg.freeze_aligner)
    if saved and not plan.modules:
        raise ConfigError(f"modules_to_save = {list(cfg.modules_to_save)} with no LoRA target (llm_last 0, vit_last "
                          "0): peft attaches modules_to_save only beside at least one LoRA module. Fix: set llm_last "
                          "or vit_last to 1 or more, or modules_to_save: [].")
    adapter = check_adapter(meta, cfg.init_adapter, what="init_adapter") if cfg.init_adapter else None
    if adapter is not None and adapter.renamed:
        log(f"init_adapter: {adapter.renamed} tensor names mapped from the pre-transformers-4.52 Qwen-VL layout")
    files = data_files(cfg)
    resume = resume_decision(run, cfg, model_path, files)
    if resume.note:
        log(f"{cfg.variant_name}: {resume.note}")
    processor = load_processor(model_path, family, meta.config, cfg.trust_remote_code)
    data = read_data(cfg, files, processor, family)
    return RunInputs(model_path=model_path, towers=towers, plan=plan, modules_to_save=saved, adapter=adapter,
                     adapter_how=adapter_how(adapter, plan, saved), files=files, processor=processor,
                     family=family, resume=resume, **data)

