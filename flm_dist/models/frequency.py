"""Frequency-domain token mixers for the SASRec blocks: BSARec's filter beside attention, FMLP-Rec's
learnable filter instead of it.

BSARec (Shin et al., AAAI 2024, github.com/yehjin-shin/BSARec, src/model/_modules.py
`FrequencyLayer`): the sequence goes through an orthonormal rFFT along the positions; the lowest
`cutoff // 2 + 1` frequency bins, transformed back, are the low-pass part, the input minus it the
high-pass part, and the filter output is `low + beta^2 * high` with a learned per-channel beta
(initialised from a standard normal, as there). FMLP-Rec (Zhou et al., WWW 2022, the same file's
`FMLPRecLayer`) multiplies the spectrum by a learned complex weight per bin and channel.

Neither is causal: the output at position t depends on every position of the window, later ones
included. The model is only trained where that cannot leak a target: with `train.windows=prefixes`
the only scored position is the last one (config checks refuse anything else).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

MixerKind = Literal["attention", "bsarec", "fmlp"]
FilterKind = Literal["bsarec", "fmlp"]


class FrequencyFilter(nn.Module):
    """[B, L, H] -> [B, L, H]: the filter part of a BSARec or FMLP-Rec layer (no residual, no norm).

    The filter always runs over `max_len` positions with padding set to zero, as if every row were
    left-padded to the full window: the frequency grid then does not depend on how wide a batch
    is, and padding contents never reach real positions. (BSARec's code filters its fixed
    `max_seq_length` window with the padding positions' embeddings in it; flm_dist cuts batches to
    their longest row, so it would otherwise give a row other states in a narrower batch.)
    """

    def __init__(self, kind: FilterKind, hidden: int, max_len: int, cutoff: int = 5):
        super().__init__()
        if kind not in ("bsarec", "fmlp"):
            raise ValueError(f"unknown filter {kind!r}; expected 'bsarec' or 'fmlp'")
        bins = max_len // 2 + 1
        if kind == "bsarec" and not 1 <= cutoff <= max_len:
            raise ValueError(f"cutoff must be in [1, max_len={max_len}], got {cutoff}")
        self.kind = kind
        self.max_len = max_len
        if kind == "bsarec":
            self.low_bins = cutoff // 2 + 1
            self.sqrt_beta = nn.Parameter(torch.randn(1, 1, hidden))
        else:
            self.spectrum_weight = nn.Parameter(torch.randn(1, bins, hidden, 2) * 0.02)

    def forward(self, x: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        # fp32 even under bf16 autocast: torch.fft has no bf16 kernels, and the high-pass part is
        # a difference of two close values.
        with torch.autocast(device_type=x.device.type, enabled=False):
            signal = x.float() * is_item.unsqueeze(-1)
            # Both filters are linear along the positions: each is an [L, L] matrix (one per channel
            # for FMLP-Rec) built from the spectra of unit impulses, exactly the FFT filter of the
            # zero-padded window and a few times cheaper on a CPU than an FFT of every row. Only the
            # last `length` positions hold anything, so only their rows and columns are built.
            impulses = torch.fft.rfft(torch.eye(self.max_len, device=x.device), dim=0, norm="ortho")[:, -length:]
            if self.kind == "bsarec":
                low_pass = torch.fft.irfft(impulses[:self.low_bins], n=self.max_len, dim=0, norm="ortho")[-length:]
                low = torch.matmul(low_pass, signal)
                filtered = low + self.sqrt_beta.float() ** 2 * (signal - low)
            else:
                weight = torch.view_as_complex(self.spectrum_weight.float())[0]  # [bins, H]
                kernel = torch.fft.irfft(weight[:, :, None] * impulses[:, None, :], n=self.max_len, dim=0,
                                         norm="ortho")[-length:]  # [t, H, s]
                filtered = torch.einsum("ths,bsh->bth", kernel, signal)
        return filtered.to(x.dtype)
