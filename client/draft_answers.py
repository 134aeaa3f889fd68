"""The target's own answers, for self-distillation (``draft-model answers``).

A draft distilled on raw corpus text learns the corpus; what it must predict when drafting is the target's
own answers. Greedy answers of the target to instructions (from any JSON / JSON-lines files: the corpus's
question sets, not the prompts a benchmark measures) are written as JSON lines ``{"text": prompt + answer}``
(chat-formatted with the tokenizer's template when it has one), which ``draft-model distill --text`` reads.

Passages (``read_passages``: paragraphs of .txt / .md files) become prompts of other task types
(``passage_prompts``: summarise a passage, state its main point or its key facts, answer what it is about), so
that the draft also learns how the target answers about a text it is given, as in summarisation and
retrieval-augmented prompts; instruction files alone teach it chat answers only.

Resumable: answers are appended batch by batch and flushed; a rerun with the same arguments skips the prompts
already answered (the prompt order is a fixed shuffle of ``seed``). A prompt longer than ``max_prompt_tokens``
is cut to it before the chat template is applied, so that the template's assistant turn is never cut off.
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


def _files(paths: Sequence, suffixes: tuple, flag: str) -> list[Path]:
    """The files named, and those with ``suffixes`` inside the folders named (sorted)."""
    files: list[Path] = []
    for inp in paths:
        p = Path(inp).expanduser()
        if not p.exists():
            raise PromptFileError(f"{flag} {inp}: no such file or folder")
        files += [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix in suffixes)
    return files


def read_prompts(paths: Sequence, field: Optional[str] = None) -> list[str]:
    """Prompts from .json (a list of objects or strings) and .jsonl files, or folders of them."""
    files = _files(paths, (".json", ".jsonl"), "--prompts")
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


# task templates for passages: the instruction first, so that nothing but the passage's end is ever cut
PASSAGE_TASKS = (
    "Summarize the following text in a few sentences.\n\n{p}",
    "Write a one-paragraph summary of this passage:\n\n{p}",
    "Read the text below and explain its main point.\n\n{p}",
    "List the key facts stated in the following passage.\n\n{p}",
    "Here is a document. What is it about? Answer briefly.\n\n{p}",
)


def read_passages(paths: Sequence, min_chars: int = 300, max_chars: int = 1500) -> list[str]:
    """Passages of .txt / .md files (or folders of them): consecutive paragraphs (blank-line separated)
    joined up to ``max_chars``; shorter than ``min_chars``: dropped."""
    files = _files(paths, (".txt", ".md"), "--passages")
    out: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PromptFileError(f"{f}: not readable as UTF-8 text ({e})") from None
        cur = ""
        for para in (x.strip() for x in text.replace("\r\n", "\n").split("\n\n")):
            if not para:
                continue
            if cur and len(cur) + 2 + len(para) > max_chars:
                out.append(cur)
                cur = ""
            cur = (cur + "\n\n" + para) if cur else para[:max_chars]
        if cur:
            out.append(cur)
    out = [x for x in out if len(x) >= min_chars]
    if not out:
        raise PromptFileError(f"no passages of at least {min_chars} characters in {', '.join(map(str, paths))}")
    return out


def passage_prompts(passages: Sequence[str], seed: int = 0) -> list[str]:
    """One prompt per passage, its task drawn from ``PASSAGE_TASKS`` (a fixed draw for ``seed``)."""
    rng = random.Random(seed)
    return [rng.choice(PASSAGE_TASKS).format(p=p) for p in passages]


def _cut(tokenizer, prompt: str, max_tokens: int) -> str:
    """``prompt`` cut to its first ``max_tokens`` tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


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
                # the prompt is cut, not the formatted text: the template's assistant turn must stay whole
                texts = [_formatted(tokenizer, _cut(tokenizer, p, max_prompt_tokens)) for p in todo[i:i + batch]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
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
