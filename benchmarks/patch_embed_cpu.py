"""The patch embedding on CPU: ``Conv2d`` (kernel = stride) against the same map as one matmul over the patches.

    python benchmarks/patch_embed_cpu.py                 # 20 interleaved rounds after 5 untimed ones
    python benchmarks/patch_embed_cpu.py --rounds 40

``dinoscale.models.vit.PatchEmbed`` computes its projection on CPU as one matmul over the flattened patches
(``_project_patches``) and elsewhere, and in traced or exported graphs, with its ``proj`` convolution
(``_convolve``). Both forms are the module's own, on the same weights, timed forward and backward (the gradient of
the weight and bias; images need none) in interleaved rounds, median per round, for the multi-crop batches of two
configs:

* quickstart: the student's 256 x 28 px and 512 x 14 px crops (batch 128), patch 7, width 192;
* vits14: ``backbone_vs_timm.py``'s 8 x 224 px and 32 x 98 px crops (batch 4), patch 14, width 384.

Each under bf16 autocast (how training runs) and in float32. Printed: milliseconds per form, conv / linear, and the
largest difference between the two outputs (float rounding: the two sum in another order).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from dinoscale.cpu_malloc import keep_freed_memory
from dinoscale.models.vit import PatchEmbed

CASES = {
    "quickstart": {"crops": [(256, 28), (512, 14)], "patch": 7, "dim": 192},
    "vits14": {"crops": [(8, 224), (32, 98)], "patch": 14, "dim": 384},
}


def conv_form(module: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    return module._convolve(x)


def linear_form(module: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    return module._project_patches(x)


FORMS = {"conv": conv_form, "linear": linear_form}


def forward_backward(module: PatchEmbed, form, images: list[torch.Tensor], autocast: bool) -> tuple[float, float]:
    """Seconds of the forward over all crop batches, and of the backward to the weight and bias."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        outs = [form(module, x) for x in images]
    middle = time.perf_counter()
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    end = time.perf_counter()
    module.zero_grad(set_to_none=True)
    return middle - start, end - middle


def largest_difference(module: PatchEmbed, images: list[torch.Tensor], autocast: bool) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return max((conv_form(module, x).float() - linear_form(module, x).float()).abs().max().item() for x in images)


def run_case(name: str, autocast: bool, rounds: int, warmup: int) -> dict:
    case = CASES[name]
    torch.manual_seed(0)
    module = PatchEmbed(img_size=case["crops"][0][1], patch_size=case["patch"], embed_dim=case["dim"])
    images = [torch.randn(n, 3, size, size) for n, size in case["crops"]]
    times: dict[str, list[tuple[float, float]]] = {form: [] for form in FORMS}
    for r in range(warmup + rounds):
        order = list(FORMS) if r % 2 == 0 else list(reversed(FORMS))
        for form in order:
            t = forward_backward(module, FORMS[form], images, autocast)
            if r >= warmup:
                times[form].append(t)
    result = {"diff": largest_difference(module, images, autocast)}
    for form, ts in times.items():
        result[form] = (statistics.median(f for f, _ in ts), statistics.median(b for _, b in ts))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1, --warmup >= 0")
    cases = args.cases.split(",")
    for name in cases:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; expected some of {', '.join(CASES)}")
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward (weight and bias "
          f"gradients), median of {args.rounds} interleaved rounds")
    print(f"{'case':12s} {'dtype':6s} {'conv ms':>16s} {'linear ms':>16s} {'conv / linear':>14s} {'max |diff|':>11s}")
    for name in cases:
        for autocast in (True, False):
            r = run_case(name, autocast, args.rounds, args.warmup)
            conv, linear = sum(r["conv"]), sum(r["linear"])
            print(f"{name:12s} {'bf16' if autocast else 'fp32':6s} "
                  f"{conv * 1e3:7.2f} ({r['conv'][0] * 1e3:5.2f}+) {linear * 1e3:7.2f} ({r['linear'][0] * 1e3:5.2f}+) "
                  f"{conv / linear:13.2f}x {r['diff']:11.2e}")
    print("(ms: forward + backward, the forward in brackets)")


if __name__ == "__main__":
    main()
