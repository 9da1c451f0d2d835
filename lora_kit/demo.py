"""`make demo`: the study on the embedded toy, end to end, reusing whatever is already built.

1. build the toy world and the pretrained toy base (cached under outputs/toy/);
2. run the priority variants (A0, A1, A2, B2, B3, C2, C3) with the matrix runner (finished runs are skipped);
3. execute summary.ipynb, which writes the table and figures under outputs/summary/.
"""
from __future__ import annotations

import subprocess
import sys
import time

from .config import STUDY_PRIORITY
from .paths import child_env, notebook_cwd, notebooks_dir, outputs_dir, runs_dir


def run_demo(variants: tuple[str, ...] = STUDY_PRIORITY, jobs: int = 1) -> int:
    from .matrix import plan_jobs, run_matrix, status_table
    from .toy import build_toy

    t0 = time.time()
    print("== 1/3 toy world and base ==", flush=True)
    report = build_toy(progress=True)
    for probe, m in report["stage3"]["metrics"]["probes"].items():
        print(f"toy base, {probe} prompt: irrelevant pass {m['irrelevant_pass']['rate']:.2f}, hallucination "
              f"{m['hallucination']['rate']:.2f}, object accuracy {m['object_accuracy']['rate']:.2f}", flush=True)
    print(f"toy base ready ({time.time() - t0:.0f}s so far)", flush=True)

    print(f"== 2/3 the study: {' '.join(variants)} ==", flush=True)
    statuses = run_matrix(plan_jobs(list(variants)), n_jobs=jobs)
    print(status_table(), flush=True)

    print("== 3/3 summary.ipynb ==", flush=True)
    out = outputs_dir() / "summary"
    out.mkdir(parents=True, exist_ok=True)
    notebook = notebooks_dir() / "summary.ipynb"  # the study folder's, else the kit's own
    proc = subprocess.run([sys.executable, "-m", "papermill", str(notebook),
                           str(out / "summary.ipynb"), "-p", "runs_root", str(runs_dir(None)),
                           "-p", "out_dir", str(out), "-k", "lora_kit", "--cwd", str(notebook_cwd(notebook))],
                          env=child_env())
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min; summary in {out}", flush=True)
    failed = [v for v, s in statuses.items() if s not in ("completed", "stopped_early")]
    if failed:
        print(f"runs that did not finish: {', '.join(failed)} (see their papermill.log)")
    return proc.returncode or (1 if failed else 0)
