"""The web console's static files at ``/ui`` (plain HTML/CSS/JS modules shipped in the package: no build step, no
CDN). The pages hold no secret, so they are served without a key; everything they show comes from the public REST
API with the key the user signs in with. A strict Content-Security-Policy forbids inline scripts, remote assets
and framing, so text that slips into the DOM still cannot run."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from connectors.errors import ClientInputError

CONSOLE_DIR = Path(__file__).with_name("console")
CONSOLE_PREFIX = "/ui"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".txt": "text/plain; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "media-src 'self' blob:; connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def is_console_path(path: str) -> bool:
    """The console's own files (served without a key; the API calls they make carry one)."""
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


def _safe(name: str) -> bool:
    """No dot-segments, hidden names, empty segments or backslashes."""
    return "\\" not in name and not any(part.startswith(".") or not part for part in name.split("/"))


def _asset(name: str) -> Path:
    """The file ``name`` inside the console folder, or 404 - never a path outside it."""
    if not _safe(name):
        raise ClientInputError(f"no console file {name!r}", status_code=404, code="not_found", param="path")
    path = (CONSOLE_DIR / name).resolve()
    if CONSOLE_DIR.resolve() not in path.parents or not path.is_file() or path.suffix not in CONTENT_TYPES:
        raise ClientInputError(f"no console file {name!r}", status_code=404, code="not_found", param="path")
    return path


@router.get(CONSOLE_PREFIX)
async def console_root() -> RedirectResponse:
    return RedirectResponse(CONSOLE_PREFIX + "/", status_code=308)


@router.get(CONSOLE_PREFIX + "/{name:path}")
async def console_file(name: str) -> Response:
    """A console file; unknown names that look like a page (no extension) get ``index.html``."""
    if not name or (_safe(name) and "." not in name.rsplit("/", 1)[-1]):
        name = "index.html"
    path = _asset(name)
    return Response(path.read_bytes(), media_type=CONTENT_TYPES[path.suffix], headers=SECURITY_HEADERS)
