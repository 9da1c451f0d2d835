"""The toy checkpoint is a normal Hugging Face folder loaded through the same path as a real Qwen3-VL."""
from __future__ import annotations

import hashlib

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLForConditionalGeneration

from lora_kit.toy.model import SPECIAL_TOKENS, ToySpec, build_config, build_toy_checkpoint, build_tokenizer

from conftest import CORPUS


def _inputs(processor):
    img = Image.new("RGB", (128, 128), (240, 240, 240))
    img.paste((220, 40, 40), (30, 30, 80, 80))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "请用自然语言描述一下这些图片"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[img], return_tensors="pt")


def test_folder_has_the_files_of_a_real_checkpoint(toy_ckpt):
    names = {p.name for p in toy_ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} <= names or {"config.json", "model.safetensors", "tokenizer.json",
                                                   "preprocessor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)


def test_round_trip_gives_identical_logits(toy_ckpt, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt).eval()
    processor = AutoProcessor.from_pretrained(toy_ckpt)
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    inputs = _inputs(processor)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16  # 128px, patch 16, merge 2
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        after = reloaded(**_inputs(AutoProcessor.from_pretrained(tmp_path / "again"))).logits
    assert torch.equal(before, after)


def test_special_tokens_match_the_config(toy_ckpt):
    processor = AutoProcessor.from_pretrained(toy_ckpt)
    config = AutoModelForImageTextToText.from_pretrained(toy_ckpt).config
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    assert tok.convert_tokens_to_ids("<|vision_end|>") == config.vision_end_token_id
    assert tok.convert_tokens_to_ids("<|video_pad|>") == config.video_token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in SPECIAL_TOKENS:  # each special token is one token, never split
        assert tok.tokenize(t) == [t]


def test_any_text_encodes_and_decodes_without_unknown_tokens():
    tok = build_tokenizer(CORPUS)
    for text in ["无关图片", "naïve café ∂x/∂t", "繁體字與標點！", "emoji 🙂 and tabs\t", "ラーメン"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_chat_template_renders_qwen_turns(toy_ckpt):
    processor = AutoProcessor.from_pretrained(toy_ckpt)
    text = processor.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
        tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    gen = processor.apply_chat_template([{"role": "user", "content": "U"}], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_build_is_deterministic_from_the_seed(tmp_path):
    small = ToySpec(text_layers=8, vision_depth=8, deepstack=(1, 2, 3), text_hidden=32, text_heads=2, text_kv_heads=1,
                    text_intermediate=64, vision_hidden=32, vision_heads=2, vision_intermediate=64)
    a = _digest(build_toy_checkpoint(tmp_path / "a", CORPUS, small))
    b = _digest(build_toy_checkpoint(tmp_path / "b", CORPUS, small))
    c = _digest(build_toy_checkpoint(tmp_path / "c", CORPUS, ToySpec(**{**small.__dict__, "seed": 1})))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


def test_config_mrope_sections_fill_half_the_head_dim():
    tok = build_tokenizer(CORPUS)
    for heads, hidden in [(4, 128), (2, 32), (8, 512)]:
        cfg = build_config(tok, ToySpec(text_heads=heads, text_hidden=hidden, text_kv_heads=1))
        section = cfg.text_config.rope_parameters["mrope_section"]
        assert sum(section) == hidden // heads // 2 and min(section) > 0


class _DeviceSpy:
    """Stands in for a model on another device (a GPU): records where its inputs were, then stops."""

    device = torch.device("meta")
    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def _record(self, **batch):
        self.seen = {k: v.device for k, v in batch.items() if isinstance(v, torch.Tensor)}
        raise InterruptedError

    __call__ = generate = _record


def test_evaluation_moves_its_batches_to_the_models_device(toy_ckpt, mini_world):
    import pytest

    from lora_kit.data import Encoder, read_jsonl
    from lora_kit.evaluate import generate, mean_loss

    processor = AutoProcessor.from_pretrained(toy_ckpt)
    encoder = Encoder(processor, 512)
    samples, _ = read_jsonl(mini_world / "task_val.jsonl")
    for run in (lambda spy: generate(spy, encoder, samples[:2]),
                lambda spy: mean_loss(spy, [encoder.encode(s) for s in samples[:2]],
                                      image_token_id=encoder.image_token_id, pad_id=processor.tokenizer.pad_token_id)):
        spy = _DeviceSpy()
        with pytest.raises(InterruptedError):
            run(spy)
        assert "pixel_values" in spy.seen and set(spy.seen.values()) == {torch.device("meta")}


def test_runs_compute_on_this_process_gpu_when_there_is_one(monkeypatch):
    from lora_kit.device import compute_device, compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device() == torch.device("cpu") and compute_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of torchrun on this node
    assert compute_device() == torch.device("cuda", 1) and compute_dtype() == torch.bfloat16
    monkeypatch.delenv("LOCAL_RANK")
    assert compute_device() == torch.device("cuda", 0)
