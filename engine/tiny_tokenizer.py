"""Write a tiny, deterministic Kimi-VL tokenizer in the official on-disk format.

Real Kimi-VL weights cannot be downloaded here, so tests use a tiny checkpoint.  This module writes its
tokenizer files exactly in the layout of the official ``moonshotai/Kimi-VL-A3B-*`` repositories, so that
:meth:`engine.tokenizer.KimiTokenizer.from_pretrained` loads it through the very same code path as a real
checkpoint:

``tiktoken.model``
    One ``<base64(token bytes)> <rank>`` line per mergeable token, ranks ``0 .. num_base_tokens-1``
    (the format read by ``tiktoken.load.load_tiktoken_bpe``, which the official
    ``tokenization_moonshot.TikTokenTokenizer`` uses).  Here: the 256 single bytes (rank = byte value),
    then byte-level BPE merges learnt deterministically on a small built-in English + code + CJK corpus,
    pre-split with the official Kimi ``pat_str`` (so every learnt token is reachable by tiktoken's BPE).
``tokenizer_config.json``
    ``added_tokens_decoder`` naming the special tokens at the *official offsets* from ``num_base_tokens``
    (offset 0 = ``[BOS]`` ... offset 21 = ``<|media_pad|>``, 254/255 = ``[UNK]``/``[PAD]``); like the
    official file it lists only named slots - the loader names every other slot of the 256 reserved ones
    ``<|reserved_token_{id}|>``.  Plus ``tokenizer_class``/``auto_map``/``bos_token``/... and the official
    ``chat_template``.
``chat_template.jinja``
    The same template as a standalone file (the official Kimi-VL repo ships one; sgl-project/sglang
    ``python/sglang/srt/conversation.py`` cites ``Kimi-VL-A3B-Instruct/blob/main/chat_template.jinja``).

No ``special_tokens_map.json`` is written: we could not confirm that the official Kimi-VL repos ship one.

Sources for the facts used here (all re-typed, no code copied):

* special-token offsets: spec §4.5 / K2 ``tokenizer_config.json`` copies (e.g. ``tiny-random/kimi-k2``:
  163584 ``[BOS]``, 163585 ``[EOS]``, 163586 ``<|im_end|>``, 163587 ``<|im_user|>``, 163588
  ``<|im_assistant|>``, 163590/163591 header ids, 163593 ``[EOT]``, 163594 ``<|im_system|>``); media ids
  163602..163605 ``<|media_start|>``/``<|media_content|>``/``<|media_end|>``/``<|media_pad|>`` from
  sgl-project/sglang's first Kimi-VL processor (``multimodal_processors/kimi_vl.py``); 163601
  ``<|im_middle|>`` from spec §4.5; ``[UNK]``/``[PAD]`` at 163838/163839 from spec §4.5 (unconfirmed).
* ``auto_map`` ``{"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", null]}``: Moonlight
  deployment notes (rawcell bruno docs) and NVIDIA-NeMo/Automodel tests.
* default ``additional_special_tokens`` / ``bos_token`` ``[BOS]`` / ``eos_token`` ``[EOS]``: the
  ``TikTokenTokenizer.__init__`` defaults in the Moonlight-line ``tokenization_moonshot.py``
  (copy in zxgx/mode-pd ``modepd/model/moonshotai/tokenization_moonshot.py``).
* chat template: see ``engine.tokenizer.KIMI_VL_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import regex

from engine.tokenizer import KIMI_PAT_STR, KIMI_VL_CHAT_TEMPLATE, NUM_RESERVED_SPECIAL_TOKENS

__all__ = ["write_tiny_tokenizer", "SPECIAL_TOKEN_OFFSETS", "tiny_corpus", "learn_bpe_ranks"]

# Offset from num_base_tokens -> name, as in the official Kimi-VL tokenizer_config.json (ids 163584 + offset).
SPECIAL_TOKEN_OFFSETS: dict[int, str] = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    17: "<|im_middle|>",
    18: "<|media_start|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    254: "[UNK]",
    255: "[PAD]",
}

# Default additional_special_tokens of the official TikTokenTokenizer wrapper.
_ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
]

# --------------------------------------------------------------------------------------------------------
# Built-in training corpus (our own text).  Lines are reshuffled deterministically a few times so the
# corpus is ~20 KB; the exact merges only need to be deterministic, not good.
# --------------------------------------------------------------------------------------------------------
_BASE_TEXT = r"""
The quick brown fox jumps over the lazy dog. A vision-language model reads an image and answers questions about it.
Kimi-VL is a mixture-of-experts model: a small number of experts is active for every token, which keeps inference cheap.
The image is cut into patches of fourteen by fourteen pixels, and neighbouring patches are merged two by two.
What is shown in this picture? There is a red car parked in front of a small house with a green door.
Please describe the chart: the blue line rises from 12 in January to 48 in June, then falls back to 30.
The user asked for a summary of the document, so the assistant wrote three short paragraphs and a list.
Thinking models first reason step by step, then give a short final answer to the question.
Let me think about this carefully. First, count the apples; second, subtract the ones that were eaten.
The answer is 42. The total cost is $19.99 plus tax, which comes to about $21.59 in most states.
She said: "I don't know where they've gone, but we'll find them." He'd already left, and it's late.
Tokenizers split text into pieces; byte-level BPE merges the most frequent pair of symbols again and again.
Streaming output must never show half of a character, so incomplete UTF-8 sequences are held back.
The weather today is sunny with a light breeze from the west and a high of twenty-three degrees.
In 1969, people walked on the Moon for the first time; the mission took eight days in total.
Numbers like 3.14159, 2.71828, 1024, 65536 and 163840 appear often in technical writing.
HTTP servers return status codes such as 200 OK, 404 Not Found and 500 Internal Server Error.
def encode(self, text: str, allow_special: bool = True) -> list[int]:
    ids: list[int] = []
    for piece in self.split(text):
        ids.extend(self.model.encode(piece))
    return ids
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
for i in range(10):
    if i % 2 == 0:
        print(f"even number: {i}")
    else:
        print("odd number:", i)
import json, os, sys
config = json.loads(open("config.json").read())
hidden_size = config["text_config"]["hidden_size"]
function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * 2);
if (items.length > 0 && items[0] !== null) { console.log("ok"); }
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY name;
<html><body><p class="note">Hello, world!</p></body></html>
git commit -m "fix tokenizer" && git push origin main
今天天气很好，我们一起去公园散步吧。
这张图片里有一只猫坐在窗台上，外面正在下雨。
请描述一下这张图表的主要内容和趋势。
人工智能模型可以理解图像和文字，并回答用户的问题。
中文分词和英文分词的方法不一样，汉字通常会被合并成较长的词。
我们先思考这个问题，然后给出最终的答案。
こんにちは、世界。今日はいい天気ですね。
この画像には何が写っていますか？
안녕하세요, 만나서 반갑습니다.
Привет, как дела? Всё хорошо, спасибо.
Café, naïve, résumé, façade, jalapeño, Zürich, Ærøskøbing and São Paulo.
Emoji also appear in chats: 🎉 👍 😀 🚀 ❤️ and sometimes several in a row 🎉🎉🎉.
Mathematics: x^2 + y^2 = z^2, sum_{i=1}^{n} i = n(n+1)/2, and e^{i*pi} + 1 = 0.
The assistant should answer in the same language as the user, and keep the answer short and clear.
On the screenshot, click the search box at the top, type the query and press the Enter key.
Please observe the screenshot, please locate the following elements with action and point.
The video shows a person walking a dog along the beach at sunset, then the camera pans to the sea.
Frame by frame, the model looks at each picture independently and then reasons about the sequence.
"""


def tiny_corpus() -> str:
    """The deterministic ~20 KB training corpus (base text + 4 seeded line shuffles)."""
    lines = [ln for ln in _BASE_TEXT.strip("\n").split("\n")]
    rng = random.Random(1234)
    parts = ["\n".join(lines)]
    for _ in range(4):
        shuffled = lines[:]
        rng.shuffle(shuffled)
        parts.append("\n".join(shuffled))
    return "\n".join(parts) + "\n"


def learn_bpe_ranks(text: str, num_base_tokens: int) -> list[bytes]:
    """Learn byte-level BPE tokens on ``text``; return token bytes in rank order (first 256 = single bytes).

    Deterministic: the most frequent adjacent pair wins, ties broken by the smallest ``(left, right)`` bytes.
    Pieces come from the official Kimi ``pat_str`` (Python ``regex`` in V1 mode supports its ``&&`` class
    intersections, like tiktoken's fancy-regex), so merges never cross a tiktoken pre-token boundary.
    Incremental pair counting keeps this well under a second for ~20 KB.
    """
    if num_base_tokens < 256:
        raise ValueError(f"num_base_tokens must be >= 256 (the single bytes), got {num_base_tokens}")
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    known: set[bytes] = set(vocab)
    if num_base_tokens == 256:
        return vocab

    pat = regex.compile(KIMI_PAT_STR, flags=regex.V1)
    word_freq: dict[bytes, int] = {}
    for piece in pat.findall(text):
        b = piece.encode("utf-8")
        if len(b) > 1:
            word_freq[b] = word_freq.get(b, 0) + 1
    # words as lists of symbols (bytes), with frequencies
    words: list[list[bytes]] = [[bytes([c]) for c in w] for w in word_freq]
    freqs: list[int] = list(word_freq.values())

    pair_counts: dict[tuple[bytes, bytes], int] = {}
    pair_where: dict[tuple[bytes, bytes], set[int]] = {}
    for wi, syms in enumerate(words):
        f = freqs[wi]
        for a, b in zip(syms, syms[1:]):
            pair_counts[(a, b)] = pair_counts.get((a, b), 0) + f
            pair_where.setdefault((a, b), set()).add(wi)

    while len(vocab) < num_base_tokens:
        best = None
        best_count = 0
        for pair, count in pair_counts.items():
            if count > best_count or (count == best_count and count > 0 and pair < best):
                best, best_count = pair, count
        if best is None or best_count <= 0:
            raise ValueError(
                f"the built-in corpus only supports {len(vocab)} base tokens; asked for {num_base_tokens}"
            )
        a, b = best
        merged = a + b
        if merged not in known:  # a byte string reachable by two different splits gets one rank only
            known.add(merged)
            vocab.append(merged)
        for wi in sorted(pair_where.pop(best, ())):
            syms = words[wi]
            f = freqs[wi]
            # remove this word's old pair contributions
            for p in zip(syms, syms[1:]):
                pair_counts[p] -= f
                ws = pair_where.get(p)
                if ws is not None:
                    ws.discard(wi)
            out: list[bytes] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + f
                pair_where.setdefault(p, set()).add(wi)
        pair_counts.pop(best, None)
        # drop dead pairs so the max-scan stays small
        for p in [p for p, c in pair_counts.items() if c <= 0]:
            del pair_counts[p]
            pair_where.pop(p, None)
    return vocab


def tokenizer_config(num_base_tokens: int) -> dict:
    """The ``tokenizer_config.json`` content for a vocabulary of ``num_base_tokens`` mergeable tokens.

    Only fields we could source are written (no ``model_max_length`` etc.); the loader reads
    ``added_tokens_decoder``, ``bos_token``, ``eos_token``, ``pad_token`` and ``chat_template``.
    """
    added = {}
    for offset in sorted(SPECIAL_TOKEN_OFFSETS):
        added[str(num_base_tokens + offset)] = {
            "content": SPECIAL_TOKEN_OFFSETS[offset],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "chat_template": KIMI_VL_CHAT_TEMPLATE,
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def write_tiny_tokenizer(dir: str | Path, num_base_tokens: int = 768) -> None:  # noqa: A002 (API name)
    """Write ``tiktoken.model``, ``tokenizer_config.json`` and ``chat_template.jinja`` into ``dir``.

    The vocabulary has ``num_base_tokens`` mergeable tokens plus the 256 reserved special slots, i.e.
    ``vocab_size == num_base_tokens + 256``; special ids are ``num_base_tokens + offset`` with the official
    offsets (see :data:`SPECIAL_TOKEN_OFFSETS`).  The built-in corpus supports 256 <= num_base_tokens <= 1683
    (ValueError beyond).  Deterministic: the same arguments always give byte-identical files.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = learn_bpe_ranks(tiny_corpus(), num_base_tokens)
    assert len(vocab) == num_base_tokens and NUM_RESERVED_SPECIAL_TOKENS > max(SPECIAL_TOKEN_OFFSETS)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}" for rank, tok in enumerate(vocab)]
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(num_base_tokens), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_text(KIMI_VL_CHAT_TEMPLATE, encoding="utf-8")
