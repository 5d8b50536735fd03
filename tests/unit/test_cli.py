"""Proves `salm config` prints the resolved config and explains bad input with exit code 2."""

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
         "--warmup", "0", "--repeats", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in (
        "audio s/s",
        "salm forward+backward",
        "bestow forward+backward",
        "SALM / BESTOW",
    ):
        assert figure in proc.stdout


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
