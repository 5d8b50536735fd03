"""Proves `salm config` prints the resolved config and explains bad input with exit code 2; the
benchmarks print their figures, and their FLOP count is the one written out from the shapes."""

import yaml

from salm_megatron.cli import main


def test_config_prints_resolved_yaml(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("llm:\n  preset: llama3-8b\n")
    assert (
        main(["config", str(path), "parallel.tensor_model_parallel_size=8", "--world-size", "16"])
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["llm"]["hidden_size"] == 4096
    assert printed["parallel"]["tensor_model_parallel_size"] == 8


def test_config_errors_name_the_problem(capsys):
    assert main(["config", "llm.preset=qwen2.5-7b", "parallel.tensor_model_parallel_size=8"]) == 2
    assert "llm.num_attention_heads=28 is not divisible by" in capsys.readouterr().err
    assert main(["config", "parallel.tensor_model_parallel_size=2", "--world-size", "3"]) == 2
    assert "world size 3 is not divisible" in capsys.readouterr().err


def test_unknown_command_and_help(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "example: salm demo" in capsys.readouterr().out


def test_bench_prints_its_figures():
    """The benchmark itself (tiny sizes): runs end to end and prints every figure."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "bench", "--batch", "2", "--seconds", "1",
         "--warmup", "0", "--repeats", "1", "--peak-tflops", "0.001"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in (
        "audio s/s",
        "salm forward+backward",
        "bestow forward+backward",
        "TFLOP/s  MFU",
        "SALM / BESTOW",
    ):
        assert figure in proc.stdout


def test_training_flops_count_every_matmul(single_rank):
    """The benchmark's FLOP count, against one written out from the shapes (tiny SALM)."""
    from salm_megatron.bench import PEAK_BF16_TFLOPS, peak_tflops, training_flops
    from salm_megatron.data import collate
    from salm_megatron.models import build_speech_llm
    from tests.speech_fixtures import speech_samples, tiny_config

    cfg = tiny_config("salm")
    (model,) = build_speech_llm(cfg)
    batch = collate(speech_samples("salm"))
    b, length = batch["input_ids"].shape[0], 40
    llm = cfg.llm
    h, kv = llm.hidden_size, llm.num_query_groups * llm.head_dim
    q = llm.num_attention_heads * llm.head_dim
    layer = h * (q + 2 * kv) + q * h + h * 2 * llm.ffn_hidden_size + llm.ffn_hidden_size * h
    per_position = 2 * (llm.num_layers * layer + llm.padded_vocab_size * h)
    attention = 2 * llm.num_layers * b * length**2 * q
    audio = sum(p.numel() for p in model.audio.parameters() if p.dim() >= 2)
    frames = int(model.encoder_frames(batch["audio_lengths"]).sum())
    expected = 3 * (per_position * b * length + attention + 2 * audio * frames)
    assert training_flops(model, batch, length) == expected
    assert peak_tflops("NVIDIA H200") == PEAK_BF16_TFLOPS["H200"] and peak_tflops("CPU") is None


def test_bench_data_prints_throughput():
    import subprocess
    import sys

    command = ["bench-data", "--clips", "4", "--seconds", "0.5"]
    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", *command],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 clips, 2 s of audio" in proc.stdout and "x real time per worker" in proc.stdout


def test_bench_decode_prints_its_figures():
    """Decoding benchmark (tiny sizes): every strategy of both archs, with every figure."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "bench-decode", "--batch", "2", "--seconds",
         "1", "--new-tokens", "4", "--warmup", "0", "--repeats", "1", "--beam-size", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in ("device ", "ms/batch", "new tokens/s", "RTF", "cache speed-up"):
        assert figure in proc.stdout
    for arch in ("salm", "bestow"):
        for strategy in ("greedy, KV cache", "greedy, no cache", "beam 2, KV cache"):
            assert f"{arch} {strategy}" in proc.stdout
