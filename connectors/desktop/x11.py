"""An executor for a real X display: Pillow screenshots, ``xdotool`` input.

Why xdotool subprocesses: no X bindings to install, every argument is an argv element (nothing is shell-parsed),
and a dead or wedged display costs one bounded subprocess, never a hung agent.

Why ``mousemove`` without ``--sync``: ``--sync`` waits until the pointer leaves its old position, so moving to
where the pointer already is hangs forever. The warp and the following button events travel on one X
connection and the server applies them in order, so the click still lands on the new position.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Sequence

from connectors.desktop.actions import (
    TERMINAL_KINDS, Click, DoubleClick, Drag, Key, Move, RightClick, ScreenAction, Scroll, TypeText, Wait, describe,
)
from connectors.desktop.base import ActionOutcome, ActionRejected, ExecutorError, Observation, Screenshot, \
    check_on_screen

# pyautogui key names -> X keysym names xdotool understands (names are matched lower-cased).
_NAMED_KEYS: dict[str, str] = {
    "enter": "Return", "return": "Return", "esc": "Escape", "escape": "Escape", "tab": "Tab",
    "backspace": "BackSpace", "delete": "Delete", "del": "Delete", "insert": "Insert", "space": "space",
    "up": "Up", "down": "Down", "left": "Left", "right": "Right", "home": "Home", "end": "End",
    "pageup": "Prior", "pgup": "Prior", "pagedown": "Next", "pgdn": "Next",
    "ctrl": "ctrl", "control": "ctrl", "ctrlleft": "Control_L", "ctrlright": "Control_R",
    "alt": "alt", "option": "alt", "altleft": "Alt_L", "altright": "Alt_R",
    "shift": "shift", "shiftleft": "Shift_L", "shiftright": "Shift_R",
    "win": "super", "super": "super", "cmd": "super", "command": "super", "meta": "super",
    "winleft": "Super_L", "winright": "Super_R",
    "capslock": "Caps_Lock", "numlock": "Num_Lock", "scrolllock": "Scroll_Lock", "pause": "Pause",
    "printscreen": "Print", "prtsc": "Print", "prtscr": "Print", "prntscrn": "Print", "menu": "Menu", "apps": "Menu",
    **{f"f{i}": f"F{i}" for i in range(1, 25)},
}
# Single characters whose keysym name is not the character itself (xdotool ignores "/" silently).
_CHAR_KEYS: dict[str, str] = {
    " ": "space", "!": "exclam", '"': "quotedbl", "#": "numbersign", "$": "dollar", "%": "percent",
    "&": "ampersand", "'": "apostrophe", "(": "parenleft", ")": "parenright", "*": "asterisk", "+": "plus",
    ",": "comma", "-": "minus", ".": "period", "/": "slash", ":": "colon", ";": "semicolon", "<": "less",
    "=": "equal", ">": "greater", "?": "question", "@": "at", "[": "bracketleft", "\\": "backslash",
    "]": "bracketright", "^": "asciicircum", "_": "underscore", "`": "grave", "{": "braceleft", "|": "bar",
    "}": "braceright", "~": "asciitilde", "\n": "Return", "\t": "Tab",
}


def x11_keysym(name: str) -> str:
    """The keysym for one pyautogui key name; ``ActionRejected`` for names we can't map (nothing runs)."""
    if len(name) == 1:
        if name in _CHAR_KEYS:
            return _CHAR_KEYS[name]
        if name.isascii() and name.isalnum():
            return name
        if name.isprintable():
            return f"U{ord(name):04X}"  # Unicode keysym; xdotool maps it onto a spare keycode
        raise ActionRejected(f"unprintable key {name!r}")
    keysym = _NAMED_KEYS.get(name.lower())
    if keysym is None:
        raise ActionRejected(f"unknown key name {name!r}")
    return keysym


def xdotool_chord(keys: Sequence[str]) -> str:
    """``["ctrl", "a"]`` -> ``"ctrl+a"`` (one xdotool key sequence, pressed together)."""
    return "+".join(x11_keysym(k) for k in keys)


class X11Executor:
    """Drives the X display ``display`` (":N"). Actions on one event loop run one at a time."""

    def __init__(self, display: str, *, action_delay_s: float = 0.05, command_timeout_s: float = 10.0,
                 type_delay_ms: int = 12, drag_steps: int = 8) -> None:
        self.display = display
        self.action_delay_s = action_delay_s
        self.command_timeout_s = command_timeout_s
        self.type_delay_ms = type_delay_ms
        self.drag_steps = max(1, drag_steps)
        self._env = {**os.environ, "DISPLAY": display}
        self._size: tuple[int, int] | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
            weakref.WeakKeyDictionary()

    # -- protocol -----------------------------------------------------------------------------------------------
    async def observe(self) -> Observation:
        start = time.perf_counter()
        try:
            png, width, height = await asyncio.wait_for(asyncio.to_thread(self._grab_png),
                                                        self.command_timeout_s)
        except asyncio.TimeoutError:
            raise ExecutorError(f"screenshot of {self.display} timed out after {self.command_timeout_s:g}s") from None
        self._size = (width, height)
        title = await self._window_title()
        return Observation(screenshot=Screenshot(png=png, width=width, height=height), window_title=title,
                           taken_s=time.perf_counter() - start)

    async def screen_size(self) -> tuple[int, int]:
        if self._size is None:
            out = await self._xdotool("getdisplaygeometry")
            try:
                width, height = (int(v) for v in out.split())
            except ValueError:
                raise ExecutorError(f"unexpected display geometry from xdotool: {out!r}") from None
            self._size = (width, height)
        return self._size

    async def execute(self, action: ScreenAction) -> ActionOutcome:
        if action.kind in TERMINAL_KINDS:
            raise ActionRejected(f"{action.kind} is terminal: nothing to execute")
        argv = self._plan(action)  # validates keys before anything runs
        width, height = await self.screen_size()
        check_on_screen(action, width, height)
        start = time.perf_counter()
        async with self._lock():
            if isinstance(action, Wait):
                await asyncio.sleep(action.seconds)
            else:
                timeout = self.command_timeout_s
                stdin = None
                if isinstance(action, TypeText):
                    timeout += len(action.text) * self.type_delay_ms / 1000
                    stdin = action.text.encode()  # on stdin, not argv: typed text (a password) never shows in ps
                await self._xdotool(*argv, timeout_s=timeout, stdin=stdin)
                if self.action_delay_s > 0:
                    await asyncio.sleep(self.action_delay_s)
        return ActionOutcome(ok=True, detail=describe(action), duration_s=time.perf_counter() - start)

    async def close(self) -> None:
        """Nothing to release: every command is its own subprocess."""

    # -- helpers ------------------------------------------------------------------------------------------------
    def _plan(self, action: ScreenAction) -> list[str]:
        """The xdotool argv (after ``xdotool``) for one action, as a single chained command."""
        if isinstance(action, (Click, DoubleClick, RightClick, Move)):
            argv = ["mousemove", str(action.x), str(action.y)]
            if isinstance(action, DoubleClick):
                return argv + ["click", "--repeat", "2", "--delay", "60", "1"]
            if isinstance(action, RightClick):
                return argv + ["click", "3"]
            if isinstance(action, Click):
                return argv + ["click", "1"]
            return argv
        if isinstance(action, Drag):
            argv = ["mousemove", str(action.x), str(action.y), "mousedown", "1"]
            for i in range(1, self.drag_steps + 1):
                x = action.x + round((action.to_x - action.x) * i / self.drag_steps)
                y = action.y + round((action.to_y - action.y) * i / self.drag_steps)
                argv += ["sleep", "0.02", "mousemove", str(x), str(y)]
            return argv + ["sleep", "0.02", "mouseup", "1"]
        if isinstance(action, Scroll):
            argv = ["mousemove", str(action.x), str(action.y)]
            if action.clicks == 0:
                return argv
            if action.horizontal:
                button = "7" if action.clicks > 0 else "6"
            else:
                button = "4" if action.clicks > 0 else "5"
            return argv + ["click", "--repeat", str(abs(action.clicks)), "--delay", "20", button]
        if isinstance(action, TypeText):
            return ["type", "--delay", str(self.type_delay_ms), "--file", "-"]
        if isinstance(action, Key):
            return ["key", "--", xdotool_chord(action.keys)]
        if isinstance(action, Wait):
            return []
        raise ActionRejected(f"unsupported action {action.kind!r}")

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    def _grab_png(self) -> tuple[bytes, int, int]:
        import io

        from PIL import ImageGrab

        try:
            image = ImageGrab.grab(xdisplay=self.display)
        except OSError as exc:
            raise ExecutorError(f"cannot capture display {self.display}: {exc}") from exc
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), image.width, image.height

    async def _window_title(self) -> str | None:
        """The active window's name (EWMH), else the focused top-level's (no window manager), else - focus
        follows the pointer (X's PointerRoot, the default without a window manager), so keys go to whatever
        lies under it - the names of the visible windows under the pointer, joined with " | " so a policy that
        looks for a terminal sees one if any of them is. None if there is no window at all."""
        timeout = min(self.command_timeout_s, 3.0)
        for query in ("getactivewindow", "getwindowfocus"):
            try:
                name = await self._xdotool(query, "getwindowname", timeout_s=timeout)
            except ExecutorError:
                continue
            return name.rstrip("\n") or None
        try:
            where = dict(line.split("=", 1) for line in
                         (await self._xdotool("getmouselocation", "--shell", timeout_s=timeout)).split() if "=" in line)
            px, py = int(where["X"]), int(where["Y"])
            ids = (await self._xdotool("search", "--onlyvisible", "--name", ".", timeout_s=timeout)).split()
        except (ExecutorError, KeyError, ValueError):
            return None
        names = []
        for wid in ids[:50]:
            try:
                out = await self._xdotool("getwindowgeometry", "--shell", wid, "getwindowname", wid,
                                          timeout_s=timeout)
            except ExecutorError:
                continue
            lines = out.rstrip("\n").split("\n")
            geo = dict(line.split("=", 1) for line in lines if "=" in line and line.split("=", 1)[0].isupper())
            try:
                x, y, w, h = (int(geo[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
            except (KeyError, ValueError):
                continue
            if x <= px < x + w and y <= py < y + h and lines[-1] and lines[-1] not in names:
                names.append(lines[-1])
        return " | ".join(names) or None

    async def _xdotool(self, *args: str, timeout_s: float | None = None, stdin: bytes | None = None) -> str:
        """Run ``xdotool args...`` (argv, no shell; ``stdin`` fed to it); stdout, or ``ExecutorError`` with the
        stderr tail."""
        timeout_s = self.command_timeout_s if timeout_s is None else timeout_s
        try:
            proc = await asyncio.create_subprocess_exec(
                "xdotool", *args, env=self._env,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise ExecutorError("xdotool not found on PATH (Debian/Ubuntu: apt-get install xdotool)") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except asyncio.TimeoutError:
            raise ExecutorError(f"xdotool {args[0]} on {self.display} timed out after {timeout_s:g}s") from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: never leave input half-sent by a stray process
                proc.kill()
                await asyncio.shield(proc.wait())
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-400:]
            raise ExecutorError(f"xdotool {args[0]} on {self.display} failed ({proc.returncode}): {tail}")
        return out.decode(errors="replace")
