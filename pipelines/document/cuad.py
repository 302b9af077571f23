"""What the contract agent looks for: the 41 CUAD clause categories, or the fields of a user's JSON schema,
and the per-chunk JSON schema / instructions the model is constrained to.

The categories, descriptions and answer formats come from CUAD, the Contract Understanding Atticus Dataset
(The Atticus Project, https://www.atticusprojectai.org/cuad, ``category_descriptions.csv``), licensed under
CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/).  ``cuad_categories.csv`` next to this module is an
unmodified copy; :func:`load_categories` only strips the "Category: " style prefixes and collapses whitespace.

Every answer the model gives is a flat item ``{"category", "value", "quote", "page"}``: one shape for CUAD and
user schemas, so citation checking and merging across chunks do not depend on the schema.  Strings, arrays and
item counts are length-bounded because guided decoding of an unbounded schema can run on forever when a model
misbehaves.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

CSV_PATH = Path(__file__).with_name("cuad_categories.csv")

# Bounds of the per-chunk extraction schema (see module docstring for why everything is bounded).
MAX_ITEMS = 40
MAX_VALUE_CHARS = 300
MAX_QUOTE_CHARS = 600
# Defaults applied to unbounded parts of a user's schema.
USER_MAX_STRING_CHARS = 500
USER_MAX_ARRAY_ITEMS = 20

_PREFIXES = ("Category (incl. context and answer)", "Category", "Description", "Answer Format", "Group")


class Category(BaseModel):
    """One CUAD clause category."""

    name: str  # "Governing Law"
    description: str
    answer_format: str  # "Yes/No", "Date (mm/dd/yyyy)", ...
    group: str | None  # CUAD's grouping of related categories ("1".."6"), None for "-"
    key: str  # snake_case identifier used in schemas: "governing_law"


class Field(BaseModel):
    """One top-level property of a user's JSON schema, i.e. one thing to extract."""

    key: str
    name: str
    description: str
    answer_format: str  # short human description of the value type, for the prompt
    value_schema: dict[str, Any]  # JSON schema of the value (bounded, see extraction_schema_for_user)


def to_key(name: str) -> str:
    """``"Rofr/Rofo/Rofn"`` -> ``"rofr_rofo_rofn"``; also accepts keys (idempotent)."""
    key = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")
    return key or "_"


def _cell(value: str) -> str:
    value = " ".join((value or "").split())
    for prefix in _PREFIXES:
        if value.startswith(prefix + ":"):
            return value[len(prefix) + 1 :].strip()
    return value


@lru_cache(maxsize=1)
def _categories() -> tuple[Category, ...]:
    with CSV_PATH.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    out: list[Category] = []
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        name, description, answer_format, group = (_cell(c) for c in (row + [""] * 4)[:4])
        out.append(
            Category(
                name=name,
                description=description,
                # The CSV leaves this one blank; every other license-group category is Yes/No.
                answer_format=answer_format or "Yes/No",
                group=None if group in ("", "-") else group,
                key=to_key(name),
            )
        )
    return tuple(out)


def load_categories() -> list[Category]:
    """All 41 CUAD categories, in CUAD's order."""
    return [c.model_copy() for c in _categories()]


def category_by_key(key_or_name: str) -> Category:
    """Look a category up by key (``"governing_law"``) or CUAD name (``"Governing Law"``)."""
    wanted = to_key(key_or_name)
    for c in _categories():
        if c.key == wanted:
            return c.model_copy()
    raise KeyError(f"unknown CUAD category {key_or_name!r}")


def resolve_categories(names: list[str]) -> list[Category]:
    """CUAD categories by key or name (case-insensitive); ``ValueError`` naming the unknown ones."""
    found, unknown = [], []
    for name in names:
        try:
            found.append(category_by_key(name))
        except (KeyError, ValueError):
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown CUAD categories: {', '.join(map(repr, unknown))} (see GET /v1/task-types)")
    return list({c.key: c for c in found}.values())


# -- schemas ---------------------------------------------------------------------------------------------------


def _item_properties(category: dict[str, Any], value: dict[str, Any], max_quote_chars: int,
                     pages: tuple[int, int] | None) -> dict[str, Any]:
    page: dict[str, Any] = {"type": "integer", "minimum": 1}
    if pages is not None:
        page = {"type": "integer", "minimum": max(1, pages[0]), "maximum": max(1, pages[0], pages[1])}
    return {
        "type": "object",
        "properties": {
            "category": category,
            "value": value,
            "quote": {"type": "string", "maxLength": max_quote_chars},
            "page": page,
        },
        "required": ["category", "value", "quote", "page"],
        "additionalProperties": False,
    }


def _wrap(item: dict[str, Any], max_items: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": max_items, "items": item}},
        "required": ["items"],
        "additionalProperties": False,
    }


def extraction_schema(
    categories: Sequence[Category] | None = None,
    *,
    max_items: int = MAX_ITEMS,
    max_value_chars: int = MAX_VALUE_CHARS,
    max_quote_chars: int = MAX_QUOTE_CHARS,
    pages: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The JSON schema one chunk's answer is constrained to.  ``pages=(first, last)`` bounds the cited page to
    the chunk's pages (without it only ``minimum: 1``)."""
    cats = list(categories) if categories is not None else load_categories()
    if not cats:
        raise ValueError("extraction_schema needs at least one category")
    item = _item_properties(
        {"enum": [c.key for c in cats]}, {"type": "string", "maxLength": max_value_chars}, max_quote_chars, pages
    )
    return _wrap(item, max_items)


def _parse_schema(schema: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"schema must be a JSON object, got {type(schema).__name__}")
    kind = schema.get("type", "object")
    if kind != "object":
        raise ValueError(f'schema must describe an object ("type": "object"), got type {kind!r}')
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise ValueError('schema must have non-empty "properties": one per field to extract')
    for key, sub in props.items():
        if not isinstance(sub, dict):
            raise ValueError(f"property {key!r} must be a JSON schema object, got {type(sub).__name__}")
        if not key.strip():
            raise ValueError("property names must not be empty")
    return schema


def _bounded(schema: Any, max_string: int, max_array: int) -> Any:
    """Copy of a sub-schema with length bounds added where it has none (user bounds are kept)."""
    if isinstance(schema, list):
        return [_bounded(s, max_string, max_array) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "$defs", "definitions", "patternProperties"):
            out[k] = {name: _bounded(s, max_string, max_array) for name, s in v.items()} if isinstance(v, dict) else v
        elif k in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "additionalProperties"):
            out[k] = _bounded(v, max_string, max_array)
        else:
            out[k] = copy.deepcopy(v)
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    free = not any(k in out for k in ("enum", "const", "pattern", "format"))
    if "string" in types and free and "maxLength" not in out:
        out["maxLength"] = max_string
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max_array
    if "object" in types and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _answer_format(s: dict[str, Any]) -> str:
    if "enum" in s:
        return "one of: " + ", ".join(json.dumps(v, ensure_ascii=False) for v in s["enum"])
    if "const" in s:
        return "exactly " + json.dumps(s["const"], ensure_ascii=False)
    kind = s.get("type")
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind)
    if kind == "array":
        items = s.get("items")
        return "list of " + (_answer_format(items) if isinstance(items, dict) else "values")
    if kind == "object":
        props = s.get("properties")
        return "object with " + ", ".join(props) if isinstance(props, dict) and props else "object"
    if kind == "string" and "format" in s:
        return f"string ({s['format']})"
    if "$ref" in s:
        return "object (" + str(s["$ref"]).rsplit("/", 1)[-1] + ")"
    return str(kind or "any JSON value")


def user_schema_fields(
    schema: dict[str, Any] | str,
    *,
    max_string_chars: int = USER_MAX_STRING_CHARS,
    max_array_items: int = USER_MAX_ARRAY_ITEMS,
) -> list[Field]:
    """The fields of a user's object schema: one per top-level property.  Raises ``ValueError`` for schemas
    that are not objects with properties."""
    root = _parse_schema(schema)
    fields = []
    for key, sub in root["properties"].items():
        name = str(sub.get("title") or key.replace("_", " ").strip().capitalize())
        description = " ".join(str(sub.get("description") or sub.get("title") or name).split())
        fields.append(
            Field(
                key=key,
                name=name,
                description=description,
                answer_format=_answer_format(sub),
                value_schema=_bounded(sub, max_string_chars, max_array_items),
            )
        )
    return fields


def extraction_schema_for_user(
    schema: dict[str, Any] | str,
    *,
    max_items: int = MAX_ITEMS,
    max_quote_chars: int = MAX_QUOTE_CHARS,
    pages: tuple[int, int] | None = None,
    max_string_chars: int = USER_MAX_STRING_CHARS,
    max_array_items: int = USER_MAX_ARRAY_ITEMS,
) -> dict[str, Any]:
    """Per-chunk schema for a user's schema: the same flat items as :func:`extraction_schema`, with one
    ``anyOf`` branch per field so each value is constrained to its field's own type (``category`` comes
    first and is a ``const``, so the branch is fixed once the field is chosen)."""
    root = _parse_schema(schema)
    fields = user_schema_fields(root, max_string_chars=max_string_chars, max_array_items=max_array_items)
    branches = [_item_properties({"const": f.key}, f.value_schema, max_quote_chars, pages) for f in fields]
    item = branches[0] if len(branches) == 1 else {"anyOf": branches}
    out = _wrap(item, max_items)
    for defs in ("$defs", "definitions"):  # $refs inside properties point at the root's definitions
        if isinstance(root.get(defs), dict):
            out[defs] = {k: _bounded(v, max_string_chars, max_array_items) for k, v in root[defs].items()}
    return out


# -- prompt ----------------------------------------------------------------------------------------------------


def prompt_for(items: Sequence[Category] | Sequence[Field]) -> str:
    """System prompt for extraction: the rules, then one line per category/field."""
    lines = [
        "You extract information from a contract. Read the text and, for every item below that the text "
        "addresses, output an entry with:",
        '- "category": the item\'s key;',
        '- "value": the answer, in the item\'s answer format (for Yes/No items: "Yes" when the clause exists);',
        '- "quote": the shortest passage copied verbatim from the text that supports the value (no paraphrase, '
        "no ellipsis);",
        '- "page": the number of the page the quote is on.',
        "Only report what the text states. Several entries for the same item are allowed when the text has "
        'several relevant passages. If nothing applies, output {"items": []}.',
        "",
        "Items (key: definition [answer format]):",
    ]
    for it in items:
        if isinstance(it, Category):
            lines.append(f"- {it.key}: {it.name}. {it.description} [{it.answer_format}]")
        else:
            definition = it.name if it.description == it.name else f"{it.name}. {it.description}"
            lines.append(f"- {it.key}: {definition} [{it.answer_format}]")
    return "\n".join(lines)
