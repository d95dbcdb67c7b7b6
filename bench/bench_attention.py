"""Cost of reading and editing cross-attention during sampling, in one run.

    python bench/bench_attention.py --model runs/shapes/model [--batch 16] [--steps 20] [--rounds 3]

Prints sampling time for: plain sampling; with aggregated per-word maps recorded; with an
attention-mode weight edit; with an edit and maps; a Prompt-to-Prompt swap (two images per pair,
compared with plain sampling of the same number of images). Rounds are interleaved and the best
of each is kept, so a busy neighbour on the CPU hurts all of them alike. Then the peak memory of
the recorder's state at 10, 20 and 50 steps: it must not grow with the steps.
Targets (issue): maps <= +5 %, edit <= +10 %.
"""

import argparse
import time

import torch

from diffusion.control.controllers import AttentionRecorder
from diffusion.sampling.pipeline import Pipeline


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    plain = ["a red circle on the left"] * args.batch
    weighted = ["a (red:2) circle on the left"] * args.batch
    common = {"steps": args.steps, "batch_size": args.batch, "progress": False}
    cases = {
        "plain": lambda: pipe(plain, **common),
        "maps recorded": lambda: pipe(plain, attention_maps=True, **common),
        "attention edit": lambda: pipe(weighted, **common),
        "edit + maps": lambda: pipe(weighted, attention_maps=True, **common),
        "swap (pairs)": lambda: pipe.swap(
            "a red circle on the left",
            "a red square on the left",
            num_images=args.batch // 2,
            steps=args.steps,
            progress=False,
        ),
    }
    # the swap runs one pair (2 images) per batch; compare it with plain batches of 2
    cases["plain (batches of 2)"] = lambda: pipe(plain, steps=args.steps, batch_size=2, progress=False)
    for fn in cases.values():  # warm-up
        fn()
    best = {name: float("inf") for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            best[name] = min(best[name], timed(fn))
    print(f"device {pipe.device}, batch {args.batch}, {args.steps} steps, best of {args.rounds} interleaved rounds")
    print(f"{'case':<22} {'seconds':>8} {'images/s':>9} {'overhead':>9}")
    for name, seconds in best.items():
        reference = best["plain (batches of 2)"] if name == "swap (pairs)" else best["plain"]
        print(f"{name:<22} {seconds:>8.3f} {args.batch / seconds:>9.1f} {seconds / reference - 1:>+9.1%}")

    print("\nrecorder state (bytes) by number of steps:")
    for steps in (10, 20, 50):
        recorder = AttentionRecorder(pipe.unet.config.sample_size)
        pipe.denoise(plain[:4], list(range(4)), steps=steps, attention_controller=recorder)
        state = recorder.total.numel() * recorder.total.element_size()
        print(f"  {steps:>3} steps: {state:,} bytes ({recorder.calls} calls aggregated)")
    maps_overhead = best["maps recorded"] / best["plain"] - 1
    edit_overhead = best["attention edit"] / best["plain"] - 1
    verdict = "PASS" if maps_overhead <= 0.05 and edit_overhead <= 0.10 else "FAIL"
    print(f"{verdict}: maps {maps_overhead:+.1%} (target <= +5%), edit {edit_overhead:+.1%} (target <= +10%)")


if __name__ == "__main__":
    main()
