"""CUAD evaluation of the contract pipeline on real contracts (PDFs + CUAD's ``master_clauses.csv``).

``oracle``: how much of CUAD's gold survives our reading and verification, before any model is involved.  Every gold
clause of four or more words is checked with the production reader (``pipelines.document.reader.read_pdf``) and
verifier (``pipelines.document.citations.verify``) against every page (CUAD has no page numbers): whole first (CUAD
writes ``<omitted>`` where it left text out, page numbers between a clause's two pages included), else piece by
piece (a clause CUAD cut from several places verifies when every piece of 4+ words does).  Then fabricated quotes
(a gold quote with one number changed, one name changed, or "shall" negated) are checked on the gold quote's pages
and their neighbours, as a model's citation would be: none may verify.

``model``: extraction through the real task path (``contract_extraction`` on a TaskRunner with the served model:
in-process with ``--checkpoint`` or the tiny random checkpoint, or a running server with ``--url``), scored the way
the CUAD paper scores systems: per category and overall precision/recall with its rule (token Jaccard >= 0.5),
AUPR over the values' confidence, and precision at 80 % and 90 % recall.  With the tiny checkpoint the numbers are
noise; the run proves the path end to end.

Usage:
  python bench/cuad_eval.py oracle [--dir ../shared/data/cuad] [--csv master_clauses.csv] [--json out.json]
  python bench/cuad_eval.py model [--dir ...] [--contracts NAME ...] [--categories "Governing Law" ...]
                                  [--max-pages 4] [--checkpoint PATH | --url URL --api-key KEY] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DIR = REPO.parent / "shared" / "data" / "cuad"
MIN_WORDS = 4
FABRICATE_MIN_WORDS = 8  # shorter quotes changed in one word could honestly occur elsewhere in a contract
_NUMBER = re.compile(r"\d+")
_NAME = re.compile(r"(?<=\s)[A-Z][a-z]{3,}\b")


def find_data(directory: Path, csv_path: Path | None) -> tuple[dict[str, Path], Path]:
    """PDFs by lower-cased stem, and the master clauses CSV (``master_clauses.csv`` or ``master_clauses_*.csv``)."""
    pdfs = {p.stem.lower(): p for p in sorted(directory.rglob("*")) if p.suffix.lower() == ".pdf"}
    if csv_path is None:
        found = sorted(directory.glob("master_clauses*.csv"))
        if not found:
            raise SystemExit(f"no master_clauses*.csv in {directory}; pass --csv")
        csv_path = found[0]
    return pdfs, csv_path


def fabricate(quote: str) -> list[tuple[str, str]]:
    """``(kind, text)`` variants of a true quote that state a different fact."""
    out = []
    m = _NUMBER.search(quote)
    if m:
        out.append(("number", quote[: m.start()] + str(int(m.group()) + 7) + quote[m.end():]))
    m = _NAME.search(quote)
    if m:
        out.append(("name", quote[: m.start()] + "Zanzibar" + quote[m.end():]))
    if " shall not " in quote:
        out.append(("negation", quote.replace(" shall not ", " shall ", 1)))
    elif " shall " in quote:
        out.append(("negation", quote.replace(" shall ", " shall not ", 1)))
    return out


def oracle_contract(pdf: Path, gold: list[Any]) -> dict[str, Any]:
    from pipelines.document.citations import verify
    from pipelines.document.reader import read_pdf
    from pipelines.document.scoring import clause_parts

    started = time.perf_counter()
    document = read_pdf(pdf.read_bytes())
    read_s = time.perf_counter() - started
    every_page = [p.number for p in document.pages]
    quotes = verified = cross_page = whole_parts = whole_verified = 0
    fabricated = fabricated_verified = 0
    misses: list[dict[str, str]] = []
    leaks: list[dict[str, str]] = []
    for clause in gold:
        parts = clause_parts(clause.text)
        whole = " ".join(parts)
        if len(whole.split()) < MIN_WORDS:
            continue
        quotes += 1
        # CUAD writes <omitted> where it left out text, page numbers between a clause's two pages included: the
        # clause is first tried whole (as a model would quote it), then piece by piece (a discontinuous clause)
        citation = verify(document, whole, every_page, search_neighbours=0)
        found = [citation] if citation is not None else []
        whole_verified += citation is not None
        if citation is None and len(parts) > 1:
            found = [verify(document, p, every_page, search_neighbours=0) for p in parts
                     if len(p.split()) >= MIN_WORDS]
            whole_parts += 1
        if not found or any(c is None for c in found):
            misses.append({"category": clause.category, "quote": clause.text[:300]})
            continue
        verified += 1
        cross_page += any(len(c.pages) > 1 for c in found)
        for part, c in zip([whole] if citation is not None else [p for p in parts if len(p.split()) >= MIN_WORDS],
                           found):
            if len(part.split()) < FABRICATE_MIN_WORDS:
                continue
            for kind, fake in fabricate(part):
                fabricated += 1
                if verify(document, fake, c.pages) is not None:
                    fabricated_verified += 1
                    leaks.append({"category": clause.category, "kind": kind, "quote": fake[:300]})
    return {"contract": pdf.name, "pages": document.page_count, "read_s": round(read_s, 2), "quotes": quotes,
            "verified": verified, "share": round(verified / quotes, 4) if quotes else 1.0,
            "verified_whole": whole_verified, "cross_page": cross_page, "by_pieces": whole_parts, "fabricated": fabricated, "fabricated_verified": fabricated_verified,
            "misses": misses, "leaks": leaks}


def run_oracle(directory: Path, csv_path: Path | None) -> dict[str, Any]:
    from pipelines.document.scoring import load_master_clauses

    pdfs, csv_path = find_data(directory, csv_path)
    gold = load_master_clauses(csv_path)
    rows = []
    for stem, clauses in gold.items():
        if stem not in pdfs:
            print(f"skipped {stem}: no PDF", file=sys.stderr)
            continue
        row = oracle_contract(pdfs[stem], clauses)
        rows.append(row)
        print(f"{row['verified']}/{row['quotes']} verified ({row['verified_whole']} whole, {row['cross_page']} "
              f"across pages), "
              f"{row['fabricated_verified']}/{row['fabricated']} fabricated verified, {row['pages']} pages "
              f"{row['read_s']}s  {row['contract']}", flush=True)
        for miss in row["misses"]:
            print(f"   MISS {miss['category']}: {miss['quote'][:160]!r}")
        for leak in row["leaks"]:
            print(f"   LEAK {leak['category']} ({leak['kind']}): {leak['quote'][:160]!r}")
    quotes = sum(r["quotes"] for r in rows)
    verified = sum(r["verified"] for r in rows)
    total = {"contracts": len(rows), "quotes": quotes, "verified": verified,
             "share": round(verified / quotes, 4) if quotes else 1.0,
             "verified_whole": sum(r["verified_whole"] for r in rows),
             "cross_page": sum(r["cross_page"] for r in rows),
             "fabricated": sum(r["fabricated"] for r in rows),
             "fabricated_verified": sum(r["fabricated_verified"] for r in rows)}
    print(json.dumps(total))
    return {"mode": "oracle", "csv": str(csv_path), "total": total, "contracts": rows}


# -- the model run -------------------------------------------------------------------------------------------------


def predictions_of(result: dict[str, Any]) -> tuple[list[Any], list[float]]:
    """One prediction per extracted value: its best citation's text (the source text when verified, else the
    model's quote), with the value's confidence."""
    from pipelines.document.types import PredictedClause

    preds, confs = [], []
    for field in result["fields"]:
        for value in field["values"]:
            citations = value.get("citations") or []
            if not citations:
                continue
            best = citations[0]  # verified first (merge_results sorts them)
            preds.append(PredictedClause(category=field["name"], text=best["quote"], page=None))
            confs.append(float(value.get("confidence") or 0.0))
    return preds, confs


def run_tasks(submit_and_wait: Any, pdfs: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for pdf in pdfs:
        started = time.perf_counter()
        done = submit_and_wait({"file": {"name": pdf.name, "data": base64.b64encode(pdf.read_bytes()).decode()},
                                **options})
        if done.status != "succeeded":
            raise SystemExit(f"{pdf.name}: task {done.status}: {done.error}")
        results.append({"contract": pdf.name, "seconds": round(time.perf_counter() - started, 1),
                        "chunks": done.result["chunks"],
                        "model_calls": done.result.get("stats", {}).get("model_calls"), "result": done.result})
        print(f"{pdf.name}: {done.result['chunks']} chunks in {results[-1]['seconds']}s", flush=True)
    return results


def run_model(directory: Path, csv_path: Path | None, *, contracts: list[str] | None, categories: list[str] | None,
              max_pages: int | None, checkpoint: str | None, url: str | None, api_key: str | None,
              extra: dict[str, Any]) -> dict[str, Any]:
    from pipelines.document.cuad import category_by_key, to_key
    from pipelines.document.scoring import aupr, load_master_clauses, pr_curve, precision_at_recall, score

    pdfs, csv_path = find_data(directory, csv_path)
    gold_all = load_master_clauses(csv_path)
    stems = [s for s in gold_all if s in pdfs]
    if contracts:
        wanted = [c.lower() for c in contracts]
        stems = [s for s in stems if any(w in s for w in wanted)]
    if not stems:
        raise SystemExit("no contract selected")
    options: dict[str, Any] = dict(extra)
    if categories:
        options["categories"] = categories
    if max_pages:
        options.update(max_pages=max_pages, truncate=True)
    keys = {to_key(category_by_key(c).name) for c in categories} if categories else None

    def gold_for(stem: str) -> list[Any]:
        return [g for g in gold_all[stem] if keys is None or to_key(g.category) in keys]

    selected = [pdfs[s] for s in stems]
    if url:
        import kimiray

        with kimiray.Client(url, api_key=api_key) as client:
            runs = run_tasks(lambda data: client.wait(client.submit("contract_extraction", data).id, timeout=7200),
                             selected, options)
    else:
        import kimiray

        with tempfile.TemporaryDirectory() as tmp:
            model = checkpoint
            if model is None:
                from engine.tiny import write_tiny_checkpoint

                model = str(write_tiny_checkpoint(Path(tmp) / "tiny", seed=0))
            with kimiray.LocalRuntime(model, stores_url=f"sqlite:///{tmp}/stores") as runtime:
                runs = run_tasks(lambda data: runtime.wait(runtime.submit("contract_extraction", data).id,
                                                           timeout=7200), selected, options)
    per_contract = []
    for stem, run in zip(stems, runs):
        gold = gold_for(stem)
        if max_pages:  # only gold whose text is in the pages read can be found
            gold = [g for g in gold if _in_pages(g.text, selected[stems.index(stem)], max_pages)]
        preds, confs = predictions_of(run["result"])
        per_contract.append((preds, confs, gold))
        run["gold"], run["predicted"] = len(gold), len(preds)
        run["values"] = [{"category": f["key"], "value": v["value"], "confidence": v.get("confidence"),
                          "verified": v["verified"]} for f in run["result"]["fields"] for v in f["values"]]
    report = score([p for ps, _, _ in per_contract for p in ps], [g for _, _, gs in per_contract for g in gs],
                   page_must_match=False) if len(per_contract) == 1 else _pooled(per_contract)
    curve = pr_curve(per_contract, page_must_match=False)
    summary = {"contracts": len(runs), "gold": sum(len(g) for _, _, g in per_contract),
               "predicted": sum(len(p) for p, _, _ in per_contract),
               "precision": round(report.micro.precision, 4), "recall": round(report.micro.recall, 4),
               "f1": round(report.micro.f1, 4), "aupr": round(aupr(curve), 4),
               "precision_at_80_recall": round(precision_at_recall(curve, 0.8), 4),
               "precision_at_90_recall": round(precision_at_recall(curve, 0.9), 4)}
    print(report.to_markdown())
    print(json.dumps(summary))
    return {"mode": "model", "model": url or checkpoint or "tiny random checkpoint", "options": options,
            "summary": summary, "per_category": {k: v.model_dump() for k, v in report.per_category.items()},
            "runs": [{k: v for k, v in r.items() if k != "result"} for r in runs]}


def _pooled(per_contract: list[tuple[list[Any], list[float], list[Any]]]) -> Any:
    """One report over several contracts: each contract scored on its own (a prediction may only match gold of
    its own contract), the counts summed."""
    from pipelines.document.scoring import PRF, CategoryScore, ScoreReport, _prf, score

    per: dict[str, list[int]] = {}
    for preds, _, gold in per_contract:
        for cat, c in score(preds, gold, page_must_match=False).per_category.items():
            acc = per.setdefault(cat, [0, 0, 0, 0, 0])
            for i, v in enumerate((c.gold, c.predicted, c.tp, c.fp, c.fn)):
                acc[i] += v
    cats = {}
    for cat, (g, p, tp, fp, fn) in per.items():
        pr, rc, f = _prf(tp, fp, fn)
        cats[cat] = CategoryScore(category=cat, gold=g, predicted=p, tp=tp, fp=fp, fn=fn, precision=pr, recall=rc,
                                  f1=f)
    tp, fp, fn = (sum(c[i] for c in per.values()) for i in (2, 3, 4))
    micro = _prf(tp, fp, fn)
    k = len(cats) or 1
    macro = [sum(getattr(c, a) for c in cats.values()) / k for a in ("precision", "recall", "f1")]
    return ScoreReport(per_category=cats, micro=PRF(precision=micro[0], recall=micro[1], f1=micro[2]),
                       macro=PRF(precision=macro[0], recall=macro[1], f1=macro[2]), match="jaccard", threshold=0.5,
                       page_must_match=False)


def _in_pages(text: str, pdf: Path, pages: int) -> bool:
    from pipelines.document.citations import verify
    from pipelines.document.reader import read_pdf
    from pipelines.document.scoring import clause_parts

    document = _read_cached(pdf, pages, read_pdf)
    numbers = [p.number for p in document.pages]
    return any(verify(document, part, numbers, search_neighbours=0) for part in clause_parts(text))


_READ: dict[tuple[str, int], Any] = {}


def _read_cached(pdf: Path, pages: int, read_pdf: Any) -> Any:
    key = (str(pdf), pages)
    if key not in _READ:
        _READ[key] = read_pdf(pdf.read_bytes(), max_pages=pages, truncate=True)
    return _READ[key]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["oracle", "model"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="CUAD-format directory of PDFs")
    parser.add_argument("--csv", type=Path, help="master_clauses.csv (default: master_clauses*.csv in --dir)")
    parser.add_argument("--contracts", nargs="+", help="model run: contracts whose file name contains one of these")
    parser.add_argument("--categories", nargs="+", help="model run: CUAD categories (default all 41)")
    parser.add_argument("--max-pages", type=int, help="model run: read only the first N pages of each contract")
    parser.add_argument("--checkpoint", help="model run: local checkpoint (default: the tiny random one)")
    parser.add_argument("--url", help="model run: a running kimiray server instead of an in-process engine")
    parser.add_argument("--api-key", default=os.environ.get("KIMIRAY_API_KEY"))
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="model run: extra contract_extraction input, e.g. max_output_tokens=512")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.mode == "oracle":
        out = run_oracle(args.dir, args.csv)
    else:
        extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
        out = run_model(args.dir, args.csv, contracts=args.contracts, categories=args.categories,
                        max_pages=args.max_pages, checkpoint=args.checkpoint, url=args.url, api_key=args.api_key,
                        extra=extra)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
