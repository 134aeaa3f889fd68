"""Draft sources. Each subclasses client.types.Drafter: propose() returns an empty tree when it has nothing
(and what it raises, the decoder counts and logs)."""
from .context import ContextDrafter
from .recycling import RecyclingDrafter

__all__ = ["ContextDrafter", "RecyclingDrafter"]
