"""Generated DICOM files: a CT slice in Hounsfield units with identifying patient tags (and a private tag), an MR
series whose slices come in shuffled order, and variants (MONOCHROME1, compressed transfer syntax, cut short)."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid)

# every identifying value planted in the files: none may show up anywhere outside them
PATIENT = {"PatientName": "Doe^Jane^Quincy", "PatientID": "MRN-5566-7788", "PatientBirthDate": "19700412",
           "InstitutionName": "Saint Example Hospital", "ReferringPhysicianName": "House^Gregory",
           "AccessionNumber": "ACC99887766", "PatientAddress": "12 Elm Street Springfield"}
PRIVATE_VALUE = "PRIVATE-SECRET-4242"
IDENTIFYING_VALUES = [*PATIENT.values(), PRIVATE_VALUE, "Doe", "Jane", "5566-7788"]


def _dataset(sop_class: str, modality: str, pixels: np.ndarray, **tags: object) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.add_new(0x00091010, "LO", PRIVATE_VALUE)  # a vendor's private tag with identifying text
    ds.add_new(0x00090010, "LO", "ACME PRIVATE")
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def _bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def ct_hu_phantom(size: int = 64) -> np.ndarray:
    """Air outside (-1000 HU), soft tissue disc (40 HU), lung region (-700), bone ring (1000)."""
    y, x = np.mgrid[:size, :size] - size / 2
    r = np.hypot(x, y)
    hu = np.full((size, size), -1000.0)
    hu[r < size * 0.45] = 40.0
    hu[(r < size * 0.2) & (x < 0)] = -700.0
    hu[(r > size * 0.4) & (r < size * 0.45)] = 1000.0
    return hu


def ct_slice(z: float = 0.0, **tags: object) -> bytes:
    hu = ct_hu_phantom()
    ds = _dataset(CTImageStorage, "CT", hu + 1024, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
                  WindowWidth=400, ImagePositionPatient=[0, 0, z], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                  **tags)
    return _bytes(ds)


def mr_series(n: int = 12, size: int = 48) -> list[bytes]:
    """Slices at z = 0, 5, 10 … mm, returned in a shuffled order; a slice's brightness grows with z."""
    files = []
    for k in range(n):
        pixels = np.full((size, size), 100 + 50 * k)
        ds = _dataset(MRImageStorage, "MR", pixels, ImagePositionPatient=[0, 0, 5.0 * k],
                      ImageOrientationPatient=[1, 0, 0, 0, 1, 0], InstanceNumber=n - k)
        files.append(_bytes(ds))
    order = np.random.default_rng(1).permutation(n)
    return [files[i] for i in order]


def compressed_slice() -> bytes:
    """A JPEG 2000 slice: valid header, pixel data no decoder here can read."""
    from pydicom.encaps import encapsulate

    ds = _dataset(CTImageStorage, "CT", np.zeros((8, 8)))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _bytes(ds)
