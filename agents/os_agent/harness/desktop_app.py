"""A tiny Tk application with known widgets, for driving real executors in tests.

Why: an executor test needs ground truth that does not come from screenshots. The app writes its whole state
(widget values and each widget's box in root-screen pixels) as JSON after every change, so a test can click at
a widget's centre and then assert on what the app saw.

Run: ``python -m agents.os_agent.harness.desktop_app --state PATH [--save-path P] [--x 0 --y 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tkinter as tk
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 640, 480
TITLE = "KimiRay Test App"
N_ITEMS = 50
SQUARE = 40  # side of the draggable square, canvas pixels


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """tmp + ``os.replace``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


class DesktopApp:
    def __init__(self, root: tk.Tk, state_path: Path, save_path: Path) -> None:
        self.root, self.state_path, self.save_path = root, state_path, save_path
        self.ready = False
        self.submitted, self.submitted_name, self.saved = False, "", False
        self.dangerous_clicked = False
        self.double_clicked_item: str | None = None
        self.right_clicks: list[list[int]] = []
        self.last_key: str | None = None
        self.drag_start: tuple[int, int] | None = None

        self.name_var = tk.StringVar(root)
        self.agree_var = tk.BooleanVar(root, value=False)
        self.widgets: dict[str, tk.Widget] = {}

        tk.Label(root, text="Name").place(x=10, y=14)
        self.entry = self._add("name", tk.Entry(root, textvariable=self.name_var, width=36), 70, 10)
        self._add("submit", tk.Button(root, text="Submit", command=self.on_submit), 400, 6)
        self._add("agree", tk.Checkbutton(root, text="I agree", variable=self.agree_var, command=self.write_state),
                  10, 50)
        self._add("save", tk.Button(root, text="Save", command=self.on_save), 130, 46)
        self.password_var = tk.StringVar(root)
        tk.Label(root, text="Password").place(x=230, y=50)
        self._add("password", tk.Entry(root, textvariable=self.password_var, show="\u2022", width=20), 300, 48)
        self._add("login", tk.Button(root, text="Log in", command=self.on_login), 480, 44)
        self.logged_in_with: str | None = None
        self.items = tk.Listbox(root, height=15, exportselection=False)
        for i in range(N_ITEMS):
            self.items.insert("end", f"item {i:02d}")
        self._add("items", self.items, 10, 100)
        self.items.place_configure(width=180, height=300)
        scrollbar = tk.Scrollbar(root, orient="vertical", command=self.items.yview)
        scrollbar.place(x=190, y=100, width=16, height=300)
        self.items.configure(yscrollcommand=lambda first, last: (scrollbar.set(first, last), self.write_state()))
        self.canvas = tk.Canvas(root, background="white", highlightthickness=0)
        self._add("canvas", self.canvas, 240, 100)
        self.canvas.place_configure(width=380, height=300)
        self.square_id = self.canvas.create_rectangle(20, 20, 20 + SQUARE, 20 + SQUARE, fill="#2060d0", width=0,
                                                      tags=("square",))
        self._add("dangerous", tk.Button(root, text="Dangerous", fg="red", command=self.on_dangerous), 520, 436)

        self.name_var.trace_add("write", lambda *_: self.write_state())
        self.password_var.trace_add("write", lambda *_: self.write_state())
        self.entry.bind("<KeyPress>", self.on_key, add="+")
        # Tk's Entry treats Control-a as "line start" (emacs); agents expect select-all, as on every other desktop.
        self.entry.bind("<Control-a>", self.on_select_all)
        self.items.bind("<Double-Button-1>", self.on_item_double, add="+")
        self.canvas.tag_bind("square", "<ButtonPress-1>", self.on_square_press)
        self.canvas.tag_bind("square", "<B1-Motion>", self.on_square_motion)
        self.canvas.tag_bind("square", "<ButtonRelease-1>", self.on_square_release)
        self.canvas.bind("<Button-3>", self.on_right_click, add="+")
        # No window manager in tests: nobody gives the toplevel keyboard focus, so take it on every click.
        # Class bindings (the Entry's ``focus %W``) run first, so force the widget Tk last chose, not the root.
        root.bind_all("<ButtonPress>", lambda _e: (self.root.focus_lastfor() or self.root).focus_force(), add="+")
        root.bind_all("<FocusIn>", lambda _e: self.write_state(), add="+")

    def _add(self, name: str, widget: tk.Widget, x: int, y: int) -> Any:
        widget.place(x=x, y=y)
        self.widgets[name] = widget
        return widget

    # -- handlers -----------------------------------------------------------------------------------------------
    def on_submit(self) -> None:
        self.submitted, self.submitted_name = True, self.name_var.get()
        self.write_state()

    def on_save(self) -> None:
        self.save_path.write_text(self.name_var.get())
        self.saved = True
        self.write_state()

    def on_login(self) -> None:
        self.logged_in_with = self.password_var.get()
        self.write_state()

    def on_dangerous(self) -> None:
        self.dangerous_clicked = True
        self.write_state()

    def on_key(self, event: tk.Event) -> None:
        self.last_key = event.keysym
        self.root.after_idle(self.write_state)

    def on_select_all(self, _event: tk.Event) -> str:
        self.entry.selection_range(0, "end")
        self.entry.icursor("end")
        return "break"

    def on_item_double(self, _event: tk.Event) -> None:
        picked = self.items.curselection()
        self.double_clicked_item = self.items.get(picked[0]) if picked else None
        self.write_state()

    def on_right_click(self, event: tk.Event) -> None:
        self.right_clicks.append([event.x_root, event.y_root])
        self.write_state()

    def on_square_press(self, event: tk.Event) -> None:
        self.drag_start = (event.x, event.y)

    def on_square_motion(self, event: tk.Event) -> None:
        if self.drag_start is not None:
            self.canvas.move(self.square_id, event.x - self.drag_start[0], event.y - self.drag_start[1])
            self.drag_start = (event.x, event.y)

    def on_square_release(self, event: tk.Event) -> None:
        self.on_square_motion(event)
        self.drag_start = None
        self.write_state()

    # -- state --------------------------------------------------------------------------------------------------
    def _box(self, widget: tk.Widget) -> list[int]:
        x, y = widget.winfo_rootx(), widget.winfo_rooty()
        return [x, y, x + widget.winfo_width(), y + widget.winfo_height()]

    def _focus_name(self) -> str | None:
        focused = self.root.focus_get()
        for name, widget in self.widgets.items():
            if widget is focused:
                return name
        return None if focused is None else str(focused)

    def state(self) -> dict[str, Any]:
        self.root.update_idletasks()
        widgets = {name: self._box(w) for name, w in self.widgets.items()}
        sx0, sy0, sx1, sy1 = (round(v) for v in self.canvas.coords(self.square_id))
        cx, cy = self.canvas.winfo_rootx(), self.canvas.winfo_rooty()
        widgets["square"] = [cx + sx0, cy + sy0, cx + sx1, cy + sy1]
        return {
            "ready": self.ready, "title": TITLE, "name": self.name_var.get(), "submitted": self.submitted,
            "submitted_name": self.submitted_name, "agree": bool(self.agree_var.get()), "saved": self.saved,
            "save_path": str(self.save_path), "items_top": self.items.nearest(0),
            "square": [sx0, sy0], "dangerous_clicked": self.dangerous_clicked,
            "double_clicked_item": self.double_clicked_item, "right_clicks": self.right_clicks,
            "last_key": self.last_key, "focus": self._focus_name(), "widgets": widgets,
            "password": self.password_var.get(), "logged_in_with": self.logged_in_with,
        }

    def write_state(self) -> None:
        if self.ready:
            write_json_atomic(self.state_path, self.state())

    def start(self) -> None:
        """First state write once the window is mapped, so the boxes are real screen coordinates."""
        self.root.wait_visibility()
        self.root.focus_force()
        self.root.update()
        self.ready = True
        self.write_state()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--save-path", type=Path, default=None)
    parser.add_argument("--x", type=int, default=0)
    parser.add_argument("--y", type=int, default=0)
    args = parser.parse_args(argv)
    save_path = args.save_path or args.state.with_name(args.state.stem + ".saved.txt")
    root = tk.Tk()
    root.title(TITLE)
    root.geometry(f"{WIDTH}x{HEIGHT}+{args.x}+{args.y}")
    root.resizable(False, False)
    app = DesktopApp(root, args.state, save_path)
    root.after(0, app.start)
    root.mainloop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
