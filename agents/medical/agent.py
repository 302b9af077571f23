"""The ``medical_image`` agent: DICOM single images, multi-frame files and series (CT/MR stacks) -> a
de-identified, windowed frame sequence -> the model's answer to a question about it.

Patient data never leaves the file: inline files are de-identified *before the task is stored*
(:meth:`MedicalImageAgent.stored_input`), uploads when they are received (``POST /v1/files``), and again when the
task runs (so a blob stored some other way is stripped too); events, the session, the prompt and the result carry
only de-identified pixels, positions and the list of removed tag keywords.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.base import Agent, AgentContext, AgentError, InputRejected, SubmissionCheck
from agents.registry import register_agent
from agents.sources import FileInput

MAX_FILE_BYTES = 64 * 2**20
MAX_SERIES_BYTES = 512 * 2**20


class MedicalImageInput(BaseModel):
    """One or more DICOM files (one per slice for a series), inline (``files``) or uploaded (``blobs``)."""

    model_config = ConfigDict(extra="forbid")

    files: list[FileInput] | None = Field(None, min_length=1, max_length=2000)
    blobs: list[str] | None = Field(None, min_length=1, max_length=2000)
    question: str = Field("Describe what these medical images show.", min_length=1, max_length=4000)
    window: Literal["auto", "file", "lung", "soft_tissue", "bone", "brain", "range"] = Field(
        "auto", description="display window: a standard CT preset, the file's own window, or the data's range "
        "(auto: the file's window when it has one, else the range)")
    max_frames: int = Field(8, ge=1, le=64, description="a series is sampled evenly down to this many slices")
    max_slices: int = Field(1000, ge=1, le=5000, description="refuse a series with more slices than this")
    max_output_tokens: int = Field(512, ge=16, le=8192)

    @model_validator(mode="after")
    def _one_source(self) -> "MedicalImageInput":
        if (self.files is None) == (self.blobs is None):
            raise ValueError("give exactly one of files or blobs")
        if self.blobs is not None and any(len(b) != 64 or any(c not in "0123456789abcdef" for c in b)
                                          for b in self.blobs):
            raise ValueError("blobs must be refs from POST /v1/files (64 hex digits)")
        if len(self.files or self.blobs or []) > self.max_slices:
            raise ValueError(f"more files than max_slices ({self.max_slices})")
        return self


def _rejected(exc: Any, param: str) -> InputRejected:
    return InputRejected(f"{exc.message} (code {exc.code})", param)


@register_agent
class MedicalImageAgent(Agent):
    type = "medical_image"
    Input = MedicalImageInput
    description = ("DICOM images and series (CT, MR, X-ray): de-identified, rescaled to physical units, windowed "
                   "(lung/soft tissue/bone/brain/file), series ordered by slice position -> the model's answer; "
                   "the result lists the patient tags removed.")

    @classmethod
    async def check_submission(cls, input: MedicalImageInput, check: SubmissionCheck) -> None:
        """Every file must be a readable DICOM file; an upload must exist and be DICOM."""
        from connectors.dicom import DicomError, is_dicom, parse

        for i, f in enumerate(input.files or []):
            try:
                parse(f.bytes())
            except DicomError as exc:
                raise _rejected(exc, f"files[{i}].data") from None
        for i, ref in enumerate(input.blobs or []):
            data = await check.blob(ref)
            if data is None:
                raise InputRejected(f"blob {ref} not found (upload the file with POST /v1/files first)",
                                    f"blobs[{i}]")
            if not is_dicom(data):
                raise InputRejected("not a DICOM file (no DICM marker after the 128-byte preamble)", f"blobs[{i}]")

    @classmethod
    def stored_input(cls, input: MedicalImageInput) -> dict[str, Any] | None:
        """What the task record keeps: inline files de-identified (file names dropped too: they often carry the
        patient's name)."""
        from connectors.dicom import deidentified_bytes

        if input.files is None:
            return None
        files = []
        for i, f in enumerate(input.files):
            clean, _ = deidentified_bytes(f.bytes())
            files.append({"name": f"image{i + 1}.dcm", "data": base64.b64encode(clean).decode()})
        return {**input.model_dump(exclude_none=True), "files": files}

    async def run(self, ctx: AgentContext, input: MedicalImageInput) -> dict[str, Any]:
        from connectors.dicom import DicomError, read_frames

        await ctx.step("load")
        datas: list[bytes] = []
        for i, f in enumerate(input.files or []):
            datas.append(f.bytes())
        for ref in input.blobs or []:
            data = await ctx.blobs.get(ctx.owner, ref)
            if data is None:
                raise AgentError(f"blob {ref} not found (upload it with POST /v1/files)", code="blob_not_found")
            datas.append(data)
        if any(len(d) > MAX_FILE_BYTES for d in datas) or sum(map(len, datas)) > MAX_SERIES_BYTES:
            raise AgentError(f"a file over {MAX_FILE_BYTES} bytes or a series over {MAX_SERIES_BYTES} bytes",
                             code="too_large")
        await ctx.step("read", files=len(datas))
        try:
            frames = await asyncio.to_thread(read_frames, datas, window=input.window, max_frames=input.max_frames,
                                             max_slices=input.max_slices)
        except DicomError as exc:
            raise AgentError(exc.message, code=exc.code) from None
        del datas
        await ctx.emit("frames", {"total_slices": frames.total_slices, "sampled": len(frames.slices),
                                  "modality": frames.modality, "window": frames.window,
                                  "removed_tags": len(frames.removed_tags)})
        await ctx.step("answer")
        content: list[dict[str, Any]] = []
        for s in frames.slices:
            content += [{"type": "text", "text": s.label}, {"type": "image", "image": s.image}]
        content.append({"type": "text", "text": input.question})
        what = f"{frames.modality or 'medical'} image" + (f" series of {frames.total_slices} slices, "
                                                           f"{len(frames.slices)} shown in order"
                                                           if frames.total_slices > 1 else "")
        messages = [{"role": "system", "content": f"You read a de-identified {what}, windowed "
                                                  f"({frames.window}). Refer to slices by their labels."},
                    {"role": "user", "content": content}]
        reply = await ctx.chat(messages, max_tokens=input.max_output_tokens, temperature=0.0)
        result = {
            "answer": reply.text,
            "modality": frames.modality,
            "window": frames.window,
            "total_slices": frames.total_slices,
            "frames": [{"label": s.label, "position_mm": s.position, "instance": s.instance}
                       for s in frames.slices],
            "removed_tags": frames.removed_tags,
            "warnings": frames.warnings,
            "session_id": ctx.session_id,
        }
        await ctx.remember([{"role": "system", "content": f"The user asked about a de-identified {what}. "
                             f"Question: {input.question}\nAnswer: {reply.text}"}])
        return result
