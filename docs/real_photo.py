"""Draw docs/real_photo.jpg: two public-domain portraits through `facevae reconstruct` with a committed reference model.

    .venv/bin/python docs/real_photo.py    (needs the `masks` extra, and scikit-image for the astronaut)

The photos ship with installed packages: scikit-image's astronaut (Eileen Collins, NASA) and matplotlib's Grace
Hopper (US Navy). Each row: the photo with the face found and the frame cut around it, what the 36 px model sees,
its reconstruction, the result pasted back (only the face changes), and the old --no-align path for comparison.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from matplotlib import cbook  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from facevae_dist.align import Frame, crop  # noqa: E402
from facevae_dist.infer import reconstruct_files  # noqa: E402
from facevae_dist.model import FaceVAE  # noqa: E402

DOCS = Path(__file__).resolve().parent
MODEL = DOCS / "reference" / "models" / "ssim+l1--mask+decoder--seed-0"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = [tmp / "astronaut.png", tmp / "grace_hopper.jpg"]
        Image.fromarray(skimage.data.astronaut()).save(photos[0])
        shutil.copy(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), photos[1])
        faces = reconstruct_files(MODEL, photos, tmp / "aligned", device="cpu").faces
        reconstruct_files(MODEL, photos, tmp / "squashed", device="cpu", align=False)
        size = FaceVAE.from_pretrained(MODEL).cfg.image_size

        titles = ["photo: the face found,\nthe frame cut around it", f"what the model sees\n({size}x{size})",
                  "its reconstruction", "after: pasted back\n(only the face changes)",
                  "before (--no-align):\nthe whole photo squashed"]
        fig, axes = plt.subplots(len(photos), len(titles), figsize=(15, 6.6),
                                 gridspec_kw={"width_ratios": [1, 0.8, 0.8, 1, 1]})
        for row, photo in zip(axes, photos):
            image = np.asarray(Image.open(photo).convert("RGB"))
            face = faces[str(photo)]
            frame = Frame(*face["frame"])
            seen = Image.fromarray(crop(image, frame)).resize((size, size), Image.BILINEAR)
            recon = np.asarray(Image.open(tmp / "aligned" / f"{photo.stem}_recon.png"))
            recon_seen = Image.fromarray(crop(recon, frame)).resize((size, size), Image.BILINEAR)
            row[0].imshow(image)
            row[0].add_patch(Rectangle((frame.left, frame.top), frame.width, frame.height, fill=False, lw=1.5,
                                       ec="#39ff14"))
            for x, y in [*face["eyes"], face["mouth"]]:
                row[0].plot(x, y, "o", ms=3, color="#39ff14")
            row[0].set_xlim(-0.5, image.shape[1] - 0.5)
            row[0].set_ylim(image.shape[0] - 0.5, -0.5)
            row[1].imshow(seen, interpolation="nearest")
            row[2].imshow(recon_seen, interpolation="nearest")
            row[3].imshow(Image.open(tmp / "aligned" / f"{photo.stem}_composite.png"))
            row[4].imshow(Image.open(tmp / "squashed" / f"{photo.stem}_composite.png"))
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax, title in zip(axes[0], titles):
            ax.set_title(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(DOCS / "real_photo.jpg", dpi=90, pil_kwargs={"quality": 88})


if __name__ == "__main__":
    main()
