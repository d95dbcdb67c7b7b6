#!/usr/bin/env python
"""Speed of our UNet against diffusers' UNet2DConditionModel at the same parameter count.

One run measures, for both models and on the same inputs:

* training images/s: AdamW steps on an MSE loss against a random target (batch --batch-size),
  after 2 warm-up steps, timed over --train-steps steps;
* sampling images/s: one full --sample-steps sample with classifier-free guidance (each step is
  one forward of the doubled batch 2B, unconditional half first, guidance --guidance, then a
  DPMSolverMultistepScheduler(dpmsolver++) step), batch --sample-batch, no_grad, after a short
  warm-up sample.

The diffusers model uses the same sample size, 3 in/out channels, cross_attention_dim = D,
cross-attention blocks at the same resolutions as ours (plus the cross-attention mid block, as
ours always has one), layers_per_block 1, norm_num_groups 8 and the same number of heads; its
block_out_channels are searched (multiples of 8, proportional to ours, then refined per level)
for the parameter count closest to ours, which must be within --tolerance (10%).

Other jobs may share the CPU, so the models are measured interleaved (ours, diffusers, ours,
diffusers, ... for --rounds rounds) and the best of each is reported. It is a measurement, not a
test: it exits 0 whether ours is faster or not.

    python bench/bench_unet.py                          # CPU, defaults (~1-2 min on 2 cores)
    python bench/bench_unet.py --device cuda --mixed-precision bf16 --json runs/bench.json
    python bench/bench_unet.py --profile                # also print the top ops of both models
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

from diffusion.model.unet import UNet

GROUPS = 8  # GroupNorm groups, ours and diffusers'


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--channels", default="32,64,128", help="our UNet's widths per level")
    p.add_argument("--attention-resolutions", default="16,8", help="sides (px) with transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads (both models)")
    p.add_argument("--blocks-per-level", type=int, default=1, help="ours; diffusers' layers_per_block")
    p.add_argument("--tokens", type=int, default=32, help="text length T")
    p.add_argument("--context-dim", type=int, default=128, help="text width D")
    p.add_argument("--valid-tokens", type=int, default=8, help="tokens with mask True (cond)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--sample-batch", type=int, default=16, help="images per sample (forward batch is 2x)")
    p.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++ steps, timed")
    p.add_argument("--sample-warmup", type=int, default=2, help="steps of the untimed warm-up sample")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best of each is kept")
    p.add_argument("--tolerance", type=float, default=0.10, help="max relative param-count gap")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, profile one training step and one guided sampling step of each",
    )
    p.add_argument("--profile-rows", type=int, default=15)
    return p.parse_args(argv)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def loadavg() -> tuple[float, ...] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):  # not on every OS
        return None


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- the two models


def build_ours(args) -> UNet:
    return UNet(
        sample_size=args.resolution,
        channels=ints(args.channels),
        blocks_per_level=args.blocks_per_level,
        attention_resolutions=ints(args.attention_resolutions),
        attention_heads=args.heads,
        context_dim=args.context_dim,
    )


def diffusers_config(args, block_out_channels: tuple[int, ...]) -> dict:
    levels = len(block_out_channels)
    attn = set(ints(args.attention_resolutions))
    cross = [args.resolution // 2**i in attn for i in range(levels)]
    return dict(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=args.blocks_per_level,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        cross_attention_dim=args.context_dim,
        # diffusers' legacy naming: in UNet2DConditionModel `attention_head_dim` is the NUMBER of
        # heads (num_attention_heads defaults to it; passing num_attention_heads is refused).
        # So this gives `heads` heads of width C/heads at every level, exactly like ours.
        attention_head_dim=args.heads,
        norm_num_groups=GROUPS,
        use_linear_projection=True,  # nn.Linear proj_in/out, as ours (default would be 1x1 convs)
    )


def diffusers_params(args, channels: tuple[int, ...]) -> int:
    with torch.device("meta"), warnings.catch_warnings():  # no memory, no init: just count
        warnings.simplefilter("ignore")
        return n_params(UNet2DConditionModel(**diffusers_config(args, channels)))


def match_diffusers(args, target: int) -> tuple[tuple[int, ...], int]:
    """block_out_channels (multiples of lcm(8, heads)) whose param count is closest to target:
    first scale ours proportionally, then move each level by one step around the best."""
    ours = ints(args.channels)
    unit = math.lcm(GROUPS, args.heads)
    cache: dict[tuple[int, ...], int] = {}

    def count(ch):
        if ch not in cache:
            cache[ch] = diffusers_params(args, ch)
        return cache[ch]

    def key(ch):  # closest count, then the most proportional to ours
        shape = sum(abs(c / o - ch[0] / ours[0]) for c, o in zip(ch, ours))
        return abs(count(ch) - target), shape

    proportional = {tuple(max(unit, round(s / 100 * c / unit) * unit) for c in ours) for s in range(30, 201)}
    best = min(proportional, key=key)
    for _ in range(3):  # per-level refinement, keeping widths non-decreasing
        around = {best}
        for deltas in itertools.product((-1, 0, 1), repeat=len(ours)):
            ch = tuple(c + d * unit for c, d in zip(best, deltas))
            if min(ch) >= unit and all(a <= b for a, b in zip(ch, ch[1:])):
                around.add(ch)
        new = min(around, key=key)
        if new == best:
            break
        best = new
    return best, count(best)


def forward_fn(model, kind: str):
    """(sample, timestep, text, mask) -> prediction, for either model."""
    if kind == "ours":
        return lambda x, t, c, m: model(x, t, c, m)
    return lambda x, t, c, m: model(x, t, encoder_hidden_states=c, encoder_attention_mask=m, return_dict=False)[0]


# ---------------------------------------------------------------------------- measurements


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def make_inputs(args, device) -> dict:
    g = torch.Generator().manual_seed(0)
    R, T, D, B, S = args.resolution, args.tokens, args.context_dim, args.batch_size, args.sample_batch

    def mask(n, valid):
        m = torch.zeros(n, T, dtype=torch.bool)
        m[:, : max(1, min(valid, T))] = True
        return m

    cond, uncond = torch.randn(S, T, D, generator=g), torch.randn(1, T, D, generator=g).expand(S, T, D)
    inputs = dict(
        train_x=torch.randn(B, 3, R, R, generator=g),
        train_target=torch.randn(B, 3, R, R, generator=g),
        train_t=torch.randint(0, 1000, (B,), generator=g),
        train_text=torch.randn(B, T, D, generator=g),
        train_mask=mask(B, args.valid_tokens),
        sample_noise=torch.randn(S, 3, R, R, generator=g),
        # unconditional half first; the "empty prompt" reads 2 tokens (say BOS, EOS)
        sample_text=torch.cat([uncond, cond]),
        sample_mask=torch.cat([mask(S, 2), mask(S, args.valid_tokens)]),
    )
    return {k: v.to(device) for k, v in inputs.items()}


def autocast(args, device):
    if args.mixed_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_step(model, fwd, opt, inp, args, device):
    with autocast(args, device):
        out = fwd(inp["train_x"], inp["train_t"], inp["train_text"], inp["train_mask"])
    loss = F.mse_loss(out.float(), inp["train_target"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_train(model, fwd, inp, args, device, clock) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(args.train_warmup):
        train_step(model, fwd, opt, inp, args, device)
    start = clock()
    for _ in range(args.train_steps):
        train_step(model, fwd, opt, inp, args, device)
    elapsed = clock() - start
    del opt
    return args.batch_size * args.train_steps / elapsed


def guided_step(fwd, scheduler, x, t, inp, args):
    x2 = torch.cat([x, x])
    ts = t.to(device=x.device, dtype=torch.long).reshape(1).expand(x2.shape[0])
    with autocast(args, x.device):
        out = fwd(x2, ts, inp["sample_text"], inp["sample_mask"])
    uncond, cond = out.float().chunk(2)
    eps = uncond + args.guidance * (cond - uncond)
    return scheduler.step(eps, t, x, return_dict=False)[0]


@torch.no_grad()
def sample(fwd, inp, args, steps: int) -> torch.Tensor:
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(steps, device=inp["sample_noise"].device)
    x = inp["sample_noise"] * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = guided_step(fwd, scheduler, x, t, inp, args)
    return x


def measure_sample(model, fwd, inp, args, device, clock) -> float:
    model.eval()
    if args.sample_warmup > 0:
        sample(fwd, inp, args, args.sample_warmup)
    start = clock()
    x = sample(fwd, inp, args, args.sample_steps)
    elapsed = clock() - start
    if not torch.isfinite(x).all():
        print("warning: the sample has non-finite values", file=sys.stderr)
    return args.sample_batch / elapsed


def profile(name, model, fwd, inp, args, device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, fwd, opt, inp, args, device)  # warm
    with torch_profile(activities=activities) as prof:
        train_step(model, fwd, opt, inp, args, device)
    print(f"\n=== profile: {name}, one training step (batch {args.batch_size}) ===")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))
    model.eval()
    with torch.no_grad():
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++")
        scheduler.set_timesteps(args.sample_steps, device=device)
        x = inp["sample_noise"] * scheduler.init_noise_sigma
        x = guided_step(fwd, scheduler, x, scheduler.timesteps[0], inp, args)  # warm
        with torch_profile(activities=activities) as prof:
            for t in scheduler.timesteps[1:4]:
                x = guided_step(fwd, scheduler, x, t, inp, args)
    print(f"\n=== profile: {name}, 3 guided sampling steps (forward batch {2 * args.sample_batch}) ===")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))


# ---------------------------------------------------------------------------- main


def build_models(args, device):
    """Our UNet and the diffusers UNet2DConditionModel whose size is nearest ours (within
    args.tolerance): ({name: (model, forward)}, our params, theirs, block_out_channels, diffusers config)."""
    torch.manual_seed(0)
    ours = build_ours(args)
    ours_n = n_params(ours)
    ours.to(device)
    channels, diff_n = match_diffusers(args, ours_n)
    gap = abs(diff_n - ours_n) / ours_n
    cfg = diffusers_config(args, channels)
    print(f"params: ours {ours_n:,}  diffusers {diff_n:,}  (block_out_channels={channels}, gap {gap:.1%})")
    assert gap <= args.tolerance, f"no diffusers config within {args.tolerance:.0%} of {ours_n:,} params"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = UNet2DConditionModel(**cfg)
    assert n_params(theirs) == diff_n
    theirs.to(device)
    models = {"ours": (ours, forward_fn(ours, "ours")), "diffusers": (theirs, forward_fn(theirs, "diffusers"))}
    return models, ours_n, diff_n, channels, cfg


def run_rounds(models: dict, inp, args, device, clock) -> list[dict]:
    """args.rounds rounds, the models taking turns: training and sampling images/s of each."""
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, (model, fwd) in models.items():
            t0 = time.perf_counter()
            train = measure_train(model, fwd, inp, args, device, clock)
            samp = measure_sample(model, fwd, inp, args, device, clock)
            row[name] = {"train_images_per_s": train, "sample_images_per_s": samp}
            print(
                f"  round {r + 1} {name:9s}: train {train:8.2f} img/s   sample {samp:8.2f} img/s"
                f"   ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
        rounds.append(row)
    return rounds


def print_table(args, best: dict, ratio: dict, ours_n: int, diff_n: int, channels, cfg: dict) -> None:
    rows = [
        ("parameters", f"{ours_n:,}", f"{diff_n:,}", f"{ours_n / diff_n:.3f}"),
        (
            f"train img/s (B={args.batch_size}, AdamW)",
            f"{best['ours']['train_images_per_s']:.2f}",
            f"{best['diffusers']['train_images_per_s']:.2f}",
            f"{ratio['train_images_per_s']:.3f}",
        ),
        (
            f"sample img/s (B={args.sample_batch}, {args.sample_steps} steps, CFG)",
            f"{best['ours']['sample_images_per_s']:.2f}",
            f"{best['diffusers']['sample_images_per_s']:.2f}",
            f"{ratio['sample_images_per_s']:.3f}",
        ),
    ]
    header = ("metric (best of rounds)", "ours", "diffusers", "ours/diffusers")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print()
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r))
    print(
        f"diffusers config: block_out_channels={channels}, down={cfg['down_block_types']}, "
        f"up={cfg['up_block_types']}, layers_per_block={cfg['layers_per_block']}, "
        f"attention_head_dim={cfg['attention_head_dim']} (= heads), norm_num_groups={GROUPS}, "
        f"cross_attention_dim={cfg['cross_attention_dim']}, use_linear_projection=True"
    )


def verdict_of(ratio: dict) -> str:
    names = {"train_images_per_s": "training", "sample_images_per_s": "sampling"}
    slower = [f"{names[k]} ({v:.2f}x diffusers)" for k, v in ratio.items() if v < 1.0]
    return "FAIL: ours is slower at " + " and ".join(slower) if slower else "PASS: ours is at least as fast"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    models, ours_n, diff_n, channels, cfg = build_models(args, device)
    inp = make_inputs(args, device)
    load_before = loadavg()
    print(
        f"device {device}, threads {torch.get_num_threads()}, mixed precision {args.mixed_precision}, "
        f"{args.rounds} interleaved rounds, load average {load_before}"
    )
    rounds = run_rounds(models, inp, args, device, clock)
    load_after = loadavg()
    best = {name: {k: max(r[name][k] for r in rounds) for k in rounds[0][name]} for name in models}
    ratio = {k: best["ours"][k] / best["diffusers"][k] for k in best["ours"]}
    print_table(args, best, ratio, ours_n, diff_n, channels, cfg)
    if device.type == "cpu" and load_after is not None and load_after[0] > torch.get_num_threads() + 0.75:
        print(
            f"note: load average {load_after} on {os.cpu_count()} CPUs is above this run's "
            f"{torch.get_num_threads()} threads: other jobs probably shared the CPU, so absolute numbers "
            "(and, less so, the ratios) are noisy; compare the rounds above"
        )
    verdict = verdict_of(ratio)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = dict(
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            environment=dict(
                torch=torch.__version__,
                python=platform.python_version(),
                device=str(device),
                threads=torch.get_num_threads(),
                cpus=os.cpu_count(),
                cuda=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                load_average_before=load_before,
                load_average_after=load_after,
            ),
            ours=dict(params=ours_n, config=dict(models["ours"][0].config)),
            diffusers=dict(params=diff_n, config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}),
            rounds=rounds,
            best=best,
            ratio=ratio,
            verdict=verdict,
        )
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.profile:
        for name, (model, fwd) in models.items():
            profile(name, model, fwd, inp, args, device)
    print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
