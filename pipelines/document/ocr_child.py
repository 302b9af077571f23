"""Child process of ``pipelines.document.ocr.ocr_blocks``: OCR of a one-page PDF. Run as a script, not a module of
the package: it imports PyMuPDF alone (0.3 s), not ``pipelines`` (torch, 2 s).

stdin: a 4-byte big-endian length, that many bytes of JSON ({"language", "dpi", "tessdata", "flags"}), then the
PDF.
stdout: JSON of the page's text dict (blocks -> lines -> spans with text, flags and boxes), which
``pipelines.document.layout.text_blocks`` reads.
"""

from __future__ import annotations

import json
import sys

import pymupdf


def main() -> None:
    raw = sys.stdin.buffer.read()
    size = int.from_bytes(raw[:4], "big")
    request = json.loads(raw[4:4 + size])
    with pymupdf.open(stream=raw[4 + size:], filetype="pdf") as doc:
        page = doc.load_page(0)
        flags = int(request["flags"])
        textpage = page.get_textpage_ocr(flags=flags, language=request["language"], dpi=request["dpi"], full=True,
                                         tessdata=request["tessdata"])
        page_dict = page.get_text("dict", flags=flags, textpage=textpage)
    blocks = [{"type": 0, "lines": [{"bbox": list(line["bbox"]),
                                     "spans": [{"text": s.get("text", ""), "flags": s.get("flags", 0)}
                                               for s in line.get("spans", [])]}
                                    for line in block.get("lines", [])]}
              for block in page_dict.get("blocks", []) if block.get("type", 0) == 0]
    sys.stdout.write(json.dumps({"blocks": blocks}))


if __name__ == "__main__":
    main()
