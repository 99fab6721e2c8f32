"""Pixel decoding for every transfer syntax the network accepts, with permissively licensed decoders.

pydicom picks a decoder plugin per transfer syntax among those installed: pylibjpeg-openjpeg (JPEG
2000), pyjpegls (JPEG-LS), GDCM (JPEG lossless, JPEG baseline, JPEG-LS, JPEG 2000), Pillow (JPEG
baseline, JPEG 2000) and pydicom's own RLE decoder. None of those decodes 12-bit JPEG extended
(1.2.840.10008.1.2.4.51): Pillow and the GDCM wheel are built with 8-bit libjpeg only, and the one
pylibjpeg plugin that does (pylibjpeg-libjpeg) is GPL. This module adds a pydicom decoder plugin for
it on imagecodecs (BSD; libjpeg-turbo built with 12-bit support). Call :func:`ensure_decoders` before
decoding; it is idempotent. This module is the only one that imports imagecodecs.
"""

from __future__ import annotations

import threading
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
