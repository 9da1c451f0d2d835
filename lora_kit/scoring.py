"""Text and answer metrics shared by the guardrails and the toy base report.

Pure Python: label matching, rates with Wilson intervals, hallucination and object scores,
blindness, chrF and crop consistency. The task-domain vocabulary is data, passed in as
``terms = {"colours": [...], "shapes": [...]}`` (see ``load_terms``), never written here.
"""

from __future__ import annotations

import json
import math
import operator
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

# ----------------------------------------------------------------------------- labels

# Unicode general categories removed before comparing labels: punctuation, symbols,
# separators (spaces) and control/format characters (zero-width space is Cf).
_DROPPED_CATEGORIES = ("P", "S", "Z", "C")


def normalize_label(text: str) -> str:
    """NFKC, drop punctuation/symbols/spaces/control characters, casefold."""
    # NFKC maps full-width forms to their plain ones ("！" -> "!") but does not turn
    # Traditional into Simplified characters: "無關圖片" stays different from "无关图片".
    text = unicodedata.normalize("NFKC", text)
    kept = "".join(ch for ch in text if not unicodedata.category(ch).startswith(_DROPPED_CATEGORIES))
    return kept.casefold()


def _normalized_label(label: str) -> str:
    """The normalized label, refusing one that normalizes to nothing (a config mistake)."""
    normalized = normalize_label(label)
    if not normalized:
        raise ValueError(
            f"label {label!r} is empty after normalization (only punctuation, symbols or spaces); "
            "set irrelevant_label to the text the model should answer, e.g. '无关图片'"
        )
    return normalized


def is_label(answer: str, label: str) -> bool:
    """True when the whole answer is the label after ``normalize_label``."""
    return normalize_label(answer) == _normalized_label(label)


def contains_label(answer: str, label: str) -> bool:
    """True when the normalized label occurs anywhere in the normalized answer."""
    return _normalized_label(label) in normalize_label(answer)


# ----------------------------------------------------------------------------- rates


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) when n == 0.

    n == 0 gives (nan, nan) rather than (0, 1): an empty benchmark carries no information,
    and nan makes any threshold comparison False instead of silently passing or failing.
    """
    k, n = operator.index(k), operator.index(n)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"wilson_interval needs z > 0, got z={z}")
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp: at k == 0 or k == n the bound is exactly 0 or 1 but rounding can miss it.
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    """k of n, the rate k/n (nan when n == 0) and its Wilson 95% interval [lo, hi]."""

    k: int
    n: int
    rate: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        """Plain dict for JSON; nan becomes None so the output is strict JSON."""
        return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in asdict(self).items()}


def rate(k: int, n: int) -> Rate:
    """A ``Rate`` for k of n with its Wilson 95% interval."""
    lo, hi = wilson_interval(k, n)
    return Rate(k=int(k), n=int(n), rate=(k / n if n else math.nan), lo=lo, hi=hi)


def _check_same_length(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must be parallel lists, got lengths {len(a)} and {len(b)}")


def irrelevant_pass_rate(answers: Sequence[str], label: str) -> Rate:
    """Fraction of answers (to irrelevant images) that are exactly the label after normalization."""
    _normalized_label(label)  # refuse an unusable label even when there are no answers
    return rate(sum(is_label(a, label) for a in answers), len(answers))


def false_refusal_rate(answers: Sequence[str], label: str) -> Rate:
    """Fraction of answers (to in-domain images) that refuse, i.e. contain the label.

    Rule: an answer counts as a refusal when the normalized label occurs anywhere in the
    normalized answer ("无关图片", "这是无关图片。", "无关图片，红色的圆形"). This is stricter than
    the pass rule on purpose: an in-domain answer that says the label at all has refused
    in part, and the guardrail should see it.
    """
    _normalized_label(label)
    return rate(sum(contains_label(a, label) for a in answers), len(answers))


def exact_match_rate(answers: Sequence[str], references: Sequence[str]) -> Rate:
    """Fraction of answers equal to their reference after ``normalize_label`` (NFKC, no punctuation,
    symbols or spaces, casefolded): the task metric of a structured answer such as 图形：红色圆形，蓝色三角形,
    where order and every named item count but spacing and punctuation style do not."""
    _check_same_length("answers", answers, "references", references)
    return rate(sum(normalize_label(a) == normalize_label(r) for a, r in zip(answers, references)), len(answers))


# ----------------------------------------------------------------------------- terms and objects


def _check_terms(terms: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (colours, shapes) of a terms dict, validated."""
    if not isinstance(terms, dict) or "colours" not in terms or "shapes" not in terms:
        raise ValueError(f'terms must be a dict {{"colours": [...], "shapes": [...]}}, got {terms!r}')
    if not all(isinstance(terms[k], list) for k in ("colours", "shapes")):
        raise ValueError(f'terms["colours"] and terms["shapes"] must be lists, got {terms!r}'[:200])
    colours, shapes = tuple(terms["colours"]), tuple(terms["shapes"])
    for key, words in (("colours", colours), ("shapes", shapes)):
        if not words or not all(isinstance(w, str) and w for w in words):
            raise ValueError(f"terms[{key!r}] must be a non-empty list of non-empty strings, got {words!r}")
    overlap = set(colours) & set(shapes)
    if overlap:
        raise ValueError(f"terms lists {sorted(overlap)} as both colour and shape; each term needs one role")
    return colours, shapes


TERMS_FORMAT = 'a JSON object {"colours": [...], "shapes": [...]} of non-empty term lists'


def load_terms(path: str | Path) -> dict:
    """Read and validate a terms file (terms_file): TERMS_FORMAT, UTF-8. A DataError names the file, and
    the line where the JSON breaks."""
    from .errors import DataError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"terms_file {str(path)!r} cannot be read as UTF-8 text ({e}); expected {TERMS_FORMAT}.") \
            from None
    try:
        terms = json.loads(text)
    except json.JSONDecodeError as e:
        plain = "" if text.lstrip().startswith(("{", "[")) else (
            ' (one term per line is not the format: write {"colours": ["红色", ...], "shapes": ["圆形", ...]})')
        raise DataError(f"{path}:{e.lineno}: terms_file is not JSON ({e.msg} at column {e.colno}); expected "
                        f"{TERMS_FORMAT}{plain}.") from None
    try:
        colours, shapes = _check_terms(terms)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: {e}; expected {TERMS_FORMAT}.") from None
    return {"colours": list(colours), "shapes": list(shapes)}


def _alternation(words: Iterable[str]) -> str:
    # Longest first, so that a term containing another one wins the match.
    return "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


@lru_cache(maxsize=32)
def _object_regex(colours: tuple[str, ...], shapes: tuple[str, ...]) -> re.Pattern:
    # Objects are written colour, optional "的", shape: "红色圆形", "红色的圆形".
    return re.compile(f"({_alternation(colours)})的?({_alternation(shapes)})")


@lru_cache(maxsize=32)
def _term_regex(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(_alternation(words))


def _prepare(answer: str) -> str:
    # NFKC only: full-width forms become plain, the terms' own characters are untouched.
    return unicodedata.normalize("NFKC", answer)


def mentioned_objects(answer: str, terms: dict) -> set[tuple[str, str]]:
    """The (colour, shape) objects the answer names, written colour + optional 的 + shape."""
    colours, shapes = _check_terms(terms)
    return {(m.group(1), m.group(2)) for m in _object_regex(colours, shapes).finditer(_prepare(answer))}


def mentioned_terms(answer: str, terms: dict) -> set[str]:
    """Every colour or shape term that appears in the answer."""
    colours, shapes = _check_terms(terms)
    return set(_term_regex(colours + shapes).findall(_prepare(answer)))


def parse_objects(present_objects: Iterable[str], terms: dict) -> set[tuple[str, str]]:
    """Split object strings such as "红色圆形" into (colour, shape) pairs by the terms."""
    colours, shapes = _check_terms(terms)
    pattern = _object_regex(colours, shapes)
    pairs = set()
    for obj in present_objects:
        match = pattern.fullmatch(_prepare(obj))
        if match is None:
            raise ValueError(
                f"object {obj!r} is not a colour followed by a shape from terms "
                f"(colours {list(colours)}, shapes {list(shapes)}); fix the benchmark's 'objects' or terms.json"
            )
        pairs.add((match.group(1), match.group(2)))
    return pairs


def hallucinated(answer: str, present_objects: Iterable[str], terms: dict) -> bool:
    """True when the answer names a colour, shape or colour+shape object that is not in the image.

    With no present objects (an OOD image) any task-domain term is a hallucination.
    """
    present = parse_objects(present_objects, terms)
    present_terms = {c for c, _ in present} | {s for _, s in present}
    if mentioned_terms(answer, terms) - present_terms:
        return True
    # Every term is present somewhere, but "蓝色圆形" is still wrong if the circle is red.
    return bool(mentioned_objects(answer, terms) - present)


def hallucination_rate(answers: Sequence[str], objects_per_answer: Sequence[Iterable[str]], terms: dict) -> Rate:
    """Fraction of answers that hallucinate (see ``hallucinated``)."""
    _check_same_length("answers", answers, "objects_per_answer", objects_per_answer)
    return rate(sum(hallucinated(a, o, terms) for a, o in zip(answers, objects_per_answer)), len(answers))


def object_recall(answer: str, present_objects: Iterable[str], terms: dict) -> tuple[int, int]:
    """(hits, n present): present objects (as a set) that the answer names as colour+shape."""
    present = parse_objects(present_objects, terms)
    return len(mentioned_objects(answer, terms) & present), len(present)


def object_accuracy(answers: Sequence[str], objects_per_answer: Sequence[Iterable[str]], terms: dict) -> Rate:
    """Fraction of images whose mentioned object set equals the present object set exactly.

    Objects compare as sets of (colour, shape): two red circles are one "红色圆形". An image
    without objects counts as correct when the answer names no object.
    """
    _check_same_length("answers", answers, "objects_per_answer", objects_per_answer)
    exact = sum(
        mentioned_objects(a, terms) == parse_objects(o, terms) for a, o in zip(answers, objects_per_answer)
    )
    return rate(exact, len(answers))


def object_micro_recall(answers: Sequence[str], objects_per_answer: Sequence[Iterable[str]], terms: dict) -> Rate:
    """Present objects named, summed over all images, over all present objects.

    The Wilson interval treats objects as independent, which objects of one image are not;
    read it as approximate.
    """
    _check_same_length("answers", answers, "objects_per_answer", objects_per_answer)
    hits = total = 0
    for a, o in zip(answers, objects_per_answer):
        h, n = object_recall(a, o, terms)
        hits, total = hits + h, total + n
    return rate(hits, total)


# ----------------------------------------------------------------------------- blindness

# n-gram lengths checked for back-to-back repetition. Longer loops ("红色的圆形红色的圆形...")
# are not caught here; such loops almost always run into the token limit, which is_blind checks.
_REPETITION_MAX_N = 4
_REPETITION_MIN_CHARS = 8


def is_degenerate_repetition(text: str, max_ngram_share: float = 0.5) -> bool:
    """True when one char n-gram (n = 1..4), repeated back to back, covers more than the share of the text.

    Rule: for each n, find the longest run where the same n-gram repeats consecutively (at
    least twice); the text is degenerate when that run's length (repeats x n characters) is
    more than ``max_ngram_share`` of the text. Texts shorter than 8 characters are never
    degenerate (too short to tell a loop from a short answer).
    """
    if len(text) < _REPETITION_MIN_CHARS:
        return False
    for n in range(1, _REPETITION_MAX_N + 1):
        # A stretch where text[i] == text[i + n] for m consecutive i is periodic with period n
        # over m + n characters, i.e. (m + n) // n whole repeats of one n-gram.
        run = 0
        for i in range(len(text) - n):
            run = run + 1 if text[i] == text[i + n] else 0
            repeats = (run + n) // n
            if repeats >= 2 and repeats * n > max_ngram_share * len(text):
                return True
    return False


def is_blind(answer: str, *, min_chars: int = 2, hit_token_limit: bool = False) -> bool:
    """True when the answer is (near-)empty after normalization, a degenerate repetition, or hit the token limit."""
    normalized = normalize_label(answer)
    # Repetition is judged on the normalized text so that "图 图 图 …" or "图。图。图。" count too.
    return hit_token_limit or len(normalized) < min_chars or is_degenerate_repetition(normalized)


def blindness_rate(answers: Sequence[str], hit_limits: Sequence[bool]) -> Rate:
    """Fraction of answers that are blind (see ``is_blind``); hit_limits is parallel to answers."""
    _check_same_length("answers", answers, "hit_limits", hit_limits)
    return rate(sum(is_blind(a, hit_token_limit=bool(h)) for a, h in zip(answers, hit_limits)), len(answers))


# ----------------------------------------------------------------------------- chrF


def _char_ngrams(text: str, char_order: int) -> list[Counter]:
    # Whitespace removed as str.split() sees it (includes the full-width space U+3000).
    text = "".join(text.split())
    return [Counter(text[i : i + n] for i in range(len(text) - n + 1)) for n in range(1, char_order + 1)]


def _chrf_statistics(hypothesis: str, reference: str, char_order: int) -> list[tuple[int, int, int]]:
    """(hypothesis n-grams, reference n-grams, matches) per order, as sacrebleu counts them."""
    stats = []
    for hyp, ref in zip(_char_ngrams(hypothesis, char_order), _char_ngrams(reference, char_order)):
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        # As sacrebleu: an order the reference is too short for does not count against precision.
        stats.append((sum(hyp.values()) if ref else 0, sum(ref.values()), matches))
    return stats


def _chrf_from_statistics(stats: Sequence[tuple[int, int, int]], beta: float) -> float:
    # sacrebleu's default (eps_smoothing=False): average precision and recall over the
    # "effective" orders where both sides have n-grams, then one F-beta of the averages.
    factor = beta**2
    precision = recall = 0.0
    effective = 0
    for n_hyp, n_ref, n_match in stats:
        if n_hyp > 0 and n_ref > 0:
            precision += n_match / n_hyp
            recall += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    precision /= effective
    recall /= effective
    if precision + recall == 0:
        return 0.0
    return 100 * ((1 + factor) * precision * recall / (factor * precision + recall))


def _check_chrf_args(char_order: int, beta: float) -> None:
    if operator.index(char_order) < 1:
        raise ValueError(f"chrf needs char_order >= 1, got {char_order}")
    if not beta > 0:
        raise ValueError(f"chrf needs beta > 0, got {beta}")


def chrf(hypothesis: str, reference: str, char_order: int = 6, beta: float = 2) -> float:
    """Sentence chrF (0-100) on character n-grams without whitespace; equals sacrebleu's CHRF().sentence_score."""
    _check_chrf_args(char_order, beta)
    return _chrf_from_statistics(_chrf_statistics(hypothesis, reference, char_order), beta)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str], char_order: int = 6, beta: float = 2) -> float:
    """Corpus chrF (0-100) from n-gram counts summed over pairs; equals sacrebleu's CHRF().corpus_score(h, [r])."""
    _check_chrf_args(char_order, beta)
    _check_same_length("hypotheses", hypotheses, "references", references)
    if not hypotheses:
        raise ValueError("corpus_chrf needs at least one hypothesis/reference pair")
    totals = [[0, 0, 0] for _ in range(char_order)]
    for hyp, ref in zip(hypotheses, references):
        for total, stat in zip(totals, _chrf_statistics(hyp, ref, char_order)):
            for j in range(3):
                total[j] += stat[j]
    return _chrf_from_statistics(totals, beta)


# ----------------------------------------------------------------------------- crop consistency


def consistency(answers_crops: Sequence[str], answer_full: str, label: str) -> dict:
    """How the answers to crops of one image agree with the answer to the uncropped image.

    agreement_rate: crop answers equal to the full answer after normalize_label;
    label_flip_rate: crop answers whose is_label differs from the full answer's;
    mean_chrf: mean chrF of each crop answer (hypothesis) against the full answer (reference).
    Plain fractions, no intervals: crops of one image are not independent trials.
    All three are nan when there are no crops.
    """
    n = len(answers_crops)
    if n == 0:
        return {"n": 0, "agreement_rate": math.nan, "label_flip_rate": math.nan, "mean_chrf": math.nan}
    full_normalized = normalize_label(answer_full)
    full_is_label = is_label(answer_full, label)
    return {
        "n": n,
        "agreement_rate": sum(normalize_label(a) == full_normalized for a in answers_crops) / n,
        "label_flip_rate": sum(is_label(a, label) != full_is_label for a in answers_crops) / n,
        "mean_chrf": sum(chrf(a, answer_full) for a in answers_crops) / n,
    }
