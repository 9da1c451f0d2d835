"""Command line: `python -m lora_kit <command>`; every command calls the same library functions as the notebooks."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LoraKitError


def cmd_targets(args) -> int:
    from .targeting import targets_report

    print(targets_report(args.model, args.llm_last, args.vit_last, rank=args.rank, regex=args.regex,
                         fmt="json" if args.json else args.format,
                         trust_remote_code=args.trust_remote_code))
    return 0


def cmd_toy_build(args) -> int:
    from .toy import build_of_family, build_toy, init_dir

    build = build_of_family(args.family)
    if args.random_init:  # the world and the randomly initialised checkpoint only: seconds, not a pretraining
        folder = init_dir(build)
        print(folder)
        print(f"a random-init {args.family} toy: use it as --set model={folder} (its world gives the data files)",
              file=sys.stderr)
        return 0
    report = build_toy(build=build, progress=True)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def cmd_train(args) -> int:
    from .config import load_config, parse_set
    from .distributed import launch, launched_world_size
    from .train import train

    cfg = load_config(args.file, parse_set(args.set), overrides_source="--set")
    # nproc > 1 outside a launcher: start torchrun with this same command; under one, train this rank
    run_dir = launch(cfg) if cfg.nproc > 1 and launched_world_size() == 1 else train(cfg)
    print(run_dir)
    return 0


def cmd_evaluate(args) -> int:
    from .config import load_config, parse_set
    from .evaluate import evaluate_checkpoint, study_baseline_captions
    from .metrics import columns, is_rate, probe_metrics
    from .views import flatten_record
    from .train import data_files

    cfg = load_config(args.file, parse_set(args.set), overrides_source="--set")
    captions, why = study_baseline_captions(cfg, args.base)
    if captions is None:
        print(f"caption sanity has no baseline captions: {why}", file=sys.stderr)
    result = evaluate_checkpoint(args.checkpoint, cfg, base=args.base, files=data_files(cfg),
                                 baseline_captions=captions, out=args.out)
    flat = flatten_record(result["metrics"])
    for col in ["eval_loss"] + columns("table", list(probe_metrics(result["metrics"]))):
        if col not in flat:
            continue
        v = flat[col]
        interval = f" [{flat[col + '_lo']:.3f}, {flat[col + '_hi']:.3f}] n={flat[col + '_n']}" if is_rate(col) else ""
        print(f"{col:>30}: " + (f"{v:.3f}{interval}" if isinstance(v, float) else f"{v}"))
    print(f"written to {result['written_to']}")
    return 0


def cmd_matrix(args) -> int:
    from .config import parse_set
    from .matrix import check_jobs, plan_jobs, run_matrix, slurm_executor, status_table, submit_matrix, unfinished
    from .paths import runs_dir

    runs_root = Path(args.runs_root) if args.runs_root else None
    if args.status:
        print(status_table(runs_root))
        return 0
    slurm_only = {"--partition": args.partition, "--gpus-per-job": args.gpus_per_job, "--time": args.time,
                  "--array-parallelism": args.array_parallelism}
    if args.backend == "local" and any(v is not None for v in slurm_only.values()):
        given = ", ".join(k for k, v in slurm_only.items() if v is not None)
        raise LoraKitError(f"{given}: options of Slurm jobs. Fix: add --backend slurm, or leave them out.")
    if args.backend == "slurm" and args.jobs != 1:
        raise LoraKitError(f"--jobs {args.jobs} is for --backend local. Fix: with --backend slurm, "
                           "--array-parallelism N runs at most N variants at once.")
    overrides = parse_set(args.set)
    if args.profile:
        overrides["profile"] = args.profile
    jobs = plan_jobs(args.variants, all_variants=args.all, grid=args.grid, overrides=overrides, seeds=args.seeds,
                     files=args.file, params_dir=Path(args.params_dir) if args.params_dir else None)
    check_jobs(jobs, runs_dir(None) if runs_root is None else runs_root)  # nothing runs or is submitted otherwise
    if args.backend == "slurm":
        root = runs_dir(None) if runs_root is None else runs_root
        if args.dry_run:
            unfinished(jobs, root)
            return 0
        gpus = 1 if args.gpus_per_job is None else args.gpus_per_job
        executor = slurm_executor(root.parent / "slurm", partition=args.partition, gpus_per_job=gpus,
                                  time_min=720 if args.time is None else args.time,
                                  array_parallelism=args.array_parallelism)
        submit_matrix(jobs, executor, runs_root=root, gpus_per_job=gpus)
        print(f"\nsubmitted; job logs in {root.parent / 'slurm'}. Progress: python -m lora_kit matrix --status")
        print(status_table(runs_root))
        return 0
    statuses = run_matrix(jobs, runs_root=runs_root, n_jobs=args.jobs, dry_run=args.dry_run)
    print()
    print(status_table(runs_root))
    return 0 if args.dry_run or all(s in ("completed", "stopped_early") for s in statuses.values()) else 1


def cmd_summary(args) -> int:
    from .frontier import write_summary

    for name, path in write_summary(args.runs_root, args.out_dir, args.setup).items():
        print(f"{name}: {path}")
    return 0


def cmd_next(args) -> int:
    from .followup import write_next

    write_next(args.summary_dir, args.out, args.runs_root, overwrite=args.overwrite)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench, table
    from .config import parse_set

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_bench(variants=args.variants or ("A1", "B3", "C2"), files=args.file, overrides=parse_set(args.set),
                       toy_dir=Path(args.toy_dir) if args.toy_dir else None, random_init=args.random_init,
                       samples=args.samples, epochs=args.epochs, repeats=args.repeats,
                       generation=not args.no_generation, eval_share=not args.no_eval_share,
                       evaluation=not args.no_evaluation, study=not args.no_study,
                       study_variants=tuple(args.study_variants), study_steps=args.study_steps, jobs=args.jobs,
                       out=args.out)
    print(table(result))
    print(f"written to {result['written_to']}")
    return 0


def cmd_init(args) -> int:
    from .studyfolder import init_report, init_study

    print(init_report(Path(args.dir), init_study(args.dir, force=args.force)))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    from .config import TOY_FAMILIES

    parser = argparse.ArgumentParser(prog="python -m lora_kit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a new study folder (params/, notebooks/) for an installed kit; "
                                    "commands run in it read its params/ and write its outputs/")
    p.add_argument("dir", metavar="DIR", help="the folder to create (new or empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DIR: files of the same names "
                                                        "(params/*.yaml, notebooks/*.ipynb) are replaced")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("targets", help="which modules a variant instruments, as a table, JSON or ms-swift arguments")
    p.add_argument("--model", default="toy", help="checkpoint folder (config.json alone is enough), or 'toy'")
    p.add_argument("--llm-last", type=int, default=0, help="LoRA on the last N decoder layers")
    p.add_argument("--vit-last", type=int, default=0, help="LoRA on the last M vision blocks")
    p.add_argument("--regex", default=None, help="a target regex to check instead of --llm-last/--vit-last")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for the parameter count")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--format", choices=["table", "json", "swift"], default="table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("toy", help="the embedded toy world and base model")
    toy_sub = p.add_subparsers(dest="toy_command", required=True)
    b = toy_sub.add_parser("build", help="build the toy data and pretrained base once (cached under outputs/toy)")
    b.add_argument("--family", choices=TOY_FAMILIES, default=TOY_FAMILIES[0],
                   help="the architecture of the toy (default qwen3_vl, model: toy); another family's pretrained toy "
                        "is model: toy-<family>")
    b.add_argument("--random-init", action="store_true",
                   help="build only the world and the randomly initialised checkpoint and print its folder")
    b.set_defaults(func=cmd_toy_build)

    p = sub.add_parser("train", help="train one variant into outputs/runs/<variant> (what train.ipynb runs)")
    p.add_argument("-f", "--file", action="append", default=[], help="a params YAML file (repeatable, in order)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="every guardrail metric of a checkpoint (peft adapter or full model)")
    p.add_argument("checkpoint", help="a peft adapter folder (lora_kit, ms-swift, ...) or a full model folder")
    p.add_argument("--base", default=None, help="base model of an adapter (default: the adapter's recorded base, "
                                                "else the config's model)")
    p.add_argument("-f", "--file", action="append", default=[], help="params YAML (data files, label, sizes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="JSON path (default CHECKPOINT/lora_kit_eval.json)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("matrix", help="run many variants, one papermill process each (A0 first)")
    p.add_argument("variants", nargs="*", help="variant names (default: the priority list A0 A1 A2 B2 B3 C2 C3)")
    p.add_argument("--all", action="store_true", help="every variant of the study, the D row included")
    p.add_argument("--jobs", type=int, default=1, help="variants run in parallel (one GPU each when present)")
    p.add_argument("--profile", default=None, help="params profile for every run (toy, none)")
    p.add_argument("-f", "--file", action="append", default=[],
                   help="a params YAML merged before every variant's own file (repeatable, in order), as train -f")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid around each chosen variant, e.g. lora_rank=8,16,32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="replicate each trained variant under N seeds (<variant>_seed<seed>; A0 runs once)")
    p.add_argument("--runs-root", default=None, help="folder of run folders (default outputs/runs)")
    p.add_argument("--params-dir", default=None, metavar="DIR",
                   help="variant files from DIR instead of params/ (default: every DIR/*.yaml), e.g. the follow-up "
                        "study `next` writes to outputs/next")
    p.add_argument("--dry-run", action="store_true", help="show what would run, run nothing")
    p.add_argument("--status", action="store_true", help="print the status table of the run folders")
    p.add_argument("--backend", choices=["local", "slurm"], default="local",
                   help="local: run here, one process per variant; slurm: one Slurm job per variant (submitit)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    p.add_argument("--gpus-per-job", type=int, default=None,
                   help="GPUs of each Slurm job (default 1); above 1 a variant trains data-parallel on them")
    p.add_argument("--time", type=int, default=None, metavar="MINUTES", help="time limit of each Slurm job (default 720)")
    p.add_argument("--array-parallelism", type=int, default=None,
                   help="at most this many variants' jobs run at once (default: Slurm's)")
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("summary", help="the study table, Pareto frontiers, heatmaps and verdicts (summary.ipynb)")
    p.add_argument("--runs-root", default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--setup", default=None, help="the setup id (or its prefix) to compare, from study.csv's setup "
                                                 "column (default: the one with the most finished runs)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("next", help="the follow-up study from the summary: a params folder for the narrow sweep "
                                    "around the frontier's winners (run it with matrix --params-dir)")
    p.add_argument("--summary-dir", default=None, help="the summary's folder (default outputs/summary)")
    p.add_argument("--runs-root", default=None, help="the runs folder the summary read (default: the one holding "
                                                     "study.csv's run folders)")
    p.add_argument("--out", default=None, help="the follow-up params folder (default outputs/next)")
    p.add_argument("--overwrite", action="store_true", help="replace the *.yaml files of an existing --out folder")
    p.set_defaults(func=cmd_next)

    p = sub.add_parser("bench", help="lora_kit against the plain peft + Trainer recipe, side by side (make bench)")
    p.add_argument("variants", nargs="*", help="study variants to train (default: A1 B3 C2)")
    p.add_argument("-f", "--file", action="append", default=[], help="params YAML for every variant (model, data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--toy-dir", default=None, help="a built toy folder (stage3/, init/, world/) instead of the "
                                                   "default toy, e.g. outputs/toy/<key>")
    p.add_argument("--random-init", action="store_true", help="the toy's randomly initialised checkpoint (speed only "
                                                              "needs the shapes; builds no pretrained toy)")
    p.add_argument("--samples", type=int, default=96, help="training samples per arm (a subset of train_file)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over them (the stage-3 default is 3)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions per arm; medians are reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-generation", action="store_true", help="skip batched-vs-sequential generation")
    p.add_argument("--no-eval-share", action="store_true", help="skip the default run's evaluation share")
    p.add_argument("--no-evaluation", action="store_true",
                   help="skip one guardrail evaluation timed straightforward against cached")
    p.add_argument("--no-study", action="store_true", help="skip the study's wall time one at a time against --jobs")
    p.add_argument("--study-variants", nargs="+", default=["A1", "C2"], help="the study's variants after A0")
    p.add_argument("--study-steps", type=int, default=40, help="optimizer steps of each study run")
    p.add_argument("--jobs", type=int, default=2, help="study runs at a time in the parallel arm")
    p.add_argument("--out", default=None, help="JSON path (default outputs/bench/bench.json, table beside it)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="what `make demo` runs")
    p.add_argument("--jobs", type=int, default=1, help="variants run in parallel, as matrix --jobs (on a CPU each "
                                                       "gets its share of the cores as torch threads)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoraKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
