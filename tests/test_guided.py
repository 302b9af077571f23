"""JSON-schema guided decoding (engine.runtime.guided) with random logits on the tiny tokenizer (CPU)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch

from engine.runtime.guided import (
    GrammarError,
    GuidedDecoding,
    allocate_bitmask,
    apply_bitmask_,
    bitmask_to_bool,
)
from engine.tiny_tokenizer import write_tiny_tokenizer
from engine.tokenizer import KimiTokenizer
from tests.json_schema_helpers import SCHEMAS, validate

PAD = 64  # model vocabulary padding beyond the tokenizer (embedding rows with no token)
BUDGET = 400


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> KimiTokenizer:
    d: Path = tmp_path_factory.mktemp("tiny-tok")
    write_tiny_tokenizer(d)
    return KimiTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def guided(tok: KimiTokenizer) -> GuidedDecoding:
    return GuidedDecoding(tok)


def run_random(guided: GuidedDecoding, tok: KimiTokenizer, schema: dict, seed: int, use_bitmask: bool = False):
    """Sample with random logits restricted to the grammar's mask; return (text, finished, steps)."""
    V = tok.vocab_size + PAD
    g = torch.Generator().manual_seed(seed)
    m = guided.matcher(schema)
    bm = allocate_bitmask(1, V)
    out: list[int] = []
    for step in range(BUDGET):
        logits = torch.randn(V, generator=g) * 3
        if use_bitmask:
            m.fill_bitmask(bm, 0)
            apply_bitmask_(logits, bm[0])
        else:
            mask = m.allowed_mask(V)
            assert mask.shape == (V,) and mask.dtype == torch.bool
            assert not mask[tok.vocab_size:].any(), "ids beyond the tokenizer vocabulary must be disallowed"
            specials = mask[tok.num_base_tokens:tok.vocab_size].nonzero().flatten() + tok.num_base_tokens
            assert set(specials.tolist()) <= {tok.im_end_id}, "only <|im_end|> may be allowed among specials"
            if m.is_finished():
                assert mask.nonzero().flatten().tolist() == [tok.im_end_id]
            logits[~mask] = float("-inf")
        t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        m.accept(t)
        if t == tok.im_end_id:
            assert m.is_finished()
            return tok.decode(out), True, step + 1
        out.append(t)
    return tok.decode(out), False, BUDGET


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_logits_produce_valid_json(guided, tok, name):
    schema = SCHEMAS[name]
    for seed in range(4):
        text, finished, steps = run_random(guided, tok, schema, seed=1000 * seed + len(name), use_bitmask=seed == 3)
        assert finished, f"{name} seed {seed}: no EOS within {BUDGET} tokens; got {text[:200]!r}"
        value = json.loads(text)
        validate(value, schema)
        # at most one space between JSON tokens, never a newline ("[ ]?" whitespace; strings blanked out)
        skeleton = re.sub(r'"(\\.|[^"\\])*"', '""', text)
        assert "\n" not in text and "  " not in skeleton, f"whitespace not compact: {text!r}"


def test_known_outputs_and_finish(guided, tok):
    schema = SCHEMAS["required_fields"]
    m = guided.matcher(schema)
    V = tok.vocab_size
    first = m.allowed_mask(V).nonzero().flatten().tolist()
    assert [tok.decode([t]) for t in first] == ["{"]
    for t in tok.encode('{"name": "bob", "age": 42, "active": true}'):
        assert m.allowed_mask(V)[t]
        m.accept(t)
    assert m.is_finished() and m.is_accepting()
    assert m.allowed_mask(V).nonzero().flatten().tolist() == [tok.im_end_id]
    with pytest.raises(GrammarError):
        m.accept(tok.encode(" ")[0])  # nothing but EOS after a complete document
    m.accept(tok.im_end_id)
    assert m.is_finished() and not m.is_error()


def test_compact_json_also_accepted(guided, tok):
    m = guided.matcher(SCHEMAS["array_min_max"])
    m.accept_many(tok.encode("[1,-2,3]"))
    assert m.is_finished()


def test_top_level_integer_eos_only_when_complete(guided, tok):
    m = guided.matcher({"type": "integer", "minimum": 0, "maximum": 999})
    with pytest.raises(GrammarError):
        m.accept(tok.im_end_id)  # empty output is not an integer
    m.accept_many(tok.encode("12"))
    assert m.is_accepting() and not m.is_finished()
    assert m.allowed_mask(tok.vocab_size)[tok.im_end_id]
    m.accept(tok.im_end_id)
    assert m.is_finished()


def test_disallowed_token_raises_and_state_survives(guided, tok):
    m = guided.matcher(SCHEMAS["required_fields"])
    bad = tok.encode("x")[0]
    assert not m.allowed_mask(tok.vocab_size)[bad]
    with pytest.raises(GrammarError, match="not allowed"):
        m.accept(bad)
    with pytest.raises(GrammarError):
        m.accept(tok.vocab_size + 3)  # outside the tokenizer vocabulary
    with pytest.raises(GrammarError):
        m.accept(tok.eos_id)  # [EOS] is not the grammar's EOS
    assert not m.is_error()
    m.accept(tok.encode("{")[0])  # the matcher is still usable
    assert m.num_accepted == 1


def test_masks_beyond_vocab_false(guided, tok):
    V = tok.vocab_size + 100
    m = guided.matcher({"type": "string", "maxLength": 3})
    mask = m.allowed_mask(V)
    assert mask.shape == (V,) and not mask[tok.vocab_size:].any() and mask.any()
    with pytest.raises(ValueError):
        m.allowed_mask(tok.vocab_size - 1)
    bm = allocate_bitmask(2, V)
    m.fill_bitmask(bm, 1)
    assert torch.equal(bitmask_to_bool(bm[1], V), mask)
    assert bitmask_to_bool(bm[0], V)[: 32 * bm.shape[1]].all()  # untouched row: unconstrained
    logits = torch.zeros(2, V)
    apply_bitmask_(logits, bm)
    assert torch.equal(torch.isfinite(logits[1]), mask)


def test_fill_bitmasks_batched(guided, tok):
    V = tok.vocab_size + PAD
    ms = [guided.matcher(SCHEMAS[n]) for n in ("required_fields", "array_min_max", "top_level_enum")]
    ms[1].accept_many(tok.encode("[1,"))
    for width in (V, tok.vocab_size):
        bm = allocate_bitmask(4, width)
        guided.fill_bitmasks([(ms[0], 3), (ms[1], 0), (ms[2], 2)], bm)
        full = bitmask_to_bool(bm, V)
        for m, row in ((ms[0], 3), (ms[1], 0), (ms[2], 2)):
            assert torch.equal(full[row], m.allowed_mask(V))
        assert full[1, : tok.vocab_size].all()


@pytest.mark.parametrize(
    "schema, needle",
    [
        ({"type": "foo"}, "foo"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"enum": []}, "nsatisfiable"),
        ([1, 2], "list"),
        ({"type": "string", "default": {1, 2}}, "serializable"),
    ],
)
def test_invalid_schema_raises(guided, schema, needle):
    with pytest.raises(GrammarError, match=needle) as ei:
        guided.compile(schema)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(GrammarError):
        guided.matcher(schema)


def test_compile_cache_lru_and_threads(tok):
    gd = GuidedDecoding(tok, cache_size=2)
    a, b, c = ({"type": "string", "maxLength": n} for n in (1, 2, 3))
    ca = gd.compile(a)
    assert gd.compile(json.loads(json.dumps(a))) is ca  # same canonical JSON -> cached
    gd.compile(b)
    gd.compile(a)  # refresh a
    gd.compile(c)  # evicts b
    assert gd.cache_info()["size"] == 2 and gd.compile(a) is ca
    results: list = []

    def worker(i: int) -> None:
        try:
            text, finished, _ = run_random(gd, tok, SCHEMAS["enums"], seed=i)
            validate(json.loads(text), SCHEMAS["enums"])
            results.append(finished)
        except Exception as e:  # noqa: BLE001
            results.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def test_rollback(guided, tok):
    m = guided.matcher(SCHEMAS["array_min_max"])
    ids = tok.encode("[1,2")
    m.accept_many(ids)
    before = m.allowed_mask(tok.vocab_size)
    m.accept(tok.encode(",")[0])
    m.rollback(1)
    assert torch.equal(m.allowed_mask(tok.vocab_size), before)
    m.rollback(len(ids))
    assert m.num_accepted == 0
    with pytest.raises(ValueError):
        m.rollback(1)
