"""Start Debian's Chromium on a display, full-window (kiosk: the page is the whole screen, so page pixels are screen
pixels), with a throwaway profile, no network beyond loopback, downloads into a known folder.

Used by the browser harness tasks (``web_tasks``) and their tests; the caller owns the process (``stop_app``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if Path(path).exists():
            return path
    return shutil.which("chromium")


def launch_chromium(display_env: Mapping[str, str], url: str, *, size: tuple[int, int], profile: Path,
                    downloads: Path) -> subprocess.Popen[bytes]:
    """Chromium showing ``url`` in kiosk mode at (0, 0) and ``size``. Returns at once; the web app's layout
    report says when the page is up."""
    binary = chromium_path()
    if binary is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install chromium)")
    (profile / "Default").mkdir(parents=True, exist_ok=True)
    downloads.mkdir(parents=True, exist_ok=True)
    prefs = {"download": {"default_directory": str(downloads), "prompt_for_download": False,
                          "directory_upgrade": True},
             "profile": {"password_manager_enabled": False}, "credentials_enable_service": False}
    (profile / "Default" / "Preferences").write_text(json.dumps(prefs))
    cmd = [binary, "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-features=Translate,MediaRouter,OptimizationHints,PasswordManagerOnboarding",
           "--disable-dev-shm-usage", "--password-store=basic", "--use-mock-keychain",
           "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost",
           f"--user-data-dir={profile}", "--kiosk", "--window-position=0,0",
           f"--window-size={size[0]},{size[1]}", url]
    env = {**display_env, "HOME": str(profile)}
    log = open(profile / "chromium.log", "wb")  # a file, not a pipe: stderr can never block the browser
    try:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    finally:
        log.close()
