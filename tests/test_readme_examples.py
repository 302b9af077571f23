"""The README's code blocks are run, so the README cannot drift from the code.

Every fenced block of README.md is either run here or marked, in the line right before it, with why not:

    <!-- example: skip (reason) -->     not run (needs a GPU, a real model download, a desktop, ...)
    <!-- example: service (reason) -->  the command that starts the service: run by this test itself

A block without a marker must be ``python`` or ``bash`` and is run; a new block that can't run offline on a CPU
must say so with a marker, or this test fails. How they run, against one service for all of them:

* the service is the README's own ``kimiray serve ray_config.yaml`` command (the default deployment config, the
  tiny checkpoint), on a free port instead of 8000, with its data under a temporary ``$KIMIRAY_HOME``;
* in every block ``http://127.0.0.1:8000`` becomes that service's address and ``.venv/bin/`` this
  interpreter's bin directory; ``KIMIRAY_URL``, ``KIMIRAY_BASE_URL`` and ``KIMIRAY_API_KEY`` are set, as the
  README's client settings describe;
* the working directory holds the sample files the examples name: ``screenshot.png``, ``msa.pdf`` (a generated
  contract), ``demo.mp4`` (a generated video) and ``requests.jsonl`` (a three-line batch input file);
* ``python`` blocks run in README order in one interpreter sharing their names, like a notebook (a later block
  may use the ``client`` of an earlier one); each ``bash`` block runs on its own with ``set -euo pipefail``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.serve_harness import SAFE_ENV, free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
API_KEY = "sk-local"  # the key the README's serve command sets
README_URL = "http://127.0.0.1:8000"
MARKER = re.compile(r"^<!--\s*example:\s*(\w+)\s*(?:\((.*)\))?\s*-->$")
RUNNABLE = ("python", "bash")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None
    reason: str

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks with the marker of the nearest non-blank line above them."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        start, close = i, fence.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith(close):
            j += 1
        above = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(above)
        blocks.append(Block(line=start + 1, lang=fence.group(2).lower(), code="\n".join(lines[start + 1:j]),
                            marker=marker.group(1) if marker else None,
                            reason=(marker.group(2) or "").strip() if marker else ""))
        i = j + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_every_block_runs_or_says_why_not() -> None:
    assert BLOCKS, "no code blocks found in README.md"
    problems = []
    for block in BLOCKS:
        if block.marker is None:
            if block.lang not in RUNNABLE:
                problems.append(f"{block.where}: a {block.lang or 'plain'} block is not run; run it as python/bash "
                                "or mark it <!-- example: skip (reason) -->")
        elif block.marker not in ("skip", "service"):
            problems.append(f"{block.where}: unknown marker {block.marker!r} (skip or service)")
        elif not block.reason:
            problems.append(f"{block.where}: the {block.marker} marker needs a reason in parentheses")
    services = [b for b in BLOCKS if b.marker == "service"]
    if len(services) != 1 or "kimiray serve ray_config.yaml" not in services[0].code:
        problems.append("exactly one block marked service, with the `kimiray serve ray_config.yaml` command")
    assert not problems, "\n".join(problems)
    assert sum(b.marker is None for b in BLOCKS) >= 5  # the examples that matter do run


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_links_stay_in_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    prose = re.sub(r"^(`{3,}).*?^\1", "", text, flags=re.S | re.M)  # links inside code blocks are code
    targets = re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r"<(https?://[^>]+)>", prose)
    assert targets, "the README links to nothing (docs/architecture.md at least)"
    assert "docs/architecture.md" in targets
    for target in targets:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target), f"README link leaves the repository: {target}"
        path, _, anchor = target.partition("#")
        if path:
            resolved = (REPO / path).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"README link to a missing file: {target}"
        if anchor and not path:
            assert anchor in _anchors(text), f"README link to a missing heading: {target}"
    assert "../" not in "".join(targets)


# ------------------------------------------------------------------------------------------------ running them
def _sample_files(directory: Path) -> None:
    from PIL import Image, ImageDraw

    from pipelines.document.synthetic import make_contract
    from pipelines.video.synthetic import make_video

    directory.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (320, 200), (245, 245, 245))
    ImageDraw.Draw(image).rectangle([200, 150, 300, 185], fill=(30, 140, 60))
    image.save(directory / "screenshot.png")
    (directory / "msa.pdf").write_bytes(make_contract(pages=2, seed=0).pdf)
    make_video(directory / "demo.mp4", seconds=4, fps=4, size=(160, 120))
    lines = [{"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "kimi-vl", "max_tokens": 8, "messages": [{"role": "user", "content": question}]}}
             for n, question in enumerate(["hi", "What is 2 + 2?", "Name a colour."], start=1)]
    (directory / "requests.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _localise(code: str, url: str) -> str:
    return code.replace(README_URL, url).replace(".venv/bin/", f"{Path(sys.executable).parent}/")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], Path]]:
    """The README's serve command, on a free port; yields (url, client environment, working directory)."""
    tmp = tmp_path_factory.mktemp("readme")
    home, work = tmp / "home", tmp / "work"
    port = free_port()
    raw = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    raw["http_options"]["port"] = port
    for app in raw["applications"]:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(
            SAFE_ENV | {"KIMIRAY_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    config = tmp / "ray_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    (block,) = [b for b in BLOCKS if b.marker == "service"]
    command = _localise(block.code, f"http://127.0.0.1:{port}").replace("ray_config.yaml", str(config), 1)
    env = os.environ | SAFE_ENV | {"KIMIRAY_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                                   "PYTHONPATH": str(REPO)}
    _sample_files(work)
    proc = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any("ready at" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        assert any(f"ready at {url}/v1" in line for line in lines), "".join(lines)
        client_env = env | {"KIMIRAY_URL": url, "KIMIRAY_BASE_URL": f"{url}/v1", "KIMIRAY_API_KEY": API_KEY,
                            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        yield url, client_env, work
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # kimiray serve drains and stops the Ray it started
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


SESSION = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for block in blocks:
    print(f"=== {block['where']}", flush=True)
    try:
        exec(compile(block["code"], block["where"], "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"=== FAILED {block['where']}", flush=True)
        sys.exit(1)
print("=== all python blocks ran", flush=True)
"""


def test_bash_examples_run(service: tuple[str, dict[str, str], Path]) -> None:
    url, env, work = service
    for block in [b for b in BLOCKS if b.marker is None and b.lang == "bash"]:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _localise(block.code, url)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{block.where} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_python_examples_run(service: tuple[str, dict[str, str], Path]) -> None:
    url, env, work = service
    blocks = [{"where": b.where, "code": _localise(b.code, url)}
              for b in BLOCKS if b.marker is None and b.lang == "python"]
    (work / "blocks.json").write_text(json.dumps(blocks))
    (work / "session.py").write_text(SESSION)
    proc = subprocess.run([sys.executable, "session.py", "blocks.json"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "=== all python blocks ran" in proc.stdout, output[-6000:]


def test_chat_without_max_tokens_on_the_default_deployment(service: tuple[str, dict[str, str], Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call a newcomer makes leaves max_tokens out: it works through the official openai client, the SDK
    and LangChain, and the reply is bounded by what the context window leaves after the prompt."""
    import openai

    import kimiray
    from kimiray.langchain import ChatKimiVL

    url, env, _ = service
    window = 4096  # the tiny checkpoint's context (max_position_embeddings)
    monkeypatch.setenv("KIMIRAY_URL", url)
    monkeypatch.setenv("KIMIRAY_BASE_URL", f"{url}/v1")  # LangChain's variable: the API root, with /v1
    monkeypatch.setenv("KIMIRAY_API_KEY", API_KEY)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, SAFE_ENV[name])

    reply = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY).chat.completions.create(
        model="kimi-vl", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens and reply.usage.prompt_tokens + reply.usage.completion_tokens <= window

    with kimiray.Client() as client:  # KIMIRAY_URL / KIMIRAY_API_KEY, as the README says
        chat = client.chat("hi")
    assert chat.finish_reason in ("stop", "length")
    assert chat.usage["prompt_tokens"] + chat.usage["completion_tokens"] <= window

    message = ChatKimiVL().invoke("Hello")
    assert isinstance(message.content, str)
