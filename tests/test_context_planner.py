"""Tests for pipelines/context.py (token counting, budgets, chunk planning) and pipelines/map_reduce.py."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError

from connectors.stores.base import SessionRecord, SessionStore
from engine.config import ProcessorConfig
from engine.processor import KimiVLProcessor, VideoFrames, num_image_tokens
from pipelines import (
    Chunk,
    ContextBudget,
    ContextOverflow,
    ContextPlanner,
    MapReduceCancelled,
    Piece,
    PieceTooLarge,
    TokenCounter,
    chunk_session_id,
    map_reduce,
    split_text,
)
from pipelines.map_reduce import REDUCED_KEY, RESULT_KEY

WORDS = ("alpha beta gamma delta contract clause party shall notice term payment liability the of and to "
         "in for with agreement section schedule").split()


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _paragraph(rng: random.Random, sentences: int, words: int = 12) -> str:
    return " ".join(_words(rng, words) for _ in range(sentences))


@pytest.fixture(scope="module")
def counter(tiny_checkpoint: Path) -> TokenCounter:
    return TokenCounter.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def real_counter(counter: TokenCounter) -> TokenCounter:
    """The tiny tokenizer with the released checkpoints' processor settings (in_token_limit 4096)."""
    return TokenCounter(counter.tokenizer, KimiVLProcessor(ProcessorConfig(), counter.tokenizer))


PREFIX = [
    {"role": "system", "content": "You extract obligations from contracts."},
    {"role": "user", "content": "Read the following part of the document and list every obligation."},
]
SUFFIX = [{"role": "user", "content": 'Answer as JSON: {"obligations": [{"party": str, "text": str}]}'}]


# ---------------------------------------------------------------------------------------------- counting


def _message_sets(tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap after exif_transpose
    _image(120, 60, 5).save(jpeg, "JPEG", exif=exif)
    path = tmp_path / "page.png"
    path.write_bytes(_png(_image(333, 97, 6)))
    data_url = "data:image/png;base64," + base64.b64encode(_png(_image(50, 410, 7))).decode()
    return {
        "text_only": [{"role": "user", "content": "What does clause 4.2 say about payment terms?"}],
        "text_and_image": [{"role": "user", "content": [
            {"type": "text", "text": "Describe this page."}, {"type": "image", "image": _image(640, 480)}]}],
        "two_images_different_sizes": [{"role": "user", "content": [
            {"type": "image", "image": _image(1200, 900, 1)},
            {"type": "text", "text": "Compare with"},
            {"type": "image", "image": _image(31, 250, 2)}]}],
        "multi_turn": [
            {"role": "system", "content": "You are careful."},
            {"role": "user", "content": [{"type": "image", "image": _image(300, 200, 3)},
                                         {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": "A bar chart of revenue per quarter."},
            {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                         {"type": "image", "image": _image(900, 1600, 4)}]},
        ],
        "encoded_sources": [{"role": "user", "content": [
            {"type": "image", "image": jpeg.getvalue()},
            {"type": "image", "image": str(path)},
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "three encoded images"}]}],
        "video_frames": [{"role": "user", "content": [
            {"type": "text", "text": "What happens?"},
            {"type": "video", "video": VideoFrames(tuple(_image(160, 90, 10 + i) for i in range(4)),
                                                   (0.0, 1.0, 2.0, 3.5))}]}],
    }


@pytest.mark.parametrize("name", ["text_only", "text_and_image", "two_images_different_sizes", "multi_turn",
                                  "encoded_sources", "video_frames"])
@pytest.mark.parametrize("which", ["tiny", "real"])
def test_count_equals_processor(name: str, which: str, counter: TokenCounter, real_counter: TokenCounter,
                                tmp_path: Path) -> None:
    c = counter if which == "tiny" else real_counter
    messages = _message_sets(tmp_path)[name]
    assert c.count_messages(messages) == c.processor(messages).input_ids.shape[-1]


def test_count_reads_only_headers(counter: TokenCounter) -> None:
    """A PNG whose pixel data is cut off still counts (size from the header), so no pixels were decoded."""
    full = _png(_image(700, 500, 8))
    truncated = full[:200]
    good = [{"role": "user", "content": [{"type": "image", "image": full}]}]
    cut = [{"role": "user", "content": [{"type": "image", "image": truncated}]}]
    assert counter.count_messages(cut) == counter.count_messages(good)


def test_count_image_and_text(counter: TokenCounter, real_counter: TokenCounter) -> None:
    assert counter.count_image(640, 480) == num_image_tokens(640, 480, counter.processor.cfg)
    assert real_counter.count_image(1920, 1080) == num_image_tokens(1920, 1080, ProcessorConfig())
    assert real_counter.count_image(1920, 1080) > counter.count_image(1920, 1080)
    assert counter.count_text("hello world") == len(counter.tokenizer.encode("hello world"))
    assert counter.count_text("") == 0


def test_from_bundle_uses_the_bundles_parts(tiny_checkpoint: Path, counter: TokenCounter) -> None:
    class Bundle:
        tokenizer = counter.tokenizer
        processor = counter.processor

    c = TokenCounter.from_bundle(Bundle())
    assert c.tokenizer is counter.tokenizer and c.processor is counter.processor


# ------------------------------------------------------------------------------------------------ budget


def test_budget_arithmetic() -> None:
    b = ContextBudget()
    assert (b.context_window, b.output_reserve, b.safety_margin) == (131072, 4096, 0)
    assert b.available == 131072 - 4096
    b = ContextBudget(context_window=8192, output_reserve=1000, safety_margin=192)
    assert b.available == 7000
    assert b.prompt_limit() == 7000
    assert b.prompt_limit(max_tokens=192) == 7808
    with pytest.raises(ValidationError, match="output_reserve"):
        ContextBudget(context_window=4096, output_reserve=4096)
    with pytest.raises(ValidationError):
        ContextBudget(context_window=4096, output_reserve=4000, safety_margin=96)
    with pytest.raises(ValidationError):
        ContextBudget(context_window=4096, output_reserve=-1)


def test_check_and_fits(counter: TokenCounter) -> None:
    messages = [{"role": "user", "content": _paragraph(random.Random(1), 10)}]
    n = counter.count_messages(messages)
    planner = ContextPlanner(counter, ContextBudget(context_window=n + 100, output_reserve=100))
    assert planner.fits(messages) and planner.check(messages) == n
    assert not planner.fits(messages, max_tokens=101)
    with pytest.raises(ContextOverflow) as info:
        planner.check(messages, max_tokens=150)
    assert info.value.tokens == n and info.value.limit == n - 50
    assert str(n) in str(info.value) and "150" in str(info.value)
    tight = ContextPlanner(counter, ContextBudget(context_window=n + 100, output_reserve=100, safety_margin=1))
    with pytest.raises(ContextOverflow):
        tight.check(messages)


# ----------------------------------------------------------------------------------------------- planner


def _budget(counter: TokenCounter, room: int, prefix: list[Any] = PREFIX, suffix: list[Any] = SUFFIX,
            reserve: int = 200) -> ContextBudget:
    """A budget leaving ``room`` tokens for chunk content next to ``prefix`` / ``suffix``."""
    fixed = counter.count_messages([*prefix, {"role": "user", "content": []}, *suffix])
    return ContextBudget(context_window=fixed + room + reserve, output_reserve=reserve)


def _section_tokens(counter: TokenCounter, pieces: list[Piece], section: int = 0) -> int:
    texts = [p.text for p in pieces if p.meta.get("section") == section]
    return counter.count_text("\n\n".join(texts))


def _text_pieces(seed: int, sections: int, paragraphs: int, sentences: int = 3) -> list[Piece]:
    rng = random.Random(seed)
    out = []
    for s in range(sections):
        for p in range(paragraphs):
            out.append(Piece(id=f"s{s}p{p}", text=_paragraph(rng, sentences), boundary=2 if p == 0 else 1,
                             meta={"section": s}))
    return out


def _assert_valid_plan(planner: ContextPlanner, chunks: list[Chunk], pieces: list[Piece]) -> None:
    available = planner.budget.available
    covered: list[str] = []
    for k, chunk in enumerate(chunks):
        assert chunk.index == k
        exact = planner.counter.count_messages(chunk.messages())
        assert exact == chunk.token_count <= available
        covered.extend(chunk.new_piece_ids)
    # every piece (or every part of a split piece) is covered once, in order
    expected = []
    for p in pieces:
        parts = [i for i in covered if i == p.id or i.startswith(p.id + "#")]
        assert parts, f"piece {p.id} missing"
        expected.extend(parts)
    assert covered == expected


def test_plan_chunks_fit_with_prefix_and_suffix(counter: TokenCounter) -> None:
    pieces = _text_pieces(0, sections=6, paragraphs=5)
    planner = ContextPlanner(counter, ContextBudget(context_window=1500, output_reserve=200))
    chunks = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX)
    assert len(chunks) >= 3
    _assert_valid_plan(planner, chunks, pieces)
    msgs = chunks[0].messages()
    assert msgs[: len(PREFIX)] == PREFIX and msgs[-1] == SUFFIX[0]
    # chunks are well filled: all but the last use at least min_fill of the room
    fixed = counter.count_messages([*PREFIX, {"role": "user", "content": []}, *SUFFIX])
    room = planner.budget.available - fixed
    assert all(c.token_count - fixed >= 0.5 * room - 5 for c in chunks[:-1])


def test_plan_prefers_strong_boundaries(counter: TokenCounter) -> None:
    pieces = _text_pieces(1, sections=8, paragraphs=4, sentences=2)
    by_id = {p.id: k for k, p in enumerate(pieces)}
    section = _section_tokens(counter, pieces)
    planner = ContextPlanner(counter, _budget(counter, int(2.5 * section)))
    chunks = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX)
    assert len(chunks) >= 3
    for chunk in chunks[:-1]:
        nxt = by_id[chunk.piece_ids[-1]] + 1
        assert pieces[nxt].boundary == 2, f"chunk {chunk.index} ends mid-section before {pieces[nxt].id}"
    _assert_valid_plan(planner, chunks, pieces)


def test_plan_overlap(counter: TokenCounter) -> None:
    pieces = _text_pieces(2, sections=4, paragraphs=8, sentences=1)
    planner = ContextPlanner(counter, _budget(counter, _section_tokens(counter, pieces)))
    overlap_tokens = 3 * counter.count_text(pieces[0].text) + 10
    chunks = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX, overlap_tokens=overlap_tokens)
    assert len(chunks) > 2
    assert chunks[0].overlap == 0
    for prev, chunk in zip(chunks, chunks[1:]):
        assert chunk.overlap >= 1
        repeated = chunk.piece_ids[: chunk.overlap]
        assert repeated == prev.piece_ids[-chunk.overlap:]
        assert set(repeated) <= set(prev.new_piece_ids)
        texts = [p.text for p in chunk.pieces[: chunk.overlap]]
        assert counter.count_text(planner.joiner.join(texts)) <= overlap_tokens + 2
    _assert_valid_plan(planner, chunks, pieces)
    no_overlap = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX)
    assert all(c.overlap == 0 for c in no_overlap)
    assert len(no_overlap) <= len(chunks)


def test_plan_splits_oversize_text_piece(counter: TokenCounter) -> None:
    rng = random.Random(3)
    big = "\n\n".join(_paragraph(rng, 6) for _ in range(12)) + "\n" + "x" * 3000  # ends in a word with no spaces
    pieces = [Piece(id="intro", text=_paragraph(rng, 2), boundary=2),
              Piece(id="big", text=big, label="[page 2]", boundary=2, meta={"page": 2}),
              Piece(id="outro", text=_paragraph(rng, 2), boundary=2)]
    planner = ContextPlanner(counter, ContextBudget(context_window=1200, output_reserve=200))
    chunks = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX, overlap_tokens=100)
    parts = [p for c in chunks for p in c.pieces[c.overlap:] if p.id.startswith("big#")]
    assert len(parts) > 3
    assert "".join(p.text for p in parts) == big
    assert all(p.label == "[page 2]" and p.meta["page"] == 2 and p.meta["source_id"] == "big" for p in parts)
    assert [p.meta["part"] for p in parts] == list(range(len(parts)))
    assert parts[0].boundary == 2 and all(p.boundary == 0 for p in parts[1:])
    _assert_valid_plan(planner, chunks, pieces)


def test_split_text_prefers_sentences_and_rejoins(counter: TokenCounter) -> None:
    rng = random.Random(4)
    text = " ".join(_words(rng, 10) for _ in range(40))
    parts = split_text(text, 60, counter.count_text)
    assert "".join(parts) == text
    assert all(counter.count_text(p) <= 60 for p in parts)
    assert all(p.rstrip().endswith(".") for p in parts)  # every cut at a sentence end
    assert split_text("short", 10, counter.count_text) == ["short"]


def test_plan_oversize_image_names_it(real_counter: TokenCounter) -> None:
    planner = ContextPlanner(real_counter, _budget(real_counter, 300))  # a 1400x1000 image needs ~1800
    pieces = [Piece(id="p1", text="Some text."),
              Piece(id="scan-7", kind="image", image=_image(1400, 1000)),
              Piece(id="p2", text="More text.")]
    with pytest.raises(PieceTooLarge, match="scan-7") as info:
        planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX)
    assert info.value.piece_id == "scan-7" and info.value.tokens > info.value.limit


def test_errors_survive_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(PieceTooLarge("too big", piece_id="scan-7", tokens=9, limit=5)))
    assert (str(err), err.piece_id, err.tokens, err.limit) == ("too big", "scan-7", 9, 5)
    err2 = pickle.loads(pickle.dumps(ContextOverflow("over", tokens=3, limit=2)))
    assert (err2.tokens, err2.limit) == (3, 2)
    stop = pickle.loads(pickle.dumps(MapReduceCancelled(2, 5)))
    assert (stop.done, stop.total, str(stop)) == (2, 5, "stopped after 2 of 5 chunks")


def test_plan_prefix_alone_too_large(counter: TokenCounter) -> None:
    planner = ContextPlanner(counter, ContextBudget(context_window=200, output_reserve=100))
    prefix = [{"role": "system", "content": _paragraph(random.Random(6), 20)}]
    with pytest.raises(ContextOverflow, match="prefix"):
        planner.plan([Piece(id="a", text="x")], prefix_messages=prefix)


def test_plan_with_images_and_frames_matches_processor(counter: TokenCounter) -> None:
    rng = random.Random(7)
    pieces: list[Piece] = []
    for page in range(6):
        pieces.append(Piece(id=f"img{page}", kind="image", image=_image(200 + 40 * page, 300, page),
                            label=f"[page {page + 1}]", boundary=2, meta={"page": page + 1}))
        pieces.append(Piece(id=f"txt{page}", text=_paragraph(rng, 3), boundary=1, meta={"page": page + 1}))
    frames = [_image(64 + 8 * (i % 3), 48, 20 + i) for i in range(60)]
    pieces.append(Piece(id="clip", kind="frames", frames=frames, timestamps=[float(i) for i in range(60)],
                        boundary=2))
    planner = ContextPlanner(counter, _budget(counter, 400))
    chunks = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX)
    _assert_valid_plan(planner, chunks, pieces)
    clip_parts = [p for c in chunks for p in c.pieces[c.overlap:] if p.id.startswith("clip#")]
    assert len(clip_parts) > 1 and sum(len(p.frames) for p in clip_parts) == 60
    for chunk in chunks:  # the real processor agrees with the planned size
        assert counter.processor(chunk.messages()).input_ids.shape[-1] == chunk.token_count


def test_plan_is_deterministic_and_fingerprints_track_content(counter: TokenCounter) -> None:
    pieces = _text_pieces(8, sections=5, paragraphs=4)
    planner = ContextPlanner(counter, ContextBudget(context_window=1500, output_reserve=200))
    a = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX, overlap_tokens=50)
    b = planner.plan([p.model_copy() for p in pieces], prefix_messages=PREFIX, suffix_messages=SUFFIX,
                     overlap_tokens=50)
    assert [(c.piece_ids, c.token_count, c.fingerprint) for c in a] == \
           [(c.piece_ids, c.token_count, c.fingerprint) for c in b]
    assert len({c.fingerprint for c in a}) == len(a)

    # change one word of the last piece: earlier chunks keep their fingerprints, the last one changes
    last = pieces[-1]
    edited = [*pieces[:-1], last.model_copy(update={"text": last.text.replace("alpha", "omega", 1)
                                                    if "alpha" in last.text else last.text + " omega"})]
    c = planner.plan(edited, prefix_messages=PREFIX, suffix_messages=SUFFIX, overlap_tokens=50)
    assert c[0].fingerprint == a[0].fingerprint
    assert c[-1].fingerprint != a[-1].fingerprint

    # other instructions: every chunk is different work
    d = planner.plan(pieces, prefix_messages=[{"role": "system", "content": "Summarise."}],
                     suffix_messages=SUFFIX, overlap_tokens=50)
    assert not {x.fingerprint for x in d} & {x.fingerprint for x in a}

    # image content (not identity) goes into the fingerprint
    img = [Piece(id="i", kind="image", image=_image(100, 100, 1))]
    f1 = planner.plan(img, prefix_messages=PREFIX)[0].fingerprint
    assert planner.plan([Piece(id="i", kind="image", image=_image(100, 100, 1))], prefix_messages=PREFIX)[0] \
        .fingerprint == f1
    assert planner.plan([Piece(id="i", kind="image", image=_image(100, 100, 2))], prefix_messages=PREFIX)[0] \
        .fingerprint != f1


def test_plan_rejects_bad_pieces(counter: TokenCounter) -> None:
    planner = ContextPlanner(counter)
    with pytest.raises(ValueError, match="duplicate"):
        planner.plan([Piece(id="a", text="x"), Piece(id="a", text="y")], prefix_messages=[])
    with pytest.raises(ValidationError):
        Piece(id="b", kind="image")
    assert planner.plan([], prefix_messages=PREFIX) == []


def test_plan_128k_scale(counter: TokenCounter) -> None:
    """~400K tokens of paragraphs against the real 128K window: fast, and every chunk fits."""
    rng = random.Random(9)
    pieces = []
    total = 0
    k = 0
    while total < 400_000:
        text = _paragraph(rng, rng.randint(2, 8))
        total += counter.count_text(text)
        pieces.append(Piece(id=f"p{k}", text=text, boundary=2 if k % 25 == 0 else 1))
        k += 1
    planner = ContextPlanner(counter, ContextBudget())
    t0 = time.perf_counter()
    chunks = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX, overlap_tokens=2000)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"planning took {elapsed:.1f}s"
    assert 3 <= len(chunks) <= 6
    _assert_valid_plan(planner, chunks, pieces)
    assert all(c.token_count > 0.5 * planner.budget.available for c in chunks[:-1])


# --------------------------------------------------------------------------------------------- map-reduce


class MemorySessionStore:
    """Minimal in-memory :class:`SessionStore` (the parts map_reduce and these tests use, per the contract)."""

    def __init__(self) -> None:
        self.records: dict[str, SessionRecord] = {}
        self.partial: dict[str, dict[str, Any]] = {}
        self.msgs: dict[str, list[dict[str, Any]]] = {}
        self.writes = 0

    def _own(self, session_id: str, owner: str | None) -> SessionRecord | None:
        rec = self.records.get(session_id)
        return rec if rec is not None and (owner is None or rec.owner == owner) else None

    def _need(self, session_id: str, owner: str | None) -> SessionRecord:
        rec = self._own(session_id, owner)
        if rec is None:
            from connectors.stores.base import NotFound

            raise NotFound(session_id)
        return rec

    async def create(self, owner, *, parent_id=None, metadata=None, ttl_s=None, session_id=None):
        sid = session_id or f"sess_{len(self.records)}"
        if sid in self.records:
            return self._need(sid, owner)
        t = time.time()
        rec = SessionRecord(id=sid, owner=owner, parent_id=parent_id, created_at=t, updated_at=t,
                            metadata=dict(metadata or {}))
        self.records[sid] = rec
        self.partial[sid] = {}
        self.msgs[sid] = []
        return rec

    async def get(self, session_id, owner):
        return self._own(session_id, owner)

    async def append(self, session_id, owner, messages, *, token_count=0):
        rec = self._need(session_id, owner)
        self.msgs[session_id].extend(messages)
        rec.token_count += token_count
        rec.message_count += len(messages)
        return rec

    async def messages(self, session_id, owner, *, start=0, end=None, resolve_media=False):
        self._need(session_id, owner)
        return self.msgs[session_id][start:end]

    async def set_partial(self, session_id, owner, key, value):
        self._need(session_id, owner)
        import json

        self.partial[session_id][key] = json.loads(json.dumps(value))  # stored as JSON, like the real stores
        self.writes += 1

    async def partials(self, session_id, owner):
        self._need(session_id, owner)
        return dict(self.partial[session_id])

    async def update_metadata(self, session_id, owner, metadata):
        rec = self._need(session_id, owner)
        rec.metadata.update(metadata)
        return rec

    async def children(self, session_id, owner):
        self._need(session_id, owner)
        return [r for r in self.records.values() if r.parent_id == session_id]

    async def delete(self, session_id, owner):
        return self.records.pop(session_id, None) is not None

    async def close(self):
        pass


class Finding(BaseModel):
    chunk: int
    words: int


def _chunks(n: int, tag: str = "") -> list[Chunk]:
    return [Chunk(index=i, piece_ids=[f"p{i}"], token_count=100 + i, fingerprint=f"fp-{i}{tag}") for i in range(n)]


def _run(coro):
    return asyncio.run(coro)


def test_memory_store_follows_protocol() -> None:
    assert isinstance(MemorySessionStore(), SessionStore)


def test_map_reduce_resumes_after_failure() -> None:
    store = MemorySessionStore()
    chunks = _chunks(6)
    calls: list[int] = []
    events: list[tuple[int, int, bool]] = []
    fail_on = {3}

    async def map_fn(chunk: Chunk, child_id: str) -> Finding:
        calls.append(chunk.index)
        assert child_id == chunk_session_id("task-1", chunk.index) == f"task-1.chunk-{chunk.index:04d}"
        if chunk.index in fail_on:
            fail_on.discard(chunk.index)
            raise RuntimeError("model replica died")
        return Finding(chunk=chunk.index, words=chunk.token_count)

    async def on_done(index: int, total: int, reused: bool) -> None:
        events.append((index, total, reused))

    reduced_inputs: list[list[Any]] = []

    def reduce_fn(results: list[Any]) -> dict[str, Any]:
        reduced_inputs.append(results)
        return {"total_words": sum(r["words"] for r in results)}

    async def scenario() -> None:
        await store.create("alice", session_id="task-1")
        with pytest.raises(RuntimeError, match="replica died"):
            await map_reduce(store, "alice", "task-1", chunks, map_fn, reduce_fn, on_chunk_done=on_done)
        assert calls == [0, 1, 2, 3]
        assert events == [(0, 6, False), (1, 6, False), (2, 6, False)]
        assert REDUCED_KEY not in await store.partials("task-1", "alice")

        calls.clear()
        events.clear()
        out = await map_reduce(store, "alice", "task-1", chunks, map_fn, reduce_fn, on_chunk_done=on_done)
        assert calls == [3, 4, 5]  # 0-2 were not recomputed
        assert (out.reused, out.computed) == (3, 3)
        assert events == [(0, 6, True), (1, 6, True), (2, 6, True), (3, 6, False), (4, 6, False), (5, 6, False)]
        assert out.chunk_results == [{"chunk": i, "words": 100 + i} for i in range(6)]
        assert out.result == {"total_words": sum(100 + i for i in range(6))}
        assert reduced_inputs[-1] == out.chunk_results  # plain JSON whether reused or fresh

        kids = await store.children("task-1", "alice")
        assert [k.id for k in kids] == [f"task-1.chunk-{i:04d}" for i in range(6)]
        assert [k.metadata["fingerprint"] for k in kids] == [c.fingerprint for c in chunks]
        assert [k.metadata["index"] for k in kids] == list(range(6))
        assert [k.metadata["token_count"] for k in kids] == [c.token_count for c in chunks]
        stored = (await store.partials("task-1.chunk-0002", "alice"))[RESULT_KEY]
        assert stored == {"fingerprint": "fp-2", "value": {"chunk": 2, "words": 102}}
        reduced = (await store.partials("task-1", "alice"))[REDUCED_KEY]
        assert reduced["value"] == out.result

        # a third run does no model work at all
        calls.clear()
        again = await map_reduce(store, "alice", "task-1", chunks, map_fn, reduce_fn)
        assert calls == [] and (again.reused, again.computed) == (6, 0)

    _run(scenario())


def test_map_reduce_fingerprint_change_recomputes_that_chunk() -> None:
    store = MemorySessionStore()
    calls: list[tuple[int, str]] = []

    async def map_fn(chunk: Chunk, child_id: str) -> dict[str, Any]:
        calls.append((chunk.index, chunk.fingerprint))
        return {"fp": chunk.fingerprint}

    async def scenario() -> None:
        first = _chunks(4)
        await map_reduce(store, "bob", "job", first, map_fn, lambda rs: [r["fp"] for r in rs])
        calls.clear()
        second = list(first)
        second[1] = first[1].model_copy(update={"fingerprint": "fp-1-edited"})
        out = await map_reduce(store, "bob", "job", second, map_fn, lambda rs: [r["fp"] for r in rs])
        assert calls == [(1, "fp-1-edited")]
        assert out.result == ["fp-0", "fp-1-edited", "fp-2", "fp-3"]
        assert (await store.get("job.chunk-0001", "bob")).metadata["fingerprint"] == "fp-1-edited"

    _run(scenario())


def test_map_reduce_with_planned_chunks(counter: TokenCounter) -> None:
    """Fingerprints from the planner: an edited piece re-runs only the chunks that contain it."""
    pieces = _text_pieces(10, sections=4, paragraphs=4)
    planner = ContextPlanner(counter, _budget(counter, int(1.2 * _section_tokens(counter, pieces))))
    chunks = planner.plan(pieces, prefix_messages=PREFIX, suffix_messages=SUFFIX)
    assert len(chunks) >= 3
    store = MemorySessionStore()
    calls: list[int] = []

    async def map_fn(chunk: Chunk, child_id: str) -> dict[str, Any]:
        calls.append(chunk.index)
        await store.append(child_id, "carol", chunk.messages()[-2:-1], token_count=chunk.token_count)
        return {"pieces": chunk.new_piece_ids}

    def reduce_fn(results: list[Any]) -> list[str]:
        return [i for r in results for i in r["pieces"]]

    async def scenario() -> None:
        out = await map_reduce(store, "carol", "doc", chunks, map_fn, reduce_fn)
        assert out.result == [p.id for p in pieces]
        calls.clear()
        last = pieces[-1]
        edited = [*pieces[:-1], last.model_copy(update={"text": last.text + " Amended."})]
        replanned = planner.plan(edited, prefix_messages=PREFIX, suffix_messages=SUFFIX)
        out = await map_reduce(store, "carol", "doc", replanned, map_fn, reduce_fn)
        assert calls == [len(replanned) - 1] and out.reused == len(replanned) - 1

    _run(scenario())


def test_map_reduce_cancellation_between_chunks() -> None:
    store = MemorySessionStore()
    calls: list[int] = []

    async def map_fn(chunk: Chunk, child_id: str) -> int:
        calls.append(chunk.index)
        return chunk.index * 10

    async def scenario() -> None:
        stop_after = {"n": 2}

        async def should_stop() -> bool:
            return len(calls) >= stop_after["n"]

        with pytest.raises(MapReduceCancelled) as info:
            await map_reduce(store, "dan", "vid", _chunks(5), map_fn, sum, should_stop=should_stop)
        assert calls == [0, 1] and (info.value.done, info.value.total) == (2, 5)

        class TaskCancelled(Exception):
            pass

        def check_cancelled() -> None:  # the AgentContext style: raise instead of returning True
            if len(calls) >= 3:
                raise TaskCancelled()

        with pytest.raises(TaskCancelled):
            await map_reduce(store, "dan", "vid", _chunks(5), map_fn, sum, should_stop=check_cancelled)
        assert calls == [0, 1, 2]

        out = await map_reduce(store, "dan", "vid", _chunks(5), map_fn, sum, should_stop=lambda: False)
        assert calls == [0, 1, 2, 3, 4] and out.result == 100 and (out.reused, out.computed) == (3, 2)

    _run(scenario())


def test_map_reduce_concurrency_keeps_order_and_json_rules() -> None:
    store = MemorySessionStore()
    running = {"now": 0, "max": 0}

    async def map_fn(chunk: Chunk, child_id: str) -> Finding:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await asyncio.sleep(0.01 * ((7 - chunk.index) % 3))
        running["now"] -= 1
        return Finding(chunk=chunk.index, words=1)

    async def reduce_fn(results: list[Any]) -> Finding:
        return Finding(chunk=-1, words=sum(r["words"] for r in results))

    async def scenario() -> None:
        out = await map_reduce(store, "eve", "par", _chunks(8), map_fn, reduce_fn, concurrency=3)
        assert running["max"] == 3
        assert [r["chunk"] for r in out.chunk_results] == list(range(8))
        assert out.result == Finding(chunk=-1, words=8)
        assert (await store.partials("par", "eve"))[REDUCED_KEY]["value"] == {"chunk": -1, "words": 8}

        async def bad_map(chunk: Chunk, child_id: str) -> Any:
            return {"when": object()}

        with pytest.raises(TypeError, match="chunk 0"):
            await map_reduce(store, "eve", "bad", _chunks(1), bad_map, list)
        assert RESULT_KEY not in await store.partials("bad.chunk-0000", "eve")

    _run(scenario())


def test_map_reduce_with_sqlite_store(tmp_path: Path) -> None:
    """The same resume flow against the real SQLite store (skipped while connectors.stores has none)."""
    try:
        from connectors.stores import open_stores
    except ImportError as exc:
        pytest.skip(f"connectors.stores.open_stores not available yet: {exc}")

    calls: list[int] = []
    fail = {"armed": True}

    async def map_fn(chunk: Chunk, child_id: str) -> dict[str, int]:
        calls.append(chunk.index)
        if chunk.index == 2 and fail["armed"]:
            fail["armed"] = False
            raise RuntimeError("boom")
        return {"i": chunk.index}

    def sessions_of(stores: Any) -> Any:
        if isinstance(stores, SessionStore):
            return stores
        found = getattr(stores, "sessions", None)
        if found is None and isinstance(stores, (tuple, list)):
            found = next((s for s in stores if isinstance(s, SessionStore)), None)
        assert found is not None, f"cannot find a SessionStore in {stores!r}"
        return found

    async def scenario() -> None:
        stores = open_stores(f"sqlite:///{tmp_path / 'kimiray.db'}")
        if asyncio.iscoroutine(stores):
            stores = await stores
        sessions = sessions_of(stores)
        try:
            await sessions.create("zoe", session_id="sq")
            with pytest.raises(RuntimeError):
                await map_reduce(sessions, "zoe", "sq", _chunks(4), map_fn, list)
            calls.clear()
            out = await map_reduce(sessions, "zoe", "sq", _chunks(4), map_fn, list)
            assert calls == [2, 3] and out.result == [{"i": i} for i in range(4)]
            kids = await sessions.children("sq", "zoe")
            assert [k.id for k in kids] == [f"sq.chunk-{i:04d}" for i in range(4)]
        finally:
            closer = getattr(stores, "close", None) or getattr(sessions, "close")
            res = closer()
            if asyncio.iscoroutine(res):
                await res

    _run(scenario())
