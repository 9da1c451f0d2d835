"""The caption spot-check: a person reads each checkpoint's free-form captions of fixed images and judges them.

    check = SpotCheck.open("C2")      # the run's 5 fixed OOD images; baseline first, then every checkpoint
    check.generate_missing()          # captions generated once, cached in the run folder
    SpotCheckView(check)              # ipywidgets: verdict buttons, notes, keys, progress (spotcheck.ipynb)

The plan's fourth guardrail needs a person's eye ("free-form caption sanity visibly degrades twice in
a row"). Each verdict (ok / degraded / hallucinated / blind) is appended to <run>/spotcheck.jsonl the
moment it is given, so nothing is lost when the kernel restarts; guardrails.apply_verdicts and the
summary table (frontier.collect_runs) read that file, beside the automatic proxy.

SpotCheck is plain Python state (cells, cursor, files); SpotCheckView only draws it and forwards
clicks and key presses, so every piece of logic is tested without a browser.

Files in the run folder:
- spotcheck.jsonl: one verdict per line {checkpoint, step, image, verdict, note, who, when, variant,
  prompt, caption}; the latest line of a (checkpoint, image) is its verdict.
- spotcheck_captions.jsonl: the caption cache, one line per (checkpoint, image, prompt,
  max_new_tokens) generated.
"""
from __future__ import annotations

import getpass
import html
import io
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

from .data import IMAGE_MARK, Sample, read_jsonl
from .errors import ConfigError, DataError
from .guardrails import VERDICTS, active_triggers, apply_verdicts
from .paths import runs_dir
from .rundir import append_jsonl, read_jsonl_records

DEFAULT_PROMPT = "请用自然语言描述一下这些图片"
VERDICT_FILE = "spotcheck.jsonl"
CAPTION_FILE = "spotcheck_captions.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KEYS = {"1": "ok", "2": "degraded", "3": "hallucinated", "4": "blind"}
KEY_HELP = "1 ok · 2 degraded · 3 hallucinated · 4 blind · j / k next / previous · n next unjudged"


# ---------------------------------------------------------------- what is judged

@dataclass(frozen=True)
class Run:
    """What the spot-check needs from a run folder's params.json."""

    path: Path
    variant: str
    model_path: str
    init_adapter: str | None
    adapter: str  # how train.py attached LoRA (inputs.adapter_how): "new", "continued", "merged init_adapter, new LoRA", ...
    config: dict = field(compare=False)  # the resolved RunConfig as a dict

    @classmethod
    def read(cls, path: Path) -> Run:
        params_file = Path(path) / "params.json"
        try:
            params = json.loads(params_file.read_text(encoding="utf-8"))
            config = params["config"]
            return cls(Path(path), params.get("variant") or Path(path).name, params["model_path"],
                       config.get("init_adapter"), (params.get("targets") or {}).get("adapter", "new"), config)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{params_file}: cannot read the run's parameters ({type(err).__name__}: {err}); "
                            "the spot-check needs a run folder written by train.py (python -m lora_kit train)") from None

    def data_file(self, name: str) -> Path:
        """A resolved *_file of the run (params.json data_files), e.g. its spotcheck_file."""
        params = json.loads((self.path / "params.json").read_text(encoding="utf-8"))
        value = (params.get("data_files") or {}).get(name)
        if not value:
            raise DataError(f"{self.path / 'params.json'} records no {name}; pass images= a folder or a chat JSONL file")
        return Path(value)


@dataclass(frozen=True)
class Column:
    """One model state whose captions are judged: a run's start model (step 0, the baseline) or a checkpoint."""

    run: Run
    step: int
    path: Path | None  # the checkpoint folder; None = the run's start model

    @property
    def checkpoint(self) -> str:
        """The name spotcheck.jsonl and the guardrails use (checkpoint-0 = the baseline, as at step 0)."""
        return f"checkpoint-{self.step}"

    def label(self, several_runs: bool) -> str:
        if self.path is None:
            return "baseline" + (f" ({self.run.variant})" if several_runs else "")
        return f"{self.run.variant} · {self.checkpoint}" if several_runs else self.checkpoint


@dataclass(frozen=True)
class SpotImage:
    """One image (or one row's images) with the prompt conversation its captions answer."""

    key: str  # how spotcheck.jsonl names it: the resolved image path
    sample: Sample


@dataclass
class Cell:
    """One caption of one image by one column, and its verdict (None = not judged yet)."""

    column: Column
    image: SpotImage
    caption: str | None = None
    verdict: str | None = None
    note: str = ""
    who: str | None = None
    when: str | None = None


# ---------------------------------------------------------------- the state

class SpotCheck:
    """The spot-check's state: cells (image-major, baseline first), the cursor, and the run files behind them."""

    def __init__(self, columns: list[Column], images: list[SpotImage], *, prompt: str = DEFAULT_PROMPT,
                 max_new_tokens: int, who: str | None = None):
        if not columns or not images:
            raise ConfigError(f"a spot-check needs at least one column and one image, got {len(columns)} and "
                              f"{len(images)}")
        self.columns, self.images, self.prompt = columns, images, prompt
        self.max_new_tokens = max_new_tokens
        self.who = who or _user()
        self.runs = list(dict.fromkeys(c.run for c in columns))
        self.cells = [Cell(c, im) for im in images for c in columns]  # one image's columns side by side
        self.cursor = 0
        self.load()

    @classmethod
    def open(cls, runs: str | list[str] | None = None, *, runs_root: str | None = None, images: str | None = None,
             prompt: str = DEFAULT_PROMPT, steps: str | list[int] | None = None, max_new_tokens: int | None = None,
             who: str | None = None, log=print) -> SpotCheck:
        """The spot-check of one or several runs.

        runs: variant names under runs_root (default outputs/runs) or run folder paths, a list or one
          comma-separated string; None = the most recently finished run (said in the log).
        images: None = the first run's spotcheck_file (the 5 fixed OOD images); "bench" = the OOD rows
          of its bench_file; or a folder of images or a chat JSONL file.
        prompt: the user text of every caption request (one <image> per image goes before it).
        steps: the checkpoints to show (list or comma-separated string); None = all. The baseline
          (the run's start model) is always shown first, once per distinct start model.
        max_new_tokens: the caption length limit; None = the first run's max_new_tokens.
        who: the name written with each verdict; None = the login name.
        """
        folders = _run_folders(runs, runs_root, log)
        run_list = [Run.read(f) for f in folders]
        wanted = _int_list(steps, "steps")
        columns, starts = [], set()
        for run in run_list:  # every baseline first, one per start model
            if (run.model_path, run.init_adapter) not in starts:
                starts.add((run.model_path, run.init_adapter))
                columns.append(Column(run, 0, None))
        for run in run_list:
            columns += [Column(run, step, path) for step, path in _checkpoints(run.path)
                        if wanted is None or step in wanted]
        if wanted is not None:
            shown = {c.step for c in columns if c.path is not None}
            if set(wanted) - shown:
                raise ConfigError(f"steps = {sorted(wanted)}: no checkpoint folder for step(s) "
                                  f"{sorted(set(wanted) - shown)} in {', '.join(str(f) for f in folders)}. Fix: pick "
                                  f"from {sorted({s for r in run_list for s, _ in _checkpoints(r.path)})}, or None for all")
        if not isinstance(prompt, str) or not prompt.strip() or IMAGE_MARK in prompt:
            raise ConfigError(f"prompt = {prompt!r}: expected the user text of the caption request without "
                              f"{IMAGE_MARK} (one is put before it for each image), e.g. {DEFAULT_PROMPT!r}")
        tokens = max_new_tokens if max_new_tokens is not None else int(run_list[0].config.get("max_new_tokens", 64))
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ConfigError(f"max_new_tokens = {max_new_tokens!r}: expected a positive integer, e.g. 64")
        return cls(columns, read_images(run_list[0], images, prompt), prompt=prompt, max_new_tokens=tokens, who=who)

    # -- files
    def load(self) -> None:
        """(Re)read the caption cache and the verdicts of every run: what a restarted kernel sees."""
        for run in self.runs:
            captions = {(r.get("checkpoint"), r.get("image"), r.get("prompt"), r.get("max_new_tokens")): r
                        for r in read_jsonl_records(run.path / CAPTION_FILE)}
            verdicts = latest_verdicts(run.path / VERDICT_FILE)
            for cell in self.cells:
                if cell.column.run != run:
                    continue
                cached = captions.get((cell.column.checkpoint, cell.image.key, self.prompt, self.max_new_tokens))
                cell.caption = cached["caption"] if cached else None
                row = verdicts.get((cell.column.checkpoint, cell.image.key))
                cell.verdict, cell.note = (row["verdict"], row.get("note") or "") if row else (None, "")
                cell.who, cell.when = (row.get("who"), row.get("when")) if row else (None, None)

    def missing(self) -> list[Cell]:
        """Cells whose caption is not generated yet."""
        return [c for c in self.cells if c.caption is None]

    def generate_missing(self, *, device: str | None = None, log=print) -> int:
        """Generate and cache every missing caption, one model load per column; returns how many were generated."""
        from transformers import set_seed

        from .evaluate import generate

        todo: dict[Column, list[Cell]] = {}
        for cell in self.missing():
            todo.setdefault(cell.column, []).append(cell)
        for column, cells in todo.items():
            log(f"generating {len(cells)} caption(s) of {column.label(len(self.runs) > 1)} ({column.run.variant})")
            set_seed(int(column.run.config.get("seed", 0)))
            model, encoder = load_column(column, device=device)
            gens = generate(model, encoder, [c.image.sample for c in cells],
                            batch_size=int(column.run.config.get("per_device_eval_batch_size", 8)),
                            max_new_tokens=self.max_new_tokens)
            for cell, gen in zip(cells, gens):
                append_jsonl(column.run.path / CAPTION_FILE, {
                    "checkpoint": column.checkpoint, "step": column.step, "image": cell.image.key,
                    "prompt": self.prompt, "max_new_tokens": self.max_new_tokens, "caption": gen.answer,
                    "hit_limit": gen.hit_limit, "n_tokens": gen.n_tokens, "when": _now()})
                cell.caption = gen.answer
            del model
        return sum(len(cells) for cells in todo.values())

    # -- judging
    def judge(self, verdict: str, *, index: int | None = None, note: str | None = None) -> dict:
        """Give the cell (default: the one at the cursor) a verdict; the row is appended to its run's spotcheck.jsonl."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict = {verdict!r}: expected one of {', '.join(VERDICTS)}")
        cell = self.cells[self.cursor if index is None else self._index(index)]
        if note is not None:
            cell.note = note
        row = {"checkpoint": cell.column.checkpoint, "step": cell.column.step, "image": cell.image.key,
               "verdict": verdict, "note": cell.note, "who": self.who, "when": _now(),
               "variant": cell.column.run.variant, "prompt": self.prompt, "caption": cell.caption}
        append_jsonl(cell.column.run.path / VERDICT_FILE, row)  # written before the state changes: never lost
        cell.verdict, cell.who, cell.when = verdict, row["who"], row["when"]
        return row

    def set_note(self, note: str, *, index: int | None = None) -> dict | None:
        """Set a cell's note; a judged cell gets a new row (same verdict, this note), an unjudged one keeps it
        for its verdict. Returns the row written, or None."""
        cell = self.cells[self.cursor if index is None else self._index(index)]
        if note == cell.note:
            return None
        cell.note = note
        if cell.verdict is None:
            return None
        return self.judge(cell.verdict, index=self.cells.index(cell))

    def progress(self) -> tuple[int, int]:
        """(judged cells, all cells)."""
        return sum(c.verdict is not None for c in self.cells), len(self.cells)

    def move(self, delta: int) -> int:
        """Move the cursor by delta cells (clamped to the grid); returns the new cursor."""
        self.cursor = min(max(self.cursor + delta, 0), len(self.cells) - 1)
        return self.cursor

    def next_unjudged(self) -> int | None:
        """Put the cursor on the next unjudged cell after it (wrapping around); None when all are judged."""
        n = len(self.cells)
        for k in range(1, n + 1):
            i = (self.cursor + k) % n
            if self.cells[i].verdict is None:
                self.cursor = i
                return i
        return None

    def press(self, key: str) -> str:
        """One key of the keyboard box (KEY_HELP): a verdict for the cursor cell (then the next cell), or a move.

        Returns what happened, for the status line."""
        if key in KEYS:
            row = self.judge(KEYS[key])
            where = self.where()
            self.move(1)
            return f"{row['verdict']}: {where}"
        moves = {"j": 1, "l": 1, " ": 1, "k": -1, "h": -1}
        if key in moves:
            self.move(moves[key])
            return self.where()
        if key == "n":
            return self.where() if self.next_unjudged() is not None else "every caption is judged"
        return f"key {key!r} does nothing; keys: {KEY_HELP}"

    def where(self, index: int | None = None) -> str:
        """'image 2/5 (name) · checkpoint-4': the cell at index (default the cursor)."""
        i = self.cursor if index is None else index
        cell = self.cells[i]
        number = i // len(self.columns) + 1
        return (f"image {number}/{len(self.images)} ({Path(cell.image.key).name}) · "
                f"{cell.column.label(len(self.runs) > 1)}")

    def _index(self, index: int) -> int:
        if not 0 <= index < len(self.cells):
            raise IndexError(f"cell index {index}: the grid has cells 0..{len(self.cells) - 1}")
        return index

    # -- what the guardrails make of it
    def guardrail_table(self):
        """Per run and evaluation step: the automatic proxy, the person's verdict and whether the caption trigger
        holds with the verdicts given so far (guardrails.apply_verdicts), as a DataFrame."""
        import pandas as pd

        rows = []
        for run in self.runs:
            records = apply_verdicts(read_jsonl_records(run.path / "metrics.jsonl"),
                                     read_jsonl_records(run.path / VERDICT_FILE))
            cfg = SimpleNamespace(**run.config)
            for k, record in enumerate(records):
                caption = record.get("caption")
                if not isinstance(caption, dict):
                    continue
                fires = any(t.name == "caption_degraded" for t in active_triggers(records[:k + 1], {}, cfg))
                rows.append({"variant": run.variant, "step": record["step"], "proxy": _word(caption["proxy_degraded"]),
                             "person": _word(caption["manual_degraded"]),
                             "images judged": len(caption["manual_verdicts"]),
                             "disagree": bool(caption["disagree"]), "caption trigger": fires})
        return pd.DataFrame(rows, columns=["variant", "step", "proxy", "person", "images judged", "disagree",
                                           "caption trigger"])


def _word(degraded: bool | None) -> str:
    return "—" if degraded is None else "degraded" if degraded else "ok"


def latest_verdicts(path: Path) -> dict[tuple[str, str], dict]:
    """(checkpoint, image) -> its latest row of a spotcheck.jsonl; a row that is not a verdict is a DataError."""
    latest = {}
    for i, row in enumerate(read_jsonl_records(path), 1):
        checkpoint, image, verdict = row.get("checkpoint"), row.get("image"), row.get("verdict")
        if not isinstance(checkpoint, str) or not isinstance(image, str) or verdict not in VERDICTS:
            raise DataError(f"{path}: record {i} (its {i}th non-empty line) has checkpoint = {checkpoint!r}, image = "
                            f"{image!r}, verdict = {verdict!r}: expected names and one of {', '.join(VERDICTS)}. "
                            "Fix: correct or delete that line (the spot-check only appends)")
        latest[(checkpoint, image)] = row
    return latest


# ---------------------------------------------------------------- runs, checkpoints, images, models

def _run_folders(runs, runs_root, log) -> list[Path]:
    root = runs_dir(runs_root)
    available = sorted(d.name for d in root.iterdir() if (d / "params.json").is_file()) if root.is_dir() else []
    if runs is None or runs == "" or runs == []:
        finished = [d for d in (root / name for name in available) if _finished(d)]
        if not finished:
            raise ConfigError(f"runs not set and no finished run under {root}. Fix: set runs to a variant name or a "
                              "run folder, or train one first (python -m lora_kit train -f params/C2.yaml)")
        latest = max(finished, key=lambda d: (d / "summary.json").stat().st_mtime)
        log(f"runs not set: showing {latest.name}, the most recently finished run under {root} "
            f"(others: {', '.join(d.name for d in finished if d != latest) or 'none'})")
        return [latest]
    names = [r.strip() for r in runs.split(",")] if isinstance(runs, str) else [str(r) for r in runs]
    folders = []
    for name in names:
        folder = Path(name).expanduser() if ("/" in name or Path(name).is_absolute()) else root / name
        if not (folder / "params.json").is_file():
            raise ConfigError(f"runs: {name!r} is not a run folder ({folder} has no params.json). Fix: use a variant "
                              f"name under {root} ({', '.join(available) or 'none yet'}) or a run folder path")
        folders.append(folder.resolve())
    return folders


def _finished(folder: Path) -> bool:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("status") in (
            "completed", "stopped_early")
    except (OSError, ValueError, AttributeError):
        return False


def _checkpoints(run_path: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every saved checkpoint that holds an adapter or a model, in step order."""
    found = []
    for p in (run_path / "checkpoints").glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and ((p / "adapter_config.json").is_file() or (p / "config.json").is_file()):
            found.append((int(step), p))
    return sorted(found)


def _int_list(value, name: str) -> list[int] | None:
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        return [int(str(v).strip()) for v in items]
    except ValueError:
        raise ConfigError(f"{name} = {value!r}: expected step numbers, a list or a comma-separated string such as "
                          "'25,50'") from None


def read_images(run: Run, images: str | None, prompt: str) -> list[SpotImage]:
    """The images to caption, each as a conversation asking `prompt` (see SpotCheck.open for `images`)."""
    if images is None:
        samples = _samples(run.data_file("spotcheck_file"))
    elif images == "bench":
        bench = run.data_file("bench_file")
        samples = [s for s in _samples(bench) if s.extra.get("kind") == "ood"]
        if not samples:
            raise DataError(f"images = 'bench': {bench} has no rows of kind 'ood'. Fix: pick another images source")
    else:
        path = Path(images).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ConfigError(f"images = {images!r}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)} files)")
            system = _system_messages(run)
            samples = [Sample(system + [{"role": "user", "content": IMAGE_MARK}], [p], str(p)) for p in files]
        elif path.is_file() and path.suffix == ".jsonl":
            samples = _samples(path)
        else:
            raise ConfigError(f"images = {images!r}: expected None (the run's spotcheck_file: the fixed OOD images), "
                              "'bench' (the OOD rows of its bench_file), a folder of images or a chat JSONL file")
    return [SpotImage(" + ".join(str(p.resolve()) for p in s.images), _asking(s, prompt)) for s in samples]


def _samples(path: Path) -> list[Sample]:
    samples, _ = read_jsonl(path, need_assistant=False)
    samples = [s for s in samples if s.images]
    if not samples:
        raise DataError(f"{path}: no row with an image to caption")
    return samples


def _system_messages(run: Run) -> list[dict]:
    """The system turn of the run's spot-check rows (the one the model was trained with), for bare images."""
    try:
        first = _samples(run.data_file("spotcheck_file"))[0]
    except DataError:
        return []
    return [m for m in first.messages if m["role"] == "system"]


def _asking(sample: Sample, prompt: str) -> Sample:
    """The sample's system turn, then one user turn: an <image> per image and the prompt."""
    messages = [m for m in sample.messages if m["role"] == "system"]
    messages.append({"role": "user", "content": IMAGE_MARK * len(sample.images) + prompt})
    return replace(sample, messages=messages)


def load_column(column: Column, *, device: str | None = None):
    """(model, encoder) of a column: the run's start model (evaluate.start_model) plus the checkpoint's adapter."""
    import torch

    from .adapters import load_adapter
    from .data import Encoder
    from .evaluate import start_model
    from .families import folder_processor

    run = column.run
    trust = bool(run.config.get("trust_remote_code", False))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if column.path is not None and not (column.path / "adapter_config.json").is_file():
        model = start_model(column.path, dtype=dtype, trust_remote_code=trust)
    else:
        model = start_model(run.model_path, run.init_adapter, dtype=dtype, trust_remote_code=trust,
                            continued=column.path is not None and run.adapter == "continued")
        if column.path is not None:
            model = load_adapter(model, column.path, what=f"checkpoint of {column.run.path.name}")
    family, processor = folder_processor(run.model_path, run.model_path, trust)
    # the run's max_length and image size (min_pixels, max_pixels): its captions see what training saw
    return model.to(device).eval(), Encoder.for_run(processor, run.config, family)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the widgets

STYLES = {"ok": "success", "degraded": "warning", "hallucinated": "danger", "blind": "info"}


@dataclass
class CellView:
    """The widgets of one cell: caption text, one button per verdict, a note."""

    box: object
    caption: object
    buttons: dict = field(default_factory=dict)
    note: object = None


class SpotCheckView:
    """ipywidgets over a SpotCheck: images in rows, columns side by side (baseline first), verdict buttons,
    notes, a keyboard box and a progress bar. Every change goes through the SpotCheck."""

    def __init__(self, check: SpotCheck, *, thumb_px: int = 140, column_px: int = 250):
        import ipywidgets as w

        self.check = check
        judged, total = check.progress()
        self.progress = w.IntProgress(value=judged, min=0, max=total, layout=w.Layout(width="240px"))
        self.progress_label = w.Label()
        self.progress_label.add_class("spot-progress")
        self.keys = w.Text(placeholder="click here, then type: " + KEY_HELP, layout=w.Layout(width="640px"))
        self.keys.add_class("spot-keys")
        self.keys.observe(self._on_key, "value")
        self.status = w.HTML()
        self.status.add_class("spot-status")
        several = len(check.runs) > 1
        header = [w.HTML("<b>image</b>")] + [w.HTML(f"<b>{html.escape(c.label(several))}</b>") for c in check.columns]
        children = list(header)
        self.cells: list[CellView] = []
        for image in check.images:
            children.append(w.VBox([w.Image(value=_thumbnail(image.sample.images[0], thumb_px), format="png",
                                            width=thumb_px),
                                    w.HTML(f"<small>{html.escape(Path(image.key).name)}</small>")]))
            for _ in check.columns:
                view = self._cell(len(self.cells), w)
                self.cells.append(view)
                children.append(view.box)
        grid = w.GridBox(children, layout=w.Layout(
            grid_template_columns=f"{thumb_px + 10}px " + " ".join([f"{column_px}px"] * len(check.columns)),
            grid_gap="6px", overflow="auto"))
        title = w.HTML(f"<b>caption spot-check</b> · {html.escape(', '.join(r.variant for r in check.runs))} · "
                       f"prompt {html.escape(check.prompt)} · judge as <b>{html.escape(check.who)}</b> · "
                       "verdicts go to spotcheck.jsonl in the run folder")
        self.widget = w.VBox([title, w.HBox([self.progress, self.progress_label]), self.keys, self.status, grid])
        self.widget.add_class("spot-check")
        self.refresh()

    def _cell(self, index: int, w) -> CellView:
        caption = w.HTML(layout=w.Layout(min_height="48px"))
        buttons = {}
        for key, verdict in KEYS.items():
            b = w.Button(description=verdict, tooltip=f"{verdict} (key {key})",
                         layout=w.Layout(width="auto", padding="0 6px"))
            b.add_class(f"spot-verdict-{verdict}")
            b.on_click(lambda _, v=verdict, i=index: self.click(i, v))
            buttons[verdict] = b
        note = w.Text(placeholder="note (Enter saves)", continuous_update=False, layout=w.Layout(width="95%"))
        note.observe(lambda change, i=index: self._on_note(i, change["new"]), "value")
        box = w.VBox([caption, w.HBox(list(buttons.values()), layout=w.Layout(flex_flow="row wrap")), note])
        box.add_class(f"spot-cell-{index}")
        return CellView(box, caption, buttons, note)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # -- events: each goes through the SpotCheck, then the view redraws what changed
    def click(self, index: int, verdict: str) -> None:
        self.check.cursor = index
        self.check.judge(verdict, index=index, note=self.cells[index].note.value)
        self.status.value = html.escape(f"{verdict}: {self.check.where(index)}")
        self.refresh()

    def _on_note(self, index: int, note: str) -> None:
        if self.check.set_note(note, index=index) is not None:
            self.status.value = html.escape(f"note saved: {self.check.where(index)}")
        self.refresh()

    def _on_key(self, change) -> None:
        typed = change["new"]
        if not typed:
            return
        self.keys.value = ""  # the box only carries key presses
        self.status.value = html.escape(self.check.press(typed[-1]))
        self.refresh()

    def refresh(self) -> None:
        """Redraw captions, verdict styles, notes, the cursor and the progress from the SpotCheck."""
        for i, (cell, view) in enumerate(zip(self.check.cells, self.cells)):
            if cell.caption is None:
                view.caption.value = "<i>not generated yet: run check.generate_missing()</i>"
            elif not cell.caption.strip():
                view.caption.value = "<i>(empty caption)</i>"
            else:
                view.caption.value = f"<div style='white-space:pre-wrap'>{html.escape(cell.caption)}</div>"
            for verdict, b in view.buttons.items():
                b.button_style = STYLES[verdict] if cell.verdict == verdict else ""
            if view.note.value != cell.note:
                view.note.value = cell.note
            view.box.layout.border = "2px solid #1976d2" if i == self.check.cursor else "1px solid #ddd"
        judged, total = self.check.progress()
        self.progress.max, self.progress.value = total, judged
        self.progress_label.value = f"judged {judged} / {total} · cursor: {self.check.where()}"


def _thumbnail(path: Path, px: int) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        out = io.BytesIO()
        im.save(out, format="PNG")
    return out.getvalue()
