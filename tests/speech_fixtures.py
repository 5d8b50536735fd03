"""Tiny speech-model configs and deterministic (audio, text) samples shared by the tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from salm_megatron.config import (
    AdapterConfig,
    BestowConfig,
    Config,
    EncoderConfig,
    ModelConfig,
    ParallelConfig,
    SpecAugmentConfig,
)
from salm_megatron.data import SpeechSample

AUDIO_TOKEN = 255
SAMPLE_RATE = 16000


def tiny_config(arch: str, parallel: ParallelConfig | None = None, **model) -> Config:
    """Tiny LLM + tiny FastConformer, dropout and SpecAugment off (deterministic gradients)."""
    encoder = EncoderConfig(
        dropout=0.0,
        dropout_pre_encoder=0.0,
        dropout_att=0.0,
        spec_augment=SpecAugmentConfig(freq_masks=0, time_masks=0),
    )
    return Config(
        model=ModelConfig(arch=arch, audio_token_id=AUDIO_TOKEN, **model),
        encoder=encoder,
        adapter=AdapterConfig(type="mlp", stack=2, hidden_size=128),
        bestow=BestowConfig(num_layers=2, num_heads=4),
        parallel=parallel or ParallelConfig(),
    )


def waveform(seconds: float, seed: int, f0: float | None = None) -> torch.Tensor:
    """A deterministic speech-like signal: drifting harmonics under an envelope, plus noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 100 + 150 * torch.rand(1, generator=g) if f0 is None else f0
    phase = 2 * math.pi * f0 * (t + 0.3 * t**2)
    wave = sum(torch.sin(k * phase) / k for k in range(1, 5))
    envelope = 0.5 * (1 - torch.cos(2 * math.pi * t * (2 + 3 * torch.rand(1, generator=g))))
    return 0.3 * wave * envelope + 0.01 * torch.randn(len(t), generator=g)


def prompt(tokens: list[int], arch: str, segments: int) -> list[int]:
    """SALM prompts carry one placeholder per segment; BESTOW prompts are text only."""
    return [1, *([AUDIO_TOKEN] * segments if arch == "salm" else []), *tokens]


def speech_samples(arch: str) -> list[SpeechSample]:
    """Four samples: audio of different lengths, one with two segments (one of them without a
    transcript), one text-only."""
    specs = [  # (segment seconds, prompt tokens, answer tokens, what each segment says)
        ([0.41], [5, 6], [20, 21, 22, 2], [[40, 41]]),
        ([0.23, 0.37], [7], [23, 24, 2], [[42], None]),
        ([0.88], [5, 6, 8], [25, 26, 27, 28, 2], [[43, 44, 45]]),
        ([], [9, 10, 11], [29, 2], []),
    ]
    samples = []
    for i, (seconds, prompt_tokens, answer, spoken) in enumerate(specs):
        ids = prompt(prompt_tokens, arch, len(seconds))
        samples.append(
            SpeechSample(
                input_ids=ids + answer,
                answer_mask=[0] * len(ids) + [1] * len(answer),
                audio=[waveform(s, seed=10 * i + j) for j, s in enumerate(seconds)],
                transcripts=spoken,
            )
        )
    return samples


def wake_zero_outputs(model) -> None:
    """Random values for BESTOW's zero-initialised output projections, which would otherwise
    hide its block (from gradients, and from decoding)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cross_attention" in name and p.abs().sum() == 0:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def prompt_samples(arch: str) -> list[SpeechSample]:
    """Three prompts to continue: audio of different lengths and prompt lengths, and one without
    audio (so the batch's left padding differs per sample)."""
    specs = [([0.41], [5, 6]), ([0.88], [7, 8, 9, 10, 11]), ([], [12])]
    samples = []
    for i, (seconds, tokens) in enumerate(specs):
        ids = prompt(tokens, arch, len(seconds))
        audio = [waveform(s, seed=100 + i) for s in seconds]
        samples.append(SpeechSample(ids, [0] * len(ids), audio, key=f"prompt{i}"))
    return samples


CORPUS = [
    "transcribe the audio please",
    "the quick brown fox jumps over the lazy dog",
    "what is the sum of the numbers",
    "one two three four five six seven eight nine ten",
    "Q: question A: answer user assistant INST",
] * 20
CHAT_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"]  # fmt: skip


def make_hf_tokenizer(folder: Path, extra_special=()) -> Path:
    """A small byte-level BPE tokenizer.json (+ tokenizer_config.json) with Llama-3 chat tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", *CHAT_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


WORDS = ["one", "two", "three", "four"]


def write_speech_shards(folder: Path, count: int, seed: int, per_shard: int = 16) -> str:
    """Webdataset shards of a tiny ASR task: the pitch of a speech-like signal names the word
    (one of :data:`WORDS`), so the answer depends on the audio. Returns the shard pattern."""
    import webdataset as wds

    from salm_megatron.data.audio_io import encode_flac

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            word = i % len(WORDS)
            wave = waveform(0.3 + 0.05 * (i % 5), seed=seed + i, f0=100.0 + 60.0 * word)
            sink.write({
                "__key__": f"utt-{seed}-{i:04d}",
                "flac": encode_flac(wave),
                "json": {"answer": WORDS[word], "task": "asr"},
            })  # fmt: skip
    shards = sorted(folder.glob("shard-*.tar"))
    return str(folder / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")


def training_config(folder: Path, arch: str) -> dict:
    """Tiny SALM/BESTOW training on :func:`write_speech_shards` data under ``folder``, as a
    config mapping for ``salm train`` (deterministic: no dropout, no SpecAugment)."""
    tokenizer = make_hf_tokenizer(folder / "tokenizer")
    if not (folder / "train").is_dir():
        write_speech_shards(folder / "train", 64, seed=0)
        write_speech_shards(folder / "valid", 8, seed=1000)
    from salm_megatron.data import load_tokenizer

    vocab = load_tokenizer(tokenizer).vocab_size  # its tokens + the audio placeholder
    return {
        "model": {"arch": arch, "audio_token_id": vocab - 1},
        "llm": {"vocab_size": vocab},
        "encoder": {
            "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_att": 0.0,
            "spec_augment": {"freq_masks": 0, "time_masks": 0},
        },
        "adapter": {"type": "mlp", "stack": 2, "hidden_size": 128},
        "bestow": {"num_layers": 1, "num_heads": 4},
        "data": {
            "train_shards": str(folder / "train" / "shard-{000000..000003}.tar"),
            "valid_shards": str(folder / "valid" / "shard-000000.tar"),
            "tokenizer": str(tokenizer), "micro_batch_size": 4, "num_workers": 1,
            "bucket_window": 16, "shuffle_buffer": 8,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 12, "num_microbatches": 2, "log_interval": 1},
        "checkpoint": {"interval": None},
    }  # fmt: skip


def ddp_step(model, optimizer) -> float:
    """One training step on the tiny SALM batch under Megatron DDP, as the loop takes it (the
    step must apply); returns the loss."""
    from salm_megatron.data import collate
    from salm_megatron.training.optimizer import optimizer_step

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = model[0](collate(speech_samples("salm"))).sum()
    loss.backward()
    model[0].finish_grad_sync()
    assert optimizer_step(optimizer, clip_grad=1.0)[0]
    return loss.item()
