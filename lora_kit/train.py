"""One variant of the study, from a RunConfig to a complete run folder, on the Hugging Face Trainer.

    cfg = load_config(["params/C2.yaml"]); run_dir = train(cfg)

The Trainer owns the loop (schedule, accumulation, checkpoints, resume, logging to the report_to integrations,
multi-GPU launch); lora_kit adds what the study needs through the Trainer's extension points: per-tower
optimizer groups (`create_optimizer`), correct packing (the data collator), the frozen-prefix fast
path (`compute_loss`, see prefix.py) and the guardrail evaluation (a `TrainerCallback`, whose records reach
every integration through the Trainer's own `log`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import __version__, guardrails
from .config import RunConfig
from .distributed import Ranks, init_ranks
from .data import Encoded, Encoder, collate_padded, collate_rows, pack_rows, rope_index_fn
from .device import compute_device, compute_dtype
from .errors import ConfigError, LoraKitError
from .evaluate import EvalSet, guardrail_record, image_cache, samples_record, to_device
from .inputs import data_files, resolve_inputs  # noqa: F401  (data_files: callers import it from here)
from .metrics import trainer_logs
from .paths import IS_CLONE, REPO_ROOT, runs_dir
from .prefix import FrozenPrefix, plan_prefix
from .rundir import RunFolder
from .setups import describe_setup
from .targeting import TargetPlan, Towers, resolve_modules_to_save, tower_of_module, verify_wrapped


# ---------------------------------------------------------------- the pieces

def load_model(path: Path, cfg: RunConfig):
    """The model's weights through the generic Hugging Face path (toy or a real folder), on CPU or GPU."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=compute_dtype(),
                                                        trust_remote_code=cfg.trust_remote_code)
    # On the GPU before the step-0 evaluation (the Trainer would move it only later, at its creation)
    return model.to(compute_device())


def attach_lora(model, plan: TargetPlan, towers: Towers, cfg: RunConfig,
                modules_to_save: dict[str, str] | None = None):
    """Wrap exactly the planned modules with LoRA and train exactly `modules_to_save` in full (or continue an
    init_adapter that adapts the same), verified against the plan; returns (model, how: inputs.adapter_how).

    `modules_to_save` is targeting.resolve_modules_to_save's answer (resolved here from cfg when not given).
    """
    from peft import LoraConfig, get_peft_model

    from .adapters import adapted_modules, load_adapter
    from .inputs import adapter_how

    if modules_to_save is None:
        modules_to_save = resolve_modules_to_save(towers, cfg.modules_to_save, plan, freeze_llm=cfg.freeze_llm,
                                                  freeze_vit=cfg.freeze_vit, freeze_aligner=cfg.freeze_aligner)
    how = adapter_how(None, plan, modules_to_save)
    if cfg.init_adapter:
        adapter = load_adapter(model, cfg.init_adapter, is_trainable=True, what="init_adapter")
        how = adapter_how(adapted_modules(adapter), plan, modules_to_save)
        if how == "continued":  # the stage-3 adapter adapts the same modules: keep training it
            verify_wrapped(adapter, plan, modules_to_save)
            return adapter, how
        model = adapter.merge_and_unload()  # different targets: fold stage 3 into the base, start a new LoRA
    if not plan.modules:
        model.requires_grad_(False)  # A0: nothing trains
        return model, how
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=plan.regex, modules_to_save=list(modules_to_save) or None)
    peft_model = get_peft_model(model, config)
    verify_wrapped(peft_model, plan, modules_to_save)
    return peft_model, how


def tower_of_parameter(name: str, towers: Towers) -> str:
    """'llm', 'vit' or 'aligner' for a (peft-prefixed) parameter name, by ms-swift's multimodal grouping:
    the aligner, the rest of the vision tower, everything else (decoder layers, embeddings, lm_head)."""
    return tower_of_module(towers, name.removeprefix("base_model.model."))


TOWER_LR = {"llm": "learning_rate", "vit": "vit_lr", "aligner": "aligner_lr"}  # tower -> its rate's parameter


def optimizer_groups(model, towers: Towers, cfg: RunConfig) -> list[dict]:
    """ms-swift's multimodal grouping: decoder at learning_rate, vision at vit_lr, aligner at aligner_lr,
    each split into decay (matrices) and no-decay (biases, norms) groups. Every trainable parameter
    lands in exactly one group; anything else is an error."""
    lrs = {tower: getattr(cfg, name) for tower, name in TOWER_LR.items()}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = tower_of_parameter(name, towers)
        decay = p.ndim >= 2 and "norm" not in name.lower()
        g = groups.setdefault((tower, decay), {"params": [], "names": [], "lr": lrs[tower], "tower": tower,
                                               "weight_decay": cfg.weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def step_token_mean(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The Trainer's `compute_loss_func`: this micro-batch's summed next-token cross-entropy divided by the
    supervised tokens of the whole optimizer step (`num_items_in_batch`, which the Trainer counts over every
    accumulated micro-batch, and every process).

    Summed over the step's micro-batches, this is the token-weighted mean over the step whatever the split
    into batch x accumulation; the model's own loss is a per-micro-batch mean (Qwen3-VL sets
    `accepts_loss_kwargs = False`), which the Trainer would average, weighting a 2-token answer like a
    70-token one. Without a count (never in training) it is the micro-batch's mean.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)


class StudyTrainer(Trainer):
    """The Trainer with per-tower learning rates, a loss that is the token-weighted mean over each optimizer
    step (`step_token_mean`) and, given a FrozenPrefix, the frozen-prefix fast path."""

    def __init__(self, *args, towers: Towers, run_cfg: RunConfig, prefix: FrozenPrefix | None = None, **kwargs):
        self.towers, self.run_cfg, self.prefix = towers, run_cfg, prefix
        # With compute_loss_func the Trainer counts the step's supervised tokens (over labels[..., 1:], as the
        # causal shift predicts them) and no longer divides each micro-batch's loss by the accumulation steps.
        kwargs.setdefault("compute_loss_func", step_token_mean)
        super().__init__(*args, **kwargs)

    def floating_point_ops(self, inputs) -> int:
        # The Trainer's estimate (6 x tokens x parameters) walks every module of the model at every step;
        # the parameter count never changes, so count once (measured: ~5 ms of a ~110 ms toy A1 step).
        if not hasattr(self, "_n_params"):
            self._n_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._n_params

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Both paths give the micro-batch's token sum over the step's supervised tokens (see step_token_mean).
        rows = inputs.pop("rows", None)
        if self.prefix is None or rows is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is None:  # the Trainer counts whenever compute_loss_func is set
            return self.prefix.loss(inputs, rows)
        loss = self.prefix.loss(inputs, rows, reduction="sum") / num_items_in_batch
        if self.args.average_tokens_across_devices:  # as Trainer.compute_loss: DDP averages the processes' gradients
            loss = loss * self.accelerator.num_processes  # (1 here: plan_prefix turns the fast path off for several)
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log with every tower's learning rate under its parameter name (learning_rate, vit_lr,
        aligner_lr), for TensorBoard and every report_to integration. The Trainer's own `learning_rate` is the first
        optimizer group's rate: the aligner's when it trains, vit_lr for a B variant."""
        if "learning_rate" in logs and self.optimizer is not None:
            logs = dict(logs)
            logs.pop("learning_rate")
            for group in self.optimizer.param_groups:
                name = TOWER_LR.get(group.get("tower"))
                if name is not None:
                    logs[name] = group["lr"]
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = optimizer_groups(self.model, self.towers, self.run_cfg)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            # each group keeps its tower (torch keeps extra keys of a param group), so `log` can name its rate
            self.optimizer = cls([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                 lr=self.args.learning_rate, **kwargs)
            trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
            grouped = [id(p) for g in self.optimizer.param_groups for p in g["params"]]
            if sorted(grouped) != sorted(trainable):  # nothing left out, nothing twice
                raise LoraKitError("internal: optimizer groups do not cover every trainable parameter exactly once")
        return self.optimizer


# ---------------------------------------------------------------- packing

class Collator:
    """Batches for training: packed rows (samples concatenated, no cross-sample attention) or padded rows.

    With `rows`, the batch also lists the samples of each row (what the frozen-prefix cache is keyed by).
    """

    def __init__(self, processor, model, packing: bool, max_length: int, rows: bool = False):
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_token_id = processor.image_token_id
        self.packing = packing
        self.max_length = max_length
        self.rows = rows
        self.rope_index = rope_index_fn(model) if packing else None

    def __call__(self, batch: list[Encoded]) -> dict:
        if self.packing:
            rows = pack_rows(batch, self.max_length)
            out = collate_rows(rows, self.pad_id, self.image_token_id, self.rope_index)
        else:
            rows = [[e] for e in batch]
            out = collate_padded(batch, self.pad_id, self.image_token_id)
        if self.rows:
            out["rows"] = rows
        return out


def frozen_prefix(model, cfg: RunConfig, collator: Collator, train_data, *, world_size: int = 1,
                  log=print) -> FrozenPrefix | None:
    """The run's frozen-prefix fast path (prefix.py), or None; checked against the model's own loss on a
    training batch before anything relies on it."""
    plan = plan_prefix(model, augmentation=cfg.augmentation, world_size=world_size)
    log(f"frozen-prefix fast path: {plan.mode} ({plan.why})")
    prefix = FrozenPrefix(model, plan, log=log)
    batch = collator([train_data[i] for i in range(min(len(train_data), 2))])  # two samples share a packed row
    rows = batch.pop("rows")
    diff = prefix.check(model, to_device(batch, model), rows)
    fp32 = next(model.parameters()).dtype == torch.float32
    if not diff <= (1e-4 if fp32 else 3e-2):
        log(f"frozen-prefix fast path off: its loss differs from the model's own by {diff:.2e} on a training batch "
            "(an architecture or transformers version it does not know)")
        return None
    return prefix


# ---------------------------------------------------------------- guardrail evaluation

class GuardrailCallback(TrainerCallback):
    """At every evaluation: all guardrail metrics, one metrics.jsonl line, the Trainer's logs, triggers, stop.

    Each record reaches the report_to integrations through `Trainer.log` at its step (metrics.trainer_logs): step 0,
    measured before the Trainer exists, at on_train_begin; the last step at its on_step_end, as the Trainer's own
    evaluation at max_steps (or at the log that found the training loss non-finite), while every integration
    still takes logs (MLflow ends its run at on_train_end).
    A run that resumes reports from its resumed step on, as the Trainer does.

    With several processes rank 0 evaluates and writes; the other ranks wait and follow its decision.
    When FSDP or ZeRO-3 shard the weights, every rank measures its share of each evaluation (`measure`)
    and rank 0 alone keeps the record and decides (`check`).
    """

    def __init__(self, run: RunFolder, cfg: RunConfig, encoder: Encoder, evalset: EvalSet,
                 ranks: Ranks = Ranks()):
        self.run, self.cfg, self.encoder, self.evalset, self.ranks = run, cfg, encoder, evalset, ranks
        self.history = run.read_metrics() if ranks.is_main else []
        self.params: dict = {}  # this run's params.json, set by train(): an A0 baseline must share its setup
        self.baseline: dict | None = None
        self.baseline_source = None
        self.trigger: guardrails.Trigger | None = None  # the first trigger holding at the latest evaluation
        self.loss_trigger: guardrails.Trigger | None = None  # the training loss turned non-finite (on_log)
        self.stopped_by: guardrails.Trigger | None = None  # the trigger that stopped training, if one did
        self.plateau: dict | None = None  # guardrails.eval_loss_plateau, when it ended the run
        self.plateau_from = 0  # the plateau counts the evaluations from this step on (a stage's first, stages.py)
        self.eval_seconds = 0.0
        self.eval_parts: dict[str, float] = {}  # seconds per part of the evaluations (losses, benchmark, ...)
        self.unreported: list[dict] = []  # records not yet given to the Trainer's log (report)
        self.prefix: FrozenPrefix | None = None  # the training run's frozen-prefix cache, for the losses
        self.images: FrozenPrefix | None = None  # the frozen vision blocks' output per image, for generation
        self.trainer = None  # set by train(): with sharded weights the Trainer's (wrapped) model is evaluated

    def measure(self, model, step: int) -> tuple[dict, list, list]:
        """guardrail_record of the model now: on rank 0, or on every rank when the weights are sharded."""
        if self.ranks.shares_evaluation:
            baseline_captions, verdicts = self.ranks.on_rank0(lambda: (self._baseline_captions(), self.run.verdicts()))
        else:
            baseline_captions, verdicts = self._baseline_captions(), self.run.verdicts()
        return guardrail_record(model, self.encoder, self.evalset, self.cfg, step=step,
                                baseline_captions=baseline_captions, verdicts=verdicts, prefix=self.prefix,
                                ranks=self.ranks, images=self.images)

    def measure_then(self, model, step: int, then, *args):
        """Measure the model (on rank 0, or on every rank when the weights are sharded), then run
        then(measured, *args) on rank 0; every rank returns its result."""
        if self.ranks.shares_evaluation:  # every rank its share, of the Trainer's (FSDP-wrapped) model
            measured = self.measure(self.trainer.model if self.trainer is not None else model, step)
            return self.ranks.on_rank0(then, measured, *args)
        return self.ranks.on_rank0(lambda: then(self.measure(model, step), *args))

    def keep(self, measured: tuple[dict, list, list], step: int, epoch: float, saved: bool = False) -> dict:
        """Rank 0's part of an evaluation: the record completed, its samples written. `saved`: the Trainer saves
        this step's checkpoint whatever save_steps says (the last step)."""
        record, gens, captions = measured
        record["epoch"] = epoch
        record["checkpoint"] = (f"checkpoints/checkpoint-{step}" if step and (saved or step % self.cfg.save_steps == 0)
                                else None)
        self.eval_seconds += record["eval_seconds"]
        for part, seconds in record.pop("eval_parts").items():
            self.eval_parts[part] = self.eval_parts.get(part, 0.0) + seconds
        self.run.write_samples(step, samples_record(self.evalset.bench, gens), captions)
        return record

    def _baseline_captions(self) -> list[str] | None:
        """A0's (or this run's step-0) captions; None before the baseline exists (step 0 itself)."""
        return self.baseline.get("captions") if self.baseline is not None else None

    def record(self, record: dict) -> None:
        self.run.append_metrics(record)
        self.history.append(record)
        self.unreported.append(record)
        self.load_baseline()

    def report(self) -> None:
        """Rank 0: the records not yet logged, through the Trainer's log (it logs at the Trainer's step, which is
        theirs: step 0 at on_train_begin, an evaluation at its on_step_end)."""
        for record in self.unreported:
            if record["step"] != self.trainer.state.global_step:
                raise LoraKitError(f"internal: the record of step {record['step']} would be logged at step "
                                   f"{self.trainer.state.global_step}")
            # the Trainer's on_log clears should_log: its own log of this step (training loss, learning rates)
            # must still come, on rank 0 as on the others, which gather the loss with it
            should_log = self.trainer.control.should_log
            self.trainer.log(trainer_logs(record))
            self.trainer.control.should_log = should_log
        self.unreported = []

    def load_baseline(self) -> dict:
        """The guardrail baseline (a comparable A0's step 0, else this run's), read once the step 0 is recorded."""
        if self.baseline is None:
            self.baseline, self.baseline_source = guardrails.baseline_record(
                self.run.path, self.run.path.parent, params=self.params)
        return self.baseline

    def evaluate_and_check(self, model, step: int, epoch: float) -> guardrails.Trigger | None:
        """One guardrail evaluation: metrics line, then the triggers (never at step 0)."""
        return self.check(self.measure(model, step), step, epoch)

    def check(self, measured: tuple[dict, list, list], step: int, epoch: float,
              saved: bool = False) -> guardrails.Trigger | None:
        """Rank 0's part of an evaluation_and_check: keep the measured record, then the triggers."""
        self.record(self.keep(measured, step, epoch, saved))
        if step:
            self.trigger = guardrails.check_triggers(self.history, self.baseline, self.cfg, self.run.verdicts())
        return self.trigger

    def on_train_begin(self, args, state, control, **kwargs):
        # step 0, measured before the Trainer existed; every integration has started its run by now (their
        # callbacks come before this one)
        self.ranks.on_rank0(self.report)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        last = step >= state.max_steps  # the Trainer saves the last step (DefaultFlowCallback): evaluate it too
        if step % self.cfg.eval_steps and not last:
            return
        # Every rank stops and saves together, as rank 0 decides (a rank left alone would wait forever).
        if self.ranks.on_rank0(self._evaluated, step):  # already evaluated before an interruption
            return
        stop, save = self.measure_then(model, step, self._decide, step, state.epoch or 0.0, last)
        control.should_training_stop |= stop
        control.should_save |= save or last
        self.ranks.on_rank0(self.report)

    def _evaluated(self, step: int) -> bool:
        """Whether this step was evaluated before an interruption (the run resumed after it)."""
        return any(r["step"] == step for r in self.history)

    def _decide(self, measured: tuple[dict, list, list], step: int, epoch: float,
                saved: bool = False) -> tuple[bool, bool]:
        """(stop, save) from a measured evaluation, once it is kept and the triggers are checked."""
        stop = self.check(measured, step, epoch, saved) and self.cfg.early_stopping
        if stop:
            self.stopped_by = self.trigger
        elif step:
            self.plateau = guardrails.eval_loss_plateau([r for r in self.history if r["step"] >= self.plateau_from],
                                                        self.cfg.plateau_patience, self.cfg.plateau_threshold)
            stop = self.plateau is not None
        if stop and not self.history[-1]["checkpoint"]:  # keep the checkpoint of the step that ended the run
            self.history[-1]["checkpoint"] = f"checkpoints/checkpoint-{step}"
            self.run.rewrite_last_metrics(self.history[-1])
            return True, True
        return stop, False

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # fp32/bf16 training only (no loss scaling here), so a non-finite training loss is real divergence
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return
        step = state.global_step
        # This is the last step: evaluated (and saved, by the Trainer right after this log) here, because after
        # training the integrations take no more logs.
        if not self.ranks.on_rank0(self._evaluated, step):
            self.measure_then(model, step, self.check, step, state.epoch or 0.0, True)
            control.should_save = True
            self.ranks.on_rank0(self.report)
        self.trigger = guardrails.Trigger("non_finite_loss", step, {"loss": loss},
                                          f"training loss became {loss} at step {step}")
        # diverged weights do not recover: stopped even without early_stopping
        self.loss_trigger = self.stopped_by = self.trigger
        control.should_training_stop = True


# ---------------------------------------------------------------- the run

def code_version() -> dict:
    """The git commit and dirty flag of the kit's code, for params.json. An installed package has no commit of its
    own (None, dirty False; its version says which it is): git is asked only when the package is used from its
    clone, since the folder holding an installed package may sit inside some other repository."""
    if not IS_CLONE:
        return {"lora_kit": __version__, "commit": None, "dirty": False, "diff_sha256": None}

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = bool(git("status", "--porcelain", "--", "lora_kit", "params", "notebooks"))
    diff = git("diff", "HEAD", "--", "lora_kit", "params", "notebooks") if dirty else ""
    return {"lora_kit": __version__, "commit": git("rev-parse", "HEAD") or None, "dirty": dirty,
            # which uncommitted changes: two dirty runs ran the same code only if these match
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if dirty else None}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "torchvision", "transformers", "peft", "accelerate", "papermill"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def train(cfg: RunConfig, *, log=print) -> Path:
    """Run one variant: plan, LoRA, training with guardrail evaluation, summary. Returns the run folder."""
    from transformers import set_seed
    from transformers.integrations import is_deepspeed_zero3_enabled

    t_start = time.time()
    ranks = init_ranks(cfg.nproc)  # several under torchrun / accelerate launch: rank 0 owns the run folder
    if cfg.fsdp and ranks.world_size == 1:
        raise ConfigError(f"fsdp = {cfg.fsdp!r} shards the weights across processes, but this is one process. "
                          "Fix: set nproc to the number of GPUs (or launch with torchrun / accelerate launch), "
                          "or set fsdp: null.")
    log = log if ranks.is_main else (lambda *_: None)
    run = RunFolder(runs_dir(cfg.output_dir) / cfg.variant_name)
    # Every input is resolved and checked before the run folder is claimed (inputs.py): a bad plan, adapter,
    # data line or resume leaves no failed run behind.
    inputs = resolve_inputs(cfg, run, log=log)
    towers, plan, files, evalset = inputs.towers, inputs.plan, inputs.files, inputs.evalset
    stage_plans = None
    if cfg.stages:  # progressive unfreezing (stages.py): every stage planned and checked before the folder is claimed
        from . import stages

        stage_plans = stages.stage_plans(cfg, towers)
        if inputs.resume.kind == "resume" and inputs.resume.checkpoint is not None:
            raise ConfigError(
                f"{run.path} holds an unfinished staged run (stages) with checkpoints up to "
                f"{inputs.resume.checkpoint.name}; a staged run cannot resume from a checkpoint (it does not say which "
                "stage's adapter, optimizer groups and schedule it holds). Fix: set overwrite: true to run it again "
                "from step 0, or choose another variant name.")
    # refuses a completed run or a live second process; starts over with overwrite, or with nothing to resume
    ranks.on_rank0(run.claim, overwrite=cfg.overwrite or inputs.resume.kind == "overwrite")
    try:
        set_seed(cfg.seed)
        model_path, processor = inputs.model_path, inputs.processor
        model = load_model(model_path, cfg)
        model, adapter_how = attach_lora(model, plan, towers, cfg, inputs.modules_to_save)
        groups = optimizer_groups(model, towers, cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        encoder, train_data, encode_seconds = inputs.encoder, inputs.train_data, inputs.encode_seconds
        skipped_train, skipped_val = inputs.skipped["train"], inputs.skipped["val"]

        params = {
            "config": cfg.to_dict(), "variant": cfg.variant_name, "code": code_version(),
            "processes": ranks.record(),
            "packages": package_versions(), "model_path": str(model_path), "family": inputs.family.name,
            "image_resolution": encoder.resolution,  # the bounds every encoding of this run used, resolved
            "data_files": {k: str(v) for k, v in files.items()},
            "skipped_samples": {"train": skipped_train, "val": skipped_val},
            "targets": {"llm_layers": plan.llm_layers, "vit_blocks": plan.vit_blocks, "modules": plan.modules,
                        "regex": plan.regex, "counts": plan.counts(), "aligner": towers.aligner,
                        "modules_to_save": list(inputs.modules_to_save), "adapter": adapter_how},
            "optimizer_groups": [{"tower": g["tower"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                  "n_params": sum(p.numel() for p in g["params"]), "names": g["names"]}
                                 for g in groups],
            "trainable_parameters": trainable,
            "augmentation": {"kind": cfg.augmentation, "strength": cfg.augment_strength},
            "setup": describe_setup(cfg, model_path, files),  # what a comparable run (an A0 baseline) shares
        }
        if stage_plans:  # "targets" and "optimizer_groups" are stage 1's; stages.json adds each later stage's
            params["stages"] = [s.describe() for s in stage_plans]
        if inputs.resume.kind == "resume":  # params.json stays as the run began (resume_decision compared them)
            if inputs.resume.params.get("code") != params["code"]:
                log(f"{cfg.variant_name}: the kit's code changed since this run began ({inputs.resume.params.get('code')}"
                    f" -> {params['code']}); resuming with the new code, params.json keeps the first")
        else:
            ranks.on_rank0(run.write_params, params)
        callback = GuardrailCallback(run, cfg, encoder, evalset, ranks)
        callback.params = params
        collator = Collator(processor, model, cfg.packing, cfg.max_length, rows=True)
        if trainable:  # before step 0, whose losses then fill the cache for every later evaluation
            callback.prefix = frozen_prefix(model, cfg, collator, train_data, world_size=ranks.world_size, log=log)
        if ranks.world_size == 1:  # (several processes: rank 0 evaluates alone, or the ranks share uncached)
            callback.images = image_cache(model, log=log)
        trainer = None
        if ranks.on_rank0(lambda: not callback.history):  # step 0: the baseline before any update
            shared = ranks.on_rank0(shared_step0, cfg, run, params)
            if shared is not None:
                ranks.on_rank0(callback.record, shared)
                log(f"{cfg.variant_name}: step 0 taken from {shared['copied_from']}: the same base, evaluation "
                    "data and settings, and LoRA starts at zero, so the model at step 0 is A0's")
            else:
                ranks.on_rank0(callback.evaluate_and_check, model, 0, 0.0)
        guardrail_problems = ranks.on_rank0(guardrails_can_act, callback, cfg, trainable, log)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.path / "tb")  # the Trainer's TensorBoardCallback reads it
        staged = None
        if trainable == 0:  # A0: evaluation only; its step-0 metrics are the study's baseline
            log(f"{cfg.variant_name}: nothing to train (llm_last=0, vit_last=0): evaluation-only baseline run")
            ranks.on_rank0(report_without_trainer, callback, cfg, run.path, model)
        elif stage_plans:
            staged = stages.train_stages(
                stage_plans, cfg=cfg, run=run, model=model, towers=towers, modules_to_save=inputs.modules_to_save,
                callback=callback, collator=collator, train_data=train_data, evalset=evalset, encoder=encoder, log=log)
            trainer, last, plan = staged["trainer"], staged["last"], staged["plan"]
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            trainer = StudyTrainer(
                model=model, args=training_arguments(cfg, run.path), train_dataset=train_data,
                data_collator=collator, callbacks=[callback], towers=towers, run_cfg=cfg, prefix=callback.prefix)
            callback.trainer = trainer
            if trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled():  # from fsdp / deepspeed or accelerate's config
                check_sharded_checkpoints(trainer)
                callback.ranks = ranks = dataclasses.replace(ranks, sharded=True)
                log(f"{cfg.variant_name}: weights sharded across {ranks.world_size} processes "
                    f"({'FSDP' if trainer.is_fsdp_enabled else 'ZeRO-3'}): every rank evaluates its share")
            elif cfg.fsdp:
                raise ConfigError(f"fsdp = {cfg.fsdp!r}, but the Trainer did not enable FSDP (accelerate enables it "
                                  "on GPUs only, and with several processes). Fix: launch on GPUs with nproc > 1, "
                                  "or set fsdp: null.")
            resume = ranks.on_rank0(run.last_checkpoint)
            log(f"{cfg.variant_name}: training {trainable:,} parameters: LoRA on {len(plan.modules)} modules "
                f"({plan.counts()})" + (f", in full: {', '.join(inputs.modules_to_save)}" if inputs.modules_to_save
                                        else "")
                + f", {len(train_data)} samples" + (f", resuming from {resume.name}" if resume else ""))
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            last = trainer.state.global_step
            if ranks.on_rank0(lambda: not any(r["step"] == last for r in callback.history)):
                # The callback evaluates the last step however training ends (max_steps, a trigger, a non-finite
                # loss); should the Trainer ever end elsewhere, that step is still evaluated and saved
                # (save_model on every rank: the Trainer writes once), for metrics.jsonl only.
                trainer.save_model(str(run.path / "checkpoints" / f"checkpoint-{last}"))
                final_evaluation(callback, model, last, trainer.state.epoch or 0.0)
                log(f"WARNING {cfg.variant_name}: training ended at step {last} without the callback's evaluation; "
                    "its guardrail record is in metrics.jsonl but reached no report_to integration")
        if not ranks.is_main:  # the rest is rank 0's: the summary
            return run.path
        history = callback.history
        best = guardrails.choose_best(history, callback.baseline, cfg) if trainer is not None else {
            "checkpoint": None, "step": 0, "eval_loss": history[0]["eval_loss"],
            "reason": "evaluation-only run: the base itself is the baseline"}
        # stopped early = a trigger ended training before its last step; a run that reached it is completed,
        # whatever triggers it recorded on the way (early_stopping: false, or one firing at the last step)
        trig = callback.stopped_by if trainer is not None and last < trainer.state.max_steps else None
        if staged is not None:  # stopped early = a trigger held in a stage: no stage ran after it
            trig = staged["stopped_by"]
        status = "stopped_early" if trig else "completed"
        # from the records, so that a resumed run lists the triggers of its evaluations before the interruption too
        triggers = guardrails.recorded_triggers(history, callback.baseline, cfg, run.verdicts())
        triggers += [callback.loss_trigger] if callback.loss_trigger else []
        summary = {
            "variant": cfg.variant_name, "status": status,
            "stop_reason": trig.name if trig else None, "stop_step": trig.step if trig else None,
            "stop_probe": trig.probe if trig else None,
            "plateau": callback.plateau,  # training ended because the eval loss stopped improving
            "stop_values": trig.values if trig else None, "stop_message": trig.message if trig else None,
            "triggers": [t.as_dict() for t in triggers], "guardrail_problems": guardrail_problems,
            "steps": history[-1]["step"], "baseline_source": callback.baseline_source,
            "baseline": {k: callback.baseline.get(k) for k in ("step", "eval_loss", "gap", "general_loss",
                                                                "task_exact_match", "probes")},
            "guardrail_probes": guardrails.gating_probes(callback.baseline, cfg),
            # where each guardrail first moved (its test failed once), whether or not it then fired
            "first_bad_steps": guardrails.first_bad_steps(history, callback.baseline, cfg, callback.run.verdicts()),
            "best": best, "targets": {"counts": plan.counts(), "llm_layers": plan.llm_layers,
                                      "vit_blocks": plan.vit_blocks,
                                      "modules_to_save": list(inputs.modules_to_save)},
            "llm_last": plan.llm_last, "vit_last": plan.vit_last, "trainable_parameters": trainable,
            "timings": {"wall_seconds": time.time() - t_start, "eval_seconds": callback.eval_seconds,
                        "eval_parts": callback.eval_parts,
                        "encode_seconds": encode_seconds,
                        "eval_share": callback.eval_seconds / max(time.time() - t_start, 1e-9)},
            "skipped_samples": len(skipped_train) + len(skipped_val),
            "fast_path": callback.prefix.stats() if callback.prefix else None,
            "image_cache": callback.images.stats() if callback.images else None,
        }
        if staged is not None:  # each stage: targets, steps, start and end eval loss, why it advanced or stopped
            summary["stages"] = staged["stages"]
        run.finish(summary)
        log(f"{cfg.variant_name}: {status}" + (f" ({trig.name} at step {trig.step})" if trig else "")
            + (f", {len(triggers)} trigger(s) recorded without stopping" if triggers and not trig else "")
            + f", best checkpoint: {best.get('checkpoint')}, {time.time() - t_start:.0f}s")
        return run.path
    except BaseException as e:
        run.fail(e)
        raise
    finally:
        run.release()
        ranks.close()


def shared_step0(cfg: RunConfig, run: RunFolder, mine: dict, a0_variant: str = "A0") -> dict | None:
    """A0's step-0 record (its samples copied here) when it is exactly this run's step 0, else None.

    `mine` is this run's params.json. Saves one whole guardrail evaluation per variant. Only from an A0 that
    guardrails.comparable_a0 accepts (completed, nothing trained, the same setup and code), and not with
    init_adapter (then step 0 differs from the base).
    """
    if not mine["trainable_parameters"] or cfg.init_adapter is not None:
        return None
    a0, _ = guardrails.comparable_a0(run.path, run.path.parent, mine, a0_variant)
    if a0 is None:
        return None
    try:
        samples = RunFolder(a0).read_samples(0)
    except LoraKitError:
        return None
    record = guardrails.step0_record(a0 / "metrics.jsonl")
    if record is None or samples is None:
        return None
    run.write_samples(0, samples["benchmark"], samples["captions"])
    return {**record, "eval_seconds": 0.0, "copied_from": f"{a0_variant} ({a0})"}


def guardrails_can_act(callback: GuardrailCallback, cfg: RunConfig, trainable: int, log=print) -> list[dict]:
    """Before training: the guardrails that cannot work as meant from this run's baseline, said loudly
    (guardrails.guardrails_that_cannot_act) and returned for summary.json.

    One that cannot hold (the baseline already breaks it) is refused for a run that would train with
    early_stopping: that run would stop at the guardrail's patience-th evaluation whatever it learned, and
    its status would blame training for what the base already did; the fix is one parameter. An evaluation-only
    run (A0, whose warning then concerns every variant) and early_stopping: false only warn.
    """
    problems = guardrails.guardrails_that_cannot_act(callback.load_baseline(), cfg)
    for problem in problems:
        log(f"WARNING {cfg.variant_name}: {problem['message']} (baseline: {callback.baseline_source})")
    cannot_hold = [p["message"] for p in problems if p["problem"] == "cannot_hold"]
    if cannot_hold and trainable and cfg.early_stopping:
        raise ConfigError(" ".join(cannot_hold) + f" (baseline: {callback.baseline_source}). Or set "
                          "early_stopping: false to train anyway and record the triggers without stopping.")
    return problems


def report_without_trainer(callback: GuardrailCallback, cfg: RunConfig, run_path: Path, model) -> None:
    """An evaluation-only run (A0) has no Trainer: its records go to the same report_to integrations through
    their TrainerCallback events, as a Trainer would send them (a run begun, its logs at step 0, the run ended)."""
    from transformers import TrainerControl, TrainerState
    from transformers.integrations import get_reporting_integration_callbacks

    # (nothing is sharded: the arguments without deepspeed or FSDP, which need a launched multi-GPU run)
    args = training_arguments(dataclasses.replace(cfg, deepspeed=None, fsdp=None, fsdp_config=None), run_path)
    state, control = TrainerState(), TrainerControl()  # global_step 0, the main process
    integrations = [cls() for cls in get_reporting_integration_callbacks(args.report_to)]
    for integration in integrations:
        integration.on_train_begin(args, state, control, model=model)
    for record in callback.unreported:
        for integration in integrations:
            integration.on_log(args, state, control, logs=trainer_logs(record), model=model)
    for integration in integrations:
        integration.on_train_end(args, state, control, model=model)
    callback.unreported = []


def final_evaluation(callback: GuardrailCallback, model, step: int, epoch: float) -> None:
    """The evaluation of the last step, whose checkpoint train() has just saved (called on every rank)."""
    def keep(measured) -> None:
        callback.check(measured, step, epoch)
        callback.history[-1]["checkpoint"] = f"checkpoints/checkpoint-{step}"
        callback.run.rewrite_last_metrics(callback.history[-1])
    callback.measure_then(model, step, keep)


def check_sharded_checkpoints(trainer) -> None:
    """FSDP must save whole adapters (FULL_STATE_DICT): the best checkpoint is read back as a peft folder."""
    if not trainer.is_fsdp_enabled:
        return
    kind = str(getattr(trainer.accelerator.state.fsdp_plugin, "state_dict_type", ""))
    if "FULL_STATE_DICT" not in kind:
        raise ConfigError(f"FSDP saves checkpoints as {kind}, which holds no adapter_model.safetensors for the "
                          "kit to read back. Fix: set state_dict_type: FULL_STATE_DICT in fsdp_config (or "
                          "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config).")


def training_arguments(cfg: RunConfig, run_path: Path, **overrides) -> TrainingArguments:
    """The Trainer's arguments, named as in the config (which uses the Hugging Face names); `overrides` replace
    some (a stage's max_steps and seeds, stages.py)."""
    return TrainingArguments(**{**dict(
        output_dir=str(run_path / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        eval_strategy="no",  # the guardrail callback evaluates every eval_steps (one estimator for every loss)
        save_strategy="steps", save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps, report_to=list(cfg.report_to), run_name=cfg.variant_name,
        seed=cfg.seed, data_seed=cfg.seed,
        remove_unused_columns=False, dataloader_num_workers=0, label_names=["labels"],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=False, save_only_model=False,
        deepspeed=cfg.deepspeed, fsdp=cfg.fsdp or "", fsdp_config=cfg.fsdp_config,
    ), **overrides})
