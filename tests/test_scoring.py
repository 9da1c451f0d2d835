"""Tests for lora_kit.scoring: expected values are worked out by hand in the comments."""

import ast
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import CHRF

from lora_kit import scoring
from lora_kit.scoring import (
    Rate,
    blindness_rate,
    chrf,
    consistency,
    contains_label,
    corpus_chrf,
    false_refusal_rate,
    hallucinated,
    hallucination_rate,
    irrelevant_pass_rate,
    is_blind,
    is_degenerate_repetition,
    is_label,
    load_terms,
    mentioned_objects,
    mentioned_terms,
    normalize_label,
    object_accuracy,
    object_micro_recall,
    object_recall,
    parse_objects,
    rate,
    wilson_interval,
)

LABEL = "无关图片"
TERMS = {"colours": ["红色", "绿色", "蓝色", "黄色"], "shapes": ["圆形", "三角形"]}


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "text, expected",
    [
        ("无关图片。", "无关图片"),  # full-width full stop (Po)
        ("无关 图片！", "无关图片"),  # space (Zs) and full-width exclamation
        ("无关，图片", "无关图片"),
        ("无关\u200b图片", "无关图片"),  # zero-width space (Cf)
        ("\u3000「无关图片」\n", "无关图片"),  # ideographic space, corner brackets, newline
        ("无关图片😀", "无关图片"),  # emoji (So)
        ("", ""),
        ("。！？", ""),
        ("Irrelevant Image.", "irrelevantimage"),
        ("ＩＲＲＥＬＥＶＡＮＴ", "irrelevant"),  # full-width Latin: NFKC then casefold
        ("Straße", "strasse"),  # casefold, not lower
    ],
)
def test_normalize_label(text, expected):
    assert normalize_label(text) == expected


def test_traditional_characters_are_not_the_simplified_label():
    # NFKC does not map Traditional to Simplified characters.
    assert normalize_label("無關圖片") == "無關圖片"
    assert not is_label("無關圖片", LABEL)
    assert not is_label("無關圖片。", LABEL)


def test_is_label():
    assert is_label("无关图片。", LABEL)
    assert is_label("无关 图片！", LABEL)
    assert is_label("无关\u200b图片", LABEL)
    assert is_label("IRRELEVANT!", "irrelevant")
    assert not is_label("", LABEL)
    assert not is_label("这是无关图片", LABEL)
    assert not is_label("无关", LABEL)


def test_empty_label_is_refused():
    with pytest.raises(ValueError, match="irrelevant_label"):
        is_label("无关图片", "。")
    with pytest.raises(ValueError):
        irrelevant_pass_rate([], "  ")


def test_contains_label():
    assert contains_label("这是无关图片。", LABEL)
    assert contains_label("无关 图片，红色的圆形", LABEL)
    assert not contains_label("无关的图片", LABEL)


# ----------------------------------------------------------------------------- rates


def test_wilson_textbook_value():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3)
    assert hi == pytest.approx(0.9433, abs=1e-3)


def test_wilson_edges():
    # k = 0: lo = 0, hi = z^2 / (n + z^2) = 3.8416 / 13.8416
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(3.8416 / 13.8416, abs=1e-9)
    # k = n mirrors it.
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(1 - 3.8416 / 13.8416, abs=1e-9)
    assert hi == 1.0
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize("k, n", [(11, 10), (-1, 10), (0, -1)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(k, n)


def test_rate_and_as_dict():
    r = rate(3, 4)
    assert (r.k, r.n, r.rate) == (3, 4, 0.75)
    assert r.lo < 0.75 < r.hi
    empty = rate(0, 0)
    assert math.isnan(empty.rate)
    assert empty.as_dict() == {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    json.dumps(empty.as_dict(), allow_nan=False)  # strict JSON
    assert isinstance(r, Rate) and json.loads(json.dumps(r.as_dict()))["rate"] == 0.75


def test_irrelevant_pass_rate():
    answers = ["无关图片。", "无关 图片！", "無關圖片", "这是无关图片", ""]
    r = irrelevant_pass_rate(answers, LABEL)
    assert (r.k, r.n, r.rate) == (2, 5, 0.4)


def test_false_refusal_rate():
    answers = ["红色的圆形", "无关图片", "这是无关图片。", "蓝色的三角形"]
    r = false_refusal_rate(answers, LABEL)
    assert (r.k, r.n, r.rate) == (2, 4, 0.5)


# ----------------------------------------------------------------------------- objects


def test_mentioned_objects_and_terms():
    assert mentioned_objects("图中有一个红色的圆形和一个蓝色三角形。", TERMS) == {("红色", "圆形"), ("蓝色", "三角形")}
    assert mentioned_objects("红色的圆形和三角形", TERMS) == {("红色", "圆形")}
    assert mentioned_objects("一张聊天截图", TERMS) == set()
    assert mentioned_terms("红色的圆形和三角形", TERMS) == {"红色", "圆形", "三角形"}
    assert mentioned_terms("", TERMS) == set()


def test_terms_are_data_and_longest_term_wins():
    terms = {"colours": ["紫", "深紫"], "shapes": ["星", "星星"]}
    assert mentioned_objects("一个深紫的星星", terms) == {("深紫", "星星")}
    assert mentioned_terms("深紫", terms) == {"深紫"}
    # Regex metacharacters in terms are escaped.
    terms = {"colours": ["c.1"], "shapes": ["s+"]}
    assert mentioned_objects("c.1s+ cx1ss", terms) == {("c.1", "s+")}


def test_bad_terms_are_refused():
    with pytest.raises(ValueError, match="colours"):
        mentioned_terms("x", {"shapes": ["圆形"]})
    with pytest.raises(ValueError, match="non-empty"):
        mentioned_terms("x", {"colours": [], "shapes": ["圆形"]})


def test_load_terms(tmp_path):
    path = tmp_path / "terms.json"
    path.write_text(json.dumps(TERMS, ensure_ascii=False), encoding="utf-8")
    assert load_terms(path) == TERMS


def test_parse_objects():
    assert parse_objects(["红色圆形", "蓝色的三角形"], TERMS) == {("红色", "圆形"), ("蓝色", "三角形")}
    with pytest.raises(ValueError, match="紫色圆形"):
        parse_objects(["紫色圆形"], TERMS)


def test_hallucination_on_ood_images():
    assert hallucinated("图片里是一个红色的圆形", [], TERMS)
    assert hallucinated("有一个三角形", [], TERMS)  # a bare shape term is enough
    assert hallucinated("绿色", [], TERMS)
    assert not hallucinated("这是一张用户界面截图", [], TERMS)
    assert not hallucinated("无关图片", [], TERMS)


def test_hallucination_on_in_domain_images():
    present = ["红色圆形", "蓝色三角形"]
    assert not hallucinated("红色的圆形和蓝色的三角形", present, TERMS)
    assert not hallucinated("红色的圆形", present, TERMS)  # an omission is not a hallucination
    assert hallucinated("红色的圆形和黄色的三角形", present, TERMS)  # absent colour
    assert hallucinated("一个绿色的东西", present, TERMS)  # absent colour, no object
    assert hallucinated("红色的三角形", ["红色圆形"], TERMS)  # absent shape
    # Every term occurs in the image, but the colours are bound to the wrong shapes.
    assert hallucinated("蓝色的圆形和红色的三角形", present, TERMS)


def test_hallucination_rate():
    answers = ["红色的圆形", "蓝色的圆形", "界面截图", "黄色三角形"]
    objects = [["红色圆形"], ["红色圆形"], [], []]
    r = hallucination_rate(answers, objects, TERMS)
    assert (r.k, r.n) == (2, 4)
    with pytest.raises(ValueError, match="parallel"):
        hallucination_rate(answers, objects[:3], TERMS)


def test_object_recall_accuracy_and_micro_recall():
    assert object_recall("红色的圆形", ["红色圆形", "蓝色三角形"], TERMS) == (1, 2)
    assert object_recall("红色的圆形", ["红色圆形", "红色圆形"], TERMS) == (1, 1)  # sets
    answers = ["红色的圆形和蓝色的三角形", "红色的圆形", "一张界面截图", "绿色圆形"]
    objects = [["红色圆形", "蓝色三角形"], ["红色圆形", "蓝色三角形"], [], ["黄色圆形"]]
    # exact sets: yes, no (missing triangle), yes (nothing present, nothing named), no
    acc = object_accuracy(answers, objects, TERMS)
    assert (acc.k, acc.n) == (2, 4)
    # hits 2 + 1 + 0 + 0 = 3 of 2 + 2 + 0 + 1 = 5 present objects
    rec = object_micro_recall(answers, objects, TERMS)
    assert (rec.k, rec.n) == (3, 5)


# ----------------------------------------------------------------------------- blindness


@pytest.mark.parametrize(
    "text, expected",
    [
        ("图图图图图图图图图图", True),
        ("图片中有一个红色的圆形和一个蓝色的三角形", False),
        ("图图图", False),  # shorter than 8 characters
        ("ababababcd", True),  # 2-gram x4 = 8 of 10 characters
        ("abcabcxyzw", True),  # 3-gram x2 = 6 of 10
        ("图图图图abcd", False),  # 4 of 8 is exactly half, not more
        ("图图图图图abc", True),  # 5 of 8
        ("圆形圆形三角形和三角形", False),  # 4 of 11
    ],
)
def test_is_degenerate_repetition(text, expected):
    assert is_degenerate_repetition(text) is expected


def test_is_blind():
    assert is_blind("")
    assert is_blind("。")
    assert is_blind("图")  # 1 character < min_chars 2
    assert not is_blind("圆形")
    assert is_blind("图 图 图 图 图 图 图 图")  # repetition judged after normalization
    assert not is_blind("图片中有一个红色的圆形")
    assert is_blind("图片中有一个红色的圆形", hit_token_limit=True)
    assert is_blind("圆形", min_chars=3)


def test_blindness_rate():
    r = blindness_rate(["", "红色的圆形", "图图图图图图图图", "红色的圆形"], [False, False, False, True])
    assert (r.k, r.n) == (3, 4)


# ----------------------------------------------------------------------------- chrF


def test_chrf_hand_values():
    # "ab" vs "abc": order 1 p=1 r=2/3, order 2 p=1 r=1/2, higher orders have no hyp n-grams.
    # P = 1, R = 7/12, F2 = 5PR / (4P + R) = 7/11.
    assert chrf("ab", "abc") == pytest.approx(100 * 7 / 11, abs=1e-9)
    # "红色圆形" vs "红色的圆形": P = (1 + 2/3 + 0 + 0)/4, R = (4/5 + 1/2 + 0 + 0)/4 -> 325/956.
    assert chrf("红色圆形", "红色的圆形") == pytest.approx(100 * 325 / 956, abs=1e-9)
    assert chrf("abc", "abc") == pytest.approx(100.0)
    assert chrf("a b  c", "abc") == pytest.approx(100.0)  # whitespace removed
    assert chrf("", "abc") == 0.0
    assert chrf("abc", "") == 0.0
    assert chrf("", "") == 0.0
    assert chrf("红色", "蓝色的圆形") > chrf("三角", "蓝色的圆形") == 0.0


def test_corpus_chrf_hand_values():
    # Summed counts: order 1 (5, 6, 5), order 2 (3, 4, 3), order 3 (1, 2, 1) -> P = 1, R = 25/36.
    assert corpus_chrf(["ab", "abc"], ["abc", "abc"]) == pytest.approx(100 * 125 / 169, abs=1e-9)
    # A reference too short for an order removes that order's hypothesis n-grams from the sums
    # (sacrebleu's rule): P = (5/9 + 3/7 + 1)/3, R = 1 -> 625/689.
    assert corpus_chrf(["abcdef", "abc"], ["ab", "abc"]) == pytest.approx(100 * 625 / 689, abs=1e-9)
    with pytest.raises(ValueError):
        corpus_chrf(["a"], ["a", "b"])


SACREBLEU_PAIRS = [
    ("", ""),
    ("", "无关图片"),
    ("无关图片", ""),
    ("无关图片", "无关图片"),
    ("无关图片。", "无关图片"),
    ("无关 图片", "无关图片"),
    ("無關圖片", "无关图片"),
    ("红色圆形", "红色的圆形"),
    ("图中有一个红色的圆形。", "图片里有一个红色的圆形和一个蓝色的三角形。"),
    ("图片里有一个蓝色的圆形和一个红色的三角形。", "图片里有一个红色的圆形和一个蓝色的三角形。"),
    ("这是一张聊天截图", "图片里有一个红色的圆形"),
    ("图图图图图图图图图图", "图片里有一个红色的圆形"),
    ("图", "图片"),
    ("图片", "图"),
    ("a", "a"),
    ("a", "b"),
    ("ab", "abc"),
    ("abcdef", "ab"),
    ("The cat sat on the mat.", "The cat is on the mat."),
    ("the cat", "The Cat"),
    ("hello world", "world hello"),
    ("aaaaaa", "aaa"),
    ("abababab", "ab"),
    ("   ", "abc"),
    ("abc", "   "),
    ("a\tb\nc", "abc"),
    ("红色\u3000圆形", "红色圆形"),
    ("无关\u200b图片", "无关图片"),
    ("一个红色的圆形 and a blue triangle", "a red circle 和一个蓝色的三角形"),
    ("ÄÖÜ straße", "AOU strasse"),
    ("x" * 40, "x" * 7),
]


@pytest.mark.parametrize("hyp, ref", SACREBLEU_PAIRS)
def test_chrf_matches_sacrebleu(hyp, ref):
    assert chrf(hyp, ref) == pytest.approx(CHRF().sentence_score(hyp, [ref]).score, abs=1e-6)


def test_corpus_chrf_matches_sacrebleu():
    hyps = [h for h, _ in SACREBLEU_PAIRS]
    refs = [r for _, r in SACREBLEU_PAIRS]
    assert corpus_chrf(hyps, refs) == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=1e-6)


def test_chrf_other_orders_match_sacrebleu():
    hyp, ref = "图片里有一个蓝色的圆形", "图片里有一个红色的圆形和三角形"
    for char_order, beta in [(1, 1), (3, 2), (8, 3)]:
        expected = CHRF(char_order=char_order, beta=beta).sentence_score(hyp, [ref]).score
        assert chrf(hyp, ref, char_order=char_order, beta=beta) == pytest.approx(expected, abs=1e-6)


# A small alphabet so that random strings share n-grams often.
SMALL_TEXT = st.text(alphabet="红色的圆形无关图片abAB ", max_size=24)


@settings(max_examples=300, deadline=None)
@given(hyp=SMALL_TEXT, ref=SMALL_TEXT)
def test_chrf_matches_sacrebleu_property(hyp, ref):
    assert chrf(hyp, ref) == pytest.approx(CHRF().sentence_score(hyp, [ref]).score, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(pairs=st.lists(st.tuples(SMALL_TEXT, SMALL_TEXT), min_size=1, max_size=6))
def test_corpus_chrf_matches_sacrebleu_property(pairs):
    hyps = [h for h, _ in pairs]
    refs = [r for _, r in pairs]
    assert corpus_chrf(hyps, refs) == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=1e-6)


# ----------------------------------------------------------------------------- crop consistency


def test_consistency():
    result = consistency(["无关图片", "无关图片。", "红色的圆形"], "无关图片", LABEL)
    assert result["n"] == 3
    assert result["agreement_rate"] == pytest.approx(2 / 3)
    assert result["label_flip_rate"] == pytest.approx(1 / 3)
    # chrF("无关图片。", "无关图片"): "。" is a character, P = (4/5 + 3/4 + 2/3 + 1/2)/4 = 163/240,
    # R = 1 -> 815/892; "红色的圆形" shares nothing with the label -> 0.
    assert result["mean_chrf"] == pytest.approx((100 + 100 * 815 / 892 + 0) / 3, abs=1e-9)


def test_consistency_without_crops():
    result = consistency([], "无关图片", LABEL)
    assert result["n"] == 0 and math.isnan(result["agreement_rate"]) and math.isnan(result["mean_chrf"])


def test_scoring_does_not_import_sacrebleu():
    # sacrebleu is a dev dependency only; the library must not import it.
    tree = ast.parse(open(scoring.__file__, encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.startswith("sacrebleu") for name in imported)


def test_exact_match_rate_against_hand_made_answers():
    references = ["图形：红色圆形，蓝色三角形", "图形：黄色三角形", "无关图片", "图形：绿色圆形"]
    answers = ["图形: 红色圆形, 蓝色三角形",  # ASCII punctuation and spaces: the same answer
               "图形：黄色三角形，红色圆形",  # an object too many
               "无关图片。",  # the label with a full stop
               "图形：圆形"]  # colour missing
    got = scoring.exact_match_rate(answers, references)
    assert (got.k, got.n) == (2, 4) and got.rate == 0.5
    assert (got.lo, got.hi) == pytest.approx(scoring.wilson_interval(2, 4))
    # order counts: the structured answer lists objects in a fixed order
    assert scoring.exact_match_rate(["图形：蓝色三角形，红色圆形"], ["图形：红色圆形，蓝色三角形"]).k == 0
    assert scoring.exact_match_rate([], []).n == 0
    with pytest.raises(ValueError, match="parallel"):
        scoring.exact_match_rate(["a"], [])


def test_benchmark_metrics_score_each_probe_group_on_its_own():
    from lora_kit.data import Sample
    from lora_kit.evaluate import Generation, benchmark_metrics

    terms = {"colours": ["红色", "蓝色"], "shapes": ["圆形", "三角形"]}

    def sample(kind, probe=None, objects=()):
        extra = {"kind": kind, "objects": list(objects)} | ({"probe": probe} if probe else {})
        return Sample(messages=[{"role": "user", "content": "<image>q"}], images=[], source="x:1", extra=extra)

    rows = [(sample("irrelevant", "general"), "无关图片"), (sample("irrelevant", "task"), "图形：红色圆形"),
            (sample("ood", "general"), "这是一张地图页面的截图。"), (sample("ood", "task"), "图形：蓝色三角形"),
            (sample("ood"), "无关图片")]  # no probe field: the default group, general
    m = benchmark_metrics([s for s, _ in rows], [Generation(a, False, 3) for _, a in rows], terms, "无关图片")
    assert sorted(m) == ["general", "task"]
    assert (m["general"]["irrelevant_pass"]["k"], m["general"]["irrelevant_pass"]["n"]) == (1, 1)
    assert (m["task"]["irrelevant_pass"]["k"], m["task"]["irrelevant_pass"]["n"]) == (0, 1)
    assert (m["general"]["hallucination"]["k"], m["general"]["hallucination"]["n"]) == (0, 2)
    assert (m["task"]["hallucination"]["k"], m["task"]["hallucination"]["n"]) == (1, 1)
    assert (m["general"]["ood_label_rate"]["k"], m["task"]["ood_label_rate"]["k"]) == (1, 0)
