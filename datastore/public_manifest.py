"""What an unauthenticated ``Info`` may show of an index manifest.

The manifest that ``index-build`` writes describes the build machine as well as the index: the input
paths (``stats.inputs``, ``stats.previous_inputs``), files it skipped and sample bad lines with their
file names (``stats.read``), where the tokenizer and the embedder were loaded from. A client needs none
of that to draft (it needs the index id, the tokenizer fingerprint, sizes and counts), so Info shows it
only to a caller with the server's bearer token.
"""
from __future__ import annotations

from typing import Any

# dropped wherever they appear: paths, or sample lines of the input with their file names
PRIVATE_KEYS = frozenset({"inputs", "previous_inputs", "skipped_files", "bad_examples"})
REDACTED = "<redacted>"


def _looks_like_path(s: str) -> bool:
    return "/" in s or "\\" in s or s.startswith("~")


def public_manifest(manifest: Any) -> Any:
    """``manifest`` (a JSON-like tree) without the keys in ``PRIVATE_KEYS``, and with every other string
    that looks like a path ("/" or "\\" in it, or a leading "~") replaced by ``REDACTED``. Numbers,
    booleans, ids and names are kept."""
    if isinstance(manifest, dict):
        return {k: public_manifest(v) for k, v in manifest.items() if k not in PRIVATE_KEYS}
    if isinstance(manifest, (list, tuple)):
        return [public_manifest(v) for v in manifest]
    if isinstance(manifest, str) and _looks_like_path(manifest):
        return REDACTED
    return manifest
