"""Time the authors' TensorFlow code the way they train it: `model.fit` over a cached `tf.data` of ready batches.

Not part of the package and not imported by it: a peer benchmark for docs/performance.md, run in its own virtual
environment with TensorFlow (which this project does not depend on). It imports the authors' unmodified
`training.py` (github.com/tldrafael/FaceReconstructionWithVAEAndFaceMasks, commit b694a18) from the folder given,
builds their model (`VAE2train` with the mask decoder, or `VAENoMask`), adds their default losses (KL + SSIM + 4 MAE,
plus BCE + Dice for the mask decoder), compiles it as their `train()` does (Adam, learning rate 1e-4, clipnorm 1e-3)
and times `fit(verbose=0)`: the first epoch (tracing) is warm-up, each later epoch one timed measurement.

    python tools/paper_tf_fit.py PAPER_CODE_DIR --model mask+decoder --steps 10 --epochs 3 [--xla] [--json OUT]

Prints one JSON object: images/s of each timed epoch and their median. `--xla` compiles the step with XLA
(`jit_compile=True`); `--train-on-batch` times a `train_on_batch` call per step instead of `fit`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def ellipse_mask(size: int):
    import numpy as np
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    return (((xx / 0.6) ** 2 + (yy / 0.8) ** 2) < 1).astype("float32")  # the same "face" as `facevae bench train`


def build_paper_model(training, model: str):
    """The authors' model with their default losses (KL, SSIM, 4 MAE, and BCE + Dice with the mask decoder)."""
    vae = training.VAE2train() if model == "mask+decoder" else training.VAENoMask()
    vae.add_losses(add_BCE=model == "mask+decoder")
    return vae


def fit_epoch_seconds(model, data, steps: int, epochs: int) -> list[float]:
    """Wall seconds of each epoch of model.fit(verbose=0) over `data` (the first one traces the step)."""
    import tensorflow as tf
    epoch_s: list[float] = []

    class EpochTimer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.t)

    model.fit(data, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[EpochTimer()])
    return epoch_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paper_tf_fit.py", description=__doc__.splitlines()[0])
    parser.add_argument("code", help="folder holding the authors' training.py and utils.py")
    parser.add_argument("--model", choices=("mask+decoder", "none"), default="mask+decoder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch (default 10)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs; the first is warm-up (default 3)")
    parser.add_argument("--batches", type=int, default=4, help="distinct cached batches (default 4)")
    parser.add_argument("--xla", action="store_true", help="compile the train step with XLA (jit_compile=True)")
    parser.add_argument("--train-on-batch", action="store_true", help="time train_on_batch calls instead of fit")
    parser.add_argument("--json", help="also append the result as one line to this file")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.steps < 1:
        parser.error("--epochs must be at least 2 (the first is warm-up) and --steps at least 1")
    if not os.path.isfile(os.path.join(args.code, "training.py")):
        parser.error(f"{args.code}: no training.py (the authors' repository checked out at b694a18)")

    import numpy as np
    import tensorflow as tf
    sys.path.insert(0, os.path.abspath(args.code))
    import training  # the authors' module, unmodified

    size, n = 144, args.batch_size * args.batches
    rng = np.random.default_rng(0)
    images = rng.random((n, size, size, 3), dtype=np.float32)
    masks = np.broadcast_to(ellipse_mask(size)[None, :, :, None], (n, size, size, 1)).copy()
    vae = build_paper_model(training, args.model)
    data = tf.data.Dataset.from_tensor_slices(((images, masks),) if args.model == "mask+decoder" else (images,))
    data = data.batch(args.batch_size, drop_remainder=True).cache().repeat().prefetch(tf.data.AUTOTUNE)
    # As their train(): Adam(1e-4, clipnorm=1e-3); jit_compile only with --xla (Keras' default is off on CPU).
    vae.model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=1e-4, clipnorm=1e-3), jit_compile=args.xla)

    if args.train_on_batch:
        epoch_s: list[float] = []
        batches = iter(data)
        for epoch in range(args.epochs):
            t = time.perf_counter()
            for _ in range(args.steps):
                vae.model.train_on_batch(next(batches)[0])
            epoch_s.append(time.perf_counter() - t)
    else:
        epoch_s = fit_epoch_seconds(vae.model, data, args.steps, args.epochs)
    timed = [args.batch_size * args.steps / s for s in epoch_s[1:]]
    result = {"peer": "authors' TF code (training.py b694a18)", "tf": tf.__version__, "model": args.model,
              "path": "train_on_batch" if args.train_on_batch else ("fit+xla" if args.xla else "fit"),
              "batch_size": args.batch_size, "image_size": size, "steps_per_epoch": args.steps,
              "warmup_s": round(epoch_s[0], 2), "img_s_per_epoch": [round(x, 2) for x in timed],
              "img_s": round(statistics.median(timed), 2), "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
              "cpu": platform.processor() or platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
