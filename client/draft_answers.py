"""The target's own answers, for self-distillation (``draft-model answers``).

A draft distilled on raw corpus text learns the corpus; what it must predict when drafting is the target's
own answers. Greedy answers of the target to instructions (from any JSON / JSON-lines files: the corpus's
question sets, not the prompts a benchmark measures) are written as JSON lines ``{"text": prompt + answer}``
(chat-formatted with the tokenizer's template when it has one), which ``draft-model distill --text`` reads.

Resumable: answers are appended batch by batch and flushed; a rerun with the same arguments skips the prompts
already answered (the prompt order is a fixed shuffle of ``seed``).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli_support import iter_jsonl

# the first of these fields that an object has is its prompt ("input" is appended to an "instruction")
PROMPT_KEYS = ("prompt", "question", "instruction", "query", "user_query", "text", "turns")


class PromptFileError(ValueError):
    """A prompts file that cannot be read (one line for the user)."""


def _prompt_of(obj, field: Optional[str]) -> Optional[str]:
    if not isinstance(obj, dict):
        return obj if isinstance(obj, str) and obj.strip() else None
    keys = (field,) if field else PROMPT_KEYS
    for k in keys:
        v = obj.get(k)
        if isinstance(v, list):                  # Spec-Bench / MT-Bench style: the first turn
            v = v[0] if v and isinstance(v[0], str) else None
        if isinstance(v, str) and v.strip():
            extra = obj.get("input") if k == "instruction" else None
            return v + ("\n\n" + extra if isinstance(extra, str) and extra.strip() else "")
    return None


def read_prompts(paths: Sequence, field: Optional[str] = None) -> list[str]:
    """Prompts from .json (a list of objects or strings) and .jsonl files, or folders of them."""
    files = []
    for inp in paths:
        p = Path(inp).expanduser()
        if not p.exists():
            raise PromptFileError(f"--prompts {inp}: no such file or folder")
        files += [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix in (".json", ".jsonl"))
    if not files:
        raise PromptFileError(f"no .json or .jsonl files in {', '.join(map(str, paths))}")
    out = []
    for f in files:
        try:
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
                objs = data if isinstance(data, list) else [data]
            except ValueError:                   # JSON lines (whatever the file's suffix says)
                objs = [o for _, o in iter_jsonl(f)]
        except (ValueError, UnicodeDecodeError) as e:
            raise PromptFileError(f"{f}: not valid JSON ({e})") from None
        out += [p for p in (_prompt_of(o, field) for o in objs) if p]
    if not out:
        want = f"a {field!r} field" if field else "one of the fields " + ", ".join(PROMPT_KEYS)
        raise PromptFileError(f"no prompts found in {', '.join(map(str, files))}: objects need {want}")
    return out


def _formatted(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def _answered(out: Path) -> int:
    if not out.exists():
        return 0
    with out.open("rb") as f:
        lines = f.read().split(b"\n")
    good = [ln for ln in lines if ln.strip()]
    complete = sum(1 for ln in good if ln.endswith(b"}"))
    if complete != len(good):        # a line cut by a kill: drop it, it is answered again
        out.write_bytes(b"".join(ln + b"\n" for ln in good[:complete]))
    return complete


def generate_answers(model, tokenizer, prompts: Sequence[str], out, *, batch: int = 16, max_new_tokens: int = 160,
                     max_prompt_tokens: int = 384, max_minutes: Optional[float] = None, seed: int = 0,
                     max_prompts: Optional[int] = None, progress: bool = True) -> dict:
    """Append the target's greedy answers to ``out`` (JSON lines); returns counts. See the module docstring."""
    import torch

    out = Path(out)
    order = list(prompts)
    random.Random(seed).shuffle(order)
    order = order[:max_prompts]               # (None: all) the same subset for the same seed, on every rerun
    done = _answered(out)
    todo = order[done:]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"            # batched generation: every row ends at the same place
    t0, n_tokens, n_new = time.monotonic(), 0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(order), initial=done, unit="prompt", desc="answers")
    dev = next(model.parameters()).device
    try:
        with out.open("a", encoding="utf-8") as f:
            for i in range(0, len(todo), batch):
                if max_minutes is not None and time.monotonic() - t0 > max_minutes * 60:
                    break
                texts = [_formatted(tokenizer, p) for p in todo[i:i + batch]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=max_prompt_tokens, add_special_tokens=False).to(dev)
                with torch.inference_mode():
                    g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                       eos_token_id=eos)
                for text, row in zip(texts, g[:, enc["input_ids"].shape[1]:].tolist()):
                    if eos in row:
                        row = row[:row.index(eos) + 1]   # keep the end of the answer, drop the padding after it
                    f.write(json.dumps({"text": text + tokenizer.decode(row, skip_special_tokens=False)}) + "\n")
                    n_tokens += len(row)
                    n_new += 1
                f.flush()
                if bar is not None:
                    bar.update(len(texts))
                    bar.set_postfix(tokens=n_tokens)
    finally:
        tokenizer.padding_side = side
        if bar is not None:
            bar.close()
    return {"prompts": len(order), "answered_before": done, "answered_now": n_new, "answer_tokens_now": n_tokens,
            "minutes": round((time.monotonic() - t0) / 60, 2), "complete": done + n_new == len(order)}
