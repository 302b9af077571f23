"""Quote verification speed: 100 quotes (exact, one typo, absent) checked against a 60-page document.

    python bench/citations_bench.py [--rounds 5]

Prints the best and median seconds per 100 quotes (the workload of ``tests/test_citations.py``)."""

from __future__ import annotations

import argparse
import statistics
import time

from pipelines.document.citations import verify
from tests.test_citations import sixty_pages_hundred_quotes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    doc, quotes = sixty_pages_hundred_quotes()
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for quote, page in quotes:
            verify(doc, quote, [page])
        times.append(time.perf_counter() - start)
    print(f"100 quotes over 60 pages: best {min(times):.3f} s, median {statistics.median(times):.3f} s "
          f"({args.rounds} rounds)")


if __name__ == "__main__":
    main()
