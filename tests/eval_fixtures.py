"""A tiny Whisper SALM that takes at most 1 s of audio, and a shard with clips around that limit,
shared by the evaluation tests (tests/unit/test_evaluation.py, tests/parallel)."""

from __future__ import annotations

from pathlib import Path

from salm_megatron.config import Config, config_from_dict
from salm_megatron.data import load_tokenizer
from tests.speech_fixtures import make_hf_tokenizer, waveform

# key: (seconds, answer), in shard order. Whisper here encodes at most 1 s (50 positions).
CLIPS = {
    "utt0-short": (0.5, "one two"),
    "utt1-silent": (0.4, ""),  # nothing to say: a prediction here is all insertions
    "utt2-long": (2.0, "three four"),  # over the encoder's limit
    "utt3-short": (0.6, "five"),
    "utt4-tiny": (0.05, "six"),
}


def write_eval_shard(folder: Path) -> str:
    """``folder/shard-000000.tar`` with :data:`CLIPS`; returns its path."""
    import webdataset as wds

    from salm_megatron.data.audio_io import encode_flac

    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i, (key, (seconds, answer)) in enumerate(CLIPS.items()):
            sink.write({"__key__": key, "flac": encode_flac(waveform(seconds, seed=i)),
                        "json": {"answer": answer, "task": "asr"}})  # fmt: skip
    return str(folder / "shard-000000.tar")


def whisper_eval_config(folder: Path, **data) -> Config:
    """The tiny Whisper SALM (its tokenizer under ``folder``), durations 0.1 .. 1 s, greedy
    decoding of 4 tokens one utterance at a time; ``data`` overrides data.* fields."""
    tokenizer = make_hf_tokenizer(folder / "tokenizer")
    vocab = load_tokenizer(tokenizer).vocab_size  # its tokens + the audio placeholder
    return config_from_dict({
        "model": {"arch": "salm", "audio_token_id": vocab - 1},
        "llm": {"vocab_size": vocab},
        "encoder": {"preset": "tiny-whisper", "max_source_positions": 50,
                    "spec_augment": {"freq_masks": 0, "time_masks": 0}},
        "adapter": {"type": "mlp", "stack": 2, "hidden_size": 128},
        "data": {"tokenizer": str(tokenizer), "min_duration": 0.1, "max_duration": 1.0, **data},
        "decode": {"max_new_tokens": 4, "batch_size": 1},
    })  # fmt: skip
