"""Slice-encoder throughput of the progression networks: ONE forward over the B x S slices vs a per-slice loop.

The "2D + TRF" family encodes every sagittal slice with a 2D ResNet-50. Our
:class:`pipeline.progression.network.SliceEncoder` stacks the slices of all volumes into one
``(B S) x 1 x H x W`` batch and runs the encoder once; the naive alternative loops over the S slices and
encodes the B images of each slice per call (S calls). Both run on the same encoder and the same volumes, in
eval mode without gradients (inference / validation), interleaved in one process for ``--repeats`` rounds after
a warm-up; the table shows the fastest round of each, in volumes per second, and the ratio. The features of
the two methods are compared too (max absolute difference; equal up to rounding in eval mode).

Defaults are small enough for a 2-core CPU (ResNet-50 at width 1/4, 16 slices of 64 x 64); ``--paper`` sets the
paper's input and width (64 slices of 160 x 160, width 1: 2048 features per slice), for a GPU or patience.

Usage:  python benchmarks/bench_progression_encoder.py [--batch 2] [--slices 16] [--size 64] [--widen 0.25]
        [--depth 50] [--repeats 3] [--threads 2] [--device cpu] [--paper]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from pipeline.progression.network import SliceEncoder, count_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="volumes per forward (B)")
    p.add_argument("--slices", type=int, default=16, help="sagittal slices per volume (S)")
    p.add_argument("--size", type=int, default=64, help="slice side H = W in pixels")
    p.add_argument("--widen", type=float, default=0.25, help="ResNet widen_factor (1 = 2048 features)")
    p.add_argument("--depth", type=int, default=50, choices=[18, 34, 50])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true", help="64 slices of 160 x 160, width 1 (the paper's input)")
    args = p.parse_args()
    if args.paper:
        args.slices, args.size, args.widen = 64, 160, 1.0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    enc = SliceEncoder(depth=args.depth, widen_factor=args.widen).to(device).eval()
    x = torch.rand(args.batch, 1, args.slices, args.size, args.size, device=device)

    def batched() -> torch.Tensor:
        return enc(x)

    def loop() -> torch.Tensor:
        return torch.stack([enc.encode_images(x[:, :, s]) for s in range(args.slices)], dim=1)

    methods = {"one forward over B x S": batched, "per-slice loop (S calls)": loop}
    best: dict[str, float] = {}
    feats: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, fn in methods.items():  # warm-up
            feats[name] = fn()
        for _ in range(max(1, args.repeats)):
            for name, fn in methods.items():
                _sync(device)
                t = time.perf_counter()
                fn()
                _sync(device)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    a, b = feats.values()
    print(f"slice encoder: ResNet-{args.depth} x{args.widen} ({count_parameters(enc) / 1e6:.1f} M params, "
          f"{enc.out_dim} features/slice), B={args.batch} volumes x S={args.slices} slices of "
          f"{args.size}x{args.size}, {args.device}, {args.threads} threads, fastest of {args.repeats}, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"{'method':>26} {'seconds':>9} {'volumes/s':>10} {'slices/s':>10}")
    for name, sec in best.items():
        print(f"{name:>26} {sec:>9.3f} {args.batch / sec:>10.2f} {args.batch * args.slices / sec:>10.1f}")
    loop_s, one_s = best["per-slice loop (S calls)"], best["one forward over B x S"]
    print(f"{'ratio':>26}  one forward is x{loop_s / one_s:.2f} the loop's throughput; "
          f"max |feature difference| {float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
