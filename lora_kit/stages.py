"""Progressive unfreezing: one run whose LoRA grows stage by stage, each advance decided by the guardrails.

    stages: [{vit_last: 2, max_steps: 60}, {vit_last: 4}, {vit_last: 6}]   (RunConfig.stages)

train() prepares the run as for any variant (stage 1's LoRA, the step-0 evaluation) and hands the stages to
`train_stages`. What a stage does:
- targets: the stage's llm_last / vit_last, a superset of the previous stage's (config.py refuses any other);
  LoRA is added to the new modules only (peft's `inject_adapter` on the run's PeftModel, restricted to them):
  the modules trained before keep their weights, the new ones start with B = 0, so the model at the stage's
  start is the previous stage's end. That is measured, not assumed: the eval loss right after the new modules
  are attached must equal the previous stage's last evaluation within 1e-5 (relative, float32; 1e-2 in
  bfloat16), else the run fails.
  Targeting is verified against the stage's plan (targeting.verify_wrapped) at every stage.
- optimizer: the same AdamW goes on, its state (moments, step count) kept for every parameter trained before;
  the new modules join it as new parameter groups at their tower's rate (learning_rate / vit_lr, the same
  grouping and weight decay as optimizer_groups).
- schedule: each stage has its own warmup (warmup_ratio of its budget) and lr_scheduler_type over its own
  max_steps, for every group, from the configured rates (a stage is like a run of that budget that starts from
  the previous stage's adapter). Step numbers continue across stages (checkpoint-<step>, metrics.jsonl).
- data order: stage k draws its batches with seed + 1000 * (k - 1), so no stage repeats another's order
  (stage 1 draws them as an unstaged run with the same seed).
- the end of a stage: its budget of steps, or the eval loss plateau (plateau_patience, counted within the
  stage), or a guardrail trigger (early_stopping) or a non-finite training loss. Its last step is evaluated
  and saved. The next stage starts only when no trigger held at any evaluation of this stage (with
  early_stopping false too: that only lets the stage train to its end); otherwise the run stops there (status
  stopped_early), and its best checkpoint is chosen over every stage under the usual constraint
  (guardrails.choose_best). The last stage, run to its budget, is completed with what it recorded, as an
  unstaged run that reaches its last step.
- the record: stages.json in the run folder (rewritten as every stage starts and ends; outcome "running" while
  one trains) and summary.json's `stages` list,
  one entry per stage run: targets, modules added, steps, start and end eval loss, trainable parameters,
  optimizer groups added, and the outcome (advanced / completed / stopped) with why.
- resume: a staged run does not resume from a checkpoint (the checkpoint does not say which stage's adapter,
  optimizer groups and schedule it holds); train() refuses it with the fix (overwrite: true).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from . import guardrails
from .config import RunConfig, stage_targets
from .errors import LoraKitError, TargetingError
from .targeting import TargetPlan, Towers, build_regex, plan_targets, verify_wrapped

# The eval loss at a stage's start against the previous stage's end, relative. In float32 the two agree to rounding
# (the new modules add exactly 0); in bfloat16 (GPU) the rebuilt frozen-prefix cache batches the vision blocks
# differently, which moves a mean loss by up to ~1e-3, so the bound there only catches a model that changed.
START_TOLERANCE = {"float32": 1e-5, "other": 1e-2}
SEED_STRIDE = 1000  # stage k's training seeds: seed + SEED_STRIDE * (k - 1)


@dataclass(frozen=True)
class StagePlan:
    """One stage: its 1-based number, its targets and its step budget."""

    number: int
    plan: TargetPlan
    max_steps: int

    def describe(self) -> dict:
        """The stage as params.json records it before training."""
        return {"stage": self.number, "llm_last": self.plan.llm_last, "vit_last": self.plan.vit_last,
                "max_steps": self.max_steps, "counts": self.plan.counts(), "regex": self.plan.regex}


def stage_plans(cfg: RunConfig, towers: Towers) -> list[StagePlan]:
    """Every stage's plan, checked against the model's towers (a count above a tower's size is refused with the
    stage named) and checked to grow (each stage's modules include the previous stage's)."""
    plans: list[StagePlan] = []
    for number, (llm, vit, steps) in enumerate(stage_targets(cfg), 1):
        try:
            plan = plan_targets(towers, llm, vit)
        except TargetingError as err:
            raise TargetingError(f"stages: stage {number} (llm_last {llm}, vit_last {vit}): {err}") from None
        if plans and not set(plans[-1].plan.modules) < set(plan.modules):
            raise TargetingError(f"stages: stage {number}'s modules do not strictly include stage {number - 1}'s")
        plans.append(StagePlan(number, plan, steps))
    return plans


def seed_of(cfg: RunConfig, number: int) -> int:
    """The training seed (data order, dropout) of stage `number`, below 2**32."""
    return (cfg.seed + SEED_STRIDE * (number - 1)) % 2**32


# ---------------------------------------------------------------- growing the adapter

def grow_lora(model, old: TargetPlan, new: TargetPlan, towers: Towers, modules_to_save) -> list[str]:
    """Add LoRA to the modules of `new` that `old` lacks, in the model's adapter ("default"), in place; returns
    the names of the parameters added (all trainable). Nothing trained before changes: its weights and whether it
    trains (peft's injection marks only adapters trainable; modules_to_save are restored), and the new modules
    start with lora_B = 0. The adapter's config names the whole new plan afterwards (target_modules = its regex),
    so that a checkpoint saved from now on loads with exactly these modules. Verified against the plan."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise LoraKitError(f"internal: a stage can only grow a peft model, got {type(model).__name__}")
    added = [m for m in new.modules if m not in set(old.modules)]
    config = model.peft_config["default"]
    before = {id(p): p.requires_grad for p in model.parameters()}
    saved = (config.target_modules, config.modules_to_save)
    config.target_modules, config.modules_to_save = build_regex(towers, added), None
    try:  # peft's own injection, restricted to the new modules: the wrapped ones are left alone
        model.base_model.inject_adapter(model.base_model.model, "default")
    finally:
        config.target_modules, config.modules_to_save = new.regex, saved[1]
    new_params = []
    for name, p in model.named_parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])  # as it was: the stage's own modules_to_save keep training
        else:
            new_params.append(name)
            if not p.requires_grad:
                raise LoraKitError(f"internal: peft added {name} frozen")
    verify_wrapped(model, new, modules_to_save)
    for name, p in model.named_parameters():
        if name in set(new_params) and ".lora_B." in name and bool(torch.any(p != 0)):
            raise LoraKitError(f"internal: the new module's {name} does not start at zero")
    return new_params


def add_optimizer_groups(optimizer, model, towers: Towers, cfg: RunConfig, names: list[str]) -> list[dict]:
    """The new parameters `names` as new groups of `optimizer` (torch add_param_group), split by tower and decay
    as optimizer_groups splits them, at the tower's configured rate; returns what was added. Refuses unless
    every trainable parameter is then in exactly one group."""
    from .train import optimizer_groups

    wanted = set(names)
    added = []
    for group in optimizer_groups(model, towers, cfg):
        pairs = [(n, p) for n, p in zip(group["names"], group["params"]) if n in wanted]
        if not pairs:
            continue
        optimizer.add_param_group({"params": [p for _, p in pairs], "lr": group["lr"], "tower": group["tower"],
                                   "weight_decay": group["weight_decay"]})
        added.append({"tower": group["tower"], "lr": group["lr"], "weight_decay": group["weight_decay"],
                      "n_params": sum(p.numel() for _, p in pairs), "names": [n for n, _ in pairs]})
    trainable = sorted(id(p) for p in model.parameters() if p.requires_grad)
    grouped = sorted(id(p) for g in optimizer.param_groups for p in g["params"])
    if grouped != trainable:
        raise LoraKitError("internal: after a stage's new groups the optimizer does not cover every trainable "
                           "parameter exactly once")
    return added


# ---------------------------------------------------------------- the stage loop

class ContinueSteps(TrainerCallback):
    """A TrainerCallback that numbers a later stage's steps on from the previous stage's last (`offset`):
    checkpoint-<step>, metrics.jsonl and TensorBoard keep one step axis across the run, and the Trainer stops
    after the stage's `budget` steps. The Trainer starts every train() at step 0 (only a resume sets its step,
    and that would load the previous stage's optimizer and scheduler); its logging counts the steps since
    `_globalstep_last_logged` and `_initial_global_step`, set here to the same offset so that the first logged
    training loss of a stage is a mean over its own steps."""

    def __init__(self, trainer, offset: int, budget: int):
        self.trainer, self.offset, self.budget = trainer, offset, budget

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step = self.offset
        state.max_steps = self.offset + self.budget
        self.trainer._globalstep_last_logged = self.offset
        self.trainer._initial_global_step = self.offset


def _stage_triggers(callback, first: int, last: int) -> list[guardrails.Trigger]:
    """The triggers that held at an evaluation of steps first < step <= last (the stage), and a non-finite
    training loss within it."""
    held = [t for t in guardrails.recorded_triggers(callback.history, callback.baseline, callback.cfg,
                                                    callback.run.verdicts()) if first < t.step <= last]
    loss = callback.loss_trigger
    return held + ([loss] if loss is not None and first < loss.step <= last else [])


def train_stages(plans: list[StagePlan], *, cfg: RunConfig, run, model, towers: Towers, modules_to_save,
                 callback, collator, train_data, evalset, encoder, log=print) -> dict:
    """Train the stages one after the other (see the module doc) on the model train() prepared for stage 1;
    returns {"trainer" (the last stage's), "last" (its last step), "plan" (the last stage run), "stages" (the
    record of each stage run), "stopped_by" (the trigger that stopped the progression, or None)}."""
    from transformers.trainer_callback import ProgressCallback

    from .evaluate import image_cache, mean_loss
    from .train import StudyTrainer, final_evaluation, frozen_prefix, training_arguments

    record: list[dict] = []
    optimizer, offset, trainer, stopped_by, previous = None, 0, None, None, None
    for stage in plans:
        t0 = time.time()
        entry = {**stage.describe(), "start_step": offset, "seed": seed_of(cfg, stage.number),
                 "modules": stage.plan.modules, "added_modules": [], "optimizer_groups_added": []}
        if previous is not None:
            names = grow_lora(model, previous.plan, stage.plan, towers, modules_to_save)
            entry["added_modules"] = [m for m in stage.plan.modules if m not in set(previous.plan.modules)]
            # the frozen prefix and the vision cache end where training begins, which moved up
            callback.prefix = frozen_prefix(model, cfg, collator, train_data, log=log)
            callback.images = image_cache(model, log=log)
            start = mean_loss(model, evalset.val, batch_size=cfg.per_device_eval_batch_size,
                              image_token_id=encoder.image_token_id, pad_id=encoder.tokenizer.pad_token_id,
                              prefix=callback.prefix)
            end = next(r["eval_loss"] for r in reversed(callback.history) if r["step"] == offset)
            entry.update(start_eval_loss=start, previous_eval_loss=end)
            fp32 = next(model.parameters()).dtype == torch.float32
            if not abs(start - end) <= START_TOLERANCE["float32" if fp32 else "other"] * max(1.0, abs(end)):
                raise LoraKitError(
                    f"stage {stage.number}: the eval loss with the new modules attached is {start:.6f}, the previous "
                    f"stage ended at {end:.6f}: the new LoRA modules changed the model (they must start at zero). "
                    "The run cannot continue that stage's adapter faithfully.")
            entry["optimizer_groups_added"] = add_optimizer_groups(optimizer, model, towers, cfg, names)
            log(f"{cfg.variant_name}: stage {stage.number}: LoRA added to {len(entry['added_modules'])} modules "
                f"({stage.plan.counts()} in all), eval loss {start:.4f} at its start = {end:.4f} at the end of "
                f"stage {previous.number}")
        entry["targeting_verified"] = True  # verify_wrapped: peft wraps exactly this stage's plan (attach_lora, grow_lora)
        entry["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seed = seed_of(cfg, stage.number)
        trainer = StudyTrainer(
            model=model, args=training_arguments(cfg, run.path, max_steps=stage.max_steps, seed=seed, data_seed=seed),
            train_dataset=train_data, data_collator=collator, callbacks=[callback], towers=towers, run_cfg=cfg,
            prefix=callback.prefix, optimizers=(optimizer, None))
        if offset:
            trainer.add_callback(ContinueSteps(trainer, offset, stage.max_steps))
            progress = trainer.pop_callback(ProgressCallback)  # after ContinueSteps: its bar counts the stage
            if progress is not None:
                trainer.add_callback(progress)
        callback.trainer = trainer
        callback.plateau_from, callback.plateau, callback.stopped_by = offset, None, None
        log(f"{cfg.variant_name}: stage {stage.number} of {len(plans)}: LoRA on {len(stage.plan.modules)} modules "
            f"({stage.plan.counts()}), {entry['trainable_parameters']:,} parameters, up to {stage.max_steps} steps "
            f"from step {offset}")
        run.write_stages(record + [{**entry, "outcome": "running"}])  # the stage under way, its start loss included
        trainer.train()
        last = trainer.state.global_step
        if not any(r["step"] == last for r in callback.history):  # the stage's last step, evaluated and saved
            trainer.save_model(str(run.path / "checkpoints" / f"checkpoint-{last}"))
            final_evaluation(callback, model, last, trainer.state.epoch or 0.0)
            callback.unreported = []  # the Trainer (its integrations too) has ended: metrics.jsonl alone keeps it
            log(f"WARNING {cfg.variant_name}: stage {stage.number} ended at step {last} without the callback's "
                "evaluation; its guardrail record is in metrics.jsonl but reached no report_to integration")
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper, unwrapped
        held = _stage_triggers(callback, offset, last)
        end = next(r for r in reversed(callback.history) if r["step"] == last)
        entry.update(end_step=last, steps=last - offset, end_eval_loss=end["eval_loss"],
                     plateau=callback.plateau, triggers=[t.as_dict() for t in held],
                     seconds=time.time() - t0)
        # the last stage run to its budget is completed whatever it recorded, as an unstaged run reaching its
        # last step is; a trigger in any earlier stage, or one that cut the last stage short, stops the run
        cut_short = callback.stopped_by is not None and last < offset + stage.max_steps
        if held and (stage.number < len(plans) or cut_short):
            stopped_by = callback.stopped_by or held[0]
            entry["outcome"] = "stopped"
            entry["why"] = (f"{stopped_by.key} held at step {stopped_by.step}: {stopped_by.message}"
                            + (f" Stages {stage.number + 1}-{len(plans)} were not run." if stage.number < len(plans) - 1
                               else f" Stage {len(plans)} was not run." if stage.number < len(plans) else ""))
        elif held:
            entry["outcome"] = "completed"
            entry["why"] = (f"the last stage ran its {stage.max_steps} steps; {held[0].key} held at step "
                            f"{held[0].step} (recorded: {held[0].message})")
        else:
            ended = (callback.plateau["message"].rstrip(".") if callback.plateau else
                     f"its budget of {stage.max_steps} steps was used")
            entry["outcome"] = "completed" if stage.number == len(plans) else "advanced"
            entry["why"] = (f"every guardrail held through steps {offset}-{last}; {ended}"
                            + ("" if stage.number == len(plans) else f"; stage {stage.number + 1} starts"))
        record.append(entry)
        run.write_stages(record)
        log(f"{cfg.variant_name}: stage {stage.number} {entry['outcome']} at step {last}: {entry['why']}")
        previous, offset = stage, last
        if held:
            break
    return {"trainer": trainer, "last": offset, "plan": previous.plan, "stages": record, "stopped_by": stopped_by}
