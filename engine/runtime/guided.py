"""Guided decoding: constrain generation to a JSON schema with ``llguidance``.

One :class:`GuidedDecoding` per tokenizer (build it once per engine; it is thread-safe to share).  It wraps
the Kimi ``tiktoken.Encoding`` into an ``llguidance.LLTokenizer`` (whose EOS is ``<|im_end|>``, the token
that ends an assistant turn) and compiles JSON schemas into grammars, with an LRU cache.  Each request gets
its own :class:`GrammarMatcher` (per-request state, *not* thread-safe: drive one matcher from one thread at
a time)::

    guided = GuidedDecoding(tokenizer)
    m = guided.matcher({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    while not m.is_finished():
        logits[~m.allowed_mask(logits.shape[-1])] = -inf     # or: fill_bitmask + apply_bitmask_
        tok = sample(logits)
        m.accept(tok)                                         # raises GrammarError if tok was not allowed

llguidance facts this relies on (llguidance 1.9.1; 1.8.0 / 1.9.0 pass the tests too; API from its ``_lib.pyi``):

* ``llguidance.tiktoken.lltokenizer_from_encoding(encoding, eos_token=...)`` builds the token trie from the
  encoding's mergeable ranks *and* special tokens.  Special tokens other than the EOS are never allowed by a
  JSON grammar.
* ``LLMatcher.grammar_from_json_schema(schema, defaults=...)`` never checks the schema;
  ``LLMatcher.validate_grammar(grammar, tokenizer)`` returns ``""`` or a readable message (``"Invalid type:
  foo"``, ``'Unimplemented keys: ["not"]'``, ``"Unsatisfiable schema: minimum (5) is greater than maximum
  (2)"``, regex errors, bad ``$ref`` ...).  Unknown *keywords* that llguidance does not implement are errors
  (``lenient`` is off), so a schema is never silently weakened.
* ``LLMatcher`` never raises for grammar / token errors: it enters a *sticky* error state (even ``reset()``
  does not clear it).  Hence :meth:`GrammarMatcher.accept` checks the token with ``validate_tokens`` (no
  state change) before ``consume_token``, so a rejected token leaves the matcher usable.
* Once the grammar is complete (``is_stopped()``) the mask allows the EOS only; consuming the EOS again is
  accepted, any other token is an error.  ``validate_tokens([eos])`` returns 0 even where EOS is allowed,
  so EOS is checked with ``is_accepting()``.
* The mask is a bitmask of ``ceil(n_vocab / 32)`` int32 words (bit ``i % 32`` of word ``i // 32`` = token
  ``i``); ``unsafe_compute_mask_ptr`` insists on exactly that many bytes.  Compiling a grammar is ~1 ms on
  the tiny vocabulary, ``LLMatcher.deep_copy`` ~1 us, so a compiled grammar keeps a pristine prototype
  matcher and every request gets a deep copy.
* The engine builds one step's masks batched: :meth:`GuidedDecoding.fill_batch` fills every guided row of
  the batch into one ``(B, ceil(V/32))`` int32 bitmask with one ``llguidance.numpy.fill_next_token_bitmask_par``
  call (llguidance's thread pool; row by row in place on machines where that pool would have a single thread);
  the bitmask (20 KiB a row at V = 163840, not a 160 KiB bool row) goes to the device in one copy and is
  unpacked and applied there for the whole batch at once.
* ``llguidance.torch.apply_token_bitmask_inplace`` is wrapped in ``torch.compile`` (needs a C++ toolchain on
  CPU and compiles on first use), so :func:`apply_bitmask_` / :func:`bitmask_to_bool` here unpack the bits
  with plain tensor ops (any device, same result).

Whitespace (our choice, see :data:`DEFAULT_JSON_OPTIONS`): llguidance's default lets ``[ \\t\\n\\r]+`` appear
between any two JSON tokens, so a random-weight (or badly behaved) model can emit whitespace forever.  We
pass ``whitespace_pattern="[ ]?"``: at most *one space* wherever JSON allows whitespace, no newlines / tabs.
That keeps both compact ``{"a":1}`` and ``json.dumps``-style ``{"a": 1, "b": [1, 2]}`` output possible while
bounding the output: a schema whose strings have ``maxLength``, arrays ``maxItems``, objects
``additionalProperties: false`` and integers bounds always terminates.  (Numbers with a fractional part are
never length-bounded by a schema.)  These are llguidance *defaults*: a schema's own ``"x-guidance"`` object
(llguidance's per-schema options, e.g. ``{"whitespace_flexible": false}`` for strictly compact JSON) overrides
them, and ``GuidedDecoding(..., json_options=...)`` replaces them engine-wide.

The one-space bound needs llguidance >= 1.8 (pyproject's floor): in 1.0 - 1.7.6 the whitespace pattern acts
as a repeatable ``%ignore`` lexeme, so ``"[ ]?"`` still allows unbounded runs of spaces (checked with each
release's wheel).  On such versions the default falls back to strictly compact JSON
(``{"whitespace_flexible": false}``: ``,`` and ``:`` with no whitespace at all).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import llguidance
import torch
from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par
from llguidance.tiktoken import lltokenizer_from_encoding

if TYPE_CHECKING:
    from engine.tokenizer import KimiTokenizer

__all__ = [
    "GrammarError",
    "GuidedDecoding",
    "CompiledGrammar",
    "GrammarMatcher",
    "DEFAULT_JSON_OPTIONS",
    "LLGUIDANCE_VERSION",
    "allocate_bitmask",
    "bitmask_to_bool",
    "apply_bitmask_",
    "bitmask_words",
]

logger = logging.getLogger(__name__)



def _llguidance_version() -> tuple[int, int]:
    try:
        major, minor = importlib.metadata.version("llguidance").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - unknown version: assume old
        return (0, 0)


LLGUIDANCE_VERSION = _llguidance_version()

# llguidance JsonCompileOptions applied as *defaults* (a schema's "x-guidance" overrides them).  Below 1.8
# (outside pyproject's range, e.g. an environment pinned by another package) "[ ]?" would not bound
# whitespace, so fall back to strictly compact JSON ("," and ":" with no whitespace at all).
DEFAULT_JSON_OPTIONS: dict[str, Any] = (
    {"whitespace_pattern": "[ ]?"} if LLGUIDANCE_VERSION >= (1, 8) else {"whitespace_flexible": False}
)

_MAX_MESSAGE_CHARS = 600


class GrammarError(ValueError):
    """An invalid / unsupported JSON schema, or a token the grammar does not allow."""


def _short(msg: str) -> str:
    msg = (msg or "").strip()
    # llguidance's matcher errors append a verbose "<state>...<grammar>..." dump; keep the first part.
    cut = msg.find("\n<state>")
    if cut > 0:
        msg = msg[:cut]
    return msg if len(msg) <= _MAX_MESSAGE_CHARS else msg[:_MAX_MESSAGE_CHARS] + " ..."


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words of a token bitmask covering ``vocab_size`` ids."""
    return (int(vocab_size) + 31) // 32


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A ``(batch_size, ceil(vocab_size/32))`` int32 CPU bitmask, all bits set (= no constraint).

    Pinned when CUDA is available so the copy to the GPU can be asynchronous.  Rows of unconstrained
    requests stay all ``-1``; constrained rows are overwritten by :meth:`GrammarMatcher.fill_bitmask`.
    """
    shape = (int(batch_size), bitmask_words(vocab_size))
    pin = torch.cuda.is_available()
    try:
        return torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
    except RuntimeError:  # pinning can fail (no driver / out of pinned memory)
        return torch.full(shape, -1, dtype=torch.int32)


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """``(256, 8)`` uint8 table: row ``b`` holds the bits of byte ``b``, lowest first (one per device)."""
    table = _BYTE_BITS.get(device)
    if table is None:
        table = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(torch.uint8).to(device)
        _BYTE_BITS[device] = table
    return table


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack an int32 bitmask ``(..., W)`` into a bool mask ``(..., vocab_size)`` on the bitmask's device.

    Ids at or beyond ``32 * W`` (vocabulary padding not covered by the bitmask) are ``False``.  Unpacked by
    a byte -> 8 bits table lookup (token ``t`` is bit ``t % 8`` of byte ``t // 8`` of the little-endian int32
    array): one gather with one byte of output per token, ~3x faster on CPU than shifting int32 words.
    """
    if bitmask.dtype != torch.int32:
        raise TypeError(f"bitmask must be int32, got {bitmask.dtype}")
    if sys.byteorder == "little":
        raw = bitmask.contiguous().view(torch.uint8)  # (..., 4 * W)
        flat = _byte_bits(raw.device).index_select(0, raw.reshape(-1).long())  # (numel, 8)
        bits = flat.view(torch.bool).view(*raw.shape[:-1], raw.shape[-1] * 8)  # (..., 32 * W)
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
        bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)
    n = bits.shape[-1]
    if vocab_size <= n:
        return bits[..., :vocab_size]
    pad = torch.zeros(*bits.shape[:-1], vocab_size - n, dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=-1)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set disallowed logits to ``-inf`` in place.

    ``logits`` ``(B, V)`` or ``(V,)``; ``bitmask`` ``(B, W)`` or ``(W,)`` int32.

    The bitmask is moved to the logits' device (non-blocking; allocate it pinned with :func:`allocate_bitmask`).
    """
    allowed = bitmask_to_bool(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    if allowed.shape != logits.shape:
        raise ValueError(f"bitmask covers shape {tuple(allowed.shape)}, logits are {tuple(logits.shape)}")
    return logits.masked_fill_(~allowed, float("-inf"))


@dataclass(eq=False)
class CompiledGrammar:
    """A validated llguidance grammar plus a pristine matcher that requests deep-copy."""

    key: str  # canonical JSON of the schema (cache key)
    grammar: str  # llguidance grammar (JSON text)
    warnings: list[str]
    _prototype: "llguidance.LLMatcher" = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def new_ll_matcher(self) -> "llguidance.LLMatcher":
        with self._lock:
            return self._prototype.deep_copy()


class GuidedDecoding:
    """Per-tokenizer JSON-schema guided decoding.  Thread-safe to share across requests / threads."""

    def __init__(
        self,
        tokenizer: "KimiTokenizer",
        *,
        cache_size: int = 256,
        json_options: dict[str, Any] | None = None,
        limits: "llguidance.LLParserLimits | None" = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = int(tokenizer.im_end_id)
        # The encoding carries the mergeable ranks *and* all 256 reserved special tokens.
        self.ll_tokenizer = lltokenizer_from_encoding(tokenizer.encoding, eos_token=self.eos_token_id)
        self.vocab_size = int(self.ll_tokenizer.vocab_size)
        if self.vocab_size != tokenizer.vocab_size:
            raise RuntimeError(
                f"llguidance tokenizer has {self.vocab_size} ids, KimiTokenizer {tokenizer.vocab_size}"
            )
        self.n_words = bitmask_words(self.vocab_size)
        self.json_options = dict(DEFAULT_JSON_OPTIONS if json_options is None else json_options)
        self.limits = limits
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None
        # llguidance's pool gets 80% of the CPUs: with fewer than 2 threads a "parallel" fill is one hand-off
        # to one pool thread (measured slower than filling in place on the 2-core box, bench/RESULTS.md)
        self.parallel = int(0.8 * (os.cpu_count() or 1)) >= 2

    # -- compilation ----------------------------------------------------------------------------------------
    @staticmethod
    def canonical_key(schema: Any) -> str:
        """Whitespace-free JSON of the schema.  Key order is kept: it fixes the order of generated properties."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"invalid JSON schema: not valid JSON text ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"invalid JSON schema: expected an object (dict), got {type(schema).__name__}")
        try:
            return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"invalid JSON schema: not JSON-serializable ({e})") from None

    def compile(self, schema: dict) -> CompiledGrammar:
        """Validate and compile ``schema`` (cached by :meth:`canonical_key`, LRU).  Raises :class:`GrammarError`."""
        key = self.canonical_key(schema)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(key)  # outside the lock: llguidance drops the GIL while building
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:  # compiled concurrently by another thread; keep the first
                self._cache.move_to_end(key)
                return hit
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, key: str) -> CompiledGrammar:
        LLM = llguidance.LLMatcher
        try:
            grammar = LLM.grammar_from_json_schema(key, defaults=self.json_options or None)
        except ValueError as e:  # only raised for non-JSON input, which canonical_key already excludes
            raise GrammarError(f"invalid JSON schema: {_short(str(e))}") from None
        kw = {} if self.limits is None else {"limits": self.limits}
        is_error, messages = LLM.validate_grammar_with_warnings(grammar, self.ll_tokenizer, **kw)
        if is_error:
            raise GrammarError(f"invalid or unsupported JSON schema: {_short(messages[0] if messages else '')}")
        if messages:
            logger.warning("JSON schema grammar warnings: %s", "; ".join(messages))
        proto = LLM(self.ll_tokenizer, grammar, log_level=0, **kw)
        if proto.is_error():
            raise GrammarError(f"invalid or unsupported JSON schema: {_short(proto.get_error())}")
        return CompiledGrammar(key=key, grammar=grammar, warnings=list(messages), _prototype=proto)

    def matcher(self, schema: dict | CompiledGrammar) -> "GrammarMatcher":
        """A fresh per-request matcher for ``schema`` (a schema dict or an already compiled grammar)."""
        compiled = schema if isinstance(schema, CompiledGrammar) else self.compile(schema)
        return GrammarMatcher(self, compiled, compiled.new_ll_matcher())

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "max_size": self.cache_size}

    # -- batched mask -----------------------------------------------------------------------------------------
    def fill_bitmasks(self, rows: Sequence[tuple["GrammarMatcher", int]], bitmask: torch.Tensor) -> None:
        """Fill several rows of ``bitmask`` at once (see :meth:`fill_batch`).

        ``rows``: ``(matcher, row)`` pairs; rows not listed are left untouched.  Same contract as
        :meth:`GrammarMatcher.fill_bitmask`; raises :class:`GrammarError` if a matcher failed.
        """
        errors = self.fill_batch(rows, bitmask, check_empty=False)
        if errors:
            raise GrammarError(next(iter(errors.values())))

    def fill_batch(
        self, rows: Sequence[tuple["GrammarMatcher", int]], bitmask: torch.Tensor, *, check_empty: bool = True
    ) -> dict[int, str]:
        """The engine's per-step mask: every guided row of a batch into one bitmask, by one parallel llguidance
        call (``llguidance.numpy.fill_next_token_bitmask_par`` on a view of the tensor: the ``llguidance.torch``
        twin is the same call but imports ``torch._dynamo``, 1.5 s, for its compiled apply), or row by row in
        place (``fill_next_token_bitmask``) where llguidance's pool would have a single thread.

        Returns ``{row: message}`` for rows whose matcher failed or (``check_empty``) allows no token at all,
        instead of raising, so one broken request never fails the others.
        """
        rows = list(rows)
        if not rows:
            return {}
        _check_bitmask(bitmask, self.n_words)
        for m, _ in rows:
            if m.guided is not self:
                raise ValueError("matcher belongs to another GuidedDecoding")
        if self._executor is None and self.parallel:
            with self._lock:
                if self._executor is None:
                    self._executor = llguidance.LLExecutor()
        if bitmask.shape[1] == self.n_words:
            target = bitmask
            pairs = [(m._m, int(r)) for m, r in rows]
        else:  # padded model vocabulary: llguidance writes rows of exactly n_words words; copy them over
            target = torch.empty((len(rows), self.n_words), dtype=torch.int32)
            pairs = [(m._m, i) for i, (m, _) in enumerate(rows)]
        words = target.numpy()  # a view: llguidance fills ``target`` in place
        if self.parallel and len(pairs) > 1:
            fill_next_token_bitmask_par(self._executor, pairs, words)
        else:
            for ll_matcher, i in pairs:
                fill_next_token_bitmask(ll_matcher, words, i)
        if target is not bitmask:
            index = torch.tensor([int(r) for _, r in rows], dtype=torch.long)
            bitmask[index, : self.n_words] = target
            bitmask[index, self.n_words:] = 0
        errors: dict[int, str] = {}
        # numpy, not torch: no intra-op thread pool for a 20 KiB-per-row check
        empty = (~words[[i for _, i in pairs]].any(axis=1)).tolist() if check_empty else [False] * len(rows)
        for (m, r), none_allowed in zip(rows, empty):
            if m._m.is_error():
                errors[int(r)] = f"grammar matcher failed: {_short(m._m.get_error())}"
            elif none_allowed:
                errors[int(r)] = "the grammar allows no next token"
        return errors


def _check_bitmask(bitmask: torch.Tensor, n_words: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"bitmask must be a 2-D int32 tensor, got {bitmask.dtype} with shape {tuple(bitmask.shape)}")
    if bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("bitmask must be a contiguous CPU tensor (see allocate_bitmask)")
    if bitmask.shape[1] < n_words:
        raise ValueError(f"bitmask has {bitmask.shape[1]} words per row; the tokenizer needs {n_words}")


class GrammarMatcher:
    """Per-request grammar state.  Not thread-safe: one thread at a time."""

    def __init__(self, guided: GuidedDecoding, compiled: CompiledGrammar, ll_matcher: "llguidance.LLMatcher"):
        self.guided = guided
        self.compiled = compiled
        self._m = ll_matcher
        self.eos_token_id = guided.eos_token_id
        self.num_accepted = 0

    # -- masks ---------------------------------------------------------------------------------------------
    def _raise_if_error(self) -> None:
        if self._m.is_error():
            raise GrammarError(f"grammar matcher failed: {_short(self._m.get_error())}")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the next-token bitmask into ``bitmask[row]`` (int32, contiguous, CPU, >= ceil(n_vocab/32) words).

        Words beyond the tokenizer's vocabulary (model embedding padding) are zeroed.  Use with
        :func:`allocate_bitmask` and :func:`apply_bitmask_`.
        """
        n = self.guided.n_words
        _check_bitmask(bitmask, n)
        view = bitmask[row, :n]
        self._m.unsafe_compute_mask_ptr(view.data_ptr(), n * 4)
        if bitmask.shape[1] > n:
            bitmask[row, n:] = 0
        self._raise_if_error()

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool ``(vocab_size,)``: True = allowed next token.  Ids >= the tokenizer's vocabulary are False.

        Once the grammar is complete only the EOS (``<|im_end|>``) is allowed.
        """
        if vocab_size < self.guided.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} < tokenizer vocabulary {self.guided.vocab_size}")
        buf = torch.empty((1, self.guided.n_words), dtype=torch.int32)
        self.fill_bitmask(buf, 0)
        return bitmask_to_bool(buf[0], vocab_size)

    # -- state -----------------------------------------------------------------------------------------------
    def accept(self, token_id: int) -> None:
        """Advance by one sampled token.  Raises :class:`GrammarError` (state unchanged) if it is not allowed."""
        t = int(token_id)
        if not 0 <= t < self.guided.vocab_size:
            raise GrammarError(f"token id {t} is outside the tokenizer vocabulary [0, {self.guided.vocab_size})")
        self._raise_if_error()
        # validate_tokens() reports 0 for the EOS even where it is allowed (llguidance 1.9.1), so check EOS
        # against is_accepting() instead.
        # After completion only EOS may follow; don't even ask (validate_tokens on a stopped matcher puts
        # llguidance 1.0 into its sticky error state).
        if t == self.eos_token_id:
            ok = self._m.is_accepting()
        else:
            ok = not self._m.is_stopped() and self._m.validate_tokens([t]) == 1
        if not ok:
            raise GrammarError(f"token {t} ({self._describe(t)}) is not allowed by the grammar here")
        if not self._m.consume_token(t):
            raise GrammarError(f"grammar matcher rejected token {t}: {_short(self._m.get_error())}")
        self.num_accepted += 1

    def accept_many(self, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.accept(t)

    def is_finished(self) -> bool:
        """True once the grammar is complete: only EOS can follow (or EOS was accepted)."""
        return self._m.is_stopped() and not self._m.is_error()

    def is_accepting(self) -> bool:
        """True when EOS is allowed now (the output so far is a complete document)."""
        return self._m.is_accepting()

    def is_error(self) -> bool:
        return self._m.is_error()

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (e.g. rejected speculative tokens)."""
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} accepted tokens")
        if num_tokens and not self._m.rollback(num_tokens):
            raise GrammarError(f"rollback failed: {_short(self._m.get_error())}")
        self.num_accepted -= num_tokens

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (fast-forward); empty if the next token is not determined."""
        return list(self._m.compute_ff_tokens())

    def _describe(self, t: int) -> str:
        try:
            return repr(self.guided.tokenizer.decode([t]))
        except Exception:  # noqa: BLE001 - only for the error message
            return "?"
