"""How long does training the feature encoder take? (what the widget's Train button and
``napari-ssemnet train-features`` run)

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py [--steps 200] [--device cpu]

Trains ``core.features.train_encoder`` with its defaults (batch 16, 64 px patches) on the
bundled sample (8 x 320^2) for ``--steps`` steps, times each step after a short warm-up,
and extrapolates to the default number of steps (``TRAIN_STEPS``). The time per step does
not depend on the stack's size (patches are drawn from it), only on the device. Prints the
figures and writes ``benchmarks/results/train_<device>.json``.
"""

from __future__ import annotations

import argparse
import time

from common import finish, machine_info
from napari_ssemnet.core.features import train_encoder
from napari_ssemnet.core.params import TRAIN_STEPS
from napari_ssemnet.core.sample import load_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    machine = machine_info()  # before the run: its load average is the machine's, not ours
    stack = load_sample(misaligned=False)
    stamps: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    gen = train_encoder([stack], steps=args.steps, device=args.device, seed=0)
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            model = done.value
            break
        stamps.append((int(event.step), time.perf_counter()))
    total = time.perf_counter() - t0
    # steady rate: from the first report at or after step 20 to the last one
    first = next((s, t) for s, t in stamps if s >= 20)
    last = stamps[-1]
    per_step = (last[1] - first[1]) / max(last[0] - first[0], 1)
    row = {"steps": args.steps, "device": args.device, "seconds_total": total,
           "seconds_per_step": per_step, "steps_per_second": 1.0 / per_step,
           "default_steps": TRAIN_STEPS, "default_run_seconds": per_step * TRAIN_STEPS,
           "final_loss": model.info.get("train_loss"), "stack": list(stack.shape)}
    print(f"{args.steps} steps on {args.device}: {total:.1f} s in all, {per_step * 1000:.0f} ms "
          f"per step ({1 / per_step:.1f} steps/s); the default {TRAIN_STEPS} steps: about "
          f"{per_step * TRAIN_STEPS:.0f} s; final loss {row['final_loss']}")
    finish(f"train_{args.device}.json", {"machine": machine, "row": row})


if __name__ == "__main__":
    main()
