"""The notebooks' source, kept in the library so their parameters cannot drift from RunConfig.

`python -m lora_kit.notebooks` rewrites notebooks/*.ipynb (without outputs); a test checks that the
committed notebooks equal what this module renders.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import textwrap
import typing

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from .config import RunConfig, field_docs
from .paths import NOTEBOOKS_DIR

KERNEL = {"name": "lora_kit", "display_name": "Python (lora_kit)", "language": "python"}


def _annotation(f: dataclasses.Field) -> str:
    """Optional[...] of the field's base type, in the form papermill's --help-notebook parses."""
    hint = typing.get_type_hints(RunConfig)[f.name]
    if typing.get_origin(hint) is typing.Literal:  # a choice: its arguments are the allowed values, not types
        return "Optional[str]"
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    name = {int: "int", float: "float", str: "str", bool: "bool"}.get(base, "list")
    if typing.get_origin(base) is typing.Literal:
        name = "str"
    return f"Optional[{name}]"


_FIRST_SENTENCE = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.(?:\s|$)")


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence, whole ("e.g." and "i.e." do not end it)."""
    match = _FIRST_SENTENCE.search(doc)
    return (doc[:match.start()] if match else doc).strip().rstrip(". ")


def _papermill_safe(text: str) -> str:
    """The text without "=": papermill's parser skips a parameter line holding a second "=" (and shows nothing)."""
    for a, b in (("<=", "≤"), (">=", "≥"), ("==", "≡"), ("!=", "≠"), ("=", "＝")):
        text = text.replace(a, b)
    return text


def help_line(name: str) -> str:
    """One parameter's help as the train notebook's parameters cell shows it (and `papermill --help-notebook`):
    its whole first sentence (each RunConfig description reads on its own: tests/test_config.py) and its
    effective default (defaults.yaml, then the toy profile)."""
    sentence = _first_sentence(field_docs().get(name, ""))
    return _papermill_safe(f"{sentence} [default {effective_defaults()[name]}]")


@functools.cache
def effective_defaults() -> dict[str, str]:
    """Each parameter's value when the notebook leaves it unset, as YAML text: defaults.yaml, then the default
    profile; where the profile changes it, the value without the profile too ("20 (toy profile; 50 without)")."""
    from .config import _yaml_value, load_config

    toy = load_config([]).to_dict()
    bare = load_config([], {"profile": "none"}).to_dict()
    out = {}
    for f in dataclasses.fields(RunConfig):
        a, b = _yaml_value(toy[f.name]), _yaml_value(bare[f.name])
        out[f.name] = a if a == b or f.name == "profile" else f"{a} (toy profile; {b} without)"
    out["variant"] = "derived from llm_last/vit_last"
    return out


def parameters_cell() -> str:
    """Every RunConfig parameter as `name: Optional[type] = None  # help [default ...]`; None means 'not set
    here: from the params files, defaults.yaml and the profile'."""
    lines = ["# Parameters (papermill injects -p / -y / -f values after this cell). None = not set here: the value",
             "# comes from params/defaults.yaml -> params/profiles/<profile>.yaml -> params_file (the [default]s below).",
             "from typing import Optional",
             "",
             "params_file: Optional[str] = None  # a params/*.yaml variant file to start from, e.g. ../params/C2.yaml "
             "(a list of files with -y, merged in order)"]
    for f in dataclasses.fields(RunConfig):
        lines.append(f"{f.name}: {_annotation(f)} = None  # {help_line(f.name)}")
    return "\n".join(lines)


def train_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(textwrap.dedent("""\
            # Train one variant of the study

            LoRA on the last `llm_last` decoder layers and the last `vit_last` vision blocks, per-tower learning
            rates, guardrail evaluation every `eval_steps`, early stopping and the constrained best checkpoint.
            Run it with papermill, e.g. `papermill train.ipynb out.ipynb -p llm_last 2 -p vit_last 4` or
            `papermill notebooks/train.ipynb out.ipynb -f params/C2.yaml`; or open it and run all cells.
            Everything lands in `outputs/runs/<variant>/`. With `nproc` above 1 the variant trains data-parallel on
            that many GPUs: this notebook starts `python -m lora_kit train` under torchrun and then reads the run
            folder.""")),
        new_code_cell("_names_before_parameters = set(globals())  # what papermill injects is checked against these"),
        new_code_cell(parameters_cell(), metadata={"tags": ["parameters"]}),
        new_markdown_cell("Resolve the parameters: defaults, the toy profile, the variant file, then the values "
                          "set above. Any problem stops here, before a model is loaded."),
        new_code_cell(textwrap.dedent("""\
            from lora_kit.config import RunConfig, load_config
            from lora_kit.views import notebook_overrides, show_plan, show_run

            overrides = notebook_overrides(globals(), RunConfig, before=_names_before_parameters)
            files = params_file if isinstance(params_file, list) else [params_file] if params_file else []
            cfg = load_config(files, overrides, overrides_source="notebook parameters")
            print(f"variant {cfg.variant_name}: llm_last={cfg.llm_last}, vit_last={cfg.vit_last}, model={cfg.model}")""")),
        new_markdown_cell("## The modules that get LoRA"),
        new_code_cell("show_plan(cfg)"),
        new_markdown_cell("## Training with guardrails"),
        new_code_cell(textwrap.dedent("""\
            from lora_kit.distributed import launch
            from lora_kit.train import train

            run_dir = train(cfg) if cfg.nproc == 1 else launch(cfg)""")),
        new_markdown_cell("## Curves, guardrails against their thresholds, and the outcome"),
        new_code_cell("show_run(run_dir)"),
    ]
    return _finish(cells)


def summary_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(textwrap.dedent("""\
            # The study: frontier, heatmaps, curves and hypothesis verdicts

            Reads every run folder (`outputs/runs/<variant>/`) into one table and answers the study's question:
            how many LoRA-instrumented layers, per tower, buy task fit before the model loses its general ability?
            Run it after the variants, e.g. `papermill notebooks/summary.ipynb out.ipynb`, or open it and run all
            cells. The table and figures are saved under `outputs/summary/` by the last cell.""")),
        new_code_cell(textwrap.dedent("""\
            # Parameters (papermill injects -p values after this cell).
            from typing import Optional

            runs_root: Optional[str] = None  # run folders (default outputs/runs)
            out_dir: Optional[str] = None  # where the table and figures go (default outputs/summary)
            setup: Optional[str] = None  # setup id (study.csv's setup column); None: the one with most finished runs"""),
            metadata={"tags": ["parameters"]}),
        new_markdown_cell(textwrap.dedent("""\
            ## One row per run of one setup

            Runs are compared only within one setup: the same model, data files, benchmark, evaluation settings
            and profile (a run on other data would sit on the same frontier and sway the verdicts). Each run's
            guardrail metrics at its best checkpoint: the lowest eval loss among checkpoints that kept
            irrelevant pass and hallucination within their margins of the baseline. A run with no such checkpoint
            is *infeasible* and shows its last evaluation. Rates are given with their Wilson 95% interval and n.""")),
        new_code_cell(textwrap.dedent("""\
            import matplotlib.pyplot as plt

            from lora_kit import frontier
            from lora_kit.paths import runs_dir

            df = frontier.collect_runs(runs_dir(runs_root))
            study, left_out = frontier.one_setup(df, setup)
            print(frontier.setup_note(study, left_out))
            frontier.study_table(study)""")),
        new_markdown_cell("## Runs left out of the comparison, and why\n\n"
                          "Runs of other setups (what differs from this one) and runs that did not finish."),
        new_code_cell("left_out"),
        new_markdown_cell(textwrap.dedent("""\
            ## The frontier: task fit against generalization

            Eval loss (task fit) against the irrelevant-image pass rate and against the OOD hallucination rate, in
            each probe group the guardrails watch (the benchmark asked under the general prompt and under the task
            prompt). Orange points connected by the line are the Pareto front of the feasible runs: no other run is
            at least as good on both axes and better on one. Hollow squares had no feasible checkpoint.""")),
        new_code_cell(textwrap.dedent("""\
            probes = frontier.study_probes(study)
            fig, axes = plt.subplots(2, len(probes), figsize=(7 * len(probes), 10), squeeze=False)
            for i, probe in enumerate(probes):
                frontier.plot_frontier(study, "best_eval_loss", f"irrelevant_pass@{probe}", ax=axes[0][i])
                frontier.plot_frontier(study, "best_eval_loss", f"hallucination@{probe}", ax=axes[1][i])
            fig.tight_layout()""")),
        new_markdown_cell("## Each metric over llm_last × vit_last\n\n"
                          "The study grid at its common settings (LR-grid and restart runs are left out here)."),
        new_code_cell("frontier.plot_heatmaps(study);"),
        new_markdown_cell("## Training and guardrail curves of every run\n\n"
                          "X marks where a guardrail stopped a run, a star its best checkpoint."),
        new_code_cell("frontier.plot_curves(study);"),
        new_markdown_cell("## Stage-3 continue vs stage-2 restart\n\n"
                          "Shown when both a variant and its `_restart` run exist (e.g. C2 and C2_restart), taken "
                          "from every run: the restart starts from the stage-2 checkpoint, another setup."),
        new_code_cell(textwrap.dedent("""\
            if frontier.plot_restart(df) is None:
                print("no restart pair yet: run a variant and its _restart variant (C2, C2_restart)")""")),
        new_markdown_cell(textwrap.dedent("""\
            ## Hypotheses

            Each verdict is computed from the runs above. Two rates differ only when their 95% intervals do not
            overlap, two losses only when they differ by more than 2%; otherwise the data are not enough, and the
            evidence says which runs would settle it. H3 is not tested until a learning-rate sweep has run: the
            follow-up study (`python -m lora_kit next`, then `python -m lora_kit matrix --params-dir outputs/next`).""")),
        new_code_cell(textwrap.dedent("""\
            import pandas as pd

            pd.set_option("display.max_colwidth", None)
            pd.DataFrame(frontier.hypothesis_verdicts(study)).set_index("hypothesis")""")),
        new_markdown_cell(textwrap.dedent("""\
            ## Save the table, the figures and the verdicts

            frontier.csv holds the runs on the Pareto front: `python -m lora_kit next` writes the follow-up sweep
            around its trained runs from it.""")),
        new_code_cell(textwrap.dedent("""\
            for name, path in frontier.write_summary(runs_root, out_dir, setup, log=lambda *_: None).items():
                print(f"{name}: {path}")""")),
    ]
    return _finish(cells)


def spotcheck_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(textwrap.dedent("""\
            # Caption spot-check: does free-form captioning still make sense?

            The fourth guardrail needs a person's eye: free-form caption sanity visibly degrading twice in a row.
            Here each checkpoint of a run captions the same images (the 5 fixed OOD images of `spotcheck_file` by
            default), side by side with the baseline (the model before training), and you judge each caption.
            Every verdict is appended to `spotcheck.jsonl` in the run folder as you click, so a kernel restart
            loses nothing; the caption-sanity guardrail and the summary table use these verdicts beside the
            automatic proxy. Open this notebook in JupyterLab and run all cells.""")),
        new_code_cell(textwrap.dedent("""\
            # Parameters (papermill injects -p values after this cell).
            from typing import Optional

            runs: Optional[str] = None  # variant(s) or run folder(s), comma-separated, e.g. C2 or A1,C2 (None: the latest finished run)
            runs_root: Optional[str] = None  # the run folders' parent (default outputs/runs)
            images: Optional[str] = None  # None: the run's spotcheck_file; bench: the OOD benchmark rows; or a folder / chat JSONL
            prompt: str = "请用自然语言描述一下这些图片"  # the caption request put after the image
            steps: Optional[str] = None  # checkpoints to show, comma-separated steps, e.g. 25,50 (None: all)
            max_new_tokens: Optional[int] = None  # caption length limit (None: the run's max_new_tokens)
            who: Optional[str] = None  # your name in spotcheck.jsonl (None: the login name)"""),
            metadata={"tags": ["parameters"]}),
        new_markdown_cell("## Captions: generated once per checkpoint, cached in the run folder "
                          "(`spotcheck_captions.jsonl`)"),
        new_code_cell(textwrap.dedent("""\
            from lora_kit.spotcheck import SpotCheck, SpotCheckView

            check = SpotCheck.open(runs, runs_root=runs_root, images=images, prompt=prompt, steps=steps,
                                   max_new_tokens=max_new_tokens, who=who)
            print(f"{check.generate_missing()} caption(s) generated; {len(check.images)} images x "
                  f"{len(check.columns)} columns")""")),
        new_markdown_cell(textwrap.dedent("""\
            ## Judge

            One row per image, one column per checkpoint, the baseline first. Click **ok**, **degraded** (worse
            than the baseline's caption), **hallucinated** (names something that is not there) or **blind**
            (ignores the image); a note is saved with the verdict (Enter saves a note on a judged caption).
            Keyboard: click the key box, then `1`-`4` judge the framed caption and move on, `j` / `k` move,
            `n` jumps to the next unjudged caption.""")),
        new_code_cell("SpotCheckView(check)"),
        new_markdown_cell(textwrap.dedent("""\
            ## What the guardrails make of the verdicts

            Per evaluation: the automatic proxy (chrF against the baseline's captions, hallucinated and blind
            captions), your verdict (any caption not ok = degraded) and whether the caption-sanity trigger
            holds there with the verdicts given so far. Re-run this cell after judging.""")),
        new_code_cell("check.guardrail_table()"),
    ]
    return _finish(cells)


def _finish(cells) -> nbformat.NotebookNode:
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"  # stable ids: the rendered file is deterministic
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    return nb


NOTEBOOKS = {"train.ipynb": train_notebook, "summary.ipynb": summary_notebook,
             "spotcheck.ipynb": spotcheck_notebook}


def render(name: str) -> str:
    return json.dumps(NOTEBOOKS[name](), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    for name in NOTEBOOKS:
        (NOTEBOOKS_DIR / name).write_text(render(name), encoding="utf-8")
        print(f"wrote notebooks/{name}")


if __name__ == "__main__":
    main()
