"""A text layer for scanned pages: Tesseract (built into MuPDF) through PyMuPDF's ``get_textpage_ocr``.

The model still reads a scanned page's image; the OCR text is what its quotes are verified against and where the
highlights go (OCR words carry boxes).  MuPDF only needs Tesseract's language data (``tessdata``: Debian's
``tesseract-ocr-eng``); without it OCR is unavailable and the reader says so with the code ``ocr_unavailable``
rather than leaving the page silently empty.  Each page is read in a child process (it holds the GIL throughout),
which is killed when the reader's time budget runs out; the reader also bounds OCR by a page count.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pymupdf

from pipelines.document.layout import TEXT_FLAGS, RawBlock, text_blocks
from pipelines.document.types import DocumentError

OCR_DPI = 300
DEFAULT_LANGUAGE = "eng"


@lru_cache(maxsize=4)
def find_tessdata(language: str = DEFAULT_LANGUAGE) -> str | None:
    """The folder holding ``<language>.traineddata``: ``$TESSDATA_PREFIX``, else the one ``tesseract --list-langs``
    names, else Debian's usual places.  None when there is none."""
    candidates: list[str] = []
    if os.environ.get("TESSDATA_PREFIX"):
        candidates.append(os.environ["TESSDATA_PREFIX"])
    exe = shutil.which("tesseract")
    if exe:
        try:
            out = subprocess.run([exe, "--list-langs"], capture_output=True, text=True, timeout=10, check=False)
            m = re.search(r'List of available languages in "(.+?)"', out.stdout + out.stderr)
            if m:
                candidates.append(m.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/share/tesseract-ocr/*/tessdata"), reverse=True)
    candidates += ["/usr/share/tessdata", "/usr/local/share/tessdata"]
    for folder in candidates:
        if (Path(folder) / f"{language}.traineddata").is_file():
            return str(folder)
    return None


def require_tessdata(language: str = DEFAULT_LANGUAGE) -> str:
    folder = find_tessdata(language)
    if folder is None:
        raise DocumentError(
            f"the document has scanned pages and OCR is unavailable on this server: Tesseract language data "
            f"'{language}' not found (install tesseract-ocr and tesseract-ocr-{language}, or set TESSDATA_PREFIX; "
            f"or submit with ocr=false to send scanned pages to the model as images only, unverifiable)",
            "ocr_unavailable")
    return folder


class OcrTimeout(Exception):
    """A page's OCR ran past its time limit (its child process was killed)."""


def ocr_blocks(page: pymupdf.Page, *, tessdata: str, language: str = DEFAULT_LANGUAGE,
               dpi: int | None = None, timeout_s: float = 600.0) -> list[RawBlock]:
    """The page's text as OCR reads it, as blocks of lines with their boxes (page coordinates).

    It runs in a child process (``pipelines.document.ocr_child``) on a one-page copy of the document: MuPDF's
    Tesseract holds the GIL for the whole page (5.5 s at 300 dpi on a 2-core machine), which in-process would
    freeze every thread of a service -- its event loop, HTTP handlers and task heartbeats (a 5 s lease was lost
    that way). A child also makes the page interruptible: past ``timeout_s`` it is killed (:class:`OcrTimeout`)."""
    single = pymupdf.open()
    try:
        single.insert_pdf(page.parent, from_page=page.number, to_page=page.number)
        data = single.tobytes()
    finally:
        single.close()
    request = json.dumps({"language": language, "dpi": dpi or OCR_DPI, "tessdata": tessdata,
                          "flags": TEXT_FLAGS}).encode()
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("ocr_child.py"))],
                              input=len(request).to_bytes(4, "big") + request + data, capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise OcrTimeout(f"OCR of page {page.number + 1} ran past {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"OCR failed: {done.stderr.decode(errors='replace')[-500:]}")
    return text_blocks(json.loads(done.stdout))
