"""DICOM through the real task path: a CT slice with patient tags and a shuffled MR series, de-identified before
anything is stored; a walk over every sink (stored task input, upload store, events, session, the prompt sent to
the model, logs, result) finds none of the identifying values.  Windows in Hounsfield units, MONOCHROME1,
series order, refusals with codes, and the tiny checkpoint end to end."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from connectors.dicom import DicomError, WINDOWS, deidentified_bytes, parse, read_frames
from connectors.model_client import ModelReply
from engine.runtime.request import GenerateRequest, Usage
from tests.dicom_samples import IDENTIFYING_VALUES, compressed_slice, ct_hu_phantom, ct_slice, mr_series
from tests.task_server import task_server, wait_for_status

pytestmark = pytest.mark.integration
KEY = "sk-medical-0001"
H = {"Authorization": f"Bearer {KEY}"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_windows_are_in_hounsfield_units_and_monochrome1_is_inverted() -> None:
    hu = ct_hu_phantom()
    for name, (center, width) in WINDOWS.items():
        got = np.asarray(read_frames([ct_slice()], window=name).slices[0].image.convert("L"), dtype=float)
        expected = np.clip((hu - (center - width / 2)) / width, 0, 1) * 255
        assert np.abs(got - expected).max() <= 1.0, name
    lung = np.asarray(read_frames([ct_slice()], window="lung").slices[0].image.convert("L"))
    soft = np.asarray(read_frames([ct_slice()], window="soft_tissue").slices[0].image.convert("L"))
    assert lung[32, 20] > 0 and soft[32, 20] == 0  # the lung region is visible only in the lung window
    assert read_frames([ct_slice()], window="auto").window == "file"  # the file's own window (40/400)
    plain = np.asarray(read_frames([ct_slice()], window="bone").slices[0].image.convert("L"), dtype=int)
    inverted = np.asarray(read_frames([ct_slice(PhotometricInterpretation="MONOCHROME1")],
                                      window="bone").slices[0].image.convert("L"), dtype=int)
    assert (plain + inverted == 255).all()


def test_a_series_is_ordered_by_slice_position_and_sampled() -> None:
    frames = read_frames(mr_series(12), max_frames=4)
    assert frames.total_slices == 12 and frames.modality == "MR"
    positions = [s.position for s in frames.slices]
    assert positions == [0.0, 20.0, 35.0, 55.0]
    assert [s.label for s in frames.slices][0] == "[slice 1/12, z=0.0 mm]"
    brightness = [np.asarray(s.image.convert("L")).mean() for s in frames.slices]
    assert brightness == sorted(brightness)  # the shuffled files came back in body order
    with pytest.raises(DicomError) as info:
        read_frames(mr_series(6), max_slices=5)
    assert info.value.code == "too_many_slices"


@pytest.mark.parametrize("data, code", [
    (b"not a dicom file at all" * 10, "not_dicom"),
    (ct_slice()[:400], "no_pixels"),
    (ct_slice()[:-100], "corrupt"),
    (compressed_slice(), "codec_unavailable"),
])
def test_bad_dicom_has_a_code(data: bytes, code: str) -> None:
    with pytest.raises(DicomError) as info:
        read_frames([data])
    assert info.value.code == code, info.value.message


def test_deidentified_files_keep_pixels_and_lose_identity() -> None:
    clean, removed = deidentified_bytes(ct_slice())
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
            "AccessionNumber", "private tags", "StudyInstanceUID"} <= set(removed)
    assert not any(v.encode() in clean for v in IDENTIFYING_VALUES)
    assert (parse(clean).pixel_array == parse(ct_slice()).pixel_array).all()


class RecordingModel:
    """Records every request the agent sends (the prompt sink) and answers with a fixed text."""

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.requests.append(request)
        return ModelReply(text="A de-identified image.", finish_reason="stop",
                          usage=Usage(prompt_tokens=10, completion_tokens=5))


def _leaks(text: str) -> list[str]:
    return [v for v in IDENTIFYING_VALUES if v.lower() in text.lower()]


def test_patient_data_never_leaves_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    model = RecordingModel()
    stores_dir = tmp_path / "stores"
    with task_server(f"sqlite:///{stores_dir}", KEY, model_client=model) as url:
        # an upload is de-identified on arrival
        series = mr_series(5)
        refs = []
        for data in series:
            r = httpx.post(f"{url}/v1/files", headers=H, content=data)
            assert r.status_code == 201, r.text
            assert "PatientName" in r.json()["deidentified"]["removed_tags"]
            refs.append(r.json()["ref"])
        # the OpenAI Files API upload too (its file name is dropped: it often carries the patient's name)
        r = httpx.post(f"{url}/v1/files", headers=H, data={"purpose": "user_data"},
                       files={"file": ("Doe_Jane_Quincy.dcm", ct_slice(), "application/dicom")})
        assert r.status_code == 201 and r.json()["filename"] == "image.dcm", r.text
        # an inline file (its name carries the patient's name too) is de-identified before the task is stored
        inline = {"type": "medical_image", "input": {"files": [{"name": "Doe_Jane_Quincy.dcm",
                                                                "data": _b64(ct_slice())}],
                                                     "window": "lung", "question": "What organ is shown?"}}
        tasks = [httpx.post(f"{url}/v1/tasks", headers=H, json=inline).json(),
                 httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "medical_image",
                                                                 "input": {"blobs": refs}}).json()]
        sinks: list[str] = []
        for task in tasks:
            done = wait_for_status(url, KEY, task["id"], ("succeeded", "failed"))
            assert done["status"] == "succeeded", done
            result = done["result"]
            assert "PatientName" in result["removed_tags"] and "private tags" in result["removed_tags"]
            sinks.append(json.dumps(done))
            sinks.append(httpx.get(f"{url}/v1/tasks/{task['id']}/events", headers=H, timeout=30).text)
            sinks.append(httpx.get(f"{url}/v1/sessions/{result['session_id']}/messages", headers=H).text)
        stored = httpx.get(f"{url}/v1/tasks/{tasks[0]['id']}", headers=H).json()
    assert len(model.requests) == 2
    for request in model.requests:  # the prompt: texts and images, nothing of the header
        sinks.append(json.dumps(request.messages, default=lambda o: f"<{type(o).__name__}>"))
        images = [p["image"] for m in request.messages if isinstance(m["content"], list) for p in m["content"]
                  if p.get("type") == "image"]
        assert images and all(getattr(im, "info", {}) == {} or not _leaks(str(im.info)) for im in images)
    sinks.append(caplog.text)
    for sink in sinks:
        assert not _leaks(sink), _leaks(sink)
    # everything on disk: the SQLite store and the blob files, raw bytes and the base64 files decoded
    for path in stores_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert not any(v.encode() in raw for v in IDENTIFYING_VALUES), path
    kept = stored["input"]
    assert len(kept["files"]) == 1
    for f in kept["files"]:
        assert f["name"] == "image1.dcm" and not any(v.encode() in base64.b64decode(f["data"])
                                                     for v in IDENTIFYING_VALUES)


def test_bad_dicom_is_refused_at_submission_or_fails_with_a_code(tmp_path: Path) -> None:
    with task_server(f"sqlite:///{tmp_path / 'stores'}", KEY, model_client=RecordingModel()) as url:
        bad = httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "medical_image", "input": {
            "files": [{"name": "x.dcm", "data": _b64(b"plain text, not DICOM")}]}})
        assert bad.status_code == 422 and "not_dicom" in bad.json()["error"]["message"]
        assert bad.json()["error"]["param"] == "input.files[0].data"
        many = httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "medical_image", "input": {
            "files": [{"data": _b64(f)} for f in mr_series(4)], "max_slices": 3}})
        assert many.status_code == 422, many.text
        task = httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "medical_image", "input": {
            "files": [{"data": _b64(compressed_slice())}]}}).json()
        done = wait_for_status(url, KEY, task["id"], ("succeeded", "failed"))
        assert done["status"] == "failed" and done["error"]["code"] == "codec_unavailable", done
        assert done["attempts"] == 1


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    return AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)


def test_ct_slice_and_mr_series_with_the_tiny_checkpoint(tmp_path: Path, engine, tiny_checkpoint: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-kimi-vl").symlink_to(tiny_checkpoint)
    with task_server(f"sqlite:///{tmp_path / 'stores'}", KEY, engine=engine) as url:
        ct = httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "medical_image", "input": {
            "files": [{"data": _b64(ct_slice())}], "window": "bone", "max_output_tokens": 16}}).json()
        mr = httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "medical_image", "input": {
            "files": [{"data": _b64(f)} for f in mr_series(6)], "max_frames": 3, "max_output_tokens": 16}}).json()
        ct_done = wait_for_status(url, KEY, ct["id"], ("succeeded", "failed"), timeout=300)
        mr_done = wait_for_status(url, KEY, mr["id"], ("succeeded", "failed"), timeout=300)
    assert ct_done["status"] == "succeeded", ct_done
    assert ct_done["result"]["window"] == "bone" and ct_done["result"]["modality"] == "CT"
    assert isinstance(ct_done["result"]["answer"], str)
    assert mr_done["status"] == "succeeded", mr_done
    assert [f["position_mm"] for f in mr_done["result"]["frames"]] == [0.0, 10.0, 25.0]
    assert "PatientName" in mr_done["result"]["removed_tags"]


def test_dicom_in_chat_with_a_session_stores_no_patient_data(tmp_path: Path, engine, tiny_checkpoint: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A data URL of type application/dicom in a chat turn: decoded (de-identified, the file's window) for the
    model; the session keeps the decoded pixels only; a compressed file without a decoder is a 415 with a code."""
    caplog.set_level(logging.INFO)
    stores_dir = tmp_path / "stores"
    with task_server(f"sqlite:///{stores_dir}", KEY, engine=engine) as url:
        session = httpx.post(f"{url}/v1/sessions", headers=H, json={}).json()
        image = {"type": "image_url", "image_url": {"url": "data:application/dicom;base64," + _b64(ct_slice())}}
        r = httpx.post(f"{url}/v1/chat/completions", headers=H, timeout=120, json={
            "model": "kimi-vl", "max_tokens": 4, "session_id": session["id"],
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]})
        assert r.status_code == 200, r.text
        stored = httpx.get(f"{url}/v1/sessions/{session['id']}/messages", headers=H).text
        assert "blob_ref" in stored or "image" in stored
        bad = {"type": "image_url", "image_url": {"url": "data:application/dicom;base64," + _b64(compressed_slice())}}
        r = httpx.post(f"{url}/v1/chat/completions", headers=H, timeout=60, json={
            "model": "kimi-vl", "max_tokens": 4, "messages": [{"role": "user", "content": [bad]}]})
        assert r.status_code == 415 and r.json()["error"]["code"] == "dicom_codec_unavailable", r.text
    for sink in (stored, caplog.text):
        assert not _leaks(sink), _leaks(sink)
    for path in stores_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert not any(v.encode() in raw for v in IDENTIFYING_VALUES), path


def test_a_chat_task_with_a_dicom_image_is_stored_deidentified(tmp_path: Path) -> None:
    model = RecordingModel()
    stores_dir = tmp_path / "stores"
    with task_server(f"sqlite:///{stores_dir}", KEY, model_client=model) as url:
        image = {"type": "image_url", "image_url": {"url": "data:application/dicom;base64," + _b64(ct_slice())}}
        task = httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "chat", "input": {
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]}}).json()
        done = wait_for_status(url, KEY, task["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done
    assert model.requests and not _leaks(json.dumps(done))
    stored_url = done["input"]["messages"][0]["content"][0]["image_url"]["url"]  # the record as stored
    stored = base64.b64decode(stored_url.split(",", 1)[1])
    assert stored[128:132] == b"DICM" and not any(v.encode() in stored for v in IDENTIFYING_VALUES)
    for path in stores_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert not any(v.encode() in raw for v in IDENTIFYING_VALUES), path
