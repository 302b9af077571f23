"""The ScreenSpot harness on the synthetic set, scored by scripted models whose right answers are known."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from agents.os_agent.convention import grounding_prompt
from agents.os_agent.grounding import GroundingSample, ModelLocator, evaluate, load_screenspot
from agents.os_agent.synthetic_ui import make_screenspot_dataset
from connectors.model_client import ModelReply, ModelUnavailableError
from engine.runtime.request import GenerateRequest, Usage

PREFIX = grounding_prompt("")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("screenspot")
    return make_screenspot_dataset(root, n_images=3, size=(640, 360), seed=3), root


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def _parts(request: GenerateRequest) -> tuple[Image.Image, str]:
    content = request.messages[-1]["content"]
    image = next(p["image"] for p in content if p["type"] == "image")
    text = next(p["text"] for p in content if p["type"] == "text")
    assert text.startswith(PREFIX)
    return image, text[len(PREFIX):].strip()


class ScriptedModel:
    """Answers from the ground truth: the target's centre, as fractions or pixels, or a fixed bad answer."""

    def __init__(self, json_path: Path, images: Path, mode: str) -> None:
        self.mode = mode
        self.truth: dict[tuple[str, str], tuple[float, float, int, int]] = {}
        for entry in json.loads(json_path.read_text()):
            with Image.open(images / entry["img_filename"]) as im:
                key = (_digest(im), entry["instruction"])
                x, y, w, h = entry["bbox"]
                self.truth[key] = (x + w / 2, y + h / 2, im.width, im.height)

    async def generate(self, request: GenerateRequest) -> ModelReply:
        image, instruction = _parts(request)
        cx, cy, width, height = self.truth[(_digest(image), instruction)]
        text = {
            "fraction": f"## Action:\nclick it\n## Code:\n```python\npyautogui.click(x={cx / width:.4f}, "
                        f"y={cy / height:.4f})\n```",
            "pixels": f"pyautogui.click(x={int(cx)}, y={int(cy)})",  # pixels are whole numbers
            "corner": "pyautogui.click(x=0.0, y=0.0)",
            "garbage": "I cannot see any such element, sorry.",
            "overshoot": "pyautogui.click(x=1.7, y=0.5)",
            "far": "pyautogui.click(x=5000, y=20)",
        }[self.mode]
        return ModelReply(text=text, finish_reason="stop", usage=Usage(prompt_tokens=100, completion_tokens=12))


def _evaluate(dataset: tuple[Path, Path], mode: str, **locator_args) -> object:
    json_path, images = dataset
    samples = load_screenspot(json_path, images, check_images=True)
    locator = ModelLocator(ScriptedModel(json_path, images, mode), **locator_args)
    return asyncio.run(evaluate(samples, locator, concurrency=3))


def test_synthetic_set_loads_and_converts_xywh_to_xyxy(dataset) -> None:
    json_path, images = dataset
    entries = json.loads(json_path.read_text())
    samples = load_screenspot(json_path, images, check_images=True)
    assert len(samples) == len(entries) == 30  # 10 targets per screenshot
    for sample, entry in zip(samples, entries):
        x, y, w, h = entry["bbox"]
        assert sample.bbox == (x, y, x + w, y + h)
        assert sample.image_path == (images / entry["img_filename"]).resolve()
        assert sample.data_type == entry["data_type"] and sample.platform == "synthetic"
        with Image.open(sample.image_path) as im:
            x0, y0, x1, y1 = sample.bbox
            assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height
    assert {s.data_type for s in samples} == {"text", "icon"}
    # same seed, same files
    again = make_screenspot_dataset(images / "again", n_images=3, size=(640, 360), seed=3)
    assert json.loads(again.read_text()) == entries


def test_oracle_with_fractions_scores_one(dataset) -> None:
    report = _evaluate(dataset, "fraction")
    assert report.total == 30 and report.hits == 30 and report.accuracy == 1.0
    assert report.by_data_type["text"].accuracy == report.by_data_type["icon"].accuracy == 1.0
    assert report.by_data_type["text"].total + report.by_data_type["icon"].total == 30
    assert report.by_platform["synthetic"].hits == 30
    assert report.latency_p50_s is not None and report.latency_p95_s >= report.latency_p50_s >= 0
    assert report.mean_completion_tokens == 12
    first = report.results[0]
    assert first.status == "hit" and first.point_model is not None and first.raw_text.startswith("## Action")


def test_oracle_with_pixel_coordinates_scores_one_in_auto_mode(dataset) -> None:
    report = _evaluate(dataset, "pixels")
    assert report.accuracy == 1.0


def test_top_left_corner_scores_zero(dataset) -> None:
    report = _evaluate(dataset, "corner")
    assert report.hits == 0 and report.misses == 30 and report.accuracy == 0.0
    assert all(r.point_px == (0, 0) for r in report.results)


def test_garbage_counts_parse_failures(dataset) -> None:
    report = _evaluate(dataset, "garbage")
    assert report.parse_failures == 30 and report.hits == 0 and report.accuracy == 0.0
    assert report.results[0].raw_text.startswith("I cannot")


@pytest.mark.parametrize("coordinates", ["auto", "fraction"])
def test_fraction_overshoot_counts_as_off_screen(dataset, coordinates: str) -> None:
    report = _evaluate(dataset, "overshoot", coordinates=coordinates)  # x=1.7: not a pixel, not a fraction
    assert report.off_screen == 30 and report.hits == 0 and report.parse_failures == 0
    assert report.results[0].point_model == (1.7, 0.5) and report.results[0].point_px is None


def test_pixel_past_the_edge_counts_as_off_screen(dataset) -> None:
    report = _evaluate(dataset, "far")
    assert report.off_screen == 30 and report.accuracy == 0.0


def test_model_errors_and_unreadable_images_are_counted_not_raised(dataset, tmp_path: Path) -> None:
    class Down:
        async def generate(self, request: GenerateRequest) -> ModelReply:
            raise ModelUnavailableError("replica restarting")

    json_path, images = dataset
    samples = load_screenspot(json_path, images)[:4]
    broken = GroundingSample(index=99, image_path=tmp_path / "missing.png", instruction="x", bbox=(0, 0, 1, 1))
    report = asyncio.run(evaluate([*samples, broken], ModelLocator(Down()), concurrency=2))
    assert report.errors == 5 and report.total == 5 and report.latency_p50_s is None
    assert "replica restarting" in report.results[0].error and report.results[-1].error.startswith("image:")


def _write(path: Path, entries: list) -> Path:
    path.write_text(json.dumps(entries))
    return path


PRO_ENTRY = {"img_filename": "vscode_macos/shot.png", "bbox": [473, 183, 503, 219], "instruction": "Refresh",
             "instruction_cn": "刷新", "id": "vscode_macos_0", "application": "vscode", "platform": "macos",
             "img_size": [2560, 1664], "ui_type": "icon", "group": "Dev"}


def test_pro_style_file_loads_as_xyxy(tmp_path: Path) -> None:
    path = _write(tmp_path / "vscode_macos.json", [PRO_ENTRY])
    [sample] = load_screenspot(path, tmp_path)
    assert sample.bbox == (473, 183, 503, 219)
    assert (sample.data_type, sample.platform, sample.application) == ("icon", "macos", "vscode")
    assert sample.sample_id == "vscode_macos_0" and sample.image_size == (2560, 1664)
    assert sample.contains((473, 219)) and not sample.contains((504, 200))  # bounds included
    [forced] = load_screenspot(path, tmp_path, bbox_format="xywh")
    assert forced.bbox == (473, 183, 976, 402)


def test_auto_format_by_file_name_and_refusal_to_guess(tmp_path: Path) -> None:
    entry = {"img_filename": "a.png", "bbox": [10, 20, 30, 40], "instruction": "x"}
    [sample] = load_screenspot(_write(tmp_path / "screenspot_desktop_v2.json", [entry]), tmp_path)
    assert sample.bbox == (10, 20, 40, 60)
    with pytest.raises(ValueError, match="bbox_format"):
        load_screenspot(_write(tmp_path / "custom.json", [entry]), tmp_path)
    [sample] = load_screenspot(tmp_path / "custom.json", tmp_path, bbox_format="xyxy")
    assert sample.bbox == (10, 20, 30, 40)


@pytest.mark.parametrize(("bad", "message"), [
    ({"bbox": [1, 2, 3]}, "entry 2: bbox must be 4"),
    ({"bbox": [1, 2, "3", 4]}, "entry 2: bbox must be 4"),
    ({"bbox": [1, 2, -3, 4]}, "entry 2: bbox"),
    ({"instruction": ""}, "entry 2: 'instruction'"),
    ({"img_filename": None}, "entry 2: 'img_filename'"),
    ({"img_filename": "../../etc/passwd"}, "entry 2: img_filename .* outside"),
    ({"img_size": [0, 10]}, "entry 2: img_size"),
])
def test_bad_entry_names_its_index(tmp_path: Path, bad: dict, message: str) -> None:
    good = {"img_filename": "a.png", "bbox": [1, 2, 3, 4], "instruction": "x", "data_type": "text",
            "data_source": "web"}
    path = _write(tmp_path / "screenspot_web.json", [good, good, {**good, **bad}])
    with pytest.raises(ValueError, match=message):
        load_screenspot(path, tmp_path)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="entry 0: expected an object"):
        load_screenspot(_write(tmp_path / "screenspot_web.json", ["nope"]), tmp_path)
    with pytest.raises(ValueError, match="json list"):
        load_screenspot(_write(tmp_path / "screenspot_web.json", {"a": 1}), tmp_path)  # type: ignore[arg-type]
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid json"):
        load_screenspot(tmp_path / "broken.json", tmp_path)
    path = _write(tmp_path / "screenspot_mobile.json", [{"img_filename": "gone.png", "bbox": [1, 2, 3, 4],
                                                         "instruction": "x"}])
    with pytest.raises(ValueError, match="entry 0: image 'gone.png' not found"):
        load_screenspot(path, tmp_path, check_images=True)


def test_openai_adapter_sends_the_screenshot_as_a_data_uri() -> None:
    import httpx

    from bench.grounding_eval import OpenAIChatModel

    seen: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"message": {"content": "pyautogui.click(x=0.5, y=0.5)"},
                                                      "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 50, "completion_tokens": 9}})

    async def main() -> None:
        model = OpenAIChatModel("http://127.0.0.1:9/", "k1")
        await model.client.aclose()
        model.client = httpx.AsyncClient(transport=httpx.MockTransport(handler), headers={"Authorization": "Bearer k1"})
        found = await ModelLocator(model).locate(Image.new("RGB", (200, 100), "white"), "the button")
        await model.aclose()
        assert found.status == "ok" and found.point_px == (100, 50) and found.completion_tokens == 9

    asyncio.run(main())
    assert seen["url"] == "http://127.0.0.1:9/v1/chat/completions" and seen["auth"] == "Bearer k1"
    parts = seen["body"]["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": grounding_prompt("the button")}
    assert seen["body"]["temperature"] == 0.0 and seen["body"]["max_tokens"] == 64


class BoxOracle:
    """Knows each instruction's box in the ORIGINAL image's pixels; answers for the image it was shown: a fraction
    (Kimi-VL, in the Toolcall form) or pixels of the shown image. Records the sizes it saw."""

    def __init__(self, boxes: dict[str, tuple[float, float, float, float, int, int]], mode: str) -> None:
        self.boxes, self.mode, self.seen = boxes, mode, []

    async def generate(self, request: GenerateRequest) -> ModelReply:
        image, instruction = _parts(request)
        self.seen.append(image.size)
        x0, y0, x1, y1, width, height = self.boxes[instruction]
        fx, fy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        text = (f"Thought: found it.\nAction: click.\nToolcall: click(x={fx:.5f}, y={fy:.5f})" if self.mode == "fraction"
                else f"pyautogui.click(x={int(fx * image.width)}, y={int(fy * image.height)})")
        return ModelReply(text=text, finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=8))


def test_v2_split_files_and_pro_folders_score_per_split_and_type_at_any_image_size(tmp_path: Path) -> None:
    """The three v2 files (xywh, split from the file name) and a Pro folder (xyxy, split = group) load from their
    folders; a 3840x2160 screenshot is downscaled for the model and still scored in its own pixels."""
    from agents.os_agent.grounding import load_screenspot_dir

    images = tmp_path / "images"
    images.mkdir()
    sizes = {"desktop": (1920, 1080), "mobile": (1170, 2532), "web": (3840, 2160)}
    boxes: dict[str, tuple[float, float, float, float, int, int]] = {}
    v2 = tmp_path / "v2"
    v2.mkdir()
    for split, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (200, 200, 200)).save(images / f"{split}.png")
        entries = []
        for kind, (x, y, bw, bh) in {"text": (w * 0.6, h * 0.3, 60, 24), "icon": (w * 0.1, h * 0.8, 20, 20)}.items():
            instruction = f"{split} {kind}"
            entries.append({"img_filename": f"{split}.png", "bbox": [x, y, bw, bh], "instruction": instruction,
                            "data_type": kind, "data_source": "ios" if split == "mobile" else "windows"})
            boxes[instruction] = (x, y, x + bw, y + bh, w, h)
        _write(v2 / f"screenspot_{split}_v2.json", entries)
    pro = tmp_path / "pro"
    pro.mkdir()
    Image.new("RGB", (2560, 1664)).save(images / "shot.png")
    _write(pro / "vscode_macos.json", [{**PRO_ENTRY, "img_filename": "shot.png"}])
    _write(pro / "word_windows.json", [{**PRO_ENTRY, "img_filename": "shot.png", "group": "Office",
                                        "ui_type": "text", "instruction": "Bold", "bbox": [100, 50, 180, 90]}])
    boxes["Refresh"] = (473, 183, 503, 219, 2560, 1664)
    boxes["Bold"] = (100, 50, 180, 90, 2560, 1664)

    samples = load_screenspot_dir(v2, images, check_images=True)
    assert [s.index for s in samples] == list(range(6)) and {s.split for s in samples} == set(sizes)
    web_text = next(s for s in samples if s.instruction == "web text")
    assert web_text.bbox == (3840 * 0.6, 2160 * 0.3, 3840 * 0.6 + 60, 2160 * 0.3 + 24)  # xywh -> xyxy
    for mode in ("fraction", "pixels"):
        oracle = BoxOracle(boxes, mode)
        report = asyncio.run(evaluate(samples, ModelLocator(oracle, max_side=1280), concurrency=2))
        assert report.accuracy == 1.0, [r.model_dump() for r in report.results if r.status != "hit"]
        assert set(report.by_split) == {"desktop", "mobile", "web"}
        assert set(report.by_split_and_type) == {f"{s}/{t}" for s in sizes for t in ("text", "icon")}
        assert all(b.total == 1 and b.accuracy == 1.0 for b in report.by_split_and_type.values())
        assert max(max(size) for size in oracle.seen) == 1280  # the 4K shot was downscaled for the model
    pro_samples = load_screenspot_dir(pro, images)
    assert [(s.split, s.data_type, s.bbox) for s in pro_samples] == [("Dev", "icon", (473, 183, 503, 219)),
                                                                     ("Office", "text", (100, 50, 180, 90))]
    report = asyncio.run(evaluate(pro_samples, ModelLocator(BoxOracle(boxes, "fraction")), concurrency=1))
    assert report.accuracy == 1.0 and set(report.by_split_and_type) == {"Dev/icon", "Office/text"}
    with pytest.raises(ValueError, match="no .json"):
        load_screenspot_dir(images, images)
