"""Proves `salm bench-train` trains every configuration on a tiny model and prints its table
(samples/s, audio s/s, useful-token fraction, TFLOP/s, MFU), with naive padding wasting at least
as much as bucketing on the same samples, that its corpus is LibriSpeech-like, and that a MoE
token's FLOPs count its top-k experts only."""

import dataclasses
import random
import subprocess
import sys

from salm_megatron.bench_train import durations

TINY = [
    "llm.num_layers=2", "llm.hidden_size=64", "llm.ffn_hidden_size=128",
    "llm.num_attention_heads=4", "llm.num_query_groups=2", "llm.vocab_size=256",
    "encoder.d_model=64", "encoder.num_layers=2", "encoder.num_heads=4",
    "encoder.subsampling_conv_channels=32", "adapter.hidden_size=64",
]  # fmt: skip
COLUMNS = ("steps", "seconds", "optim s", "samples/s", "audio s/s", "useful tok", "useful wav",
           "TFLOP/s", "MFU")  # fmt: skip


def _rows(stdout: str) -> dict[str, list[str]]:
    """Each configuration's printed fields after its name (the name is 30 characters wide)."""
    return {line[:3]: line[30:].split() for line in stdout.splitlines() if line[:3] in
            ("(a)", "(b)", "(c)", "(d)")}  # fmt: skip


def test_bench_train_prints_every_configuration():
    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "bench-train", *TINY, "--samples", "6",
         "--batch", "2", "--warmup", "0"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "GEMM rate:" in out and "samples/s ratios:" in out
    assert all(column in out for column in COLUMNS)
    rows = _rows(out)
    assert sorted(rows) == ["(a)", "(b)", "(c)", "(d)"]
    for key, fields in rows.items():  # trained: every column filled
        assert len(fields) == len(COLUMNS) and fields[-1].endswith("%"), (key, fields)
        assert float(fields[COLUMNS.index("samples/s")]) > 0
    fractions = {key: float(f[COLUMNS.index("useful tok")]) for key, f in rows.items()}
    assert all(0 < value <= 1 for value in fractions.values()), fractions
    assert fractions["(a)"] <= fractions["(b)"]  # the same samples: bucketing pads less
    assert fractions["(a)"] == fractions["(d)"]  # the same naive batches
    assert "target: packing's useful-token fraction" in out


def test_bench_train_rejects_a_row_shorter_than_a_sample(capsys):
    from salm_megatron.bench_train import main

    assert main([*TINY, "--samples", "2", "--tokens", "8"]) == 2  # before any process group
    assert "--tokens=8 is below the longest sample" in capsys.readouterr().err


def test_durations_are_librispeech_like():
    seconds = durations(4000, random.Random(0))
    assert min(seconds) >= 1.0 and max(seconds) <= 35.0
    assert 11.0 < sum(seconds) / len(seconds) < 13.0


def test_hugging_face_baseline_reads_the_sequences_our_layout_makes():
    """Its spliced inputs: each sample as long as our SALM layout makes it, labels on exactly the
    answer tokens, and the audio path's frames where the placeholder was."""
    import torch

    from salm_megatron.bench_train import DEFAULTS, HFTrainer, corpus
    from salm_megatron.config import Config, apply_overrides
    from salm_megatron.data import collate
    from salm_megatron.data.batching import llm_sequence_length

    cfg = apply_overrides(Config(), [*DEFAULTS, *TINY, "llm.max_position_embeddings=512"])
    samples = corpus(cfg, 3, seed=1)
    baseline = HFTrainer(cfg, torch.device("cpu"), torch.float32)
    baseline.audio.eval()  # no SpecAugment or dropout: the frames compare exactly
    batch = collate(samples)
    with torch.no_grad():
        embeds, mask, labels = baseline.inputs(batch)
        audio, _ = baseline.audio(batch["audio"], batch["audio_lengths"])
    assert mask.sum(1).tolist() == [llm_sequence_length(cfg)(s) for s in samples]
    for i, sample in enumerate(samples):
        answer = [t for t, m in zip(sample.input_ids, sample.answer_mask, strict=True) if m]
        assert labels[i][labels[i] != -100].tolist() == answer
        at = sample.input_ids.index(cfg.placeholder_id)
        frames = llm_sequence_length(cfg)(sample) - len(sample.input_ids) + 1
        torch.testing.assert_close(embeds[i, at : at + frames], audio[i, :frames])


def test_a_moe_token_is_counted_through_its_top_k_experts_only(single_rank):
    from salm_megatron.bench import decoder_weights_per_token
    from salm_megatron.config import llm_preset
    from salm_megatron.models import build_speech_llm
    from tests.speech_fixtures import tiny_config

    llm = llm_preset("tiny-moe", transformer_impl="local")
    (model,) = build_speech_llm(dataclasses.replace(tiny_config("salm"), llm=llm))
    h, f, d = llm.hidden_size, llm.expert_ffn_hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * d, llm.num_query_groups * d
    per_layer = h * (q + 2 * kv) + q * h + llm.num_moe_experts * h + 2 * 3 * h * f  # top 2
    assert decoder_weights_per_token(model) == llm.num_layers * per_layer
