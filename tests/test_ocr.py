"""Scanned pages get an OCR text layer (Tesseract through PyMuPDF): quotes from them verify (``source: "ocr"``) and
are highlighted at the OCR boxes, a changed number or name still fails, mixed PDFs work page by page, OCR is bounded
in pages and time, a garbage text layer is OCR'd too, and a machine without Tesseract's data fails with
``ocr_unavailable``."""

from __future__ import annotations

import asyncio
import io
import json
import random

import pymupdf
import pytest
from PIL import Image, ImageFilter

from pipelines.document import ocr
from pipelines.document.annotate import AnnotatedItem, annotate_pdf
from pipelines.document.citations import verify
from pipelines.document.reader import read_pdf
from pipelines.document.types import DocumentError

CLAUSE = ("This Agreement shall be governed by the laws of the State of Delaware. Either party may terminate this "
          "Agreement upon sixty (60) days prior written notice to the other party. The Distributor shall pay "
          "Accuray a fee of 25,000 dollars within thirty (30) days of each invoice.")
TEXT_PAGE = ("The Supplier shall deliver the Products to the warehouse of the Buyer in Ohio within ten (10) business "
             "days of each purchase order.")
QUOTE = "Either party may terminate this Agreement upon sixty (60) days prior written notice to the other party."

pytestmark = pytest.mark.skipif(ocr.find_tessdata() is None, reason="Tesseract language data (tesseract-ocr-eng) "
                                "is not installed")


def _text_page_pixmap(text: str, dpi: int = 200) -> pymupdf.Pixmap:
    src = pymupdf.open()
    page = src.new_page(width=612, height=792)
    page.insert_textbox(pymupdf.Rect(72, 72, 540, 400), text, fontsize=12, fontname="tiro")
    pix = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY)
    src.close()
    return pix


def _scan_like_png(text: str, seed: int = 0) -> bytes:
    """What a photocopier gives: grey, slightly rotated, speckled, blurred, JPEG-compressed at 150 dpi."""
    rng = random.Random(seed)
    image = Image.open(io.BytesIO(_text_page_pixmap(text, dpi=150).tobytes("png"))).convert("L")
    image = image.rotate(0.6, resample=Image.Resampling.BICUBIC, fillcolor=235, expand=False)
    pixels = image.load()
    for _ in range(image.width * image.height // 200):
        x, y = rng.randrange(image.width), rng.randrange(image.height)
        pixels[x, y] = rng.choice((40, 120, 200))
    image = image.filter(ImageFilter.GaussianBlur(0.5)).point(lambda v: min(255, int(v * 0.92 + 12)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=55)
    return out.getvalue()


def image_only_pdf(pages: list[str | None], *, scan_like: bool = False) -> bytes:
    """One page per entry: text (rendered to an image, no text layer), or None for a normal text page."""
    doc = pymupdf.open()
    for i, text in enumerate(pages):
        page = doc.new_page(width=612, height=792)
        if text is None:
            page.insert_textbox(pymupdf.Rect(72, 72, 540, 400), TEXT_PAGE, fontsize=11)
        elif scan_like:
            page.insert_image(page.rect, stream=_scan_like_png(text, seed=i))
        else:
            page.insert_image(page.rect, pixmap=_text_page_pixmap(text))
    data = doc.tobytes(deflate=True)
    doc.close()
    return data


@pytest.fixture(scope="module")
def mixed() -> bytes:
    return image_only_pdf([None, CLAUSE])


def test_scanned_page_gets_an_ocr_text_layer_and_its_quotes_verify(mixed: bytes) -> None:
    image_only = read_pdf(mixed)  # OCR off: the page is image-only and nothing on it can verify
    assert image_only.pages[1].scanned and not image_only.pages[1].text and image_only.ocr_pages == 0
    assert verify(image_only, QUOTE, [2]) is None

    document = read_pdf(mixed, ocr=True)
    text_page, scanned = document.pages
    assert not text_page.scanned and not text_page.ocr and "Ohio" in text_page.text
    assert scanned.scanned and scanned.ocr and scanned.image_png and document.ocr_pages == 1
    assert "Delaware" in scanned.text and scanned.blocks
    c = verify(document, QUOTE, [2])
    assert c is not None and c.verified and c.source == "ocr" and c.page == 2 and c.bboxes
    for x0, y0, x1, y1 in c.bboxes:  # OCR line boxes in page coordinates, where the clause was drawn
        assert 60 <= x0 < x1 <= 560 and 60 <= y0 < y1 <= 420 and y1 - y0 < 30
    text_hit = verify(document, "deliver the Products to the warehouse of the Buyer in Ohio", [1])
    assert text_hit is not None and text_hit.source == "text" and text_hit.page == 1  # page by page
    # OCR's fuzziness is never room for a different number or name
    for fake in (QUOTE.replace("sixty (60)", "ninety (90)"), QUOTE.replace("(60)", "(80)"),
                 "shall be governed by the laws of the State of Nevada"):
        assert verify(document, fake, [2], search_neighbours=0) is None, fake


def test_ocr_citations_are_highlighted(mixed: bytes) -> None:
    document = read_pdf(mixed, ocr=True)
    c = verify(document, QUOTE, [2])
    out = pymupdf.open(stream=annotate_pdf(mixed, [AnnotatedItem(label="Termination", value="60 days",
                                                                 citations=[c])]), filetype="pdf")
    rects = [pymupdf.Rect(a.rect) for a in out[1].annots() if a.type[1] == "Highlight"]
    assert rects and all(r.y0 >= 60 and r.y1 <= 420 for r in rects)


def test_a_scan_like_page_reads(tmp_path) -> None:
    pdf = image_only_pdf([CLAUSE], scan_like=True)
    document = read_pdf(pdf, ocr=True)
    assert document.pages[0].ocr
    c = verify(document, "Either party may terminate this Agreement upon sixty (60) days prior written notice", [1])
    assert c is not None and c.source == "ocr"
    assert verify(document, "Either party may terminate this Agreement upon ninety (90) days prior written notice",
                  [1]) is None


def test_ocr_is_bounded_in_pages_and_time() -> None:
    pdf = image_only_pdf([CLAUSE, CLAUSE, CLAUSE])
    bounded = read_pdf(pdf, ocr=True, max_ocr_pages=1)
    assert [p.ocr for p in bounded.pages] == [True, False, False]
    assert (bounded.ocr_pages, bounded.ocr_skipped) == (1, 2)
    assert all(p.scanned and p.image_png for p in bounded.pages)  # the model still gets every page's image
    timed = read_pdf(pdf, ocr=True, ocr_time_s=1e-6)  # checked between pages (a page started gets OCR_PAGE_MIN_S)
    assert (timed.ocr_pages, timed.ocr_skipped) == (1, 2)
    progress: list[tuple[int, int]] = []
    read_pdf(pdf, ocr=True, max_ocr_pages=1, on_page=lambda d, n: progress.append((d, n)))
    assert progress == [(1, 3), (2, 3), (3, 3)]


def test_ocr_leaves_the_callers_threads_running() -> None:
    """MuPDF's Tesseract holds the GIL for a whole page: run in-process it froze a service's event loop (task
    heartbeats, HTTP handlers) for seconds. It runs in a child process, so a thread beside the reader keeps ticking."""
    import threading
    import time

    pdf = image_only_pdf([CLAUSE, TEXT_PAGE + " " + CLAUSE, CLAUSE])
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.wait(0.02):
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.monotonic()
    try:
        document = read_pdf(pdf, ocr=True)
    finally:
        stop.set()
        ticker.join()
    assert document.ocr_pages == 3 and all("Delaware" in p.text for p in document.pages)
    assert time.monotonic() - started > 0.5 and max(gaps) < 0.5, max(gaps)  # ticks every 20 ms throughout


def test_a_page_past_its_time_limit_is_killed() -> None:
    doc = pymupdf.open(stream=image_only_pdf([CLAUSE]), filetype="pdf")
    with pytest.raises(ocr.OcrTimeout):
        ocr.ocr_blocks(doc[0], tessdata=ocr.find_tessdata(), timeout_s=0.01)
    assert any("Delaware" in ln.text for b in ocr.ocr_blocks(doc[0], tessdata=ocr.find_tessdata()) for ln in b.lines)


def test_a_garbage_text_layer_is_read_with_ocr() -> None:
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_image(page.rect, pixmap=_text_page_pixmap(CLAUSE))
    # an invisible text layer of unmapped glyphs over the image, as broken PDF producers write it
    page.insert_text((72, 700), "".join(chr(0xE000 + i % 200) for i in range(120)), fontsize=4, render_mode=3)
    pdf = doc.tobytes()
    document = read_pdf(pdf, ocr=True)
    assert document.pages[0].ocr and "Delaware" in document.pages[0].text


def test_missing_tesseract_data_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path, mixed: bytes) -> None:
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))  # no eng.traineddata there
    monkeypatch.setattr(ocr, "find_tessdata", lambda language="eng": None)
    with pytest.raises(DocumentError) as err:
        read_pdf(mixed, ocr=True)
    assert err.value.code == "ocr_unavailable" and "tesseract-ocr" in err.value.message
    assert read_pdf(mixed, ocr=False).pages[1].scanned  # without OCR the document still reads


# -- through the contract agent -------------------------------------------------------------------------------------


class ScannedQuoteModel:
    """Quotes the clause of the scanned page 2 (as a model reading the page image would)."""

    async def generate(self, request):
        from connectors.model_client import ModelReply
        from engine.runtime.request import Usage

        item = {"category": "termination_for_convenience", "value": "Yes", "quote": QUOTE, "page": 2}
        bounds = request.json_schema["properties"]["items"]["items"]["properties"]["page"]
        items = [item] if bounds["minimum"] <= 2 <= bounds["maximum"] else []
        return ModelReply(text=json.dumps({"items": items}), finish_reason="stop",
                          usage=Usage(prompt_tokens=10, completion_tokens=10))


def test_the_agent_verifies_quotes_from_scanned_pages(tmp_path, mixed: bytes) -> None:
    from connectors.stores import open_stores
    from tests.test_contract_agent import _input, _run_task

    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        _, done = await _run_task(stores, ScannedQuoteModel(), _input(mixed, categories=["Termination For Convenience"]))
        assert done.status == "succeeded", done.error
        [value] = done.result["fields"][0]["values"]
        [citation] = value["citations"]
        assert value["verified"] and citation["source"] == "ocr" and citation["page"] == 2 and citation["bboxes"]
        assert 0 < value["confidence"] <= 1
        # without OCR the same quote cannot be checked: unverified, never silently empty
        _, plain = await _run_task(stores, ScannedQuoteModel(), _input(mixed, categories=["Termination For Convenience"],
                                                                        ocr=False))
        assert plain.status == "succeeded" and not plain.result["fields"][0]["values"][0]["verified"]
        await stores.close()

    asyncio.run(main())


def test_the_agent_fails_with_ocr_unavailable(tmp_path, mixed: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.stores import open_stores
    from tests.test_contract_agent import _input, _run_task

    monkeypatch.setattr(ocr, "find_tessdata", lambda language="eng": None)

    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        _, done = await _run_task(stores, ScannedQuoteModel(), _input(mixed))
        assert done.status == "failed" and done.error.code == "ocr_unavailable", done.error
        assert done.attempts == 1
        await stores.close()

    asyncio.run(main())
