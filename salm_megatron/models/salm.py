"""SALM: audio embeddings spliced into the prompt in place of placeholder tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .speech_llm import (
    Layout,
    SpeechLLM,
    embedding_lengths,
    left_align,
    next_token_targets,
    on_host,
    padded_length,
)


@dataclass
class SpliceLayout(Layout):
    """Per merged position: the text token it copies, or the audio segment and frame."""

    text_position: torch.Tensor  # [b, S] index into the sample's tokens, -1 elsewhere
    audio_segment: torch.Tensor  # [b, S] segment index, -1 elsewhere
    audio_frame: torch.Tensor  # [b, S]


def splice_layout(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    segment_lengths: torch.Tensor,
    audio_token_id: int,
    multiple: int,
    sequence_length: int | None = None,
    text_lengths: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> SpliceLayout:
    """Lay out each sample's tokens with every placeholder replaced by its segment's frames.

    ``text_lengths [b]`` (tokens before right padding) keeps a sample's text padding out of the
    merged sequence, so a sample's length there is its own, not the batch's longest text's.
    The inputs are read on the host (pass host tensors: no sync); the layout goes to ``device``
    (default: that of ``input_ids``).
    """
    b, s = input_ids.shape
    real = torch.ones(b, s, dtype=torch.bool)
    if text_lengths is not None:
        real = torch.arange(s)[None, :] < text_lengths.cpu()[:, None]
    is_placeholder = input_ids.cpu() == audio_token_id
    if bool((is_placeholder & ~real).any()):
        raise ValueError("an audio placeholder lies in a sample's padding (past text_lengths)")
    found, given = int(is_placeholder.sum()), len(segment_lengths)
    if found != given:
        raise ValueError(
            f"the batch has {found} audio placeholders (token id {audio_token_id}) but {given} "
            "audio segments; each segment needs exactly one placeholder"
        )
    if bool((answer_mask.cpu().bool() & is_placeholder).any()):
        raise ValueError("answer_mask marks an audio placeholder; answers must be text")

    # Each token takes one position; a placeholder takes its segment's frame count; padding none.
    width = real.long()
    width[is_placeholder] = segment_lengths.cpu().long()  # row-major = segment order
    starts = width.cumsum(1) - width
    total = width.sum(1)
    length = padded_length(int(total.max()), multiple, sequence_length)

    text_position = torch.full((b, length), -1, dtype=torch.long)
    audio_segment = torch.full((b, length), -1, dtype=torch.long)
    audio_frame = torch.zeros((b, length), dtype=torch.long)
    rows, cols = torch.nonzero(real & ~is_placeholder, as_tuple=True)
    text_position[rows, starts[rows, cols]] = cols
    for segment, (row, col) in enumerate(torch.nonzero(is_placeholder).tolist()):
        span = slice(int(starts[row, col]), int(starts[row, col]) + int(segment_lengths[segment]))
        audio_segment[row, span] = segment
        audio_frame[row, span] = torch.arange(int(segment_lengths[segment]))

    is_text = text_position >= 0
    source = text_position.clamp(min=0)
    merged_ids = torch.where(is_text, input_ids.cpu().gather(1, source), 0)
    merged_answer = is_text & answer_mask.cpu().bool().gather(1, source)
    labels, loss_mask = next_token_targets(merged_ids, merged_answer)
    device = input_ids.device if device is None else device
    sent = {
        name: tensor.to(device, non_blocking=True)
        for name, tensor in (("labels", labels), ("loss_mask", loss_mask),
                             ("text_position", text_position), ("audio_segment", audio_segment),
                             ("audio_frame", audio_frame))
    }  # fmt: skip
    return SpliceLayout(
        length=length, position_ids=torch.arange(length, device=device).expand(b, length), **sent
    )


class SALM(SpeechLLM):
    """Speech-augmented LM: the LLM reads ``[prompt text, audio frames, more text, answer]``."""

    def layout(self, batch: dict, sequence_length: int | None) -> SpliceLayout:
        device = batch["input_ids"].device
        batch = on_host(batch)
        lengths = batch.get("audio_lengths")
        segment_lengths = (
            embedding_lengths(self.cfg, lengths)
            if lengths is not None
            else torch.zeros(0, dtype=torch.long)
        )
        return splice_layout(
            batch["input_ids"],
            batch["answer_mask"],
            segment_lengths,
            self.cfg.placeholder_id,
            self.pad_multiple,
            sequence_length,
            batch.get("text_lengths"),
            device,
        )

    def embed(self, batch: dict, layout: SpliceLayout) -> torch.Tensor:
        ids = batch["input_ids"]
        b, s = ids.shape
        text = self.text_embeddings(ids, torch.arange(s, device=ids.device).expand(b, s))
        h = text.shape[-1]
        audio, _, keep_in_graph = self.encode_audio(batch)  # lengths as the layout planned them
        frames = audio.shape[1] if audio.numel() else 1
        # One table of rows to gather from: text tokens, audio frames, then a zero row (padding).
        table = torch.cat(
            [text.transpose(0, 1).reshape(b * s, h), audio.reshape(-1, h), text.new_zeros(1, h)]
        )
        pad_row = table.shape[0] - 1
        rows = torch.arange(b, device=ids.device)[:, None] * s + layout.text_position
        audio_rows = b * s + layout.audio_segment * frames + layout.audio_frame
        index = torch.where(layout.text_position >= 0, rows, pad_row)
        index = torch.where(layout.audio_segment >= 0, audio_rows, index)
        merged = table[index]  # [b, S, h]
        return merged.transpose(0, 1).contiguous() + keep_in_graph

    def prompt_embeddings(self, batch: dict):
        layout = self.layout(batch, None)
        lengths = ((layout.text_position >= 0) | (layout.audio_segment >= 0)).sum(1)
        emb, valid = left_align(self.embed(batch, layout), lengths)
        return emb, valid, None
