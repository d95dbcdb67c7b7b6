"""What a training run spends around the UNet's forward and backward, and the choices made there.

    python bench/bench_training_overhead.py [--steps 50] [--rounds 3] [--samples 20000] [--json F]

Run it as the command lines run (`diffusion.cli.MALLOC_TUNABLES` is set here the same way). On the
default UNet's parameters with random gradients (`torch.manual_seed(0)`):

- optimizer: one AdamW step (train.lr, train.weight_decay) per-parameter (`foreach=False`,
  PyTorch's CPU default), multi-tensor (`foreach=True`) and fused (`fused=True`, what
  `diffusion.training` uses on CPU and CUDA); ms per step, and whether the weights after
  `--steps` steps equal the per-parameter ones bit for bit;
- CLIP step: `--clip-steps` contrastive steps of the small CLIP (batch text.batch_size, on 2,000
  rendered images, set-up included) with its MLPs on `quick_gelu` (CLIP's own, x * sigmoid(1.702 x))
  and on `gelu` (`diffusion.clip_training.ACTIVATION`, used); seconds per step;
- rendering: the default shapes set (`--samples` images with masks) in this process and in
  `torch.get_num_threads()` forked workers (`ShapesDataset.render_with_masks`); seconds.

Rounds are interleaved and the best of each kept, so a busy neighbour hurts all alike.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.cli import relaunch_with_huge_pages  # noqa: E402

OPTIMIZERS = {"per-parameter": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--clip-steps", type=int, default=10, help="CLIP steps timed per round and activation")
    parser.add_argument("--samples", type=int, default=20000, help="shapes images rendered per round")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import dataclasses

    import torch

    import tempfile

    import diffusion.clip_training as text_encoder
    from diffusion.config import Config
    from diffusion.data import build_dataset
    from diffusion.unet import UNet, unet_settings

    cfg = Config()
    torch.manual_seed(0)
    width = cfg.text.width * (2 if cfg.text.concat_token_embeddings else 1)
    unet = UNet(**unet_settings(cfg, width))
    start_weights = [p.detach().clone() for p in unet.parameters()]
    grads = [[torch.randn_like(p) * 1e-2 for p in start_weights] for _ in range(args.steps)]

    def run_optimizer(options: dict) -> tuple[float, list]:
        params = [torch.nn.Parameter(w.clone()) for w in start_weights]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **options)
        begin = time.perf_counter()
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            optimizer.step()
        return (time.perf_counter() - begin) / args.steps * 1000, params

    dataset = build_dataset(dataclasses.replace(cfg.data, num_samples=args.samples))

    clip_images, clip_captions = build_dataset(dataclasses.replace(
        cfg.data, num_samples=2000, object_weights=None)).render_all(progress=False)
    tokenizer = text_encoder.fit_tokenizer(clip_captions, cfg.text.vocab_size, cfg.text.max_length)

    def run_clip(activation: str) -> float:
        text_encoder.ACTIVATION = activation
        with tempfile.TemporaryDirectory() as out:
            begin = time.perf_counter()
            text_encoder.train_clip(clip_images, clip_captions, tokenizer,
                                    dataclasses.replace(cfg.text, steps=args.clip_steps), out, progress=False)
            return (time.perf_counter() - begin) / args.clip_steps

    def run_render(workers: int) -> float:
        begin = time.perf_counter()
        dataset.render_with_masks(progress=False, workers=workers)
        return time.perf_counter() - begin

    best: dict[str, float] = {}
    same: dict[str, bool] = {}
    renders = {"this process": 1, f"{torch.get_num_threads()} workers": torch.get_num_threads()}
    for round_ in range(args.rounds):
        order = list(OPTIMIZERS) if round_ % 2 == 0 else list(reversed(OPTIMIZERS))
        results = {}
        for name in order:
            ms, params = run_optimizer(OPTIMIZERS[name])
            best[f"adamw {name}"] = min(best.get(f"adamw {name}", float("inf")), ms)
            results[name] = params
        for name in OPTIMIZERS:
            same[f"adamw {name}"] = all(torch.equal(a, b) for a, b in zip(results[name], results["per-parameter"]))
        for name in (("quick_gelu", "gelu") if round_ % 2 == 0 else ("gelu", "quick_gelu")):
            best[f"clip {name}"] = min(best.get(f"clip {name}", float("inf")), run_clip(name))
        for name in (renders if round_ % 2 == 0 else reversed(renders)):
            best[f"render {name}"] = min(best.get(f"render {name}", float("inf")), run_render(renders[name]))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    print(f"{'what':<28} {'best':>10}   same as per-parameter after {args.steps} steps")
    for key, value in best.items():
        unit = {"render": "s", "clip": "s/step"}.get(key.split()[0], "ms/step")
        check = "" if key not in same else ("yes" if same[key] else "no (rounding)")
        print(f"{key:<28} {value:>7.2f} {unit:<7} {check}")
    if args.json:
        Path(args.json).write_text(json.dumps({"best": best, "bit_identical": same, "steps": args.steps,
                                               "rounds": args.rounds, "samples": args.samples,
                                               "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    relaunch_with_huge_pages()
    main()
