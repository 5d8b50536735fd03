"""Turn samples into the batch the speech models read (see ``models/speech_llm.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SpeechSample:
    """One tokenized sample: its tokens, which of them are the answer, and its audio segments."""

    input_ids: list[int]
    answer_mask: list[int]  # 1 on answer tokens (answer and EOS)
    audio: list[torch.Tensor] = field(default_factory=list)  # 1-D waveforms, 16 kHz mono
    key: Optional[str] = None  # the shard sample it came from
    # Per audio segment, the token ids of what is spoken (auxiliary CTC targets); None: unknown.
    transcripts: Optional[list[Optional[list[int]]]] = None

    def __post_init__(self):
        if len(self.input_ids) != len(self.answer_mask):
            raise ValueError(
                f"input_ids has {len(self.input_ids)} tokens, answer_mask {len(self.answer_mask)}"
            )
        if self.transcripts is not None and len(self.transcripts) != len(self.audio):
            raise ValueError(
                f"{len(self.transcripts)} transcripts for {len(self.audio)} audio segments"
            )
        for i, wave in enumerate(self.audio):
            if wave.dim() != 1 or wave.numel() == 0:
                raise ValueError(
                    f"audio segment {i} must be a non-empty 1-D waveform, got {tuple(wave.shape)}"
                )


def collate(samples: list[SpeechSample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad tokens and audio; segments listed sample by sample, in order."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(samples), length), dtype=torch.long)
    segments, owner = [], []
    for i, sample in enumerate(samples):
        input_ids[i, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        answer_mask[i, : len(sample.answer_mask)] = torch.tensor(sample.answer_mask)
        segments += sample.audio
        owner += [i] * len(sample.audio)
    audio_lengths = torch.tensor([len(w) for w in segments], dtype=torch.long)
    audio = torch.zeros((len(segments), int(audio_lengths.max()) if segments else 0))
    for j, wave in enumerate(segments):
        audio[j, : len(wave)] = wave
    batch = {
        "input_ids": input_ids,
        "answer_mask": answer_mask,
        "audio": audio,
        "audio_lengths": audio_lengths,
        "audio_owner": torch.tensor(owner, dtype=torch.long),
        "text_lengths": torch.tensor([len(s.input_ids) for s in samples], dtype=torch.long),
    }
    if any(s.transcripts for s in samples):
        batch.update(_transcripts(samples))
    return batch


def _transcripts(samples: list[SpeechSample]) -> dict[str, torch.Tensor]:
    """``transcripts [n, L]`` (zero-padded) and ``transcript_lengths [n]`` (0: unknown)."""
    rows = [t or [] for s in samples for t in (s.transcripts or [None] * len(s.audio))]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    padded = torch.zeros((len(rows), max(1, int(lengths.max()) if rows else 1)), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return {"transcripts": padded, "transcript_lengths": lengths}
