"""Which attention kernel trains this UNet fastest on this machine, in one run.

    python bench/bench_attention_kernel.py [--batch 32] [--rounds 5] [--steps 20] [--threads N]

`diffusion.attention.attend` computes attention in plain ops over slices of the batch
(`sliced_attention`) when the queries need a gradient on CPU, and through the fused
`scaled_dot_product_attention` otherwise.
This measures that choice, on random inputs of the default model's shapes, in bf16 autocast:

1. forward + backward of one attention at each of the default's sizes (16 px and 8 px
   self-attention, 16 px and 8 px cross-attention to 40 tokens, 12 of them readable), batch
   `--batch`: fused kernel, plain ops on the whole batch, plain ops on slices;
2. the same, forward only, at twice the batch (sampling with guidance);
3. a whole training step of the default UNet (grounding loss on, as `python train.py` runs it)
   with `attend` as it is and with the fused kernel everywhere.

Rounds are interleaved and the best of each kept, so a busy neighbour hurts all alike.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusion.attention as attention_module  # noqa: E402
from diffusion.grounding import GroundingLoss  # noqa: E402
from diffusion.unet import UNet  # noqa: E402


def fused(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def whole(q, k, v, mask=None):
    return attention_module.attention_probabilities(q, k, mask) @ v


def best_ms(cases: dict, rounds: int, repeats: int) -> dict:
    for fn in cases.values():  # warm-up
        fn()
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / repeats * 1000)
    return best


def layer_cases(batch: int, queries: int, keys: int, width: int, grad: bool) -> dict:
    q, k, v = (torch.randn(batch, 4, n, width, dtype=torch.bfloat16, requires_grad=grad)
               for n in (queries, keys, keys))
    mask = None
    if keys == 40:  # cross-attention: 12 readable tokens
        mask = torch.zeros(batch, 1, 1, keys, dtype=torch.bool)
        mask[..., :12] = True

    def case(fn):
        def run():
            with torch.set_grad_enabled(grad):
                out = fn(q, k, v, mask)
                if grad:
                    out.float().sum().backward()
        return run
    kernels = {"fused": fused, "whole batch": whole, "sliced": attention_module.sliced_attention}
    return {name: case(fn) for name, fn in kernels.items()}


def training_step_cases(batch: int) -> dict:
    torch.manual_seed(0)
    unet = UNet(sample_size=32, channels=(32, 64, 128), attention_resolutions=(16, 8), attention_heads=4,
                context_dim=256, position_embedding=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 32, 32)
    context = torch.randn(batch, 40, 256)
    mask = torch.zeros(batch, 40, dtype=torch.bool)
    mask[:, :12] = True
    timesteps = torch.randint(0, 1000, (batch,))
    token_object = torch.full((batch, 40), -1)
    token_object[:, 2:4], token_object[:, 6:8] = 0, 1
    masks = (torch.rand(batch, 4, 32, 32) > 0.8).float()
    grounding = GroundingLoss({16, 8}, pixel=True)
    original = attention_module.attend

    def step(kernel):
        def run():
            attention_module.attend = kernel
            try:
                grounding.set_batch(token_object, masks)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    prediction = unet(x, timesteps, context, mask, attention_controller=grounding)
                loss = F.mse_loss(prediction.float(), x) + 0.05 * grounding.loss() + 0.05 * grounding.pixel_loss()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            finally:
                attention_module.attend = original
        return run
    return {"attend (as shipped)": step(original), "fused everywhere": step(fused)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, bf16, batch {args.batch}, best of {args.rounds} rounds (ms)")
    sizes = {"self 16 px": (256, 256, 16), "self 8 px": (64, 64, 32),
             "cross 16 px": (256, 40, 16), "cross 8 px": (64, 40, 32)}
    for grad, batch, label in ((True, args.batch, "forward + backward"), (False, 2 * args.batch, "forward only")):
        print(f"\n{label}, batch {batch}")
        for name, (queries, keys, width) in sizes.items():
            best = best_ms(layer_cases(batch, queries, keys, width, grad), args.rounds, 5)
            print(f"  {name:<12} " + "  ".join(f"{k} {v:6.1f}" for k, v in best.items()))
    best = best_ms(training_step_cases(args.batch), args.rounds, args.steps)
    print(f"\nwhole training step of the default UNet, batch {args.batch}")
    for name, ms in best.items():
        print(f"  {name:<20} {ms:6.1f} ms  {args.batch / ms * 1000:6.1f} images/s")
    ratio = best["fused everywhere"] / best["attend (as shipped)"]
    print(f"attend is {ratio:.2f}x the speed of the fused kernel per training step")


if __name__ == "__main__":
    main()
