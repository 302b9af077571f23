"""Pipelines over the model: token budgeting and chunk planning (``context``), resumable map-reduce
over chunks (``map_reduce``)."""

from pipelines.context import (
    Chunk,
    ContextBudget,
    ContextOverflow,
    ContextPlanner,
    Piece,
    PieceTooLarge,
    TokenCounter,
    split_text,
)
from pipelines.map_reduce import MapReduceCancelled, MapReduceResult, chunk_session_id, map_reduce

__all__ = [
    "Chunk",
    "ContextBudget",
    "ContextOverflow",
    "ContextPlanner",
    "Piece",
    "PieceTooLarge",
    "TokenCounter",
    "split_text",
    "MapReduceCancelled",
    "MapReduceResult",
    "chunk_session_id",
    "map_reduce",
]
