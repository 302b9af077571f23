"""Word (.docx) -> an escaped HTML rendering + paragraph anchors, read in body order with python-docx's XML.

What is kept: headings (``Heading N`` / ``Title`` styles), list numbering (``w:numPr``, counted per list and
level and shown as "1.2."), tables (row by row), the headers and footers of each section (once, marked), tracked
changes *as such* (an insertion reads "[inserted: …]", a deletion "[deleted: …]"; nothing is silently accepted or
rejected) and comments ("[comment by X: …]" after the paragraph they are anchored in).  No office suite is used.

Refusals (``DocumentError``): ``encrypted`` (a password-protected Word file is an OLE container holding an
``EncryptedPackage``), ``unsupported_format`` (an old binary .doc), ``corrupt`` (not a readable OOXML package),
``too_large`` (the package inflates to more than ``max_unzipped_bytes`` — a ZIP bomb).
"""

from __future__ import annotations

import io
import zipfile

from pipelines.document.render import HtmlDoc, esc
from pipelines.document.types import DocumentError

W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
DEFAULT_MAX_UNZIPPED = 200 * 2**20
_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ENCRYPTED_PACKAGE = "EncryptedPackage".encode("utf-16-le")


def check_package(data: bytes, max_unzipped_bytes: int | None = None) -> None:
    """Typed refusal of what python-docx would choke on (or inflate without bound)."""
    max_unzipped_bytes = DEFAULT_MAX_UNZIPPED if max_unzipped_bytes is None else max_unzipped_bytes
    if data.startswith(_OLE):
        if _ENCRYPTED_PACKAGE in data:
            raise DocumentError("the Word file is password-protected (encrypted); save it without a password",
                                "encrypted")
        raise DocumentError("an old binary Word .doc (or other OLE file) is not supported; save it as .docx",
                            "unsupported_format")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DocumentError(f"the Word file is not a readable .docx package: {exc}", "corrupt") from None
    if "word/document.xml" not in names:
        raise DocumentError("ZIP archive without word/document.xml: not a Word .docx", "corrupt")
    if total > max_unzipped_bytes:
        raise DocumentError(f"the .docx inflates to {total} bytes, over the limit of {max_unzipped_bytes}",
                            "too_large")


def _runs_html(p, comments_out: list[str]) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A paragraph's HTML and plain text, tracked changes marked, comment ids collected."""
    html_parts: list[str] = []
    plain: list[str] = []

    def run_text(r) -> str:  # type: ignore[no-untyped-def]
        out = []
        for el in r.iter():
            if el.tag in (W + "t", W + "delText"):
                out.append(el.text or "")
            elif el.tag == W + "tab":
                out.append("\t")
            elif el.tag in (W + "br", W + "cr"):
                out.append("\n")
        return "".join(out)

    for child in p:
        tag = child.tag
        if tag in (W + "ins", W + "del"):
            text = "".join(run_text(r) for r in child.iter(W + "r"))
            if text:
                word = "inserted" if tag == W + "ins" else "deleted"
                author = child.get(W + "author")
                mark = f"[{word}{' by ' + author if author else ''}: {text}]"
                html_parts.append(f'<span class="{"ins" if word == "inserted" else "del"}">{esc(mark)}</span>')
                plain.append(mark)
        elif tag in (W + "r", W + "hyperlink", W + "smartTag", W + "sdt", W + "fldSimple"):
            text = "".join(run_text(r) for r in ([child] if tag == W + "r" else child.iter(W + "r")))
            html_parts.append(esc(text))
            plain.append(text)
        if tag == W + "commentRangeStart" or tag == W + "r":
            for ref in ([child] if tag == W + "commentRangeStart" else child.iter(W + "commentReference")):
                cid = ref.get(W + "id")
                if cid is not None and cid not in comments_out:
                    comments_out.append(cid)
    return "".join(html_parts), "".join(plain)


def _comments(document) -> dict[str, tuple[str, str]]:  # type: ignore[no-untyped-def]
    from lxml import etree

    for rel in document.part.rels.values():
        if rel.reltype.endswith("/comments") and not rel.is_external:
            root = etree.fromstring(rel.target_part.blob, parser=etree.XMLParser(resolve_entities=False,
                                                                                  no_network=True))
            return {c.get(W + "id"): (c.get(W + "author") or "unknown",
                                      " ".join("".join(t.text or "" for t in p.iter(W + "t"))
                                               for p in c.iter(W + "p")).strip())
                    for c in root.iter(W + "comment")}
    return {}


class _Numbering:
    """Hierarchical counters per list (numId) and level: "1.", "1.1.", "2." …"""

    def __init__(self) -> None:
        self.counters: dict[str, list[int]] = {}

    def label(self, p, style_num=None) -> str | None:  # type: ignore[no-untyped-def]
        """``style_num``: the numPr of the paragraph's style ("List Number" carries its numbering there)."""
        ppr = p.find(W + "pPr")
        num = ppr.find(W + "numPr") if ppr is not None else None
        if num is None:
            num = style_num
        if num is None:
            return None
        num_id = num.find(W + "numId")
        ilvl = num.find(W + "ilvl")
        nid = num_id.get(W + "val") if num_id is not None else "0"
        level = int(ilvl.get(W + "val")) if ilvl is not None else 0
        if nid == "0":
            return None
        counts = self.counters.setdefault(nid, [])
        counts[:] = counts[: level + 1] + [0] * (level + 1 - len(counts))
        counts[level] += 1
        return ".".join(str(c or 1) for c in counts[: level + 1]) + "."


def docx_to_html(data: bytes, *, max_unzipped_bytes: int | None = None) -> tuple[HtmlDoc, str | None]:
    """The rendering and the document's title (core properties), or a ``DocumentError``."""
    check_package(data, max_unzipped_bytes)
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
        comments = _comments(document)
    except Exception as exc:  # noqa: BLE001 - python-docx/lxml raise many types for a damaged package
        raise DocumentError(f"the .docx cannot be read: {exc}", "corrupt") from None
    out = HtmlDoc()
    numbering = _Numbering()
    seen_furniture: set[str] = set()
    paragraph_no = table_no = 0

    def furniture(kind: str) -> None:
        for section in document.sections:
            part = section.header if kind == "header" else section.footer
            try:
                text = "\n".join(p.text for p in part.paragraphs if p.text.strip())
            except Exception:  # noqa: BLE001 - a missing header part is just no header
                continue
            if text and text not in seen_furniture:
                seen_furniture.add(text)
                out.text("p", f"[{kind}: {text}]", label=kind, cls="meta")

    furniture("header")
    styles = {s.style_id: (s.name or "") for s in document.styles}
    style_nums = {}
    for st in document.styles:
        ppr = st.element.find(W + "pPr")
        if ppr is not None and ppr.find(W + "numPr") is not None:
            style_nums[st.style_id] = ppr.find(W + "numPr")
    for child in document.element.body:
        if child.tag == W + "p":
            ids: list[str] = []
            inner, plain = _runs_html(child, ids)
            ppr = child.find(W + "pPr")
            style_el = ppr.find(W + "pStyle") if ppr is not None else None
            style = styles.get(style_el.get(W + "val"), "") if style_el is not None else ""
            number = numbering.label(child, style_nums.get(style_el.get(W + "val")) if style_el is not None
                                     else None)
            if number:
                inner, plain = esc(number + " ") + inner, number + " " + plain
            if plain.strip():
                paragraph_no += 1
                level = 1 if style == "Title" else int(style.split()[-1]) if style.startswith("Heading ") and \
                    style.split()[-1].isdigit() else 0
                tag = f"h{min(level, 3)}" if level else "p"
                out.block(tag, inner, plain, label=f"paragraph {paragraph_no}")
            for cid in ids:
                if cid in comments:
                    author, text = comments[cid]
                    out.text("p", f"[comment by {author}: {text}]", label=f"comment on paragraph {paragraph_no}",
                             cls="note")
        elif child.tag == W + "tbl":
            table_no += 1
            rows = []
            for tr in child.iter(W + "tr"):
                cells = []
                for tc in tr.iter(W + "tc"):
                    texts = [_runs_html(p, [])[1] for p in tc.iter(W + "p")]
                    cells.append(" ".join(t for t in texts if t))
                rows.append(cells)
            out.table(rows, label=f"table {table_no}")
    furniture("footer")
    title = (document.core_properties.title or "").strip() or None
    return out, title
