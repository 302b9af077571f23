"""Tokenizer, chat template and streaming detokenizer tests (CPU, fast, tiny tokenizer)."""

from __future__ import annotations

import base64
import json
import random
import time

import pytest
import regex
from pydantic import BaseModel

from engine.tiny_tokenizer import SPECIAL_TOKEN_OFFSETS, tokenizer_config, write_tiny_tokenizer
from engine.tokenizer import (
    KIMI_PAT_STR,
    ChatTemplateError,
    ImageItem,
    KimiTokenizer,
    Message,
    StreamDecoder,
    TextItem,
    VideoItem,
    collect_media,
    normalize_messages,
    split_thinking,
)

SYS = "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"
IMG = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tiny_dir) -> KimiTokenizer:
    return KimiTokenizer.from_pretrained(tiny_dir)


# --------------------------------------------------------------------------------------------------------
# Files / loading
# --------------------------------------------------------------------------------------------------------
def test_tiny_files_official_format(tiny_dir):
    lines = (tiny_dir / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 768
    for rank, line in enumerate(lines):
        b64, r = line.split()
        assert int(r) == rank
        if rank < 256:
            assert base64.b64decode(b64) == bytes([rank])
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "TikTokenTokenizer"
    assert cfg["auto_map"] == {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]}
    assert cfg["bos_token"] == "[BOS]" and cfg["eos_token"] == "[EOS]"
    assert {int(k) - 768: v["content"] for k, v in cfg["added_tokens_decoder"].items()} == SPECIAL_TOKEN_OFFSETS
    assert "<|media_start|>image<|media_content|><|media_pad|><|media_end|>" in cfg["chat_template"]
    assert (tiny_dir / "chat_template.jinja").read_text() == cfg["chat_template"]


def test_write_is_fast_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    write_tiny_tokenizer(tmp_path / "a")
    assert time.perf_counter() - t0 < 2.0
    write_tiny_tokenizer(tmp_path / "b")
    for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_vocab_and_special_ids_by_name(tok):
    n = 768
    assert tok.num_base_tokens == n
    assert tok.vocab_size == len(tok) == n + 256
    assert tok.bos_id == n + 0 and tok.eos_id == n + 1
    assert tok.im_end_id == n + 2 and tok.im_user_id == n + 3 and tok.im_assistant_id == n + 4
    assert tok.im_system_id == n + 10 and tok.im_middle_id == n + 17
    assert (tok.media_start_id, tok.media_content_id, tok.media_end_id, tok.media_pad_id) == (
        n + 18, n + 19, n + 20, n + 21)
    assert tok.pad_id == n + 255
    assert tok.stop_token_ids == [tok.im_end_id, tok.eos_id]
    # unnamed slots get the official default name with the absolute id
    assert tok.token_to_id(f"<|reserved_token_{n + 5}|>") == n + 5
    assert len(tok.special_tokens) == 256
    for name, i in tok.special_tokens.items():
        assert tok.encode(name) == [i]
        assert tok.decode([i]) == name
    with pytest.raises(KeyError, match="not in this tokenizer"):
        tok.token_to_id("<|no_such|>")


@pytest.mark.parametrize("n", [300, 1000])
def test_special_ids_follow_num_base_tokens(tmp_path, n):
    write_tiny_tokenizer(tmp_path, num_base_tokens=n)
    t = KimiTokenizer.from_pretrained(tmp_path)
    assert t.vocab_size == n + 256
    assert t.media_pad_id == n + 21 and t.im_end_id == n + 2


def test_real_checkpoint_layout_ids():
    """Same loader on a vocabulary the size of the real one: ids land at 163584 + offset."""
    n = 163584
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(256, n):
        ranks[b"\xff\xfe" + i.to_bytes(3, "big")] = i  # unreachable filler tokens
    t = KimiTokenizer(ranks, tokenizer_config(n))
    assert t.vocab_size == 163840
    assert (t.bos_id, t.eos_id, t.im_end_id, t.im_user_id, t.im_assistant_id) == (
        163584, 163585, 163586, 163587, 163588)
    assert (t.im_system_id, t.im_middle_id) == (163594, 163601)
    assert (t.media_start_id, t.media_content_id, t.media_end_id, t.media_pad_id) == (
        163602, 163603, 163604, 163605)
    assert t.token_to_id("<|reserved_token_163589|>") == 163589


def test_reload_same_path_sees_new_files(tmp_path):
    """tiktoken's load_tiktoken_bpe caches local files by path; our loader must not."""
    write_tiny_tokenizer(tmp_path, num_base_tokens=400)
    assert KimiTokenizer.from_pretrained(tmp_path).vocab_size == 656
    write_tiny_tokenizer(tmp_path, num_base_tokens=500)
    assert KimiTokenizer.from_pretrained(tmp_path).vocab_size == 756


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        KimiTokenizer.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------
# Encode / decode
# --------------------------------------------------------------------------------------------------------
ROUND_TRIP = [
    "",
    "Hello, world!",
    "héllo 世界 🎉",
    "今天天气很好，我们一起去公园散步吧。 こんにちは 안녕하세요 Привет",
    "def f(x):\n    return x ** 2  # comment\n\n\n\tTabs and   spaces   ",
    "Emoji ZWJ 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 and combining é (e\u0301)",
    "\x00\x01 control \u2028 separators \ufeff BOM",
    "◁think▷reasoning◁/think▷answer",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.num_base_tokens for i in ids)  # no specials in plain text
    assert tok.encode(text, allow_special=False) == ids


def test_no_bos_added(tok):
    assert tok.encode("hi")[0] != tok.bos_id
    assert tok.encode("") == []


def test_special_strings_allowed_or_not(tok):
    s = "a<|im_end|>b<|media_pad|>[EOS]"
    ids = tok.encode(s)
    assert tok.im_end_id in ids and tok.media_pad_id in ids and tok.eos_id in ids
    plain = tok.encode(s, allow_special=False)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(ids) == tok.decode(plain) == s
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_think_markers_are_plain_text(tok):
    assert not any(tok.is_special(i) for i in tok.encode("◁think▷x◁/think▷"))


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_convert_ids_tokens_round_trip(tok):
    ids = tok.encode("Hello world 世界<|im_end|>")
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[-1] == "<|im_end|>"
    assert tok.convert_tokens_to_ids(toks) == ids
    assert tok.convert_ids_to_tokens(ord("A")) == "A"  # byte tokens have rank == byte in the tiny vocab
    assert tok.convert_ids_to_tokens(ord(" ")) == "Ġ"  # GPT-2 byte->char table


def _reference_bpe(ranks: dict[bytes, int], text: str) -> list[int]:
    """Independent tiktoken-style BPE: split with `regex` V1, repeatedly merge the lowest-rank pair."""
    out = []
    for piece in regex.findall(KIMI_PAT_STR, text, flags=regex.V1):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            cands = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            cands = [c for c in cands if c[0] is not None]
            if not cands:
                break
            _, i = min(cands)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def test_tiktoken_matches_reference_bpe(tiny_dir, tok):
    ranks = {}
    for line in (tiny_dir / "tiktoken.model").read_text().splitlines():
        b64, r = line.split()
        ranks[base64.b64decode(b64)] = int(r)
    texts = ROUND_TRIP + [
        "The HTTPServer's response: it's OK, they'll see. CamelCaseWords and ALLCAPS words.",
        "Numbers 1234567 and 3.14159; x = foo(bar) + baz[0];   trailing   \n\n\n  indent",
    ]
    for text in texts:
        assert tok.encode(text) == _reference_bpe(ranks, text), text


def _official_run_split(s: str, limit: int):
    """Straight transcription of the wrapper's documented behaviour, used as the oracle."""
    cur_len, cur_space, start = 0, (s[0].isspace() if s else False), 0
    for i, ch in enumerate(s):
        now = ch.isspace()
        if cur_space ^ now:
            cur_len, cur_space = 1, now
        else:
            cur_len += 1
            if cur_len > limit:
                yield s[start:i]
                start, cur_len = i, 1
    yield s[start:]


def test_long_run_splitting_matches_official(monkeypatch, tok):
    from engine import tokenizer as tk

    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\x1c", "\u3000", "世", "é", "\t"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        limit = rng.randint(1, 8)
        assert tk._split_long_runs(s, limit) == list(_official_run_split(s, limit)), (s, limit)
    # end to end: with tiny limits, encode == concatenation of piecewise encodes
    monkeypatch.setattr(KimiTokenizer, "MAX_NO_WHITESPACES_CHARS", 5)
    monkeypatch.setattr(KimiTokenizer, "TIKTOKEN_MAX_ENCODE_CHARS", 23)
    text = "aaaaaaaaaaaaa          bbbbbbb cc 世界世界世界世界"
    expected = []
    for i in range(0, len(text), 23):
        for piece in _official_run_split(text[i:i + 23], 5):
            expected += tok.encoding.encode(piece, allowed_special="all")
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text


# --------------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------------
CASES = {
    "text_only": (
        [{"role": "user", "content": "Hi"}],
        SYS + "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN,
    ),
    "single_image": (
        [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is this?"}]}],
        SYS + "<|im_user|>user<|im_middle|>" + IMG + "What is this?<|im_end|>" + GEN,
    ),
    "several_images": (
        [{"role": "user", "content": [
            {"type": "text", "text": "Compare "},
            {"type": "image", "image": "a.png"},
            {"type": "text", "text": " and "},
            {"type": "image_url", "image_url": {"url": "http://x/b.png"}},
            {"image": "c.png"},  # no 'type': an 'image' key makes it an image, as in the official template
            {"type": "text", "text": "."},
        ]}],
        SYS + "<|im_user|>user<|im_middle|>Compare " + IMG + " and " + IMG + IMG + ".<|im_end|>" + GEN,
    ),
    "multi_turn": (
        [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "What colour?"},
        ],
        SYS + "<|im_user|>user<|im_middle|>" + IMG + "Describe.<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>A cat.<|im_end|>"
        "<|im_user|>user<|im_middle|>What colour?<|im_end|>" + GEN,
    ),
    "explicit_system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN,
    ),
    "system_not_first": (
        [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late."}],
        SYS + "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_system|>system<|im_middle|>Late.<|im_end|>" + GEN,
    ),
    "thinking_history": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "◁think▷Add two and two.◁/think▷The answer is 4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        SYS + "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>◁think▷Add two and two.◁/think▷The answer is 4.<|im_end|>"
        "<|im_user|>user<|im_middle|>And 3+3?<|im_end|>" + GEN,
    ),
    "empty_text_and_unicode": (
        [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "héllo 世界 🎉\n"}]}],
        SYS + "<|im_user|>user<|im_middle|>héllo 世界 🎉\n<|im_end|>" + GEN,
    ),
    "no_messages": ([], GEN),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chat_template_exact(tok, name):
    messages, expected = CASES[name]
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, use_jinja=True) == expected
    # without the generation prompt
    no_gen = expected[: -len(GEN)] if expected.endswith(GEN) else expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == no_gen
    assert tok.apply_chat_template(messages, add_generation_prompt=False, use_jinja=True) == no_gen


def test_python_rendering_equals_raw_jinja(tok):
    """Our normalisation does not change what the official template would render from the raw dicts."""
    for name, (messages, _) in CASES.items():
        for gen in (True, False):
            assert tok.render_jinja(messages, gen) == tok.apply_chat_template(messages, gen), name


def test_chat_encoding_uses_special_ids(tok):
    messages, text = CASES["single_image"]
    ids = tok.encode_chat(messages)
    assert ids == tok.encode(text)
    assert ids[0] == tok.im_system_id
    assert ids[-1] == tok.im_middle_id
    assert ids.count(tok.media_pad_id) == 1
    i = ids.index(tok.media_start_id)
    # <|media_start|> 'image' <|media_content|> <|media_pad|> <|media_end|>: 'image' is ordinary text
    assert tok.decode(ids[i + 1:ids.index(tok.media_content_id)]) == "image"
    assert ids[ids.index(tok.media_content_id) + 1:][:2] == [tok.media_pad_id, tok.media_end_id]


def test_video_frames(tok):
    frames = ["f0", "f1", "f2"]
    m_ts = [{"role": "user", "content": [
        {"type": "video", "video": frames, "timestamps": [0, 0.5, "00:01"]},
        {"type": "text", "text": "What happens?"},
    ]}]
    expected = SYS + "<|im_user|>user<|im_middle|>[0.0s]" + IMG + "[0.5s]" + IMG + "00:01" + IMG + \
        "What happens?<|im_end|>" + GEN
    assert tok.apply_chat_template(m_ts) == expected
    assert tok.apply_chat_template(m_ts, use_jinja=True) == expected
    m_plain = [{"role": "user", "content": [{"type": "video", "frames": frames}, {"type": "text", "text": "?"}]}]
    expected_plain = SYS + "<|im_user|>user<|im_middle|>" + IMG * 3 + "?<|im_end|>" + GEN
    assert tok.apply_chat_template(m_plain) == expected_plain
    assert tok.apply_chat_template(m_plain, use_jinja=True) == expected_plain
    assert collect_media(m_plain) == frames
    with pytest.raises(ChatTemplateError, match="2 timestamps for 3 frames"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": frames, "timestamps": [0, 1]}]}])


def test_video_frames_container(tok):
    """A frames container with .frames/.timestamps (engine.processor.VideoFrames) is accepted."""

    class Frames:
        def __init__(self, frames, timestamps=None):
            self.frames, self.timestamps = tuple(frames), timestamps

    with_ts = [{"role": "user", "content": [{"type": "video", "frames": Frames(["a", "b"], (0.0, 2.0))}]}]
    assert tok.apply_chat_template(with_ts) == SYS + "<|im_user|>user<|im_middle|>[0.0s]" + IMG + "[2.0s]" + IMG + \
        "<|im_end|>" + GEN
    no_ts = [{"role": "user", "content": [{"type": "video", "frames": Frames(["a", "b"])}]}]
    assert tok.apply_chat_template(no_ts) == SYS + "<|im_user|>user<|im_middle|>" + IMG * 2 + "<|im_end|>" + GEN
    assert collect_media(no_ts) == ["a", "b"]


def test_collect_media_order():
    msgs = CASES["several_images"][0] + [{"role": "user", "content": [{"type": "image", "image": "d.png"}]}]
    assert collect_media(msgs) == ["a.png", {"url": "http://x/b.png"}, "c.png", "d.png"]


def test_pydantic_messages(tok):
    class MyMsg(BaseModel):
        role: str
        content: str

    msgs = [
        Message(role="user", content=[ImageItem(image="a.png"), TextItem(text="What is this?")]),
        MyMsg(role="assistant", content="A cat."),
        {"role": "user", "content": [VideoItem(video=["f0"]), {"type": "text", "text": "x"}]},
    ]
    expected = SYS + "<|im_user|>user<|im_middle|>" + IMG + "What is this?<|im_end|>" \
        "<|im_assistant|>assistant<|im_middle|>A cat.<|im_end|><|im_user|>user<|im_middle|>" + IMG + "x<|im_end|>" + GEN
    assert tok.apply_chat_template(msgs) == expected
    assert tok.apply_chat_template(msgs, use_jinja=True) == expected


def test_strip_thinking_history(tok):
    messages = CASES["thinking_history"][0]
    stripped = SYS + "<|im_user|>user<|im_middle|>2+2?<|im_end|>" \
        "<|im_assistant|>assistant<|im_middle|>The answer is 4.<|im_end|>" \
        "<|im_user|>user<|im_middle|>And 3+3?<|im_end|>" + GEN
    assert tok.apply_chat_template(messages, strip_thinking_history=True) == stripped
    assert tok.apply_chat_template(messages, strip_thinking_history=True, use_jinja=True) == stripped
    # the official demo's rule: content.strip().split(THINK_END)[-1] (no strip after the split)
    m2 = [{"role": "user", "content": "q"},
          {"role": "assistant", "content": "  ◁think▷a◁/think▷ b ◁/think▷ final  "},
          {"role": "user", "content": "q2"}]
    assert "<|im_assistant|>assistant<|im_middle|> final<|im_end|>" in tok.apply_chat_template(
        m2, strip_thinking_history=True)
    # a trailing assistant turn being continued (no generation prompt) is left alone
    m3 = messages[:2]
    assert "◁think▷" in tok.apply_chat_template(m3, add_generation_prompt=False, strip_thinking_history=True)
    assert "◁think▷" not in tok.apply_chat_template(m3, add_generation_prompt=True, strip_thinking_history=True)
    # list content: text before the last end marker is dropped
    m4 = [{"role": "assistant", "content": [
        {"type": "text", "text": "◁think▷hmm"}, {"type": "text", "text": "more◁/think▷Ans"},
        {"type": "text", "text": "wer."}]}, {"role": "user", "content": "ok"}]
    out = tok.apply_chat_template(m4, strip_thinking_history=True)
    assert "<|im_assistant|>assistant<|im_middle|>Answer.<|im_end|>" in out
    assert tok.apply_chat_template(m4, strip_thinking_history=True, use_jinja=True) == out


def test_split_thinking():
    assert split_thinking("◁think▷Add two and two.◁/think▷The answer is 4.") == ("Add two and two.", "The answer is 4.")
    assert split_thinking("◁think▷\nstep 1\nstep 2\n◁/think▷\n\nFinal.") == ("step 1\nstep 2", "Final.")
    assert split_thinking("Just an answer.") == ("", "Just an answer.")
    assert split_thinking("◁think▷still thinking") == ("still thinking", "")
    assert split_thinking("◁think▷a◁/think▷b◁/think▷c") == ("a◁/think▷b", "c")
    assert split_thinking("") == ("", "")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "tool", "content": "x"}], r"messages\[0\]: unknown role 'tool'"),
        ([{"role": "user", "content": "a"}, {"content": "x"}], r"messages\[1\]: missing 'role'"),
        ([{"role": "user"}], r"missing 'content'"),
        ([{"role": "user", "content": 5}], "content must be a string or a list"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
         r"messages\[0\]\.content\[0\]: unknown content type 'audio'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"content\[0\]: invalid 'text' item"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"invalid 'text' item: text: Field required"),
        ([{"role": "user", "content": [{"foo": 1}]}], "content item has no 'type'"),
        ([{"role": "user", "content": ["plain string item"]}], "expected a dict or pydantic model"),
        ([{"role": "user", "content": [{"type": "video", "video": []}]}], "invalid 'video' item"),
        ("Hello", "messages must be a list"),
        ({"role": "user", "content": "x"}, "messages must be a list"),
    ],
)
def test_bad_messages_clear_errors(tok, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template(messages)
    assert issubclass(ChatTemplateError, ValueError)


def test_normalize_is_plain_dicts():
    norm = normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}, {"text": "t"}]}])
    assert norm == [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}, {"type": "text", "text": "t"}]}]


# --------------------------------------------------------------------------------------------------------
# Streaming detokenizer
# --------------------------------------------------------------------------------------------------------
def test_stream_decoder_byte_tokens(tok):
    s = "héllo 世界 🎉"
    ids = [tok.encoding.encode_single_token(bytes([b])) for b in s.encode()]
    assert tok.decode(ids) == s
    sd = StreamDecoder(tok)
    pieces = []
    for i in ids:
        out = sd.feed(i)
        assert "\ufffd" not in out
        pieces.append(out)
    pieces.append(sd.flush())
    assert "".join(pieces) == s
    # the first byte of 'é' / '世' / '🎉' produced nothing; the last byte produced the whole character
    assert pieces[:4] == ["h", "", "é", "l"]
    e_start = len("héllo ".encode())
    assert pieces[e_start:e_start + 3] == ["", "", "世"]
    assert pieces[-5:] == ["", "", "", "🎉", ""]


def test_stream_decoder_matches_decode(tok):
    text = "<|im_assistant|>assistant<|im_middle|>◁think▷思考一下 🤔◁/think▷Answer: héllo 世界 🎉<|im_end|>"
    ids = tok.encode(text)
    sd = tok.stream_decoder()
    pieces = [sd.feed(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    sd2 = tok.stream_decoder(skip_special_tokens=True)
    assert sd2.feed_many(ids) + sd2.flush() == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_invalid_and_truncated(tok):
    byte = lambda b: tok.encoding.encode_single_token(bytes([b]))  # noqa: E731
    sd = tok.stream_decoder()
    # an impossible byte is replaced at once, like a one-shot decode
    assert sd.feed(byte(0xFF)) == "\ufffd"
    # a truncated character is held, then flushed as U+FFFD at the end, matching decode()
    part = [byte(b) for b in "世".encode()[:2]]
    assert sd.feed_many(part) == ""
    assert sd.pending
    assert sd.flush() == "\ufffd"
    assert not sd.pending
    assert tok.decode([byte(0xFF)] + part) == "\ufffd\ufffd"
    # a start byte followed by a non-continuation byte: bad prefix replaced, next char kept
    sd.reset()
    assert sd.feed(byte(0xE4)) == ""
    assert sd.feed(byte(ord("A"))) == "\ufffdA"
