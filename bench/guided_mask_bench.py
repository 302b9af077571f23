"""Per-step guided-decoding mask time, CPU: the old per-row path vs the batched bitmask path.

Old (before issue 16): every guided row computed its own bitmask, unpacked it to a 163,840-entry bool row on
the CPU (``GrammarMatcher.allowed_mask``), copied it into a ``(B, V)`` bool tensor and checked ``.any()``; the
bool tensor was then moved to the device and applied. New: one ``GuidedDecoding.fill_batch`` call fills all rows
of one ``(B, ceil(V/32))`` int32 bitmask in parallel (llguidance's thread pool), then one unpack + masked fill.
Both end with the same ``logits.masked_fill_``; both timings include it. Device = CPU here. llguidance's grammar
work for a new state is the same in both (and cached by the matcher once done), so it is done once per step
first and reported on its own; the two paths are then timed on equal terms (alternating which runs first).

The vocabulary has the real checkpoint's size (163,584 byte-level tokens + 256 specials): the tiny checkpoint's
768 learned tokens plus random ASCII / UTF-8 pieces, so masks cost what they cost at full size. Rows run
different JSON schemas and advance by sampling allowed tokens, so every step sees fresh grammar states.

    python bench/guided_mask_bench.py --batch 8 --steps 60
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.runtime.guided import GuidedDecoding, allocate_bitmask, bitmask_to_bool
from engine.tiny_tokenizer import tokenizer_config, write_tiny_tokenizer
from engine.tokenizer import NUM_RESERVED_SPECIAL_TOKENS, KimiTokenizer, _load_ranks

REAL_BASE_TOKENS = 163_584
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 6},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"category": {"enum": ["Parties", "Governing Law", "Term"]},
                                         "quote": {"type": "string", "maxLength": 80},
                                         "page": {"type": "integer", "minimum": 1, "maximum": 500}},
        "required": ["category", "quote", "page"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"action": {"enum": ["click", "type", "scroll", "done"]},
                                      "x": {"type": "integer", "minimum": 0, "maximum": 1920},
                                      "y": {"type": "integer", "minimum": 0, "maximum": 1080},
                                      "text": {"type": "string", "maxLength": 60}},
     "required": ["action"], "additionalProperties": False},
]


def full_size_tokenizer(seed: int = 0) -> KimiTokenizer:
    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer(d)
        ranks = _load_ranks(Path(d) / "tiktoken.model")
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(32, 127)] + list("éüßçñ世界的是に한")
    while len(ranks) < REAL_BASE_TOKENS:
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))).encode()
        ranks.setdefault(piece, len(ranks))
    tok = KimiTokenizer(ranks, tokenizer_config(REAL_BASE_TOKENS))
    assert tok.vocab_size == REAL_BASE_TOKENS + NUM_RESERVED_SPECIAL_TOKENS == 163_840
    return tok


def old_bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The unpack as it was before issue 16 (int32 shifts: four bytes of temporaries per token)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)[..., :vocab_size]


def old_allowed_mask(m, vocab: int) -> torch.Tensor:
    """``GrammarMatcher.allowed_mask`` as it was: a one-row bitmask, unpacked to a bool row on the CPU."""
    buf = torch.empty((1, m.guided.n_words), dtype=torch.int32)
    m.fill_bitmask(buf, 0)
    return old_bitmask_to_bool(buf[0], vocab)


def old_step(matchers, vocab: int, logits: torch.Tensor) -> torch.Tensor:
    """``LLMEngine._sample_and_emit``'s mask code as it was (the device copy is a no-op on CPU)."""
    masks = torch.ones(len(matchers), vocab, dtype=torch.bool)
    for i, m in enumerate(matchers):
        masks[i] = old_allowed_mask(m, vocab)
        if not masks[i].any():
            raise RuntimeError("the grammar allows no next token")
    return logits.masked_fill_(~masks, float("-inf"))


def new_step(guided: GuidedDecoding, matchers, vocab: int, logits: torch.Tensor) -> torch.Tensor:
    """``LLMEngine._guided_masks`` + the sampler's masked fill."""
    bitmask = allocate_bitmask(len(matchers), vocab)
    failed = guided.fill_batch([(m, i) for i, m in enumerate(matchers)], bitmask)
    if failed:
        raise RuntimeError(failed)
    return logits.masked_fill_(~bitmask_to_bool(bitmask, vocab), float("-inf"))


def time_parts(guided: GuidedDecoding, matchers, vocab: int, parts: dict[str, list[float]]) -> None:
    """The fill and the unpack separately (states already filled once this step, like the two paths)."""
    bitmask = allocate_bitmask(len(matchers), vocab)
    t = time.perf_counter()
    for i, m in enumerate(matchers):
        m.fill_bitmask(bitmask, i)
    parts["fill: old, per row"].append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    guided.fill_batch([(m, i) for i, m in enumerate(matchers)], bitmask)
    parts["fill: fill_batch"].append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    masks = torch.ones(len(matchers), vocab, dtype=torch.bool)
    for i in range(len(matchers)):
        masks[i] = old_bitmask_to_bool(bitmask[i], vocab)
    parts["unpack: per row, int32"].append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    bitmask_to_bool(bitmask, vocab)
    parts["unpack: batch, byte table"].append((time.perf_counter() - t) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = full_size_tokenizer()
    guided = GuidedDecoding(tok)
    print(f"vocabulary {tok.vocab_size} built in {time.perf_counter() - t0:.1f} s")
    vocab = tok.vocab_size
    matchers = [guided.matcher(SCHEMAS[i % len(SCHEMAS)]) for i in range(args.batch)]
    g = torch.Generator().manual_seed(0)
    old_ms, new_ms, grammar_ms = [], [], []
    parts: dict[str, list[float]] = {"fill: old, per row": [], "fill: fill_batch": [],
                                     "unpack: per row, int32": [], "unpack: batch, byte table": []}
    for step in range(args.steps):
        logits = torch.randn(args.batch, vocab, generator=g)
        a, b = logits.clone(), logits.clone()
        # llguidance's own work for the new states: the same calls in both paths, and cached by the matcher
        # after the first fill, so do it once here and time the two paths on equal terms after it
        t = time.perf_counter()
        guided.fill_batch([(m, i) for i, m in enumerate(matchers)], allocate_bitmask(len(matchers), vocab))
        grammar_ms.append((time.perf_counter() - t) * 1e3)
        order = (0, 1) if step % 2 else (1, 0)  # alternate which path runs first
        for which in order:
            t = time.perf_counter()
            if which == 0:
                old_step(matchers, vocab, a)
            else:
                new_step(guided, matchers, vocab, b)
            (old_ms if which == 0 else new_ms).append((time.perf_counter() - t) * 1e3)
        assert torch.equal(a, b), "the two paths masked differently"
        time_parts(guided, matchers, vocab, parts)
        for i, m in enumerate(matchers):
            if m.is_finished():  # restart a finished row so every step has a live grammar
                matchers[i] = guided.matcher(SCHEMAS[i % len(SCHEMAS)])
                continue
            m.accept(int(torch.multinomial(torch.softmax(b[i], -1), 1, generator=g)))
    warm = slice(3, None)

    def summary(xs: list[float]) -> str:
        xs = sorted(xs[warm])
        return f"min {xs[0]:.2f}  p10 {xs[len(xs) // 10]:.2f}  median {statistics.median(xs):.2f} ms/step"

    print(f"batch {args.batch}, {args.steps} steps (first 3 dropped), torch threads {torch.get_num_threads()}, "
          f"llguidance fill {'parallel pool' if guided.parallel else 'row by row in place'}")
    print(f"grammar work of a step (llguidance, fresh states, fill_batch): {summary(grammar_ms)}")
    print(f"old per-row path : {summary(old_ms)}")
    print(f"new batched path : {summary(new_ms)}")
    for name, xs in parts.items():
        print(f"  {name:<24}: {summary(xs)}")
    print(f"median ratio old/new: {statistics.median(old_ms[warm]) / statistics.median(new_ms[warm]):.1f}x; "
          "masks identical on every step")


if __name__ == "__main__":
    main()
