"""lora_kit.config: merge order, validation messages, variant files, defaults.yaml, --set parsing."""

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kit.config import (
    STUDY_PRIORITY,
    STUDY_VARIANTS,
    RunConfig,
    config_hash,
    defaults_yaml,
    derive_variant,
    field_docs,
    load_config,
    parse_set,
)
from lora_kit.errors import ConfigError
from lora_kit.paths import PARAMS_DIR

FIELDS = [f.name for f in dataclasses.fields(RunConfig)]


def write(folder: Path, text: str, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(files=(), overrides=None, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(files, overrides, **kwargs)
    return str(info.value)


# ---- validation: each case names the file and line, the parameter and a fix -----------------------

# (YAML text, parameter named in the message, line of that parameter, a word the expectation uses)
BAD_FILES = [
    # unknown key, with the closest known name as the fix
    ("learnig_rate: 1.0e-4\n", "learnig_rate", 1, "did you mean learning_rate"),
    ("# comment\nlora_rnk: 8\n", "lora_rnk", 2, "did you mean lora_rank"),
    # wrong type
    ("lora_rank: true\n", "lora_rank", 1, "an integer"),  # bool is not int
    ("lora_rank: 16.0\n", "lora_rank", 1, "an integer"),
    ("lora_rank: null\n", "lora_rank", 1, "an integer"),  # None only where Optional
    ("packing: 1\n", "packing", 1, "true or false"),
    ("packing: 'false'\n", "packing", 1, "unquoted"),
    ("learning_rate: fast\n", "learning_rate", 1, "a finite number"),
    ("learning_rate: .nan\n", "learning_rate", 1, "a finite number"),
    ("modules_to_save: merger\n", "modules_to_save", 1, "a list of strings"),
    ("modules_to_save: [1, 2]\n", "modules_to_save", 1, "a list of strings"),
    ("variant: 3\n", "variant", 1, "null or a string"),
    ("init_adapter: 5\n", "init_adapter", 1, "null or a string"),
    ("lr_scheduler_type: step\n", "lr_scheduler_type", 1, "one of cosine, linear"),
    ("augmentation: crop\n", "augmentation", 1, "one of none, crop_jitter"),
    ("on_bad_sample: ignore\n", "on_bad_sample", 1, "one of error, skip"),
    ("seed: 2024-01-01\n", "seed", 1, "an integer"),
    # out of range
    ("llm_last: -1\n", "llm_last", 1, ">= 0"),
    ("vit_last: -2\n", "vit_last", 1, ">= 0"),
    ("lora_rank: 0\n", "lora_rank", 1, ">= 1"),
    ("lora_alpha: 0\n", "lora_alpha", 1, ">= 1"),
    ("lora_dropout: 1.0\n", "lora_dropout", 1, "[0, 1)"),
    ("warmup_ratio: 1.5\n", "warmup_ratio", 1, "[0, 1]"),
    ("irrelevant_min: -0.1\n", "irrelevant_min", 1, "[0, 1]"),
    ("augment_strength: 2\n", "augment_strength", 1, "[0, 1]"),
    ("learning_rate: 0\n", "learning_rate", 1, "> 0"),
    ("vit_lr: -1e-4\n", "vit_lr", 1, "> 0"),
    ("aligner_lr: 0.0\n", "aligner_lr", 1, "> 0"),
    ("weight_decay: -0.1\n", "weight_decay", 1, ">= 0"),
    ("max_steps: 0\n", "max_steps", 1, "-1"),
    ("max_steps: -5\n", "max_steps", 1, "-1"),
    ("eval_steps: 0\nsave_steps: 25\n", "eval_steps", 1, ">= 1"),
    ("logging_steps: 0\n", "logging_steps", 1, ">= 1"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size", 1, ">= 1"),
    ("gradient_accumulation_steps: -1\n", "gradient_accumulation_steps", 1, ">= 1"),
    ("eval_max_samples: 0\n", "eval_max_samples", 1, ">= 1"),
    ("irrelevant_patience: 0\n", "irrelevant_patience", 1, ">= 1"),
    ("seed: -1\n", "seed", 1, ">= 0"),
    ("seed: 4294967296\n", "seed", 1, "below 2**32"),
    ("nproc: 0\n", "nproc", 1, ">= 1"),
    ("variant: ../C2\n", "variant", 1, "folder-safe"),
    ("irrelevant_label: ''\n", "irrelevant_label", 1, "non-empty"),
    ("target_regex: '('\nvariant: mine\n", "target_regex", 1, "valid regular expression"),
    ("profile: fast\n", "profile", 1, "none or a file"),
    # missing files
    ("init_adapter: /no/such/adapter\n", "init_adapter", 1, "peft adapter folder"),
    ("train_file: no_such.jsonl\n", "train_file", 1, "an existing file"),
    ("bench_file: /no/such/bench.jsonl\n", "bench_file", 1, "an existing file"),
    ("profile: none\nmodel: /no/such/model\n", "model", 2, "Hugging Face model folder"),
]


@pytest.mark.parametrize("text, param, line, expected", BAD_FILES)
def test_bad_value_is_reported_with_file_line_parameter_and_fix(tmp_path, text, param, line, expected):
    path = write(tmp_path, text)
    message = config_error([path])
    problem = next(x for x in message.splitlines() if param in x)
    assert f"{path}:{line}" in problem
    assert expected in problem
    assert "Fix:" in problem


# (YAML text, parameters named together, their lines)
CONTRADICTIONS = [
    ("freeze_llm: true\nllm_last: 2\n", ["freeze_llm", "llm_last"], [1, 2]),
    ("vit_last: 4\nfreeze_vit: true\n", ["freeze_vit", "vit_last"], [1, 2]),
    ("modules_to_save: [merger]\nfreeze_aligner: true\n", ["freeze_aligner", "modules_to_save"], [1, 2]),
    ("variant: mine\ntarget_regex: 'model\\..*'\nllm_last: 2\n", ["target_regex", "llm_last"], [2, 3]),
    ("target_regex: 'model\\..*'\n", ["target_regex", "variant"], [1]),
    ("max_steps: -1\nnum_train_epochs: 0\n", ["max_steps", "num_train_epochs"], [1, 2]),
    ("eval_steps: 20\nsave_steps: 30\n", ["save_steps", "eval_steps"], [1, 2]),
    ("variant: C2\nllm_last: 4\nvit_last: 4\n", ["variant", "llm_last", "vit_last"], [1, 2, 3]),
]


@pytest.mark.parametrize("text, params, lines", CONTRADICTIONS)
def test_contradiction_names_every_parameter_and_line(tmp_path, text, params, lines):
    path = write(tmp_path, text)
    if "max_steps: -1" in text:  # the toy profile sets max_steps 150
        path = write(tmp_path, "profile: none\n" + text)
        lines = [n + 1 for n in lines]
    message = config_error([path])
    problem = next(x for x in message.splitlines() if all(f"{p} =" in x for p in params))
    for line in lines:
        assert f"{path}:{line}" in problem
    assert "Fix:" in problem


def test_aligner_in_modules_to_save_is_fine_when_the_aligner_is_unfrozen():
    cfg = load_config([], {"modules_to_save": ["merger"], "freeze_aligner": False})
    assert cfg.modules_to_save == ("merger",)
    assert cfg.to_dict()["modules_to_save"] == ["merger"]


def test_target_regex_with_its_own_variant_loads():
    cfg = load_config([], {"target_regex": r"model\.language_model\.layers\.7\..*_proj", "variant": "R7"})
    assert cfg.variant_name == "R7" and cfg.llm_last == 0


def test_model_folders(tmp_path):
    assert load_config([], {"model": "toy-stage2"}).model == "toy-stage2"
    (tmp_path / "ckpt").mkdir()
    message = config_error([], {"model": str(tmp_path / "ckpt"), "profile": "none"})
    assert "without config.json" in message
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert load_config([], {"model": str(tmp_path / "ckpt"), "profile": "none"}).profile == "none"
    # the toy profile's learning rates would be wrong for a real model
    message = config_error([], {"model": str(tmp_path / "ckpt")})
    assert "profile = toy" in message and "set profile: none" in message


def test_init_adapter_and_data_files_that_exist(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert "without adapter_model.safetensors" in config_error([], {"init_adapter": str(tmp_path / "adapter")})
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    data = write(tmp_path, '{"messages": []}\n', "train.jsonl")
    cfg = load_config([], {"init_adapter": str(tmp_path / "adapter"), "train_file": str(data)})
    assert cfg.train_file == str(data)


def test_file_formats_are_checked_with_the_parameters(tmp_path):
    """terms_file is JSON (as documented once, in RunConfig); a one-per-line file, or a JSONL parameter given
    a file of another format, is refused by load_config naming the parameter's line and the file's line."""
    one_per_line = write(tmp_path, "红色\n圆形\n", "terms.txt")
    path = write(tmp_path, f"seed: 1\nterms_file: {one_per_line}\n")
    message = config_error([path])
    assert f"{path.name}:2: terms_file = " in message and f"{one_per_line}:1: terms_file is not JSON" in message
    assert '{"colours": [...], "shapes": [...]}' in message
    wrong_keys = write(tmp_path, '{"colors": ["红色"], "shapes": ["圆形"]}', "terms.json")
    assert '"colours"' in config_error([], {"terms_file": str(wrong_keys)})
    terms = write(tmp_path, '{"colours": ["红色"], "shapes": ["圆形"]}', "terms.json")
    bench = write(tmp_path, '\n{"colours": []}\n', "bench.jsonl")
    message = config_error([], {"terms_file": str(terms), "bench_file": str(bench)})
    assert "1 problem" in message and "bench_file = " in message and f"{bench.name}:2 holds" in message
    from lora_kit.config import field_docs
    assert '{"colours": [...], "shapes": [...]}' in field_docs()["terms_file"]
    assert "one per line" not in field_docs()["terms_file"]


def test_load_terms_names_the_file_and_line(tmp_path):
    from lora_kit.errors import DataError
    from lora_kit.scoring import load_terms
    path = write(tmp_path, '{"colours": ["红色"],\n "shapes": ["圆形",]}', "terms.json")
    with pytest.raises(DataError, match=rf"{path}:2: terms_file is not JSON"):
        load_terms(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "lora_rank: 8\nmodules_to_save: [merger\nseed: 1\n")
    message = config_error([path])
    assert "malformed YAML" in message and f"{path}:3" in message and "Fix:" in message


def test_top_level_must_be_a_mapping(tmp_path):
    for text in ("- lora_rank: 8\n", "just a string\n"):
        message = config_error([write(tmp_path, text)])
        assert "top level" in message and "mapping" in message and "run.yaml:1" in message


def test_empty_file_is_no_change(tmp_path):
    assert load_config([write(tmp_path, "# nothing yet\n")]) == load_config([])


def test_duplicate_key_in_one_file(tmp_path):
    message = config_error([write(tmp_path, "lora_rank: 8\nlora_rank: 4\n")])
    assert "run.yaml:2: lora_rank is set twice (also on line 1)" in message


def test_missing_file_suggests_the_params_file(tmp_path):
    message = config_error(["C2.yaml"])
    assert "C2.yaml: file not found" in message and "did you mean" in message and "params/C2.yaml" in message
    assert "file not found" in config_error([tmp_path / "nope.yaml"])


def test_all_problems_come_in_one_error(tmp_path):
    path = write(tmp_path, "lora_rank: 0\nlearning_rate: -1\nfreez_vit: true\n")
    with pytest.raises(ConfigError) as info:
        load_config([path], {"packing": "no"})
    assert len(info.value.problems) == 4
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("4 problems in the run parameters")
    for where in (f"{path}:1", f"{path}:2", f"{path}:3", "override: packing"):
        assert where in message


def test_overrides_are_labelled_as_their_source():
    message = config_error([], parse_set(["lora_rank=0"]), overrides_source="--set")
    assert "--set: lora_rank = 0" in message
    assert "--set: lora_rank = 0" not in config_error([], {"lora_rank": 0})
    assert "--set packing=true" in config_error([], {"packing": "yes"}, overrides_source="--set")


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"RunConfig\(\.\.\.\): lora_rank = 0"):
        RunConfig(lora_rank=0)
    with pytest.raises(ConfigError, match="freeze_llm"):
        dataclasses.replace(RunConfig(), freeze_llm=True, llm_last=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lora_rank = 8  # type: ignore[misc]


def test_int_is_accepted_for_float():
    cfg = load_config([], {"num_train_epochs": 2, "learning_rate": 1})
    assert cfg.num_train_epochs == 2.0 and isinstance(cfg.num_train_epochs, float)
    assert isinstance(cfg.learning_rate, float)


# ---- merge order --------------------------------------------------------------------------------


def test_override_beats_file_beats_profile_beats_defaults(tmp_path):
    variant = write(tmp_path, "learning_rate: 2.0e-4\nvit_lr: 5e-4\n", "variant.yaml")
    later = write(tmp_path, "vit_lr: 6.0e-4\n", "later.yaml")
    assert load_config([], {"profile": "none"}).learning_rate == 1e-4  # defaults.yaml
    assert load_config([]).learning_rate == TOY["learning_rate"]  # toy profile
    assert load_config([variant]).learning_rate == 2e-4  # variant file
    assert load_config([variant], {"learning_rate": 3e-4}).learning_rate == 3e-4  # override
    assert load_config([variant, later]).vit_lr == 6e-4  # later file beats earlier
    assert load_config([variant]).max_steps == TOY["max_steps"]  # untouched keys keep the profile's value


TOY = yaml.safe_load((PARAMS_DIR / "profiles" / "toy.yaml").read_text("utf-8"))
assert TOY["learning_rate"] != RunConfig.learning_rate and TOY["max_steps"] != RunConfig.max_steps


def test_profile_is_chosen_by_files_and_overrides(tmp_path):
    no_profile = write(tmp_path, "profile: none\n")
    assert load_config([no_profile]).max_steps == -1
    assert load_config([no_profile], {"profile": "toy"}).max_steps == TOY["max_steps"]
    assert load_config([], {"profile": "none"}).profile == "none"


def test_profile_file_may_not_choose_a_profile(tmp_path):
    params = tmp_path / "params"
    (params / "profiles").mkdir(parents=True)
    (params / "defaults.yaml").write_text((PARAMS_DIR / "defaults.yaml").read_text("utf-8"), "utf-8")
    (params / "profiles" / "toy.yaml").write_text("profile: none\nlora_rank: 8\n")
    message = config_error([], params_dir=params)
    assert "profiles/toy.yaml:1: profile" in message
    (params / "profiles" / "toy.yaml").write_text("lora_rank: 8\n")
    assert load_config([], params_dir=params).lora_rank == 8
    assert "no_such_profile" in config_error([], {"profile": "no_such_profile"}, params_dir=params)


# ---- variant files and names -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STUDY_VARIANTS))
def test_every_variant_file_loads(name):
    cfg = load_config([PARAMS_DIR / f"{name}.yaml"])
    assert (cfg.llm_last, cfg.vit_last) == STUDY_VARIANTS[name]
    assert cfg.variant == cfg.variant_name == name


def test_restart_baseline_file():
    cfg = load_config([PARAMS_DIR / "C2_restart.yaml"])
    assert (cfg.variant, cfg.llm_last, cfg.vit_last, cfg.model) == ("C2_restart", 2, 4, "toy-stage2")


def test_variant_files_hold_only_their_differences():
    files = sorted(PARAMS_DIR.glob("*.yaml"))
    assert {p.stem for p in files} == {*STUDY_VARIANTS, "C2_restart", "P_vit", "defaults"}
    for path in files:
        if path.stem == "defaults":
            continue
        text = path.read_text("utf-8")
        assert text.startswith("# "), f"{path.name} should open with a comment saying what it is for"
        keys = set(yaml.safe_load(text))
        extra = {"C2_restart": {"model"}, "P_vit": {"stages"}}.get(path.stem, set())
        assert keys == {"variant", "llm_last", "vit_last"} | extra
    assert set(STUDY_PRIORITY) <= set(STUDY_VARIANTS) and STUDY_PRIORITY[0] == "A0"


def test_progressive_unfreezing_file_grows_the_vision_tower_2_4_6():
    from lora_kit.config import stage_targets

    cfg = load_config([PARAMS_DIR / "P_vit.yaml"])
    assert (cfg.variant, cfg.llm_last, cfg.vit_last) == ("P_vit", 0, 2)
    assert stage_targets(cfg) == [(0, 2, 100), (0, 4, 100), (0, 6, 100)]
    # a stage's left-out count is the previous stage's; a left-out budget is the run's max_steps
    cfg = load_config([], {"variant": "P", "llm_last": 2, "vit_last": 2, "max_steps": 30,
                           "stages": [{}, {"vit_last": 4, "max_steps": 10}, {"llm_last": 4}]})
    assert stage_targets(cfg) == [(2, 2, 30), (2, 4, 10), (4, 4, 30)]
    assert cfg.to_dict()["stages"] == [{}, {"vit_last": 4, "max_steps": 10}, {"llm_last": 4}]
    for bad, says in (({"target_regex": "x"}, "target_regex: null"), ({"nproc": 2}, "set nproc: 1"),
                      ({"stages": [{}, {"vit_last": 4, "max_steps": 0}]}, "stage 2's max_steps an integer >= 1"),
                      ({"stages": [{"vit_lr": 1}]}, "a list of stages, each a mapping of llm_last, vit_last"),
                      ({"freeze_vit": True, "vit_last": 0, "stages": [{}, {"vit_last": 2}]}, "set freeze_vit: false")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config([], {"variant": "P", "vit_last": 2, "stages": [{}, {"vit_last": 4}], **bad})


def test_variant_derivation():
    assert derive_variant(2, 4) == "C2"
    assert derive_variant(0, 0) == "A0"
    assert derive_variant(3, 1) == "L3_V1"
    assert load_config([], {"llm_last": 2, "vit_last": 4}).variant == "C2"
    assert load_config([], {"llm_last": 3}).variant == "L3_V0"
    assert RunConfig(llm_last=4, vit_last=6).variant is None
    assert RunConfig(llm_last=4, vit_last=6).variant_name == "D3"
    assert load_config([], {"variant": "C2_lr2e-4", "llm_last": 2, "vit_last": 4}).variant_name == "C2_lr2e-4"


# ---- defaults.yaml is RunConfig ----------------------------------------------------------------


def test_defaults_yaml_is_rendered_from_runconfig():
    text = (PARAMS_DIR / "defaults.yaml").read_text("utf-8")
    assert text == defaults_yaml(), "run: python -m lora_kit.config > params/defaults.yaml"


def test_defaults_yaml_values_equal_runconfig_defaults():
    values = yaml.safe_load((PARAMS_DIR / "defaults.yaml").read_text("utf-8"))
    assert list(values) == FIELDS
    assert values == RunConfig().to_dict()
    # stage-3 defaults of the study (DESIGN.md)
    d = RunConfig()
    assert (d.lora_rank, d.lora_alpha, d.lora_dropout) == (16, 32, 0.1)
    assert (d.learning_rate, d.vit_lr, d.aligner_lr, d.weight_decay, d.warmup_ratio) == (1e-4, 3e-4, 1e-4, 0.1, 0.2)
    assert d.packing and d.freeze_aligner and d.modules_to_save == ()


def test_every_parameter_is_documented():
    docs = field_docs()
    assert set(docs) == set(FIELDS)
    assert all(len(doc) > 10 for doc in docs.values())


def test_defaults_load_without_a_profile():
    assert load_config([], {"profile": "none"}) == RunConfig(profile="none", variant="A0")


# ---- --set --------------------------------------------------------------------------------------


def test_parse_set():
    values = parse_set(["packing=false", "modules_to_save=[merger]", "learning_rate=3e-4", "variant=C2",
                        "init_adapter=", "max_steps=-1", "irrelevant_label=无关图片", "vit_lr=1E-3"])
    assert values == {"packing": False, "modules_to_save": ["merger"], "learning_rate": 3e-4,
                      "variant": "C2", "init_adapter": None, "max_steps": -1,
                      "irrelevant_label": "无关图片", "vit_lr": 1e-3}
    assert isinstance(values["learning_rate"], float)


@pytest.mark.parametrize("items, expected", [
    (["packing"], "key=value"),
    (["=1"], "key=value"),
    (["lora_rank=8", "lora_rank=4"], "each parameter once"),
    (["model=[a"], "a YAML value"),
])
def test_parse_set_errors(items, expected):
    with pytest.raises(ConfigError, match="--set") as info:
        parse_set(items)
    assert expected in str(info.value) and "Fix:" in str(info.value)


def test_parse_set_never_evaluates_code():
    assert parse_set(["variant=__import__('os').getcwd()"])["variant"] == "__import__('os').getcwd()"
    with pytest.raises(ConfigError):
        parse_set(["variant=!!python/object/apply:os.getcwd []"])


# ---- hash and dict ------------------------------------------------------------------------------


def test_to_dict_round_trips_and_is_json():
    cfg = load_config([PARAMS_DIR / "C2.yaml"])
    assert RunConfig(**cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict(), ensure_ascii=False)) == cfg.to_dict()


def test_config_hash():
    c2 = load_config([PARAMS_DIR / "C2.yaml"])
    h = config_hash(c2)
    assert len(h) == 12 and int(h, 16) >= 0
    assert h == config_hash(load_config([], {"llm_last": 2, "vit_last": 4}))  # same resolved params
    assert h == config_hash(dataclasses.replace(c2, output_dir="elsewhere", overwrite=True, report_to=()))
    assert h != config_hash(dataclasses.replace(c2, learning_rate=2e-4))
    assert h != config_hash(load_config([PARAMS_DIR / "C2_restart.yaml"]))


# ---- report_to: the Trainer's integrations, checked before any run folder is claimed (issue 20) ----


def test_report_to_takes_the_trainers_integrations_that_are_installed(monkeypatch):
    import transformers.integrations

    assert RunConfig().report_to == ("tensorboard",)
    for ok in ([], ["none"], ["tensorboard", "mlflow"]):  # mlflow is a dev dependency
        assert load_config([], {"report_to": ok}).report_to == tuple(ok)
    assert "report_to = [\"mlfow\"]" in config_error(overrides={"report_to": ["mlfow"]})
    assert "Fix: write mlflow for mlfow" in config_error(overrides={"report_to": ["mlfow"]})
    assert "Fix: remove nothing_like_it from report_to" in config_error(overrides={"report_to": ["nothing_like_it"]})
    assert "Fix: name the integrations, e.g. report_to: [tensorboard, mlflow]" in \
        config_error(overrides={"report_to": ["all"]})
    assert "Fix: write report_to: [] for none" in config_error(overrides={"report_to": ["none", "mlflow"]})
    assert "each integration once" in config_error(overrides={"report_to": ["tensorboard", "tensorboard"]})
    # the Trainer's plain string is a list here, and the error says how to write it
    assert "report_to = mlflow: expected a list of strings. Fix: write it like `report_to: [tensorboard]`" in \
        config_error(overrides={"report_to": "mlflow"})
    # a known integration that is not installed: refused with the package to install (transformers' own list of
    # what is installed, here without mlflow)
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    error = config_error(overrides={"report_to": ["tensorboard", "mlflow"]})
    assert "each installed here (installed: tensorboard)" in error
    assert "Fix: pip install mlflow, or remove mlflow from report_to" in error


# ---- property: anything at all gives a RunConfig or a ConfigError ------------------------------

YAMLISH_TOKENS = ["1", "-1", "0", "16", "1e-4", "3E5", ".5", "1e999", ".nan", "true", "no", "null", "~",
                  "[merger]", "[1, [2]]", "{a: 1}", "'x'", '"\\x"', "[", "]", "{", ":", "- a", "&a 1",
                  "*a", "*b", "<<: *a", "!!binary x", "!!python/name:os.system", "2024-13-01",
                  "2024-01-01", "toy", "toy-stage2", "none", "/", ".", "C2", "无关图片", "|\n  x", "#"]
key = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))
token = st.one_of(st.sampled_from(YAMLISH_TOKENS), st.text(max_size=12))
yaml_line = st.builds(lambda indent, k, sep, v: f"{indent}{k}{sep}{v}",
                      st.sampled_from(["", " ", "  ", "- ", "\t", "? "]), key,
                      st.sampled_from([": ", ":", " : ", "=", ": &a ", ": !!str "]), token)
yamlish_text = st.one_of(st.text(), st.lists(yaml_line, max_size=8).map("\n".join))
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(YAMLISH_TOKENS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def loads_or_config_error(files=(), overrides=None):
    try:
        assert isinstance(load_config(files, overrides), RunConfig)
    except ConfigError:
        pass


@PROPERTY
@given(text=yamlish_text)
def test_any_yaml_text_gives_config_or_config_error(text):
    with tempfile.TemporaryDirectory() as folder:
        loads_or_config_error([write(Path(folder), text)])


@PROPERTY
@given(overrides=st.dictionaries(st.one_of(key, st.integers(), st.none()), values, max_size=6))
def test_any_overrides_give_config_or_config_error(overrides):
    loads_or_config_error([], overrides)


@PROPERTY
@given(items=st.lists(st.builds(lambda k, v: f"{k}={v}", key, token) | st.text(max_size=20), max_size=5))
def test_any_set_items_give_config_or_config_error(items):
    try:
        overrides = parse_set(items)
    except ConfigError:
        return
    loads_or_config_error([], overrides)


def test_loading_does_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config([PARAMS_DIR / "C2.yaml"]).variant == "C2"


def test_every_parameter_description_reads_on_its_own():
    """Issue 20: papermill's help and defaults.yaml show each description alone; "... for this many" said nothing."""
    from lora_kit.config import field_docs

    docs = field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(RunConfig)}
    for name, doc in docs.items():
        assert not doc.startswith("...") and "..." not in doc.replace("(version, wrap policy, ...)", "") \
            .replace('[...]', ''), (name, doc)
