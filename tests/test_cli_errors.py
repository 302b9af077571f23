"""`kimiray demo` / `contract-demo` errors: one `kimiray: error:` line and a non-zero exit, no traceback (unless
--debug); a contract that is not a PDF is refused before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve_harness import SAFE_ENV

REPO = Path(__file__).resolve().parents[1]


def kimiray(tmp_path: Path, *argv: str) -> tuple[int, str, float]:
    env = os.environ | SAFE_ENV | {"KIMIRAY_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
                                   "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kimiray.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


@pytest.mark.parametrize("argv, code, says", [
    (["demo", "--image", "missing.png"], 2, "no such image file: missing.png"),
    (["demo", "--model", "not-a-model"], 2, "neither a checkpoint directory nor a Hugging Face id"),
    (["demo", "--model", "nobody/no-such-model"], 1, "nobody/no-such-model"),  # offline: the Hub can't be asked
    (["contract-demo", "--pdf", "contract.docx"], 2, "contract.docx is not a PDF"),
    (["contract-demo", "--pdf", "missing.pdf"], 2, "no such file: missing.pdf"),
])
def test_errors_are_one_clean_line(tmp_path: Path, argv: list[str], code: int, says: str) -> None:
    (tmp_path / "contract.docx").write_bytes(b"PK\x03\x04 a Word document is a ZIP archive")
    rc, output, _ = kimiray(tmp_path, *argv)
    assert rc == code, output
    errors = [line for line in output.splitlines() if line.startswith("kimiray: error:")]
    assert len(errors) == 1 and says in errors[0], output
    assert "Traceback" not in output and "[kimiray] starting local Ray" not in output, output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    rc, output, _ = kimiray(tmp_path, "demo", "--model", "nobody/no-such-model", "--debug")
    assert rc != 0 and "Traceback" in output
