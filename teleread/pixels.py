"""Pixel decoding for every transfer syntax the network accepts, with permissively licensed decoders.

pydicom picks a decoder plugin per transfer syntax among those installed: pylibjpeg-openjpeg (JPEG
2000), pyjpegls (JPEG-LS), GDCM (JPEG lossless, JPEG baseline, JPEG-LS, JPEG 2000), Pillow (JPEG
baseline, JPEG 2000) and pydicom's own RLE decoder. None of those decodes 12-bit JPEG extended
(1.2.840.10008.1.2.4.51): Pillow and the GDCM wheel are built with 8-bit libjpeg only, and the one
pylibjpeg plugin that does (pylibjpeg-libjpeg) is GPL. This module adds a pydicom decoder plugin for
it on imagecodecs (BSD; libjpeg-turbo built with 12-bit support). Call :func:`ensure_decoders` before
decoding; it is idempotent. This module is the only one that imports imagecodecs.

It also makes the viewer's copy of a large JPEG 2000 image (:func:`htj2k_rendition`): the same
pixels as an HTJ2K lossless codestream (OpenJPH, in imagecodecs), which a browser decodes some 20
times faster than JPEG 2000 (a 3300 x 3300 radiograph: 53 ms against 1.5 s here, natively).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from pydicom import uid

DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("imagecodecs>=2024.1",)}
PLUGIN = "teleread-imagecodecs"
_registered = False
_lock = threading.Lock()


def is_available(transfer_syntax: str) -> bool:
    """pydicom's plugin interface: True when imagecodecs can decode ``transfer_syntax``."""
    if transfer_syntax != uid.JPEGExtended12Bit:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG8.available)


def _decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom's plugin interface: one JPEG frame as pixel bytes, samples interleaved, in a container
    of the dataset's Bits Allocated (8 or 16)."""
    import imagecodecs

    array = imagecodecs.jpeg8_decode(src)
    if array.ndim == 3:  # colour: libjpeg returns colour-by-pixel
        runner.set_option("planar_configuration", 0)
    dtype = "<u2" if runner.bits_allocated > 8 else "u1"
    return bytes(array.astype(dtype, copy=False).tobytes())


def ensure_decoders() -> None:
    """Register the 12-bit JPEG extended plugin with pydicom once per process."""
    global _registered
    with _lock:
        if _registered:
            return
        from pydicom.pixels.decoders import JPEGExtended12BitDecoder

        if PLUGIN not in JPEGExtended12BitDecoder.available_plugins and is_available(uid.JPEGExtended12Bit):
            JPEGExtended12BitDecoder.add_plugin(PLUGIN, ("teleread.pixels", "_decode_frame"))
        _registered = True


HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
RENDITION_SOURCES = (uid.JPEG2000Lossless, uid.JPEG2000)
RENDITION_MIN_PIXELS = 1_000_000  # below this a browser decodes the JPEG 2000 itself quickly enough


def wants_rendition(transfer_syntax: str, *, rows: int | None, columns: int | None, frames: int | None) -> bool:
    """Whether an instance gets an HTJ2K copy for viewers: one large JPEG 2000 frame."""
    return (
        transfer_syntax in RENDITION_SOURCES
        and (frames or 1) == 1
        and (rows or 0) * (columns or 0) >= RENDITION_MIN_PIXELS
    )


def htj2k_rendition(source: Path, target: Path) -> tuple[str, int] | None:
    """Write the single frame of the DICOM file ``source`` to ``target`` as an HTJ2K lossless
    codestream, kept only if it decodes back to exactly the stored values; its SHA-256 and size, or
    None for an instance it is not made for (not one unsigned grey frame of JPEG 2000)."""
    import imagecodecs
    import numpy as np
    import pydicom
    from pydicom.pixels import pixel_array

    ensure_decoders()
    ds = pydicom.dcmread(source)
    frames = int(ds.get("NumberOfFrames") or 1)
    if (
        ds.file_meta.TransferSyntaxUID not in RENDITION_SOURCES
        or frames != 1
        or int(ds.get("SamplesPerPixel") or 1) != 1
        or int(ds.get("PixelRepresentation") or 0) != 0
        or int(ds.get("BitsAllocated") or 0) not in (8, 16)
    ):
        return None
    values = np.ascontiguousarray(pixel_array(ds, raw=True))  # the stored values, as the codestream holds them
    code = bytes(imagecodecs.htj2k_encode(values))
    if not np.array_equal(imagecodecs.htj2k_decode(code), values):
        return None
    target.write_bytes(code)
    return hashlib.sha256(code).hexdigest(), len(code)
