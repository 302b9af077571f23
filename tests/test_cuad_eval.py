"""The CUAD evaluation harness: the oracle check on the shared real contracts (every gold clause of 4+ words
verifies through the production reader and verifier, no fabricated quote does), the CUAD-style curve metrics, and
the model run end to end with the tiny checkpoint on one short contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import cuad_eval
from pipelines.document.scoring import (
    CurvePoint, aupr, clause_parts, load_master_clauses, pr_curve, precision_at_recall)
from pipelines.document.types import GoldClause, PredictedClause

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cuad"
needs_data = pytest.mark.skipif(not (DATA / "master_clauses_dev.csv").exists(), reason=f"no CUAD data in {DATA}")


@needs_data
def test_master_clauses_load_every_contract() -> None:
    gold = load_master_clauses(DATA / "master_clauses_dev.csv")
    assert len(gold) == 8 and all(gold.values())
    assert all(not c.category.endswith("Answer") for clauses in gold.values() for c in clauses)
    assert clause_parts("a b<omitted>c d <omitted> ") == ["a b", "c d"]


@needs_data
def test_oracle_on_the_shared_real_contracts() -> None:
    out = cuad_eval.run_oracle(DATA, None)
    total = out["total"]
    assert total["contracts"] == 8 and total["quotes"] >= 150
    assert total["share"] >= 0.99, [r["misses"] for r in out["contracts"]]
    assert total["cross_page"] >= 2  # clauses CUAD split at a page break verify whole, as one citation
    assert total["fabricated"] >= 200 and total["fabricated_verified"] == 0, [r["leaks"] for r in out["contracts"]]
    for row in out["contracts"]:
        assert row["share"] >= 0.95, row


def test_fabricate_changes_a_fact() -> None:
    kinds = dict(cuad_eval.fabricate("The Distributor shall pay 30 days after delivery to Siemens."))
    assert kinds["number"] == "The Distributor shall pay 37 days after delivery to Siemens."
    assert "Zanzibar" in kinds["name"] and "shall not pay" in kinds["negation"]


def test_curve_metrics() -> None:
    gold = [GoldClause(category="Governing Law", text="laws of the State of Delaware"),
            GoldClause(category="Parties", text="Acme Corp and Beta LLC")]
    preds = [PredictedClause(category="Governing Law", text="the laws of the State of Delaware"),
             PredictedClause(category="Parties", text="something else entirely here"),
             PredictedClause(category="Parties", text="Acme Corp and Beta LLC")]
    curve = pr_curve([(preds, [0.9, 0.8, 0.3], gold)], page_must_match=False)
    assert [(p.threshold, round(p.precision, 3), p.recall) for p in curve] == [
        (0.9, 1.0, 0.5), (0.8, 0.5, 0.5), (0.3, 0.667, 1.0)]
    assert aupr(curve) == pytest.approx(0.5 * 1.0 + 0.5 * 0.6667, abs=1e-3)
    assert precision_at_recall(curve, 0.8) == pytest.approx(2 / 3)
    assert precision_at_recall([CurvePoint(threshold=1, precision=1, recall=0.5)], 0.9) == 0.0


@needs_data
def test_model_run_end_to_end_with_the_tiny_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = cuad_eval.main(["model", "--dir", str(DATA), "--contracts", "lifeway", "--categories", "Governing Law",
                          "Parties", "--max-pages", "2", "--checkpoint", str(tiny_checkpoint),
                          "--option", "max_items_per_chunk=1", "--option", "max_output_tokens=120",
                          "--option", "max_quote_chars=60", "--option", "max_value_chars=24",
                          "--json", str(tmp_path / "out.json")])
    summary = out["summary"]
    assert summary["contracts"] == 1 and summary["gold"] >= 1  # the parties are on page 1
    for key in ("precision", "recall", "aupr", "precision_at_80_recall", "precision_at_90_recall"):
        assert 0.0 <= summary[key] <= 1.0
    values = out["runs"][0]["values"]
    assert all(0.0 <= v["confidence"] <= 1.0 for v in values)
    assert (tmp_path / "out.json").exists()
