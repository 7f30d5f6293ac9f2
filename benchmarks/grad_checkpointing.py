"""Gradient checkpointing: peak memory and step time of a training step, with and without.

    python benchmarks/grad_checkpointing.py [--model swinv2_tiny_window8_256] [--batch 16] [--size 256]

On CUDA it reports torch's peak allocated memory (bf16 autocast); on CPU the growth of the
process's peak resident memory over the step (each variant in a fresh process). The figures
go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from results import write_section  # benchmarks/ is on the path of a script run from it

SECTION = "## Gradient checkpointing"


def measure(model_name: str, batch: int, size: int, checkpointing: bool, steps: int) -> dict:
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000, img_size=size).to(device)
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16

    def step() -> float:
        with torch.autocast(device, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up: allocator, optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak_mib = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    )
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU"
    return {"device": name, "step_s": seconds, "peak_mib": peak_mib, "loss": loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swinv2_tiny_window8_256")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a single variant, in a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.batch, args.size, args.one == "on", args.steps)))
        return 0

    figures = {}
    for variant in ("off", "on"):  # a fresh process each: peak memory does not carry over
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one", variant], capture_output=True, text=True, check=True
        ).stdout
        figures[variant] = json.loads(out.strip().splitlines()[-1])
        print(variant, figures[variant], flush=True)
    off, on = figures["off"], figures["on"]
    command = " ".join(["python", "benchmarks/grad_checkpointing.py", *sys.argv[1:]])
    text = f"""{SECTION}

`{command}` on {off["device"]}: {args.model}, batch {args.batch} at {args.size} px, bf16 autocast,
AdamW, mean of {args.steps} steps after a warm-up; {time.strftime("%Y-%m-%d")}. Peak memory is
{"torch.cuda.max_memory_allocated" if "CPU" not in off["device"] else "the growth of the process's peak RSS"}.

| grad checkpointing | step time (s) | peak memory (MiB) | loss |
|---|---:|---:|---:|
| off | {off["step_s"]:.3f} | {off["peak_mib"]:.0f} | {off["loss"]:.4f} |
| on | {on["step_s"]:.3f} | {on["peak_mib"]:.0f} | {on["loss"]:.4f} |

Memory {on["peak_mib"] / max(off["peak_mib"], 1e-9):.0%} of the plain step, time {on["step_s"] / off["step_s"]:.2f}x.
"""
    write_section(args.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
