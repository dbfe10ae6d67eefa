"""Break the method on purpose, one line at a time, and check that the test suite notices.

Each mutation below is a bug a review once slipped past the whole suite. The script applies one
mutation to the source, runs pytest (stopping at the first failure), restores the file, and
prints which test caught it. A mutation that every test survives makes the script exit 1.

    python scripts/check_mutations.py                 # every mutation, whole suite (-x)
    python scripts/check_mutations.py --only sink     # mutations whose name contains "sink"
    python scripts/check_mutations.py --tests tests/test_stage2_layers.py tests/test_core_sinks.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "freefuse"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to src/freefuse
    old: str
    new: str


MUTATIONS = (
    Mutation(
        "each LoRA gets the next subject's mask in stage 2",
        "masking.py",
        "for name, image in image_masks.items():",
        "for name, image in zip(image_masks, [*list(image_masks.values())[1:], *list(image_masks.values())[:1]]):",
    ),
    Mutation(
        "stage 1's masks handed to the next subject",
        "methods.py",
        "masks.tokens[name][b] = result.token_masks[slot].reshape(-1)",
        "masks.tokens[name][b] = result.token_masks[(slot + 1) % len(active)].reshape(-1)",
    ),
    Mutation(
        "single-stream layout declared [image, text]",
        "backends/flux.py",
        'return NO_TOKENS if ".norm." in module_name else ("text", "image")',
        'return NO_TOKENS if ".norm." in module_name else ("image", "text")',
    ),
    Mutation(
        "joint masks concatenated in reverse order",
        "masking.py",
        "return torch.cat(parts, dim=1)[..., None]",
        "return torch.cat(parts[::-1], dim=1)[..., None]",
    ),
    Mutation(
        "fused LoRA op ignores the masks",
        "masking.py",
        "per_adapter = [masks[a].for_layout(plan.layout) if a in masks else None for a in plan.adapters]",
        "per_adapter = [None for a in plan.adapters]",
    ),
    Mutation(
        "fused LoRA op reuses one layer's scaling for another",
        "masking.py",
        "key = plan.cache_key\n",
        "key = plan.cache_key[:3]\n",
    ),
    Mutation(
        "sink rule: top-k anywhere",
        "core/attention.py",
        "kept = rows.masked_fill(top & border, 0.0)",
        "kept = rows.masked_fill(top, 0.0)",
    ),
    Mutation(
        "sink rule: the whole border",
        "core/attention.py",
        "kept = rows.masked_fill(top & border, 0.0)",
        "kept = rows.masked_fill(border.expand_as(top), 0.0)",
    ),
    Mutation(
        "stage 1 taps the negative prompt's pass",
        "backends/base.py",
        "            prediction = self.predict(latents, timestep, conditioning, settings)\n        if negative",
        "            prediction = self.predict(latents, timestep, conditioning, settings)\n"
        "            if negative is not None:\n"
        "                self.predict(latents, timestep, negative, settings)\n"
        "        if negative",
    ),
    Mutation(
        "x0 sign flipped",
        "backends/flux.py",
        "return latents - float(sigma) * prediction",
        "return latents + float(sigma) * prediction",
    ),
    Mutation(
        "negative pass uses the prompt's word positions",
        "pipeline.py",
        "tokens, context.negative_positions, negative.num_text_tokens",
        "tokens, context.positions, negative.num_text_tokens",
    ),
    Mutation(
        "empty_mask=global no longer makes the LoRA act everywhere",
        "methods.py",
        "masks.tokens[name][b] = 1.0\n                masks.everywhere.add((name, b))\n                full[name]",
        "full[name]",
    ),
    Mutation(
        "a LoRA on AdaLN (modulation) layers unmasked",
        "masking.py",
        "return self.image.mean(dim=1, keepdim=True)",
        "return torch.ones_like(self.image[:, :1])",
    ),
    Mutation(
        "routing contrast summed in the subjects' order",
        "core/methods.py",
        "total = scores.sort(dim=0).values.sum(dim=0, keepdim=True)",
        "total = scores.sum(dim=0, keepdim=True)",
    ),
    Mutation(
        "SDXL: a mask repeated up to a finer UNet level comes out mirrored",
        "masking.py",
        'return torch.nn.functional.interpolate(mask, size=tuple(size), mode="nearest")',
        'return torch.nn.functional.interpolate(mask, size=tuple(size), mode="nearest").flip(-1)',
    ),
    Mutation(
        "SDXL: cross-attention values declared image tokens",
        "backends/sdxl.py",
        '_CROSS_ATTENTION_TEXT_SIDE = ("attn2.to_k", "attn2.to_v")',
        '_CROSS_ATTENTION_TEXT_SIDE = ("attn2.to_k",)',
    ),
    Mutation(
        "SDXL: noise drawn before the schedule sets its first sigma",
        "pipeline.py",
        "timesteps, sigmas = backend.timesteps(steps, settings.height, settings.width)\n"
        "            state = backend.prepare_latents(\n"
        "                generators, batch, settings.height, settings.width, conditioning.prompt_embeds.dtype, latents\n"
        "            )",
        "state = backend.prepare_latents(\n"
        "                generators, batch, settings.height, settings.width, conditioning.prompt_embeds.dtype, latents\n"
        "            )\n"
        "            timesteps, sigmas = backend.timesteps(steps, settings.height, settings.width)",
    ),
    Mutation(
        "SDXL: an unset negative prompt encoded instead of zeros",
        "backends/sdxl.py",
        "if settings.negative_prompt is None and self.pipeline.config.get(",
        "if False and self.pipeline.config.get(",
    ),
)


def run_pytest(tests: list[str], timeout: int) -> tuple[bool, str, float]:
    """(suite failed, first failing test, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    seconds = time.perf_counter() - started
    failed = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.MULTILINE)
    errors = re.findall(r"^ERROR (\S+)", done.stdout, flags=re.MULTILINE)
    return done.returncode != 0, (failed or errors or ["(no test id: see pytest output)"])[0], seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument(
        "--tests", nargs="*", default=["tests"], help="pytest paths (default: the whole suite)"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mutation")
    args = parser.parse_args()

    chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    if not chosen:
        parser.error(f"no mutation name contains {args.only!r}")
    survivors = []
    for mutation in chosen:
        path = SRC / mutation.file
        original = path.read_text()
        count = original.count(mutation.old)
        if count != 1:
            print(f"[stale] {mutation.name}: the line to mutate occurs {count} times in {mutation.file}")
            survivors.append(mutation.name)
            continue
        try:
            path.write_text(original.replace(mutation.old, mutation.new))
            failed, test, seconds = run_pytest(args.tests, args.timeout)
        finally:
            path.write_text(original)
        if failed:
            print(f"[caught]   {mutation.name}: {test} ({seconds:.0f} s)")
        else:
            print(f"[SURVIVED] {mutation.name} ({seconds:.0f} s)")
            survivors.append(mutation.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
