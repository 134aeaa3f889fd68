"""Session memory: the request's own tokens (prompt + everything generated so far), searched like the corpus.

Generated text repeats itself and its prompt (lists, code, quoted passages, running sums), so a lookup that
also matches the context's suffix inside the request's own history drafts far better than the corpus
alone. REST's ``draftretriever`` gets a cruder form of this by inserting every query into its shared index
(which also leaks one user's text into another's drafts); here the history is private to one session.

``TokenMemory`` rebuilds the full history on the server from the context *tails* a client sends per step
(each tail carries its absolute end position), so the wire stays small. ``match_memory`` and
``memory_continuations`` are the lookup (one compiled pass over at most ``capacity`` tokens).
"""
from __future__ import annotations

import numpy as np

from .kernels import memory_rows, memory_suffix_matches

DEFAULT_CAPACITY = 8192   # tokens per session: 32 KiB, so 10k sessions stay under 330 MB


class TokenMemory:
    """Append-only token history of one request, bounded to the last ``capacity`` tokens.

    ``base`` is the absolute position of ``tokens[0]``; ``end`` = base + len(tokens).
    """

    __slots__ = ("capacity", "base", "_buf", "_n")

    def __init__(self, prompt_ids=(), capacity: int = DEFAULT_CAPACITY):
        if capacity < 2:
            raise ValueError("capacity must be >= 2")
        self.capacity = int(capacity)
        self.base = 0
        self._buf = np.zeros(min(self.capacity, 1024), dtype=np.int32)
        self._n = 0
        if len(prompt_ids):
            self._append(np.asarray(prompt_ids, dtype=np.int32))

    @property
    def end(self) -> int:
        return self.base + self._n

    @property
    def tokens(self) -> np.ndarray:
        """int32 [n] view of the remembered tokens (oldest first)."""
        return self._buf[:self._n]

    def __len__(self) -> int:
        return self._n

    def _append(self, new: np.ndarray) -> None:
        if len(new) >= self.capacity:
            self.base += self._n + len(new) - self.capacity
            self._buf = np.array(new[-self.capacity:], dtype=np.int32)
            self._n = self.capacity
            return
        need = self._n + len(new)
        if need > self.capacity:   # drop the oldest tokens (half the buffer at once: amortised O(1))
            drop = max(need - self.capacity, self._n // 2)
            self._buf[:self._n - drop] = self._buf[drop:self._n]
            self._n -= drop
            self.base += drop
            need = self._n + len(new)
        if need > len(self._buf):
            buf = np.zeros(min(self.capacity, max(need, 2 * len(self._buf))), dtype=np.int32)
            buf[:self._n] = self._buf[:self._n]
            self._buf = buf
        self._buf[self._n:need] = new
        self._n = need

    def sync(self, tail, end: int) -> None:
        """Make the history end with ``tail``, whose last token sits at absolute position ``end - 1``.

        The usual case appends the tokens after ``self.end``. A tail that disagrees with what is
        remembered (another request reusing the session, a rewind) or leaves a gap restarts the history
        from the tail: the memory never holds tokens the client did not send in this order.
        """
        tail = np.asarray(tail, dtype=np.int32).ravel()
        start = int(end) - len(tail)
        if start < 0:
            raise ValueError("context_end is smaller than the context length")
        if start <= self.end <= end and start >= self.base:
            overlap = self.end - start
            if overlap == 0 or np.array_equal(self._buf[self._n - overlap:self._n], tail[:overlap]):
                self._append(tail[overlap:])
                return
        self.base, self._n = start, 0
        self._append(tail)


def match_memory(mem: np.ndarray, max_span: int = 16):
    """Longest suffix of ``mem`` (at most ``max_span`` tokens) that also occurs earlier, followed by a token.

    Returns ``(m, q)``: ``m`` matched tokens (0 = none) and ``q`` int64, ascending positions of the last
    token of each earlier occurrence (so ``mem[q + 1]`` is its continuation). Compiled: one pass.
    """
    if len(mem) < 2 or max_span < 1:
        return 0, None
    m, q = memory_suffix_matches(np.ascontiguousarray(mem), int(max_span))
    return (int(m), q) if m else (0, None)


def memory_continuations(mem: np.ndarray, q: np.ndarray, depth: int) -> np.ndarray:
    """[len(q), depth] int64 tokens following each position in ``mem``, -1 past its end."""
    out = np.full((len(q), depth), -1, np.int64)
    memory_rows(np.ascontiguousarray(mem), np.ascontiguousarray(q, dtype=np.int64), out, 0)
    return out
