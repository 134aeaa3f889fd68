"""Draft sources. Each implements client.types.Drafter: propose() never raises and returns an empty tree
when it has nothing."""
from .context import ContextDrafter
from .recycling import RecyclingDrafter

__all__ = ["ContextDrafter", "RecyclingDrafter"]
