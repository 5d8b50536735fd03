"""SALM: audio embeddings spliced into the prompt in place of placeholder tokens."""

from __future__ import annotations

import torch

from .host import on_host, sent_like
from .layout import Layout, arrange
from .speech_llm import SpeechLLM, embedding_lengths, left_align


def splice_layout(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    segment_lengths: torch.Tensor,
    audio_token_id: int,
    multiple: int,
    sequence_length: int | None = None,
    text_lengths: torch.Tensor | None = None,
    device: torch.device | None = None,
    packed: bool = False,
) -> Layout:
    """Lay out each sample's tokens with every placeholder replaced by its segment's frames.

    The embedding table the layout's ``source`` indexes holds the ``b * s`` token embeddings
    (sample-major), then the segments' frames one segment after another, then a zero row.
    ``text_lengths [b]`` (tokens before right padding) keeps a sample's text padding out of its
    sequence. The inputs are read on the host (pass host tensors: no sync); the layout goes to
    ``device`` (default: that of ``input_ids``).
    """
    b, s = input_ids.shape
    ids, answer = input_ids.cpu(), answer_mask.cpu().bool()
    segment_lengths = segment_lengths.cpu().long()
    real = torch.ones(b, s, dtype=torch.bool)
    if text_lengths is not None:
        real = torch.arange(s)[None, :] < text_lengths.cpu()[:, None]
    is_placeholder = ids == audio_token_id
    if bool((is_placeholder & ~real).any()):
        raise ValueError("an audio placeholder lies in a sample's padding (past text_lengths)")
    found, given = int(is_placeholder.sum()), len(segment_lengths)
    if found != given:
        raise ValueError(
            f"the batch has {found} audio placeholders (token id {audio_token_id}) but {given} "
            "audio segments; each segment needs exactly one placeholder"
        )
    if bool((answer & is_placeholder).any()):
        raise ValueError("answer_mask marks an audio placeholder; answers must be text")

    # Each token takes one position; a placeholder takes its segment's frame count; padding none.
    width = real.long()
    width[is_placeholder] = segment_lengths  # row-major = segment order
    starts = width.cumsum(1) - width
    lengths = width.sum(1)
    first_frame = b * s + segment_lengths.cumsum(0) - segment_lengths  # each segment's row
    pad_row = b * s + int(segment_lengths.sum())
    source = torch.full((b, int(lengths.max())), pad_row, dtype=torch.long)
    rows, cols = torch.nonzero(real & ~is_placeholder, as_tuple=True)
    source[rows, starts[rows, cols]] = rows * s + cols
    for segment, (row, col) in enumerate(torch.nonzero(is_placeholder).tolist()):
        start, n = int(starts[row, col]), int(segment_lengths[segment])
        source[row, start : start + n] = first_frame[segment] + torch.arange(n)

    is_text = source < b * s
    text = source.clamp(max=b * s - 1)
    merged_ids = torch.where(is_text, ids.flatten()[text], 0)
    merged_answer = is_text & answer.flatten()[text]
    return arrange(
        source, merged_ids, merged_answer, lengths, pad_source=pad_row, multiple=multiple,
        sequence_length=sequence_length, packed=packed,
        device=input_ids.device if device is None else device,
    )  # fmt: skip


class SALM(SpeechLLM):
    """Speech-augmented LM: the LLM reads ``[prompt text, audio frames, more text, answer]``."""

    def layout(self, batch: dict, sequence_length: int | None, packed: bool = False) -> Layout:
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
            packed,
        )

    def embed(self, batch: dict, layout: Layout) -> torch.Tensor:
        ids = batch["input_ids"]
        b, s = ids.shape
        text = self.text_embeddings(ids, torch.arange(s, device=ids.device).expand(b, s))
        h = text.shape[-1]
        audio, planned, keep_in_graph = self.encode_audio(batch)
        # Each segment's planned frames of the padded [n, t, h] (index made on the host).
        frames = [k * audio.shape[1] + torch.arange(n) for k, n in enumerate(planned.tolist())]
        frames = sent_like(torch.cat(frames) if frames else torch.zeros(0, dtype=torch.long), ids)
        # The layout's table: text tokens, audio frames, then a zero row (padding).
        table = torch.cat([
            text.transpose(0, 1).reshape(b * s, h), audio.reshape(-1, h)[frames],
            text.new_zeros(1, h),
        ])  # fmt: skip
        merged = table[layout.source]  # [r, S, h]
        return merged.transpose(0, 1).contiguous() + keep_in_graph

    def prompt_embeddings(self, batch: dict):
        layout = self.layout(batch, None)
        emb, valid = left_align(self.embed(batch, layout), layout.lengths)
        return emb, valid, None
