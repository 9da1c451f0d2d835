"""`python -m lora_kit init DIR`: a new study folder, laid out as the clone's study is, for an installed kit.

DIR gets the kit's own parameter files and notebooks (`paths.PARAMS_DIR`, `paths.NOTEBOOKS_DIR`: the copy inside
an installed package, or the clone's params/ and notebooks/ as they are now):

    DIR/params/defaults.yaml        every parameter with its default: the one merged first in this study
    DIR/params/profiles/toy.yaml    the toy profile (profile: toy, the default)
    DIR/params/<variant>.yaml       A0 ... D3 and C2_restart, the study's variants
    DIR/notebooks/*.ipynb           train, summary and spot-check notebooks, without outputs

params/defaults.yaml makes DIR a study folder (`paths.study_root`): commands run in DIR or below it read DIR's
params/ and write DIR/outputs/, as the clone's commands read and write the clone's. The study's defaults.yaml is
its own copy: a later lora_kit keeps reading it (an unknown parameter in it is refused with its file:line).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .errors import LoraKitError
from .paths import NOTEBOOKS_DIR, PARAMS_DIR

# (source folder, glob, destination relative to the study folder)
_CONTENT = ((PARAMS_DIR, "*.yaml", Path("params")), (PARAMS_DIR / "profiles", "*.yaml", Path("params/profiles")),
            (NOTEBOOKS_DIR, "*.ipynb", Path("notebooks")))


def study_files() -> list[tuple[Path, Path]]:
    """(source file, path relative to the study folder) of everything `init_study` writes, sorted."""
    files = [(src, dest / src.name) for folder, pattern, dest in _CONTENT for src in sorted(folder.glob(pattern))]
    if not any(rel == Path("params/defaults.yaml") for _, rel in files):
        raise LoraKitError(f"the kit's own parameter files are missing ({PARAMS_DIR / 'defaults.yaml'} not found). "
                           "Fix: reinstall lora_kit (`pip install .` or `pip install -e .` from its clone).")
    return files


def init_study(folder: str | Path, *, force: bool = False) -> list[Path]:
    """Write a study folder at `folder` (created if needed); returns the files written, relative to it.

    Raises LoraKitError, writing nothing, when `folder` is a file, or a folder that is not empty and `force` is
    False; with `force`, files of the same names are replaced and every other file is left as it is.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LoraKitError(f"init {folder}: a file, not a folder. Fix: name a new folder, e.g. "
                           f"`python -m lora_kit init my_study`.")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise LoraKitError(f"init {folder}: the folder is not empty. Fix: name a new or empty folder, or add --force "
                           "to write into it (files of the same names, params/*.yaml and notebooks/*.ipynb, are "
                           "replaced; nothing else is touched).")
    written = []
    for src, rel in study_files():
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(rel)
    return written


def _kernel_hint() -> str | None:
    """The command that registers the `lora_kit` Jupyter kernel for this Python, when none is registered for it
    (papermill runs the notebooks in that kernel); None when one is."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        spec = KernelSpecManager().get_kernel_spec("lora_kit")
        if spec.argv and os.path.abspath(spec.argv[0]) == os.path.abspath(sys.executable):  # not realpath: venvs
            return None
    except (ImportError, NoSuchKernel):
        pass
    where = "--sys-prefix" if sys.prefix != sys.base_prefix else "--user"
    return f'python -m ipykernel install {where} --name lora_kit --display-name "Python (lora_kit)"'


def init_report(folder: Path, written: list[Path]) -> str:
    """What `init` prints: the files written and the commands to run next."""
    lines = [f"wrote a study folder at {folder.absolute()}:"]
    lines += [f"  {rel.as_posix()}" for rel in written]
    kernel = _kernel_hint()
    lines += ["", "next:"]
    if folder.absolute() != Path.cwd():
        lines.append(f"  cd {folder}")
    if kernel:
        lines += [f"  {kernel}   # once: the Jupyter kernel papermill runs the notebooks in"]
    lines += ["  python -m lora_kit targets --llm-last 2 --vit-last 4     # what C2 instruments (the toy's layers)",
              "  python -m lora_kit train -f params/C2.yaml               # one variant -> outputs/runs/C2",
              "  papermill notebooks/train.ipynb C3.ipynb -f params/C3.yaml  # another variant, through the notebook",
              "  python -m lora_kit demo                                  # the toy study end to end -> outputs/",
              "outputs go to outputs/ of this folder (or $LORA_KIT_OUTPUTS), from it and any folder below it."]
    return "\n".join(lines)
