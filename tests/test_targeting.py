"""Tower discovery, last-N plans, regexes and verification on Qwen3-VL (the toy) and other VLM families."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from lora_kit.errors import TargetingError
from lora_kit.targeting import (find_towers, meta_model, plan_from_regex, plan_targets, verify_wrapped,
                                wrapped_modules)

QWEN3_LLM = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
QWEN3_VIT = ["attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"]


def _text(model_type=None):
    d = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
    return d | ({"model_type": model_type} if model_type else {})


def small_model(family: str):
    """A tiny model of each supported family, built from a config (no download)."""
    mrope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig
        cfg = Qwen2VLConfig(text_config=_text() | {"rope_parameters": mrope},
                            vision_config=dict(depth=6, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2))
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        cfg = Qwen2_5_VLConfig(text_config=_text() | {"rope_parameters": mrope},
                               vision_config=dict(depth=6, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                                  num_heads=4, fullatt_block_indexes=[5]))
    elif family == "llava":
        from transformers import LlavaConfig
        cfg = LlavaConfig(text_config=_text("llama"), image_token_id=255,
                          vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=6, num_attention_heads=4, image_size=32, patch_size=8))
    elif family == "idefics3":
        from transformers import Idefics3Config
        cfg = Idefics3Config(text_config=_text("llama"), image_token_id=255, scale_factor=2,
                             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                                num_attention_heads=4, image_size=32, patch_size=8))
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(cfg)


# What each family's module names look like, written out by hand from the transformers source.
FAMILIES = {
    "qwen2_vl": ("model.language_model.layers", "model.visual.blocks", ["model.visual.merger"],
                 ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
    "qwen2_5_vl": ("model.language_model.layers", "model.visual.blocks", ["model.visual.merger"],
                   ["attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "llava": ("model.language_model.layers", "model.vision_tower.encoder.layers", ["model.multi_modal_projector"],
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]),
    "idefics3": ("model.text_model.layers", "model.vision_model.encoder.layers", ["model.connector"],
                 ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_towers_plan_and_peft(family):
    llm_list, vit_list, aligner, vit_linears = FAMILIES[family]
    model = small_model(family)
    towers = find_towers(model)
    assert towers.llm_layers == [f"{llm_list}.{i}" for i in range(4)]
    assert towers.vit_blocks == [f"{vit_list}.{i}" for i in range(6)]
    assert towers.aligner == aligner
    plan = plan_targets(towers, 2, 3)
    expected = {f"{llm_list}.{i}.{m}" for i in (2, 3) for m in QWEN3_LLM} | \
               {f"{vit_list}.{i}.{m}" for i in (3, 4, 5) for m in vit_linears}
    assert set(plan.modules) == expected
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=plan.regex))
    assert set(wrapped_modules(peft_model)) == expected
    verify_wrapped(peft_model, plan)


def test_toy_towers_deepstack_and_c2_plan(toy_ckpt):
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    towers = find_towers(model)
    assert len(towers.llm_layers) >= 8 and len(towers.vit_blocks) >= 8
    # deepstack taps early, as in the 4B model: the last 6 vision blocks feed only the main merger
    taps = model.config.vision_config.deepstack_visual_indexes
    assert max(taps) < len(towers.vit_blocks) - 6
    assert towers.aligner == ["model.visual.deepstack_merger_list", "model.visual.merger"]
    plan = plan_targets(towers, 2, 4)
    n_llm, n_vit = len(towers.llm_layers), len(towers.vit_blocks)
    expected = [f"model.language_model.layers.{i}.{m}" for i in (n_llm - 2, n_llm - 1) for m in QWEN3_LLM] + \
               [f"model.visual.blocks.{i}.{m}" for i in range(n_vit - 4, n_vit) for m in QWEN3_VIT]
    assert set(plan.modules) == set(expected) and len(plan.modules) == 14 + 16
    assert plan.counts() == {"llm": 14, "vit": 16}
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=plan.regex))
    verify_wrapped(peft_model, plan)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == plan.lora_parameters(16)


def test_meta_model_reads_no_weights(toy_ckpt, tmp_path):
    (tmp_path / "config.json").write_text((toy_ckpt / "config.json").read_text())
    model = meta_model(tmp_path)
    assert all(p.device.type == "meta" for p in model.parameters())
    plan = plan_targets(find_towers(model), 2, 4)
    assert plan.counts() == {"llm": 14, "vit": 16}


def test_verify_lists_missing_and_extra(toy_ckpt):
    model = meta_model(toy_ckpt)
    towers = find_towers(model)
    plan = plan_targets(towers, 2, 0)
    # a user regex that misses down_proj and adds the decoder's layer 5 q_proj
    wrong = r"model\.language_model\.layers\.(5\.self_attn\.q_proj|[67]\.(self_attn\.\w_proj|mlp\.(gate|up)_proj))"
    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(toy_ckpt),
                                LoraConfig(r=2, target_modules=wrong))
    with pytest.raises(TargetingError) as e:
        verify_wrapped(peft_model, plan)
    msg = str(e.value)
    assert "missing (2)" in msg and "layers.6.mlp.down_proj" in msg
    assert "extra (1)" in msg and "layers.5.self_attn.q_proj" in msg


def test_out_of_range_counts_name_the_tower_size(toy_ckpt):
    towers = find_towers(meta_model(toy_ckpt))
    with pytest.raises(TargetingError, match=r"llm_last=9: the language model has 8 decoder layers"):
        plan_targets(towers, 9, 0)
    with pytest.raises(TargetingError, match=r"vit_last=-1: the vision encoder has 12 blocks"):
        plan_targets(towers, 0, -1)
    assert plan_targets(towers, 0, 0).modules == [] and plan_targets(towers, 0, 0).regex is None


def test_unknown_architecture_says_which_towers_are_missing():
    class TextOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(TargetingError, match="could not find the vision encoder"):
        find_towers(TextOnly())


def test_plan_regex_from_the_study_is_refused_with_the_anchored_fix(toy_ckpt):
    towers = find_towers(meta_model(toy_ckpt))
    study = "language_model.layers.(6|7).(self_attn.(q_proj|k_proj|v_proj|o_proj)|mlp.(gate_proj|up_proj|down_proj))"
    with pytest.raises(TargetingError) as e:
        plan_from_regex(towers, study)
    fixed = str(e.value).splitlines()[-1].strip()
    assert fixed.startswith("^model\\.language_model")
    plan = plan_from_regex(towers, fixed)
    assert plan.counts() == {"llm": 14, "vit": 0} and plan.llm_layers == [6, 7]
    # the corrected regex is exactly what llm_last=2 plans
    assert set(plan.modules) == set(plan_targets(towers, 2, 0).modules)


def test_regex_outside_the_towers_is_refused(toy_ckpt):
    towers = find_towers(meta_model(toy_ckpt))
    with pytest.raises(TargetingError, match="outside the decoder layers and vision blocks"):
        plan_from_regex(towers, r"model\.visual\.(merger|blocks\.11)\..*")


def test_regex_matches_as_peft_does(toy_ckpt):
    towers = find_towers(meta_model(toy_ckpt))
    plan = plan_targets(towers, 4, 6)
    # peft: re.fullmatch(target_modules, key) for a str; check against every module name independently
    names = [n for n, m in meta_model(toy_ckpt).named_modules() if isinstance(m, torch.nn.Linear)]
    assert {n for n in names if re.fullmatch(plan.regex, n)} == set(plan.modules)
    assert len(plan.modules) == 4 * 7 + 6 * 4


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lora_kit", *args], capture_output=True, text=True, env=env)


def test_cli_targets_json_for_a_config_only_folder(toy_ckpt, tmp_path):
    (tmp_path / "config.json").write_text((toy_ckpt / "config.json").read_text())
    out = _cli("targets", "--model", str(tmp_path), "--llm-last", "2", "--vit-last", "4", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["llm_layers"] == [6, 7] and data["vit_blocks"] == [8, 9, 10, 11]
    assert len(data["modules"]) == 30 and data["counts"] == {"llm": 14, "vit": 16}
    assert set(data["modules"]) == {n for n in data["modules"] if re.fullmatch(data["regex"], n)}


def test_cli_targets_table_swift_and_errors(toy_ckpt):
    table = _cli("targets", "--model", str(toy_ckpt), "--llm-last", "2", "--vit-last", "4")
    assert table.returncode == 0, table.stderr
    assert "q_proj" in table.stdout and "linear_fc2" in table.stdout and "regex: ^(" in table.stdout
    swift = _cli("targets", "--model", str(toy_ckpt), "--llm-last", "2", "--format", "swift")
    assert "--target_regex" in swift.stdout and "--freeze_vit true" in swift.stdout and "--vit_lr" in swift.stdout
    bad = _cli("targets", "--model", str(toy_ckpt), "--llm-last", "20")
    assert bad.returncode == 2 and "has 8 decoder layers" in bad.stderr
    # a folder's plan names the folder, and the ms-swift command uses it
    assert f"planned for {toy_ckpt} (8 decoder layers, 12 vision blocks)" in table.stdout
    assert f"swift sft --model {toy_ckpt} " in swift.stdout


def test_a_plan_for_the_toy_says_its_layer_numbers_are_the_toys(toy_ckpt):
    from lora_kit.targeting import find_towers, meta_model, planned_for

    towers = find_towers(meta_model(toy_ckpt))
    line = planned_for("toy", toy_ckpt, towers)
    assert line.startswith("planned for the embedded toy (model toy: 8 decoder layers, 12 vision blocks)")
    assert "--model <checkpoint folder>" in line
    assert planned_for(str(toy_ckpt), toy_ckpt, towers) == f"planned for {toy_ckpt} (8 decoder layers, 12 vision blocks)"


def test_plan_a_4b_study_from_its_config_alone(tmp_path):
    """Qwen3-VL-4B's published sizes (36 decoder layers, 24 vision blocks), built on the meta device."""
    from transformers import Qwen3VLConfig
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                           deepstack_visual_indexes=[5, 11, 17], patch_size=16, num_position_embeddings=2304))
    cfg.save_pretrained(tmp_path)
    towers = find_towers(meta_model(tmp_path))
    plan = plan_targets(towers, 2, 4)
    assert plan.llm_layers == [34, 35] and plan.vit_blocks == [20, 21, 22, 23]
    assert plan.counts() == {"llm": 14, "vit": 16}
    # rank 16 on q/k/v/o/gate/up/down of a 2560-wide layer and qkv/proj/fc1/fc2 of a 1024-wide block
    per_llm_layer = 16 * ((2560 + 4096) + (2560 + 1024) * 2 + (4096 + 2560) + 2 * (2560 + 9728) + (9728 + 2560))
    per_vit_block = 16 * ((1024 + 3072) + (1024 + 1024) + (1024 + 4096) + (4096 + 1024))
    assert plan.lora_parameters(16) == 2 * per_llm_layer + 4 * per_vit_block


def test_a_regex_that_also_matches_non_linear_modules_is_refused_with_the_linear_only_regex(toy_ckpt):
    """peft fullmatches target_modules against every module name and refuses non-Linear ones only after the
    weights are loaded; the plan checks the same way, on the meta model."""
    model = meta_model(toy_ckpt)
    towers = find_towers(model)
    broad = r"model\.language_model\.layers\.(6|7)\..*"
    names = [n for n, _ in model.named_modules()]
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(broad, n)}
    assert len(linear) == 14 and len([n for n in names if re.fullmatch(broad, n)]) > 14  # norms, attention, mlp
    with pytest.raises(TargetingError, match="not Linear layers") as e:
        plan_from_regex(towers, broad)
    fixed = str(e.value).splitlines()[-1].strip()
    assert {n for n in names if re.fullmatch(fixed, n)} == linear  # the suggestion matches exactly those, as peft does
    assert plan_from_regex(towers, fixed).counts() == {"llm": 14, "vit": 0}


def test_modules_to_save_resolve_to_real_module_names(toy_ckpt):
    from lora_kit.targeting import resolve_modules_to_save

    model = meta_model(toy_ckpt)
    towers = find_towers(model)
    plan = plan_targets(towers, 2, 4)
    resolve = lambda *entries, **kw: resolve_modules_to_save(towers, entries, plan, **{  # noqa: E731
        "freeze_aligner": False, **kw})
    # a dotted suffix or a full name; `merger` is the main merger only, never deepstack_merger_list
    assert resolve("merger") == resolve("visual.merger") == {"model.visual.merger": "aligner"}
    # a module list stands for its members (peft cannot wrap a ModuleList)
    members = [f"model.visual.deepstack_merger_list.{i}" for i in range(len(model.model.visual.deepstack_merger_list))]
    assert list(resolve("deepstack_merger_list")) == members
    assert resolve("lm_head") == {"lm_head": "llm"}
    with pytest.raises(TargetingError) as e:
        resolve("mergr", "act_fn", "layers.7")
    msg = str(e.value)
    assert "'mergr' matches no module" in msg and "did you mean model.visual.merger" in msg and "lm_head" in msg
    assert "holds no parameters" in msg  # act_fn: nothing to train
    assert "overlaps 7 LoRA-targeted modules" in msg  # layers.7 carries LoRA in C2
    with pytest.raises(TargetingError, match="freeze_aligner: true keeps frozen"):
        resolve("merger", freeze_aligner=True)
