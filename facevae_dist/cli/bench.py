"""`facevae bench data|train`: throughput benchmarks that write JSON (speed targets live here, not in tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

from facevae_dist.cli.argtypes import add_device_argument


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _run_data(args) -> int:
    from facevae_dist.bench.data import run_data_bench  # imports torch: not at `facevae --help` time

    run_data_bench(out=Path(args.out), n=args.n, workers=args.workers, seed=args.seed,
                   image_size=args.image_size, work_dir=Path(args.work_dir) if args.work_dir else None)
    return 0


def _run_train(args) -> int:
    from facevae_dist.bench.train import run_train_bench

    run_train_bench(out=Path(args.out), batch_sizes=args.batch_sizes, steps=args.steps, warmup=args.warmup,
                    configs=[c for c in args.configs.split(",") if c] if args.configs else None, device=args.device,
                    full=args.full, overhead=not args.no_overhead)
    return 0


def register(sub) -> None:
    bench = sub.add_parser("bench", help="throughput benchmarks (results as JSON)",
                           description="Measure data-pipeline and training throughput on this machine; results are "
                           "written as JSON and summarised on the console.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", parser_class=type(bench))
    bench.set_defaults(_parser=bench)

    data = bench_sub.add_parser(
        "data", help="shard build/read throughput vs the paper's per-file loading",
        description="Builds synthetic shards, then measures: build images/s, shard read images/s (decoded to uint8 "
        "tensors) for each worker count, the host-resident placement (batches gathered from the decoded-split cache "
        "and converted to float32 by torch, as a CPU run does; and the uint8 gather alone), the "
        "paper's per-file way (one JPEG + one label-map PNG per sample, decode and resize at load time), and the raw "
        "decode limit (decode the stored bytes in a tight loop). Reports images/s and images/s per CPU core, ratios, "
        "and which targets are met.")
    data.add_argument("--out", required=True, help="JSON file to write (parent directories are created)")
    data.add_argument("--n", type=int, default=2000, help="number of synthetic images (default 2000)")
    data.add_argument("--workers", type=_int_list, default=[0, 1, 2], help="DataLoader worker counts (default 0,1,2)")
    data.add_argument("--image-size", type=int, default=144, help="training image size (default 144)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--work-dir", help="where to build the temporary dataset (default: a temp dir, removed after)")
    data.set_defaults(func=_run_data, _parser=data)

    train = bench_sub.add_parser(
        "train", help="training images/s of the paper model, and the trainer's host overhead per step",
        description="Training throughput of the trainer's step (forward + losses + backward + clip + Adam) for the "
        "paper's model with and without the mask decoder, on random data already on the device: by default the "
        "default training configuration (quick), plus bf16 autocast on a CPU that does bf16 in hardware, --full for "
        "the precision/layout/compile matrix; 'vs TF' compares with the authors' TensorFlow code where it was "
        "measured on this kind of CPU. Then the "
        "host overhead on a small config: ATen ops, host reads of device scalars and ms per step of the trainer's "
        "step against a bare forward/backward/clip/Adam loop (torch.profiler).")
    train.add_argument("--out", required=True, help="JSON file to write")
    train.add_argument("--batch-sizes", type=_int_list, default=[32], help="comma-separated (default 32; on a GPU try 32,64,128,256,512)")
    train.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    train.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2; compile needs >= 1)")
    train.add_argument("--configs", default=None,
                       help="comma-separated from fp32, bf16, fp16 (GPU), channels_last, compile and '+' combinations "
                            "(default: the default training config, channels_last on CPU, channels_last+bf16 on CUDA; "
                            "on a CPU with avx512_bf16/AMX also channels_last+bf16)")
    train.add_argument("--full", action="store_true",
                       help="the full matrix fp32,bf16,channels_last,channels_last+bf16,compile (slow on a CPU)")
    train.add_argument("--no-overhead", action="store_true", help="skip the host-overhead comparison")
    add_device_argument(train, default="auto")
    train.set_defaults(func=_run_train, _parser=train)
