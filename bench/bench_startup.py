"""Start-up time of `freefuse` commands that load no model: help, `inspect`, a flag's mistake.

    python bench/bench_startup.py [--repeat 5] [--importtime]

Each command runs in a fresh process (`python -m freefuse ...`, as the `freefuse` script starts
it), `--repeat` times; the median wall time is printed, and whether the process imported torch
(from `python -X importtime`, which also gives the slowest imports with `--importtime`). With
`PYTHONPATH` pointing at another checkout's `src`, the same commands time that checkout.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = Path(__file__).resolve().parent.parent / "src/freefuse/shapesworld/weights/loras/zorblax.safetensors"


def commands(folder: Path) -> dict[str, list[str]]:
    """What a newcomer types that needs no model: help, reading a LoRA, and mistakes in flags."""
    return {
        "--help": ["--help"],
        "generate --help": ["generate", "--help"],
        "inspect LORA": ["inspect", str(LORA)],
        "generate (no --prompt)": ["generate", "--model", "tiny"],
        "generate --lora x=": ["generate", "--model", "tiny", "--prompt", "a", "--lora", "x.safetensors="],
        "demo --size abc": ["demo", "--size", "abc", "--out", str(folder / "demo")],
        "batch missing.jsonl": ["batch", str(folder / "missing.jsonl"), "--out", str(folder / "b")],
    }


def run(args: list[str], importtime: bool = False) -> tuple[float, subprocess.CompletedProcess]:
    flags = ["-X", "importtime"] if importtime else []
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *flags, "-m", "freefuse", *args], capture_output=True, text=True, check=False
    )
    return time.perf_counter() - start, done


def slowest_imports(stderr: str, count: int) -> list[tuple[int, str]]:
    """(cumulative µs, module) of the top-level imports, slowest first, from `-X importtime` output."""
    found = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        # Nested imports are indented by two more spaces per level; the outermost have one.
        if cumulative.strip().isdigit() and not name.startswith("  "):
            found.append((int(cumulative), name.strip()))
    return sorted(found, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--importtime", action="store_true", help="also list each command's slowest imports")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        print("| command | exit | median s | min s | imports torch |")
        print("|---|---|---|---|---|")
        details = []
        for label, argv in commands(Path(folder)).items():
            times = [run(argv)[0] for _ in range(args.repeat)]
            _, traced = run(argv, importtime=True)
            torch = any(re.search(r"\|\s*torch$", line) for line in traced.stderr.splitlines())
            print(
                f"| `freefuse {label}` | {traced.returncode} | {statistics.median(times):.2f} | "
                f"{min(times):.2f} | {'yes' if torch else 'no'} |"
            )
            details.append((label, slowest_imports(traced.stderr, 5)))
        if args.importtime:
            for label, slowest in details:
                shown = ", ".join(f"{name} {micros / 1e6:.2f}s" for micros, name in slowest)
                print(f"{label}: {shown}")


if __name__ == "__main__":
    main()
