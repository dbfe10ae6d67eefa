"""Word matching on a very long prompt: seconds for this checkout, and for another one as the reference.

    python bench/bench_words.py                                  # this checkout only
    python bench/bench_words.py --reference /path/to/old/src     # and the ratio to an older checkout

Two cases of a prompt of `--chars` characters (default 120,000, what the issue measured), through
`preflight.word_positions` (every word of two subjects, as a run's check does) and
`tokens.truncation_note`: "many", the subjects' words hundreds of times each; "absent", a word
that is not in a prompt of one long word (the "appears only inside other words" search). The
tokenizer is the tiny T5 one (no download). The library functions are timed directly: runs refuse
prompts over 10,000 characters (`settings.MAX_PROMPT_CHARS`) before they get here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def measure(chars: int) -> dict[str, float]:
    from freefuse.preflight import SubjectFacts, word_positions
    from freefuse.tiny import tiny_t5_tokenizer
    from freefuse.tokens import WordNotFoundError, find_word, truncation_note

    tokenizer = tiny_t5_tokenizer()
    sentence = "Alice hugging Bob in the snow. "
    prompt = (sentence * (chars // len(sentence) + 1))[:chars]
    subjects = [SubjectFacts("alice", ("Alice",)), SubjectFacts("bob", ("Bob",))]
    seconds = {}
    started = time.perf_counter()
    word_positions(tokenizer, [prompt], subjects, 512, True, [])
    truncation_note(tokenizer, prompt, 512)
    seconds["many"] = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.suppress(WordNotFoundError):
        find_word(tokenizer, "a" * chars, "b", 512)
    seconds["absent"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=120_000)
    parser.add_argument("--reference", type=Path, help="the `src` folder of another checkout")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.chars)))
        return
    runs = {"this checkout": None}
    if args.reference is not None:
        runs["reference"] = args.reference.resolve()
    results = {}
    for label, source in runs.items():
        env = dict(os.environ)
        if source is not None:
            env["PYTHONPATH"] = str(source)
        command = [sys.executable, __file__, "--chars", str(args.chars), "--json"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        shown = ", ".join(f"{case} {value:.3f} s" for case, value in results[label].items())
        print(f"{label}: {args.chars:,}-character prompt: {shown}")
    if "reference" in results:
        for case, value in results["this checkout"].items():
            print(f"{case}: reference / this checkout = {results['reference'][case] / max(value, 1e-9):.0f}x")


if __name__ == "__main__":
    main()
