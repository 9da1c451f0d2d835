"""A run folder and its files: written atomically or append-only, locked against a second writer.

    outputs/runs/<variant>/params.json, metrics.jsonl, summary.json, checkpoints/, tb/, samples/,
    spotcheck.jsonl, .lock

A reader never sees half a file: JSON files are replaced atomically (write to a temporary file in the
same folder, fsync, rename), metrics.jsonl and spotcheck.jsonl only ever get whole lines appended.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from pathlib import Path

from .errors import LoraKitError

STATUSES = ("running", "completed", "stopped_early", "failed")


def write_json_atomic(path: Path, data) -> None:
    """Replace `path` with JSON `data` so that readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one whole JSON line and flush it to disk."""
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_records(path: Path) -> list[dict]:
    """All complete lines of a JSONL file; a truncated last line (a killed writer) is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """One variant's folder: status, lock, params, metrics, samples, checkpoints, summary."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = self.path / ".lock"
        self._claimed = False

    # -- status
    def summary(self) -> dict | None:
        p = self.path / "summary.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None

    def status(self) -> str | None:
        """The recorded status, or 'stale' for a 'running' folder whose process is gone."""
        s = self.summary()
        if s is None:
            return None
        if s.get("status") == "running" and not self.lock_is_live():
            return "stale"
        return s.get("status")

    def lock_is_live(self) -> bool:
        if not self.lock.exists():
            return False
        try:
            info = json.loads(self.lock.read_text())
        except (json.JSONDecodeError, OSError):
            return False
        return info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", -1)))

    # -- life cycle
    def claim(self, *, overwrite: bool = False) -> None:
        """Take the folder for this process: refuse a completed run (unless overwrite) and a live writer."""
        self.path.mkdir(parents=True, exist_ok=True)
        status = self.status()
        if status in ("completed", "stopped_early") and not overwrite:
            raise LoraKitError(f"run folder {self.path} holds a finished run (status {status}); set overwrite: true "
                               "to replace it, or choose another variant name.")
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if self.lock_is_live():
                info = self.lock.read_text()
                raise LoraKitError(f"run folder {self.path} is in use by another process ({info.strip()}); "
                                   "wait for it, or delete .lock if that process is gone.") from None
            self.lock.unlink(missing_ok=True)  # stale: its process died
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        self._claimed = True
        if status in ("completed", "stopped_early") and overwrite:
            for child in self.path.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        previous = self.summary() or {}
        write_json_atomic(self.path / "summary.json", {**previous, "variant": self.path.name, "status": "running",
                                                       "pid": os.getpid(), "started": time.time()})

    def release(self) -> None:
        if self._claimed:
            self.lock.unlink(missing_ok=True)
            self._claimed = False

    def finish(self, summary: dict) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def fail(self, error: BaseException) -> None:
        """Mark the run failed with its error; keeps everything it wrote (checkpoints resume it)."""
        if not self._claimed:
            return
        previous = self.summary() or {}
        kind = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        write_json_atomic(self.path / "summary.json", {
            **previous, "status": "failed", "failure": kind, "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exception(error)[-5:]})

    # -- files
    def write_params(self, params: dict) -> None:
        write_json_atomic(self.path / "params.json", params)

    def read_metrics(self) -> list[dict]:
        """Metrics of evaluations that a resume keeps: those up to the last checkpoint (or step 0)."""
        records = read_jsonl_records(self.path / "metrics.jsonl")
        ckpt = self.last_checkpoint()
        last = int(ckpt.name.split("-")[1]) if ckpt else 0
        kept = [r for r in records if r["step"] <= last]
        if len(kept) != len(records):  # evaluations after the last checkpoint are redone on resume
            self._rewrite_metrics(kept)
        return kept

    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.path / "metrics.jsonl", record)

    def _rewrite_metrics(self, records: list[dict]) -> None:
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records),
                       encoding="utf-8")
        os.replace(tmp, self.path / "metrics.jsonl")

    def rewrite_last_metrics(self, record: dict) -> None:
        records = read_jsonl_records(self.path / "metrics.jsonl")
        self._rewrite_metrics(records[:-1] + [record])

    def write_samples(self, step: int, records: list[dict], captions: list[str]) -> None:
        folder = self.path / "samples"
        folder.mkdir(exist_ok=True)
        write_json_atomic(folder / f"step-{step:06d}.json", {"step": step, "benchmark": records,
                                                             "captions": captions})

    def verdicts(self) -> list[dict]:
        """Manual spot-check verdicts (spotcheck.jsonl); guardrails.caption_sanity picks a checkpoint's."""
        return read_jsonl_records(self.path / "spotcheck.jsonl")

    def last_checkpoint(self) -> Path | None:
        """The newest complete Trainer checkpoint (one with trainer_state.json), for resuming."""
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return None
        done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)
