"""Sampling parameters and the warp from logits to the distribution we sample from.

Plain decoding and speculative decoding call the same ``warp``: that is what makes sampling lossless
(the accepted tokens are distributed exactly as if drawn from ``warp(logits)`` one at a time).

A caller may also hand the decoder a transformers-style logits processor (``client/hf_generate.py`` passes
the ``LogitsProcessorList`` that ``generate`` built); ``ProcessedLogits`` applies it to a verified tree's
nodes, each with its own token sequence, so the target distribution is the processor's, node by node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .types import DraftTree

# transformers' LogitsProcessor signature: (input_ids [1, t] int64, scores [1, V] float32) -> [1, V] scores
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class ProcessedLogits:
    """The scores after each node of a verified tree once ``processor`` has seen that node's token sequence.

    logits: [n, V] float32 target logits (row i: after node i); tree: the verified tree (n nodes);
    prefix: [L] int64 the sequence up to and including the tree's root; processor: see ``LogitsProcessor``
    (a function of its inputs: it may be called for any node, more than once, in any order).

    ``self[i]`` -> [V] scores after node i; ``self.argmax[i]`` -> their argmax. Computed when first asked for:
    the accept step reads only the nodes on the path it walks, so a step costs (accepted + 1) processor calls.
    """

    def __init__(self, logits: torch.Tensor, tree: DraftTree, prefix: np.ndarray, processor: LogitsProcessor):
        self.logits = logits
        self.tree = tree
        self.prefix = prefix
        self.processor = processor
        self._scores: dict[int, torch.Tensor] = {}
        self.argmax = _ArgmaxView(self)

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        got = self._scores.get(i)
        if got is None:
            path = []
            node = i
            while node > 0:  # the root is prefix[-1]; the nodes below it continue the sequence
                path.append(int(self.tree.tokens[node]))
                node = int(self.tree.parents[node])
            ids = np.concatenate([np.asarray(self.prefix, dtype=np.int64), np.asarray(path[::-1], dtype=np.int64)])
            x = torch.as_tensor(ids, device=self.logits.device).view(1, -1)
            # a clone: some processors write into the scores they are given
            got = self.processor(x, self.logits[i: i + 1].clone())[0]
            self._scores[i] = got
        return got


class _ArgmaxView:
    """``view[i]``: the argmax of ``ProcessedLogits[i]`` (what greedy_accept indexes)."""

    def __init__(self, scores: ProcessedLogits):
        self._scores = scores

    def __getitem__(self, i: int) -> int:
        return int(self._scores[i].argmax())
