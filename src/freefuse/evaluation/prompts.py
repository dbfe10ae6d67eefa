"""The interaction prompts of the evaluation: the paper's (Appendix B), or the user's file.

A prompt is a template with `<A>` and `<B>`, each standing for one LoRA's activation word.

The paper lists 50 prompts in Appendix B. The text of the paper this was built from is a PDF
extraction that lost every `<B>` (read as an HTML tag) and garbled four lines into LaTeX. What
is built in is therefore, per prompt, the line as extracted (`extracted`) and the prompt with
`<B>` put back where the sentence needs it (`text`):

- 46 prompts are whole apart from the lost `<B>` ("restored"); 9 of them are confirmed word for
  word by the paper's own filled-in captions (Fig. 2, Appendix D: "daiyu_lin catching sherlock,
  both looking at each other's faces, ...").
- Prompt 36 lost its beginning ("... showing the glowing sword, their faces lit by the forge's
  light."); its start is rebuilt on the pattern of a caption ("reconstructed").
- Prompts 13, 16 and 43 are unreadable. Appendix D's captions show one prompt that is not among
  the readable ones ("daiyu lin showing sherlock a bubbling potion, both gazing at each other in
  fascination."), so it must be one of the three; it is built in without a number. The other two
  are not known and are not made up.

So `--prompts paper` is 48 of the paper's 50 prompts, and every report says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingsError

PLACEHOLDERS = ("<A>", "<B>")
MAX_PROMPT_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Prompt:
    """One interaction prompt.

    Attributes:
        text: the template, with `<A>` and `<B>`.
        number: its number in the paper's Appendix B (None: not the paper's, or number unknown).
        source: "restored", "reconstructed", "appendix-d" (the paper's, see the module docstring)
            or "file" (the user's).
        extracted: the paper's line as the text extraction gave it (paper prompts only).
    """

    text: str
    number: int | None = None
    source: str = "file"
    extracted: str = ""

    @property
    def label(self) -> str:
        if self.number is not None:
            return f"paper #{self.number}"
        return "paper (App. D)" if self.source == "appendix-d" else "file"


# (number, the extracted line, the prompt with `<B>` restored). Order and numbers as in Appendix B.
_RESTORED: tuple[tuple[int, str, str], ...] = (
    (1, "<A> teaching guitar, both sitting close together, their faces near as <A> guides 's fingers on the strings.",
     "<A> teaching <B> guitar, both sitting close together, their faces near as <A> guides <B>'s fingers on the strings."),
    (2, "<A> kissing tenderly in a quiet classroom, their faces close under soft afternoon light.",
     "<A> kissing <B> tenderly in a quiet classroom, their faces close under soft afternoon light."),
    (3, "<A> holding 's face gently, both smiling after climbing a mountain, sunset light on their cheeks.",
     "<A> holding <B>'s face gently, both smiling after climbing a mountain, sunset light on their cheeks."),
    (4, "<A> whispering into 's ear, their faces almost touching, candlelight revealing 's expression.",
     "<A> whispering into <B>'s ear, their faces almost touching, candlelight revealing <B>'s expression."),
    (5, "<A> and laughing together, faces dusted with flour as they bake a cake side by side.",
     "<A> and <B> laughing together, faces dusted with flour as they bake a cake side by side."),
    (6, "<A> hugging warmly, both faces close together, autumn leaves blurred in the background.",
     "<A> hugging <B> warmly, both faces close together, autumn leaves blurred in the background."),
    (7, "<A> and sitting shoulder to shoulder by the fireplace, faces lit by its warm glow.",
     "<A> and <B> sitting shoulder to shoulder by the fireplace, faces lit by its warm glow."),
    (8, "<A> carefully wrapping 's injured hand, both watching each other's expressions closely.",
     "<A> carefully wrapping <B>'s injured hand, both watching each other's expressions closely."),
    (9, "<A> and sharing headphones, leaning their heads together, faces relaxed as they listen to music.",
     "<A> and <B> sharing headphones, leaning their heads together, faces relaxed as they listen to music."),
    (10, "<A> carrying playfully, both laughing, their faces captured in a close, joyful moment.",
     "<A> carrying <B> playfully, both laughing, their faces captured in a close, joyful moment."),
    (11, "A> catching , both looking at each other's faces, smiling in relief on the ice.",
     "<A> catching <B>, both looking at each other's faces, smiling in relief on the ice."),
    (12, "<A> and painting, cheeks smeared with color, smiling at each other over the canvas.",
     "<A> and <B> painting, cheeks smeared with color, smiling at each other over the canvas."),
    (14, "<A> gently cupping 's face, their foreheads almost touching, eyes filled with tenderness.",
     "<A> gently cupping <B>'s face, their foreheads almost touching, eyes filled with tenderness."),
    (15, "<A> and looking up together at the viewer, smiling softly, fairy lights reflecting in their eyes.",
     "<A> and <B> looking up together at the viewer, smiling softly, fairy lights reflecting in their eyes."),
    (17, "<A> and grinning face-to-face in the middle of a playful arm-wrestling match.",
     "<A> and <B> grinning face-to-face in the middle of a playful arm-wrestling match."),
    (18, "<A> pointing at the stars, watching <A>'s face with amazement.",
     "<A> pointing at the stars, <B> watching <A>'s face with amazement."),
    (19, "<A> and paddling, both faces determined, close-up of their focused expressions.",
     "<A> and <B> paddling, both faces determined, close-up of their focused expressions."),
    (20, "<A> guiding 's hands with care, their faces close together as they roll sushi.",
     "<A> guiding <B>'s hands with care, their faces close together as they roll sushi."),
    (21, "<A> and staring each other down across the table, intense eye contact filling the room.",
     "<A> and <B> staring each other down across the table, intense eye contact filling the room."),
    (22, "<A> and laughing face-to-face while kneeling by a sandcastle.",
     "<A> and <B> laughing face-to-face while kneeling by a sandcastle."),
    (23, "<A> adjusting 's bowtie, both faces inches apart, smiling shyly.",
     "<A> adjusting <B>'s bowtie, both faces inches apart, smiling shyly."),
    (24, "<A> holding up an artifact for , their faces close as they study it curiously.",
     "<A> holding up an artifact for <B>, their faces close as they study it curiously."),
    (25, "<A> and laughing mid-pillow fight, close-up of their faces among flying feathers.",
     "<A> and <B> laughing mid-pillow fight, close-up of their faces among flying feathers."),
    (26, "<A> and practicing dance steps, tangled and laughing, faces flushed with joy.",
     "<A> and <B> practicing dance steps, tangled and laughing, faces flushed with joy."),
    (27, "<A> performing a trick, 's amazed face in the foreground.",
     "<A> performing a trick, <B>'s amazed face in the foreground."),
    (28, "<A> and eating pizza, close-up of them laughing together on the rooftop.",
     "<A> and <B> eating pizza, close-up of them laughing together on the rooftop."),
    (29, "<A> and planting flowers, smiling at each other, dirt smudges on their cheeks.",
     "<A> and <B> planting flowers, smiling at each other, dirt smudges on their cheeks."),
    (30, "<A> helping with armor, both concentrating on each other's faces.",
     "<A> helping <B> with armor, both concentrating on each other's faces."),
    (31, "<A> handing an apple, both laughing, their faces close together.",
     "<A> handing <B> an apple, both laughing, their faces close together."),
    (32, "<A> and talking seriously on the swings, close-up on their thoughtful expressions.",
     "<A> and <B> talking seriously on the swings, close-up on their thoughtful expressions."),
    (33, "<A> and leaning over a map, faces illuminated by the lantern glow.",
     "<A> and <B> leaning over a map, faces illuminated by the lantern glow."),
    (34, "<A> pushing on the swing, both laughing, close-up on their happy faces.",
     "<A> pushing <B> on the swing, both laughing, close-up on their happy faces."),
    (35, "<A> and mid-tango, faces close with passionate expressions.",
     "<A> and <B> mid-tango, faces close with passionate expressions."),
    (37, "<A> and side by side on the couch, screen glow on their focused faces.",
     "<A> and <B> side by side on the couch, screen glow on their focused faces."),
    (38, "<A> and assembling furniture, faces frustrated but laughing together.",
     "<A> and <B> assembling furniture, faces frustrated but laughing together."),
    (39, "<A> and steadying the ladder, both faces anxious yet determined.",
     "<A> and <B> steadying the ladder, both faces anxious yet determined."),
    (40, "<A> and sharing a secret glance, their eyes meeting in the crowded room.",
     "<A> and <B> sharing a secret glance, their eyes meeting in the crowded room."),
    (41, "<A> measuring for a suit, both faces close and serious.",
     "<A> measuring <B> for a suit, both faces close and serious."),
    (42, "<A> and roasting marshmallows, laughing as the firelight glows on their faces.",
     "<A> and <B> roasting marshmallows, laughing as the firelight glows on their faces."),
    (44, "<A> and clinking glasses, their smiling faces framed by the Paris skyline.",
     "<A> and <B> clinking glasses, their smiling faces framed by the Paris skyline."),
    (45, "<A> reading a story, resting their head close, listening intently.",
     "<A> reading <B> a story, resting their head close, listening intently."),
    (46, "<A> bumping into , both kneeling to gather papers, surprised faces close together.",
     "<A> bumping into <B>, both kneeling to gather papers, surprised faces close together."),
    (47, "<A> and sparring, close-up of their intense expressions and focused eyes.",
     "<A> and <B> sparring, close-up of their intense expressions and focused eyes."),
    (48, "<A> tucking a flower in 's hair, both smiling warmly face-to-face.",
     "<A> tucking a flower in <B>'s hair, both smiling warmly face-to-face."),
    (49, "<A> and chasing fireflies, faces glowing in the jar's soft light.",
     "<A> and <B> chasing fireflies, faces glowing in the jar's soft light."),
    (50, "<A> and back-to-back, turning to glance at each other with trust.",
     "<A> and <B> back-to-back, turning to glance at each other with trust."),
)  # fmt: skip

#: Paper prompts that a filled-in caption of the paper shows word for word (Fig. 2, Appendix D).
CONFIRMED_BY_CAPTION = frozenset({7, 11, 19, 24, 32, 40, 42, 44, 48})
#: Appendix B numbers whose text is lost in the extraction (one of them is the Appendix D prompt).
UNREADABLE = (13, 16, 43)


def _paper_prompts() -> tuple[Prompt, ...]:
    prompts = [Prompt(text, number, "restored", extracted) for number, extracted, text in _RESTORED]
    prompts.append(
        Prompt(
            "<A> showing <B> the glowing sword, their faces lit by the forge's light.",
            36,
            "reconstructed",
            "$36.~\\mbox{\\enskip}$ showing the glowing sword, their faces lit by the forge's light.",
        )
    )
    prompts.append(
        Prompt(
            "<A> showing <B> a bubbling potion, both gazing at each other in fascination.",
            None,
            "appendix-d",
            "daiyu lin showing sherlock a bubbling potion, both gazing at each other in fascination.",
        )
    )
    return tuple(sorted(prompts, key=lambda prompt: (prompt.number is None, prompt.number or 0)))


PAPER_PROMPTS: tuple[Prompt, ...] = _paper_prompts()

PAPER_NOTE = (
    f"{len(PAPER_PROMPTS)} of the paper's 50 prompts (Appendix B). The text they were taken from lost every <B> "
    "(restored where the sentence needs it; 9 prompts are confirmed word for word by the paper's captions), "
    "prompt 36 lost its beginning (rebuilt), and prompts 13, 16 and 43 are unreadable: one of them is the "
    "Appendix D caption prompt included without a number; the other two are not known and are left out."
)


def check_template(text: str, where: str) -> str:
    """A prompt template: `{A}`/`{B}` accepted for `<A>`/`<B>`; both must be in it, and no other letter."""
    text = text.strip().replace("{A}", "<A>").replace("{B}", "<B>")
    missing = [mark for mark in PLACEHOLDERS if mark not in text]
    if missing:
        raise SettingsError(f"{where}: prompt {text!r} has no {' or '.join(missing)}; every prompt names both subjects.")
    others = sorted(set(re.findall(r"<([C-Z])>", text)))
    if others:
        raise SettingsError(f"{where}: prompt {text!r} uses <{others[0]}>; pairs have only <A> and <B>.")
    return text


def read_prompt_file(path: str | Path) -> tuple[Prompt, ...]:
    """Prompts from a text file: one per line, `<A>` and `<B>` in each; blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"--prompts {path}: no such file; give `paper` or a text file with one prompt a line.")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise SettingsError(f"--prompts {path} is larger than 1 MiB; a prompt file has one short prompt a line.")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(Prompt(check_template(line, f"{path.name}:{number}")))
    if not prompts:
        raise SettingsError(f"--prompts {path} has no prompts.")
    if len({prompt.text for prompt in prompts}) != len(prompts):
        raise SettingsError(f"--prompts {path} repeats a prompt; give each once.")
    return tuple(prompts)


def load_prompts(choice: str) -> tuple[tuple[Prompt, ...], str]:
    """`paper` (the built-in prompts) or a file; returns the prompts and a sentence on where they come from."""
    if choice == "paper":
        return PAPER_PROMPTS, PAPER_NOTE
    prompts = read_prompt_file(choice)
    return prompts, f"{len(prompts)} prompts from {Path(choice).name} (not the paper's)."


def fill(template: str, word_a: str, word_b: str) -> str:
    """The prompt with the two subjects' words in place."""
    return template.replace("<A>", word_a).replace("<B>", word_b)


def batch_template(template: str) -> str:
    """The template in the batch runner's form (`{A}`, `{B}`)."""
    return template.replace("<A>", "{A}").replace("<B>", "{B}")
