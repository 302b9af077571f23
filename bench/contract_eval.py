"""How much the extraction pipeline itself loses: the contract agent run with an oracle model that quotes, for
each chunk, exactly the gold clauses whose full text is in that chunk (cited on their gold page) plus one
made-up quote per chunk, then scored with the CUAD scorer (token Jaccard >= 0.5, same page).

With a perfect model, recall below 1 comes from the pipeline: a clause cut by a chunk boundary and not repeated
by the overlap, a reading-order or header/footer mistake that breaks a clause's text, or a quote the verifier
fails to find. Precision below 1 would mean a made-up quote got through verification. Scanned pages have no
text layer, so their clauses can never verify (reported separately).

Usage: python bench/contract_eval.py [--pages 60] [--chunk-tokens 1500 3000 None] [--overlap 0 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def run_one(pdf: bytes, gold, chunk_tokens: int | None, overlap: int) -> dict:
    from agents.registry import build_registry
    from agents.runner import RunnerOptions, TaskRunner
    from connectors.stores import open_stores
    from connectors.stores.base import TaskSubmission
    from pipelines.document.scoring import score
    from pipelines.document.types import PredictedClause
    from tests.test_contract_agent import QuotingModel

    with tempfile.TemporaryDirectory() as tmp:
        stores = open_stores(f"sqlite:///{tmp}")
        model = QuotingModel(gold)
        runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=60))
        data = {"file": {"name": "eval.pdf", "data": base64.b64encode(pdf).decode()}, "overlap_tokens": overlap}
        if chunk_tokens:
            data["chunk_tokens"] = chunk_tokens
        await stores.tasks.submit("eval", TaskSubmission(type="contract_extraction", input=data))
        done = await runner.run_once(timeout_s=10)
        await stores.close()
    assert done.status == "succeeded", done.error
    predictions = [PredictedClause(category=f["name"], text=c["quote"], page=c["page"])
                   for f in done.result["fields"] for v in f["values"] for c in v["citations"] if c["verified"]]
    report = score(predictions, gold)
    return {"chunk_tokens": chunk_tokens, "overlap_tokens": overlap, "chunks": done.result["chunks"],
            "precision": round(report.micro.precision, 3), "recall": round(report.micro.recall, 3),
            "f1": round(report.micro.f1, 3), "verified_citations": len(predictions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--chunk-tokens", nargs="+", default=["800", "1500", "None"])
    parser.add_argument("--overlap", nargs="+", type=int, default=[0, 200])
    parser.add_argument("--json")
    args = parser.parse_args()
    from pipelines.document.synthetic import make_contract

    contract = make_contract(pages=args.pages, seed=0)
    scanned = set(contract.scanned_pages)
    text_gold = [g for g in contract.gold if g.page not in scanned]
    rows = []
    for ct in args.chunk_tokens:
        for overlap in args.overlap:
            row = asyncio.run(run_one(contract.pdf, text_gold, None if ct == "None" else int(ct), overlap))
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"pages": args.pages, "gold_on_text_pages": len(text_gold),
           "gold_on_scanned_pages": len(contract.gold) - len(text_gold), "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
