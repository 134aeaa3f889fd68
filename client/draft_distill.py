"""``draft-model distill``: train a small draft (draft_build.py) to match the target's next-token
distribution on a corpus (draft_corpus.py), with checkpoints, resume after a kill, and a held-out top-1
agreement figure.

Loss: KL(target || draft) at every position of every window, on the target's top-k tokens renormalised
(``top_k=0``: the full vocabulary). The draft still normalises over the whole vocabulary, so top-k only
trims the target's side: it saves the memory and time of a full [tokens, vocab] target distribution and
puts the weight where drafts are accepted.

The output folder ``out`` holds, once done, a plain Hugging Face model folder (config.json,
model.safetensors, tokenizer files, generation_config.json) and ``distill.json`` (recipe, steps, seconds,
agreement before and after). While training it holds ``distill-checkpoint.pt`` (written atomically every
``checkpoint_every`` steps, on Ctrl-C and when the time budget ends): trainable weights, optimizer state,
step (the data position follows from it: draft_corpus.batch_rows), RNG states, the held-out targets. A run
finding a checkpoint of the same recipe in ``out`` resumes from it automatically (a rerun of the same
command continues); a checkpoint of another recipe, or other files, are refused. A resumed run replays the
same batches and learning rates, so its final weights equal an uninterrupted run's (same threads, same
device). The checkpoint is deleted when all steps are done.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..datastore.durable import atomic_open, fsync_dir, sha256_file, write_json
from ..datastore.index_format import tokenizer_fingerprint
from .draft_build import build_draft, default_init_layers, freeze_shared, load_draft, load_trainable_state, \
    trainable_state
from .draft_compat import DISTILL_FILE, check_draft_compatible, read_distill_info
from .draft_corpus import Windows, batch_rows, data_position, load_corpus, split_windows
from .feature_head import (FeatureHead, build_feature_head, check_head_compatible, is_feature_head,
                           load_feature_head, previous_features, save_feature_head, target_outputs)

CHECKPOINT_FILE = "distill-checkpoint.pt"
FORMAT = "specstore-draft-distill"
FORMAT_VERSION = 1
#: test hook: SIGKILL this process right after this (1-based) step, before its checkpoint (a real kill)
KILL_ENV = "SPECSTORE_DISTILL_KILL_AT_STEP"
#: the held-out KL is measured on the target's top EVAL_TOP_K tokens whatever --top-k trains with, so
#: figures of different recipes compare (and the held-out targets stay small enough to checkpoint)
EVAL_TOP_K = 64
MIN_LR_FRACTION = 0.1

# The default recipe (BENCHMARKS.md "Draft distillation": chosen by short timing runs on a 2-core CPU)
DEFAULT_LAYERS = 4
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH = 4
DEFAULT_LR = 3e-3
DEFAULT_STEPS = 220
#: --feature-head's default steps: ~25 minutes on 2 cores where bfloat16 is fast (AMX: ~0.9 s a step), ~30
#: where training runs in float32 (~3 s a step)
DEFAULT_HEAD_STEPS = {"bfloat16": 1650, "float32": 600}
DEFAULT_TOP_K = 64
DEFAULT_HOLDOUT = 0.05
DEFAULT_EVAL_WINDOWS = 32
DEFAULT_CHECKPOINT_EVERY = 25
#: --feature-head: weight of the feature regression (smooth L1 to the target's hidden state) next to the KL
DEFAULT_FEATURE_WEIGHT = 5.0


@dataclass
class DistillOptions:
    """One distillation. ``layers``/``init_layers``: the draft's depth and which target layers start it
    (default: the first ``layers``); ``init_from``: start from an existing draft folder instead.
    ``max_minutes``: this run's training time budget (a checkpoint and a usable draft are written when it
    ends; rerun to continue). ``steps``: the total number of steps (part of the recipe: the learning rate
    schedule spans it)."""

    out: str
    model: Optional[str] = None
    index: Optional[str] = None
    texts: Optional[list] = None
    layers: Optional[int] = None
    init_layers: Optional[list] = None
    init_from: Optional[str] = None
    seq_len: int = DEFAULT_SEQ_LEN
    batch: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    steps: Optional[int] = None          # None: DEFAULT_STEPS, or DEFAULT_HEAD_STEPS[precision] for a head
    warmup: Optional[int] = None
    top_k: int = DEFAULT_TOP_K
    holdout: float = DEFAULT_HOLDOUT
    eval_windows: int = DEFAULT_EVAL_WINDOWS
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    max_minutes: Optional[float] = None
    seed: int = 0
    device: Optional[str] = "cpu"
    feature_head: bool = False
    feature_weight: float = DEFAULT_FEATURE_WEIGHT
    precision: str = "float32"           # or bfloat16, or auto (models.fast_precision on the device)
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr))

    def __post_init__(self) -> None:
        from .models import resolve_precision

        self.precision = resolve_precision(self.precision, self.device)
        if self.steps is None:
            self.steps = DEFAULT_HEAD_STEPS.get(self.precision, DEFAULT_STEPS) if self.feature_head else DEFAULT_STEPS

    def check(self) -> None:
        """ValueError naming the flag of the first bad value."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)
        need(bool(self.out), "--out is required")
        need(bool(self.index or self.texts),
             "no corpus: give --index DIR (built by index-build), --text FILE_OR_FOLDER... or both")
        need(self.layers is None or self.layers >= 1, "--layers must be >= 1")
        need(not (self.feature_head and (self.layers or self.init_layers)),
             "--feature-head trains one layer that reads the target's hidden states: drop --layers/--init-layers")
        need(self.feature_weight >= 0, "--feature-weight must be >= 0")
        need(self.precision in ("float32", "bfloat16"), "--precision must be float32 or bfloat16")
        need(not (self.init_from and (self.layers or self.init_layers)),
             "--init-from takes the draft's own layers: drop --layers/--init-layers")
        need(not (self.layers and self.init_layers and len(self.init_layers) != self.layers),
             "--init-layers must name --layers layers")
        need(self.seq_len >= 2, "--seq-len must be >= 2")
        need(self.batch >= 1, "--batch must be >= 1")
        need(self.lr > 0, "--lr must be > 0")
        need(self.steps >= 1, "--steps must be >= 1")
        need(self.warmup is None or self.warmup >= 0, "--warmup must be >= 0")
        need(self.top_k >= 0, "--top-k must be >= 0 (0 = the full vocabulary)")
        need(0 < self.holdout < 1, "--holdout must be a fraction between 0 and 1")
        need(self.eval_windows >= 1, "--eval-windows must be >= 1")
        need(self.checkpoint_every >= 1, "--checkpoint-every must be >= 1")
        need(self.max_minutes is None or self.max_minutes > 0, "--max-minutes must be > 0")


# ------------------------------------------------------------------------------------------------ loss
def target_distribution(logits: torch.Tensor, top_k: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(token ids [.., k] int64 or None for the full vocabulary, log-probabilities [.., k or V]) of the
    target's next-token distribution; top-k is renormalised over the k tokens."""
    logits = logits.float()
    if top_k and top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)
        return idx, torch.log_softmax(vals, dim=-1)
    return None, torch.log_softmax(logits, dim=-1)


def kl_loss(draft_logits: torch.Tensor, idx: Optional[torch.Tensor], target_logq: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(q || p_draft) = sum_k q_k (log q_k - log p_draft(k)), the draft normalised
    over its whole vocabulary. draft_logits: [B, T, V]; idx/target_logq from ``target_distribution``."""
    logp = torch.log_softmax(draft_logits.float(), dim=-1)
    if idx is not None:
        logp = logp.gather(-1, idx)
    q = target_logq.exp()
    return (q * (target_logq - logp)).sum(-1).mean()


def train_loss(target, draft, x: torch.Tensor, top_k: int, feature_weight: float = 0.0,
               bf16: bool = False) -> torch.Tensor:
    """One batch's loss: KL(target || draft) on ``x`` [B, T]; for a feature head plus ``feature_weight`` x the
    smooth L1 distance of its hidden states to the target's (EAGLE's regression term: the head's output is
    the next row's input while a tree grows, so it has to be a good feature, not only give good logits).
    ``bf16``: the draft's forward under bfloat16 autocast (``target`` is then the bfloat16 teacher)."""
    with torch.no_grad():
        f, lg = target_outputs(target, x)
        f = f.float()
        idx, logq = target_distribution(lg, top_k)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        h, dl = draft_logits(draft, x, f)
    loss = kl_loss(dl, idx, logq)
    if h is not None and feature_weight:
        loss = loss + feature_weight * torch.nn.functional.smooth_l1_loss(h.float(), f)
    return loss


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Learning rate of the 0-based ``step``: linear warm-up over ``warmup`` steps, then a cosine decay to
    MIN_LR_FRACTION * lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------- evaluation
@dataclass
class HeldOut:
    """The target on the held-out windows, computed once: tokens int32 [n, T], top1 int64 [n, T], the
    top-EVAL_TOP_K (idx int64, logq float32) [n, T, k] and, for a feature head, the target's final hidden
    states (features float32 [n, T, h])."""

    tokens: torch.Tensor
    top1: torch.Tensor
    idx: torch.Tensor
    logq: torch.Tensor
    features: Optional[torch.Tensor] = None

    @classmethod
    @torch.no_grad()
    def compute(cls, target, windows: np.ndarray, batch: int, features: bool = False) -> "HeldOut":
        dev = next(target.parameters()).device
        x = torch.from_numpy(windows).long()
        top1, idx, logq, feats = [], [], [], []
        for i in range(0, len(x), batch):
            f, lg = target_outputs(target, x[i:i + batch].to(dev))
            top1.append(lg.argmax(-1).cpu())
            vals, k_idx = lg.float().topk(min(EVAL_TOP_K, lg.shape[-1]), dim=-1)
            idx.append(k_idx.cpu())
            logq.append(torch.log_softmax(vals, dim=-1).cpu())
            if features:
                feats.append(f.float().cpu())
        return cls(x.int(), torch.cat(top1), torch.cat(idx), torch.cat(logq), torch.cat(feats) if features else None)

    def to_state(self) -> dict:
        return {"tokens": self.tokens, "top1": self.top1, "idx": self.idx, "logq": self.logq,
                "features": self.features}

    @classmethod
    def from_state(cls, d: dict) -> "HeldOut":
        return cls(d["tokens"], d["top1"], d["idx"], d["logq"], d.get("features"))


def draft_logits(draft, x: torch.Tensor, features: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(the head's hidden states or None, logits [B, T, V]) of a draft LM or a feature head over ids ``x``;
    ``features``: the target's over ``x`` (a feature head reads them one row late)."""
    if isinstance(draft, FeatureHead):
        return draft(x, previous_features(features), use_cache=False)
    return None, draft(input_ids=x, use_cache=False).logits


@torch.no_grad()
def evaluate(draft, held: HeldOut, batch: int) -> dict:
    """{"top1_agreement": share of held-out positions where the draft's argmax is the target's,
    "top5_has_target_top1": share where the target's argmax is among the draft's 5 best (what a tree
    with 5 children per node can catch), "kl_top64": mean KL on the target's top-64, "positions": n}."""
    was_training = draft.training
    draft.eval()
    dev = next(draft.parameters()).device
    hits, hits5, kl_sum, n = 0, 0, 0.0, 0
    for i in range(0, len(held.tokens), batch):
        f = None if held.features is None else held.features[i:i + batch].to(dev)
        _, lg = draft_logits(draft, held.tokens[i:i + batch].long().to(dev), f)
        want = held.top1[i:i + batch]
        hits += int((lg.argmax(-1).cpu() == want).sum())
        hits5 += int((lg.topk(min(5, lg.shape[-1]), dim=-1).indices.cpu() == want[..., None]).any(-1).sum())
        m = lg.shape[0] * lg.shape[1]
        kl_sum += float(kl_loss(lg, held.idx[i:i + batch].to(dev), held.logq[i:i + batch].to(dev))) * m
        n += m
    draft.train(was_training)
    return {"top1_agreement": hits / n, "top5_has_target_top1": hits5 / n, f"kl_top{EVAL_TOP_K}": kl_sum / n,
            "positions": n}


# ------------------------------------------------------------------------------------ recipe and output
def _file_digest(folder: Path) -> str:
    """sha256 over a model folder's weight files (what an --init-from draft is identified by)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()[:16]


def make_recipe(opts: DistillOptions, target, target_folder: Path, tokenizer, corpus_source: dict,
                init_layers: Optional[list], n_eval: int) -> dict:
    """Everything that decides the trained weights (a resumed run must have the same), as plain JSON."""
    cfg = target.config
    init = None
    if opts.init_from:
        p = Path(opts.init_from).expanduser().resolve()
        init = {"path": str(p), "weights_sha256": _file_digest(p)}
    return {
        "target": {"folder": str(target_folder), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                   "num_hidden_layers": int(cfg.num_hidden_layers), "hidden_size": int(cfg.hidden_size),
                   "vocab_size": int(cfg.vocab_size)},
        "corpus": corpus_source,
        "draft": {"init_layers": init_layers, "init_from": init,
                  "frozen": "input embedding and output layer (the target's)",
                  **({"kind": "feature head", "feature_weight": opts.feature_weight} if opts.feature_head else {})},
        "train": {"seq_len": opts.seq_len, "batch": opts.batch, "lr": opts.lr, "steps": opts.steps,
                  "warmup": _warmup(opts), "schedule": f"linear warm-up, cosine to {MIN_LR_FRACTION} x lr",
                  "optimizer": "AdamW betas (0.9, 0.95), weight decay 0, gradient norm clipped at 1",
                  "loss": "KL(target || draft)" + (" + feature_weight x smooth L1(head's hidden state, target's)"
                                                   if opts.feature_head else ""),
                  "top_k": opts.top_k, "seed": opts.seed, "precision": opts.precision},
        "held_out": {"fraction": opts.holdout, "eval_windows": n_eval},
    }


def _warmup(opts: DistillOptions) -> int:
    return opts.warmup if opts.warmup is not None else max(1, opts.steps // 20)


def recipe_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys where two recipes differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += recipe_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def inspect_out(out: Path) -> str:
    """"new" (absent or empty), "checkpoint" (a run to resume), "done" (distill.json, no checkpoint) or
    "partial" (a draft written when a time budget ended, plus its checkpoint: same as "checkpoint");
    ValueError for a file or a folder of other things."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if (out / CHECKPOINT_FILE).exists():
        return "checkpoint"
    if (out / DISTILL_FILE).exists():
        return "done"
    if any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not a draft-model distill output (no {CHECKPOINT_FILE} or "
                         f"{DISTILL_FILE}); choose a new folder")
    return "new"


def save_draft_folder(draft, tokenizer, out: Path) -> None:
    """Write the HF folder files into ``out`` (each file moved in with one rename; ``distill.json``, written
    after, marks the set complete)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".save.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        draft.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _machine(threads: int, device: torch.device) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch_threads": threads,
            "device": str(device), "torch": torch.__version__}


# ------------------------------------------------------------------------------------------- the run
def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@dataclass
class _Setup:
    """What a run reads before it trains: the target, the corpus split into windows, the recipe."""

    out: Path
    target: object
    tokenizer: object
    device: torch.device
    corpus: object
    windows: Windows
    n_eval: int
    init_layers: Optional[list]
    recipe: dict
    load_seconds: float


@dataclass
class _Progress:
    """What a checkpoint keeps besides the weights and the optimizer (and what the report needs)."""

    step: int
    held: HeldOut
    before: dict
    losses: list
    train_seconds: float


def _prepare(opts: DistillOptions, t0: float) -> _Setup:
    """Load the target and the corpus, check the options against them, and write down the recipe."""
    from .models import load_model, model_folder, pick_device

    dev = pick_device(opts.device)
    target_folder = model_folder(opts.model)
    target, tok = load_model(opts.model, device=str(dev), dtype="float32")
    target.requires_grad_(False)
    n_target = int(target.config.num_hidden_layers)
    if opts.layers and opts.layers > n_target:
        raise ValueError(f"--layers {opts.layers}: the target has only {n_target} layers")
    init_layers = None
    if opts.feature_head:
        if opts.init_from:
            check_head_compatible(target, tok, opts.init_from)
        else:
            init_layers = [n_target - 1]
    elif not opts.init_from:
        init_layers = list(opts.init_layers) if opts.init_layers else default_init_layers(opts.layers or DEFAULT_LAYERS)
    else:
        check_draft_compatible(target, tok, opts.init_from)
    corpus = load_corpus(opts.index, opts.texts, tok, target.config)
    if len(corpus.stream) == 0:
        skipped = f" ({len(corpus.skipped_files)} files of unknown kinds skipped)" if corpus.skipped_files else ""
        raise ValueError(f"the corpus is empty: no documents with text{skipped}")
    windows = split_windows(corpus.stream, opts.seq_len, opts.holdout, opts.seed)
    n_eval = min(opts.eval_windows, len(windows.held_out))
    recipe = make_recipe(opts, target, target_folder, tok, corpus.source, init_layers, n_eval)
    return _Setup(Path(opts.out).expanduser().resolve(), target, tok, dev, corpus, windows, n_eval, init_layers,
                  recipe, time.perf_counter() - t0)


def _existing_run(setup: _Setup, state_kind: str, opts: DistillOptions):
    """("done", distill.json) for a finished run of this recipe, ("resume", checkpoint) for one to continue,
    (None, None) for a new folder; ValueError for another recipe's output."""
    out = setup.out
    if state_kind == "done":
        info = read_distill_info(out) or {}
        if not info.get("complete"):
            raise ValueError(f"--out {out}: holds an unfinished draft whose checkpoint is gone; choose a new folder")
        diff = recipe_diff(info.get("recipe", {}), setup.recipe)
        if diff:
            raise ValueError(f"--out {out}: holds a draft distilled with another recipe (differs in "
                             f"{', '.join(diff)}); choose a new folder")
        return "done", info
    if state_kind == "checkpoint":
        ckpt = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        diff = recipe_diff(ckpt.get("recipe", {}), setup.recipe)
        if diff:
            raise ValueError(f"--out {out}: holds a checkpoint of another recipe (differs in {', '.join(diff)}); "
                             "rerun with the same options to resume it, or choose a new folder")
        if opts.feature_head and is_feature_head(out):   # a head written when an earlier run's budget ended
            check_head_compatible(setup.target, setup.tokenizer, out)
        elif (out / "config.json").exists():   # a draft written when an earlier run's time budget ended
            check_draft_compatible(setup.target, setup.tokenizer, out, shared_embedding=opts.init_from is None)
        return "resume", ckpt
    return None, None


def _start(setup: _Setup, opts: DistillOptions, ckpt: Optional[dict]):
    """(draft, trainable params, optimizer, _Progress): fresh (the held-out targets and the "before" figure
    measured now) or as the checkpoint left them."""
    torch.manual_seed(opts.seed)
    if opts.feature_head:
        draft = (load_feature_head(opts.init_from, setup.target, setup.tokenizer, train=True) if opts.init_from
                 else build_feature_head(setup.target, setup.init_layers[0]))
        params = [p for p in draft.parameters() if p.requires_grad]   # the target's embedding is frozen
    else:
        draft = load_draft(opts.init_from, setup.device) if opts.init_from else build_draft(setup.target,
                                                                                            setup.init_layers)
        params = freeze_shared(draft)
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if ckpt is not None:
        load_trainable_state(draft, ckpt["trainable"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        prog = _Progress(int(ckpt["step"]), HeldOut.from_state(ckpt["held_out"]), ckpt["before"],
                         list(ckpt["losses"]), float(ckpt["train_seconds"]))
        opts.log(f"resuming {setup.out} from its checkpoint at step {prog.step} of {opts.steps}")
        return draft, params, opt, prog
    t = time.perf_counter()
    held = HeldOut.compute(setup.target, setup.windows.held_out[:setup.n_eval], opts.batch, features=opts.feature_head)
    before = evaluate(draft, held, opts.batch)
    before["seconds"] = time.perf_counter() - t
    opts.log(f"held-out top-1 agreement before training: {before['top1_agreement']:.1%} "
             f"({before['positions']:,} positions)")
    return draft, params, opt, _Progress(0, held, before, [], 0.0)


def _train(setup: _Setup, opts: DistillOptions, draft, params, opt, prog: _Progress) -> tuple[Optional[str], float]:
    """Train until ``opts.steps`` or the time budget; checkpoints on the way, on Ctrl-C (then re-raised) and
    at a budget stop. Returns (why it stopped early or None, seconds of training in this run)."""
    from tqdm.auto import tqdm

    ckpt_path = setup.out / CHECKPOINT_FILE
    n_train, warmup = len(setup.windows.train), _warmup(opts)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    bf16 = opts.precision == "bfloat16"
    # the teacher's forward is half of a step: in bfloat16 it runs ~3x faster where the CPU has bf16 matrix
    # units (BENCHMARKS.md, "Draft distillation"); the held-out figures stay on the float32 target
    teacher = copy.deepcopy(setup.target).to(torch.bfloat16) if bf16 else setup.target
    deadline = None if opts.max_minutes is None else time.perf_counter() + 60 * opts.max_minutes
    t_train = time.perf_counter()

    def checkpoint():
        _save_checkpoint(ckpt_path, {
            "recipe": setup.recipe, "step": prog.step, "trainable": trainable_state(draft),
            "optimizer": opt.state_dict(), "rng": _rng_state(), "held_out": prog.held.to_state(),
            "before": prog.before, "losses": prog.losses,
            "train_seconds": prog.train_seconds + (time.perf_counter() - t_train),
            "data": data_position(n_train, opts.batch, prog.step)})

    setup.out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=opts.steps, initial=prog.step, disable=not opts.progress, unit="step", desc="distill",
               dynamic_ncols=True, file=sys.stderr)
    stopped = None
    try:
        while prog.step < opts.steps:
            rows = batch_rows(n_train, opts.batch, prog.step, opts.seed)
            x = torch.from_numpy(setup.windows.train[rows]).long().to(setup.device)
            for g in opt.param_groups:
                g["lr"] = lr_at(prog.step, opts.steps, opts.lr, warmup)
            loss = train_loss(teacher, draft, x, opts.top_k, opts.feature_weight, bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            prog.step += 1
            prog.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(kl=f"{np.mean(prog.losses[-20:]):.3f}", refresh=False)
            if prog.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if prog.step < opts.steps and deadline is not None and time.perf_counter() >= deadline:
                stopped = f"time budget of {opts.max_minutes:g} min"
                checkpoint()
                break
            if prog.step % opts.checkpoint_every == 0 and prog.step < opts.steps:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        opts.log(f"checkpoint saved at step {prog.step} in {ckpt_path}")
        raise
    bar.close()
    return stopped, time.perf_counter() - t_train


def _report(setup: _Setup, opts: DistillOptions, draft, params, prog: _Progress, after: dict,
            stopped: Optional[str], run_steps: int, run_train: float, t0: float) -> dict:
    """The ``distill.json`` contents."""
    losses = prog.losses
    every = max(10, len(losses) // 20)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "complete": prog.step >= opts.steps, "stopped": stopped,
        "steps": prog.step, "tokens_trained": prog.step * opts.batch * opts.seq_len,
        "recipe": setup.recipe, "shares_target_embedding": opts.init_from is None or opts.feature_head,
        "kind": "feature head" if opts.feature_head else "draft model",
        "draft": {"num_hidden_layers": int(draft.config.num_hidden_layers),
                  "target_num_hidden_layers": int(setup.target.config.num_hidden_layers),
                  "init_layers": setup.init_layers, "parameters": sum(p.numel() for p in draft.parameters()),
                  "trainable_parameters": sum(p.numel() for p in params)},
        "corpus": {"documents": setup.corpus.documents, "tokens": int(len(setup.corpus.stream)),
                   "train_windows": int(len(setup.windows.train)),
                   "held_out_windows": int(len(setup.windows.held_out)),
                   "data_position": data_position(len(setup.windows.train), opts.batch, prog.step)},
        "agreement": {"before": prog.before, "after": after},
        # the curve: mean training loss of 10 steps, every `every` steps
        "loss": {"first": losses[0] if losses else None,
                 "last20_mean": float(np.mean(losses[-20:])) if losses else None, "curve_every": every,
                 "curve": [round(float(np.mean(losses[i:i + 10])), 4) for i in range(0, len(losses), every)]},
        "seconds": {"load_this_run": round(setup.load_seconds, 1), "train_total": round(prog.train_seconds, 1),
                    "train_this_run": round(run_train, 1), "eval_after": round(after["seconds"], 1),
                    "wall_this_run": round(time.perf_counter() - t0, 1)},
        "steps_per_second_this_run": round(run_steps / run_train, 4) if run_train > 0 and run_steps else None,
        "machine": _machine(torch.get_num_threads(), setup.device),
    }


def distill(opts: DistillOptions) -> dict:
    """Run (or resume, or recognise as done) one distillation; returns the ``distill.json`` contents.

    ValueError / FileNotFoundError on bad input (no or empty corpus, layers beyond the target's, an output
    folder of something else or of another recipe, an incompatible --init-from draft)."""
    t0 = time.perf_counter()
    opts.check()
    state_kind = inspect_out(Path(opts.out).expanduser().resolve())   # before the slow loads: fail fast
    setup = _prepare(opts, t0)
    kind, found = _existing_run(setup, state_kind, opts)
    if kind == "done":
        opts.log(f"{setup.out}: already distilled with this recipe ({found.get('steps')} steps); nothing to do")
        return found
    draft, params, opt, prog = _start(setup, opts, found)
    first_step = prog.step
    stopped, run_train = _train(setup, opts, draft, params, opt, prog)
    prog.train_seconds += run_train
    t = time.perf_counter()
    after = evaluate(draft, prog.held, opts.batch)
    after["seconds"] = time.perf_counter() - t
    info = _report(setup, opts, draft, params, prog, after, stopped, prog.step - first_step, run_train, t0)
    if opts.feature_head:
        save_feature_head(draft, setup.out, setup.target, setup.tokenizer)
    else:
        save_draft_folder(draft, setup.tokenizer, setup.out)
    write_json(setup.out / DISTILL_FILE, info)
    if info["complete"]:
        (setup.out / CHECKPOINT_FILE).unlink(missing_ok=True)
        fsync_dir(setup.out)
    return info


def summary(info: dict, out) -> str:
    """Three lines for people: what ran, how long, the agreement."""
    b, a = info["agreement"]["before"], info["agreement"]["after"]
    d = info["draft"]
    sps = info.get("steps_per_second_this_run")
    tr = info["recipe"]["train"]
    what = ("a feature head: 1 layer reading the target's hidden states" if info.get("kind") == "feature head"
            else f"{d['num_hidden_layers']} of {d['target_num_hidden_layers']} target layers")
    lines = [
        f"draft      {out}  ({what}, "
        f"{d['parameters'] / 1e6:.1f}M parameters, {d['trainable_parameters'] / 1e6:.1f}M trained)",
        f"training   {info['steps']} of {tr['steps']} steps  {info['tokens_trained']:,} tokens  "
        f"{info['seconds']['train_total'] / 60:.1f} min" + (f"  ({sps:.3f} steps/s this run)" if sps else "")
        + ("" if info["complete"] else f"  stopped: {info['stopped']}; rerun the same command to continue"),
        f"held-out   top-1 agreement {b['top1_agreement']:.1%} -> {a['top1_agreement']:.1%}  "
        + (f"target's top-1 in the draft's top-5 {b['top5_has_target_top1']:.1%} -> "
           f"{a['top5_has_target_top1']:.1%}  " if "top5_has_target_top1" in a and "top5_has_target_top1" in b else "")
        + f"KL(top-{EVAL_TOP_K}) {b[f'kl_top{EVAL_TOP_K}']:.3f} -> {a[f'kl_top{EVAL_TOP_K}']:.3f}  "
        f"({a['positions']:,} positions)",
    ]
    return "\n".join(lines)
