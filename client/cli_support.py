"""What the command-line tools share: quiet logging, clean one-line errors, JSON-lines input."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator


def run_main(prog: str, run: Callable[[object], int], args) -> int:
    """Run ``run(args)``; bad input becomes one ``prog: error: ...`` line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not getattr(args, "verbose", False):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    from ..datastore.model_files import ModelNotFoundError

    try:
        return run(args)
    except (ValueError, ModelNotFoundError, FileNotFoundError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def validate_common(args) -> None:
    """Checks of the options spec-generate and spec-bench share; ValueError names the flag."""
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.max_budget is not None and args.max_budget < 0:
        raise ValueError("--max-budget must be >= 0")
    if args.datastore and args.index:
        raise ValueError("give --datastore or --index, not both")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError naming ``file:line`` on bad JSON."""
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        yield i, obj
