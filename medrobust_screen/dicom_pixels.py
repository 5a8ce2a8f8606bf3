"""The grey levels a display shows for a DICOM frame: the pixel-module attributes in force for one frame
(top level < shared < per-frame functional groups), and the table from stored values to uint8 display
grey levels (the DICOM grayscale pipeline, PS3.3 C.11 and PS3.4 N.2, with pydicom's implementations;
see medrobust_screen.dicom for the rule). pydicom is imported inside the functions."""

from __future__ import annotations

import numpy as np

PIXEL_TRANSFORM = ("RescaleSlope", "RescaleIntercept", "RescaleType")
VOI = ("WindowCenter", "WindowWidth", "VOILUTFunction")


def display_lut(settings) -> tuple[np.ndarray | None, int]:
    """Stored value -> uint8 display grey level, for one frame's pixel-module attributes.

    ``settings`` is a pydicom Dataset with BitsStored, PixelRepresentation, PhotometricInterpretation
    and, if present, rescale/modality LUT and window/VOI LUT attributes.  Returns ``(table, low)``:
    ``grey = table[clip(stored, low, low + len(table) - 1) - low]``; ``table`` is None when the mapping
    is the identity on 8-bit unsigned data.  See medrobust_screen.dicom for the rule.
    Raises ValueError/NotImplementedError (from pydicom) for a window or LUT it cannot apply.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bits = int(settings.BitsStored)
    signed = int(settings.get("PixelRepresentation", 0)) == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    monochrome1 = settings.PhotometricInterpretation == "MONOCHROME1"
    rescale = "RescaleSlope" in settings and "RescaleIntercept" in settings
    modality_lut = bool(settings.get("ModalityLUTSequence"))
    voi_lut = bool(settings.get("VOILUTSequence"))
    window = settings.get("WindowCenter") is not None and settings.get("WindowWidth") is not None
    if (bits == 8 and not signed and not monochrome1 and not (modality_lut or voi_lut or window)
            and (not rescale or (float(settings.RescaleSlope) > 0))):
        return None, 0  # positive rescale without a window only shifts the full range: identity

    stored = np.arange(low, high + 1, dtype=np.int64)
    values = apply_modality_lut(stored, settings)
    # The modality output range, as pydicom's apply_windowing computes it (y_min maps to black).
    if modality_lut:
        y_min, y_max = 0.0, float(2 ** int(settings.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        y_min, y_max = float(low), float(high)
        if rescale:
            slope, intercept = float(settings.RescaleSlope), float(settings.RescaleIntercept)
            y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    if voi_lut:
        values = apply_voi_lut(values, settings)
        grey = values.astype(np.float64) / float(2 ** int(settings.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif window:
        values = apply_voi_lut(values, settings)
        grey = (values.astype(np.float64) - y_min) / (y_max - y_min) if y_max != y_min else np.zeros(len(stored))
    else:  # no VOI: the full range of possible values, smallest value black
        lo, hi = min(y_min, y_max), max(y_min, y_max)
        grey = (values.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(len(stored))
    grey = np.clip(np.nan_to_num(grey, nan=0.0), 0.0, 1.0)
    if monochrome1:
        grey = 1.0 - grey
    return np.floor(grey * 255.0 + 0.5).astype(np.uint8), low


def first_item(sequence):
    """The first item of a DICOM sequence, or None (absent, empty or not a sequence)."""
    try:
        return sequence[0] if sequence else None
    except (IndexError, TypeError):
        return None


def frame_settings_of(ds, index: int):
    """Top level < Shared < Per-frame functional groups, for the pixel-value transformation and VOI."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for keyword in ("BitsStored", "BitsAllocated", "PixelRepresentation", "PhotometricInterpretation",
                    "ModalityLUTSequence", "VOILUTSequence", *PIXEL_TRANSFORM, *VOI):
        if keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta  # pydicom reads LUT data endianness from it
    groups = [first_item(ds.get("SharedFunctionalGroupsSequence"))]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        if group is None:
            continue
        for sequence, keywords in (("PixelValueTransformationSequence", PIXEL_TRANSFORM),
                                   ("FrameVOILUTSequence", VOI)):
            item = first_item(group.get(sequence))
            if item is None:
                continue
            if sequence == "FrameVOILUTSequence":  # a frame's window replaces the top-level VOI
                for keyword in VOI:
                    if keyword in out:
                        delattr(out, keyword)
            for keyword in keywords:
                if keyword in item:
                    setattr(out, keyword, item[keyword].value)
    return out


def settings_key(settings) -> tuple:
    """What makes two frames' display tables the same (equal keys: one table serves both)."""
    key = [str(settings.get(k)) for k in ("BitsStored", "PixelRepresentation", "PhotometricInterpretation",
                                          *PIXEL_TRANSFORM, *VOI)]
    for sequence in ("ModalityLUTSequence", "VOILUTSequence"):  # the same objects for every frame
        key.append(id(settings[sequence].value) if sequence in settings else None)
    return tuple(key)
