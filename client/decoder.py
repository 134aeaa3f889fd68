"""The decode loop. Each step, numbered as in DESIGN.md §4 and in the modules that do the work:

    1. propose  every drafter -> DraftTree (remote lookups are issued first: ``prefetch``)
    2. fuse     longest-prefix merge into one tree, cut to the budget chosen for this step (fusion, budget)
    3. verify   one target forward over the tree -> logits per node (verifier, tree_attention)
    4. accept   the path the target accepts, plus the bonus token (acceptance)
    5. commit   keep the accepted path's KV rows, append and emit its tokens (verifier, this module)
    6. observe  drafters and the budget controller learn from the step

``SpeculativeDecoder(model, tokenizer, drafters).generate(input_ids, ...)`` returns exactly the tokens
that plain decoding of the same model returns (greedy), or tokens with exactly the same distribution
(sampling). ``stream(...)`` yields the new tokens of each step as they are accepted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from . import batch_invariant
from .acceptance import greedy_accept, sample_accept
from .budget import MAX_BUDGET_CPU, BudgetController, CostProfile
from .drafter_errors import DrafterErrors
from .fusion import fuse
from .rasd import prune_by_hint
from .sampling import LogitsProcessor, ProcessedLogits, SamplingParams, warp
from .types import DecodeContext, Drafter, DraftTree, Source, StepResult
from .verifier import Verifier


@dataclass
class GenerationResult:
    """new_tokens: generated ids (prompt excluded, EOS included when hit); sequences: prompt + new_tokens.
    steps: target forwards after prefill; accepted_per_step: new tokens per target forward (MAT);
    decode_seconds: wall time of the whole call (prefill included)."""

    new_tokens: list[int]
    sequences: list[int]
    steps: int
    decode_seconds: float
    prefill_seconds: float
    finish_reason: str
    text: Optional[str] = None
    tokens_per_step: list[int] = field(default_factory=list)
    drafted_per_step: list[int] = field(default_factory=list)

    @property
    def accepted_per_step(self) -> float:
        return len(self.new_tokens) / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_tokens) / max(self.decode_seconds, 1e-9)

    def summary(self) -> dict:
        return {"text": self.text, "new_tokens": len(self.new_tokens), "steps": self.steps,
                "accepted_per_step": round(self.accepted_per_step, 4),
                "decode_seconds": round(self.decode_seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 3), "finish_reason": self.finish_reason}


@dataclass
class StreamState:
    """What one ``stream`` call has done so far; complete once the stream ends.

    prompt:           the prompt's token ids
    steps:            target forwards after prefill
    tokens_per_step:  [steps] tokens emitted at each step
    drafted_per_step: [steps] draft nodes verified at each step
    finish:           "length", "eos" or "stop"
    text:             the text cut at a stop string (None when no stop string was hit)
    prefill:          seconds from the call to the end of prefill (the whole call if it ended before)
    seconds:          seconds of the whole call (prefill included)
    """

    prompt: list[int] = field(default_factory=list)
    steps: int = 0
    tokens_per_step: list[int] = field(default_factory=list)
    drafted_per_step: list[int] = field(default_factory=list)
    finish: str = "length"
    text: Optional[str] = None
    prefill: Optional[float] = None
    seconds: float = 0.0


def _as_id_list(input_ids) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError("batched generation is not supported: pass one sequence")
            input_ids = input_ids[0]
        return [int(x) for x in input_ids.tolist()]
    arr = np.asarray(input_ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError("input_ids must be one sequence of token ids")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("input_ids must be integers")
    return [int(x) for x in arr.tolist()]


class SpeculativeDecoder:
    """Lossless tree-speculative decoding of one sequence at a time.

    drafters: client.types.Drafter subclasses. A hook that raises is counted in ``drafter_errors`` and
              logged; the step goes on without that drafter's tree, so the output does not change.
    profile:  the verify cost profile t(n); None -> a flat profile (always worth drafting).
    speculate=False gives plain decoding through the same code path (one-node trees).
    A drafter that ``provides_hint`` (a draft model) runs first; its first-step distribution
    (``ctx.draft_hint``) prunes the other local drafters' trees (RASD, client/rasd.py).
    """

    def __init__(self, model, tokenizer=None, drafters: Sequence = (), *, profile: Optional[CostProfile] = None,
                 max_budget: int = MAX_BUDGET_CPU, speculate: bool = True, topk: int = 8,
                 controller: Optional[BudgetController] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.drafters = sorted(drafters, key=lambda d: not getattr(d, "provides_hint", False))
        alien = [type(d).__name__ for d in self.drafters if not isinstance(d, Drafter)]
        if alien:
            raise TypeError(f"drafters must subclass specstore.client.types.Drafter: {', '.join(alien)}")
        self.drafter_errors = DrafterErrors()
        # per drafter class: seconds in prefetch + propose, verified and accepted nodes carrying its source
        self.drafter_stats: dict[str, dict] = {}
        for d in self.drafters:
            self._stats_of(d)
        self.speculate = speculate
        self.topk = topk
        self._needs_features = any(d.needs_target_features for d in self.drafters)
        self.verifier = Verifier(model, topk=topk, keep_features=self._needs_features)
        if speculate:
            batch_invariant.check(model)    # half precision on CPU: lossless only with batch-invariant forwards
        self.vocab_size = self.verifier.vocab_size
        self.profile = profile or CostProfile.flat(max_budget + 1)
        self.controller = controller or BudgetController(self.profile, max_budget=max_budget)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._request_id = 0
        # drafters that learn from the target's top-k next tokens at every verified node (Token Recycling)
        self._needs_topk = any(d.needs_target_topk for d in self.drafters)
        eos = set()
        gen_cfg = getattr(model, "generation_config", None)
        for src in (getattr(gen_cfg, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                    getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
            if src is None:
                continue
            eos.update([src] if isinstance(src, int) else list(src))
        self.eos_token_ids = eos

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of a prompt; the tokenizer's chat template is applied unless ``raw``."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass token ids")
        if not raw and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(text, add_special_tokens=True)["input_ids"]]

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop: Sequence[str] = (),
                 eos_token_id: Optional[int | Sequence[int]] = None, prompt_text: Optional[str] = None,
                 decode_text: bool = True, logits_processor: Optional[LogitsProcessor] = None) -> GenerationResult:
        """Generate to completion. Arguments as in transformers' ``generate`` (temperature 0 = greedy).

        logits_processor: transformers-style ``(input_ids [1, t], scores [1, V]) -> [1, V]`` (sampling.py);
        when given, the target distribution after each node is ``warp(processor(sequence, logits))`` and
        greedy takes the argmax of the processed scores (hf_generate.py passes generate's processors with
        temperature 1 and no top-k/top-p of ours). None (the default): the logits as they are.
        """
        state = StreamState()
        new: list[int] = []
        for toks in self._stream(state, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                 eos_token_id, prompt_text, logits_processor):
            new.extend(toks)
        text = None
        if decode_text and self.tokenizer is not None:
            text = state.text
            if text is None:
                text = self.tokenizer.decode(new, skip_special_tokens=True)
        return GenerationResult(new, state.prompt + new, state.steps, state.seconds, state.prefill, state.finish,
                                text, state.tokens_per_step, state.drafted_per_step)

    def stream(self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: Optional[int] = None, stop: Sequence[str] = (),
               eos_token_id: Optional[int | Sequence[int]] = None, prompt_text: Optional[str] = None,
               state: Optional[StreamState] = None,
               logits_processor: Optional[LogitsProcessor] = None) -> Iterator[list[int]]:
        """Yields the list of new tokens accepted at each step.

        state: filled as the stream goes (steps, finish reason, text cut at a stop string, timings); give
        one to read those figures once the stream ends (spec-generate's streamed output does).
        logits_processor: as in ``generate``.
        """
        yield from self._stream(state if state is not None else StreamState(), input_ids, max_new_tokens,
                                temperature, top_k, top_p, seed, stop, eos_token_id, prompt_text, logits_processor)

    def _stream(self, st: StreamState, input_ids, max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, seed: Optional[int], stop: Sequence[str],
                eos_token_id: Optional[int | Sequence[int]], prompt_text: Optional[str],
                logits_processor: Optional[LogitsProcessor] = None) -> Iterator[list[int]]:
        """The decode loop of one request; fills ``st`` as it goes."""
        t_start = time.perf_counter()
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompt = _as_id_list(input_ids)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt if t < 0 or t >= self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        if len(prompt) >= self.max_context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {self.max_context}")
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if s]
        eos = set(self.eos_token_ids) if eos_token_id is None else (
            {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        max_new = min(int(max_new_tokens), self.max_context - len(prompt))
        rng = np.random.default_rng(seed)
        st.prompt = prompt

        self._request_id += 1
        buf = np.zeros(len(prompt) + max_new + 1, dtype=np.int64)
        buf[: len(prompt)] = prompt
        L = len(prompt)
        drafters = self.drafters if self.speculate else []
        for d in drafters:
            try:
                d.begin_request(prompt, prompt_text)
            except Exception as e:  # noqa: BLE001 - a drafter never breaks a request (drafter_errors.py)
                self.drafter_errors.record(d, "begin_request", e)
        feats = None   # [len(buf), h]: the target's final hidden state at each committed position
        try:
            self.verifier.prefill(buf[:L])
            if self._needs_features and drafters:
                feats = self._feature_buffer(len(buf), L)
            st.prefill = time.perf_counter() - t_start
            produced = 0
            while produced < max_new:
                ctx = DecodeContext(buf[:L], len(prompt), request_id=self._request_id,
                                    target_features=None if feats is None else feats[: L - 1])
                tree = self._propose(ctx, drafters, max_new - produced)  # steps 1 and 2
                # 3. verify
                logits = self.verifier.verify(tree)
                # 4. accept
                children = tree.children_lists()
                node_logits = logits if logits_processor is None else ProcessedLogits(logits, tree, buf[:L],
                                                                                      logits_processor)
                if params.greedy:
                    argmax = logits.argmax(-1).cpu().numpy() if logits_processor is None else node_logits.argmax
                    path, bonus = greedy_accept(tree, argmax, children)
                else:
                    path, bonus = sample_accept(tree, lambda i: warp(node_logits[i], params), children, rng)
                # 5. commit: the KV cache keeps the accepted path; its tokens join the sequence, cut at the
                #    length limit, EOS or a stop string, and are emitted after step 6 (a consumer that stops
                #    reading at these tokens must not keep the drafters from learning this step)
                self.verifier.commit(path)
                if feats is not None:   # the root's and the accepted nodes' rows, at positions L-1 ..
                    feats[L - 1: L - 1 + len(path)] = self.verifier.features[torch.as_tensor(path)]
                accepted = [int(tree.tokens[i]) for i in path[1:]] + [int(bonus)]
                toks = accepted[: max_new - produced]
                for j, t in enumerate(toks):
                    if t in eos:
                        toks = toks[: j + 1]
                        st.finish = "eos"
                        break
                buf[L: L + len(toks)] = toks  # past ctx.tokens (a view of buf[:L]), which stays as it was
                L += len(toks)
                produced += len(toks)
                st.steps += 1
                st.drafted_per_step.append(tree.num_drafts)
                st.tokens_per_step.append(len(toks))
                if stop and self.tokenizer is not None:
                    cut = self._stop_cut(buf[len(prompt): L].tolist(), stop)
                    if cut is not None:
                        keep, text = cut
                        toks = toks[: max(0, keep - (produced - len(toks)))]
                        st.text, st.finish = text, "stop"
                # 6. observe (what the target accepted, before the length/EOS/stop cut)
                self._observe(ctx, tree, path, accepted, logits, drafters)
                if toks:
                    yield toks
                if st.finish != "length":
                    break
        finally:
            st.seconds = time.perf_counter() - t_start
            if st.prefill is None:
                st.prefill = st.seconds
            for d in drafters:
                try:
                    d.end_request()
                except Exception as e:  # noqa: BLE001
                    self.drafter_errors.record(d, "end_request", e)

    # ------------------------------------------------------------------ steps
    def _feature_buffer(self, n: int, L: int) -> torch.Tensor:
        """[n, h] for a request's target features, its first L - 1 rows from the prefill just run."""
        v = self.verifier
        buf = torch.empty((n, int(self.model.config.hidden_size)), dtype=v.dtype, device=v.device)
        if L > 1:
            buf[: L - 1] = v.features[-(L - 1):]
        return buf

    def _propose(self, ctx: DecodeContext, drafters, remaining: int) -> DraftTree:
        """Steps 1 (propose) and 2 (fuse, then choose this step's budget): the tree to verify."""
        root = ctx.last_token
        if not drafters:
            return DraftTree.empty(root)
        # 1. propose: every prefetch first, so that remote round trips overlap local drafting
        budget = self.controller.max_budget
        errors = self.drafter_errors
        clock = time.perf_counter
        spent = [0.0] * len(drafters)
        for i, d in enumerate(drafters):
            t0 = clock()
            try:
                d.prefetch(ctx, budget)
            except Exception as e:  # noqa: BLE001 - counted and logged; the drafter may still propose
                errors.record(d, "prefetch", e)
            spent[i] = clock() - t0
        trees = []
        for i, d in enumerate(drafters):
            t0 = clock()
            try:
                t = d.propose(ctx, budget)
                if t.num_drafts > 0 and t.root == root:
                    trees.append(t)
            except Exception as e:  # noqa: BLE001 - counted and logged; this step goes on without its tree
                errors.record(d, "propose", e)
            self._stats_of(d)["seconds"] += spent[i] + clock() - t0
        if not trees:
            self.controller.steps += 1
            return DraftTree.empty(root)
        if ctx.draft_hint is not None:   # the datastore pruned its own tree by the same hint
            skip = int(Source.DRAFT_MODEL | Source.DATASTORE | Source.DOCUMENTS)
            trees = [t if (t.sources[1:] & skip).any() else prune_by_hint(t, ctx.draft_hint) for t in trees]
        # 2. fuse, drop what cannot be verified, and let the controller choose the budget
        fused = fuse(trees, 4 * budget)
        fused = self._sanitize(fused, remaining)
        tree, _ = self.controller.choose(fused)
        return tree

    def _stats_of(self, d) -> dict:
        """``drafter_stats`` of ``d``'s class (a drafter may join ``self.drafters`` after construction)."""
        st = self.drafter_stats.get(type(d).__name__)
        if st is None:
            st = self.drafter_stats[type(d).__name__] = {"seconds": 0.0, "verified": 0, "accepted": 0}
        return st

    def _sanitize(self, tree: DraftTree, remaining: int) -> DraftTree:
        """Drop nodes with ids outside the vocabulary, deeper than the room left, or past the context."""
        room = min(remaining, self.max_context - self.verifier.past_len - 1)
        ok = (tree.tokens >= 0) & (tree.tokens < self.vocab_size)
        depth = tree.depths()
        ok &= depth < max(room, 1)
        if ok.all():
            return tree
        ok[0] = True
        for i in range(1, len(tree)):  # a dropped node drops its subtree
            ok[i] = ok[i] and ok[tree.parents[i]]
        return tree.subset(np.flatnonzero(ok))

    def _observe(self, ctx, tree: DraftTree, path, toks, logits: torch.Tensor, drafters) -> None:
        """Step 6: the budget controller and every drafter learn from the verified tree."""
        if not drafters:
            return
        self.controller.observe(tree, path)
        if len(tree) > 1:
            on_path = np.zeros(len(tree), bool)
            on_path[path] = True
            for d in drafters:
                mine = (tree.sources[1:] & int(d.source)) != 0
                if d.source and mine.any():
                    st = self._stats_of(d)
                    st["verified"] += int(mine.sum())
                    st["accepted"] += int((mine & on_path[1:]).sum())
        if self._needs_topk:
            probs = torch.softmax(logits, dim=-1)
            top = torch.topk(probs, self.topk, dim=-1)
            tk, tp = top.indices.cpu().numpy(), top.values.cpu().numpy()
        else:
            tk = np.zeros((len(tree), 0), np.int64)
            tp = np.zeros((len(tree), 0), np.float32)
        step = StepResult(tree, np.asarray(path), np.asarray(toks, np.int64), tk, tp, ctx)
        for d in drafters:
            try:
                d.observe(step)
            except Exception as e:  # noqa: BLE001
                self.drafter_errors.record(d, "observe", e)

    def _stop_cut(self, new: list[int], stop: Sequence[str]) -> Optional[tuple[int, str]]:
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s in text]
        if not hits:
            return None
        at = min(hits)
        for m in range(1, len(new) + 1):  # fewest tokens whose text reaches the stop string
            if any(s in self.tokenizer.decode(new[:m], skip_special_tokens=True) for s in stop):
                return m, text[:at]
        return len(new), text[:at]
