"""Running many variants: one papermill process per variant, A0 first, skip / resume / record failures.

    python -m lora_kit matrix                 # the priority variants: A0, A1, A2, B2, B3, C2, C3
    python -m lora_kit matrix C2 C3 --jobs 2  # chosen variants, two at a time (one GPU each when present)
    python -m lora_kit matrix C2 --grid lora_rank=8,16,32
    python -m lora_kit matrix --seeds 3       # each variant under 3 seeds: C2, C2_seed43, C2_seed44
    python -m lora_kit matrix --params-dir outputs/next  # every variant file of a folder (lora_kit next writes one)
    python -m lora_kit matrix --backend slurm --partition gpu --gpus-per-job 2 --time 720
    python -m lora_kit matrix --status        # the table of statuses, from the run folders

Each variant runs notebooks/train.ipynb with its params file and writes the executed notebook into
its run folder. Status always comes from the run folders, so an interrupted matrix is resumed by
running the same command again: finished runs are skipped, interrupted ones resume from their last
checkpoint (the Trainer's own resume), failed ones are retried. A finished run whose parameters or data
differ from what the command now asks is refused before anything runs (`--set overwrite=true` runs it again).

On a Slurm cluster (`--backend slurm`, through submitit) each variant is one job that runs the same
notebook: A0 as a job of its own, the others as one job array that starts after A0's job ends. A
submitted variant's run folder says `queued` until its job starts.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import STUDY_PRIORITY, STUDY_VARIANTS, parse_set
from .errors import ConfigError
from . import paths
from .paths import runs_dir
from .rundir import RunFolder, write_json_atomic

FINISHED = ("completed", "stopped_early")
BASELINE = "A0"


@dataclass
class Job:
    """One variant to run: its name, its params file, extra parameters (from --set or --grid) and the -f files
    merged before its params file (a setup: model, data), in order."""

    variant: str
    params_file: Path
    overrides: dict = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    @property
    def params_files(self) -> list[Path]:
        """Every params file of the job in merge order: the -f files, then the variant's own."""
        return [*self.files, self.params_file]


def variant_file(name: str, params_dir: Path | None = None) -> Path:
    """params_dir/<name>.yaml; params_dir None: the params/ of the study folder in use (`paths.params_dir`)."""
    params_dir = paths.params_dir() if params_dir is None else Path(params_dir)
    path = params_dir / f"{name}.yaml"
    if not path.is_file():
        known = folder_variants(params_dir) if params_dir.is_dir() else []
        from .config import _display

        raise ConfigError(f"variant {name!r}: no {_display(path)}; known variants: {', '.join(known) or '(none)'}. "
                          f"Fix: a known name, or write {_display(path)} (e.g. a copy of another variant's file).")
    return path


def folder_variants(params_dir: Path) -> list[str]:
    """The variants of a params folder: its *.yaml files' names (but defaults), sorted; ConfigError if none."""
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        raise ConfigError(f"--params-dir {params_dir}: no such folder. Fix: pass the folder `python -m lora_kit next` "
                          "wrote (default outputs/next), or one holding <variant>.yaml files")
    names = sorted(p.stem for p in params_dir.glob("*.yaml") if p.stem != "defaults")
    if not names:
        raise ConfigError(f"--params-dir {params_dir}: no <variant>.yaml file in it. Fix: run `python -m lora_kit "
                          "next` to write the follow-up study there, or pass another folder")
    return names


def plan_jobs(variants: list[str], *, all_variants: bool = False, grid: list[str] = (),
              overrides: dict | None = None, params_dir: Path | None = None, seeds: int = 1,
              files: list[str | Path] = ()) -> list[Job]:
    """The jobs in run order: A0 first (the others' guardrail baseline), then the rest as given.

    `params_dir`: where the variant files are (matrix --params-dir); outside params/ the default is every variant
    file of that folder. The defaults and profiles always come from params/.

    `files` (matrix -f): params files merged before every variant's own file, in order, as `train -f a -f b`
    merges them (a setup file with the model and data, say).

    `seeds` > 1 replicates every trained job under that many seeds: the seed of the run (its `seed`
    override, else RunConfig's default) and the next ones, named <variant>_seed<seed> beyond the first,
    which keeps its name. A0 only evaluates, and its evaluation does not depend on the seed, so it runs once.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected a number of seeds >= 1. Fix: e.g. --seeds 3.")
    study_params = paths.params_dir()
    params_dir = study_params if params_dir is None else Path(params_dir)
    if all_variants and params_dir != study_params:
        raise ConfigError(f"--all names the study's variants in params/; with --params-dir {params_dir} every file of "
                          "that folder runs already. Fix: drop --all (or name the variants to run)")
    default = list(STUDY_PRIORITY) if params_dir == study_params else folder_variants(params_dir)
    names = list(STUDY_VARIANTS) if all_variants else (variants or default)
    if BASELINE not in names and (params_dir / f"{BASELINE}.yaml").exists():
        names = [BASELINE, *names]
    names = sorted(dict.fromkeys(names), key=lambda n: n != BASELINE)  # stable: A0 first, others in order
    extra = tuple(Path(f) for f in files)
    jobs = [Job(n, variant_file(n, params_dir), dict(overrides or {}), extra) for n in names]
    if grid:
        axes = []
        for item in grid:
            key, _, values = item.partition("=")
            if not key or not values:
                raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. lora_rank=8,16,32.")
            axes.append([(key, parse_set([f"{key}={v}"])[key]) for v in values.split(",")])
        base = [j for j in jobs if j.variant != BASELINE]
        jobs = [j for j in jobs if j.variant == BASELINE]
        for job in base:
            for combo in itertools.product(*axes):
                name = job.variant + "".join(f"_{k}{v}" for k, v in combo)
                jobs.append(replace(job, variant=name, overrides={**job.overrides, **dict(combo), "variant": name}))
    return [replicate for job in jobs for replicate in _replicates(job, seeds)]


def _replicates(job: Job, seeds: int) -> list[Job]:
    """The job under `seeds` seeds (see plan_jobs); A0 once."""
    if seeds == 1 or job.variant == BASELINE:
        return [job]
    from .config import RunConfig

    first = job.overrides.get("seed", RunConfig.seed)
    return [job] + [replace(job, variant=f"{job.variant}_seed{first + k}",
                            overrides={**job.overrides, "seed": first + k, "variant": f"{job.variant}_seed{first + k}"})
                    for k in range(1, seeds)]


def check_jobs(jobs: list[Job], runs_root: Path) -> None:
    """Every job's parameters checked as its train.ipynb will load them (files, overrides, the model folder, the
    data files), before anything runs or is submitted; one ConfigError naming each job that cannot run.

    Also refused: a job whose variant (the run folder it writes) is not its name (the matrix tracks the folder of
    that name), and a follow-up job (derived_from: W) whose parameters differ from W's run (W's params.json in
    runs_root) in anything but what its own file sets: the follow-up compares with W, so all else must equal."""
    from .config import load_config

    problems = []
    for job in jobs:
        try:
            cfg = load_config(job.params_files, {**job.overrides, "output_dir": str(runs_root)},
                              overrides_source="--set")
        except ConfigError as err:
            problems.append(f"{job.variant} ({', '.join(str(f) for f in job.params_files)}):\n" +
                            "\n".join(f"    {line}" for line in getattr(err, "problems", [str(err)])))
            continue
        if cfg.variant_name != job.variant:
            problems.append(f"{job.variant} ({job.params_file}):\n    variant = {cfg.variant_name!r}: the run would "
                            f"go to {runs_root / cfg.variant_name}, not {runs_root / job.variant}, where the matrix "
                            f"looks. Fix: set variant: {job.variant} in {job.params_file} (or rename the file)")
        elif cfg.derived_from is not None:
            problems += _derived_problems(job, cfg, runs_root)
    if problems:
        raise ConfigError(f"{len(problems)} of {len(jobs)} matrix jobs cannot run; nothing was started:\n  "
                          + "\n  ".join(problems))


def _derived_problems(job: Job, cfg, runs_root: Path) -> list[str]:
    """What keeps a follow-up job from comparing with the run it varies (see check_jobs); [] when nothing."""
    import yaml

    from .config import RESUME_SAFE, RunConfig

    origin = RunFolder(runs_root / cfg.derived_from).params()
    head = f"{job.variant} ({job.params_file}): derived_from {cfg.derived_from}"
    if not origin or not isinstance(origin.get("config"), dict):
        return [f"{head}, but {runs_root / cfg.derived_from} holds no params.json: the follow-up compares with that "
                f"run. Fix: run it in the study's runs folder (--runs-root), or set derived_from: null in its file"]
    own = yaml.safe_load(Path(job.params_file).read_text(encoding="utf-8")) or {}
    defaults, before = RunConfig().to_dict(), origin["config"]
    exempt = {"variant", "derived_from", "seed", *RESUME_SAFE, *own}  # seed: replicates (--seeds) compare by mean
    changes = [(k, before.get(k, defaults[k]), v) for k, v in cfg.to_dict().items()
               if k not in exempt and before.get(k, defaults[k]) != v]
    if not changes:
        return []
    return [f"{head}, which ran with other values of parameters this file does not set "
            f"({cfg.derived_from} -> this job): " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
            + f". Fix: give the matrix the study's -f files and --set values; to vary one on purpose, set it in "
            f"{job.params_file}"]


def run_status(runs_root: Path, variant: str) -> str:
    """'completed', 'stopped_early', 'failed', 'running' (live), 'stale' (dead process) or 'missing'."""
    return RunFolder(runs_root / variant).status() or "missing"


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run_job(job: Job, runs_root: Path, *, slot: int = 0, pin_gpu: bool = True, parallel: int = 1, log=print) -> str:
    """Execute train.ipynb for one job with papermill in its own process; returns the final status.

    pin_gpu: run on GPU `slot` of this machine; False leaves the GPUs as they are (a Slurm job's own).
    parallel: how many jobs share this machine; on a CPU each then gets its share of the cores as torch
    threads (OpenMP threads spin-wait when oversubscribed: measured 5-10x slower, DESIGN.md "Threads").
    """
    folder = runs_root / job.variant
    folder.mkdir(parents=True, exist_ok=True)
    notebook = paths.notebooks_dir() / "train.ipynb"  # the study folder's, else the kit's own
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(folder / "train.ipynb"),
           "-p", "output_dir", str(runs_root), "--cwd", str(paths.notebook_cwd(notebook)), "--no-progress-bar",
           "-k", "lora_kit"]
    files = [str(f) for f in job.params_files]
    injected = {**job.overrides, "params_file": files if len(files) > 1 else files[0]}
    cmd += ["-y", json.dumps(injected)]  # lists and strings need YAML, not -p (papermill's -p only converts numbers)
    env = paths.child_env()  # the kernel writes to this process's outputs folder (the toy's cache among them)
    gpus = _gpus() if pin_gpu else 0
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    elif parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    t0 = time.time()
    log(f"[{job.variant}] started" + (f" on GPU {slot % gpus}" if gpus else ""))
    with open(folder / "papermill.log", "w", encoding="utf-8") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    status = run_status(runs_root, job.variant)
    if proc.returncode != 0 and status not in ("failed",):
        # the notebook died before train() could record anything (e.g. a config error): record it here
        previous = RunFolder(folder).summary() or {}
        write_json_atomic(folder / "summary.json", {
            **previous, "variant": job.variant, "status": "failed",
            "error": f"papermill exited with {proc.returncode}; see {folder / 'papermill.log'}"})
        status = "failed"
    log(f"[{job.variant}] {status} in {time.time() - t0:.0f}s (log: {folder / 'papermill.log'})")
    return status


def finished_run_differs(job: Job, runs_root: Path) -> tuple[bool, list[tuple]]:
    """(overwrite, changes) for a job whose run folder holds a finished run: whether the job asks to run it again
    (overwrite: true) and what its parameters and inputs would change against the run's params.json (as a resume
    compares them, inputs.resume_changes); (False, []) when the run recorded no params.json."""
    from .config import load_config
    from .inputs import data_files, resume_changes
    from .toy import resolve_model

    params = RunFolder(runs_root / job.variant).params()
    if params is None:
        return False, []
    # what train.ipynb will resolve: the params file, then the job's overrides and the runs root as output_dir
    cfg = load_config(job.params_files, {**job.overrides, "output_dir": str(runs_root)})
    if cfg.overwrite:
        return True, []
    return False, resume_changes(params, cfg, resolve_model(cfg.model, weights=False), data_files(cfg))


def unfinished(jobs: list[Job], runs_root: Path, log=print) -> tuple[dict[str, str], list[Job]]:
    """({variant: status}, the jobs to run): finished (unless the job sets overwrite: true), running and queued runs
    are left out. A finished run whose parameters or inputs differ from its job's is refused (ConfigError, before
    anything runs): skipping it would report the old run's results as the ones asked for."""
    statuses = {j.variant: run_status(runs_root, j.variant) for j in jobs}
    todo, differ = [], []
    for job in jobs:
        s = statuses[job.variant]
        overwrite, changes = finished_run_differs(job, runs_root) if s in FINISHED else (False, [])
        if overwrite:
            todo.append(job)
            log(f"[{job.variant}] {s}: overwrite: true, will run again")
        elif changes:
            differ.append(f"  - {job.variant}: " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
        elif s in FINISHED:
            log(f"[{job.variant}] {s}: skipped")
        elif s == "running":
            log(f"[{job.variant}] running in another process: skipped")
        elif s == "queued":
            job_id = (RunFolder(runs_root / job.variant).summary() or {}).get("job_id")
            log(f"[{job.variant}] queued as Slurm job {job_id}: skipped (if that job is gone, delete "
                f"{runs_root / job.variant / 'summary.json'} to submit it again)")
        else:
            todo.append(job)
            resume = RunFolder(runs_root / job.variant).last_checkpoint()
            log(f"[{job.variant}] {s}: " + (f"will resume from {resume.name}" if resume else "will run"))
    if differ:
        raise ConfigError(
            f"{len(differ)} finished run{'s' if len(differ) > 1 else ''} in {runs_root} would be skipped although "
            "this matrix asks for other parameters or inputs (the run's params.json -> this job):\n"
            + "\n".join(differ) + "\nFix: --set overwrite=true to run them again with the new values; or give the "
            "new runs their own names (--grid, --seeds) or their own --runs-root; or leave the changes out to keep "
            "the finished runs.")
    return statuses, todo


def run_matrix(jobs: list[Job], *, runs_root: Path | None = None, n_jobs: int = 1, dry_run: bool = False,
               log=print) -> dict[str, str]:
    """Run the jobs that are not finished, A0 first and alone; returns {variant: final status}."""
    runs_root = runs_dir(None) if runs_root is None else Path(runs_root)
    statuses, todo = unfinished(jobs, runs_root, log)
    if dry_run:
        return statuses
    first = [j for j in todo if j.variant == BASELINE]
    rest = [j for j in todo if j.variant != BASELINE]
    for job in first:
        statuses[job.variant] = run_job(job, runs_root, log=log)
    with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        results = pool.map(lambda ij: run_job(ij[1], runs_root, slot=ij[0], parallel=min(n_jobs, len(rest)), log=log),
                           enumerate(rest))
        for job, status in zip(rest, results):
            statuses[job.variant] = status
    return statuses


# ---------------------------------------------------------------- Slurm, through submitit

def slurm_executor(folder: Path, *, partition: str | None = None, gpus_per_job: int = 1, time_min: int = 720,
                   array_parallelism: int | None = None, cluster: str = "slurm"):
    """A submitit executor for the matrix's jobs; `cluster="local"` runs them here (submitit's LocalExecutor)."""
    import submitit

    for name, value, example in (("--gpus-per-job", gpus_per_job, 1), ("--time", time_min, 720),
                                 ("--array-parallelism", array_parallelism, 4)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value}: expected a number >= 1. Fix: e.g. {name} {example}.")
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as err:  # no srun / sbatch here
        raise ConfigError(f"--backend slurm: no Slurm on this machine ({err}). Fix: run the matrix on the "
                          "cluster's login node, or use --backend local (the default) here.") from None
    executor.update_parameters(name="lora_kit", timeout_min=time_min, gpus_per_node=gpus_per_job, tasks_per_node=1,
                               slurm_partition=partition, slurm_array_parallelism=array_parallelism)
    return executor


def run_cluster_job(job: Job, runs_root: Path) -> str:
    """What one Slurm job runs: the variant's notebook on the GPUs Slurm gave the job."""
    return run_job(job, runs_root, pin_gpu=False)


def submit_matrix(jobs: list[Job], executor, *, runs_root: Path | None = None, gpus_per_job: int = 1,
                  log=print) -> dict:
    """Submit the unfinished jobs: A0 alone first, the rest as one job array after it; {variant: submitit job}.

    With several GPUs per job each variant trains data-parallel on them (nproc); A0 only evaluates and
    gets one. On Slurm the array waits for A0's job (a dependency); submitit's local executor has no
    dependencies, so there A0's job is waited for before the array is submitted.
    """
    runs_root = runs_dir(None) if runs_root is None else Path(runs_root)
    _, todo = unfinished(jobs, runs_root, log)
    first = [j for j in todo if j.variant == BASELINE]
    rest = [replace(j, overrides={**j.overrides, "nproc": gpus_per_job}) if gpus_per_job > 1 else j
            for j in todo if j.variant != BASELINE]
    submitted = {}

    def queued(variants, sjobs):  # a job takes seconds to start, so its folder says queued before it runs
        for variant, sjob in zip(variants, sjobs):
            mark_queued(runs_root / variant, sjob.job_id)
            submitted[variant] = sjob
            log(f"[{variant}] submitted as job {sjob.job_id}")

    if first:
        executor.update_parameters(gpus_per_node=1)
        queued([BASELINE], [executor.submit(run_cluster_job, first[0], runs_root)])
    if rest:
        executor.update_parameters(gpus_per_node=gpus_per_job)
        if first and executor.cluster == "slurm":
            executor.update_parameters(
                slurm_additional_parameters={"dependency": f"afterany:{submitted[BASELINE].job_id}"})
        elif first:
            submitted[BASELINE].wait()
        queued([j.variant for j in rest], executor.map_array(run_cluster_job, rest, [runs_root] * len(rest)))
    return submitted


def mark_queued(folder: Path, job_id: str) -> None:
    """Record a submitted job in its run folder (unless the job has already started writing there)."""
    run = RunFolder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if run.status() in ("running", *FINISHED):
        return
    previous = run.summary() or {}
    write_json_atomic(folder / "summary.json", {**previous, "variant": folder.name, "status": "queued",
                                                "job_id": job_id, "submitted": time.time()})


def status_table(runs_root: Path | None = None) -> str:
    """A plain-text table of every run folder: status, stop reason, steps, best checkpoint, wall time."""
    runs_root = runs_dir(None) if runs_root is None else Path(runs_root)
    folders = sorted(p for p in runs_root.glob("*") if p.is_dir())
    width = max([14, *(len(f.name) + 2 for f in folders)])  # a follow-up's A2_progressive needs more than 14
    lines = [f"{'variant':<{width}}{'status':<15}{'stop reason':<20}{'steps':>6}  {'best checkpoint':<28}{'wall':>7}"]
    for folder in folders:
        run = RunFolder(folder)
        s = run.summary() or {}
        best = (s.get("best") or {}).get("checkpoint") or "-"
        wall = (s.get("timings") or {}).get("wall_seconds")
        lines.append(f"{folder.name:<{width}}{run.status() or 'missing':<15}{s.get('stop_reason') or '-':<20}"
                     f"{s.get('steps', '-')!s:>6}  {best:<28}{(f'{wall:.0f}s' if wall else '-'):>7}")
    return "\n".join(lines)
