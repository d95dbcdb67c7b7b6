"""How fast the default trains here, and how close that is to what the CPU can do.

    python bench/bench_training.py                      # minutes on a laptop CPU; run it alone
    python bench/bench_training.py --steps 30 --json runs/bench_training.json
    python bench/bench_training.py --config configs/shapes-unet2d.yaml   # another model, same recipe

Measures, on this machine and its current load (run it alone):
- the matmul peak: the best of several 2048^3 products in bf16 and in float32 (GFLOP/s);
- the default UNet's training step as `train.py` runs it (`training.loop.TrainStep`: bf16 autocast
  where the CPU has it, the grounding losses, fused AdamW), on a batch of the default's size from
  the real shapes data: images/s, the step's FLOPs (forward + backward, `torch.utils.flop_counter`)
  and the GFLOP/s they make, as a share of the bf16 peak;
- the small CLIP's contrastive step (`training.clip.train_clip`) in float32 and in bf16 autocast,
  seconds per step.

Timings are the best of `--rounds` interleaved rounds, so a busy neighbour hurts all alike; the
printed "images/s" is the number to put beside a time measured on this machine.
"""

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from diffusion.cli import tune_malloc
from diffusion.config import Config, load_config
from diffusion.data.batches import InMemoryData, drop_captions
from diffusion.data.datasets import build_dataset
from diffusion.model.text_encoder import TextEncoder
from diffusion.precision import resolve_mixed_precision
from diffusion.training.clip import fit_tokenizer, train_clip
from diffusion.training.grounding import GroundingLoss, grounding_targets
from diffusion.training.loop import TrainStep, new_optimizer, new_unet, noise_schedule


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX (which speeds bf16 up several times)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "an unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{name} ({'with' if 'amx_bf16' in info else 'without'} AMX, {os.cpu_count()} cores)"


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of the best of `repeats` products of two size x size matrices."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def small_clip(cfg: Config, captions: list[str], folder: Path) -> TextEncoder:
    """A small CLIP of the default's shape, trained for one step: the step's cost does not depend
    on how well it is trained."""
    images, _ = build_dataset(dataclasses.replace(cfg.data, num_samples=512)).render_all(progress=False)
    tokenizer = fit_tokenizer(captions, cfg.text.vocab_size, cfg.text.max_length)
    train_clip(images, captions[:512], tokenizer, dataclasses.replace(cfg.text, steps=1), folder, progress=False)
    return TextEncoder.from_pretrained(
        folder,
        max_length=cfg.text.max_length,
        hidden_layer=cfg.text.hidden_layer,
        mask_eos=cfg.text.mask_eos,
        concat_token_embeddings=cfg.text.concat_token_embeddings,
    )


def summarise(results: dict[str, list[float]], flops: int, cfg: Config, accelerator: Accelerator) -> dict:
    """Print the best of each timing's rounds and what follows from them; returns the report."""
    best = {name: (max(values) if "GFLOP" in name else min(values)) for name, values in results.items()}
    images_per_s = cfg.train.batch_size / best["step s"]
    gflops = flops / best["step s"] / 1e9
    report = {
        **best,
        "images/s": images_per_s,
        "GFLOP per image": flops / cfg.train.batch_size / 1e9,
        "step GFLOP/s": gflops,
        "share of the bf16 peak": gflops / best["bf16 peak GFLOP/s"],
        "threads": torch.get_num_threads(),
        "model.kind": cfg.model.kind,
        "mixed precision": accelerator.mixed_precision,
        "cpu": cpu_name(),
    }
    print(f"CPU: {report['cpu']}; model.kind {cfg.model.kind}, model.channels {cfg.model.channels}")
    print(f"matmul peak: bf16 {best['bf16 peak GFLOP/s']:.0f} GFLOP/s, float32 {best['float32 peak GFLOP/s']:.0f}")
    print(
        f"UNet training step (batch {cfg.train.batch_size}, {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} threads): {best['step s'] * 1000:.1f} ms, {images_per_s:.0f} images/s, "
        f"{report['GFLOP per image']:.2f} GFLOP per image, {gflops:.0f} GFLOP/s = "
        f"{report['share of the bf16 peak']:.0%} of the bf16 peak"
    )
    print(
        f"small CLIP step (batch {cfg.text.batch_size}): float32 {best['clip float32 s/step']:.3f} s, "
        f"bf16 autocast {best['clip bf16 s/step']:.3f} s"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--clip-steps", type=int, default=5, help="CLIP steps timed per round and precision")
    parser.add_argument("--config", help="YAML config whose model is timed (default: the built-in defaults)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.kind=unet2d")
    args = parser.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    accelerator = Accelerator(cpu=True, mixed_precision=resolve_mixed_precision("auto", torch.device("cpu")))
    dataset = build_dataset(dataclasses.replace(cfg.data, num_samples=2048))
    images, captions, masks, scenes = dataset.render_with_masks(progress=False)
    with tempfile.TemporaryDirectory() as folder:
        encoder = small_clip(cfg, captions, Path(folder))
        token_object = grounding_targets(scenes, lambda c: encoder.tokenize(c)["offsets"])
        data = InMemoryData(images, captions, encoder, "cpu", token_object, masks)
        clip_images, clip_captions = images[: cfg.text.batch_size * 4], captions[: cfg.text.batch_size * 4]
        tokenizer = encoder.tokenizer

        unet = new_unet(cfg, encoder)
        optimizer = new_optimizer(cfg, unet, torch.device("cpu"))
        unet, optimizer = accelerator.prepare(unet, optimizer)
        grounding = GroundingLoss(set(cfg.model.attention_resolutions), pixel=cfg.train.grounding_pixel_weight > 0)
        step = TrainStep(cfg, unet, noise_schedule(cfg), optimizer, accelerator, grounding)
        generator = torch.Generator().manual_seed(0)
        batches = [
            drop_captions(
                data.batch(torch.randint(len(data), (cfg.train.batch_size,), generator=generator)),
                torch.rand(cfg.train.batch_size) < cfg.train.cond_dropout,
                data.empty,
            )
            for _ in range(4)
        ]
        unet.train()
        for batch in batches:
            step(batch)  # warm-up: oneDNN picks its kernels
        with FlopCounterMode(display=False) as counter:
            step(batches[0])
        flops = counter.get_total_flops()

        results = {
            "bf16 peak GFLOP/s": [],
            "float32 peak GFLOP/s": [],
            "step s": [],
            "clip float32 s/step": [],
            "clip bf16 s/step": [],
        }
        for _ in range(args.rounds):
            results["bf16 peak GFLOP/s"].append(matmul_peak(torch.bfloat16))
            results["float32 peak GFLOP/s"].append(matmul_peak(torch.float32))
            start = time.perf_counter()
            for k in range(args.steps):
                step(batches[k % len(batches)])
            results["step s"].append((time.perf_counter() - start) / args.steps)
            for precision in ("no", "bf16"):
                clip_cfg = dataclasses.replace(cfg.text, steps=args.clip_steps)
                start = time.perf_counter()
                train_clip(
                    clip_images,
                    clip_captions,
                    tokenizer,
                    clip_cfg,
                    Path(folder) / "clip",
                    progress=False,
                    mixed_precision=precision,
                )
                name = "clip float32 s/step" if precision == "no" else "clip bf16 s/step"
                results[name].append((time.perf_counter() - start) / args.clip_steps)

    report = summarise(results, flops, cfg, accelerator)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
