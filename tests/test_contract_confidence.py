"""Confidence per extracted value: value spans in the reply, token log-probabilities of the value, chunk agreement,
verification, and the ``min_confidence`` filter."""

from __future__ import annotations

import json
import math

import pytest

from agents.contract import confidence
from agents.contract.extract import merge_results
from agents.contract.inputs import ContractInput
from engine.runtime.request import TokenLogprob
from pipelines.document.citations import Citation
from pipelines.document.cuad import category_by_key
from pipelines.document.types import Document, Page


def tokens_of(text: str, logprob_of: dict[str, float], size: int = 3) -> list[TokenLogprob]:
    """Split ``text`` into tokens of ``size`` characters; a token inside a listed value gets that value's logprob."""
    out = []
    for i in range(0, len(text), size):
        piece = text[i:i + size]
        lp = -0.01
        for value, v_lp in logprob_of.items():
            start = text.find(json.dumps(value))
            if start <= i < start + len(json.dumps(value)):
                lp = v_lp
        out.append(TokenLogprob(token_id=i, logprob=lp, token_bytes=piece.encode()))
    return out


def test_value_spans_skip_nested_values_and_escaped_keys() -> None:
    reply = json.dumps({"items": [
        {"category": "a", "value": "Delaware", "quote": 'the "value": x', "page": 1},
        {"category": "b", "value": {"value": 3, "unit": "days"}, "quote": "q", "page": 2}]})
    spans = confidence.value_spans(reply)
    assert [json.loads(reply[a:b]) for a, b in spans] == ["Delaware", {"value": 3, "unit": "days"}]


def test_span_logprob_averages_the_value_tokens_only() -> None:
    reply = json.dumps({"items": [{"category": "governing_law", "value": "Delaware", "quote": "laws of Delaware",
                                   "page": 1}]})
    lps = tokens_of(reply, {"Delaware": -0.7}, size=1)
    [lp] = confidence.item_logprobs(reply, lps, 1)
    assert lp == pytest.approx(-0.7)
    assert confidence.item_logprobs(reply, None, 1) == [None]
    stop = TokenLogprob(token_id=99, logprob=-0.1, token_bytes=b"<|im_end|>")  # the stop token is not in the text
    assert confidence.item_logprobs(reply, [*lps, stop], 1) == [pytest.approx(-0.7)]
    assert confidence.item_logprobs(reply, lps[:-1], 1) == [None]  # the tokens do not spell the reply


def test_score_combines_the_three_signals() -> None:
    assert confidence.score([math.log(0.8)], 1.0, 1.0) == 0.8
    assert confidence.score([math.log(0.8)], 0.5, 1.0) == 0.4
    assert confidence.score([math.log(0.8)], 1.0, confidence.UNVERIFIED_FACTOR) == 0.24
    assert confidence.score([None], 1.0, 0.95) == 0.95  # no logprobs: that factor is left out
    assert 0.0 <= confidence.score([-50.0], 1.0, 1.0) <= 1.0


def _item(chunk: int, value: str, lp: float | None, page: int, verified: bool) -> dict:
    c = Citation(page=page, char_start=0, char_end=5, quote="State", verified=True) if verified else \
        Citation.unverified(page, "made up")
    return {"key": "governing_law", "value": value, "chunk": chunk, "logprob": lp,
            "citation": c.model_dump(mode="json")}


def test_merge_sets_confidence_and_min_confidence_drops_low_values() -> None:
    doc = Document(sha256="x", page_count=3, pages=[Page(number=n, width=1, height=1, text="State") for n in (1, 2, 3)])
    targets = [category_by_key("governing_law")]
    chunks = [  # chunks 0 and 1 overlap on page 2; both saw Delaware there, only chunk 1 said Ohio
        {"chunk": 0, "pages": [1, 2], "keys": ["governing_law"], "items": [_item(0, "Delaware", math.log(0.9), 2, True)]},
        {"chunk": 1, "pages": [2, 3], "keys": ["governing_law"], "items": [
            _item(1, "Delaware", math.log(0.9), 2, True), _item(1, "Ohio", math.log(0.9), 2, True),
            _item(1, "Mars", math.log(0.99), 3, False)]},
    ]
    data = {"file": {"name": "a.pdf", "data": "JVBERi0="}}
    out = merge_results(doc, targets, chunks, ContractInput.model_validate(data), chunks=2)
    values = {v.value: v.confidence for v in out.result.fields[0].values}
    assert values == {"Delaware": 0.9, "Ohio": 0.45, "Mars": round(0.99 * 0.3, 4)}
    assert out.result.fields[0].values[0].value == "Delaware"  # best supported first
    kept = merge_results(doc, targets, chunks, ContractInput.model_validate({**data, "min_confidence": 0.5}), chunks=2)
    assert [v.value for v in kept.result.fields[0].values] == ["Delaware"]
    assert kept.result.low_confidence_dropped == 2


def test_value_logprobs_from_the_real_engine(tiny_checkpoint) -> None:
    """The engine's logprobs (tiny checkpoint, guided JSON) line up with the reply text, stop token included."""
    import asyncio

    import torch

    from connectors.model_client import BackendModelClient
    from engine.runtime.engine import AsyncEngine
    from engine.runtime.request import GenerateRequest
    from connectors.backend import LocalBackend

    item = {"type": "object", "properties": {"category": {"enum": ["governing_law"]},
                                             "value": {"type": "string", "maxLength": 8}},
            "required": ["category", "value"], "additionalProperties": False}
    schema = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 1,
                                                         "items": item}},
              "required": ["items"], "additionalProperties": False}
    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    client = BackendModelClient(LocalBackend(engine))

    async def main():
        return await client.generate(GenerateRequest(messages=[{"role": "user", "content": "Governed by Ohio law."}],
                                                     json_schema=schema, max_tokens=80, temperature=0.0, logprobs=0))

    reply = asyncio.run(main())
    assert reply.logprobs and len(reply.logprobs) == len(reply.token_ids)
    [lp] = confidence.item_logprobs(reply.text, reply.logprobs, len(json.loads(reply.text)["items"]))
    assert lp is not None and lp <= 0.0


def test_min_confidence_and_ocr_bounds_are_checked_at_submission() -> None:
    from pydantic import ValidationError

    data = {"file": {"name": "a.pdf", "data": "JVBERi0="}}
    for bad in ({"min_confidence": 1.5}, {"min_confidence": -0.1}, {"max_ocr_pages": -1}, {"ocr_time_s": 0}):
        with pytest.raises(ValidationError):
            ContractInput.model_validate({**data, **bad})
    ok = ContractInput.model_validate({**data, "min_confidence": 0.25, "ocr": False})
    assert ok.min_confidence == 0.25 and ok.ocr is False
