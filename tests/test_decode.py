"""segflow.decode against PIL's own decoding and conversions, on generated and real images."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from segflow.decode import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedModeError,
    decode_image,
    decode_label_map,
)

RNG = np.random.default_rng(20240611)
# Odd, non-square sizes catch row-stride and axis-order mistakes.
WIDTH, HEIGHT = 37, 23


def random_image(mode: str, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    rgb = Image.fromarray(RNG.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgb if mode == "RGBA" else rgb.convert(mode)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        # PIL's conversion drops palette transparency, as it should here, and says so.
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A minimal PNG written by hand: PIL cannot write 16-bit RGB or lie about the size."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def unfiltered_rows(pixels: np.ndarray) -> bytes:
    """PNG scanlines with filter type 0 (none), samples big-endian as PNG stores them."""
    rows = pixels.reshape(pixels.shape[0], -1).astype(pixels.dtype.newbyteorder(">"))
    return b"".join(b"\x00" + row.tobytes() for row in rows)


LOSSLESS_AND_LOSSY_CASES = [
    ("JPEG", "RGB", {"quality": 90}),
    ("JPEG", "RGB", {"quality": 90, "progressive": True}),
    ("JPEG", "RGB", {"quality": 95, "subsampling": 0}),
    ("JPEG", "L", {"quality": 90}),
    ("JPEG", "CMYK", {"quality": 90}),
    ("PNG", "RGB", {}),
    ("PNG", "RGBA", {}),
    ("PNG", "L", {}),
    ("PNG", "LA", {}),
    ("PNG", "P", {}),
    ("PNG", "P", {"transparency": 7}),
    ("PNG", "1", {}),
    ("TIFF", "RGB", {}),
    ("TIFF", "RGB", {"compression": "tiff_deflate"}),
    ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    ("TIFF", "RGBA", {}),
    ("TIFF", "L", {}),
    ("TIFF", "P", {}),
    ("TIFF", "1", {}),
    ("TIFF", "CMYK", {}),
    ("TIFF", "YCbCr", {}),
    ("WEBP", "RGB", {"quality": 80}),
    ("WEBP", "RGB", {"lossless": True}),
    ("WEBP", "RGBA", {"lossless": True}),
    ("BMP", "RGB", {}),
    ("BMP", "L", {}),
    ("BMP", "P", {}),
    ("BMP", "1", {}),
    # Multi-frame files decode their first frame; torchvision refuses animated WebP, PIL takes it.
    ("MPO", "RGB", {"save_all": True, "append_images": [random_image("RGB")]}),
    ("WEBP", "RGB", {"save_all": True, "append_images": [random_image("RGB")], "lossless": True}),
]


@pytest.mark.parametrize(("image_format", "mode", "options"), LOSSLESS_AND_LOSSY_CASES)
def test_pixels_equal_pils_rgb_conversion(image_format, mode, options):
    # Lossy formats too: both sides decode the same bytes, so they must agree exactly.
    data = encode(random_image(mode), image_format, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        decoded = decode_image(data)
    assert decoded.dtype == torch.uint8
    assert decoded.shape == (HEIGHT, WIDTH, 3)
    assert decoded.is_contiguous()
    np.testing.assert_array_equal(decoded.numpy(), pil_rgb(data))


def test_alpha_is_discarded_not_composited():
    pixels = RNG.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    pixels[..., 3] = 0  # fully transparent: compositing would change every colour
    decoded = decode_image(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    np.testing.assert_array_equal(decoded.numpy(), pixels[..., :3])


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_16_bit_gray_keeps_the_high_byte(image_format):
    samples = RNG.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    data = encode(Image.fromarray(samples), image_format)
    expected = np.repeat((samples >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(decode_image(data).numpy(), expected)


def test_16_bit_rgb_keeps_the_high_byte():
    samples = RNG.integers(0, 65536, (HEIGHT, WIDTH, 3), dtype=np.uint16)
    data = png_bytes(WIDTH, HEIGHT, 16, 2, unfiltered_rows(samples))
    np.testing.assert_array_equal(decode_image(data).numpy(), (samples >> 8).astype(np.uint8))


def test_16_bit_mapping_inverts_8_bit_widening():
    original = RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    widened = original.astype(np.uint16) * 257  # how 8-bit data is stored in 16 bits
    data = png_bytes(WIDTH, HEIGHT, 16, 2, unfiltered_rows(widened))
    np.testing.assert_array_equal(decode_image(data).numpy(), original)


def with_orientation(image_format: str, orientation: int, mode: str = "RGB") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(random_image(mode), image_format, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_matches_pil_exif_transpose(image_format, orientation):
    data = with_orientation(image_format, orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(decode_image(data).numpy(), np.asarray(upright))


def test_out_of_range_orientation_is_ignored_like_pil():
    data = with_orientation("JPEG", 9)
    np.testing.assert_array_equal(decode_image(data).numpy(), pil_rgb(data))


def test_header_bomb_is_refused_before_decoding():
    # 100k x 100k RGB would be 30 GB. The IDAT holds nothing, so only the header check can
    # produce ImageTooLargeError: a decode attempt would report truncation instead.
    bomb = png_bytes(100_000, 100_000, 8, 2, b"")
    with pytest.raises(ImageTooLargeError, match="s3://bucket/bomb"):
        decode_image(bomb, name="s3://bucket/bomb.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_header_under_pils_limit_is_refused_by_ours():
    bomb = png_bytes(12_000, 12_000, 8, 2, b"")
    with pytest.raises(ImageTooLargeError, match="12000x12000 = 144,000,000 pixels"):
        decode_image(bomb, name="bomb.png", max_pixels=100_000_000)


def test_bmp_header_bomb_is_refused():
    width, height = 60_000, 60_000
    info_header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    file_header = struct.pack("<2sIHHI", b"BM", 14 + 40, 0, 0, 14 + 40)
    with pytest.raises(ImageTooLargeError):
        decode_image(file_header + info_header)


def test_max_pixels_is_configurable():
    data = encode(random_image("RGB"), "JPEG")
    with pytest.raises(ImageTooLargeError, match=f"max_pixels={WIDTH * HEIGHT - 1}"):
        decode_image(data, max_pixels=WIDTH * HEIGHT - 1)
    assert decode_image(data, max_pixels=WIDTH * HEIGHT).shape == (HEIGHT, WIDTH, 3)
    with pytest.raises(ImageTooLargeError):
        decode_label_map(encode(random_image("L"), "PNG"), max_pixels=10)


def test_pils_own_limit_still_applies_without_ours():
    bomb = png_bytes(20_000, 20_000, 8, 2, b"")  # 4e8 pixels: over PIL's hard limit
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, max_pixels=None)


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_middle_bytes(data: bytes) -> bytes:
    middle = len(data) // 2
    return (
        data[:middle]
        + bytes(byte ^ 0xFF for byte in data[middle : middle + 8])
        + data[middle + 8 :]
    )


def corrupt_deflate_with_valid_crc(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    raw = unfiltered_rows(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))
    deflated = bytearray(zlib.compress(raw))
    deflated[len(deflated) // 2] ^= 0xFF
    chunk = struct.pack(">I", len(deflated)) + b"IDAT" + bytes(deflated)
    chunk += struct.pack(">I", zlib.crc32(b"IDAT" + bytes(deflated)))
    valid = png_bytes(width, height, 8, 2, raw)
    start = valid.index(b"IDAT") - 4
    end = valid.index(b"IEND") - 4
    return valid[:start] + chunk + valid[end:]


PHOTO = random_image("RGB", 160, 120)
BAD_INPUTS = [
    pytest.param(b"", EmptyImageError, id="empty"),
    pytest.param(cut_in_half(encode(PHOTO, "JPEG")), TruncatedImageError, id="truncated-jpeg"),
    pytest.param(cut_in_half(encode(PHOTO, "PNG")), TruncatedImageError, id="truncated-png"),
    pytest.param(cut_in_half(encode(PHOTO, "WEBP")), TruncatedImageError, id="truncated-webp"),
    pytest.param(flip_middle_bytes(encode(PHOTO, "PNG")), CorruptImageError, id="corrupt-png"),
    pytest.param(corrupt_deflate_with_valid_crc(), CorruptImageError, id="corrupt-zlib-png"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00", CorruptImageError, id="png-signature-only"),
    pytest.param(b"segment me, please\n" * 20, NotAnImageError, id="text"),
    pytest.param(
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", NotAnImageError, id="pdf"
    ),
    pytest.param(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", NotAnImageError, id="gif"),
    pytest.param(
        encode(Image.fromarray(RNG.random((8, 8), dtype=np.float32)), "TIFF"),
        UnsupportedModeError,
        id="float-tiff",
    ),
]


@pytest.mark.parametrize(("data", "error_type"), BAD_INPUTS)
def test_bad_bytes_raise_typed_errors_naming_the_input(data, error_type):
    uri = "s3://corpus/Tile 1/images/frame 0042.png"
    with pytest.raises(error_type) as caught:
        decode_image(data, name=uri)
    error = caught.value
    assert isinstance(error, ImageDecodeError)
    assert isinstance(error, ValueError)
    assert uri in str(error)
    assert error.reason == error_type.reason


def test_each_error_type_has_its_own_reason():
    reasons = [error_type.reason for error_type in ImageDecodeError.__subclasses__()]
    assert sorted(reasons) == sorted(
        ["empty", "truncated", "corrupt", "not_an_image", "too_large", "unsupported_mode"]
    )


def test_errors_survive_pickling_with_their_type_and_message():
    with pytest.raises(TruncatedImageError) as caught:
        decode_image(cut_in_half(encode(PHOTO, "PNG")), name="gs://b/x.png")
    restored = pickle.loads(pickle.dumps(caught.value))
    assert type(restored) is TruncatedImageError
    assert str(restored) == str(caught.value)
    assert restored.reason == "truncated"


def test_unnamed_input_is_described_in_the_message():
    with pytest.raises(EmptyImageError, match="<0 bytes>"):
        decode_image(b"")


def test_non_bytes_input_is_a_type_error():
    with pytest.raises(TypeError, match=r"frame\.png"):
        decode_image("frame.png", name="frame.png")


def test_palette_label_map_keeps_indices():
    indices = RNG.integers(0, 12, (HEIGHT, WIDTH), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tobytes())
    labels = decode_label_map(encode(image, "PNG"), name="label.png")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, indices)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_label_map_keeps_values(dtype):
    values = RNG.integers(0, np.iinfo(dtype).max + 1, (HEIGHT, WIDTH), dtype=dtype)
    labels = decode_label_map(encode(Image.fromarray(values), "PNG"))
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, values)


def test_label_map_follows_exif_orientation_like_its_image():
    data = with_orientation("PNG", 6, mode="L")
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(decode_label_map(data), np.asarray(upright))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_label_map_is_refused(mode):
    with pytest.raises(UnsupportedModeError, match=r"mask\.png"):
        decode_label_map(encode(random_image(mode), "PNG"), name="mask.png")


def test_label_map_errors_are_typed():
    with pytest.raises(TruncatedImageError, match=r"label\.png"):
        decode_label_map(cut_in_half(encode(random_image("P", 160, 120), "PNG")), name="label.png")


def camvid_pairs(shared: Path) -> list[tuple[Path, Path]]:
    images = sorted((shared / "data/camvid_val/images").glob("*.png"))
    return [(image, shared / "data/camvid_val/labels" / image.name) for image in images]


def test_camvid_images_and_labels_match_pil(shared):
    pairs = camvid_pairs(shared)
    assert len(pairs) == 101
    for image_path, label_path in pairs:
        decoded = decode_image(image_path.read_bytes(), name=str(image_path))
        np.testing.assert_array_equal(decoded.numpy(), pil_rgb(image_path.read_bytes()))
        labels = decode_label_map(label_path.read_bytes(), name=str(label_path))
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, np.asarray(Image.open(label_path)))


def test_aerial_jpeg_tile_matches_pil(shared):
    tile = sorted((shared / "data/aerial_dubai/Tile 1/images").glob("*.jpg"))[0]
    data = tile.read_bytes()
    decoded = decode_image(data, name=str(tile))
    np.testing.assert_array_equal(decoded.numpy(), pil_rgb(data))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_request_without_cuda_decodes_on_cpu():
    data = with_orientation("JPEG", 6)
    decoded = decode_image(data, device="cuda")
    assert decoded.device.type == "cpu"
    np.testing.assert_array_equal(decoded.numpy(), decode_image(data).numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_cuda_decode_is_close_to_cpu_decode(image_format):
    data = with_orientation(image_format, 6)
    on_gpu = decode_image(data, device="cuda")
    on_cpu = decode_image(data)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.dtype == torch.uint8
    assert on_gpu.shape == on_cpu.shape
    # nvjpeg's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels.
    difference = (on_gpu.cpu().int() - on_cpu.int()).abs().float()
    assert difference.mean() < 2.0
