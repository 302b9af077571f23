"""DICOM in: de-identification first, then pixels in physical units, windowed to 8 bits for the model.

Patient data never leaves the file: :func:`deidentify` removes every identifying element (the keywords in
``IDENTIFYING``, every person-name element, private tags, and the same in nested sequences) and returns the
*keywords* it removed, never their values.  Callers de-identify before anything is stored, logged or sent on, and
report the list.  Pixels are rescaled to physical units (``RescaleSlope``/``Intercept``: Hounsfield units for CT),
windowed with a standard preset (lung, soft tissue, bone, brain), the file's own window, or the data's range, and
MONOCHROME1 (white = low) is inverted so every image reads white = dense.

Refusals are :class:`DicomError` with a code: ``not_dicom``, ``corrupt``, ``no_pixels``, ``codec_unavailable``
(a compressed transfer syntax whose decoder package is not installed), ``too_many_slices``, ``too_large``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# DICOM PS3.15 basic profile (the elements that identify a patient, a clinician, a place or a visit)
IDENTIFYING: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "MilitaryRank",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments", "PatientReligiousPreference",
    "MedicalRecordLocator", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "RequestingPhysician", "OperatorsName", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "AccessionNumber", "StudyID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime", "StudyTime",
    "SeriesTime", "AcquisitionTime", "ContentTime", "RequestAttributesSequence", "StudyDescription", "SeriesDescription",
    "ImageComments", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
    "ScheduledProcedureStepDescription", "AdmittingDiagnosesDescription", "ReferencedPatientSequence",
    "ReferencedStudySequence", "PatientInsurancePlanCodeSequence", "CountryOfResidence", "RegionOfResidence",
    "CurrentPatientLocation", "PatientState", "ResponsiblePerson", "ResponsibleOrganization",
)
# UIDs can be looked up in the hospital's archive: replaced by a one-way hash of themselves (the same original UID
# gets the same replacement, so the slices of a series still belong together)
REPLACED_UIDS: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
METHOD = "kimiray basic profile; removed or replaced:"  # DeidentificationMethod's first value
WINDOWS: dict[str, tuple[float, float]] = {  # name -> (center, width) in Hounsfield units
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_MAX_SLICES = 1000
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_IMAGE_SIDE = 1024  # frames for the model are scaled down to this


class DicomError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def is_dicom(data: bytes) -> bool:
    """A Part 10 file: 128-byte preamble then ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def parse(data: bytes):  # type: ignore[no-untyped-def]
    """The dataset, or ``DicomError`` (``not_dicom`` / ``corrupt``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not is_dicom(data):
        raise DicomError("not a DICOM file (no DICM marker after the 128-byte preamble)", "not_dicom")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PixelData  # noqa: B018 - force reading to the end: a cut file fails here, not later
    except AttributeError:
        raise DicomError("the DICOM file has no image (no PixelData)", "no_pixels") from None
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        raise DicomError(f"the DICOM file cannot be read: {exc}", "corrupt") from None
    return ds


def deidentify(ds) -> list[str]:  # type: ignore[no-untyped-def]
    """Remove identifying elements in place (nested sequences included) and replace the UIDs; the sorted
    keywords removed or replaced."""
    removed: set[str] = set()

    def strip(dataset) -> None:  # type: ignore[no-untyped-def]
        for elem in list(dataset):
            keyword = elem.keyword or f"private {elem.tag}"
            if elem.tag.is_private or keyword in IDENTIFYING or elem.VR == "PN":
                removed.add(keyword if not elem.tag.is_private else "private tags")
                del dataset[elem.tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    strip(item)

    strip(ds)
    for keyword in REPLACED_UIDS:
        if keyword in ds:
            setattr(ds, keyword, _new_uid(str(getattr(ds, keyword))))
            removed.add(keyword)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = _new_uid(str(meta.MediaStorageSOPInstanceUID))
        removed.add("MediaStorageSOPInstanceUID")
    earlier = ds.get("DeidentificationMethod")
    earlier = list(earlier) if earlier is not None and not isinstance(earlier, str) else [earlier or ""]
    if earlier and earlier[0] == METHOD:  # de-identified here before (at upload / submission): report that too
        removed.update(earlier[1:])
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [METHOD, *sorted(removed)]
    return sorted(removed)


def _new_uid(original: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["kimiray-deid", original]))


def deidentified_bytes(data: bytes) -> tuple[bytes, list[str]]:
    """The file re-written without identifying elements (for storing an upload), and what was removed."""
    ds = parse(data)
    removed = deidentify(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), removed


@dataclass
class Slice:
    """One frame for the model: 8-bit image, where it is, and how it was windowed."""

    image: Image.Image
    position: float | None  # mm along the stack's normal (None when the file does not say)
    instance: int | None
    label: str = ""


@dataclass
class Frames:
    slices: list[Slice]
    modality: str | None
    window: str  # the preset / "file" / "range" used
    removed_tags: list[str] = field(default_factory=list)
    total_slices: int = 0
    warnings: list[str] = field(default_factory=list)


def _pixels(ds):  # type: ignore[no-untyped-def]
    syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * frames > DEFAULT_MAX_PIXELS * 4 or rows * cols > DEFAULT_MAX_PIXELS:
        raise DicomError(f"image of {frames} x {rows} x {cols} pixels is over the limit", "too_large")
    compressed = syntax is not None and getattr(syntax, "is_compressed", False)
    expected = rows * cols * frames * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.get("BitsAllocated", 8)) // 8
    if not compressed and len(ds.PixelData) < expected:
        raise DicomError(f"the pixel data is cut short ({len(ds.PixelData)} of {expected} bytes)", "corrupt")
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"pixel data in the compressed transfer syntax {name!r} cannot be decoded here (no "
                         f"decoder installed: {str(exc).splitlines()[0][:200]})", "codec_unavailable") from None
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DicomError(f"the pixel data cannot be read: {exc}", "corrupt") from None


def _window_for(ds, window: str) -> tuple[str, tuple[float, float] | None]:  # type: ignore[no-untyped-def]
    if window in WINDOWS:
        return window, WINDOWS[window]
    if window in ("file", "auto") and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = ds.WindowCenter, ds.WindowWidth
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        if width > 0:
            return "file", (center, width)
    return "range", None


def to_8bit(values: np.ndarray, window: tuple[float, float] | None, invert: bool) -> np.ndarray:
    """Physical values -> 0..255 through a (center, width) window, or the 0.5-99.5 percentile range."""
    values = values.astype(np.float64)
    if window is None:
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    else:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    if high <= low:
        high = low + 1.0
    out = (np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return 255 - out if invert else out


def images(ds, window: str = "auto") -> tuple[list[Image.Image], str]:  # type: ignore[no-untyped-def]
    """Every frame of a dataset as an 8-bit image, and the window used."""
    array = _pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or (array.ndim == 3 and array.shape[-1] == 3
                                                              and frames == 1):
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            array = convert_color_space(array, photometric, "RGB")
        stack = array if frames > 1 else array[None]
        return [_fit(Image.fromarray(np.asarray(f, dtype=np.uint8), "RGB")) for f in stack], "color"
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = array.astype(np.float64) * slope + intercept
    name, bounds = _window_for(ds, window)
    stack = values if frames > 1 else values[None]
    invert = photometric == "MONOCHROME1"
    return [_fit(Image.fromarray(to_8bit(f, bounds, invert), "L")) for f in stack], name


def _fit(image: Image.Image) -> Image.Image:
    if max(image.size) > MAX_IMAGE_SIDE:
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    return image.convert("RGB")


def _position(ds) -> float | None:  # type: ignore[no-untyped-def]
    """Distance along the slice normal (from ImagePositionPatient and ImageOrientationPatient), else SliceLocation."""
    try:
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            o = [float(v) for v in ds.ImageOrientationPatient]
            normal = np.cross(o[:3], o[3:])
            return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
        if "SliceLocation" in ds:
            return float(ds.SliceLocation)
    except (ValueError, TypeError):
        return None
    return None


def evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def read_frames(files: list[bytes], *, window: str = "auto", max_frames: int = 16,
                max_slices: int = DEFAULT_MAX_SLICES) -> Frames:
    """One file (a single image or a multi-frame file) or a series (one file per slice): de-identified, ordered
    by slice position, sampled evenly down to ``max_frames`` and labelled with their positions."""
    if len(files) > max_slices:
        raise DicomError(f"{len(files)} files, over the limit of {max_slices} slices", "too_many_slices")
    datasets = [parse(data) for data in files]
    removed: set[str] = set()
    for ds in datasets:
        removed.update(deidentify(ds))
    warnings = []
    if any(str(ds.get("BurnedInAnnotation", "")).upper() == "YES" for ds in datasets):
        warnings.append("the images say they carry burned-in annotations (text in the pixels), which "
                        "de-identification of the header cannot remove")
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        ds = datasets[0]
        count = int(ds.NumberOfFrames)
        if count > max_slices:
            raise DicomError(f"{count} frames, over the limit of {max_slices} slices", "too_many_slices")
        frames, name = images(ds, window)
        picked = evenly(len(frames), max_frames)
        slices = [Slice(frames[i], None, i + 1, f"[frame {i + 1}/{count}]") for i in picked]
        return Frames(slices, ds.get("Modality"), name, sorted(removed), count, warnings)
    ordered = sorted(datasets, key=lambda ds: (_position(ds) is None, _position(ds) or 0.0,
                                               int(ds.get("InstanceNumber", 0) or 0)))
    picked = evenly(len(ordered), max_frames)
    slices, names = [], set()
    for i in picked:
        ds = ordered[i]
        frame_images, name = images(ds, window)
        names.add(name)
        position = _position(ds)
        instance = int(ds.get("InstanceNumber", 0) or 0) or None
        where = f"z={position:.1f} mm" if position is not None else f"instance {instance or i + 1}"
        label = f"[slice {i + 1}/{len(ordered)}, {where}]" if len(ordered) > 1 else f"[{where}]"
        slices.append(Slice(frame_images[0], position, instance, label))
    return Frames(slices, ordered[0].get("Modality"), "/".join(sorted(names)), sorted(removed), len(ordered),
                  warnings)


def deidentify_data_url(url: str) -> str | None:
    """A ``data:`` URL carrying a DICOM file, re-encoded de-identified (None: not DICOM, or not readable here:
    then it is left for the decoder to refuse with a code)."""
    import base64
    import binascii

    head, sep, payload = url.strip().partition(",")
    if not sep or not head.lower().startswith("data:") or ";base64" not in head.lower():
        return None
    try:
        data = base64.b64decode("".join(payload.split()), validate=False)
    except (binascii.Error, ValueError):
        return None
    if not is_dicom(data):
        return None
    try:
        clean, _ = deidentified_bytes(data)
    except DicomError:
        return "data:application/dicom;base64,"  # unreadable DICOM: keep nothing of it (the task then fails)
    return "data:application/dicom;base64," + base64.b64encode(clean).decode()
