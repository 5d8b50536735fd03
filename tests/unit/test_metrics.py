"""Proves the evaluation metrics on hand-computed cases: edit counts, normalisation, corpus sums,
BLEU tokenized per target language, and metrics written as strict JSON (no Infinity)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import sacrebleu

from salm_megatron.inference.metrics import (
    UNDEFINED_RATE,
    ErrorRate,
    bleu,
    bleu_tokenizer,
    cer,
    exact_match,
    format_table,
    metric_kind,
    metrics_json,
    normalize_text,
    task_metrics,
    wer,
)


def _counts(result: ErrorRate) -> tuple[int, int, int, int]:
    return result.substitutions, result.deletions, result.insertions, result.reference_length


# --- normalisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Hello, World!", "hello world"),
        ("  many   spaces\there\n", "many spaces here"),
        ("Don't stop", "don't stop"),
        ("Don\u2019t stop", "don't stop"),  # typographic apostrophe folded to ASCII
        ("'cause I was runnin'", "cause i was runnin"),  # apostrophes at word edges go
        ("\u2018quoted\u2019", "quoted"),
        ("well-known end.Next", "well known end next"),  # punctuation becomes a space
        ("\uff21\uff22\uff23 \ufb01ne", "abc fine"),  # NFKC: full-width letters, fi ligature
        ("\u00bfQu\u00e9 tal?", "qu\u00e9 tal"),
        ("$10 + 5 = 15", "$10 + 5 = 15"),  # symbols (S*) are not punctuation
        ("50% #1 @home", "50 1 home"),  # but %, # and @ are (Po)
        ("?!...", ""),
    ],
)
def test_normalize_text(raw, normalised):
    assert normalize_text(raw) == normalised


def test_case_punctuation_and_spacing_make_no_error():
    refs = ["Hello, World!  How's it going?"]
    hyps = ["hello world how's   it going"]
    assert wer(refs, hyps).rate == 0.0
    assert cer(refs, hyps).rate == 0.0
    assert exact_match(refs, hyps) == 1.0


# --- single edits, word and character level ----------------------------------------------------


def test_one_substitution():
    result = wer(["the cat sat"], ["the dog sat"])
    assert _counts(result) == (1, 0, 0, 3)
    assert result.rate == pytest.approx(1 / 3)
    result = cer(["cat"], ["cut"])
    assert _counts(result) == (1, 0, 0, 3)
    assert result.rate == pytest.approx(1 / 3)


def test_one_insertion():
    result = wer(["the cat"], ["the black cat"])
    assert _counts(result) == (0, 0, 1, 2)
    assert result.rate == pytest.approx(1 / 2)
    result = cer(["cat"], ["cart"])
    assert _counts(result) == (0, 0, 1, 3)
    assert result.rate == pytest.approx(1 / 3)


def test_one_deletion():
    result = wer(["the cat sat"], ["the sat"])
    assert _counts(result) == (0, 1, 0, 3)
    assert result.rate == pytest.approx(1 / 3)
    result = cer(["cart"], ["cat"])
    assert _counts(result) == (0, 1, 0, 4)
    assert result.rate == pytest.approx(1 / 4)


def test_cer_counts_spaces_as_characters():
    # "the cat" (7 chars) -> "the black cat": "black " is 6 inserted characters.
    result = cer(["the cat"], ["the black cat"])
    assert _counts(result) == (0, 0, 6, 7)
    assert result.edits == 6


# --- empty references and hypotheses -----------------------------------------------------------


def test_empty_reference_and_empty_hypothesis_is_zero():
    for metric in (wer, cer):
        result = metric([""], [""])
        assert _counts(result) == (0, 0, 0, 0)
        assert result.rate == 0.0
    assert wer([], []).rate == 0.0
    assert wer(["?!"], [" "]).rate == 0.0  # punctuation-only normalises to empty


def test_empty_reference_with_words_is_infinite():
    result = wer([""], ["hello there"])
    assert _counts(result) == (0, 0, 2, 0)
    assert math.isinf(result.rate)
    result = cer([""], ["hi"])
    assert _counts(result) == (0, 0, 2, 0)
    assert math.isinf(result.rate)


def test_empty_reference_among_others_counts_insertions():
    result = wer(["a b", ""], ["a b", "c d"])
    assert _counts(result) == (0, 0, 2, 2)
    assert result.rate == pytest.approx(1.0)
    result = cer(["ab", ""], ["ab", "c"])
    assert _counts(result) == (0, 0, 1, 2)
    assert result.rate == pytest.approx(0.5)


def test_empty_hypothesis_is_all_deletions():
    result = wer(["a b", "c"], ["", "c"])
    assert _counts(result) == (0, 2, 0, 3)
    assert result.rate == pytest.approx(2 / 3)


# --- corpus aggregation and argument checks ----------------------------------------------------


def test_corpus_rate_is_total_edits_over_total_words():
    refs = ["a b c d", "e f"]
    hyps = ["a b c x", "e g"]
    result = wer(refs, hyps)
    assert _counts(result) == (2, 0, 0, 6)
    assert result.rate == pytest.approx(2 / 6)  # the mean of per-utterance rates would be 0.375
    assert result.rate != pytest.approx((1 / 4 + 1 / 2) / 2)


@pytest.mark.parametrize("metric", [wer, cer, bleu, exact_match])
def test_mismatched_lengths_raise(metric):
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        metric(["a", "b"], ["a"])


# --- BLEU and exact match ----------------------------------------------------------------------


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = ["the quick brown fox jumps over the lazy dog", "a man walks into a bar"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["the cat sat on the mat"], ["dogs run quickly away now"]) == pytest.approx(0.0)
    assert bleu([], []) == 0.0


JA = "ja-mecab" if importlib.util.find_spec("MeCab") else "char"  # MeCab: sacrebleu[ja]


@pytest.mark.parametrize(
    ("lang", "tokenizer"),
    [("zh", "zh"), ("zh-CN", "zh"), ("Chinese", "zh"), ("ja", JA), ("Japanese", JA),
     ("th", "char"), ("de", "13a"), ("English", "13a"), ("", "13a"), (None, "13a")],
)  # fmt: skip
def test_bleu_tokenizer_follows_the_target_language(lang, tokenizer):
    assert bleu_tokenizer(lang) == tokenizer


def test_bleu_tokenizes_each_pair_for_its_language():
    ref, hyp = "我爱北京天安门", "我爱北京"  # no spaces: 13a sees one word each
    assert bleu([ref], [hyp]) == pytest.approx(0.0)
    chinese = sacrebleu.corpus_bleu([hyp], [[ref]], tokenize="zh").score
    assert bleu([ref], [hyp], ["zh"]) == pytest.approx(chinese) and chinese > 0
    # A corpus of two languages: each pair split its own way (here by hand), one corpus BLEU.
    refs, hyps = [ref, "the cat sat on the mat"], [hyp, "the cat sat on a mat"]
    by_hand = sacrebleu.corpus_bleu(
        ["我 爱 北 京", hyps[1]], [["我 爱 北 京 天 安 门", refs[1]]], tokenize="none"
    ).score
    assert bleu(refs, hyps, ["zh", "en"]) == pytest.approx(by_hand)
    rows = [{"task": "ast", "reference": r, "prediction": h, "lang": lang}
            for r, h, lang in zip(refs, hyps, ["zh", "en"], strict=True)]  # fmt: skip
    assert task_metrics(rows)["ast"]["bleu_tokenize"] == "13a,zh"
    assert task_metrics(rows)["ast"]["bleu"] == pytest.approx(by_hand)


def test_metrics_json_writes_an_infinite_rate_as_null_with_the_reason():
    rows = [{"task": "asr", "reference": "", "prediction": "thank you"}]  # words over silence
    metrics = task_metrics(rows)
    assert math.isinf(metrics["asr"]["wer"])
    written = json.loads(json.dumps(metrics_json(metrics), allow_nan=False))
    for entry in (written["asr"], written["overall"]):
        assert entry["wer"] is None and entry["wer_undefined"] == UNDEFINED_RATE
    assert written["asr"]["cer"] is None and written["asr"]["accuracy"] == 0.0
    finite = task_metrics(_rows())
    assert metrics_json(finite) == finite  # nothing else changes


def test_exact_match():
    assert exact_match(["Yes.", "Paris", "blue"], ["yes", "paris!", "red"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


# --- per-task metrics and the table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "kind"),
    [
        ("asr", "asr"),
        ("LibriSpeech_ASR", "asr"),
        ("transcription", "asr"),
        ("ast", "translation"),
        ("ast_en_de", "translation"),
        ("speech-translation", "translation"),
        ("podcast_qa", "qa"),  # "ast" only as a whole part of the name
        ("sqa", "qa"),
        ("", "qa"),
    ],
)
def test_metric_kind(task, kind):
    assert metric_kind(task) == kind


def _rows():
    return [
        {"task": "asr", "reference": "the cat sat", "prediction": "the dog sat"},
        {"task": "asr", "reference": "Hello world.", "prediction": "hello world"},
        {
            "task": "ast",
            "reference": "a man walks into a bar",
            "prediction": "a man walks into a bar",
        },
        {"task": "sqa", "reference": "Paris", "prediction": "paris"},
        {"task": "sqa", "reference": "blue", "prediction": "red"},
    ]


def test_task_metrics_routes_each_task():
    metrics = task_metrics(_rows())
    assert list(metrics) == ["asr", "ast", "sqa", "overall"]

    asr = metrics["asr"]
    assert set(asr) == {"count", "wer", "cer", "accuracy"}
    assert asr["count"] == 2
    assert asr["wer"] == pytest.approx(1 / 5)  # one substitution over 3 + 2 words
    assert asr["cer"] == pytest.approx(3 / 22)  # c->d, a->o, t->g over 11 + 11 characters
    assert asr["accuracy"] == pytest.approx(1 / 2)

    ast = metrics["ast"]
    assert set(ast) == {"count", "bleu", "bleu_tokenize", "accuracy"}
    assert ast["count"] == 1 and ast["bleu_tokenize"] == "13a"  # no lang
    assert ast["bleu"] == pytest.approx(100.0)
    assert ast["accuracy"] == 1.0

    assert metrics["sqa"] == {"count": 2, "accuracy": pytest.approx(1 / 2)}

    overall = metrics["overall"]
    assert set(overall) == {"count", "wer", "accuracy"}
    assert overall["count"] == 5
    assert overall["wer"] == pytest.approx(1 / 5)
    assert overall["accuracy"] == pytest.approx(3 / 5)


def test_task_metrics_without_asr_rows_has_no_overall_wer():
    metrics = task_metrics([{"task": "sqa", "reference": "yes", "prediction": "Yes"}])
    assert metrics["overall"] == {"count": 1, "accuracy": 1.0}


def test_format_table_has_every_row():
    table = format_table(task_metrics(_rows()))
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == [
        "task",
        "count",
        "WER",
        "CER",
        "BLEU",
        "accuracy",
    ]
    rows = {
        line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in lines[2:]
    }
    assert rows["asr"] == ["2", "20.00", "13.64", "-", "50.00"]
    assert rows["ast"] == ["1", "-", "-", "100.00", "100.00"]
    assert rows["sqa"] == ["2", "-", "-", "-", "50.00"]
    assert rows["overall"] == ["5", "20.00", "-", "-", "60.00"]
    assert len({len(line) for line in lines}) == 1  # columns line up
