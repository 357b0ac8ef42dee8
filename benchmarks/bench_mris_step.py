"""One MRIS training step: the bundle's MONAI ``SupervisedTrainer`` (MRISTrainStep) vs a bare PyTorch loop.

Same model (MRIS-C DualEncoder), same batch, same optimiser settings; both measured in the same process,
interleaved, several repeats; the fastest repeat of each is compared. Prints the overhead ratio
MONAI / bare. Usage: ``python benchmarks/bench_mris_step.py [--size 64] [--batch 16] [--steps 5] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.engines import SupervisedTrainer

from pipeline.mris.engine import MRISTrainStep, make_network
from pipeline.mris.losses import LongitudinalTripletLoss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=64, help="radiograph side S (maps are 2S x S)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="training steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--widen", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    s, b = args.size, args.batch
    batch = {"image": torch.rand(b, 1, s, s), "maps": torch.rand(b, 1, 2 * s, s),
             "subject_id": [str(i) for i in range(b)]}
    net = make_network("combined", widen_factor=args.widen)
    loss_fn = LongitudinalTripletLoss(0.1)
    opt = torch.optim.AdamW(net.parameter_groups(), weight_decay=1e-3)
    step = MRISTrainStep("combined", max_grad_norm=1.0)
    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=[batch] * args.steps, network=net,
                                optimizer=opt, loss_function=loss_fn, iteration_update=step, decollate=False)

    def bare() -> None:
        for _ in range(args.steps):
            net.train()
            opt.zero_grad(set_to_none=True)
            fx, gy = net(batch["image"], batch["maps"])
            loss = loss_fn(fx, gy, batch["subject_id"])
            loss.backward()
            for enc in net.encoders().values():
                torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
            opt.step()

    def monai_engine() -> None:
        trainer.run()  # a finished ignite engine restarts from epoch 0

    bare()  # warm-up
    times: dict[str, list[float]] = {"bare PyTorch": [], "MONAI SupervisedTrainer": []}
    for _ in range(args.repeats):
        for name, fn in (("bare PyTorch", bare), ("MONAI SupervisedTrainer", monai_engine)):
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / args.steps)
    print(f"MRIS-C step: batch {b}, image {s}x{s}, maps {2 * s}x{s}, widen {args.widen}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps x {args.repeats} repeats")
    for name, ts in times.items():
        print(f"  {name:26s} best {min(ts) * 1000:8.1f} ms/step   all: " + ", ".join(f"{t * 1000:.0f}" for t in ts))
    print(f"  overhead ratio MONAI / bare (best): {min(times['MONAI SupervisedTrainer']) / min(times['bare PyTorch']):.3f}")


if __name__ == "__main__":
    main()
