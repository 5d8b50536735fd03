"""Evaluation metrics for generated text: WER/CER, BLEU and exact match, per task and overall.

Scores from different runs are only comparable if the text is normalised the same way, so WER,
CER and exact match all go through one documented :func:`normalize_text`. Error rates are
corpus-level (total edits / total reference length), not a mean of per-utterance rates, so long
utterances weigh what they should. BLEU is sacrebleu's corpus BLEU on the raw text, as usual for
translation, each pair tokenized for its target language (:func:`bleu_tokenizer`).
:func:`task_metrics` picks the metrics that fit each task from its name.

Empty references: jiwer refuses them in some versions, so pairs with an empty side are counted
here (every hypothesis unit against an empty reference is an insertion; every reference unit
against an empty hypothesis is a deletion). With a total reference length of 0 the rate is 0.0
when there are no edits and ``inf`` otherwise: anything said where nothing should be is
unboundedly wrong, and a finite number would hide it. JSON has no ``inf``: :func:`metrics_json`
writes it as ``null`` with ``<name>_undefined`` saying why.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jiwer
import sacrebleu
from sacrebleu.metrics import BLEU

MetricKind = Literal["asr", "translation", "qa"]

# Apostrophes kept inside words ("don't", "l'homme"); NFKC leaves U+2019 as it is, so it is
# folded to the ASCII one here. U+02BC (modifier letter apostrophe) is a letter, kept by default.
_APOSTROPHES = frozenset("'\u2019")


def _is_word_char(ch: str) -> bool:
    """Letters, digits and combining marks (so Devanagari vowel signs count as inside a word)."""
    return unicodedata.category(ch)[0] in "LNM"


def normalize_text(text: str) -> str:
    """The normalisation behind WER, CER and exact match.

    NFKC, then lowercase; every Unicode punctuation character (category ``P*``) becomes a space,
    except an apostrophe (``'`` or ``’``) with a letter or digit on both sides, which stays, as
    ``'``, part of its word ("Don’t" -> "don't"; "'cause" and "runnin'" lose theirs). Punctuation
    becomes a space rather than nothing, so "well-known" is "well known" and "end.Next" two words.
    Symbols (category ``S*``: ``$``, ``+``, ``=``) stay; note ``%``, ``#``, ``@`` and ``&`` are
    Unicode punctuation and go. Whitespace runs fold to one space and the ends are stripped.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    out = []
    for i, ch in enumerate(text):
        if not unicodedata.category(ch).startswith("P"):
            out.append(ch)
        elif (
            ch in _APOSTROPHES
            and 0 < i < len(text) - 1
            and _is_word_char(text[i - 1])
            and _is_word_char(text[i + 1])
        ):
            out.append("'")
        else:
            out.append(" ")
    return " ".join("".join(out).split())


@dataclass(frozen=True)
class ErrorRate:
    """Corpus edit counts; ``reference_length`` is in words (WER) or characters (CER)."""

    rate: float
    substitutions: int
    deletions: int
    insertions: int
    reference_length: int

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{len(references)} references but {len(hypotheses)} hypotheses; "
            "they must pair up one to one"
        )


def _error_rate(
    references: Sequence[str], hypotheses: Sequence[str], unit: Literal["word", "char"]
) -> ErrorRate:
    """Normalise, count edits (jiwer for pairs with both sides non-empty) and sum them."""
    _check_pairs(references, hypotheses)

    def units(text: str) -> int:
        return len(text.split()) if unit == "word" else len(text)

    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    subs = dels = ins = 0
    both_refs, both_hyps = [], []
    for ref, hyp in zip(refs, hyps, strict=True):
        if ref and hyp:
            both_refs.append(ref)
            both_hyps.append(hyp)
        else:
            dels += units(ref)
            ins += units(hyp)
    if both_refs:
        process = jiwer.process_words if unit == "word" else jiwer.process_characters
        out = process(both_refs, both_hyps)
        subs += out.substitutions
        dels += out.deletions
        ins += out.insertions
    length = sum(units(r) for r in refs)
    edits = subs + dels + ins
    # Reference length 0: 0.0 if nothing was said either, else inf (see the module docstring).
    rate = edits / length if length else (float("inf") if edits else 0.0)
    return ErrorRate(rate, subs, dels, ins, length)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRate:
    """Corpus word error rate after :func:`normalize_text`."""
    return _error_rate(references, hypotheses, "word")


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRate:
    """Corpus character error rate after :func:`normalize_text`; spaces count as characters."""
    return _error_rate(references, hypotheses, "char")


# sacrebleu tokenizers for a target language (a sample's ``lang``: its ISO 639-1 code, a tag such
# as zh-CN, or its English name), the first that can run: sacrebleu's own choices (zh, ja-mecab,
# ko-mecab), with char for Japanese and 13a for Korean where MeCab is not installed (sacrebleu[ja]
# and [ko] are not dependencies); char for scripts written without spaces. Anything else: 13a.
BLEU_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "zh": ("zh",), "chinese": ("zh",),
    "ja": ("ja-mecab", "char"), "japanese": ("ja-mecab", "char"),
    "ko": ("ko-mecab", "13a"), "korean": ("ko-mecab", "13a"),
    "th": ("char",), "thai": ("char",), "lo": ("char",), "lao": ("char",),
    "km": ("char",), "khmer": ("char",), "my": ("char",), "burmese": ("char",),
}  # fmt: skip
DEFAULT_BLEU_TOKENIZER = "13a"


@functools.cache
def _sacrebleu_tokenizer(name: str) -> Callable[[str], str] | None:
    """sacrebleu's tokenizer ``name``, or None where its extra packages are missing."""
    try:
        return BLEU(tokenize=name).tokenizer
    except (RuntimeError, ImportError):
        return None


def bleu_tokenizer(lang: str | None) -> str:
    """The sacrebleu tokenizer BLEU uses for target language ``lang`` (see BLEU_TOKENIZERS)."""
    name = (lang or "").strip().lower()
    choices = BLEU_TOKENIZERS.get(name) or BLEU_TOKENIZERS.get(re.split(r"[-_\s]", name)[0], ())
    return next((c for c in choices if _sacrebleu_tokenizer(c) is not None), DEFAULT_BLEU_TOKENIZER)


def bleu(
    references: Sequence[str], hypotheses: Sequence[str], langs: Sequence[str | None] | None = None
) -> float:
    """Corpus BLEU (sacrebleu, case-sensitive raw text), 0..100; 0.0 if empty. Each pair is
    tokenized for its target language in ``langs`` (:func:`bleu_tokenizer`; none given: 13a), so
    one corpus may mix languages."""
    _check_pairs(references, hypotheses)
    langs = [None] * len(references) if langs is None else langs
    _check_pairs(references, langs)
    if not references:
        return 0.0
    tokenizers = [_sacrebleu_tokenizer(bleu_tokenizer(lang)) for lang in langs]
    refs = [tok(r) for tok, r in zip(tokenizers, references, strict=True)]
    hyps = [tok(h) for tok, h in zip(tokenizers, hypotheses, strict=True)]
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score)


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Fraction of pairs equal after :func:`normalize_text`, 0..1; 0.0 if there are no pairs."""
    _check_pairs(references, hypotheses)
    if not references:
        return 0.0
    hits = sum(
        normalize_text(r) == normalize_text(h) for r, h in zip(references, hypotheses, strict=True)
    )
    return hits / len(references)


def metric_kind(task: str) -> MetricKind:
    """Which metrics fit a task, from its name (case-insensitive).

    ``asr``: the name contains "asr" or "transcri" (WER, CER). ``translation``: it contains
    "translat", or has "ast" as a whole ``_``/``-``/``.``-separated part ("ast", "ast_en_de"; not
    "podcast_qa") (BLEU). ``qa``: anything else (accuracy only). ASR is checked first.
    """
    name = task.lower()
    if "asr" in name or "transcri" in name:
        return "asr"
    if "translat" in name or "ast" in re.split(r"[^a-z0-9]+", name):
        return "translation"
    return "qa"


def task_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Metrics per task (in order of first appearance) plus ``"overall"``.

    Each row has ``task``, ``reference`` and ``prediction``. Every task gets ``count`` and
    ``accuracy`` (exact match, 0..1); ASR-like tasks add ``wer`` and ``cer`` (rates, 0..1 or
    ``inf``), translation tasks ``bleu`` (0..100, each row tokenized for its optional ``lang``) and
    ``bleu_tokenize`` (the sacrebleu tokenizers used, comma-separated). ``"overall"`` has
    ``count``, ``accuracy`` over all rows and, if any row is ASR-like, ``wer`` over those rows.
    """
    grouped: dict[str, tuple[list[str], list[str], list[str | None]]] = {}
    for row in rows:
        refs, hyps, langs = grouped.setdefault(str(row["task"]), ([], [], []))
        refs.append(row["reference"])
        hyps.append(row["prediction"])
        langs.append(row.get("lang"))

    result: dict[str, dict[str, Any]] = {}
    asr_refs: list[str] = []
    asr_hyps: list[str] = []
    for task, (refs, hyps, langs) in grouped.items():
        entry: dict[str, Any] = {"count": len(refs)}
        kind = metric_kind(task)
        if kind == "asr":
            entry["wer"] = wer(refs, hyps).rate
            entry["cer"] = cer(refs, hyps).rate
            asr_refs += refs
            asr_hyps += hyps
        elif kind == "translation":
            entry["bleu"] = bleu(refs, hyps, langs)
            entry["bleu_tokenize"] = ",".join(sorted({bleu_tokenizer(lang) for lang in langs}))
        entry["accuracy"] = exact_match(refs, hyps)
        result[task] = entry

    overall: dict[str, Any] = {"count": len(rows)}
    if asr_refs:
        overall["wer"] = wer(asr_refs, asr_hyps).rate
    overall["accuracy"] = exact_match(
        [r["reference"] for r in rows], [r["prediction"] for r in rows]
    )
    result["overall"] = overall
    return result


UNDEFINED_RATE = (
    "infinite: the references are empty (after normalisation) but the predictions are not"
)


def metrics_json(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`task_metrics`' output as strict JSON: an infinite rate becomes ``null``, and
    ``<name>_undefined`` beside it says why (``json.dumps`` would write ``Infinity``)."""
    out: dict[str, dict[str, Any]] = {}
    for task, entry in metrics.items():
        out[task] = {}
        for key, value in entry.items():
            finite = not isinstance(value, float) or math.isfinite(value)
            out[task][key] = value if finite else None
            if not finite:
                out[task][f"{key}_undefined"] = UNDEFINED_RATE
    return out


# (key in task_metrics' entries, column title), in table order.
_TABLE_COLUMNS = (
    ("count", "count"),
    ("wer", "WER"),
    ("cer", "CER"),
    ("bleu", "BLEU"),
    ("accuracy", "accuracy"),
)


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of :func:`task_metrics`' output, one row per task, ``-`` where n/a.

    WER, CER and accuracy are shown as percentages, BLEU as its 0..100 score; two decimals.
    """
    header = ["task"] + [title for _, title in _TABLE_COLUMNS]

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "count":
            return str(value)
        scale = 1.0 if key == "bleu" else 100.0
        return f"{value * scale:.2f}"

    lines = [header]
    for task, entry in metrics.items():
        lines.append([task] + [cell(key, entry.get(key)) for key, _ in _TABLE_COLUMNS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return " | ".join([first, *rest])

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])
