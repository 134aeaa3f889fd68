"""A small draft language model grown into an OPT-Tree each step (client/opt_tree.py), with its own KV cache.

Per request the drafter keeps a KV cache of the tokens it has seen, kept in step with the target's:

    prefetch   feed the accepted tokens the draft has not seen yet (usually just the last bonus token);
               the root's next-token distribution becomes this step's draft hint (RASD: the datastore and
               the other drafters' first-level nodes are pruned by it, see client/rasd.py)
    propose    grow the tree: one draft forward per depth over the whole layer, with tree attention
    observe    keep the KV rows of the accepted path that the draft already computed and drop the rest,
               exactly as the target's verifier does: the accepted prefix is never fed twice

Drafting costs time, so the drafter charges it: with the target's verify profile t(n) and the draft's own
forward profile td(m) (m new positions; both measured once per machine and cached), it drafts only while
expected tokens per second beat a plain step, and adds a layer only when the gain it predicts pays for
the forward. Its probabilities are calibrated online by a scalar: accepted / predicted over its own nodes.

FR-Spec (``vocab_ids``): the output layer can be cut to the K most frequent tokens; drafts stay point
masses, so acceptance (greedy or sampling) is as exact as with the full vocabulary.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from .. import gqa_attention, small_linear
from ..budget import CostProfile
from ..kv_cache import attention_backends, cache_keyword, cache_length, keep_positions, new_cache
from ..opt_tree import OptTree
from ..tree_attention import ancestor_matrix, additive_mask
from ..types import DecodeContext, Drafter, DraftTree, Source, StepResult

class DraftModelDrafter(Drafter):
    """draft:      a causal LM (transformers) sharing the target's tokenizer, in eval mode
    width:       nodes per layer (and candidate children per frontier node)
    max_depth:   layers at most
    vocab_ids:   FR-Spec: [K] int64 token ids the draft may propose (None: the whole vocabulary)
    verify_profile, draft_profile: t(n) of the target over n tree nodes and td(m) of the draft over m new
                 positions (client/budget.py CostProfile); None: drafting is free and speculation always
                 pays (growth then stops at ``max_depth`` or when a layer adds < ``min_layer_gain``)
    hint_size:   tokens of the root distribution handed to other drafters (``DecodeContext.draft_hint``);
                 0: no hint, so no RASD pruning
    """

    source = Source.DRAFT_MODEL
    provides_hint = True
    #: the rows a grown tree fed for the accepted path are kept (a feature head feeds them again)
    reuses_tree_rows = True

    def __init__(self, draft, *, width: int = 8, max_depth: int = 8, vocab_ids: Optional[np.ndarray] = None,
                 verify_profile: Optional[CostProfile] = None, draft_profile: Optional[CostProfile] = None,
                 min_layer_gain: float = 0.02, hint_size: int = 32):
        self.model = draft
        self.device = next(draft.parameters()).device
        self.dtype = next(draft.parameters()).dtype
        self.width = int(width)
        self.max_depth = int(max_depth)
        if self.width < 1 or self.max_depth < 1:
            raise ValueError("width and max_depth must be >= 1")
        self.min_layer_gain = float(min_layer_gain)
        self.hint_size = int(hint_size)
        self.verify_profile = verify_profile
        self.draft_profile = draft_profile
        self._body = draft.get_decoder()
        self._cache_kw = cache_keyword(self._body)
        head = draft.get_output_embeddings()
        self._head_bias = getattr(head, "bias", None)
        self.vocab_ids = None
        self._head_w = head.weight
        if vocab_ids is not None:
            ids = np.unique(np.asarray(vocab_ids, dtype=np.int64))
            if len(ids) == 0 or ids[0] < 0 or ids[-1] >= head.weight.shape[0]:
                raise ValueError(f"vocab_ids must be ids in [0, {head.weight.shape[0]})")
            self.vocab_ids = torch.as_tensor(ids, device=self.device)
            self._head_w = head.weight.detach().index_select(0, self.vocab_ids).contiguous()
            if self._head_bias is not None:
                self._head_bias = self._head_bias.detach().index_select(0, self.vocab_ids)
        # calibration: accepted / predicted over this drafter's nodes whose parent was accepted (decayed)
        self._acc, self._pred = 2.0, 4.0
        # what drafting has paid, per drafted step (decayed): the accepted drafts that only our nodes gave (the
        # others' trees alone would have stopped before them), those the others gave, seconds drafting
        self._gain_avg, self._others_avg, self._secs_avg, self._stat_w = 1.0, 0.0, 0.0, 0.0
        # verified nodes (all, and those only we proposed) and tokens caught up, per step
        self._nodes_avg, self._only_avg, self._feed_avg = 1.0, 1.0, 1.0
        self._after_skip = False                       # the last step was skipped: the next catch-up is long
        self._skipped = 0
        self.stats = {"steps": 0, "drafted": 0, "skipped": 0, "forwards": 0, "fed_tokens": 0, "reused_rows": 0,
                      "seconds": 0.0}
        self._reset()

    # ------------------------------------------------------------------ per request
    def _reset(self) -> None:
        self.cache = None
        self.seen: list[int] = []           # tokens whose KV rows are in the cache, in order
        self._root_probs: Optional[tuple[np.ndarray, np.ndarray]] = None   # (tokens, probs) after seen[-1]
        self._grown: Optional[tuple[OptTree, int, int]] = None   # (tree, nodes fed, cache length before it)
        self._draft_now = False
        self._secs = 0.0                    # this step's drafting seconds so far

    def begin_request(self, prompt_ids, prompt_text) -> None:
        self._reset()

    def end_request(self) -> None:
        self._reset()

    # ------------------------------------------------------------------ model calls
    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], positions: Optional[Sequence[int]] = None,
                 mask: Optional[torch.Tensor] = None, last_only: bool = False,
                 prev: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``ids`` after the cache; returns the top-``width`` next tokens and probabilities after each
        fed position ([m, width] each; the last position only with ``last_only``). ``prev``: [m, h] the
        features the rows read (a feature head, drafters/feature_head.py); the body's output rows are left
        in ``self._hidden``."""
        x = torch.as_tensor(np.asarray(ids, np.int64), device=self.device).view(1, -1)
        kw = {**self._inputs(x, prev), "use_cache": True, self._cache_kw: self.cache}
        if positions is not None:
            kw["position_ids"] = torch.as_tensor(np.asarray(positions, np.int64), device=self.device).view(1, -1)
        if mask is not None:
            kw["attention_mask"] = mask
        with attention_backends(self.device):
            h = self._body(**kw).last_hidden_state[0]
        if last_only:
            h = h[-1:]
        self._hidden = h
        logits = torch.nn.functional.linear(h, self._head_w, self._head_bias).float()
        k = min(max(self.width, self.hint_size if last_only else 0), logits.shape[-1])
        top = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        toks = top.indices if self.vocab_ids is None else self.vocab_ids[top.indices]
        self.stats["forwards"] += 1
        self.stats["fed_tokens"] += len(ids)
        return toks, top.values

    def _inputs(self, x: torch.Tensor, prev: Optional[torch.Tensor]) -> dict:
        """The body's input keywords for ids ``x`` [1, m] (a draft LM reads the ids alone)."""
        return {"input_ids": x}

    def _catch_up_features(self, tokens: np.ndarray, keep: int) -> Optional[torch.Tensor]:
        """What the rows ``keep..`` of ``tokens`` read besides their ids (a draft LM: nothing)."""
        return None

    def _layer_features(self, tree: OptTree, nodes: Sequence[int]) -> Optional[torch.Tensor]:
        """What the rows of the tree ``nodes`` about to be fed read besides their ids (a draft LM: nothing)."""
        return None

    def _fed(self, nodes: Sequence[int]) -> None:
        """``nodes`` (tree node ids; [0] for the root's catch-up) were fed: their rows are in ``self._hidden``."""

    def _catch_up(self, tokens: np.ndarray) -> int:
        """Bring the cache to ``tokens`` (all accepted tokens, the root last) and score the root's children;
        returns how many tokens it fed."""
        if self.cache is None:
            self.cache = new_cache()
            self.seen = []
        self._uncommitted()
        tokens = np.asarray(tokens).reshape(-1)
        L = len(tokens)
        seen = np.asarray(self.seen, dtype=np.int64)
        n = min(len(seen), L - 1)
        same = np.flatnonzero(seen[:n] != tokens[:n])
        keep = int(same[0]) if len(same) else n
        if keep < cache_length(self.cache):
            keep_positions(self.cache, keep, [])
        toks, probs = self._forward(tokens[keep:], last_only=True, prev=self._catch_up_features(tokens, keep))
        self._fed([0])
        self.seen = tokens.tolist()
        self._root_probs = (toks[0].cpu().numpy(), probs[0].cpu().numpy())
        return L - keep

    def _uncommitted(self) -> None:
        """A grown tree that no observe() committed (the request stopped reading): drop its rows."""
        if self._grown is not None:
            _, _, base = self._grown
            keep_positions(self.cache, base, [])
            self._grown = None

    # ------------------------------------------------------------------ hooks
    def prefetch(self, ctx: DecodeContext, budget: int) -> None:
        self.stats["steps"] += 1
        t0 = time.perf_counter()
        self._secs = 0.0
        self._draft_now = budget > 0 and self._worth_drafting(budget)
        if not self._draft_now:
            self.stats["skipped"] += 1
            self._after_skip = True
            return
        fed = self._catch_up(ctx.tokens)
        self._secs = time.perf_counter() - t0
        if self._after_skip and self.draft_profile is not None:
            # after skipped steps the cache catches up on all of them at once, a cost that drafting every
            # step would not pay: judge drafting by what a step of steady drafting costs
            self._secs = min(self._secs, self.draft_profile.t(max(1, int(round(self._feed_avg)))))
        else:
            self._feed_avg += (fed - self._feed_avg) * 0.1
        self._after_skip = False
        if self.hint_size > 0:
            ctx.draft_hint = (self._root_probs[0][: self.hint_size], self._root_probs[1][: self.hint_size])

    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        root = ctx.last_token
        if not self._draft_now or budget <= 0:
            return DraftTree.empty(root)
        self._t_propose = time.perf_counter()
        if self._root_probs is None or len(self.seen) != len(ctx.tokens) or self.seen[-1] != root:
            self._catch_up(ctx.tokens)       # prefetch was skipped (a caller that only proposes)
        scale = self.calibration
        tree = OptTree(root)
        toks, probs = self._root_probs
        new = tree.add_layer(toks[None, : self.width], probs[None, : self.width], self.width, scale)
        base = cache_length(self.cache)
        fed = 0                               # tree nodes 1..fed have KV rows, at base + node - 1
        while len(new) and tree.depth < self.max_depth and self._worth_layer(tree, budget):
            anc = ancestor_matrix(tree.to_tree(len(tree)))[new][:, 1:]   # [w, nodes so far]: ancestors, self
            pos = base - 1 + tree.depth
            ct, cp = self._forward([tree.tokens[i] for i in new], [pos] * len(new), additive_mask(
                anc, base, self.device, self.dtype), prev=self._layer_features(tree, new))
            self._fed(new)
            fed = len(tree) - 1
            new = tree.add_layer(ct.cpu().numpy(), cp.cpu().numpy(), self.width, scale)
        self._grown = (tree, fed, base)
        self._secs += time.perf_counter() - self._t_propose
        self.stats["drafted"] += 1
        self.stats["seconds"] += self._secs
        return tree.to_tree(budget, self.source)

    def observe(self, step: StepResult) -> None:
        if self._draft_now:
            self._learn(step)
        if self._grown is None:
            return
        tree, fed, base = self._grown
        self._grown = None
        if not self.reuses_tree_rows:
            fed = 0
        # the accepted tokens this draft already fed: follow them down the grown tree
        children: dict[tuple[int, int], int] = {(tree.parents[j], tree.tokens[j]): j for j in range(1, fed + 1)}
        node, rows, toks = 0, [], []
        for t in step.new_tokens.tolist():
            node = children.get((node, int(t)), -1)
            if node < 0:
                break
            rows.append(base + node - 1)
            toks.append(int(t))
        keep_positions(self.cache, base, rows)
        self.seen = self.seen + toks
        self.stats["reused_rows"] += len(rows)
        self._root_probs = None

    # ------------------------------------------------------------------ what drafting costs and pays
    def measure_profile(self, sizes: Sequence[int] = (1, 2, 4, 8, 12, 16, 24, 32), past_len: int = 256,
                        reps: int = 7) -> CostProfile:
        """td(m): seconds of one draft forward of m new positions (this drafter's own path: tree mask, its
        output layer, FR-Spec cut included) after ``past_len`` cached positions; medians of ``reps``."""
        rng = np.random.default_rng(0)
        vocab = int(self._head_w.shape[0]) if self.vocab_ids is None else int(self.vocab_ids.max()) + 1
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        seconds = []
        self._reset()
        self._catch_up(rng.integers(0, vocab, past_len + 1))
        base = cache_length(self.cache)
        for m in sizes:
            times = []
            for _ in range(reps + 1):
                mask = additive_mask(np.tril(np.ones((m, m), bool)), base, self.device, self.dtype)
                sync()
                t0 = time.perf_counter()
                self._forward(rng.integers(0, vocab, m), [base] * m, mask)
                sync()
                times.append(time.perf_counter() - t0)
                keep_positions(self.cache, base, [])
            seconds.append(float(np.median(times[1:])))
        self._reset()
        seconds = [min(seconds[i:]) for i in range(len(seconds))]
        return CostProfile([int(m) for m in sizes], seconds, {"kind": "draft forward", "past_len": past_len,
                                                              "vocab": len(self.vocab_ids) if self.vocab_ids
                                                              is not None else vocab})

    @property
    def calibration(self) -> float:
        """Accepted / predicted over this drafter's verified nodes (decayed; starts at 0.5)."""
        return self._acc / self._pred

    def _learn(self, step: StepResult) -> None:
        tree, path = step.tree, step.accepted_nodes
        ours = (tree.sources & int(self.source)) != 0
        on_path = np.zeros(len(tree), bool)
        on_path[path] = True
        tried = ours.copy()
        tried[0] = False
        tried[1:] &= on_path[tree.parents[1:]]
        acc = float((tried & on_path).sum())
        pred = float(np.minimum(tree.probs[tried].astype(np.float64) * self.calibration, 1.0).sum())
        decay = 0.98
        self._acc = decay * self._acc + acc
        self._pred = decay * self._pred + max(pred, 1e-3 if tried.any() else 0.0)
        self._pred = max(self._pred, 1e-3)
        only = ours & ((tree.sources | int(self.source)) == int(self.source))   # no other drafter proposed them
        only[0] = False
        gain = marginal_gain(path, only)
        w = self._stat_w = 0.95 * self._stat_w + 1.0
        self._gain_avg += (gain - self._gain_avg) / w
        self._others_avg += (len(path) - 1 - gain - self._others_avg) / w
        self._secs_avg += (self._secs - self._secs_avg) / w
        self._nodes_avg += (float(len(tree) - 1) - self._nodes_avg) / w
        self._only_avg += (float(only.sum()) - self._only_avg) / w

    def _worth_drafting(self, budget: int) -> bool:
        """Does drafting pay, judging by what it has paid lately (with one exploring step in 16)? Next to
        other drafters only what it adds counts: the tokens per second of the trees it has been getting
        verified against those of the same trees without the nodes only it proposed and the tokens they
        gave. Alone, that is against plain decoding."""
        if self.verify_profile is None or self._stat_w < 4:
            return True
        t = self.verify_profile.t
        n = min(budget, max(1, int(round(self._nodes_avg))))    # the trees it has been getting verified
        n_without = n - min(n, int(round(self._only_avg)))
        rate_without = (1.0 + self._others_avg) / t(1 + n_without)
        rate = (1.0 + self._others_avg + self._gain_avg) / (self._secs_avg + t(1 + n))
        if rate >= rate_without:
            self._skipped = 0
            return True
        self._skipped += 1
        return self._skipped % 16 == 0

    def _worth_layer(self, tree: OptTree, budget: int) -> bool:
        """Feed the last layer and grow another? Predicts the next layer's gain from the last two layers'
        ratio, and (with profiles) weighs it against the forward it costs and the larger verify."""
        d = tree.depth
        last = tree.layer_gain(d)
        nxt = last * min(last / max(tree.layer_gain(d - 1), 1e-9), 1.0)
        if nxt < self.min_layer_gain:
            return False
        if len(tree) - 1 >= budget:
            # a child's path probability is below its parent's: once the best ``budget`` nodes all beat
            # the last layer, no deeper node can enter the tree that is verified
            kth = np.sort(np.asarray(tree.pp[1:]))[::-1][budget - 1]
            if max(tree.pp[i] for i in tree.layers[d]) <= kth:
                return False
        if self.verify_profile is None or self.draft_profile is None:
            return True
        t, td = self.verify_profile.t, self.draft_profile.t
        spent = self._secs + time.perf_counter() - self._t_propose
        n_now = min(budget, len(tree) - 1)
        n_next = min(budget, len(tree) - 1 + self.width)
        g_now = tree.expected_length(budget)
        now = g_now / (spent + t(1 + n_now))
        later = (g_now + nxt) / (spent + td(len(tree.layers[d])) + t(1 + n_next))
        return later > now


def marginal_gain(path: np.ndarray, only: np.ndarray) -> int:
    """Accepted drafts that a drafter's own nodes gave: those of the accepted ``path`` (node ids, the root
    first) from the first node that only this drafter proposed (``only`` [n] bool) to the path's end; the
    others' trees end before it. 0 when every accepted node was proposed by another drafter as well."""
    hits = np.flatnonzero(only[np.asarray(path[1:], np.int64)])
    return int(len(path) - 1 - hits[0]) if len(hits) else 0


def open_draft_model(path, target, tokenizer=None):
    """The draft model in ``path`` for decoding: a local HF folder (a draft LM) or a feature head's folder
    (client/feature_head.py, which borrows the target's embedding and output layer); on the target's device
    and dtype, in eval mode. Refuses (DraftIncompatibleError, a ValueError) a draft whose tokenizer,
    vocabulary or, for a draft that shares the target's embedding, hidden size differ from the target's
    (client/draft_compat.py)."""
    from transformers import AutoModelForCausalLM

    from ..draft_compat import DraftIncompatibleError, check_draft_compatible
    from ..feature_head import is_feature_head, load_feature_head

    p = next(target.parameters())
    if is_feature_head(path):
        draft = load_feature_head(path, target, tokenizer)
    else:
        if tokenizer is not None:
            check_draft_compatible(target, tokenizer, path)
        draft = AutoModelForCausalLM.from_pretrained(str(path), dtype=p.dtype, local_files_only=True)
        if tokenizer is None and int(draft.config.vocab_size) != int(target.config.vocab_size):   # else checked
            raise DraftIncompatibleError(f"draft model {path}: vocabulary size {draft.config.vocab_size} differs "
                                         f"from the target's {target.config.vocab_size}")
    draft = draft.to(p.device).eval()
    small_linear.install(draft)       # it drafts a layer of a few rows per forward: client/small_linear.py
    rows = small_linear.kernel_rows(target)
    if rows is not None:              # the per-size choice measured with the target's layers (its cost profile)
        small_linear.kernel_rows(draft, sorted(rows))
    gqa_attention.install(draft)      # ... with a tree mask: client/gqa_attention.py
    return draft
