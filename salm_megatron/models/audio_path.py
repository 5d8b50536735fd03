"""The audio path of the first pipeline stage: features, encoder, adapter, the auxiliary CTC head.

Segments of very different lengths (a packed row holds a 30 s and a 2 s clip) run through the
encoder in groups of similar length (:func:`length_groups`): padded together, the short one would
cost what the long one does, and self-attention the square of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..audio import SpecAugment, build_adapter, build_encoder, build_features
from ..config import Config
from .host import sent_like


class AudioPath(torch.nn.Module):
    """Audio -> log-mel -> SpecAugment (training only) -> encoder (encoder.type) -> adapter.

    Its weights stay fp32 whatever the LLM's dtype (as NeMo keeps its encoders): BatchNorm's
    running statistics and the norms need fp32's precision, and they are small next to the LLM.
    With a bf16 LLM it computes under autocast to bf16 (matmuls and convolutions in bf16) and
    hands the LLM bf16 embeddings.
    """

    def __init__(self, cfg: Config, compute_dtype: torch.dtype):
        super().__init__()
        self.features = build_features(cfg.encoder)
        self.spec_augment = SpecAugment(cfg.encoder.spec_augment)
        self.encoder = build_encoder(cfg.encoder)
        self.adapter = build_adapter(cfg.adapter, cfg.encoder.d_model, cfg.llm.hidden_size)
        self.compute_dtype = compute_dtype

    def autocast(self, device: torch.device):
        """Autocast to the LLM's dtype (nothing when it is fp32)."""
        lower = self.compute_dtype != torch.float32
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=lower)

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor):
        """[n, samples] -> embeddings [n, t, h] in the LLM's width and dtype, their lengths [n]."""
        return self.adapt(*self.encode(audio, audio_lengths))

    def encode(self, audio: torch.Tensor, audio_lengths: torch.Tensor):
        """[n, samples] -> encoder output [n, t, d_model] and its lengths [n]."""
        features, lengths = self.features(audio.float(), audio_lengths)
        if self.training:
            features = self.spec_augment(features, lengths)
        with self.autocast(features.device):
            return self.encoder(features, lengths)

    def adapt(self, encoded: torch.Tensor, lengths: torch.Tensor):
        """Encoder output -> embeddings [n, t, h] in the LLM's width and dtype, their lengths."""
        with self.autocast(encoded.device):
            emb, lengths = self.adapter(encoded, lengths)
        return emb.to(self.compute_dtype), lengths


class CTCHead(torch.nn.Module):
    """Auxiliary CTC loss of the encoder's output against the transcripts (blank: last id)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.blank = vocab_size
        self.proj = torch.nn.Linear(d_model, vocab_size + 1)

    def forward(self, encoded, lengths, transcripts, transcript_lengths) -> torch.Tensor:
        """Summed CTC loss over the segments with a transcript (impossible alignments: 0).
        ``lengths`` and ``transcript_lengths`` [n] are best given on the host: the rows kept
        are then chosen, and ``ctc_loss`` reads its lengths, without a sync."""
        keep = (transcript_lengths > 0).nonzero()[:, 0]
        rows = sent_like(keep, encoded)
        projected = self.proj(encoded.index_select(0, rows).to(self.proj.weight.dtype))
        logprobs = projected.float().log_softmax(-1)
        return F.ctc_loss(
            logprobs.transpose(0, 1), transcripts.index_select(0, sent_like(keep, transcripts)),
            lengths[keep], transcript_lengths[keep],
            blank=self.blank, reduction="sum", zero_infinity=True,
        )  # fmt: skip


def length_groups(lengths: list[int], ratio: float = 0.7) -> list[list[int]]:
    """Positions in ``lengths`` of the segments the encoder runs together, longest first: a
    segment joins the group of the longest before it while it is at least ``ratio`` of that
    one's length. A batch of similar lengths (a length bucket) is one group. An encoder's
    BatchNorm in training then normalises each group with its own statistics and moves its
    running statistics once per group."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[i] >= ratio * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _WithLoss(torch.autograd.Function):
    """Returns ``output`` unchanged; the backward pass also sends gradient 1 into ``loss``, so a
    loss computed on the first pipeline stage trains without travelling to the last."""

    @staticmethod
    def forward(ctx, output, loss):
        ctx.save_for_backward(loss)
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


def attach_loss(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``output``, whose backward pass also sends gradient 1 into ``loss`` (see _WithLoss)."""
    return _WithLoss.apply(output, loss)
