"""Incremental detokenizer for streaming: token ids -> (answer text, reasoning text), with stop strings.

One :class:`IncrementalDetokenizer` per request.  Each :meth:`~IncrementalDetokenizer.feed` takes the newly
sampled token ids and returns only text that is *final* - it will never be revised by later tokens;
:meth:`~IncrementalDetokenizer.finish` flushes what was held back when generation ends by length / EOS.

Pipeline (each stage works on the new characters only, so a feed costs O(new tokens), independent of how long
the output already is)::

    ids --StreamDecoder--> chars --thinking split--> reasoning chars
                                                 \\-> answer chars --stop matcher--> answer text

1. **Bytes -> characters** through :class:`engine.tokenizer.StreamDecoder` (byte-level, incremental UTF-8):
   a character whose bytes are split across tokens is emitted once complete, never as U+FFFD.  Bytes that can
   never form a valid character become U+FFFD exactly as a one-shot ``tokenizer.decode`` would; an incomplete
   sequence still pending at :meth:`finish` becomes U+FFFD as well.  With ``skip_special_tokens`` special
   tokens (``tokenizer.is_special``) contribute no text; otherwise their names (``<|im_end|>``...) are text.

2. **Thinking split** (only with ``split_reasoning=True``).  Kimi-VL Thinking models write
   ``◁think▷ reasoning ◁/think▷ answer``; the markers are plain text (often split over several tokens):

   * The output is a think block only if, after optional leading whitespace, it *starts* with ``◁think▷``
     (held back while the text so far could still become the marker).  Otherwise everything is answer text
     and any marker in it is emitted verbatim.
   * ``reasoning_started=True``: the generation prompt already opened the block, so the text starts inside
     the reasoning (a redundant leading ``◁think▷`` is still swallowed).
   * Inside the block, text goes to ``reasoning_text`` until the first ``◁/think▷``; the text after it is
     answer.  A partial end marker at the end of the pending text is held back.  Later markers (a second
     block) are answer text, emitted verbatim - a streamer cannot know which ``◁/think▷`` is the last one,
     unlike :func:`engine.tokenizer.split_thinking`, which splits at the last.
   * Markers are never emitted.  Whitespace is trimmed like ``split_thinking`` does at the edges of the
     reasoning and at the start of the answer (trailing whitespace of the reasoning is held back until
     non-whitespace follows); the answer's *trailing* whitespace is kept, because a stream cannot know where
     the answer ends.  So for an output with at most one ``◁/think▷`` and no stop string,
     ``(full_reasoning, full_text.rstrip()) == split_thinking(decoded)`` whenever the block is opened by
     the output itself.
   * If the block is never closed, :meth:`finish` releases the rest as reasoning (the answer stays empty),
     again as ``split_thinking`` does for unfinished reasoning.

   Without ``split_reasoning`` the text is passed through verbatim (markers included) as answer text.

3. **Stop strings** are matched on the *answer* text only (after the thinking split and the answer's leading
   whitespace trim) - a stop string inside the reasoning does not stop the generation.  They may span any
   number of tokens: the longest suffix of the pending answer text that is a prefix of some stop string is
   held back.  Semantics are character-level and independent of how the ids are chunked into feeds: the
   generation stops at the *first position where some stop string ends*; if several end there the longest
   one is taken.  The answer is cut at the start of that match (the stop string itself is excluded, as in
   the OpenAI API); ``stopped`` becomes True and stays True, and everything fed afterwards is ignored (the
   runtime finishes the request with ``finish_reason="stop"``).  :attr:`IncrementalDetokenizer.stop_reason`
   holds the matched string.  A held-back prefix that never completes is released by :meth:`finish`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from engine.tokenizer import THINK_END, THINK_START, KimiTokenizer, StreamDecoder

__all__ = ["DetokenizerOutput", "IncrementalDetokenizer"]


@dataclass
class DetokenizerOutput:
    text: str = ""  # new answer text, safe to emit now
    reasoning_text: str = ""  # new reasoning text (Thinking models), safe to emit now
    stopped: bool = False  # a stop string matched (now or earlier): finish the request with "stop"


def _partial_suffix_len(text: str, pattern: str) -> int:
    """Length of the longest proper suffix of ``text`` that is a prefix of ``pattern`` (0 if none)."""
    for k in range(min(len(text), len(pattern) - 1), 0, -1):
        if pattern.startswith(text[-k:]):
            return k
    return 0


class _StopMatcher:
    """Holds back possible stop-string prefixes; finds the first stop string that ends in the text."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = sorted(set(stops), key=len, reverse=True)  # longest first: ties at one end -> longest
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.first_chars = {s[0] for s in self.stops}
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns ``(text safe to emit, matched stop string or None)``."""
        if not self.stops:
            return text, None
        buf = self._held + text
        # Earliest match end.  The held part holds no complete stop string, so a match ends in the new text;
        # str.find gives each string's earliest start, hence its earliest end (O(len(buf)) per stop string).
        best_end, best = None, None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best_end is None or i + len(s) < best_end):
                best_end, best = i + len(s), s
        if best is not None:
            self._held = ""
            return buf[: best_end - len(best)], best
        # hold back the longest suffix that is a prefix of some stop string
        cut = len(buf)
        for q in range(max(0, len(buf) - self.max_len + 1), len(buf)):
            if buf[q] in self.first_chars:
                tail = buf[q:]
                if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                    cut = q
                    break
        self._held = buf[cut:]
        return buf[:cut], None

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


_START, _REASONING, _ANSWER = "start", "reasoning", "answer"


class _ThinkSplitter:
    """``◁think▷ R ◁/think▷ A`` -> reasoning / answer pieces, with held-back partial markers (see module doc)."""

    def __init__(self, reasoning_started: bool) -> None:
        self.state = _START
        self.fallback = _REASONING if reasoning_started else _ANSWER  # where non-marker text at the start goes
        self._start_buf = ""  # non-whitespace-leading text that may still become THINK_START
        self._tail = ""  # reasoning: partial THINK_END at the end
        self._ws = ""  # reasoning: trailing whitespace held back (dropped if the block ends here)
        self._reasoning_begun = False  # reasoning: non-whitespace emitted already (else leading ws is dropped)
        self._answer_begun = False  # answer: non-whitespace seen (else leading ws is dropped)

    def push(self, text: str) -> tuple[str, str]:
        """Returns ``(reasoning, answer)`` text safe to emit."""
        if self.state == _START:
            if not self._start_buf:
                text = text.lstrip()
                if not text:
                    return "", ""
            buf = self._start_buf + text
            if buf.startswith(THINK_START):
                self._start_buf = ""
                self.state = _REASONING
                return self._push_reasoning(buf[len(THINK_START):])
            if THINK_START.startswith(buf):
                self._start_buf = buf
                return "", ""
            self._start_buf = ""
            self.state = self.fallback
            text = buf
        if self.state == _REASONING:
            return self._push_reasoning(text)
        return "", self._push_answer(text)

    def _push_reasoning(self, text: str) -> tuple[str, str]:
        buf = self._tail + text
        i = buf.find(THINK_END)
        if i >= 0:
            body = buf[:i].rstrip()
            reasoning = self._emit_reasoning(body) if body else ""
            self._tail = self._ws = ""
            self.state = _ANSWER
            return reasoning, self._push_answer(buf[i + len(THINK_END):])
        k = _partial_suffix_len(buf, THINK_END)
        body, self._tail = buf[: len(buf) - k], buf[len(buf) - k:]
        stripped = body.rstrip()
        if not stripped:  # whitespace only: hold it (it may turn out to be trailing)
            self._ws += body
            return "", ""
        out = self._emit_reasoning(stripped)
        self._ws = body[len(stripped):]
        return out, ""

    def _emit_reasoning(self, body: str) -> str:
        """``body`` is non-empty and ends in non-whitespace; prepend the held whitespace unless leading."""
        if self._reasoning_begun:
            out = self._ws + body
        else:
            out = body.lstrip()
            if not out:
                return ""
            self._reasoning_begun = True
        self._ws = ""
        return out

    def _push_answer(self, text: str) -> str:
        if not self._answer_begun:
            text = text.lstrip()
            if text:
                self._answer_begun = True
        return text

    def flush(self) -> tuple[str, str]:
        """End of text: release held partial markers (whitespace trailing the reasoning is dropped)."""
        if self.state == _START:
            buf, self._start_buf = self._start_buf, ""
            if not buf:
                return "", ""
            self.state = self.fallback
            if self.state == _ANSWER:
                return "", self._push_answer(buf)
            return self._emit_reasoning(buf), ""  # buf: a proper prefix of THINK_START, no whitespace edges
        if self.state == _REASONING:
            tail, self._tail = self._tail, ""
            out = self._emit_reasoning(tail) if tail else ""  # tail: a proper prefix of THINK_END
            self._ws = ""
            return out, ""
        return "", ""


class IncrementalDetokenizer:
    """Streams one request's output: see the module docstring for the exact semantics.

    ``stop``: stop strings (matched on the answer text only; empty strings are ignored).
    ``skip_special_tokens``: special tokens produce no text.  ``split_reasoning``: split Kimi-VL Thinking
    output into ``reasoning_text`` / ``text``.  ``reasoning_started``: the prompt already opened ``◁think▷``.
    """

    def __init__(
        self,
        tokenizer: KimiTokenizer,
        stop: Iterable[str] = (),
        skip_special_tokens: bool = True,
        split_reasoning: bool = False,
        reasoning_started: bool = False,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.split_reasoning = split_reasoning
        self.reasoning_started = reasoning_started
        self._decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self._splitter = _ThinkSplitter(reasoning_started) if split_reasoning else None
        self._matcher = _StopMatcher(self.stop)
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._stop_reason: str | None = None
        self._finished = False

    # -- state --------------------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        """A stop string matched; later feeds are ignored."""
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop_reason

    @property
    def finished(self) -> bool:
        """:meth:`finish` was called or a stop string matched: nothing more will be emitted."""
        return self._finished or self.stopped

    @property
    def full_text(self) -> str:
        """All answer text emitted so far."""
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

    @property
    def full_reasoning(self) -> str:
        """All reasoning text emitted so far."""
        if len(self._reasoning) > 1:
            self._reasoning = ["".join(self._reasoning)]
        return self._reasoning[0] if self._reasoning else ""

    # -- streaming ----------------------------------------------------------------------------------------
    def feed(self, token_ids: Sequence[int] | int) -> DetokenizerOutput:
        """Consume newly generated ids; return the text that became final.  Ignored (empty) after a stop."""
        if self.stopped:
            return DetokenizerOutput(stopped=True)
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if isinstance(token_ids, int):  # the engine's per-step call: one id, no join
            return self._process(self._decoder.feed(token_ids), final=False)
        return self._process(self._decoder.feed_many(token_ids), final=False)

    def finish(self) -> DetokenizerOutput:
        """End of generation (length / EOS): flush everything held back.  Idempotent."""
        if self.stopped or self._finished:
            return DetokenizerOutput(stopped=self.stopped)
        out = self._process(self._decoder.flush(), final=True)
        self._finished = True
        return out

    def _process(self, chars: str, final: bool) -> DetokenizerOutput:
        if self._splitter is not None:
            reasoning, answer = self._splitter.push(chars) if chars else ("", "")
            if final:
                r2, a2 = self._splitter.flush()
                reasoning, answer = reasoning + r2, answer + a2
        else:
            reasoning, answer = "", chars
        text, matched = self._matcher.push(answer) if answer else ("", None)
        if matched is not None:
            self._stop_reason = matched
        elif final:
            text += self._matcher.flush()
        if reasoning:
            self._reasoning.append(reasoning)
        if text:
            self._text.append(text)
        return DetokenizerOutput(text=text, reasoning_text=reasoning, stopped=self.stopped)
