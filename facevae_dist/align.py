"""Find the face in a photo and frame it as the training images frame faces, for `facevae reconstruct`.

The models learn aligned portraits: a 178x218 frame (aligned CelebA's, and the synthetic generator's, which
imitates it) squashed to the model's square (the paper's preprocessing; `--fit center-crop` shards take the
frame's central 178x178 square instead). In that frame the generator puts the midpoint of the eyes at
(89.0, 108.2), i.e. at half the width and 0.50 of the height, the eyes 33.6 px apart and the mouth 35.6 px below
them (means over 369 generated faces, measured from their label maps). A photo framed otherwise (a portrait with
the face high in the frame, a wide shot) puts the face where the model never saw one: its predicted mask lands on
the chin and collar. So the face is found with MediaPipe's offline face detector (eyes and mouth centre), the
photo region that frames it like the generator's faces is cropped (replicating edge pixels where the region
leaves the photo), and the reconstruction is pasted back into that region only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from facevae_dist.data.mediapipe_mask import INSTALL_HINT
from facevae_dist.errors import UsageError

FRAME = (178, 218)  # width, height of the aligned frame
EYES_AT = (89.0, 108.2)  # midpoint of the eyes in the frame
EYE_DISTANCE = 33.6  # between the eye centres
EYE_TO_MOUTH = 35.6  # from the eyes' midpoint to the mouth centre
DETECT_MAX_SIDE = 1280  # larger photos are searched at this size (the detector's own input is 128 or 192 px)
MIN_SCORE = 0.5


@dataclass(frozen=True)
class Face:
    """A detected face in photo pixels: eye centres (the image's left one first), mouth centre, the detector's box
    and its confidence."""

    eyes: tuple[tuple[float, float], tuple[float, float]]
    mouth: tuple[float, float]
    box: tuple[float, float, float, float]  # left, top, width, height
    score: float

    def to_dict(self) -> dict:
        r = lambda p: [round(float(v), 1) for v in p]  # noqa: E731
        return {"eyes": [r(e) for e in self.eyes], "mouth": r(self.mouth),
                "box": r(self.box), "score": round(self.score, 3)}


@dataclass(frozen=True)
class Frame:
    """The photo region the model sees, in photo pixels; it may reach beyond the photo's edges."""

    left: int
    top: int
    width: int
    height: int

    def visible(self, photo_w: int, photo_h: int) -> tuple[slice, slice, slice, slice]:
        """(photo rows, photo cols, frame rows, frame cols) of the part of the frame inside the photo."""
        x0, y0 = max(0, self.left), max(0, self.top)
        x1, y1 = min(photo_w, self.left + self.width), min(photo_h, self.top + self.height)
        return (slice(y0, y1), slice(x0, x1),
                slice(y0 - self.top, y1 - self.top), slice(x0 - self.left, x1 - self.left))


class FaceFinder:
    """rgb uint8 HxWx3 -> the most prominent Face (largest box), or None. MediaPipe's bundled BlazeFace models:
    the short-range one first (faces filling much of the photo), then the full-range one (smaller faces)."""

    def __init__(self):
        try:
            from mediapipe.python.solutions import face_detection  # the optional `masks` extra
        except ImportError:
            raise UsageError("reconstruct finds and frames the face with MediaPipe, which is not installed: install "
                             f"the `masks` extra ({INSTALL_HINT}), or pass --no-align to squash each whole image "
                             "to the model's input") from None
        with _native_logs_held_back():
            self._detectors = [face_detection.FaceDetection(model_selection=m, min_detection_confidence=MIN_SCORE)
                               for m in (0, 1)]

    def __call__(self, rgb: np.ndarray) -> Face | None:
        h, w = rgb.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = rgb if scale == 1.0 else np.asarray(
            Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
        small = np.ascontiguousarray(small)
        for detector in self._detectors:
            with _native_logs_held_back():
                found = detector.process(small).detections
            if found:
                best = max(found, key=lambda d: d.location_data.relative_bounding_box.width
                           * d.location_data.relative_bounding_box.height)
                return _face(best, w, h)
        return None

    def close(self) -> None:
        with _native_logs_held_back():
            for d in self._detectors:
                d.close()


@contextlib.contextmanager
def _native_logs_held_back():
    """MediaPipe's C++ side writes INFO/WARNING lines (the TFLite delegate, feedback tensors) straight to file
    descriptor 2 on first use, whatever GLOG_minloglevel says: point that descriptor at /dev/null meanwhile so the
    console keeps to this program's own lines (errors still arrive, as Python exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _face(detection, w: int, h: int) -> Face:
    loc = detection.location_data
    # BlazeFace keypoints: 0 and 1 the eyes, 2 the nose tip, 3 the mouth centre, 4 and 5 the ears
    kp = [(k.x * w, k.y * h) for k in loc.relative_keypoints]
    bb = loc.relative_bounding_box
    return Face(eyes=tuple(sorted(kp[:2])), mouth=kp[3],
                box=(bb.xmin * w, bb.ymin * h, bb.width * w, bb.height * h), score=float(detection.score[0]))


def frame_for(face: Face, fit: str = "squash") -> Frame:
    """The photo region framing `face` as the training frame does: photo pixels per frame pixel from the eye
    distance and the eye-to-mouth distance (their mean: one shrinks when the head turns, the other when it
    nods), the eyes' midpoint placed at EYES_AT. fit "center-crop": the frame's central square, as such shards."""
    eyes = np.mean(face.eyes, axis=0)
    s = (np.hypot(*np.subtract(*face.eyes)) / EYE_DISTANCE
         + np.hypot(*(np.asarray(face.mouth) - eyes)) / EYE_TO_MOUTH) / 2
    left, top = eyes[0] - EYES_AT[0] * s, eyes[1] - EYES_AT[1] * s
    width, height = FRAME[0] * s, FRAME[1] * s
    if fit == "center-crop":
        top, height = top + (height - width) / 2, width
    return Frame(int(round(left)), int(round(top)), max(1, int(round(width))), max(1, int(round(height))))


def crop(photo: np.ndarray, frame: Frame) -> np.ndarray:
    """The frame's pixels (HxWx3 uint8 at the frame's size); where it leaves the photo, the edge pixels repeated
    (as a black border would be a feature the model never saw)."""
    h, w = photo.shape[:2]
    rows, cols, _, _ = frame.visible(w, h)
    if rows.start >= rows.stop or cols.start >= cols.stop:
        raise ValueError("the frame lies outside the photo")
    inside = photo[rows, cols]
    pad = ((rows.start - frame.top, frame.top + frame.height - rows.stop),
           (cols.start - frame.left, frame.left + frame.width - cols.stop), (0, 0))
    return np.pad(inside, pad, mode="edge") if any(p for pair in pad for p in pair) else inside


def feather(alpha: np.ndarray, model_pixel: float) -> np.ndarray:
    """A frame-size mask (uint8) softened by half a model pixel and faded to 0 over 1.5 model pixels at the
    frame's border: neither the mask's upsampled edge nor the crop's edge shows as a seam in the photo."""
    h, w = alpha.shape
    soft = np.asarray(Image.fromarray(alpha, "L").filter(ImageFilter.GaussianBlur(max(0.5, model_pixel / 2))))
    ramp = max(1.0, 1.5 * model_pixel)
    wy = np.clip((np.minimum(np.arange(h), np.arange(h)[::-1]) + 0.5) / ramp, 0, 1)
    wx = np.clip((np.minimum(np.arange(w), np.arange(w)[::-1]) + 0.5) / ramp, 0, 1)
    return np.round(soft * wy[:, None] * wx[None, :]).astype(np.uint8)
