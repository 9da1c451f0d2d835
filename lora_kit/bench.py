"""`python -m lora_kit bench`: lora_kit against the plain peft + Trainer recipe, side by side in one process.

Training, per variant: the reference is what a user writes from the peft and Trainer docs: LoRA through
`get_peft_model` with the same target regex, a plain `Trainer`, padded batches, no gradient
checkpointing, no caching. lora_kit is `StudyTrainer` with its collator and its frozen-prefix fast path,
exactly as `train()` builds them. Both arms get the same base weights, pre-encoded samples (encoding is
not timed in either), sample order, seed, per-tower learning rates (the reference through the Trainer's
documented `optimizers=` argument), schedule and number of samples; repetitions alternate the arms and
the medians are reported, so the machine's load falls on both alike.

Evaluation: batched generation against one prompt at a time on the guardrail benchmark, and the share of
a default run's wall time that its guardrail evaluations take (a real `train()` of one variant).
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .config import RunConfig, load_config
from .data import Encoder, collate_padded, read_jsonl
from .evaluate import build_evalset, generate, mean_loss
from .paths import PARAMS_DIR, outputs_dir

VARIANTS = ("A1", "B3", "C2")


# ---------------------------------------------------------------- configuration

def bench_config(variant: str, files: list[str], overrides: dict, toy_dir: Path | None, random_init: bool) -> RunConfig:
    """The variant's RunConfig as `train` would resolve it, pointed at a built toy folder when given."""
    overrides = dict(overrides)
    files = list(files)
    from .toy import toy_build_and_stage

    toy = toy_build_and_stage(overrides.get("model", "toy"))
    if toy_dir is None and random_init and toy is not None:
        from .toy import init_dir

        toy_dir = init_dir(toy[0]).parent  # builds only the toy world and the random checkpoint when missing
    if toy_dir is not None:  # a toy folder (stage3/, init/, world/) in place of the default toy's key
        world = toy_dir / "world"
        overrides = {"model": str(toy_dir / ("init" if random_init else "stage3")), "profile": "none",
                     "train_file": str(world / "task_train.jsonl"), "val_file": str(world / "task_val.jsonl"),
                     "bench_file": str(world / "bench.jsonl"), "general_file": str(world / "general_eval.jsonl"),
                     "spotcheck_file": str(world / "spotcheck.jsonl"), "terms_file": str(world / "terms.json"),
                     **overrides}
        files = [str(PARAMS_DIR / "profiles" / "toy.yaml"), *files]
    return load_config([*files, str(PARAMS_DIR / f"{variant}.yaml")], overrides, overrides_source="--set")


def resolve(cfg: RunConfig) -> tuple[Path, dict[str, Path]]:
    """(model folder, data files) of a config."""
    from .toy import resolve_model
    from .train import data_files

    return resolve_model(cfg.model), data_files(cfg)


# ---------------------------------------------------------------- measuring one arm

class PeakRSS:
    """Peak resident memory growth of this process while the block runs (sampled every 10 ms; CPU runs)."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth = self.peak - self.start


class CountingCollator:
    """A collator that also counts the supervised tokens it hands out."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, 0

    def __call__(self, batch):
        self.tokens += sum(e.n_supervised for e in batch)
        return self.collate(batch)


class EpochClock(TrainerCallback):
    """Notes when each epoch ends: the epochs after the first show the frozen-prefix cache's steady state."""

    def __init__(self):
        self.ends: list[float] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def _args(cfg: RunConfig, out: Path):
    """The Trainer arguments both arms share: lora_kit's own, without checkpoints and logging files."""
    from .train import training_arguments

    args = training_arguments(cfg, out)
    return dataclasses.replace(args, save_strategy="no", report_to=[], logging_steps=10**9, disable_tqdm=True)


def load_lora_model(model_path: Path, cfg: RunConfig, plain: bool):
    """Base weights plus LoRA at the same seed: through peft's get_peft_model (plain) or lora_kit's attach_lora."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, set_seed

    from .targeting import find_towers, plan_for
    from .train import attach_lora

    set_seed(cfg.seed)
    model = AutoModelForImageTextToText.from_pretrained(model_path)
    towers = find_towers(model)
    plan = plan_for(towers, cfg.llm_last, cfg.vit_last, cfg.target_regex)
    if plain:
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=plan.regex))
    else:
        model, _ = attach_lora(model, plan, towers, cfg)
    return model, towers


def run_arm(arm: str, cfg: RunConfig, model_path: Path, processor, train_data, val_data) -> dict:
    """Train one arm from the same start; time only the training loop."""
    from transformers import PrinterCallback, Trainer

    from .train import Collator, StudyTrainer, frozen_prefix, optimizer_groups, step_token_mean

    model, towers = load_lora_model(model_path, cfg, plain=arm == "reference")
    pad, image = processor.tokenizer.pad_token_id, processor.image_token_id
    with tempfile.TemporaryDirectory() as out, PeakRSS() as rss:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0, cpu0 = time.perf_counter(), time.process_time()
        if arm == "reference":
            collate = CountingCollator(lambda b: collate_padded(b, pad, image))
            groups = [{k: v for k, v in g.items() if k not in ("names", "tower")}
                      for g in optimizer_groups(model, towers, cfg)]
            optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
            # the kit's loss (the token-weighted mean over each optimizer step), so that with accumulation both
            # arms train the same objective and their eval losses compare
            trainer = Trainer(model=model, args=_args(cfg, Path(out)), train_dataset=train_data,
                              data_collator=collate, optimizers=(optimizer, None), compute_loss_func=step_token_mean)
            prefix = None
        else:  # what train() builds, the fast path's check included in the timing
            collate = CountingCollator(Collator(processor, model, cfg.packing, cfg.max_length, rows=True))
            prefix = frozen_prefix(model, cfg, collate.collate, train_data, log=lambda *_: None)
            trainer = StudyTrainer(model=model, args=_args(cfg, Path(out)), train_dataset=train_data,
                                   data_collator=collate, towers=towers, run_cfg=cfg, prefix=prefix)
        trainer.remove_callback(PrinterCallback)  # the benchmark prints its own lines
        clock = EpochClock()
        trainer.add_callback(clock)
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss.growth
    eval_loss = mean_loss(model, val_data, batch_size=16, image_token_id=image, pad_id=pad)  # the same estimator
    later = len(clock.ends) - 1  # epochs after the first (every epoch holds the same samples)
    steady = collate.tokens * later / len(clock.ends) / (clock.ends[-1] - clock.ends[0]) if later > 0 else None
    return {"seconds": seconds, "tokens": collate.tokens, "tokens_per_s": collate.tokens / seconds,
            "steady_tokens_per_s": steady,
            "cpu_seconds": cpu_seconds, "tokens_per_cpu_s": collate.tokens / cpu_seconds,
            "peak_bytes": peak, "eval_loss": eval_loss, "steps": trainer.state.global_step,
            "fast_path": prefix.stats() if prefix else None}


def bench_training(cfg: RunConfig, model_path: Path, files: dict, *, samples: int, epochs: float, repeats: int,
                   log=print) -> dict:
    """Both arms `repeats` times, alternating which goes first; medians and per-repetition values."""
    from transformers import AutoProcessor

    cfg = dataclasses.replace(cfg, num_train_epochs=epochs, max_steps=-1)
    processor = AutoProcessor.from_pretrained(model_path)
    encoder = Encoder.for_run(processor, cfg)
    train_samples, _ = read_jsonl(files["train_file"])
    val_samples, _ = read_jsonl(files["val_file"])
    train_data = [encoder.encode(s) for s in train_samples[:samples]]
    val_data = [encoder.encode(s) for s in val_samples]
    runs: dict[str, list[dict]] = {"reference": [], "lora_kit": []}
    for r in range(repeats):
        for arm in (("reference", "lora_kit") if r % 2 == 0 else ("lora_kit", "reference")):
            runs[arm].append(run_arm(arm, cfg, model_path, processor, train_data, val_data))
            log(f"  {cfg.variant_name} {arm:9s} rep {r + 1}: {runs[arm][-1]['tokens_per_s']:.0f} tok/s, "
                f"{runs[arm][-1]['tokens_per_cpu_s']:.0f} tok/CPU-s, "
                f"eval loss {runs[arm][-1]['eval_loss']:.4f}")
    med = lambda arm, key: statistics.median(x[key] for x in runs[arm])  # noqa: E731
    keys = ("tokens_per_s", "tokens_per_cpu_s", "steady_tokens_per_s", "peak_bytes", "eval_loss", "seconds")
    return {"variant": cfg.variant_name, "samples": len(train_data), "epochs": epochs,
            "batch": cfg.per_device_train_batch_size, "packing": cfg.packing, "repeats": repeats,
            "reference": {k: med("reference", k) for k in keys}, "lora_kit": {k: med("lora_kit", k) for k in keys},
            "speedup": med("lora_kit", "tokens_per_s") / med("reference", "tokens_per_s"),
            "speedup_cpu": med("lora_kit", "tokens_per_cpu_s") / med("reference", "tokens_per_cpu_s"),
            "speedup_steady": (med("lora_kit", "steady_tokens_per_s") / med("reference", "steady_tokens_per_s")
                               if epochs >= 2 else None),
            "fast_path": runs["lora_kit"][-1]["fast_path"], "runs": runs}


# ---------------------------------------------------------------- evaluation

def bench_generation(cfg: RunConfig, model_path: Path, files: dict, *, repeats: int) -> dict:
    """Seconds for the guardrail benchmark's generations batched (per_device_eval_batch_size) and one at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    encoder = Encoder.for_run(processor, cfg)
    bench = build_evalset(cfg, encoder, files).bench
    sizes = (cfg.per_device_eval_batch_size, 1)
    times: dict[int, list[float]] = {bs: [] for bs in sizes}
    cpu: dict[int, list[float]] = {bs: [] for bs in sizes}
    for r in range(repeats):
        for bs in (sizes if r % 2 == 0 else sizes[::-1]):
            t0, cpu0 = time.perf_counter(), time.process_time()
            generate(model, encoder, bench, batch_size=bs, max_new_tokens=cfg.max_new_tokens)
            times[bs].append(time.perf_counter() - t0)
            cpu[bs].append(time.process_time() - cpu0)
    med = lambda d, bs: statistics.median(d[bs])  # noqa: E731
    return {"prompts": len(bench), "batch_size": sizes[0], "max_new_tokens": cfg.max_new_tokens,
            "batched_seconds": med(times, sizes[0]), "sequential_seconds": med(times, 1),
            "speedup": med(times, 1) / med(times, sizes[0]), "speedup_cpu": med(cpu, 1) / med(cpu, sizes[0]),
            "runs": times, "cpu_runs": cpu}


def bench_evaluation(cfg: RunConfig, model_path: Path, files: dict, *, repeats: int) -> dict:
    """Seconds of one guardrail evaluation of the variant (its LoRA attached, B moved off zero so that the adapters
    act), the straightforward way (cache=False) against the kit's (prompts encoded once, each image through the
    vision tower once, the frozen vision blocks and the frozen prefix cached), alternating; one evaluation of each
    first fills the caches, as step 0 does in a run. Also whether the two records agree (answers equal, losses)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .evaluate import guardrail_record, image_cache
    from .prefix import FrozenPrefix, plan_prefix

    processor = AutoProcessor.from_pretrained(model_path)
    model, _ = load_lora_model(model_path, cfg, plain=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    encoder = Encoder.for_run(processor, cfg)
    es = build_evalset(cfg, encoder, files)
    plan = plan_prefix(model, augmentation=cfg.augmentation)
    prefix = FrozenPrefix(model, plan, log=lambda *_: None) if plan.mode != "none" else None
    images = image_cache(model, log=lambda *_: None)
    arm = lambda cached: guardrail_record(  # noqa: E731
        model, encoder, es, cfg, step=None, baseline_captions=None, cache=cached,
        prefix=prefix if cached else None, images=images if cached else None)
    first = {cached: arm(cached) for cached in (False, True)}  # fills the caches (and the other arm's warm-up)
    times: dict[bool, list[float]] = {False: [], True: []}
    parts: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(repeats):
        for cached in ((False, True) if r % 2 == 0 else (True, False)):
            record, _, _ = arm(cached)
            times[cached].append(record["eval_seconds"])
            parts[cached].append(record["eval_parts"])
    med = lambda cached: statistics.median(times[cached])  # noqa: E731
    (ref, ref_gens, ref_caps), (new, gens, caps) = first[False], first[True]
    return {"variant": cfg.variant_name, "prompts": len(es.bench) + len(es.exact) + len(es.spotcheck)
            + len(es.crops) * (1 + cfg.crop_jitter_k), "loss_samples": len(es.val) + len(es.train_subset)
            + len(es.general), "straightforward_seconds": med(False), "cached_seconds": med(True),
            "speedup": med(False) / med(True),
            "parts": {arm_name: {k: statistics.median(p[k] for p in parts[c]) for k in parts[c][0]}
                      for arm_name, c in (("straightforward", False), ("cached", True))},
            "same_answers": [g.answer for g in gens] == [g.answer for g in ref_gens] and caps == ref_caps
            and new["crop"] == ref["crop"] and new.get("task_exact_match") == ref.get("task_exact_match"),
            "max_loss_difference": max(abs(new[k] - ref[k]) for k in ("eval_loss", "train_loss", "general_loss")),
            "fast_path": plan.mode, "image_cache": images.plan.mode if images else "none", "runs": times}


def bench_eval_share(cfg: RunConfig) -> dict:
    """A default run (train()) in a temporary folder after A0, as in the study: the share of its wall time
    spent in guardrail evaluation (its step 0 is A0's, copied, when A0's evaluation settings match)."""
    from .train import train

    quiet = lambda *_: None  # noqa: E731
    # Every step of the run is timed: a guardrail that fires (or that a random base cannot hold) does not stop it.
    cfg = dataclasses.replace(cfg, early_stopping=False)
    with tempfile.TemporaryDirectory() as out:
        a0 = dataclasses.replace(cfg, output_dir=out, overwrite=True, llm_last=0, vit_last=0, target_regex=None,
                                 variant="A0")
        a0_seconds = json.loads((train(a0, log=quiet) / "summary.json").read_text())["timings"]["wall_seconds"]
        run = train(dataclasses.replace(cfg, output_dir=out, overwrite=True), log=quiet)
        summary = json.loads((run / "summary.json").read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    t = summary["timings"]
    return {"variant": cfg.variant_name, "steps": summary["steps"], "evaluations": len(records),
            "step0_copied": bool(records and records[0].get("copied_from")), "a0_seconds": a0_seconds,
            "wall_seconds": t["wall_seconds"], "eval_seconds": t["eval_seconds"], "eval_share": t["eval_share"],
            "eval_parts": t["eval_parts"], "fast_path": summary.get("fast_path")}


def study_overrides(cfg: RunConfig, steps: int) -> dict:
    """What every matrix job of the study benchmark sets: the benchmark config's model, data and evaluation
    settings (the toy profile's, resolved), `steps` optimizer steps, no early stop (every run does the same work)."""
    keep = ("model", "profile", "train_file", "val_file", "bench_file", "general_file", "spotcheck_file", "terms_file",
            "learning_rate", "vit_lr", "aligner_lr", "lr_scheduler_type", "warmup_ratio", "eval_steps", "save_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing",
            "per_device_eval_batch_size", "max_new_tokens", "eval_max_samples", "exact_match_samples", "crop_jitter_k",
            "gap_widen_max", "plateau_patience", "plateau_threshold", "min_pixels", "max_pixels")
    values = cfg.to_dict()
    return {**{k: values[k] for k in keep if k in values}, "max_steps": steps, "early_stopping": False}


def _metric_values(record: dict) -> dict:
    """A metrics.jsonl line without its timings: what must be the same however the run was scheduled."""
    return {k: v for k, v in record.items() if k not in ("eval_seconds", "eval_parts", "copied_from")}


def bench_study(cfg: RunConfig, variants: tuple[str, ...], *, steps: int, jobs: int = 2, log=print) -> dict:
    """The study's wall time through the matrix runner (A0 first, then `variants`), one at a time (each run
    with torch's default threads, all the cores) and `jobs` at a time (each run with its share of the cores as
    torch threads), in one process, one after the other; and whether each run's metrics.jsonl is the same."""
    from .matrix import plan_jobs, run_matrix

    overrides = study_overrides(cfg, steps)
    out: dict = {"variants": ["A0", *variants], "steps": steps, "jobs": jobs, "cores": _cores()}
    metrics: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, jobs):
            root = Path(tmp) / f"jobs{n}"
            t0 = time.perf_counter()
            statuses = run_matrix(plan_jobs(list(variants), overrides=overrides), runs_root=root, n_jobs=n,
                                  log=lambda *_: None)
            out[f"seconds_jobs{n}"] = time.perf_counter() - t0
            out[f"statuses_jobs{n}"] = statuses
            metrics[n] = {v: [_metric_values(json.loads(line)) for line in
                              (root / v / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
                          for v in statuses if (root / v / "metrics.jsonl").is_file()}
            out[f"run_seconds_jobs{n}"] = {v: (json.loads((root / v / "summary.json").read_text(encoding="utf-8"))
                                               .get("timings") or {}).get("wall_seconds") for v in statuses}
            log(f"  study, {n} at a time: {out[f'seconds_jobs{n}']:.0f} s ({statuses})")
    out["speedup"] = out["seconds_jobs1"] / out[f"seconds_jobs{jobs}"]
    out["identical"] = metrics[1] == metrics[jobs] and len(metrics[1]) == len(out["variants"])
    out["differing"] = sorted(v for v in metrics[1] if metrics[1].get(v) != metrics[jobs].get(v))
    return out


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------- the report

def machine() -> dict:
    import os

    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def table(result: dict) -> str:
    """The benchmark as a Markdown table (what the README shows)."""
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = ["| variant | reference tok/s | lora_kit tok/s | ratio | ratio by CPU time | ratio after epoch 1 "
             "| peak memory ref / kit | eval loss ref / kit | fast path |", "|---|---|---|---|---|---|---|---|---|"]
    for t in result["training"]:
        ref, kit = t["reference"], t["lora_kit"]
        lines.append(f"| {t['variant']} | {ref['tokens_per_s']:.0f} | {kit['tokens_per_s']:.0f} | "
                     f"**{t['speedup']:.2f}×** | {t['speedup_cpu']:.2f}× | "
                     + (f"{t['speedup_steady']:.2f}× | " if t.get("speedup_steady") else "– | ")
                     + f"{mib(ref['peak_bytes'])} / {mib(kit['peak_bytes'])} | "
                     f"{ref['eval_loss']:.3f} / {kit['eval_loss']:.3f} | {(t['fast_path'] or {}).get('mode')} |")
    g = result.get("generation")
    if g:
        lines.append(f"\nGeneration, {g['prompts']} benchmark prompts: batched (batch {g['batch_size']}) "
                     f"{g['batched_seconds']:.1f} s, one at a time {g['sequential_seconds']:.1f} s: "
                     f"**{g['speedup']:.1f}×** ({g['speedup_cpu']:.1f}× by CPU time).")
    s = result.get("eval_share")
    if s:
        copied = " after A0, step 0 copied from A0's" if s.get("step0_copied") else ""
        lines.append(f"\nDefault {s['variant']} run{copied} ({s['steps']} steps, {s['evaluations']} guardrail evaluations"
                     f"{', 1 of them copied' if copied else ''}): "
                     f"{s['eval_seconds']:.0f} s of {s['wall_seconds']:.0f} s in evaluation, "
                     f"**{100 * s['eval_share']:.0f}%** (" + ", ".join(
                         f"{part} {seconds:.0f} s" for part, seconds in s["eval_parts"].items()) + ").")
    for e in result.get("evaluation") or []:
        p = e["parts"]
        lines.append(f"\nOne guardrail evaluation of {e['variant']} ({e['prompts']} generations, {e['loss_samples']} "
                     f"loss samples): straightforward {e['straightforward_seconds']:.1f} s, cached "
                     f"{e['cached_seconds']:.1f} s: **{e['speedup']:.2f}×** (image cache {e['image_cache']}, "
                     f"fast path {e['fast_path']}; same answers: {e['same_answers']}, losses within "
                     f"{e['max_loss_difference']:.1e}). Parts straightforward / cached: " + ", ".join(
                         f"{k} {p['straightforward'][k]:.1f} / {p['cached'].get(k, 0):.1f} s" for k in p["straightforward"])
                     + ".")
    st = result.get("study")
    if st:
        n = st["jobs"]
        lines.append(f"\nThe study {' '.join(st['variants'])} ({st['steps']} steps each, matrix runner, {st['cores']} "
                     f"cores): one at a time {st['seconds_jobs1']:.0f} s, {n} at a time (one torch thread each) "
                     f"{st[f'seconds_jobs{n}']:.0f} s: **{st['speedup']:.2f}×**; every run's metrics.jsonl the same "
                     f"both ways: {st['identical']}" + (f" (differing: {', '.join(st['differing'])})"
                                                         if st["differing"] else "") + ".")
    return "\n".join(lines)


def run_bench(*, variants=VARIANTS, files: list[str] = (), overrides: dict | None = None, toy_dir: Path | None = None,
              random_init: bool = False, samples: int = 96, epochs: float = 3.0, repeats: int = 3,
              generation: bool = True, eval_share: bool = True, evaluation: bool = True, study: bool = True,
              study_variants: tuple[str, ...] = ("A1", "C2"), study_steps: int = 40, jobs: int = 2,
              out: Path | None = None, log=print) -> dict:
    """The whole benchmark; writes JSON (and the table next to it) and returns the result."""
    result: dict = {"machine": machine(), "settings": {"samples": samples, "epochs": epochs, "repeats": repeats,
                                                       "random_init": random_init}, "training": []}
    for variant in variants:
        cfg = bench_config(variant, list(files), overrides or {}, toy_dir, random_init)
        model_path, data = resolve(cfg)
        result["settings"]["model"] = str(model_path)
        log(f"{variant}: {samples} samples x {epochs:g} epochs, {repeats} repetitions per arm")
        result["training"].append(bench_training(cfg, model_path, data, samples=samples, epochs=epochs,
                                                 repeats=repeats, log=log))
    cfg = bench_config(variants[-1], list(files), overrides or {}, toy_dir, random_init)
    model_path, data = resolve(cfg)
    if generation:
        log("generation: batched against one at a time")
        result["generation"] = bench_generation(cfg, model_path, data, repeats=repeats)
    if evaluation:
        result["evaluation"] = []
        for variant in dict.fromkeys(("A1", variants[-1])):  # a frozen vision tower, and the last variant's
            vcfg = bench_config(variant, list(files), overrides or {}, toy_dir, random_init)
            log(f"{variant}: one guardrail evaluation, straightforward against cached")
            result["evaluation"].append(bench_evaluation(vcfg, model_path, data, repeats=repeats))
    if eval_share:
        log(f"a default {cfg.variant_name} run for the guardrail evaluation share")
        result["eval_share"] = bench_eval_share(cfg)
    if study:
        log(f"the study A0 {' '.join(study_variants)} ({study_steps} steps each): one at a time, then {jobs} at a time")
        result["study"] = bench_study(cfg, tuple(study_variants), steps=study_steps, jobs=jobs, log=log)
    out = Path(out) if out else outputs_dir() / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text(table(result) + "\n")
    result["written_to"] = str(out)
    return result
