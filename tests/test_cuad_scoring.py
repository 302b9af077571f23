"""CUAD categories and extraction schemas (pipelines.document.cuad) and the CUAD-style scorer
(pipelines.document.scoring)."""

from __future__ import annotations

import json
import re

import pytest

from pipelines.document.cuad import (
    Category,
    category_by_key,
    extraction_schema,
    extraction_schema_for_user,
    load_categories,
    prompt_for,
    user_schema_fields,
)
from pipelines.document.scoring import jaccard, load_cuad_json, score, tokens
from pipelines.document.types import GoldClause, PredictedClause

GOV = "This Agreement shall be governed by the laws of the State of Delaware."
TERM = "Either party may terminate this Agreement upon sixty (60) days written notice."
AUDIT = "Licensor may audit the books and records of Licensee once per calendar year."


def G(category: str, text: str, page: int | None = 1) -> GoldClause:
    return GoldClause(category=category, text=text, page=page)


def P(category: str, text: str, page: int | None = 1) -> PredictedClause:
    return PredictedClause(category=category, text=text, page=page)


# -- categories --------------------------------------------------------------------------------------------------


def test_all_41_categories_load_with_unique_keys():
    cats = load_categories()
    assert len(cats) == 41
    assert len({c.key for c in cats}) == 41 and len({c.name for c in cats}) == 41
    for c in cats:
        assert c.key.isidentifier() and c.key == c.key.lower()
        assert c.name and c.description and c.answer_format
        assert not any(x.startswith(("Category:", "Description:", "Answer Format:", "Group:"))
                       for x in (c.name, c.description, c.answer_format, c.group or ""))
    by_key = {c.key: c for c in cats}
    gov = by_key["governing_law"]
    assert gov.name == "Governing Law" and gov.answer_format == "Name of a US State / non-US Province, Country"
    assert gov.group is None and by_key["expiration_date"].group == "1"
    assert {"rofr_rofo_rofn", "unlimited_all_you_can_eat_license", "affiliate_license_licensee",
            "no_solicit_of_customers", "document_name", "third_party_beneficiary"} <= set(by_key)
    assert "  " not in by_key["exclusivity"].description


def test_category_by_key_accepts_key_or_name():
    assert category_by_key("rofr_rofo_rofn").name == "Rofr/Rofo/Rofn"
    assert category_by_key("Rofr/Rofo/Rofn").key == "rofr_rofo_rofn"
    assert category_by_key("Governing Law").key == "governing_law"
    with pytest.raises(KeyError):
        category_by_key("favourite colour")


def test_prompt_one_line_per_category():
    cats = load_categories()
    text = prompt_for(cats)
    lines = [line for line in text.splitlines() if re.match(r"- [a-z_]+: ", line)]
    assert len(lines) == 41
    assert "- governing_law: Governing Law. Which state/country's law governs the interpretation of the " \
           "contract? [Name of a US State / non-US Province, Country]" in text
    assert len(text) < 12_000  # a compact system prompt
    fields = user_schema_fields({"type": "object", "properties": {"fee": {"type": "number", "description": "Fee"}}})
    assert "- fee: Fee [number]" in prompt_for(fields)


# -- extraction schemas ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def check():
    """Validate a JSON document against a schema with llguidance (what the engine uses to constrain decoding),
    over a byte-level tokenizer: the schema must compile, and the document's bytes must be accepted."""
    llguidance = pytest.importorskip("llguidance")
    tiktoken = pytest.importorskip("tiktoken")
    from llguidance.tiktoken import lltokenizer_from_encoding

    enc = tiktoken.Encoding("bytes", pat_str=r".", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<eos>": 256})
    tok = lltokenizer_from_encoding(enc, eos_token=256)

    def run(schema: dict, doc) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = llguidance.LLMatcher.validate_grammar(grammar, tok)
        assert not error, error
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        data = list(json.dumps(doc).encode())
        return matcher.validate_tokens(data) == len(data) and matcher.consume_tokens(data) and matcher.is_accepting()

    return run


def test_extraction_schema_shape_and_validation(check):
    cats = load_categories()
    schema = extraction_schema(cats, max_items=5)
    items = schema["properties"]["items"]
    assert schema["required"] == ["items"] and schema["additionalProperties"] is False
    assert items["maxItems"] == 5
    item = items["items"]
    assert item["properties"]["category"]["enum"] == [c.key for c in cats]
    assert item["required"] == ["category", "value", "quote", "page"] and item["additionalProperties"] is False
    assert item["properties"]["page"] == {"type": "integer", "minimum": 1}
    good = {"category": "governing_law", "value": "Delaware", "quote": "laws of the State of Delaware", "page": 3}
    assert check(schema, {"items": [good]})
    assert check(schema, {"items": []})
    assert not check(schema, {"items": [{**good, "category": "favourite_colour"}]})
    assert not check(schema, {"items": [{**good, "page": 0}]})
    assert not check(schema, {"items": [{**good, "extra": 1}]})
    assert not check(schema, {"items": [{k: v for k, v in good.items() if k != "quote"}]})
    assert not check(schema, {"items": [good] * 6})
    assert not check(schema, {"items": [{**good, "quote": "x" * 601}]})
    paged = extraction_schema(cats[:2], pages=(4, 6))
    assert not check(paged, {"items": [{**good, "category": "parties", "page": 3}]})
    assert check(paged, {"items": [{**good, "category": "parties", "page": 6}]})


def test_user_schema(check):
    user = {
        "type": "object",
        "$defs": {
            "money": {"type": "object", "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}}}
        },
        "properties": {
            "parties": {"type": "array", "items": {"type": "string"}, "description": "Who signed"},
            "annual_fee": {"$ref": "#/$defs/money", "title": "Annual fee"},
            "term_years": {"type": "integer"},
            "kind": {"enum": ["nda", "msa"]},
        },
    }
    fields = user_schema_fields(user)
    assert [f.key for f in fields] == ["parties", "annual_fee", "term_years", "kind"]
    assert fields[0].description == "Who signed" and fields[0].answer_format == "list of string"
    assert fields[0].value_schema["maxItems"] == 20 and fields[0].value_schema["items"]["maxLength"] == 500
    assert fields[1].name == "Annual fee" and fields[3].answer_format == 'one of: "nda", "msa"'
    schema = extraction_schema_for_user(user)
    assert schema["$defs"]["money"]["additionalProperties"] is False

    def item(cat: str, value) -> dict:
        return {"category": cat, "value": value, "quote": "as quoted in the text", "page": 2}

    assert check(schema, {"items": [item("parties", ["Acme Corp", "Beta LLC"]),
                                    item("annual_fee", {"amount": 1200.5, "currency": "USD"}),
                                    item("term_years", 3), item("kind", "nda")]})
    assert not check(schema, {"items": [item("term_years", "three")]})  # each field keeps its own value type
    assert not check(schema, {"items": [item("kind", "lease")]})
    assert not check(schema, {"items": [item("annual_fee", {"amount": 1, "currency": "USD", "x": 1})]})
    assert not check(schema, {"items": [item("unknown", "x")]})
    single = extraction_schema_for_user({"type": "object", "properties": {"law": {"type": "string"}}})
    assert single["properties"]["items"]["items"]["properties"]["category"] == {"const": "law"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"type": "array", "items": {"type": "string"}}, "must describe an object"),
        ({"type": "object"}, "properties"),
        ({"type": "object", "properties": {}}, "properties"),
        ({"type": "object", "properties": {"a": "string"}}, "property 'a'"),
        ([1, 2], "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_user_schema_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        user_schema_fields(bad)
    with pytest.raises(ValueError, match=message):
        extraction_schema_for_user(bad)


# -- scoring ---------------------------------------------------------------------------------------------------------


def test_tokens_and_jaccard():
    assert tokens("The Licensee's fees, (as defined)!") == ["licensee", "s", "fees", "as", "defined"]
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_perfect():
    gold = [G("Governing Law", GOV, 3), G("Termination for Convenience", TERM, 5), G("Audit Rights", AUDIT, 7)]
    preds = [P(g.category, g.text, g.page) for g in gold]
    r = score(preds, gold)
    assert r.micro.f1 == r.macro.f1 == 1.0 and r.micro.precision == r.micro.recall == 1.0
    assert len(r.matches) == 3 and all(m.similarity == 1.0 for m in r.matches)


def test_partial_and_span_tolerance():
    gold = [G("Governing Law", GOV), G("Termination for Convenience", TERM), G("Audit Rights", AUDIT)]
    preds = [
        P("Governing Law", "governed by the laws of the State of Delaware"),  # shorter span, Jaccard >= 0.5
        P("Termination for Convenience", "Either party may terminate"),  # too short: Jaccard < 0.5
        P("Audit Rights", AUDIT),
    ]
    r = score(preds, gold)
    assert (r.micro.precision, r.micro.recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert r.per_category["termination_for_convenience"].fn == 1
    assert r.per_category["termination_for_convenience"].fp == 1
    assert score(preds, gold, match="overlap").micro.f1 == 1.0  # any shared token counts
    assert score(preds, gold, threshold=0.95).micro.recall == pytest.approx(1 / 3)


def test_wrong_page():
    gold = [G("Governing Law", GOV, 3)]
    assert score([P("Governing Law", GOV, 4)], gold).micro.f1 == 0.0
    assert score([P("Governing Law", GOV, 4)], gold, page_must_match=False).micro.f1 == 1.0
    assert score([P("Governing Law", GOV, None)], gold).micro.f1 == 1.0  # unknown page: text decides
    assert score([P("Governing Law", GOV, 4)], [G("Governing Law", GOV, None)]).micro.f1 == 1.0


def test_wrong_category():
    r = score([P("Audit Rights", GOV)], [G("Governing Law", GOV)])
    assert r.micro.f1 == 0.0 and r.matches == []
    assert r.per_category["audit_rights"].fp == 1 and r.per_category["governing_law"].fn == 1


def test_category_names_and_keys_mix():
    assert score([P("governing_law", GOV)], [G("Governing Law", GOV)]).micro.f1 == 1.0
    assert score([P("rofr_rofo_rofn", TERM)], [G("Rofr/Rofo/Rofn", TERM)]).micro.f1 == 1.0


def test_duplicates_do_not_double_count():
    gold = [G("Governing Law", GOV)]
    same = score([P("Governing Law", GOV), P("Governing Law", "  this agreement shall be governed by the laws of "
                                                              "the state of delaware ")], gold)
    assert same.per_category["governing_law"].model_dump(include={"tp", "fp", "fn", "predicted"}) == {
        "tp": 1, "fp": 0, "fn": 0, "predicted": 1}  # exact duplicates collapse
    near = score([P("Governing Law", GOV), P("Governing Law", "governed by the laws of the State of Delaware")], gold)
    assert (near.per_category["governing_law"].tp, near.per_category["governing_law"].fp) == (1, 1)
    assert near.matches[0].prediction == 0  # the better match wins the gold clause


def test_greedy_by_best_similarity():
    a = "Licensee shall pay a royalty of five percent of net sales in the territory."
    b = "Licensee shall pay a royalty of seven percent of net sales outside the territory."
    gold = [G("Revenue/Profit Sharing", a), G("Revenue/Profit Sharing", b)]
    preds = [P("Revenue/Profit Sharing", b), P("Revenue/Profit Sharing", a)]  # each fits both, one exactly
    r = score(preds, gold)
    assert r.micro.f1 == 1.0
    assert {(m.prediction, m.gold) for m in r.matches} == {(0, 1), (1, 0)}


def test_micro_and_macro_math():
    gold = [G("Governing Law", GOV), G("Audit Rights", AUDIT, 1), G("Audit Rights", AUDIT, 2),
            G("Audit Rights", AUDIT, 3)]
    preds = [P("Governing Law", GOV), P("Audit Rights", AUDIT, 2), P("Insurance", "Supplier shall maintain insurance")]
    r = score(preds, gold)
    gl, ar, ins = (r.per_category[k] for k in ("governing_law", "audit_rights", "insurance"))
    assert (gl.precision, gl.recall, gl.f1) == (1.0, 1.0, 1.0)
    assert (ar.precision, ar.recall, ar.f1) == (1.0, pytest.approx(1 / 3), pytest.approx(0.5))
    assert (ins.precision, ins.recall, ins.f1) == (0.0, 0.0, 0.0)
    assert r.macro.precision == pytest.approx(2 / 3)
    assert r.macro.recall == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert r.macro.f1 == pytest.approx(0.5)
    # micro: tp 2, fp 1, fn 2
    assert r.micro.precision == pytest.approx(2 / 3) and r.micro.recall == pytest.approx(2 / 4)
    assert r.micro.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    md = r.to_markdown()
    assert "| audit_rights | 3 | 1 | 1 | 0 | 2 | 1.000 | 0.333 | 0.500 |" in md
    assert "| **micro** | 4 | 3 | 2 | 1 | 2 |" in md and "| **macro** |" in md


def test_empty_inputs():
    r = score([], [])
    assert r.per_category == {} and r.micro.f1 == 0.0 and r.macro.f1 == 0.0
    assert score([], [G("Governing Law", GOV)]).micro.recall == 0.0


CUAD_SAMPLE = {
    "version": "aok_v1.0",
    "data": [
        {
            "title": "ACMECORP_01_01_2020-EX-10.1-DISTRIBUTOR AGREEMENT",
            "paragraphs": [
                {
                    "context": "DISTRIBUTOR AGREEMENT ... governed by the laws of the State of Delaware ...",
                    "qas": [
                        {"id": "ACMECORP_01_01_2020-EX-10.1-DISTRIBUTOR AGREEMENT__Document Name",
                         "question": "Highlight the parts (if any) of this contract related to \"Document Name\"",
                         "answers": [{"text": "DISTRIBUTOR AGREEMENT", "answer_start": 0}], "is_impossible": False},
                        {"id": "ACMECORP_01_01_2020-EX-10.1-DISTRIBUTOR AGREEMENT__Governing Law",
                         "question": "...",
                         "answers": [{"text": "governed by the laws of the State of Delaware", "answer_start": 26},
                                     {"text": "governed by the laws of the State of Delaware", "answer_start": 26}],
                         "is_impossible": False},
                        {"id": "ACMECORP_01_01_2020-EX-10.1-DISTRIBUTOR AGREEMENT__Rofr/Rofo/Rofn",
                         "question": "...", "answers": [], "is_impossible": True},
                    ],
                }
            ],
        },
        {"title": "EMPTY", "paragraphs": [{"context": "", "qas": []}]},
    ],
}


def test_load_cuad_json(tmp_path):
    gold = load_cuad_json(CUAD_SAMPLE)
    assert set(gold) == {"ACMECORP_01_01_2020-EX-10.1-DISTRIBUTOR AGREEMENT", "EMPTY"}
    clauses = gold["ACMECORP_01_01_2020-EX-10.1-DISTRIBUTOR AGREEMENT"]
    assert [(c.category, c.start, c.page) for c in clauses] == [("Document Name", 0, None), ("Governing Law", 26, None)]
    assert gold["EMPTY"] == []
    path = tmp_path / "cuad.json"
    path.write_text(json.dumps(CUAD_SAMPLE))
    assert load_cuad_json(path) == gold and load_cuad_json(str(path)) == gold
    names = {c.name for c in load_categories()}
    assert all(c.category in names for c in clauses)
    preds = [P("governing_law", "the laws of the State of Delaware", 9)]
    assert score(preds, clauses).per_category["governing_law"].tp == 1  # CUAD has no pages: text decides
    with pytest.raises(ValueError):
        load_cuad_json({"rows": []})


def test_category_model_is_pydantic():
    c = load_categories()[0]
    assert isinstance(c, Category) and Category.model_validate(c.model_dump()) == c
