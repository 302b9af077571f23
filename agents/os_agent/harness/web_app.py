"""A small web application for browser tasks: a login form, a search with results, settings toggles, a sortable
table and a file download, served on loopback by the test itself (stdlib ``http.server``, no network).

Why: a harness task must be judged by the application's own state, not by screenshots. The server records what
happened (logins, searches, opened results, saved settings, table sorts, downloads), and every page reports its
elements' boxes in screen pixels (``/api/layout``) so a scripted model can act like a model that sees the page.
Passwords are compared, never stored: the records say only whether a login succeeded.
"""

from __future__ import annotations

import hmac
import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

ITEMS = [("Kimi-VL technical report", 0), ("Kimi-VL model card", 1), ("MoonViT encoder", 2),
         ("Ray Serve guide", 3), ("Kimi-VL on OSWorld", 4)]
PRODUCTS = [("Keyboard", 49), ("Monitor", 189), ("Mouse", 19), ("Laptop", 999), ("Cable", 5)]
REPORT = b"quarter,revenue\nQ1,120\nQ2,135\n"

# Every page reports the boxes of its [data-box] elements (screen pixels: page offset + window position; in
# kiosk mode the viewport is the window), its focused element and its inputs' values, after every change.
_LAYOUT_JS = """
function report() {
  const boxes = {};
  const dy = window.screenY + (window.outerHeight - window.innerHeight);
  const dx = window.screenX;
  for (const el of document.querySelectorAll('[data-box]')) {
    const r = el.getBoundingClientRect();
    if (r.width && r.height) boxes[el.dataset.box] = [r.left + dx, r.top + dy, r.right + dx, r.bottom + dy]
      .map(Math.round);
  }
  const values = {};
  for (const el of document.querySelectorAll('input[data-box]')) {
    values[el.dataset.box] = el.type === 'checkbox' ? el.checked : (el.type === 'password' ? el.value.length
      : el.value);
  }
  const focus = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.box
    || null : null;
  navigator.sendBeacon('/api/layout', JSON.stringify({page: document.body.dataset.page, boxes, values, focus,
    sort: window.currentSort || null}));
}
for (const ev of ['load', 'input', 'change', 'focusin', 'click', 'resize']) window.addEventListener(ev,
  () => setTimeout(report, 30));
"""

_SORT_JS = """
window.currentSort = null;
function sortBy(col) {
  const tbody = document.querySelector('tbody');
  const rows = Array.from(tbody.rows);
  const dir = window.currentSort && window.currentSort.col === col && window.currentSort.dir === 'asc'
    ? 'desc' : 'asc';
  const idx = col === 'name' ? 0 : 1;
  rows.sort((a, b) => {
    const x = a.cells[idx].textContent, y = b.cells[idx].textContent;
    const c = idx ? Number(x) - Number(y) : x.localeCompare(y);
    return dir === 'asc' ? c : -c;
  });
  rows.forEach(r => tbody.appendChild(r));
  window.currentSort = {col, dir, order: rows.map(r => r.cells[0].textContent)};
  fetch('/api/sort', {method: 'POST', body: JSON.stringify(window.currentSort)});
}
"""

_STYLE = ("body{font:18px sans-serif;margin:24px} input,button{font:18px sans-serif;margin:6px;padding:6px} "
          "th{cursor:pointer;padding:8px 24px;background:#dde} td{padding:6px 24px} a{margin:6px;display:inline-block}")


def _page(name: str, title: str, body: str, script: str = "") -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body data-page='{name}'><h1>{html.escape(title)}</h1>{body}"
            f"<script>{_LAYOUT_JS}{script}</script></body></html>").encode()


class WebAppState:
    """What the server saw; read by task checks (``snapshot``)."""

    def __init__(self, password: str) -> None:
        self._password = password
        self.lock = threading.Lock()
        self.logins: list[dict[str, Any]] = []
        self.searches: list[str] = []
        self.opened: list[int] = []
        self.settings: dict[str, bool] | None = None
        self.sorts: list[dict[str, Any]] = []
        self.downloads = 0
        self.layout: dict[str, Any] = {}

    def check_password(self, given: str) -> bool:
        return bool(self._password) and hmac.compare_digest(given.encode(), self._password.encode())

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps({
                "logins": self.logins, "searches": self.searches, "opened": self.opened, "settings": self.settings,
                "sorts": self.sorts, "downloads": self.downloads, "page": self.layout.get("page"),
                "widgets": self.layout.get("boxes", {}), "values": self.layout.get("values", {}),
                "focus": self.layout.get("focus"), "sort": self.layout.get("sort")}))


def _handler(state: WebAppState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet: tests read records, not access logs
            return

        def _send(self, body: bytes, content_type: str = "text/html; charset=utf-8", status: int = 200,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 20))

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path in ("/", "/login"):
                self._send(_page("login", "Sign in", (
                    "<form method='post' action='/login'><div>User <input name='user' data-box='user' "
                    "autocomplete='off'></div><div>Password <input type='password' name='password' "
                    "data-box='password' autocomplete='off'></div><button data-box='sign_in'>Sign in</button>"
                    "</form>")))
            elif url.path == "/welcome":
                self._send(_page("welcome", "Welcome", "<p data-box='welcome'>You are signed in.</p>"))
            elif url.path == "/search":
                q = query.get("q", [""])[0][:200]
                results = ""
                if q:
                    with state.lock:
                        state.searches.append(q)
                    hits = [(t, i) for t, i in ITEMS if q.lower() in t.lower()]
                    results = "".join(f"<li><a href='/item/{i}' data-box='result_{n}'>{html.escape(t)}</a></li>"
                                      for n, (t, i) in enumerate(hits)) or "<p>No results</p>"
                self._send(_page("search", "Search", (
                    "<form action='/search'><input name='q' data-box='query' autocomplete='off' value='"
                    f"{html.escape(q, quote=True)}'><button data-box='search'>Search</button></form>"
                    f"<ul>{results}</ul>")))
            elif url.path.startswith("/item/"):
                try:
                    item = int(url.path.rsplit("/", 1)[1])
                    title = next(t for t, i in ITEMS if i == item)
                except (ValueError, StopIteration):
                    self._send(b"not found", "text/plain", 404)
                    return
                with state.lock:
                    state.opened.append(item)
                self._send(_page("item", title, f"<p data-box='item'>Item {item}</p>"))
            elif url.path == "/settings":
                saved = state.settings or {}

                def box(name: str, label: str) -> str:
                    checked = " checked" if saved.get(name) else ""
                    return (f"<div><label><input type='checkbox' name='{name}' data-box='{name}'{checked}> "
                            f"{label}</label></div>")

                self._send(_page("settings", "Settings", (
                    "<form method='post' action='/settings'>" + box("notifications", "Email notifications")
                    + box("dark_mode", "Dark mode") + "<button data-box='save'>Save settings</button></form>")))
            elif url.path == "/table":
                rows = "".join(f"<tr><td>{n}</td><td>{p}</td></tr>" for n, p in PRODUCTS)
                self._send(_page("table", "Products", (
                    "<table><thead><tr><th data-box='col_name' onclick=\"sortBy('name')\">Name</th>"
                    "<th data-box='col_price' onclick=\"sortBy('price')\">Price</th></tr></thead>"
                    f"<tbody>{rows}</tbody></table>"), _SORT_JS))
            elif url.path == "/files":
                self._send(_page("files", "Files", "<a href='/download/report.csv' data-box='report'>"
                                                   "Download report.csv</a>"))
            elif url.path == "/download/report.csv":
                with state.lock:
                    state.downloads += 1
                self._send(REPORT, "text/csv", headers={"Content-Disposition": "attachment; filename=report.csv"})
            else:
                self._send(b"not found", "text/plain", 404)

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            raw = self._body()
            if url.path == "/login":
                form = parse_qs(raw.decode(errors="replace"))
                user = form.get("user", [""])[0][:100]
                ok = state.check_password(form.get("password", [""])[0])
                with state.lock:
                    state.logins.append({"user": user, "ok": ok})
                self.send_response(303)
                self.send_header("Location", "/welcome" if ok else "/login")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif url.path == "/settings":
                form = parse_qs(raw.decode(errors="replace"))
                with state.lock:
                    state.settings = {k: k in form for k in ("notifications", "dark_mode")}
                self.send_response(303)
                self.send_header("Location", "/settings")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif url.path in ("/api/layout", "/api/sort"):
                try:
                    data = json.loads(raw or b"{}")
                except ValueError:
                    self._send(b"bad json", "text/plain", 400)
                    return
                with state.lock:
                    if url.path == "/api/layout":
                        state.layout = data if isinstance(data, dict) else {}
                    elif isinstance(data, dict):
                        state.sorts.append(data)
                self._send(b"{}", "application/json")
            else:
                self._send(b"not found", "text/plain", 404)

    return Handler


class WebApp:
    """The app on ``127.0.0.1:<free port>`` in a daemon thread; a context manager."""

    def __init__(self, password: str = "") -> None:
        self.state = WebAppState(password)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WebApp":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
