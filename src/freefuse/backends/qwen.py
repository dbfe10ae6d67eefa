"""What Z-Image and FLUX.2 [klein] share: a Qwen3 text encoder reading the prompt inside Qwen's
chat template, and the rotary embedding both apply to queries and keys.

The text tokens a joint attention sees are those of the templated prompt
(`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n…`), so an activation word's
positions are its tokens' positions in that text. `ChatPromptTokenizer` gives them: it wraps the
pipeline's tokenizer, puts a prompt in the template as the pipeline does, and maps the token
offsets back onto the prompt, so `freefuse.tokens.find_word` works on it unchanged.
"""

from __future__ import annotations

import torch

# A stand-in for the prompt while the template is rendered once to find what comes before and after.
_MARK = "\x00freefuse-prompt\x00"


class ChatPromptTokenizer:
    """A tokenizer that encodes a prompt as the pipeline does: inside the chat template.

    `tokenizer(prompt, add_special_tokens=True, ...)` tokenizes the templated prompt; offsets of
    the template's own tokens are empty (`(0, 0)` before the prompt, `(len, len)` after it) and the
    prompt's tokens keep their offsets in `prompt`. With `add_special_tokens=False` the bare prompt
    is tokenized. Everything else is the wrapped tokenizer's.

    Args:
        tokenizer: the pipeline's Qwen tokenizer (a fast tokenizer with a chat template).
        template_options: what the pipeline passes to `apply_chat_template` (`enable_thinking`).
    """

    def __init__(self, tokenizer, **template_options) -> None:
        self.tokenizer = tokenizer
        self.template_options = template_options

    def __getattr__(self, name: str):
        if name == "tokenizer":  # not set yet (copy, pickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def template(self, prompt: str) -> str:
        """The text the pipeline encodes for `prompt`."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            **self.template_options,
        )

    def _around(self, prompt: str) -> tuple[str, str]:
        """The template's text before and after the prompt."""
        marked = self.template(_MARK)
        if marked.count(_MARK) != 1:
            raise ValueError(
                "The tokenizer's chat template does not hold the prompt once; it cannot be used."
            )
        before, after = marked.split(_MARK)
        if before + prompt + after != self.template(prompt):
            raise ValueError(
                "The tokenizer's chat template changes the prompt's text; word positions cannot be read."
            )
        return before, after

    def __call__(
        self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False, **options
    ):
        if not add_special_tokens:
            return self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=return_offsets_mapping, **options
            )
        before, after = self._around(text)
        encoding = self.tokenizer(
            before + text + after, return_offsets_mapping=return_offsets_mapping, **options
        )
        if return_offsets_mapping:
            start, end = len(before), len(before) + len(text)
            encoding["offset_mapping"] = [
                (min(max(s, start), end) - start, min(max(e, start), end) - start)
                for s, e in encoding["offset_mapping"]
            ]
        return encoding


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as complex numbers: `x` `[B, S, heads, D]` times `freqs` `[B, S, D/2]`
    (complex), consecutive pairs of `x` being a number's real and imaginary parts; computed in
    float32 and returned in `x`'s dtype (Z-Image's attention processor does the same)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)
