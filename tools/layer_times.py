"""Where a training step's time goes, per layer kind: every layer of the paper's model timed alone (forward +
backward at its own input shape), then the losses and the clip + Adam step, summed by kind.

Two backends with one method, so that the two columns of docs/performance.md's table compare like with like:
  torch (this project's FaceVAE, channels_last):  .venv/bin/python tools/layer_times.py torch [--bf16]
  TF (the authors' unmodified model):             TF_PYTHON tools/layer_times.py tf --code PAPER_CODE_DIR
Each layer gets a fresh copy of itself, its input of the shape it sees in the model (batch 32, 144 px) and a random
upstream gradient; the figure is the median of --repeats timed runs after one warm-up. Prints one JSON object:
milliseconds per step by kind, the sum, and the full step timed the same way. Isolated timing misses what running
the layers together changes (cache reuse, TF running independent ops at once), hence the full step beside the sum.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BATCH, SIZE = 32, 144
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split_conv(kind: str, in_encoder: bool) -> str:
    """The 3x3 convolutions counted apart for the encoder and for the decoders (with their heads)."""
    return kind if kind != "conv" else ("conv, encoder" if in_encoder else "conv, decoders")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def torch_times(args) -> dict:
    import copy

    import torch
    sys.path.insert(0, REPO)
    from facevae_dist.bench.train import _synthetic_batch, _train_config, make_steps, parse_config
    from facevae_dist.losses import compute_losses
    from facevae_dist.model import ConvTBlock
    from facevae_dist.perf import keep_freed_memory
    from facevae_dist.train.optim import build_optimizer, clip_gradients_

    keep_freed_memory()
    opts = parse_config("channels_last+bf16" if args.bf16 else "channels_last", "cpu")
    cfg = _train_config(args.model, opts, args.image_size)
    image, mask = _synthetic_batch(args.batch_size, args.image_size, torch.device("cpu"), True)
    step, _, model = make_steps(cfg, torch.device("cpu"))
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.bf16)
    kinds = {torch.nn.Conv2d: "conv", ConvTBlock: "transposed conv", torch.nn.BatchNorm2d: "batchnorm",
             torch.nn.ELU: "elu", torch.nn.MaxPool2d: "maxpool", torch.nn.Linear: "dense"}
    seen: list[tuple[str, torch.nn.Module, torch.Size, torch.dtype]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=_split_conv(k, name.startswith("encoder.")):
                                     seen.append((k, mod, inp[0].shape, inp[0].dtype)))
             for name, m in model.named_modules() for cls, k in kinds.items() if type(m) is cls]
    with torch.autocast(**amp):
        out = model(image, mask if cfg.model.mask_mode != "none" else None)
    for h in hooks:
        h.remove()
    ms: dict[str, float] = {}
    for kind, mod, shape, dtype in seen:
        layer = copy.deepcopy(mod)
        layer = layer.convolve if isinstance(layer, ConvTBlock) else layer  # its convolution alone (with the bias)
        x = torch.randn(shape, dtype=dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(kind != "conv" or shape[1] != 3)  # the first conv's input (the image) needs no gradient
        inplace = getattr(layer, "inplace", False)  # an in-place ELU needs a fresh non-leaf input each run
        with torch.autocast(**amp):
            y = layer(x.clone() if inplace else x)
        g = torch.randn_like(y)

        def run():
            with torch.autocast(**amp):
                y = layer(x.clone() if inplace else x)
            y.backward(g)
        ms[kind] = ms.get(kind, 0.0) + _median_ms(run, args.repeats)
        if inplace:  # less the copy that only the measurement makes
            ms[kind] -= _median_ms(lambda: x.detach().clone(), args.repeats)
    recon_raw = out.recon_raw.detach().requires_grad_()
    mask_pred = out.mask_pred.detach().requires_grad_() if out.mask_pred is not None else None
    mu, logvar = out.mu.detach().requires_grad_(), out.logvar.detach().requires_grad_()

    def losses():
        from facevae_dist.model import VAEOutput, composite
        recon = recon_raw if cfg.model.mask_mode == "none" else composite(recon_raw, image, mask)
        o = VAEOutput(recon_raw=recon_raw, recon=recon, mask_pred=mask_pred, mu=mu, logvar=logvar, z=mu)
        compute_losses(o, image, mask, cfg.loss, cfg.model)["loss"].backward()
    ms["losses"] = _median_ms(losses, args.repeats)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build_optimizer(params, cfg.optim)

    def optim():
        clip_gradients_(params, cfg.optim.clip, cfg.optim.clip_value)
        optimizer.step()
    ms["clip + adam"] = _median_ms(optim, args.repeats)
    full = _median_ms(lambda: float(step(image, mask)), args.repeats)
    return {"backend": f"torch {torch.__version__}", "threads": torch.get_num_threads(), "precision":
            "bf16 autocast" if args.bf16 else "fp32", "ms": ms, "full_step_ms": full}


def tf_times(args) -> dict:
    import tensorflow as tf
    sys.path.insert(0, os.path.abspath(args.code))
    import training  # the authors' module, unmodified

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from paper_tf_fit import build_paper_model, fit_epoch_seconds

    model = build_paper_model(training, args.model).model
    kinds = {"Conv2D": "conv", "Conv2DTranspose": "transposed conv", "BatchNormalization": "batchnorm",
             "MaxPooling2D": "maxpool", "Dense": "dense"}
    ms: dict[str, float] = {}
    in_encoder = True  # Keras lists a functional model's layers in graph order: the encoder ends at out_encoder
    for layer in model.layers:
        name = type(layer).__name__
        in_encoder = in_encoder and layer.name != "out_encoder"
        kind = kinds.get(name) or ("elu" if name == "Activation" and layer.get_config()["activation"] == "elu"
                                   else None)
        if kind is None:
            continue
        kind = _split_conv(kind, in_encoder)
        fresh = type(layer).from_config(layer.get_config())
        shape = (BATCH,) + tuple(layer.input.shape[1:])
        x = tf.random.normal(shape)
        fresh.build(shape)
        g = tf.random.normal((BATCH,) + tuple(layer.output.shape[1:]))
        first = kind == "conv" and shape[-1] == 3

        @tf.function
        def run(x, g, layer=fresh, first=first):
            with tf.GradientTape() as tape:
                if not first:
                    tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * g)
            sources = list(layer.trainable_variables) + ([] if first else [x])
            return y, tape.gradient(loss, sources)  # returning y keeps the forward in the graph
        ms[kind] = ms.get(kind, 0.0) + _median_ms(lambda: [t.numpy() for t in tf.nest.flatten(run(x, g))][:1],
                                                  args.repeats)
    import numpy as np
    rng = np.random.default_rng(0)
    image = tf.constant(rng.random((BATCH, SIZE, SIZE, 3), dtype=np.float32))
    # The losses as the authors add them (training.py: KL, SSIM, 4 MAE, BCE + Dice), on fixed outputs.
    outs = [tf.Variable(tf.random.uniform((BATCH, SIZE, SIZE, c))) for c in (3, 1)]
    z = [tf.Variable(tf.random.normal((BATCH, 512)) * 0.1) for _ in range(2)]
    in_mask = tf.cast(tf.random.uniform((BATCH, SIZE, SIZE, 1)) > 0.5, tf.float32)

    @tf.function
    def losses():
        with tf.GradientTape() as tape:
            out_image = outs[0] * in_mask + image * (1 - in_mask) if args.model == "mask+decoder" else outs[0]
            loss = training.KLLoss(1e-3)(None, z[0], z[1]) + training.SSIMLoss()(image, out_image)
            loss += 4 * tf.keras.losses.MeanAbsoluteError()(image, out_image)
            if args.model == "mask+decoder":
                loss += training.BCELoss()(in_mask, outs[1])
        return tape.gradient(loss, outs + z)
    ms["losses"] = _median_ms(lambda: losses()[0].numpy(), args.repeats)
    variables = model.trainable_variables
    grads = [tf.random.normal(v.shape) * 1e-3 for v in variables]
    optimizer = tf.keras.optimizers.Adam(learning_rate=1e-4, clipnorm=1e-3)
    optimizer.build(variables)

    @tf.function
    def optim():
        optimizer.apply_gradients(zip(grads, variables))
    ms["clip + adam"] = _median_ms(lambda: (optim(), variables[0].numpy()), args.repeats)
    # The full step as the authors train: fit() over a cached batch, one step per epoch after a warm-up epoch.
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=1e-4, clipnorm=1e-3))
    mask = tf.cast(tf.random.uniform((BATCH, SIZE, SIZE, 1)) > 0.5, tf.float32)
    data = tf.data.Dataset.from_tensors(((image, mask),) if args.model == "mask+decoder" else (image,))
    epoch_s = fit_epoch_seconds(model, data.cache().repeat(), 1, 1 + args.repeats)
    full = 1000 * statistics.median(epoch_s[1:])
    return {"backend": f"tensorflow {tf.__version__}", "threads": "default", "precision": "fp32", "ms": ms,
            "full_step_ms": full, "full_step_path": "fit"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layer_times.py", description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=("torch", "tf"))
    parser.add_argument("--model", choices=("mask+decoder", "none"), default="mask+decoder")
    parser.add_argument("--code", help="tf: folder holding the authors' training.py")
    parser.add_argument("--bf16", action="store_true", help="torch: under bf16 autocast")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=SIZE, help="torch: 144 (the paper's), 72, 36, 18 or 9")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="torch: default 32 (the paper's)")
    args = parser.parse_args(argv)
    if args.backend == "tf" and (args.image_size, args.batch_size) != (SIZE, BATCH):
        parser.error(f"tf times the authors' model as they built it: {SIZE} px, batch {BATCH}")
    if args.backend == "tf" and not (args.code and os.path.isfile(os.path.join(args.code, "training.py"))):
        parser.error("tf needs --code, the folder holding the authors' training.py")
    result = torch_times(args) if args.backend == "torch" else tf_times(args)
    result["ms"] = {k: round(v, 1) for k, v in result["ms"].items()}
    result["sum_ms"] = round(sum(result["ms"].values()), 1)
    result["full_step_ms"] = round(result["full_step_ms"], 1)
    result["model"] = args.model
    result["image_size"], result["batch_size"] = args.image_size, args.batch_size
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
