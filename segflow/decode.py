"""Encoded image bytes to pixels: RGB images for models, index maps for ground truth.

Every decode starts with a lazy :func:`PIL.Image.open`, which reads only the header: it
identifies the format and mode and gives the size, checked against ``max_pixels`` before
anything the size of the image is allocated. The pixels then come from the faster decoder for
that format and mode, as measured by ``bench/decode.py`` on this project's real images:

- JPEG (gray, RGB): torchvision, about 1.2x PIL's speed, bit-identical pixels (both bundle
  libjpeg-turbo; max abs difference 0 over every aerial tile, see the bench), so predictions
  do not depend on which decoder a worker used. ``device="cuda"`` decodes with nvjpeg instead,
  whose IDCT and chroma upsampling differ from libjpeg-turbo's: its pixels are reproducible on
  one GPU stack but not equal to the CPU ones, so leave ``device`` unset where predictions
  must match across machines.
- WebP: torchvision, about 1.1x PIL, identical pixels.
- PNG: PIL, although torchvision is about 1.1x faster: torchvision 0.29's ``decode_png``
  crashes the process (SIGSEGV) on any libpng error, such as a CRC or zlib failure in a
  damaged file, and no worker can catch that.
- TIFF, BMP, CMYK JPEG and every other mode: PIL (torchvision has no decoder for them).

If torchvision rejects bytes routed to it, PIL decodes them: it either succeeds (a variant
torchvision lacks) or names the problem precisely (truncated rather than merely "failed").

Conventions, shared by both decoders and tested against PIL's own conversions:

- Alpha is discarded, not composited: a transparent pixel keeps its stored colour, as PIL's
  ``convert("RGB")`` and libpng's strip-alpha give it. Palette transparency is ignored likewise.
- 16-bit samples map to 8 bits by keeping the high byte (``v >> 8``). That inverts the
  standard 8-to-16-bit widening (``v * 257``) exactly and is what PIL does for 16-bit RGB PNGs.
- EXIF orientation, all eight values, is applied as PIL's ``ImageOps.exif_transpose`` applies
  it; an out-of-range value leaves the image as stored.
- ICC profiles are not applied (neither decoder does by default).
- PIL's own process-wide limit (``PIL.Image.MAX_IMAGE_PIXELS``) still applies to the header
  read: it warns above 89,478,485 pixels and refuses above twice that, which equals
  :data:`DEFAULT_MAX_PIXELS`. Raise or clear it to decode anything larger.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from segflow.errors import SegflowError

if TYPE_CHECKING:
    import torch

# A 10k x 10k aerial tile (1e8 pixels) with 79% to spare; it is also PIL's own hard limit
# (2 * MAX_IMAGE_PIXELS), so at the default the two guards agree. The largest image it admits
# decodes to 537 MB of RGB.
DEFAULT_MAX_PIXELS = 178_956_970

_SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "BMP": (b"BM",),
}
_SUPPORTED_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "BMP")
_FORMAT_NAMES = "JPEG, PNG, TIFF, WebP or BMP"

# Format -> the header modes torchvision decodes, pixel for pixel as PIL does (see the tests);
# everything else goes to PIL. Cameras write multi-picture JPEGs (MPO): their first picture
# is an ordinary JPEG stream.
_TORCHVISION_ROUTES = {
    "JPEG": frozenset({"L", "RGB"}),
    "MPO": frozenset({"L", "RGB"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
_PIL_RGB_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_LABEL_MODES = frozenset({"1", "L", "P", "I", *_SIXTEEN_BIT_GRAY_MODES})

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> (swap the two image axes first, then flip these axes of the result).
_ORIENTATION_OPS: dict[int, tuple[bool, tuple[int, ...]]] = {
    2: (False, (1,)),
    3: (False, (0, 1)),
    4: (False, (0,)),
    5: (True, ()),
    6: (True, (1,)),
    7: (True, (0, 1)),
    8: (True, (0,)),
}

# What PIL raises from damaged data, besides our own checks.
_PIL_DECODE_FAILURES = (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error)


class ImageDecodeError(SegflowError, ValueError):
    """Bytes that cannot become an image; ``reason`` says why in one word, for counting."""

    reason: ClassVar[str] = "undecodable"

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem

    def __reduce__(self):
        # Exceptions pickle through ``args`` (the message alone); Ray ships them between
        # processes, so rebuild from both fields instead.
        return type(self), (self.name, self.problem)


class EmptyImageError(ImageDecodeError):
    reason = "empty"


class TruncatedImageError(ImageDecodeError):
    reason = "truncated"


class CorruptImageError(ImageDecodeError):
    reason = "corrupt"


class NotAnImageError(ImageDecodeError):
    reason = "not_an_image"


class ImageTooLargeError(ImageDecodeError):
    reason = "too_large"


class UnsupportedModeError(ImageDecodeError):
    reason = "unsupported_mode"


def decode_image(
    data: bytes,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Decode a JPEG, PNG, TIFF, WebP or BMP file to RGB pixels, EXIF orientation applied.

    Returns a contiguous ``(H, W, 3)`` uint8 tensor, channels last like PIL and numpy, so a
    CPU result's ``.numpy()`` is the numpy variant at no cost. ``name`` (the source URI) heads
    every error message. ``max_pixels=None`` turns segflow's size guard off. ``device="cuda"``
    decodes JPEGs on the GPU (see the module notes on reproducibility) and moves other formats
    there after a CPU decode; without CUDA it decodes on, and returns on, the CPU.

    Raises a subclass of :class:`ImageDecodeError` for bad bytes.
    """
    import torch  # here: readers of a run's tables draw with decode_rgb, without torch

    label = _label(data, name)
    image = _open_header(data, label, max_pixels)
    target = _usable_device(device)
    with _decoding_on(target):
        pixels = None
        if image.mode in _TORCHVISION_ROUTES.get(image.format, ()):
            pixels = _decode_with_torchvision(data, image.format, target)
        if pixels is None:
            pixels = torch.from_numpy(_decode_rgb_with_pil(image, data, label))
        pixels = _apply_orientation(pixels.to(target), _exif_orientation(image)).contiguous()
    if target.type == "cuda":
        pixels.record_stream(torch.cuda.default_stream(target))
    return pixels


@contextlib.contextmanager
def _decoding_on(device: torch.device) -> Iterator[None]:
    """On CUDA: the decode's work on a stream of this thread's own, finished before the image
    is handed on.

    Decoding runs in reader threads beside the model's forward passes. On the forward
    pass's stream, the caching allocator could hand the decoder a block that queued kernels
    have yet to read (torchvision's nvjpeg decoder allocates on the caller's stream and decodes
    on a private one without waiting on it: pytorch/vision#9606), and
    the model, on the default stream, could read the pixels before nvjpeg has written them;
    its own stream and a synchronisation rule out both (:func:`decode_image` then marks the
    image as used on the default stream, so that its memory is not reused while the model's
    kernels may still read it)."""
    import torch

    if device.type != "cuda":
        yield
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    streams = getattr(_decode_streams, "by_device", None)
    if streams is None:
        streams = _decode_streams.by_device = {}
    stream = streams.get(index)
    if stream is None:
        stream = streams[index] = torch.cuda.Stream(index)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


_decode_streams = threading.local()


def load_decoders() -> None:
    """Import torchvision's decoders now (1.5 s here), as a worker starts: :func:`decode_image`
    imports them at its first JPEG or WebP, which would otherwise wait for them inside the
    first shard, while the device has nothing to do."""
    import torchvision.io  # noqa: F401


def decode_rgb(
    data: bytes, *, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """:func:`decode_image` on the CPU as a numpy array, decoded by PIL alone and so without
    importing torch (what drawing a run's images needs): the same pixels, since both
    decoders bundle libjpeg-turbo (see the module notes)."""
    label = _label(data, name)
    image = _open_header(data, label, max_pixels)
    pixels = _decode_rgb_with_pil(image, data, label)
    return np.ascontiguousarray(_apply_orientation(pixels, _exif_orientation(image)))


def decode_label_map(
    data: bytes, *, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode a ground-truth index image to an ``(H, W)`` int64 array of its stored values.

    Palette images give their indices (not the palette colours), 8- and 16-bit grayscale their
    values; EXIF orientation is applied as :func:`decode_image` applies it, so an image and its
    label map stay aligned. Colour-coded (RGB/RGBA) masks are refused: they need a colour-to-
    class table, which is not this function's business.
    """
    label = _label(data, name)
    image = _open_header(data, label, max_pixels)
    if image.mode not in _LABEL_MODES:
        raise UnsupportedModeError(
            label,
            f"{image.format} mode {image.mode} is not an index map; expected palette or "
            "8/16-bit grayscale (colour-coded masks need a colour-to-class table)",
        )
    indices = np.asarray(_load(image, data, label), dtype=np.int64)
    return np.ascontiguousarray(_apply_orientation(indices, _exif_orientation(image)))


def _label(data: bytes, name: str | None) -> str:
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"{name or 'image'}: expected bytes, got {type(data).__name__}")
    return name if name is not None else f"<{len(data)} bytes>"


def _open_header(data: bytes, label: str, max_pixels: int | None) -> Image.Image:
    """PIL's lazy open: header parsed, no pixel buffer yet; the size guard runs here."""
    if len(data) == 0:
        raise EmptyImageError(label, "no bytes (empty file)")
    try:
        image = Image.open(io.BytesIO(data), formats=_SUPPORTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(label, f"PIL refused its header: {error}") from error
    except UnidentifiedImageError as error:
        raise _unidentified(data, label) from error
    except _PIL_DECODE_FAILURES as error:
        raise _decode_failure(data, label, error) from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            label,
            f"header declares {width}x{height} = {width * height:,} pixels, over the limit "
            f"of max_pixels={max_pixels:,} (a decompression bomb, or raise max_pixels)",
        )
    return image


def _unidentified(data: bytes, label: str) -> ImageDecodeError:
    claimed_format = _format_by_signature(data)
    if claimed_format is not None:
        return CorruptImageError(
            label, f"starts like a {claimed_format} file but its header cannot be read"
        )
    return NotAnImageError(label, f"not a {_FORMAT_NAMES} image (starts with {data[:16]!r})")


def _format_by_signature(data: bytes) -> str | None:
    if _is_webp(data):
        return "WebP"
    for image_format, signatures in _SIGNATURES.items():
        if data.startswith(signatures):
            return image_format
    return None


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _decode_failure(data: bytes, label: str, error: Exception) -> ImageDecodeError:
    if isinstance(error, EOFError) or "truncated" in str(error).lower() or _riff_cut_short(data):
        return TruncatedImageError(label, f"file is truncated ({error})")
    return CorruptImageError(label, f"data is corrupt ({type(error).__name__}: {error})")


def _riff_cut_short(data: bytes) -> bool:
    """WebP's RIFF header states the file length; PIL only says its decoder failed."""
    if not _is_webp(data):
        return False
    (riff_payload_length,) = struct.unpack_from("<I", data, 4)
    return len(data) < 8 + riff_payload_length


def _exif_orientation(image: Image.Image) -> int:
    """The orientation PIL's ``ImageOps.exif_transpose`` would apply (1 = as stored).

    Read after the decode: a PNG's eXIf chunk may follow its pixel data, where PIL only
    finds it while decoding (JPEG and WebP keep EXIF in the header)."""
    return image.getexif().get(_EXIF_ORIENTATION_TAG, 1)


def _usable_device(device: str | torch.device | None) -> torch.device:
    import torch

    target = torch.device("cpu" if device is None else device)
    if target.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return target


def _decode_with_torchvision(
    data: bytes, image_format: str, device: torch.device
) -> torch.Tensor | None:
    """HWC RGB, or None when torchvision rejects the bytes (PIL then decodes or explains)."""
    import torch
    import torchvision.io

    # bytearray: torch warns about (and must not write through) a tensor over immutable bytes.
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rgb = torchvision.io.ImageReadMode.RGB
    is_webp = image_format == "WEBP"
    if device.type == "cuda" and not is_webp:
        try:
            return torchvision.io.decode_jpeg(encoded, mode=rgb, device=device).permute(1, 2, 0)
        except RuntimeError:
            pass  # nvjpeg lacks some JPEG variants; the CPU decoder has them all.
    decode = torchvision.io.decode_webp if is_webp else torchvision.io.decode_jpeg
    try:
        return decode(encoded, mode=rgb).permute(1, 2, 0)
    except RuntimeError:
        return None


def _decode_rgb_with_pil(image: Image.Image, data: bytes, label: str) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        high_bytes = (np.asarray(_load(image, data, label)) >> 8).astype(np.uint8)
        return np.repeat(high_bytes[..., None], 3, axis=-1)
    if image.mode not in _PIL_RGB_MODES:
        raise UnsupportedModeError(
            label, f"{image.format} mode {image.mode} has no defined conversion to 8-bit RGB"
        )
    loaded = _load(image, data, label)
    # Alpha is discarded, so transparency must not steer the conversion (for a palette image
    # PIL would also warn that it is dropping it).
    loaded.info.pop("transparency", None)
    rgb = loaded if loaded.mode == "RGB" else loaded.convert("RGB")
    return np.array(rgb)


def _load(image: Image.Image, data: bytes, label: str) -> Image.Image:
    """The full decode, with PIL's failures turned into typed errors."""
    try:
        image.load()
    except _PIL_DECODE_FAILURES as error:
        raise _decode_failure(data, label, error) from error
    return image


def _apply_orientation(
    pixels: np.ndarray | torch.Tensor, orientation: int
) -> np.ndarray | torch.Tensor:
    """Turn stored pixels (H, W, ...) upright, a numpy array or a tensor (on its device); an
    unknown orientation value leaves them as stored, as PIL does."""
    swap_axes, flip_axes = _ORIENTATION_OPS.get(orientation, (False, ()))
    if swap_axes:
        pixels = pixels.swapaxes(0, 1)
    if not flip_axes:
        return pixels
    return np.flip(pixels, flip_axes) if isinstance(pixels, np.ndarray) else pixels.flip(flip_axes)
