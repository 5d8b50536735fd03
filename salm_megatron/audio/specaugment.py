"""SpecAugment: random frequency and time masks on the features, in training only.

Each utterance gets its own masks, drawn from torch's RNG (so runs are reproducible under a seed).
A mask of width ``w`` (uniform in ``[0, max_width]``) starts uniformly where it fits, so time masks
stay inside the utterance's valid frames and never touch its padding; masked values become 0
(the mean of normalised features).
"""

from __future__ import annotations

import torch
from torch import nn

from salm_megatron.audio.masks import check_lengths, valid_mask
from salm_megatron.config import SpecAugmentConfig


def _random_spans(
    count: int, max_width: torch.Tensor, limit: torch.Tensor, size: int
) -> torch.Tensor:
    """``[b, size]`` bool: the union of ``count`` random spans per row, each inside ``[0, limit)``.

    ``max_width`` and ``limit`` are ``[b, 1]`` integer tensors.
    """
    batch = limit.size(0)
    device = limit.device
    max_width = torch.minimum(max_width, limit)
    width = (torch.rand(batch, count, device=device) * (max_width + 1)).long()
    width = torch.minimum(width, max_width)  # [b, count]
    room = limit - width + 1  # starts 0 .. limit - width
    start = torch.minimum((torch.rand(batch, count, device=device) * room).long(), room - 1)
    position = torch.arange(size, device=device)[None, None, :]  # [1, 1, size]
    inside = (position >= start[..., None]) & (position < (start + width)[..., None])
    return inside.any(dim=1)


class SpecAugment(nn.Module):
    """``(features [b, n_mels, t], lengths [b]) -> features``; the identity in eval mode."""

    def __init__(self, cfg: SpecAugmentConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3:
            raise ValueError(
                f"features must be [batch, n_mels, frames]; got {list(features.shape)}"
            )
        check_lengths("lengths", lengths, features.size(0), features.size(2))
        cfg = self.cfg
        if not self.training or (cfg.freq_masks == 0 and cfg.time_masks == 0):
            return features
        batch, n_mels, frames = features.shape
        lengths = lengths.long()[:, None]  # [b, 1]
        masked = torch.zeros(batch, n_mels, frames, dtype=torch.bool, device=features.device)
        if cfg.freq_masks:
            bins = torch.full_like(lengths, n_mels)
            widest = torch.full_like(lengths, cfg.freq_width)
            freq = _random_spans(cfg.freq_masks, widest, bins, n_mels)  # [b, n_mels]
            masked |= freq[:, :, None] & valid_mask(lengths[:, 0], frames)[:, None, :]
        if cfg.time_masks:
            if cfg.time_width < 1:  # a fraction of each utterance
                widest = (lengths * cfg.time_width).long()
            else:
                widest = torch.full_like(lengths, int(cfg.time_width))
            time = _random_spans(cfg.time_masks, widest, lengths, frames)  # [b, frames]
            masked |= time[:, None, :]
        return features.masked_fill(masked, 0.0)
