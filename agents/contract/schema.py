"""What to extract (CUAD categories or a user's schema fields) and how the document is cut for it.

When the instructions for every target are too long for one call's budget (a small context window), the
targets are split into groups, each with its own pass over the document; with Kimi-VL's 128K window all 41 CUAD
categories fit one pass.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from agents.contract.inputs import ContractInput
from pipelines.context import Chunk, ContextBudget, ContextPlanner, Piece
from pipelines.document.cuad import Category, Field, extraction_schema, resolve_categories
from pipelines.document.cuad import extraction_schema_for_user, load_categories, prompt_for, user_schema_fields
from pipelines.document.types import Document

PROMPT_SHARE = 0.35  # the instructions may take at most this share of a call's prompt budget


def build_targets(input: ContractInput) -> list[Category | Field]:
    if input.json_schema is not None:
        return list(user_schema_fields(input.json_schema))
    return resolve_categories(input.categories) if input.categories else load_categories()


class Group(BaseModel):
    """One pass over the document: these targets, this system prompt, these chunks."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    targets: list[Any]
    prompt: str
    chunks: list[Chunk]

    @property
    def keys(self) -> set[str]:
        return {t.key for t in self.targets}

    def schema_for(self, input: ContractInput, pages: tuple[int, int]) -> dict[str, Any]:
        """The chunk's output schema; cited pages are bounded to the chunk's own pages."""
        if input.json_schema is not None:
            keys = self.keys
            sub = {**input.json_schema, "properties": {k: v for k, v in input.json_schema["properties"].items()
                                                        if k in keys}}
            return extraction_schema_for_user(sub, max_items=input.max_items_per_chunk,
                                              max_quote_chars=input.max_quote_chars, pages=pages)
        return extraction_schema(self.targets, max_items=input.max_items_per_chunk,
                                 max_value_chars=input.max_value_chars, max_quote_chars=input.max_quote_chars,
                                 pages=pages)


def document_pieces(document: Document) -> list[Piece]:
    """Blocks in reading order, each labelled with its page (so a chunk that starts mid-page still tells the
    model where it is); scanned pages as their rendered image. Chunks prefer to end before a section heading,
    then before a new page."""
    pieces: list[Piece] = []
    for page in document.pages:
        label = f"[page {page.number}]"
        if page.scanned:
            if page.image_png:
                pieces.append(Piece(id=f"p{page.number}", kind="image", image=page.image_png, label=label,
                                    boundary=2, meta={"page": page.number}))
            continue
        for i, block in enumerate(page.blocks):
            if not block.text.strip():
                continue
            boundary = 3 if block.kind == "heading" else (2 if i == 0 else 1)
            pieces.append(Piece(id=f"p{page.number}b{i}", text=block.text, label=label, boundary=boundary,
                                meta={"page": page.number}))
    return pieces


def split_into_groups(targets: list[Any], count_tokens: Any, limit: int) -> list[list[Any]]:
    groups: list[list[Any]] = []
    current: list[Any] = []
    for target in targets:
        if current and count_tokens(prompt_for([*current, target])) > limit:
            groups.append(current)
            current = []
        current.append(target)
    if current:
        groups.append(current)
    return groups


def plan_groups(document: Document, targets: list[Any], input: ContractInput, resources: Any) -> list[Group]:
    """Target groups and each group's chunk plan (CPU work: run it in a thread)."""
    counter = resources.counter
    window = resources.context_window
    budget_room = window - input.max_output_tokens
    if budget_room <= 256:
        raise ValueError(f"max_output_tokens={input.max_output_tokens} leaves no room in the model's "
                         f"{window}-token window")
    pieces = document_pieces(document)
    groups = []
    for targets_of_group in split_into_groups(targets, counter.count_text, int(budget_room * PROMPT_SHARE)):
        prompt = prompt_for(targets_of_group)
        prefix = [{"role": "system", "content": prompt}]
        context = window
        if input.chunk_tokens is not None:
            fixed = counter.count_messages([*prefix, {"role": "user", "content": ""}])
            context = min(window, fixed + input.chunk_tokens + input.max_output_tokens)
        planner = ContextPlanner(counter, ContextBudget(context_window=context,
                                                        output_reserve=input.max_output_tokens))
        chunks = planner.plan(pieces, prefix_messages=prefix, overlap_tokens=input.overlap_tokens) if pieces else []
        groups.append(Group(targets=targets_of_group, prompt=prompt, chunks=chunks))
    return groups
