"""A run folder and its files: written atomically or append-only, locked against a second writer.

    outputs/runs/<variant>/params.json, metrics.jsonl, summary.json, checkpoints/, tb/, samples/,
    spotcheck.jsonl, stages.json (a progressive-unfreezing run), .lock

A reader never sees half a file: JSON files are replaced atomically (write to a temporary file in the
same folder, fsync, rename), metrics.jsonl and spotcheck.jsonl only ever get whole lines appended.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import traceback
from pathlib import Path

from .errors import DataError, LoraKitError

STATUSES = ("running", "completed", "stopped_early", "failed")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, file size limit


def _disk_full(error: BaseException) -> bool:
    """An OSError of a full disk, or a library's wrapper of one (safetensors raises SafetensorError
    "I/O error: File too large (os error 27)")."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        return True
    text = str(error)
    return any(f"os error {code})" in text or os.strerror(code) in text for code in _DISK_FULL)


def write_json_atomic(path: Path, data) -> None:
    """Replace `path` with JSON `data` so that readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: the old file stays, and no half-written temporary is left
        tmp.unlink(missing_ok=True)
        raise


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one JSON line, flushed and fsynced.

    Non-finite floats are written as NaN / Infinity (Python's JSON extension, read back by
    read_metrics and json.loads), so a diverged loss stays distinguishable from a missing one
    (None); rates are already None when n == 0 (scoring.Rate.as_dict). If the file ends in a
    partial line left by a killed writer, that fragment is cut off first (or just ended with a
    newline when it is a whole record), so the new record starts on its own line.
    """
    path = Path(path)
    line = json.dumps(dict(record), ensure_ascii=False) + "\n"
    if path.is_file():
        _end_last_line(path)
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _end_last_line(path: Path) -> None:
    """Make the file end in a newline: finish a whole last record, cut a partial one."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[start:].decode("utf-8")), dict)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        whole = False
    with path.open("r+b") as f:
        if whole:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_records(path: str | Path) -> list[dict]:
    """Every record of a JSONL file the kit writes (metrics.jsonl, spotcheck.jsonl), in file order; [] if absent.

    A last line that does not end in a newline and is not valid JSON is what a writer killed
    mid-line leaves: it is left out. Any other bad line raises DataError naming file:line.
    NaN and Infinity (written for non-finite losses, see append_metrics) read back as floats.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")  # bytes: a killed writer may have cut a character in two
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as err:  # UnicodeDecodeError included
            if number == len(lines):  # no newline after it: an interrupted write
                break
            raise DataError(f"{path}:{number}: not a JSON record ({err}). Fix: delete or repair that line "
                            "(the kit only appends whole lines to this file)") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a JSON {type(record).__name__}, expected one object per line. "
                            "Fix: delete or repair that line")
        records.append(record)
    return records


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
            info = json.loads(self.lock.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            return False
        return info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", -1)))

    # -- life cycle
    def claim(self, *, overwrite: bool = False) -> None:
        """Take the folder for this process: refuse a completed run (unless overwrite) and a live writer.
        With overwrite, whatever the folder held (a finished, failed or interrupted run) is removed first."""
        self.path.mkdir(parents=True, exist_ok=True)
        status = self.status()
        if status in ("completed", "stopped_early") and not overwrite:
            raise LoraKitError(f"run folder {self.path} holds a finished run (status {status}); set overwrite: true "
                               "to replace it, or choose another variant name.")
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if self.lock_is_live():
                info = self.lock.read_text(encoding="utf-8")
                raise LoraKitError(f"run folder {self.path} is in use by another process ({info.strip()}); "
                                   "wait for it, or delete .lock if that process is gone.") from None
            self.lock.unlink(missing_ok=True)  # stale: its process died
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        self._claimed = True
        if overwrite:  # start over: an unfinished run's checkpoints and metrics must not be resumed either
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
        record = {**previous, "status": "failed", "failure": kind, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exception(error)[-5:]}
        if _disk_full(error):
            record["fix"] = (f"free disk space for {self.path} and run the same command again: it resumes from "
                             "the last complete checkpoint (one with trainer_state.json)")
        try:
            write_json_atomic(self.path / "summary.json", record)
        except OSError:  # the disk is too full even for this: 'running' with a dead pid reads as stale
            pass

    # -- files
    def write_params(self, params: dict) -> None:
        write_json_atomic(self.path / "params.json", params)

    def params(self) -> dict | None:
        """The run's params.json (resolved parameters, setup, code, targets), or None before it is written.
        Raises DataError when it is not a JSON object (it is written atomically, so it was edited by hand)."""
        return self._read_json("params.json")

    def _read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise DataError(f"{path} is not valid JSON ({err}); the kit writes it atomically, so it was edited or "
                            "copied half-way: restore it, or set overwrite: true (or delete the run folder) to start the run over") from None
        if not isinstance(data, dict):
            raise DataError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it, or delete the "
                            "run folder and run the variant again")
        return data

    def write_stages(self, stages: list[dict]) -> None:
        """A progressive-unfreezing run's record of its stages so far (stages.py), replaced after every stage."""
        write_json_atomic(self.path / "stages.json", {"stages": stages})

    def stages(self) -> list[dict]:
        """The stages a progressive-unfreezing run has run (stages.json), [] for any other run."""
        return (self._read_json("stages.json") or {}).get("stages", [])

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

    def read_samples(self, step: int) -> dict | None:
        """The generations written by write_samples for `step` ({"step", "benchmark", "captions"}), or None."""
        return self._read_json(f"samples/step-{step:06d}.json")

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
