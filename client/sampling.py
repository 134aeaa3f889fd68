"""Sampling parameters and the warp from logits to the distribution we sample from.

Plain decoding and speculative decoding call the same ``warp``: that is what makes sampling lossless
(the accepted tokens are distributed exactly as if drawn from ``warp(logits)`` one at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature == 0 means greedy (argmax); top_k == 0 and top_p == 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, params: SamplingParams) -> np.ndarray:
    """logits: [V] (any float dtype) -> [V] float64 probabilities after temperature, top-k and top-p.

    Ties at the top-k / top-p cut keep every tied token, so the result depends only on the logits.
    """
    x = logits.detach().to(torch.float64).cpu() / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = torch.where(x < kth, torch.full_like(x, -np.inf), x)
    p = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sp, order = torch.sort(p, descending=True)
        before = torch.cumsum(sp, 0) - sp  # mass strictly above each token
        cut = sp[(before < params.top_p).sum() - 1]  # smallest prob still inside the nucleus
        p = torch.where(p < cut, torch.zeros_like(p), p)
        p = p / p.sum()
    return p.numpy()
