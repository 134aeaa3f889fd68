"""How many draft nodes to verify this step, from the machine's measured cost and learned acceptance.

Performance model (DESIGN §7): a step that verifies ``n`` nodes costs ``t(n)`` and yields
``1 + E[accepted drafts]`` tokens. ``CostProfile`` measures ``t(n)`` once per (model, device, dtype,
threads) and caches it. ``BudgetController`` turns each node's raw probability estimate into a
calibrated acceptance probability (Beta posteriors per source and probability bin, sampled Thompson
style so that it keeps exploring), then picks the prefix of the fused tree that maximises expected tokens
per second; 0 drafts (a plain step) whenever speculation does not pay.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .fusion import rank_by_path_prob
from .types import DraftTree

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# Default upper bound on draft nodes per step, per device. On a CPU t(n) grows from the first extra nodes, so
# larger trees rarely pay; on a GPU t(n) is flat to ~48 nodes (BENCHMARKS.md), and 63 drafts + the root fill
# the largest default profile size.
MAX_BUDGET_CPU = 32
MAX_BUDGET_CUDA = 63


def default_max_budget(device_type: str) -> int:
    """MAX_BUDGET_CPU for ``device_type`` "cpu" (a torch.device.type), MAX_BUDGET_CUDA for any accelerator."""
    return MAX_BUDGET_CPU if device_type == "cpu" else MAX_BUDGET_CUDA


@dataclass
class CostProfile:
    """sizes: tree sizes n (root included); seconds: median verify time t(n) for each."""

    sizes: list[int]
    seconds: list[float]
    meta: dict = field(default_factory=dict)

    def t(self, n: int) -> float:
        return float(np.interp(n, self.sizes, self.seconds))

    def table(self, max_n: int) -> np.ndarray:
        """[max_n + 1] t(n) for n = 0..max_n (t(0) unused, set to t(1))."""
        n = np.arange(max_n + 1)
        return np.interp(np.maximum(n, 1), self.sizes, self.seconds)

    @property
    def max_size(self) -> int:
        return int(self.sizes[-1])

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "seconds": self.seconds, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "CostProfile":
        return cls([int(s) for s in d["sizes"]], [float(s) for s in d["seconds"]], d.get("meta", {}))

    @classmethod
    def load(cls, path) -> "CostProfile":
        """From a file: this class's JSON (``sizes``, ``seconds``) or a ``bench/gpu_profile.py`` report
        (``t_n_ms``: tree size -> milliseconds), e.g. to size trees as another machine would."""
        import json
        from pathlib import Path

        d = json.loads(Path(path).read_text())
        if "t_n_ms" in d:
            sizes = sorted(int(n) for n in d["t_n_ms"])
            return cls(sizes, [d["t_n_ms"][str(n)] / 1000.0 for n in sizes], {"from": str(path), "device": d.get("device")})
        if "sizes" in d and "seconds" in d:
            return cls.from_json(d)
        raise ValueError(f"{path}: neither a cost profile (sizes, seconds) nor a gpu_profile report (t_n_ms)")

    @classmethod
    def flat(cls, max_n: int = 64) -> "CostProfile":
        """A GPU-like profile (t(n) flat); useful for tests that want speculation every step."""
        return cls([1, max_n], [1.0, 1.0], {"kind": "flat"})


def measure_cost_profile(model, sizes: Sequence[int] = DEFAULT_SIZES, past_len: int = 256, reps: int = 7,
                         vocab_low: int = 100) -> CostProfile:
    """Time one verify forward for each tree size (random trees on a warm cache), the sizes in turn ``reps``
    times (a shared machine's slow spells then fall on every size alike and leave t(n)'s shape, which the
    budget's choice depends on), medians.

    Where client/small_linear.py's kernel is installed, sizes it covers are timed with it and with torch's
    linear, interleaved, and each keeps the faster (``meta["kernel_rows"]``: the row counts left on the
    kernel, sizes between two timed ones following the smaller; ``cached_cost_profile`` applies it again)."""
    import torch

    from . import small_linear
    from .verifier import Verifier

    v = Verifier(model)
    rng = np.random.default_rng(0)
    hi = min(v.vocab_size, 30000)
    vocab_low = min(vocab_low, hi // 2)          # a tiny test vocabulary has fewer than 100 ids
    draft_hi = min(1000, hi)
    past = rng.integers(vocab_low, hi, size=past_len + 1)
    seconds = []
    sync = torch.cuda.synchronize if v.device.type == "cuda" else (lambda: None)
    rows = None if small_linear.pinned(model) else small_linear.kernel_rows(model)    # pinned: nothing to choose
    on_kernel = {}                               # timed size -> whether the kernel was faster
    v.prefill(past)
    paths = {n: (True, False) if rows is not None and n <= small_linear.MAX_ROWS else (None,) for n in sizes}
    times: dict = {n: {p: [] for p in paths[n]} for n in sizes}
    for r in range(reps + 1):
        for n in sizes:     # round robin: a slow spell of a shared machine falls on every size alike
            tree = DraftTree(np.concatenate([[past[-1]], rng.integers(vocab_low, draft_hi, n - 1)]).astype(np.int32),
                             np.concatenate([[-1], rng.integers(0, np.arange(1, n).clip(1), n - 1)
                                             if n > 1 else []]).astype(np.int32),
                             np.ones(n, np.float32), np.zeros(n, np.uint8))
            for path in paths[n]:
                if path is not None:
                    (rows.add if path else rows.discard)(n)
                sync()
                t0 = time.perf_counter()
                v.verify(tree)
                sync()
                times[n][path].append(time.perf_counter() - t0)
                v.commit([0])  # drop the tree again: the cache grows by one root per timing
    for n in sizes:
        med = {p: float(np.median(t[1:])) for p, t in times[n].items()}
        if rows is not None and n <= small_linear.MAX_ROWS:
            on_kernel[n] = med[True] <= med[False]
        seconds.append(min(med.values()))
    # a bigger tree never costs less: clip upward outliers (a noisy neighbour during one size's timing)
    seconds = [min(seconds[i:]) for i in range(len(seconds))]
    meta = {"device": str(v.device), "dtype": str(v.dtype), "threads": torch.get_num_threads(),
            "past_len": past_len, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if rows is not None:
        timed = sorted(on_kernel)
        keep = [n for n in range(1, small_linear.MAX_ROWS + 1)
                if on_kernel[max([t for t in timed if t <= n], default=timed[0])]] if timed else sorted(rows)
        small_linear.kernel_rows(model, keep)
        meta["kernel_rows"] = keep
    return CostProfile(list(map(int, sizes)), seconds, meta)


def cached_cost_profile(model, model_name: str, cache_dir: Optional[Path] = None, refresh: bool = False,
                        sizes: Sequence[int] = DEFAULT_SIZES, measure=None) -> CostProfile:
    """The machine's profile for this model, measured once and cached as JSON.

    measure: ``(sizes) -> CostProfile`` to time something else than a verify forward of ``model`` (a draft
    model's own forward: client/drafters/draft_model.py); ``model_name`` must then name what it times."""
    import torch

    from ..datastore.durable import write_text
    from ..datastore.model_files import cache_root
    from . import batch_invariant, gqa_attention, lean_forward, small_linear

    if measure is None:     # what measure_cost_profile's Verifier installs, before the key names it
        batch_invariant.install(model)
        small_linear.install(model)
        gqa_attention.install(model)
    p = next(model.parameters())
    key = f"{model_name}-{p.device.type}-{str(p.dtype).replace('torch.', '')}-t{torch.get_num_threads()}"
    if small_linear.installed(model):       # another kernel, another curve (client/small_linear.py)
        key += f"-smalllinear{small_linear.MAX_ROWS}"
        if small_linear.installed(model) == "native":
            key += "-native"                # client/row_kernel.c, a lower t(n) from 8 rows on
    if batch_invariant.installed(model):
        key += f"-invariant-{batch_invariant.installed(model)}"     # client/batch_invariant.py: attention, GEMMs
        if batch_invariant.attention_kernel(model) == "native":
            key += "-cattn"                 # client/attention_kernel.c, not numba's: a lower t(n) from 8 nodes on
        if measure is None and batch_invariant.float_cache(model):
            key += "-f32kv"                 # a KV cache the attention reads without converting it: a lower t(n)
    if gqa_attention.installed(model):
        key += "-gqa"                       # masked attention without copying the cache (client/gqa_attention.py)
    if measure is None and lean_forward.usable(model):
        key += "-lean"                      # the verifier's forward without module calls (client/lean_forward.py)
        if lean_forward.fused(model):
            key += "-fused"                 # ... with q/k/v and gate/up in one GEMM each: a lower t(n)
    if p.device.type == "cuda":
        key += "-" + torch.cuda.get_device_name(p.device).replace(" ", "_")
    path = (cache_dir or cache_root() / "profiles") / f"{key}.json"
    if path.exists() and not refresh:
        try:
            prof = CostProfile.from_json(json.loads(path.read_text()))
            if "kernel_rows" in prof.meta:     # the paths its times were measured on
                small_linear.kernel_rows(model, prof.meta["kernel_rows"])
            return prof
        except (ValueError, KeyError):
            log.warning("ignoring unreadable cost profile %s", path)
    log.info("measuring the verify cost profile t(n) for %s (once)", key)
    prof = (measure or (lambda sz: measure_cost_profile(model, sz)))(sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(prof.to_json(), indent=1), unique=True)   # other processes may measure too
    return prof


_BINS = np.array([0.0, 0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 1.01])


class StepCostModel:
    """An engine step's wall time as ``a + b * tokens + s * speculated``, fitted online.

    For engines that verify a batch of chains (vLLM): the time between two consecutive ``propose`` calls is
    one step; ``tokens`` is what it verified (the running requests plus the drafts handed out for it) and
    ``speculated`` whether any request had drafts. ``s`` is what speculating costs a step at all, whichever
    rows draft (vLLM's draft bookkeeping and rejection sampling): on a 2-core CPU it is ~10% of a step, on a
    big batch a draft token costs about as much as a request's own token. Least squares with exponential
    forgetting (``memory`` steps) and a prior (``b = prior_token_cost * a``, ``s = 0``) with the weight of
    ``prior_steps`` steps, so that a noisy start or a run of same-sized steps stays near the prior instead
    of swinging. Gaps far above the fit (the engine idle between calls) are ignored.

    ``token_cost(rows)``: one more draft token, in units of one request's share of a step of ``rows``
    requests without drafts (every running request waits for the longer step). ``overhead(rows)``: ``s`` in
    the same units, summed over the rows (what the whole batch pays for a speculative step).
    """

    def __init__(self, prior_token_cost: float = 0.02, memory: float = 200.0, warmup: int = 20,
                 prior_steps: float = 10.0):
        self.prior = float(prior_token_cost)
        self.decay = 1.0 - 1.0 / float(memory)
        self.warmup = int(warmup)
        self.prior_steps = float(prior_steps)
        self.n = 0
        self._xx = np.zeros((3, 3))   # decayed sums of f f^T, f = (1, tokens, speculated)
        self._xy = np.zeros(3)        # decayed sums of f * seconds
        self._fastest = float("inf")  # least seconds per verified token seen (screens idle gaps early on)
        self._fit: Optional[tuple] = None   # (fit,) once solved for the steps seen so far (the fit may be None)

    def observe(self, tokens: int, seconds: float, speculated: bool = False) -> None:
        if seconds <= 0:
            return
        fit = self.fit()
        expected = (fit[0] + fit[1] * tokens + fit[2] * speculated) if fit is not None \
            else self._fastest * (1.0 + tokens)
        if seconds > 10.0 * expected:
            return
        self._fastest = min(self._fastest, seconds / (1.0 + tokens))
        f = np.array([1.0, float(tokens), 1.0 if speculated else 0.0])
        self._xx = self._xx * self.decay + np.outer(f, f)
        self._xy = self._xy * self.decay + f * float(seconds)
        self.n += 1
        self._fit = None

    def fit(self) -> Optional[tuple[float, float, float]]:
        """(a, b, s) seconds, or None while fewer than ``warmup`` steps have been seen. Solved once per
        observed step (the proposer reads it several times a step)."""
        if self.n < self.warmup:
            return None
        if self._fit is None:
            self._fit = (self._solve(),)
        return self._fit[0]

    def _solve(self) -> Optional[tuple[float, float, float]]:
        # the prior as pseudo-steps: ``prior_steps`` steps that the prior model (b = prior * a, s = 0) would
        # take, at the data's own scale and around its mean token count (spread at least one token)
        w = self._xx[0, 0]
        mx, my = self._xx[0, 1] / w, self._xy[0] / w
        sd = max(np.sqrt(max(self._xx[1, 1] / w - mx * mx, 0.0)), 1.0)
        a0 = my / (1.0 + self.prior * mx)
        A, rhs = self._xx.copy(), self._xy.copy()
        for x in (mx - sd, mx + sd):
            for z in (0.0, 1.0):
                f = np.array([1.0, x, z])
                A += 0.25 * self.prior_steps * np.outer(f, f)
                rhs += 0.25 * self.prior_steps * f * a0 * (1.0 + self.prior * x)
        try:
            a, b, s = np.linalg.solve(A, rhs)
        except np.linalg.LinAlgError:
            return None
        if not np.isfinite([a, b, s]).all() or a <= 0:
            return None
        return float(a), max(float(b), 0.0), max(float(s), 0.0)

    def token_cost(self, rows: int) -> float:
        fit = self.fit()
        rows = max(rows, 1)
        if fit is None:
            return self.prior * rows
        a, b, _ = fit
        # one more token lengthens the step for every running request: in units of one request's share of
        # a step without drafts, (a + b * rows) / rows, it costs b
        return rows * b / (a + b * rows)

    def overhead(self, rows: int) -> float:
        fit = self.fit()
        if fit is None:
            return 0.0
        a, b, s = fit
        rows = max(rows, 1)
        return rows * s / (a + b * rows)


class BudgetController:
    """Calibrates draft probabilities online and chooses each step's draft-node budget.

    Calibration key: (source bits of the node, bin of its raw conditional probability). Each key has a
    Beta(a, b) posterior over "accepted | parent accepted"; the prior mean is the bin's own value,
    shrunk towards pessimism, so an unseen source must earn its way into the tree.
    """

    def __init__(self, profile: CostProfile, max_budget: int = MAX_BUDGET_CUDA, overhead_s: float = 0.0,
                 thompson: bool = True, prior_strength: float = 4.0, memory: float = 400.0, seed: int = 0):
        self.profile = profile
        self.max_budget = int(min(max_budget, profile.max_size - 1))
        self.overhead_s = overhead_s
        self.thompson = thompson
        self.prior_strength = prior_strength
        self.memory = memory
        self._t = profile.table(self.max_budget + 1)
        self._rng = np.random.default_rng(seed)
        self._post: dict[tuple[int, int], list[float]] = {}
        self.steps = 0
        self.speculative_steps = 0

    def _key(self, source: int, prob: float) -> tuple[int, int]:
        return int(source), int(np.searchsorted(_BINS, prob, side="right") - 1)

    def _posterior(self, key: tuple[int, int]) -> list[float]:
        post = self._post.get(key)
        if post is None:
            mid = 0.5 * (_BINS[key[1]] + _BINS[min(key[1] + 1, len(_BINS) - 1)])
            mean = 0.5 * min(mid, 1.0)
            post = [self.prior_strength * mean, self.prior_strength * (1 - mean)]
            self._post[key] = post
        return post

    def calibrate(self, tree: DraftTree) -> np.ndarray:
        """[n] calibrated conditional acceptance probability of each node (root = 1)."""
        q = np.ones(len(tree), dtype=np.float64)
        sampled: dict[tuple[int, int], float] = {}
        for i in range(1, len(tree)):
            key = self._key(tree.sources[i], float(tree.probs[i]))
            v = sampled.get(key)
            if v is None:
                a, b = self._posterior(key)
                v = self._rng.beta(a, b) if self.thompson else a / (a + b)
                sampled[key] = v
            q[i] = v
        return q

    def _conditionals(self, tree: DraftTree) -> np.ndarray:
        """[n] calibrated P(node accepted | parent accepted), scaled so that siblings sum to <= 1 (at most
        one child of a node can be accepted)."""
        q = self.calibrate(tree)
        sib = np.zeros(len(tree))
        np.add.at(sib, tree.parents[1:], q[1:])
        q[1:] /= np.maximum(sib[tree.parents[1:]], 1.0)
        return q

    def choose(self, tree: DraftTree) -> tuple[DraftTree, float]:
        """Cut ``tree`` to the size that maximises expected tokens per second.

        Returns (tree to verify, expected accepted drafts). A one-node tree means a plain step.
        """
        self.steps += 1
        if tree.num_drafts == 0:
            return tree, 0.0
        q = self._conditionals(tree)
        order, pp = rank_by_path_prob(tree, q)
        order = order[: self.max_budget]
        gain = 1.0 + np.concatenate([[0.0], np.cumsum(pp[order])])  # expected tokens with k drafts
        cost = self._t[1: len(gain) + 1] + self.overhead_s
        rate = gain / cost
        k = int(np.argmax(rate))
        if k == 0:
            return DraftTree.empty(tree.root), 0.0
        self.speculative_steps += 1
        keep = np.sort(np.concatenate([[0], order[:k]]))
        return tree.subset(keep), float(gain[k] - 1.0)

    def choose_chain(self, tree: DraftTree, max_len: int, token_cost: float) -> tuple[DraftTree, float]:
        """The best single path of ``tree`` for an engine that verifies chains (vLLM).

        A chain of d drafts is taken to cost ``1 + token_cost * d`` plain steps (``token_cost``: the
        verify cost of one more token relative to a step, which grows with the engine's batch). Among the
        paths (cut to ``max_len`` drafts) the one that maximises expected tokens per cost wins; the root
        alone (no drafts) is a candidate too. Returns (the chain as a DraftTree, expected accepted drafts).
        """
        self.steps += 1
        if tree.num_drafts == 0 or max_len <= 0:
            return DraftTree.empty(tree.root), 0.0
        q = self._conditionals(tree)
        par = tree.parents
        depth = tree.depths()
        pp = np.ones(len(tree))
        gain = np.ones(len(tree))   # 1 + expected accepted drafts along the path to each node
        for i in range(1, len(tree)):
            pp[i] = pp[par[i]] * q[i]
            gain[i] = gain[par[i]] + pp[i]
        rate = gain / (1.0 + float(token_cost) * depth)
        rate[depth > max_len] = -1.0
        best = int(np.argmax(rate))
        if best == 0:
            return DraftTree.empty(tree.root), 0.0
        self.speculative_steps += 1
        keep = np.asarray([0, *tree.path_to(best)], dtype=np.int64)
        return tree.subset(keep), float(gain[best] - 1.0)

    def observe(self, tree: DraftTree, accepted_nodes: Sequence[int]) -> None:
        """Update posteriors: every node whose parent was accepted was a trial."""
        if len(tree) <= 1:
            return
        acc = np.zeros(len(tree), dtype=bool)
        acc[list(accepted_nodes)] = True
        par = tree.parents
        for i in range(1, len(tree)):
            if acc[par[i]]:
                post = self._posterior(self._key(tree.sources[i], float(tree.probs[i])))
                post[0 if acc[i] else 1] += 1.0
                if post[0] + post[1] > self.memory:  # forget slowly: acceptance drifts with the text
                    post[0] *= 0.5
                    post[1] *= 0.5

    def state(self) -> dict:
        return {f"{s}:{b}": [round(a, 2), round(c, 2)] for (s, b), (a, c) in sorted(self._post.items())}
