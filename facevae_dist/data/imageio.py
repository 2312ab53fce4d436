"""Reading user image files (photos, masks, label maps): the one function every read path uses.

Every read here:
- applies the EXIF orientation (a phone JPEG with Orientation=6 is stored sideways; its mask is drawn upright),
- converts high bit depth by value, not by clipping (a 16-bit grayscale PNG is 0..65535: Pillow's convert("RGB")
  would clip it to white),
- bounds decode memory: an image over `max_pixels` (default MAX_PIXELS, env FACEVAE_MAX_IMAGE_PIXELS) is decoded
  at 1/2, 1/4 or 1/8 scale when it is a JPEG (libjpeg's DCT scaling, via draft()), and refused otherwise with a
  message naming the file and the limit. Pillow's own bomb check only stops at 179 Mpixel, ~0.5 GB as RGB.
Errors are ImageReadError (a FaceVAEError) whose message starts with the path; shard sources turn them into
skipped-and-listed samples, `reconstruct` into skipped-and-reported files.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from facevae_dist.errors import FaceVAEError

MAX_PIXELS = 40_000_000  # a 36 Mpixel camera photo fits; its RGB decode is 120 MB
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageReadError(FaceVAEError):
    """A file that cannot be read as an image (missing, a directory, corrupt, not an image, too large).
    str() is "<path>: <reason>"; .reason alone is for lists that already name the file."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class ImageTooLarge(ImageReadError):
    pass


def check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file before it is opened: opening a FIFO blocks until a writer comes (forever,
    for a forgotten `mkfifo`), and a device can be endless."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise ImageReadError(path, "is a directory, not an image")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise ImageReadError(path, f"is {kind}, not an image file")


@contextlib.contextmanager
def _own_pixel_limit():
    """Pillow's bomb check off while a header is read: it raises in open() for images over twice its limit, before
    our own check could decode a large JPEG at reduced scale (the limit is checked below, from the header)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def max_pixels_default() -> int:
    value = os.environ.get("FACEVAE_MAX_IMAGE_PIXELS")
    try:
        return int(value) if value else MAX_PIXELS
    except ValueError:
        raise FaceVAEError(f"FACEVAE_MAX_IMAGE_PIXELS={value!r}: expected a whole number of pixels") from None


def _too_large(w: int, h: int, limit: int) -> str:
    return (f"{w}x{h} = {w * h / 1e6:.1f} Mpixel is over the {limit / 1e6:g} Mpixel limit (downscale it, or raise "
            "FACEVAE_MAX_IMAGE_PIXELS if the memory is there)")


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode `path` fully, upright (EXIF orientation applied) and within the pixel limit; the image keeps its
    own mode (e.g. I;16). Raises ImageReadError naming the file."""
    path = Path(path)
    limit = max_pixels or max_pixels_default()
    try:
        check_regular_file(path)
        with _own_pixel_limit():
            im = Image.open(path)
        with im:
            w, h = im.size
            if w < 1 or h < 1:
                raise ImageReadError(path, "empty image")
            if w * h > limit:
                scale = next((s for s in (2, 4, 8) if (-(-w // s)) * (-(-h // s)) <= limit), None)
                if im.format != "JPEG" or scale is None:
                    raise ImageTooLarge(path, _too_large(w, h, limit))
                im.draft(None, (max(1, w // scale), max(1, h // scale)))  # libjpeg decodes at 1/scale
            im.load()
            if im.size[0] * im.size[1] > limit:  # draft declined (e.g. progressive or odd JPEG)
                raise ImageTooLarge(path, _too_large(w, h, limit))
            # exif_transpose returns a transposed copy, or a plain copy when there is nothing to do: the copy
            # outlives the `with` that closes the file.
            return ImageOps.exif_transpose(im)
    except FaceVAEError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(path, str(exc)) from None
    except Exception as exc:  # Pillow raises a zoo of types (OSError, SyntaxError, ValueError, struct.error, ...)
        raise ImageReadError(path, f"not a readable image ({type(exc).__name__}: {exc})") from None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth pixel values -> uint8 by value (65535 -> 255)."""
    values = values.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 16-bit full scale to 8-bit full scale
    elif mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0  # float images in [0, 1]
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def gray_to_uint8(im: Image.Image) -> np.ndarray:
    """A one-channel image of any depth -> uint8 HxW by value (a 16-bit 65535 is 255, not clipped from 65535)."""
    if im.mode in _HIGH_DEPTH_MODES:
        return _to_uint8(np.asarray(im), im.mode)
    return np.asarray(im if im.mode == "L" else im.convert("L"))


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """A decoded image of any mode -> uint8 HxWx3 RGB."""
    if im.mode in _HIGH_DEPTH_MODES:
        gray = _to_uint8(np.asarray(im), im.mode)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def to_rgb_image(im: Image.Image) -> Image.Image:
    if im.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(to_rgb_array(im), "RGB")
    return im.convert("RGB")


def read_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """uint8 HxWx3 RGB, upright, 16-bit scaled by value."""
    return to_rgb_array(open_image(path, max_pixels))


def read_rgb_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """As read_rgb, as a PIL RGB image."""
    return to_rgb_image(open_image(path, max_pixels))


def read_values(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """One-channel integer values of a label map or mask at their own bit depth (uint8, uint16 or int32), upright.
    Palette images give their indices (label maps are often saved with a palette); colour images their luma."""
    im = open_image(path, max_pixels)
    if im.mode in ("L", "P") or im.mode in _HIGH_DEPTH_MODES[:-1]:
        return np.asarray(im)
    if im.mode == "1":
        return np.asarray(im).astype(np.uint8)
    if im.mode == "F":
        return _to_uint8(np.asarray(im), im.mode)
    return np.asarray(im.convert("L"))


def values_to_labels(values: np.ndarray) -> np.ndarray:
    """uint8 label map (values above 255 clip instead of wrapping round to small labels)."""
    return np.minimum(values, 255).astype(np.uint8)


def binary_mask(values: np.ndarray) -> np.ndarray:
    """A binary mask whatever value it uses for 'on' (1, 255, 256 in a 16-bit file, 65535): on = above half the
    largest value present. An all-zero mask is all off."""
    top = int(values.max(initial=0))
    return values > top / 2 if top > 0 else np.zeros(values.shape, bool)


def read_mask_or_labels(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[str, np.ndarray]:
    """A mask file that is either a 19-class label map (values <= 18) or a binary mask of any bit depth:
    ("labels", uint8 label map) or ("mask", bool mask)."""
    values = read_values(path, max_pixels)
    if values.max(initial=0) <= 18:  # no binary mask has its 'on' value in 2..18; 0/1 reads as labels (1 = skin)
        return "labels", values.astype(np.uint8)
    return "mask", binary_mask(values)
