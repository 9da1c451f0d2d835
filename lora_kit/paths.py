"""Where the kit reads parameters and writes outputs: beside the package, or LORA_KIT_OUTPUTS."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = REPO_ROOT / "params"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def outputs_dir() -> Path:
    """The outputs folder: $LORA_KIT_OUTPUTS when set (tests use a temporary one), else <repo>/outputs."""
    return Path(os.environ.get("LORA_KIT_OUTPUTS") or REPO_ROOT / "outputs")


def runs_dir(output_dir: str | None = None) -> Path:
    """Where run folders go: `output_dir` when given (relative to the current folder), else <outputs>/runs."""
    return Path(output_dir).expanduser().resolve() if output_dir else outputs_dir() / "runs"
