"""IncrementalDetokenizer: UTF-8 safety, stop strings across tokens, Thinking split (CPU, tiny tokenizer)."""

from __future__ import annotations

import random
import time

import pytest

from engine.runtime.detokenizer import DetokenizerOutput, IncrementalDetokenizer
from engine.tiny_tokenizer import write_tiny_tokenizer
from engine.tokenizer import THINK_END, THINK_START, KimiTokenizer, split_thinking


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> KimiTokenizer:
    d = tmp_path_factory.mktemp("tiny_tok_detok")
    write_tiny_tokenizer(d)
    return KimiTokenizer.from_pretrained(d)


# --------------------------------------------------------------------------------------------------------
# Helpers: an independent one-shot reference and streaming drivers
# --------------------------------------------------------------------------------------------------------
def ref_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Character-level reference: cut at the first position where a stop string ends (longest on ties)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[: end - len(s)], s
    return text, None


def ref_split(text: str, reasoning_started: bool) -> tuple[str, str]:
    """(reasoning, answer) for a whole output, per the module's documented rules."""
    s = text.lstrip()
    inside = reasoning_started
    if s.startswith(THINK_START):
        s, inside = s[len(THINK_START):], True
    if not inside:
        return "", s
    reasoning, sep, answer = s.partition(THINK_END)
    return reasoning.strip(), answer.lstrip() if sep else ""


def reference(text, stops=(), split=False, started=False):
    reasoning, answer = ref_split(text, started) if split else ("", text)
    answer, matched = ref_stop(answer, list(stops))
    return reasoning, answer, matched


def tokens_spanned(tok, ids: list[int], start: int, length: int) -> int:
    """How many tokens of ``ids`` cover the characters ``[start, start + length)`` of the decoded text."""
    n, prev = 0, ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1])
        if not cur.endswith("\ufffd"):
            lo, hi = len(prev), len(cur)
            if lo < start + length and hi > start:
                n += 1
            prev = cur
    return n


def chunks(ids: list[int], rng: random.Random | None, max_chunk: int = 5) -> list[list[int]]:
    if rng is None:
        return [[t] for t in ids]
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(0, max_chunk)  # empty feeds too
        out.append(ids[i:i + n])
        i += n
    return out


def stream(tok, ids, rng=None, finish=True, **kw):
    """Feed ``ids`` in chunks; return (detok, outputs, text, reasoning) with text/reasoning concatenated."""
    d = IncrementalDetokenizer(tok, **kw)
    outs = [d.feed(c) for c in chunks(ids, rng)]
    if finish:
        outs.append(d.finish())
    text = "".join(o.text for o in outs)
    reasoning = "".join(o.reasoning_text for o in outs)
    assert text == d.full_text and reasoning == d.full_reasoning
    return d, outs, text, reasoning


def check_all_chunkings(tok, ids, expected_text, expected_reasoning="", n_random=8, **kw):
    for rng in [None] + [random.Random(seed) for seed in range(n_random)]:
        _, _, text, reasoning = stream(tok, ids, rng, **kw)
        assert (reasoning, text) == (expected_reasoning, expected_text), f"rng={rng and rng.random()}"


# --------------------------------------------------------------------------------------------------------
# Plain text / UTF-8
# --------------------------------------------------------------------------------------------------------
PLAIN = "The quick brown fox 🎉🎉 jumps; 今天天气很好 こんにちは Привет Zürich ❤️ x^2 + y^2 = z^2\n\tdone"


def test_plain_equals_one_shot_decode(tok):
    ids = tok.encode(PLAIN)
    assert tok.decode(ids) == PLAIN
    check_all_chunkings(tok, ids, PLAIN)


def test_multibyte_characters_split_across_tokens_never_emit_half(tok):
    text = "🎉 今天天气 日本語 ✓ 🚀"
    ids = tok.encode(text)
    # the tiny vocabulary really splits characters over several tokens
    assert any(len(tok.token_bytes(t).decode("utf-8", errors="ignore")) < 1 for t in ids)
    d, outs, got, _ = stream(tok, ids)
    assert got == text
    for o in outs:
        assert "\ufffd" not in o.text
    # the first byte of an emoji alone yields nothing; the character appears once complete
    emoji = list("🎉".encode())
    d = IncrementalDetokenizer(tok)
    assert [d.feed([b]).text for b in emoji] == ["", "", "", "🎉"]


def test_invalid_bytes_match_one_shot_decode(tok):
    rng = random.Random(0)
    ids = [rng.randrange(tok.num_base_tokens) for _ in range(400)] + [0xF0, 0x9F]  # ends mid-character
    expected = tok.decode(ids)
    assert "\ufffd" in expected
    check_all_chunkings(tok, ids, expected)


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("Hello 今") + [tok.im_end_id] + tok.encode("天 world") + [tok.eos_id]
    check_all_chunkings(tok, ids, tok.decode(ids, skip_special_tokens=True))
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 今天 world"
    check_all_chunkings(tok, ids, tok.decode(ids), skip_special_tokens=False)
    assert "<|im_end|>" in tok.decode(ids)
    # a special token between the bytes of one character does not break it when skipped
    b = list("天".encode())
    ids = [b[0], tok.im_end_id, b[1], b[2]]
    check_all_chunkings(tok, ids, "天")


def test_output_type_and_int_feed(tok):
    d = IncrementalDetokenizer(tok)
    out = d.feed(ord("a"))
    assert isinstance(out, DetokenizerOutput) and out == DetokenizerOutput("a", "", False)
    assert d.finish() == DetokenizerOutput("", "", False)
    assert d.finish() == DetokenizerOutput("", "", False)  # idempotent
    with pytest.raises(RuntimeError):
        d.feed([1])


# --------------------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------------------
def test_stop_string_spanning_tokens(tok):
    text = "abcabc stop STOP more text"
    ids = tok.encode(text)
    for stop in ["STOP", " stop", "c st", "abc s"]:
        assert tokens_spanned(tok, ids, text.index(stop), len(stop)) >= 2
        expected = text[: text.index(stop)]
        check_all_chunkings(tok, ids, expected, stop=[stop])
        d, outs, got, _ = stream(tok, ids, stop=[stop])
        assert d.stopped and d.stop_reason == stop and outs[-1].stopped and got == expected


def test_stop_string_held_back_until_decided(tok):
    ids = tok.encode("abcabc stop STOP")
    d = IncrementalDetokenizer(tok, stop=["STOP"])
    emitted = ""
    for t in ids:
        o = d.feed([t])
        emitted += o.text
        assert "S" not in emitted  # " S" is held while it may begin "STOP"; then "STOP" is cut
    assert emitted == "abcabc stop " and d.stopped


def test_stop_at_very_start(tok):
    ids = tok.encode("STOP and then some")
    for rng in [None, random.Random(1)]:
        d, outs, text, _ = stream(tok, ids, rng, finish=False, stop=["STOP"])
        assert text == "" and d.stopped and d.stop_reason == "STOP"
    d = IncrementalDetokenizer(tok, stop=["ab"])
    out = d.feed(tok.encode("ab"))
    assert out == DetokenizerOutput("", "", True)


def test_overlapping_stop_candidates(tok):
    ids = tok.encode("xabcd")
    # "ab" ends first -> cut there, even though "abc" also matches later
    check_all_chunkings(tok, ids, "x", stop=["abc", "ab"])
    d, *_ = stream(tok, ids, stop=["abc", "ab"])
    assert d.stop_reason == "ab"
    # both end at the same character -> the longest one is cut
    check_all_chunkings(tok, ids, "x", stop=["bc", "abc"])
    d, *_ = stream(tok, ids, stop=["bc", "abc"])
    assert d.stop_reason == "abc"
    # "bc" ends before "abcd" completes -> stop at "bc" whatever the chunking
    check_all_chunkings(tok, ids, "xa", stop=["abcd", "bc"])
    # a candidate that fails ("abx") must not hide a later real one
    ids = tok.encode("ababx abc")
    check_all_chunkings(tok, ids, "ababx ", stop=["abc"])
    check_all_chunkings(tok, tok.encode("aaab"), "a", stop=["aab"])


def test_unfinished_stop_prefix_released_at_finish(tok):
    ids = tok.encode("hello wor")
    d = IncrementalDetokenizer(tok, stop=["world", "lo!"])
    text = "".join(d.feed([t]).text for t in ids)
    assert text == "hello "  # "wor" held back ("lo" was held too until " " arrived)
    out = d.finish()
    assert out == DetokenizerOutput("wor", "", False)
    assert d.full_text == "hello wor" and not d.stopped
    check_all_chunkings(tok, ids, "hello wor", stop=["world"])


def test_nothing_emitted_after_stop(tok):
    ids = tok.encode("one two END three four 🎉")
    d = IncrementalDetokenizer(tok, stop=["END"])
    outs = [d.feed([t]) for t in ids]
    stop_at = next(i for i, o in enumerate(outs) if o.stopped)
    assert all(o.stopped for o in outs[stop_at:])
    assert all(o.text == "" and o.reasoning_text == "" for o in outs[stop_at + 1:])
    assert d.full_text == "one two "
    assert d.feed(tok.encode("more")) == DetokenizerOutput("", "", True)
    assert d.finish() == DetokenizerOutput("", "", True)
    assert d.full_text == "one two " and d.finished


def test_empty_stop_strings_ignored(tok):
    check_all_chunkings(tok, tok.encode("abc"), "abc", stop=["", "zz"])
    assert IncrementalDetokenizer(tok, stop="b").stop == ["b"]


# --------------------------------------------------------------------------------------------------------
# Thinking split
# --------------------------------------------------------------------------------------------------------
THOUGHT = f"{THINK_START}Let me think: 今天天气 is 🎉.  \n{THINK_END}\n\nThe answer is 42. 🚀"


def test_thinking_split_markers_across_tokens(tok):
    ids = tok.encode(THOUGHT)
    # markers are plain text split over several tokens by the tiny vocabulary
    assert len(tok.encode(THINK_START)) >= 3 and len(tok.encode(THINK_END)) >= 3
    expected_reasoning, expected_text = "Let me think: 今天天气 is 🎉.", "The answer is 42. 🚀"
    check_all_chunkings(tok, ids, expected_text, expected_reasoning, split_reasoning=True)
    d, outs, text, reasoning = stream(tok, ids, split_reasoning=True)
    assert (reasoning, text.rstrip()) == split_thinking(THOUGHT)
    for o in outs:  # markers and their fragments are never emitted
        assert "◁" not in o.text + o.reasoning_text and "▷" not in o.text + o.reasoning_text
        assert "\ufffd" not in o.text + o.reasoning_text
    # the answer starts only after the end marker is complete
    first_answer = next(i for i, o in enumerate(outs) if o.text)
    assert outs[first_answer].text.startswith("The")


def test_thinking_reasoning_streams_before_end_marker(tok):
    ids = tok.encode(f"{THINK_START}step one, step two{THINK_END}done")
    d = IncrementalDetokenizer(tok, split_reasoning=True)
    n_before_end = len(tok.encode(f"{THINK_START}step one, step two"))
    r = "".join(d.feed([t]).reasoning_text for t in ids[:n_before_end])
    assert r == "step one, step two"  # reasoning is not held back until the block closes
    assert d.full_text == ""


def test_reasoning_started_mode(tok):
    text = "  thinking inside already \n" + THINK_END + " answer here"
    ids = tok.encode(text)
    check_all_chunkings(tok, ids, "answer here", "thinking inside already",
                        split_reasoning=True, reasoning_started=True)
    assert split_thinking(THINK_START + text) == ("thinking inside already", "answer here")
    # a redundant opening marker is swallowed
    ids = tok.encode(f"\n{THINK_START} r {THINK_END}a")
    check_all_chunkings(tok, ids, "a", "r", split_reasoning=True, reasoning_started=True)
    # without reasoning_started the same text (no opening marker) is all answer, verbatim
    ids = tok.encode(text)
    check_all_chunkings(tok, ids, text.lstrip(), "", split_reasoning=True)


def test_no_marker_mode_is_all_answer(tok):
    text = "\n Just an answer, mentioning ◁think▷ later and ◁/think▷ too."
    ids = tok.encode(text)
    check_all_chunkings(tok, ids, text.lstrip(), "", split_reasoning=True)
    # a lone "◁" that is not a marker is released as answer at finish
    check_all_chunkings(tok, tok.encode("  ◁thi"), "◁thi", "", split_reasoning=True)
    check_all_chunkings(tok, tok.encode("◁thi"), "", "◁thi", split_reasoning=True, reasoning_started=True)
    # without split_reasoning markers are plain text
    check_all_chunkings(tok, tok.encode(THOUGHT), THOUGHT)


def test_unclosed_reasoning_is_released_at_finish(tok):
    text = f"{THINK_START} still thinking about 天气 \n◁/thi"
    ids = tok.encode(text)
    check_all_chunkings(tok, ids, "", "still thinking about 天气 \n◁/thi", split_reasoning=True)
    text = f"{THINK_START} still thinking  \n"
    check_all_chunkings(tok, tok.encode(text), "", "still thinking", split_reasoning=True)
    assert split_thinking(text) == ("still thinking", "")
    d = IncrementalDetokenizer(tok, split_reasoning=True)
    d.feed(tok.encode(f"{THINK_START}abc ◁/th"))
    assert d.full_reasoning == "abc"
    assert d.finish() == DetokenizerOutput("", " ◁/th", False)


def test_stop_string_inside_reasoning_does_not_stop(tok):
    text = f"{THINK_START}I should not STOP here{THINK_END}Answer then STOP and more"
    ids = tok.encode(text)
    check_all_chunkings(tok, ids, "Answer then ", "I should not STOP here", split_reasoning=True, stop=["STOP"])
    d, outs, *_ = stream(tok, ids, split_reasoning=True, stop=["STOP"])
    assert d.stopped and d.stop_reason == "STOP"
    # a stop string never matches across the end marker either
    text = f"{THINK_START}ab{THINK_END}cd"
    check_all_chunkings(tok, tok.encode(text), "cd", "ab", split_reasoning=True, stop=["bc", "b◁"])


# --------------------------------------------------------------------------------------------------------
# Randomized agreement with the one-shot reference
# --------------------------------------------------------------------------------------------------------
FRAGMENTS = [
    THINK_START, THINK_END, "◁", "◁/thi", " ", "  ", "\n", "\n\n", "ab", "abc", "a", "b", "c", "STOP", "ST",
    "Hello", " world", "🎉", "今天", "天气", "こんにちは", "Zürich", "42", "x^2", " the answer",
]
STOP_SETS = [[], ["ab"], ["abc", "ab"], ["STOP"], ["\n\n"], ["天气", "🎉"], ["c a", "bab"], ["◁", "ST"]]


@pytest.mark.parametrize("seed", range(6))
def test_random_texts_match_reference(tok, seed):
    rng = random.Random(seed)
    for _ in range(40):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 25)))
        if rng.random() < 0.5:  # often a proper Thinking output
            text = rng.choice(["", " ", "\n"]) + THINK_START + text
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        stops = rng.choice(STOP_SETS)
        split = rng.random() < 0.7
        started = split and rng.random() < 0.3
        exp_r, exp_t, exp_stop = reference(text, stops, split, started)
        for crng in [None, random.Random(rng.random())]:
            d, outs, got_t, got_r = stream(tok, ids, crng, stop=stops, split_reasoning=split, reasoning_started=started)
            assert (got_r, got_t, d.stop_reason) == (exp_r, exp_t, exp_stop), (text, stops, split, started)
            assert outs[-1].stopped == (exp_stop is not None)


# --------------------------------------------------------------------------------------------------------
# Cost: O(new tokens) per feed
# --------------------------------------------------------------------------------------------------------
def test_each_token_decoded_once(tok, monkeypatch):
    ids = tok.encode(THOUGHT * 20)
    calls = []
    orig = tok.token_bytes
    monkeypatch.setattr(tok, "token_bytes", lambda t: calls.append(t) or orig(t))
    monkeypatch.setattr(tok, "decode", lambda *a, **k: pytest.fail("whole-output re-decode"))
    d = IncrementalDetokenizer(tok, stop=["zzz", "STOP"], split_reasoning=True)
    for t in ids:
        d.feed([t])
    d.finish()
    assert calls == ids


def test_long_stream_is_linear(tok):
    unit = tok.encode("Hello world, 今天天气很好 🎉 abc ab " * 4)

    def run(n_units: int) -> float:
        d = IncrementalDetokenizer(tok, stop=["abcd", "STOP", "\n\n\n"], split_reasoning=True,
                                   reasoning_started=True)
        t0 = time.perf_counter()
        for _ in range(n_units):
            for t in unit:
                d.feed([t])
        d.finish()
        assert len(d.full_reasoning) > 0
        return time.perf_counter() - t0

    run(10)  # warm-up
    small, big = min(run(50) for _ in range(3)), min(run(400) for _ in range(3))
    assert big / small < 8 * 2.5, (small, big)  # 8x the tokens: linear, not quadratic (would be ~64x)
