"""What spec-generate and spec-bench share: quiet logging, the exit convention, common options, JSON lines.

The exit convention itself (statuses, one-line errors, ``--version``) is ``datastore/cli_common.py``, shared
with the datastore and indexer CLIs.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..datastore.cli_common import run_cli
from .budget import MAX_BUDGET_CPU, MAX_BUDGET_CUDA, default_max_budget
from ..datastore.model_files import DEFAULT_MODEL

DEFAULT_MAX_NEW_TOKENS = 128

MODEL_HELP = f"model: a local HF folder, a .gguf file, or {DEFAULT_MODEL} (default)"
MAX_BUDGET_HELP = (f"largest number of draft nodes per step (default: from the cost profile, <= {MAX_BUDGET_CPU} "
                   f"on CPU, <= {MAX_BUDGET_CUDA} on CUDA)")


def run_main(prog: str, run: Callable[[object], int], args, interrupt_hint: Optional[str] = None) -> int:
    """Run ``run(args)`` under the exit convention (cli_common.run_cli) with quiet logging.

    A missing optional dependency (ImportError) counts as bad input: its message says what to install; so does
    a ``--datastore`` that cannot be reached at start (its message names the address).
    """
    from .datastore_drafter import DatastoreUnavailableError

    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not getattr(args, "verbose", False):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    return run_cli(prog, lambda: run(args), input_errors=(ImportError, DatastoreUnavailableError),
                   interrupt_hint=interrupt_hint)


def validate_common(args) -> None:
    """Checks of the options spec-generate and spec-bench share; ValueError names the flag."""
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.max_budget is not None and args.max_budget < 0:
        raise ValueError("--max-budget must be >= 0")
    if args.datastore and args.index:
        raise ValueError("give --datastore or --index, not both")
    tls = [f for f in ("datastore_tls_ca", "datastore_tls_cert", "datastore_tls_key") if getattr(args, f, None)]
    if tls and not args.datastore:
        raise ValueError(f"--{tls[0].replace('_', '-')} needs --datastore")


def choose_max_budget(requested: Optional[int], model, profile) -> int:
    """``--max-budget`` when given (non-zero), else the default of the model's device, at most what the cost
    profile measured (``profile.max_size - 1`` drafts)."""
    return requested or min(default_max_budget(next(model.parameters()).device.type), profile.max_size - 1)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, read as it goes (a corpus may be large); ValueError naming
    ``file:line`` on bad JSON."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            yield i, obj


def add_draft_arguments(parser) -> None:
    """The draft-model flags that spec-generate and spec-bench share."""
    g = parser.add_argument_group("draft model (OPT-Tree drafts, RASD pruning, FR-Spec)")
    g.add_argument("--draft-model", metavar="PATH", default=None,
                   help="a local HF causal-LM folder with the target's tokenizer (e.g. made by `draft-model "
                        "distill`); adds the draft drafter: an OPT-Tree grown with one draft forward per depth")
    g.add_argument("--draft-width", type=int, default=8, help="draft tree nodes per depth (default: %(default)s)")
    g.add_argument("--draft-depth", type=int, default=6, help="draft tree depth at most (default: %(default)s)")
    g.add_argument("--draft-vocab", type=int, default=0, metavar="K",
                   help="FR-Spec: the draft proposes only the K most frequent tokens (counted from "
                        "--draft-vocab-from, else --index); 0 = the whole vocabulary (default)")
    g.add_argument("--draft-vocab-from", action="append", default=[], metavar="PATH",
                   help="index folder or text files/folders to count token frequencies from (repeatable)")
    g.add_argument("--no-rasd", action="store_true",
                   help="do not prune the other drafters' trees (and datastore lookups) by the draft's first-step "
                        "distribution")


def validate_draft_arguments(args) -> None:
    from pathlib import Path

    if args.draft_model and not Path(args.draft_model).is_dir():
        raise ValueError(f"--draft-model {args.draft_model}: not a folder (a local HF model folder is needed)")
    if args.draft_width < 1 or args.draft_depth < 1 or args.draft_vocab < 0:
        raise ValueError("--draft-width and --draft-depth must be >= 1, --draft-vocab >= 0")
