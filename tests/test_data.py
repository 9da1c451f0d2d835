"""Reading chat JSONL, assistant-only labels, and packing that changes nothing the model learns."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lora_kit.data import IGNORE_INDEX, Encoder, collate_packed, collate_padded, read_jsonl, rope_index_fn
from lora_kit.errors import DataError


@pytest.fixture(scope="module")
def processor(toy_ckpt):
    return AutoProcessor.from_pretrained(toy_ckpt)


def test_labels_cover_exactly_the_assistant_answer(processor, mini_world):
    samples, _ = read_jsonl(mini_world / "task_train.jsonl")
    enc = Encoder(processor, 512)
    for s in samples[:5]:
        e = enc.encode(s)
        supervised = [t for t in e.labels if t != IGNORE_INDEX]
        answer = s.messages[-1]["content"]
        assert processor.tokenizer.decode(supervised) == answer + "<|im_end|>"
        assert e.input_ids.count(processor.image_token_id) == 16 * len(s.images)
        # labels equal the ids where supervised
        assert all(l == i for l, i in zip(e.labels, e.input_ids) if l != IGNORE_INDEX)


def test_encoding_matches_the_processor(processor, mini_world):
    samples, _ = read_jsonl(mini_world / "pretrain.jsonl")
    enc = Encoder(processor, 512)
    s = next(x for x in samples if len(x.images) == 2)  # a repeated screenshot question
    from lora_kit.data import load_images
    text = enc._chat(s.messages)
    ref = processor(text=[text], images=load_images(s), return_tensors="pt")
    e = enc.encode(s)
    assert e.input_ids == ref["input_ids"][0].tolist()
    assert torch.equal(e.pixel_values, ref["pixel_values"])


def _write(tmp_path, rows, images=("a.png",)):
    from PIL import Image
    for name in images:
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return p


GOOD = {"messages": [{"role": "user", "content": "<image>描述"}, {"role": "assistant", "content": "好"}],
        "images": ["a.png"]}


@pytest.mark.parametrize("bad,why", [
    ("{not json", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["a.png"]}, "2 '<image>' marks but 'images' lists 1"),
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": " "}],
      "images": ["a.png"]}, "non-empty assistant turn"),
    ({"messages": [{"role": "user", "content": "<image>x"}], "images": ["a.png"]}, "non-empty assistant turn"),
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["missing.png"]}, "does not exist"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] must be"),
    ({"messages": [{"role": "user", "content": "描述"}, {"role": "assistant", "content": "<image>好"}],
      "images": ["a.png"]}, "messages[1] is an assistant turn holding '<image>'"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, why):
    p = _write(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert f"{p}:2" in str(e.value) and why in str(e.value) and "on_bad_sample: skip" in str(e.value)
    samples, skipped = read_jsonl(p, on_bad_sample="skip")
    assert len(samples) == 2 and len(skipped) == 1 and f"{p}:2" in skipped[0]


def test_vision_placeholders_are_never_supervised(tmp_path, processor):
    """Even in a sample built in code (the reader refuses <image> outside user/system turns), the image's
    placeholder tokens are input, never a target: the supervised tokens are the answer's text alone."""
    from PIL import Image

    from lora_kit.data import Sample
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    sample = Sample(messages=[{"role": "user", "content": "描述"}, {"role": "assistant", "content": "好<image>的"}],
                    images=[tmp_path / "a.png"], source="built:1")
    enc = Encoder(processor, 512)
    e = enc.encode(sample)
    supervised = [t for t in e.labels if t != IGNORE_INDEX]
    vision = {processor.tokenizer.convert_tokens_to_ids(t) for t in
              (processor.vision_start_token, processor.image_token, processor.vision_end_token)}
    assert e.input_ids.count(processor.image_token_id) == 16  # the image is still shown to the model
    assert not vision & set(supervised)
    assert processor.tokenizer.decode(supervised) == "好的<|im_end|>"


def test_special_tokens_written_as_text_are_refused(tmp_path, processor):
    from PIL import Image

    from lora_kit.data import Sample
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    sample = Sample(messages=[{"role": "user", "content": "<image>描述<|image_pad|>"},
                              {"role": "assistant", "content": "好"}], images=[tmp_path / "a.png"], source="f.jsonl:7")
    with pytest.raises(DataError, match=r"f.jsonl:7: messages\[0\] \(user\) writes the special token\(s\) <\|image_pad\|>"):
        Encoder(processor, 512).encode(sample)


def test_undecodable_image_and_too_long_sample(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(b"not a png")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n")
    samples, _ = read_jsonl(p)
    with pytest.raises(DataError, match=r"d.jsonl:1: image .* cannot be decoded"):
        Encoder(processor, 512).encode(samples[0])
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"d.jsonl:1: \d+ tokens, longer than max_length=10"):
        Encoder(processor, 10).encode(samples[0])


def test_packed_and_padded_batches_give_the_same_loss(toy_ckpt, processor, mini_world):
    torch.manual_seed(0)
    # train mode, as the Trainer calls it: the model's default use_cache=True would let a packed row's
    # samples attend to each other, so the packed batch itself carries use_cache=False
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt).train()
    samples, _ = read_jsonl(mini_world / "pretrain.jsonl")
    enc = Encoder(processor, 512)
    batch = [enc.encode(s) for s in samples[:6]]  # images, text-only and repeated-image samples mixed
    padded = collate_padded(batch, processor.tokenizer.pad_token_id, processor.image_token_id)
    packed = collate_packed(batch, processor.tokenizer.pad_token_id, processor.image_token_id, 400,
                            rope_index_fn(model))
    assert packed["input_ids"].shape[0] < len(batch)  # several samples share a row
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed).loss
        # per-sample: each sample alone
        losses = []
        for e in batch:
            single = collate_padded([e], processor.tokenizer.pad_token_id, processor.image_token_id)
            losses.append((model(**single, use_cache=False).loss * e.n_supervised, e.n_supervised))
    by_sample = sum(l for l, _ in losses) / sum(n for _, n in losses)
    assert abs(loss_padded.item() - by_sample.item()) < 1e-4
    assert abs(loss_packed.item() - by_sample.item()) < 1e-4


def test_packing_without_position_restarts_would_leak(toy_ckpt, processor, mini_world):
    """The check above can fail: packed rows with one running position (plain SDPA packing) differ."""
    model = AutoModelForImageTextToText.from_pretrained(toy_ckpt).eval()
    samples, _ = read_jsonl(mini_world / "pretrain.jsonl")
    enc = Encoder(processor, 512)
    batch = [enc.encode(s) for s in samples[:6]]
    packed = collate_packed(batch, processor.tokenizer.pad_token_id, processor.image_token_id, 400,
                            rope_index_fn(model))
    naive = dict(packed)
    naive.pop("position_ids")
    naive["attention_mask"] = torch.ones_like(packed["input_ids"])
    with torch.no_grad():
        good = model(**packed).loss.item()
        leaky = model(**naive).loss.item()
    assert abs(good - leaky) > 1e-3
