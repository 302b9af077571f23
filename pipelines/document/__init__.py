"""Reading documents (PDF) into the shared data model, and synthetic contracts to test that on."""

from pipelines.document.reader import PdfReader, iter_pages, open_pdf, read_pdf
from pipelines.document.types import (
    Block,
    BBox,
    Document,
    DocumentError,
    GoldClause,
    Page,
    PredictedClause,
    Section,
    Table,
)

__all__ = [
    "BBox",
    "Block",
    "Document",
    "DocumentError",
    "GoldClause",
    "Page",
    "PdfReader",
    "PredictedClause",
    "Section",
    "Table",
    "iter_pages",
    "open_pdf",
    "read_pdf",
]
