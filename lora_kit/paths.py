"""Where the kit reads parameters and notebooks and writes outputs, from a clone or installed, from any folder.

A *study folder* holds `params/` (defaults.yaml, profiles/, the variant files such as C2.yaml) and `notebooks/`
(train.ipynb, summary.ipynb, spotcheck.ipynb): the clone is one, and `python -m lora_kit init DIR` writes one.
The study folder in use is the nearest folder, from the current folder up, that holds `params/defaults.yaml`
(`study_root`), so a command run in the study folder, in its notebooks/ (papermill's and Jupyter's working folder)
or any folder below it finds the same study.

- Parameters (`params_dir`): the study folder's params/ — its defaults.yaml and profiles/ are the ones merged, as
  they are in the clone. Outside any study folder: the kit's own files (`PARAMS_DIR`), the clone's params/ or,
  in an installed package, the copy inside it (lora_kit/_study/params, mapped there by pyproject.toml).
- Notebooks (`notebooks_dir`): the study folder's notebooks/ when it has one, else the kit's own (`NOTEBOOKS_DIR`).
- Outputs (`outputs_dir`): $LORA_KIT_OUTPUTS when set; else <study folder>/outputs; else, used from its clone,
  <clone>/outputs (as `make demo` writes it from any folder); else ./outputs of the current folder.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # the folder holding the package: the clone's root when used from its clone
_SHIPPED = PACKAGE_DIR / "_study"  # an installed package's copy of the clone's params/ and notebooks/
_MARKER = Path("params") / "defaults.yaml"  # what makes a folder a study folder


def _is_study(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and folder != _SHIPPED  # the package's own copy is never written into


# Used from its clone (editable install, PYTHONPATH, or the clone's folder): the package's parent is a study folder.
IS_CLONE = _is_study(REPO_ROOT)
# The kit's own parameter files and notebooks: the clone's, or the copy an installed package carries.
PARAMS_DIR = REPO_ROOT / "params" if IS_CLONE else _SHIPPED / "params"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks" if IS_CLONE else _SHIPPED / "notebooks"


def study_root(start: str | Path | None = None) -> Path | None:
    """The study folder in use: the nearest folder from `start` (default: the current folder) up that holds
    params/defaults.yaml; None when there is none (an installed package run from an ordinary folder)."""
    here = Path(start if start is not None else os.getcwd()).absolute()
    for folder in (here, *here.parents):
        if _is_study(folder):
            return folder
    return None


def params_dir() -> Path:
    """The folder whose defaults.yaml and profiles/ `load_config` merges (see the module's docstring)."""
    root = study_root()
    return root / "params" if root is not None else PARAMS_DIR


def notebooks_dir() -> Path:
    """The folder whose train.ipynb / summary.ipynb the matrix and the demo execute (see the module's docstring)."""
    root = study_root()
    return root / "notebooks" if root is not None and (root / "notebooks").is_dir() else NOTEBOOKS_DIR


def notebook_cwd(notebook: str | Path) -> Path:
    """papermill's working folder for `notebook` run by the matrix or the demo: the caller's current folder, so that
    a relative path given there (`-f params/my_4b.yaml`, `--set model=models/x`, data files) means in the kernel
    what the matrix checked before starting it, and the kernel finds the same study folder as its caller. (The
    notebook's own folder would resolve them against notebooks/, or inside site-packages for the kit's own copy.)"""
    return Path.cwd()


def outputs_dir() -> Path:
    """The outputs folder, absolute: $LORA_KIT_OUTPUTS when set (tests use a temporary one), else
    <study folder>/outputs, else <clone>/outputs when used from the clone, else ./outputs of the current folder."""
    env = os.environ.get("LORA_KIT_OUTPUTS")
    if env:
        return Path(os.path.abspath(os.path.expanduser(env)))
    root = study_root()
    if root is None:
        root = REPO_ROOT if IS_CLONE else Path.cwd()
    return root / "outputs"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process the kit starts (a papermill kernel, a torchrun rank): `env` (default
    os.environ) with LORA_KIT_OUTPUTS set to this process's outputs folder, so both write to the same place
    whatever the child's working folder."""
    return {**(os.environ if env is None else env), "LORA_KIT_OUTPUTS": str(outputs_dir())}


def runs_dir(output_dir: str | None = None) -> Path:
    """Where run folders go: `output_dir` when given (relative to the current folder), else <outputs>/runs."""
    return Path(output_dir).expanduser().resolve() if output_dir else outputs_dir() / "runs"
