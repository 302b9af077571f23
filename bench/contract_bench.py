"""Contract extraction throughput on a CPU machine with the tiny checkpoint.

  ingest_text    pages/s of ``read_pdf`` on a generated N-page contract with no scanned page (text layer:
                 blocks, columns, tables, headers/footers, sections)
  ingest_scans   pages/s of ``read_pdf`` on a contract whose pages but the first and last are scanned (each
                 rendered to PNG at 110 dpi)
  end_to_end     one ``contract_extraction`` task on the generated N-page contract through ``LocalRuntime``
                 (embedded store, TaskRunner, the tiny checkpoint in the real engine, no Ray): wall time, model
                 calls and tokens per page, and how full each call's context was (prompt + output / window)

The tiny model's window is 4,096 tokens and its tokenizer is small, so it needs ~30x the calls per page of the
real model (128K window); the numbers measure our pipeline's overhead, not extraction quality.

Usage: python bench/contract_bench.py [--pages 300] [--scan-pages 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIONS = {"categories": ["Governing Law", "Parties", "Insurance", "Audit Rights", "Cap on Liability"],
           "max_items_per_chunk": 1, "max_value_chars": 24, "max_quote_chars": 60, "max_output_tokens": 120}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--scan-pages", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import kimiray
    from pipelines.document.reader import read_pdf
    from pipelines.document.synthetic import make_contract

    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}",
                 "pages": args.pages}
    contract = make_contract(pages=args.pages, seed=1, scanned_pages=[])
    started = time.perf_counter()
    document = read_pdf(contract.pdf)
    out["ingest_text_pages_per_s"] = round(document.page_count / (time.perf_counter() - started), 1)
    # every page but the first and last scanned (the generator keeps those as text)
    scans = make_contract(pages=args.scan_pages, seed=2, scanned_pages=list(range(2, args.scan_pages)),
                          table_page=None, two_column_page=None)
    started = time.perf_counter()
    scanned = read_pdf(scans.pdf)
    out["ingest_scans_pages_per_s"] = round(scanned.page_count / (time.perf_counter() - started), 1)
    out["ingest_scans_scanned_pages"] = sum(p.scanned for p in scanned.pages)

    with tempfile.TemporaryDirectory() as tmp:
        with kimiray.LocalRuntime(stores_url=f"sqlite:///{tmp}") as runtime:
            started = time.perf_counter()
            task = runtime.submit("contract_extraction", {
                "file": {"name": "bench.pdf", "data": base64.b64encode(contract.pdf).decode()}, **OPTIONS})
            done = runtime.wait(task.id, timeout=7200)
            elapsed = time.perf_counter() - started
    result = done.result
    stats = result["stats"]
    out["end_to_end"] = {
        "seconds": round(elapsed, 1),
        "pages_per_s": round(args.pages / elapsed, 2),
        "chunks": result["chunks"],
        "model_calls": stats["model_calls"],
        "model_calls_per_page": round(stats["model_calls"] / args.pages, 3),
        "tokens_per_page": stats["tokens_per_page"],
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "context_fill_mean": stats["context_fill_mean"],
        "context_fill_max": stats["context_fill_max"],
        "model_seconds": stats["model_seconds"],
        "categories": len(OPTIONS["categories"]),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
