"""A text layer for scanned pages: Tesseract (built into MuPDF) through PyMuPDF's ``get_textpage_ocr``.

The model still reads a scanned page's image; the OCR text is what its quotes are verified against and where the
highlights go (OCR words carry boxes).  MuPDF only needs Tesseract's language data (``tessdata``: Debian's
``tesseract-ocr-eng``); without it OCR is unavailable and the reader says so with the code ``ocr_unavailable``
rather than leaving the page silently empty.  Tesseract cannot be interrupted inside a page, so the reader bounds OCR
by a page count and a time budget between pages.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
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


def ocr_blocks(page: pymupdf.Page, *, tessdata: str, language: str = DEFAULT_LANGUAGE,
               dpi: int | None = None) -> list[RawBlock]:
    """The page's text as OCR reads it, as blocks of lines with their boxes (page coordinates)."""
    textpage = page.get_textpage_ocr(flags=TEXT_FLAGS, language=language, dpi=dpi or OCR_DPI, full=True,
                                     tessdata=tessdata)
    return text_blocks(page.get_text("dict", flags=TEXT_FLAGS, textpage=textpage))
