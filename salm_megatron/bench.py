"""``salm bench``: encoder throughput and SALM vs BESTOW step time on this machine.

One process (TP=PP=1) on the GPU when there is one, else the CPU. Prints:

- encoder: features + FastConformer + adapter forward on ``--batch`` clips of ``--seconds``,
  in audio seconds per second (inference, no gradients);
- SALM and BESTOW: forward + backward of the whole model under Megatron's DDP (as training runs
  it, without the optimizer step) on the same batch (the same audio and text), in seconds per
  step, with the length of the sequence the LLM reads, the model's matmul TFLOP/s and, in bf16
  on a GPU of known peak (or ``--peak-tflops``), its MFU.

``salm bench-decode`` (:func:`decode_main`) times generation on the same kind of batch, and
``salm bench-data`` (:func:`data_main`) the data loader.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .config import Config, ConfigError, apply_overrides


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _samples(cfg: Config, batch: int, seconds: float, prompt: int, answer: int) -> list:
    """``batch`` clips of noise-like audio, each with a ``prompt``-token prompt and an answer."""
    from .data import SpeechSample

    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(batch):
        audio = 0.1 * torch.randn(int(seconds * cfg.encoder.features.sample_rate), generator=g)
        text = torch.randint(0, cfg.placeholder_id, (prompt + answer,), generator=g).tolist()
        placeholder = [cfg.placeholder_id] if cfg.model.arch == "salm" else []
        ids = placeholder + text
        mask = [0] * (len(placeholder) + prompt) + [1] * answer
        samples.append(SpeechSample(ids, mask, [audio]))
    return samples


def _batch(cfg: Config, batch: int, seconds: float, prompt: int, answer: int, device) -> dict:
    from .data import collate
    from .models.host import to_device

    samples = _samples(cfg, batch, seconds, prompt, answer)
    return to_device(collate(samples), device)  # with its host copy, as training moves batches


# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name, for MFU.
PEAK_BF16_TFLOPS = {"B200": 2250, "H200": 989, "H100": 989, "H800": 989, "GH200": 989,
                    "A100": 312, "A800": 312, "L40S": 362, "A10G": 70}  # fmt: skip


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``device_name`` (None when not in the table)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def _matmul_weights(module: torch.nn.Module | None) -> int:
    """Elements of the weights a token or frame is multiplied with (matrices and kernels)."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def decoder_weights_per_token(model) -> float:
    """The LLM decoder's matmul weights one position goes through: with MoE, its router's
    top k of each layer's experts (the others' weights are not multiplied with it)."""
    decoder, llm = model.llm.decoder, model.cfg.llm
    weights = _matmul_weights(decoder)
    if llm.is_moe:
        experts = sum(p.numel() for n, p in decoder.named_parameters() if ".experts." in n)
        weights -= experts * (1 - llm.moe_router_topk / llm.num_moe_experts)
    return weights


def training_flops(model, batch: dict, length: int) -> float:
    """Matmul FLOPs of one forward + backward (3 forwards' worth): per LLM position 2 per
    decoder weight, the output layer and causal attention (QK and AV over half the sequence on
    average); per encoder frame 2 per weight of the audio path; per text token 2 per weight of
    the BESTOW block, as if every part trained. Embedding lookups, norms and the encoder's
    attention scores are left out."""
    from .models.host import on_host

    cfg, host = model.cfg, on_host(batch)
    llm, b = cfg.llm, host["input_ids"].shape[0]
    positions = b * length
    per_position = 2 * (decoder_weights_per_token(model) + llm.padded_vocab_size * llm.hidden_size)
    attention = 2 * llm.num_layers * b * length * length * llm.num_attention_heads * llm.head_dim
    frames = int(model.encoder_frames(host["audio_lengths"]).sum())
    audio = 2 * _matmul_weights(model.audio) * frames
    block = 2 * _matmul_weights(getattr(model, "cross_attention", None)) * host["input_ids"].numel()
    return 3.0 * (per_position * positions + attention + audio + block)


def _model(cfg: Config, device, dtype) -> torch.nn.Module:
    """The whole model (TP=PP=1), randomly initialised from ``cfg.seed``, on ``device``."""
    from .models import build_speech_llm

    torch.manual_seed(cfg.seed)
    (model,) = build_speech_llm(cfg, params_dtype=dtype)
    return model.to(device)


def _measure(cfg: Config, args, device, dtype) -> tuple[float, float, int, float]:
    """Encoder forward time, model forward+backward time, LLM sequence length and the step's
    matmul FLOPs for one arch."""
    from .training.optimizer import wrap_ddp

    model = _model(cfg, device, dtype)
    batch = _batch(cfg, args.batch, args.seconds, args.prompt, args.answer, device)
    model.eval()
    with torch.no_grad():
        encode = _time(
            lambda: model.audio(batch["audio"], batch["audio_lengths"]), args.warmup, args.repeats
        )
    model.train()
    (ddp,) = wrap_ddp(cfg, [model])  # as training runs it: gradients into DDP's main_grad

    def step():
        ddp.zero_grad_buffer()
        ddp(batch).float().sum().backward()
        ddp.finish_grad_sync()

    length = model.layout(batch, None).length
    return (
        encode,
        _time(step, args.warmup, args.repeats),
        length,
        training_flops(model, batch, length),
    )


def one_process(cfg: Config, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """One-process parallel state (torn down by ``parallel.teardown``); the device (the GPU
    when there is one) and the dtype named ``fp32`` or ``bf16``."""
    from . import parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    parallel.initialize(cfg.parallel, seed=cfg.seed, rank=0, world_size=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]


def _start(cfg: Config, args) -> tuple[torch.device, torch.dtype]:
    """:func:`one_process`, printed with the model's sizes."""
    device, dtype = one_process(cfg, args.dtype)
    on_gpu = device.type == "cuda"
    where = torch.cuda.get_device_name() if on_gpu else f"CPU x{torch.get_num_threads()}"
    print(f"device {where}, {args.dtype}; batch {args.batch} x {args.seconds:g} s of audio")
    print(
        f"encoder d_model {cfg.encoder.d_model} x {cfg.encoder.num_layers} layers, adapter "
        f"{cfg.adapter.type}; LLM hidden {cfg.llm.hidden_size} x {cfg.llm.num_layers} layers"
    )
    return device, dtype


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(cfg: Config, args) -> None:
    from . import parallel

    device, dtype = _start(cfg, args)
    audio_seconds = args.batch * args.seconds
    results = {}
    for arch in ("salm", "bestow"):
        results[arch] = _measure(apply_overrides(cfg, [f"model.arch={arch}"]), args, device, dtype)
        _free(device)

    encode = results["salm"][0]
    print(f"encoder forward: {encode * 1e3:8.1f} ms/batch  {audio_seconds / encode:9.1f} audio s/s")
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and dtype == torch.bfloat16:
        peak = peak_tflops(torch.cuda.get_device_name())
    for arch, (_, seconds, length, flops) in results.items():
        tflops = flops / seconds / 1e12
        mfu = f"  MFU {tflops / peak:6.1%}" if peak else ""
        print(
            f"{arch:>6} forward+backward: {seconds * 1e3:8.1f} ms/step  LLM sequence {length:5d}  "
            f"{audio_seconds / seconds:8.1f} audio s/s  {tflops:7.2f} TFLOP/s{mfu}"
        )
    print(f"SALM / BESTOW step time: {results['salm'][1] / results['bestow'][1]:.2f}")
    parallel.teardown()


def _parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The options both model benchmarks take."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    parser.add_argument("overrides", nargs="*", help="config key.sub=value overrides")
    parser.add_argument("--batch", type=int, default=4, help="clips per batch (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; median (default 3)")
    return parser


def _parse(parser, argv, positive: tuple[str, ...]) -> tuple[argparse.Namespace, Config | None]:
    """Checked arguments and the config they resolve to (None, explained, on a config error)."""
    args = parser.parse_args(argv)
    for name in ("batch", "prompt", "repeats", *positive):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} must be at least 0")
    if not 0 < args.seconds <= 600 or math.isnan(args.seconds):
        parser.error(f"--seconds={args.seconds} must be in (0, 600]")
    try:
        return args, apply_overrides(Config(), args.overrides)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return args, None


def main(argv: list[str] | None = None) -> int:
    parser = _parser(
        "salm bench",
        __doc__,
        "example: salm bench encoder.preset=fastconformer-large --batch 4 --seconds 10",
    )
    parser.add_argument("--answer", type=int, default=48, help="answer tokens (default 48)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None,
        help="the device's peak TFLOP/s for MFU (default: the bf16 peak of known GPUs)",
    )  # fmt: skip
    args, cfg = _parse(parser, argv, ("answer",))
    if cfg is None:
        return 2
    run(cfg, args)
    return 0


# ------------------------------------------------------------------------------------- decoding


def _decode(cfg: Config, args, device, dtype) -> list[tuple[str, float, int]]:
    """(strategy, median seconds per batch, new tokens returned) for one arch."""
    import dataclasses

    from .inference.generation import Generator

    model = _model(cfg, device, dtype)
    samples = _samples(cfg, args.batch, args.seconds, args.prompt, 0)
    greedy = dataclasses.replace(cfg.decode, strategy="greedy", max_new_tokens=args.new_tokens)
    beam = dataclasses.replace(greedy, strategy="beam", beam_size=args.beam_size)
    runs = [("greedy, KV cache", greedy, True)]
    if args.uncached or args.new_tokens <= 64:
        runs.append(("greedy, no cache", greedy, False))
    runs.append((f"beam {args.beam_size}, KV cache", beam, True))

    def timed(decoding, use_cache: bool) -> tuple[float, int]:
        # No stop token can be produced: every strategy returns exactly --new-tokens per clip.
        generator = Generator(
            model,
            decoding,
            stop_ids={-1},
            vocab_size=cfg.llm.vocab_size,
            banned_ids=(cfg.placeholder_id,),
        )
        outputs = []
        seconds = _time(
            lambda: outputs.append(generator.generate(samples, use_cache)),
            args.warmup,
            args.repeats,
        )
        return seconds, sum(map(len, outputs[-1]))

    return [(name, *timed(decoding, use_cache)) for name, decoding, use_cache in runs]


def decode_run(cfg: Config, args) -> None:
    from . import parallel
    from .inference.loading import generation_config

    cfg = generation_config(cfg, 1, [])  # what salm eval decodes with: local spec, no SP
    device, dtype = _start(cfg, args)
    audio_seconds = args.batch * args.seconds
    print(
        f"{args.prompt} prompt tokens, {args.new_tokens} new tokens per clip; RTF = decode time / "
        f"audio time; median of {args.repeats}"
    )
    archs = ("salm", "bestow") if args.arch == "both" else (args.arch,)
    for arch in archs:
        results = _decode(apply_overrides(cfg, [f"model.arch={arch}"]), args, device, dtype)
        _free(device)
        times = {name: seconds for name, seconds, _ in results}
        for name, seconds, tokens in results:
            line = (
                f"{arch:>6} {name:<18} {seconds * 1e3:9.1f} ms/batch  {tokens / seconds:8.1f} "
                f"new tokens/s  RTF {seconds / audio_seconds:7.4f}"
            )
            if name == "greedy, no cache":
                line += f"  cache speed-up {seconds / times['greedy, KV cache']:.2f}x"
            print(line, flush=True)
    parallel.teardown()


def decode_main(argv: list[str] | None = None) -> int:
    """``salm bench-decode``: generation speed, greedy (with and without the KV cache) and beam."""
    parser = _parser(
        "salm bench-decode",
        "Decoding speed of a randomly initialised SALM and BESTOW on one process: greedy with and "
        "without the KV cache, and beam search. No stop token is allowed, so every strategy "
        "produces exactly --new-tokens per clip; the time includes the audio encoder and the "
        "prompt, as salm eval pays them.",
        "example: salm bench-decode encoder.preset=fastconformer-large --batch 4 --seconds 10 "
        "--new-tokens 32 --beam-size 4",
    )
    parser.add_argument("--arch", choices=("salm", "bestow", "both"), default="both")
    parser.add_argument("--new-tokens", type=int, default=32, help="per clip (default 32)")
    parser.add_argument("--beam-size", type=int, default=4, help="beam width (default 4)")
    parser.add_argument(
        "--uncached", action="store_true", help="time greedy without the cache above 64 tokens too"
    )
    args, cfg = _parse(parser, argv, ("new_tokens", "beam_size"))
    if cfg is None:
        return 2
    decode_run(cfg, args)
    return 0


def _synthetic_shards(folder: str, clips: int, seconds: float) -> list[str]:
    """Shards of FLAC clips (harmonics under an envelope, plus noise) for a standalone run."""
    import numpy as np
    import webdataset as wds

    from .data.audio_io import encode_flac

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    pattern = f"{folder}/bench-%06d.tar"
    with wds.ShardWriter(pattern, maxcount=max(1, clips // 2), verbose=0) as sink:
        for i in range(clips):
            f0 = rng.uniform(90, 250)
            wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5))
            wave *= 0.5 * (1 - np.cos(2 * np.pi * 3 * t)) * 0.2
            wave += 0.01 * rng.standard_normal(len(t))
            sink.write(
                {"__key__": f"clip{i:06d}", "flac": encode_flac(wave), "json": {"answer": "x"}}
            )
    return sorted(str(p) for p in Path(folder).glob("bench-*.tar"))


class _Featurized(torch.utils.data.IterableDataset):
    """The loader's samples turned into log-mel features inside the worker; yields seconds."""

    def __init__(self, stream, features_cfg):
        self.stream, self.features_cfg = stream, features_cfg

    def __iter__(self):
        from .audio import LogMelFeatures

        features = LogMelFeatures(self.features_cfg)
        for sample in self.stream:
            wave = sample["audio"]
            features(wave[None], torch.tensor([len(wave)]))
            yield len(wave) / sample["sample_rate"]


def data_main(argv: list[str] | None = None) -> int:
    """``salm bench-data``: loader throughput (decode + resample + log-mel) per worker."""
    import tempfile

    from torch.utils.data import DataLoader

    from .config import FeatureConfig
    from .data.loader import SampleStream

    parser = argparse.ArgumentParser(
        prog="salm bench-data",
        description="Loader throughput: shards read, decoded, resampled and turned into log-mel "
        "features by DataLoader workers; audio seconds per second per worker.",
        epilog="example: salm bench-data --workers 1   |   salm bench-data 'data/shard-*.tar'",
    )
    parser.add_argument("shards", nargs="*", help="shard paths or patterns (default: synthetic)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    parser.add_argument("--clips", type=int, default=200, help="synthetic clips (default 200)")
    parser.add_argument("--seconds", type=float, default=5.0, help="synthetic clip length (5)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.clips < 1 or not args.seconds > 0:
        parser.error("--workers and --clips must be >= 1 and --seconds > 0")
    with tempfile.TemporaryDirectory() as folder:
        shards = args.shards or _synthetic_shards(folder, args.clips, args.seconds)
        work = _Featurized(SampleStream(shards, shuffle=False), FeatureConfig())
        loader = DataLoader(work, batch_size=None, num_workers=args.workers)
        audio_seconds, count, start = 0.0, 0, time.perf_counter()
        for seconds in loader:
            audio_seconds += seconds
            count += 1
        elapsed = time.perf_counter() - start
    print(
        f"{count} clips, {audio_seconds:.0f} s of audio in {elapsed:.2f} s with {args.workers} "
        f"worker(s): {audio_seconds / elapsed / args.workers:.0f}x real time per worker "
        f"(read, decode, resample and log-mel in each worker, one thread each)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
