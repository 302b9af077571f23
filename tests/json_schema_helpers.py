"""JSON-schema test helpers: a small validator for the keywords the schemas below use (jsonschema is not a
dependency) and a set of schemas that exercise guided decoding (tests/test_guided.py, tests/test_runtime_outputs.py)."""

from __future__ import annotations

import math
import re


def _is_type(v, t: str) -> bool:
    return {
        "object": lambda: isinstance(v, dict),
        "array": lambda: isinstance(v, list),
        "string": lambda: isinstance(v, str),
        "integer": lambda: (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer()),
        "number": lambda: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "boolean": lambda: isinstance(v, bool),
        "null": lambda: v is None,
    }[t]()


def _json_eq(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def validate(v, s: dict, root: dict | None = None, path: str = "$") -> None:
    """Raise AssertionError naming the first violation of schema ``s`` by value ``v``."""
    root = s if root is None else root
    known = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
             "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
             "anyOf", "$ref", "$defs", "pattern", "title", "description"}
    assert set(s) <= known, f"validator does not know {set(s) - known}"
    if "$ref" in s:
        ref = s["$ref"]
        assert ref.startswith("#/$defs/")
        validate(v, root["$defs"][ref.split("/")[-1]], root, path)
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        assert any(_is_type(v, t) for t in types), f"{path}: {v!r} is not of type {types}"
    if "enum" in s:
        assert any(_json_eq(v, e) for e in s["enum"]), f"{path}: {v!r} not in enum {s['enum']}"
    if "const" in s:
        assert _json_eq(v, s["const"]), f"{path}: {v!r} != const {s['const']!r}"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in s:
            assert v >= s["minimum"], f"{path}: {v} < minimum {s['minimum']}"
        if "maximum" in s:
            assert v <= s["maximum"], f"{path}: {v} > maximum {s['maximum']}"
        if "exclusiveMinimum" in s:
            assert v > s["exclusiveMinimum"], f"{path}: {v} <= exclusiveMinimum {s['exclusiveMinimum']}"
        if "exclusiveMaximum" in s:
            assert v < s["exclusiveMaximum"], f"{path}: {v} >= exclusiveMaximum {s['exclusiveMaximum']}"
    if isinstance(v, str):
        if "minLength" in s:
            assert len(v) >= s["minLength"], f"{path}: {v!r} shorter than {s['minLength']}"
        if "maxLength" in s:
            assert len(v) <= s["maxLength"], f"{path}: {v!r} longer than {s['maxLength']}"
        if "pattern" in s:
            assert re.search(s["pattern"], v), f"{path}: {v!r} does not match {s['pattern']!r}"
    if isinstance(v, list):
        if "minItems" in s:
            assert len(v) >= s["minItems"], f"{path}: {len(v)} items < minItems {s['minItems']}"
        if "maxItems" in s:
            assert len(v) <= s["maxItems"], f"{path}: {len(v)} items > maxItems {s['maxItems']}"
        if "items" in s:
            for i, x in enumerate(v):
                validate(x, s["items"], root, f"{path}[{i}]")
    if isinstance(v, dict):
        props = s.get("properties", {})
        for r in s.get("required", []):
            assert r in v, f"{path}: missing required property {r!r}"
        for k, x in v.items():
            if k in props:
                validate(x, props[k], root, f"{path}.{k}")
            elif s.get("additionalProperties") is False:
                raise AssertionError(f"{path}: additional property {k!r} not allowed")
            elif isinstance(s.get("additionalProperties"), dict):
                validate(x, s["additionalProperties"], root, f"{path}.{k}")
    if "anyOf" in s:
        errs = []
        for sub in s["anyOf"]:
            try:
                validate(v, sub, root, path)
                break
            except AssertionError as e:
                errs.append(str(e))
        else:
            raise AssertionError(f"{path}: {v!r} matches no anyOf branch ({errs})")


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SHORT = {"type": "string", "maxLength": 6}

SCHEMAS: dict[str, dict] = {
    "required_fields": _obj({"name": {"type": "string", "maxLength": 8},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "active": {"type": "boolean"}}),
    "optional_fields": _obj({"a": {"type": "string", "maxLength": 5}, "b": {"type": "integer", "minimum": -9,
                             "maximum": 9}, "c": {"type": "null"}}, required=["a"]),
    "nested_objects": _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                          "profile": _obj({"nick": SHORT, "vip": {"type": "boolean"}})}),
                            "meta": _obj({"ok": {"type": "boolean"}})}),
    "array_min_max": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                      "minItems": 2, "maxItems": 4},
    "enums": _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, "xl", None, True]}}),
    "number_bounds": _obj({"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                           "y": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                           "n": {"type": "integer", "minimum": 10, "maximum": 20}}),
    "bool_null": _obj({"flag": {"type": "boolean"}, "nothing": {"type": "null"},
                       "maybe": {"type": ["boolean", "null"]}}),
    "string_lengths": _obj({"s": {"type": "string", "minLength": 2, "maxLength": 6},
                            "t": {"type": "string", "maxLength": 0}}),
    "any_of": _obj({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                    {"type": "string", "maxLength": 4},
                                    _obj({"k": {"type": "boolean"}})]}}),
    "nested_arrays_of_objects": _obj({"items": {"type": "array", "maxItems": 3, "items": _obj({
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "name": {"type": "string", "maxLength": 5},
        "grid": {"type": "array", "maxItems": 2,
                 "items": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                     "maximum": 9}}}}, required=["id"])}}),
    "additional_props_false_all_optional": _obj({"p": {"type": "boolean"}, "q": SHORT}, required=[]),
    "refs_and_const": {"$defs": {"pt": _obj({"x": {"type": "integer", "minimum": 0, "maximum": 50},
                                             "y": {"type": "integer", "minimum": 0, "maximum": 50}})},
                       **_obj({"kind": {"const": "point"}, "at": {"$ref": "#/$defs/pt"},
                               "path": {"type": "array", "maxItems": 3, "items": {"$ref": "#/$defs/pt"}}})},
    "top_level_enum": {"enum": ["yes", "no", "maybe"]},
    "top_level_bounded_integer": {"type": "integer", "minimum": -20, "maximum": 300},
    "pattern": _obj({"code": {"type": "string", "pattern": "^[a-z]{1,4}[0-9]?$"}}),
}
