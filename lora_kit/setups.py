"""A run's setup: what must be equal for two runs' numbers to be compared.

    setup = describe_setup(cfg, model_path, files)        # train.py writes it into params.json
    setup_differences(setup_of(a0_params), setup)        # [] = the same setup

The setup is the base model (its folder and a sample of its weight files, and init_adapter), the data files
(train, val, benchmark, general probes, spot-check, terms: each by its content), the evaluation settings (what
a guardrail evaluation depends on besides the weights) and the parameter profile. Learning rates, targets,
steps and guardrail thresholds are not part of it: they are what a study varies between comparable runs.

One definition serves three places: a guardrail baseline and a copied step 0 come only from an A0 of the same
setup and code (guardrails.comparable_a0), and the summary draws frontiers and verdicts within one setup
(frontier.one_setup).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

DATA_FILES = ("train_file", "val_file", "bench_file", "general_file", "spotcheck_file", "terms_file")
# What a guardrail evaluation depends on besides the weights and the files: equal in two runs, the same model
# scores the same (batch size: padding in generation; image size: the image tokens). Not the seed: the evaluated
# samples are drawn with evaluate.EVAL_SEED, so seed replicates share a setup (and A0's baseline).
EVALUATION_SETTINGS = ("trust_remote_code", "irrelevant_label", "max_length", "min_pixels", "max_pixels",
                       "per_device_eval_batch_size", "max_new_tokens", "eval_max_samples", "exact_match_samples",
                       "crop_jitter_k", "caption_chrf_min", "on_bad_sample")
_SAMPLE = 1 << 20  # bytes read at each end of a weight file


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def weights_fingerprint(folder: str | Path) -> str | None:
    """A cheap fingerprint of a model or adapter folder's weights: each weight file's name, size and first and
    last MiB. It tells a folder rewritten with other weights (a rebuilt toy, a new merge saved over the old)
    without reading gigabytes; it is compared together with the folder's path, never instead of it, because two
    checkpoints can share their first and last MiB. None when the folder holds no weight file."""
    folder = Path(folder)
    files = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pt") for p in folder.glob(pattern) if p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        digest.update(f"{p.name}:{size}:".encode())
        with open(p, "rb") as f:
            digest.update(f.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                f.seek(size - _SAMPLE)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def describe_setup(cfg, model_path: str | Path, files: dict[str, Path]) -> dict:
    """The setup of a run about to start (recorded in params.json as "setup"); reads every data file once."""
    adapter = cfg.init_adapter
    return {
        "model": {"path": str(Path(model_path).resolve()), "weights": weights_fingerprint(model_path),
                  "init_adapter": None if adapter is None else {"path": str(Path(adapter).resolve()),
                                                                "weights": weights_fingerprint(adapter)}},
        "data": {k: {"path": str(Path(files[k]).resolve()), "sha256": file_sha256(files[k])} for k in DATA_FILES},
        "evaluation": {k: getattr(cfg, k) for k in EVALUATION_SETTINGS},
        "profile": cfg.profile,
    }


def setup_of(params: dict) -> dict:
    """The setup recorded in a params.json, or for a run recorded before setups were (no "setup" key) what its
    params.json still says: paths without content, which then never equal a recorded content."""
    if isinstance(params.get("setup"), dict):
        return params["setup"]
    cfg = params.get("config") or {}
    files = params.get("data_files") or {}
    adapter = cfg.get("init_adapter")
    return {
        "model": {"path": params.get("model_path") or cfg.get("model"), "weights": None,
                  "init_adapter": None if adapter is None else {"path": adapter, "weights": None}},
        "data": {k: {"path": files.get(k) or cfg.get(k), "sha256": None} for k in DATA_FILES},
        "evaluation": {k: cfg.get(k) for k in EVALUATION_SETTINGS},
        "profile": cfg.get("profile"),
    }


def _identity(setup: dict) -> dict:
    """What is compared: a model by path and weights; a data file by content when recorded, else by path."""
    model = setup.get("model") or {}
    adapter = model.get("init_adapter")
    data = setup.get("data") or {}
    return {
        "model": [model.get("path"), model.get("weights")],
        "init_adapter": None if adapter is None else [adapter.get("path"), adapter.get("weights")],
        **{k: (["sha256", (data.get(k) or {}).get("sha256")] if (data.get(k) or {}).get("sha256")
               else ["path", (data.get(k) or {}).get("path")]) for k in DATA_FILES},
        **{k: (setup.get("evaluation") or {}).get(k) for k in EVALUATION_SETTINGS},
        "profile": setup.get("profile"),
    }


def setup_id(setup: dict) -> str:
    """A short stable id of a setup: equal ids <=> setup_differences is empty."""
    text = json.dumps(_identity(setup), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def setup_differences(a: dict, b: dict) -> list[str]:
    """What differs between two setups, one readable line per item ('bench_file: x vs y'); [] when the same."""
    ia, ib = _identity(a), _identity(b)
    out = []
    for key in ia:
        if ia[key] == ib[key]:
            continue
        out.append(f"{key}: {_show(key, a)} vs {_show(key, b)}")
    return out


def _show(key: str, setup: dict) -> str:
    model = setup.get("model") or {}
    if key == "model":
        return f"{model.get('path')} (weights {_short(model.get('weights'))})"
    if key == "init_adapter":
        adapter = model.get("init_adapter")
        return "none" if adapter is None else f"{adapter.get('path')} (weights {_short(adapter.get('weights'))})"
    if key in DATA_FILES:
        entry = (setup.get("data") or {}).get(key) or {}
        return f"{entry.get('path')} (sha256 {_short(entry.get('sha256'))})"
    if key == "profile":
        return repr(setup.get("profile"))
    return repr((setup.get("evaluation") or {}).get(key))


def _short(digest: Any) -> str:
    return digest[:12] if isinstance(digest, str) else "not recorded"


def setup_label(setup: dict) -> str:
    """A few words for a table: model folder, training file and profile, e.g. 'stage3 · task_train.jsonl · toy'."""
    model = Path(str((setup.get("model") or {}).get("path"))).name
    train = Path(str(((setup.get("data") or {}).get("train_file") or {}).get("path"))).name
    return f"{model} · {train} · {setup.get('profile')}"


def code_differences(a: dict | None, b: dict | None) -> list[str]:
    """What differs between two params.json "code" records (commit, dirty flag, uncommitted diff)."""
    a, b = a or {}, b or {}
    keys = ("lora_kit", "commit", "dirty", "diff_sha256")
    return [f"code {k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
