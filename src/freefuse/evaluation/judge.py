"""The VLM judge's prompt (the paper's Appendix C) and a strict reader of its answers.

The prompt is the paper's, with its two placeholders (`{len(reference_images)}`,
`{prompt_text}`) filled and the two subjects named where the paper has `<A> and <B>`. The text it
was taken from is a PDF extraction that lost `<B>` and the "1." of two lists, and ran the last two
format lines together; those are put back and nothing else is changed.

The answer is read strictly: the three part scores must each be given once, as a plain number
(optionally "/max", "out of max", "points", brackets or Markdown emphasis), within its range; a
total, when given, must equal their sum. Anything else is recorded as unparseable with the
reason, never guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

JUDGE_PROMPT = """You are an image quality evaluator specializing in character generation and image quality assessment.

Please evaluate the quality of the last image (the generated image) based on the following criteria:

Reference images: The first {count} images show reference characters {a} and {b} that should appear in the generated image.

Target image: The last image is the generated image that should be evaluated. Generation prompt: "{prompt}"

Evaluation criteria (total 100 points):

1. Character presence and clarity (50 points): Both characters from the reference images appear in the target image with clear and recognizable features.
2. Prompt adherence (25 points): The generated image follows the requirements described in the prompt.
3. Image clarity and quality (25 points): The image is clear, not blurry, and free of artifacts.

Please provide:

1. Detailed analysis for each criterion
2. Score for each criterion (out of the maximum points)
3. Total score (sum of all criteria scores)
4. Brief reasoning for the scores

Format your response as:

Character Analysis: [your analysis]

Character Score: [0-50]

Prompt Analysis: [your analysis]

Prompt Score: [0-25]

Clarity Analysis: [your analysis]

Clarity Score: [0-25]

Total Score: [0-100]

Reasoning: [brief explanation]"""

#: The part scores: key -> (label in the answer, maximum).
PARTS = {"character": ("Character Score", 50), "prompt": ("Prompt Score", 25), "clarity": ("Clarity Score", 25)}
TOTAL = ("Total Score", 100)

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_VALUE = re.compile(
    rf"^\[?\s*(?P<value>{_NUMBER})\s*\]?\s*(?:(?:/|out\s+of)\s*(?P<max>{_NUMBER}))?\s*(?:points?|pts)?\s*\.?$",
    re.IGNORECASE,
)


def judge_prompt(word_a: str, word_b: str, prompt: str, reference_count: int) -> str:
    """Appendix C's prompt for one generated image, with `reference_count` reference images before it."""
    return JUDGE_PROMPT.format(count=reference_count, a=word_a, b=word_b, prompt=prompt)


@dataclass(frozen=True)
class Verdict:
    """A judge's answer, read: the part scores and their sum (the VLM score), or why it could not be read."""

    parts: dict[str, float] | None = None
    error: str | None = None

    @property
    def total(self) -> float | None:
        return None if self.parts is None else sum(self.parts.values())


def _label_lines(answer: str, label: str) -> list[str]:
    """What follows `label:` on each line that starts with it (Markdown bullets, `#` and `*` allowed)."""
    words = r"\s+".join(label.split())
    pattern = re.compile(rf"^[\s>#*_\-]*{words}\s*[*_]*\s*[:：]\s*(?P<rest>.*)$", re.IGNORECASE | re.MULTILINE)
    return [match.group("rest").strip() for match in pattern.finditer(answer)]


def _number(label: str, raw: str, maximum: int) -> float:
    """One score, strictly: a plain number in [0, maximum]; a stated maximum must be this one."""
    text = raw.strip().strip("*_ ").strip()
    match = _VALUE.match(text)
    if match is None:
        raise ValueError(f"{label} is {raw!r}, not a number")
    value = float(match.group("value"))
    stated = match.group("max")
    if stated is not None and float(stated) != maximum:
        raise ValueError(f"{label} is given out of {stated}, not out of {maximum}")
    if not math.isfinite(value) or not 0 <= value <= maximum:
        raise ValueError(f"{label} {value:g} is outside 0-{maximum}")
    return value


def _one(answer: str, label: str, maximum: int, required: bool) -> float | None:
    found = _label_lines(answer, label)
    if not found:
        if required:
            raise ValueError(f"no {label}")
        return None
    values = {_number(label, raw, maximum) for raw in found}
    if len(values) > 1:
        raise ValueError(f"{label} is given {len(found)} times with different values")
    return values.pop()


def parse_verdict(answer: str) -> Verdict:
    """Read a judge's answer (see the module docstring); never raises."""
    if not isinstance(answer, str) or not answer.strip():
        return Verdict(error="empty answer")
    try:
        parts = {key: _one(answer, label, maximum, required=True) for key, (label, maximum) in PARTS.items()}
        total = _one(answer, *TOTAL, required=False)
    except ValueError as error:
        return Verdict(error=str(error))
    summed = sum(parts.values())
    if total is not None and abs(total - summed) > 1e-6:
        return Verdict(error=f"Total Score {total:g} is not the sum of the parts ({summed:g})")
    return Verdict(parts=parts)
