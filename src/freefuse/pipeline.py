"""The two-stage FreeFuse run on top of a diffusers pipeline.

    ff = FreeFuse(pipeline)
    ff.add_lora("alice.safetensors", words=["Alice"])
    ff.add_lora("bob.safetensors", words=["Bob"])
    out = ff("Alice hugging Bob in the snow", seed=42)
    out.images[0], out.masks[0], out.manifest

Stage 1: the first `mask_step` steps run as plain joint multi-LoRA inference; during the last of
them one block's queries/keys are tapped, x0 is predicted and previewed, and `freefuse.core`
turns them into one mask per subject. Stage 2: the remaining steps continue the same trajectory
with every subject LoRA's delta masked per token. Nothing is recomputed.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .backends import backend_for
from .baselines import get_method
from .core import MaskResult, MaskSet, NonFiniteError, load_mask_image, masks_from_attention
from .lora import (
    RENAMED_LAYOUTS,
    AdapterMask,
    LoraFileError,
    LoraMasker,
    check_lora_fits,
    read_lora_file,
    renamed_state_dict,
    to_diffusers_layout,
)
from .settings import GenerationSettings
from .tokens import WordNotFoundError, find_word, truncation_note

SCOPES = ("subject", "global")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class FreeFuseWarning(UserWarning):
    """Something in a run fell back to a stated behaviour (also recorded in the manifest)."""


class NumericalError(RuntimeError):
    """The model produced NaN or inf values; the image would be black, so none is returned."""


@dataclass
class Subject:
    """A LoRA that FreeFuse controls, keyed by its PEFT adapter name.

    Attributes:
        name: PEFT adapter name.
        words: activation words (may be several words or tokens each).
        weight: LoRA strength (PEFT adapter weight).
        scope: "subject" (masked) or "global" (style/background LoRA, never masked).
        path, sha256, layout: where the file came from, when it came from a file.
        metadata_words: trigger words found in the file's metadata.
    """

    name: str
    words: list[str]
    weight: float = 1.0
    scope: str = "subject"
    path: str | None = None
    sha256: str | None = None
    layout: str | None = None
    metadata_words: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "words": list(self.words),
            "weight": self.weight,
            "scope": self.scope,
            "path": self.path,
            "sha256": self.sha256,
            "layout": self.layout,
        }


@dataclass
class FreeFuseOutput:
    """Result of a run. One entry per image in `images` and `masks` (None where no masks were used)."""

    images: list
    masks: list[MaskSet | None]
    manifest: dict
    previews: list[np.ndarray | None] = field(default_factory=list)
    # Per image, {subject: {"cross": [h, w], "refined": [h, w]}}: the stage-1 maps masks were voted from.
    attention: list[dict | None] = field(default_factory=list)


MaskInput = MaskSet | dict | Sequence | None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"LoRA name {name!r} is not usable as an adapter name; use 1-64 letters, digits, '_', '-' or '.'."
        )
    return name


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ValueError(f"LoRA weight must be a finite number, got {weight!r}.")
    return float(weight)


def _check_words(words, name: str) -> list[str]:
    if words is None:
        return []
    if isinstance(words, str):
        words = [words]
    cleaned = [str(word).strip() for word in words]
    if any(not word for word in cleaned):
        raise ValueError(f"LoRA {name!r} has an empty activation word; pass words like ['ohwx'].")
    return cleaned


class FreeFuse:
    """Several subject LoRAs in one image, each kept to its own subject.

    Args:
        pipeline: a loaded diffusers pipeline (FLUX.1: `FluxPipeline`).
        backend: backend name; default: detected from the pipeline.
    """

    def __init__(self, pipeline, backend: str | None = None) -> None:
        self.pipeline = pipeline
        self.backend = backend_for(pipeline, backend)
        self.subjects: dict[str, Subject] = {}

    # -- LoRAs -------------------------------------------------------------------------------------
    def add_lora(
        self,
        path: str | Path,
        words: Sequence[str] | str | None = None,
        name: str | None = None,
        weight: float = 1.0,
        scope: str = "subject",
    ) -> Subject:
        """Load a `.safetensors` LoRA (any layout diffusers converts) as a PEFT adapter.

        `words` default to the trigger words in the file's metadata (see `freefuse inspect`).
        """
        if scope not in SCOPES:
            raise ValueError(f"Unknown scope {scope!r}; use 'subject' (masked) or 'global' (never masked).")
        weight = _check_weight(weight)
        path = Path(path)
        name = _check_name(name or re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:64] or "lora")
        words = _check_words(words, name)
        self._check_new_name(name)
        lora = read_lora_file(path)
        for subject in self.subjects.values():
            if subject.sha256 == lora.sha256:
                raise LoraFileError(
                    f"{path} is the same file as LoRA {subject.name!r} ({subject.path}); add it once."
                )
        converted, _ = to_diffusers_layout(lora, type(self.pipeline))
        check_lora_fits(converted, self.pipeline.transformer, source=path.name)
        # diffusers reads the file itself where it can, so that the LoRA's own scale (alpha and
        # rank patterns in the header metadata) is kept; renamed layouts go in as tensors.
        source = renamed_state_dict(lora) if lora.layout in RENAMED_LAYOUTS else str(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no LoRA keys for the text encoder" and the like
                self.pipeline.load_lora_weights(source, adapter_name=name, use_safetensors=True)
        except BaseException:
            if name in (getattr(self.pipeline.transformer, "peft_config", None) or {}):
                self.pipeline.delete_adapters(name)  # nothing half-loaded stays behind
            raise
        subject = Subject(
            name=name,
            words=words or lora.trigger_words,
            weight=weight,
            scope=scope,
            path=str(path),
            sha256=lora.sha256,
            layout=lora.layout,
            metadata_words=lora.trigger_words,
        )
        self.subjects[name] = subject
        return subject

    def use_adapter(
        self,
        name: str,
        words: Sequence[str] | str | None = None,
        weight: float = 1.0,
        scope: str = "subject",
        source: Subject | None = None,
    ) -> Subject:
        """Control a LoRA already loaded into the transformer as PEFT adapter `name`.

        `source`: the Subject the adapter was loaded as (by `add_lora` on another FreeFuse over the
        same pipeline); its file path, hash, layout and metadata words go into this run's manifest,
        and its metadata words are the default `words`.
        """
        if scope not in SCOPES:
            raise ValueError(f"Unknown scope {scope!r}; use 'subject' (masked) or 'global' (never masked).")
        present = sorted(getattr(self.pipeline.transformer, "peft_config", {}) or {})
        if name not in present:
            raise ValueError(f"The transformer has no adapter {name!r}; loaded adapters are {present}.")
        if name in self.subjects:
            raise ValueError(f"Adapter {name!r} is already added.")
        subject = Subject(
            name=name,
            words=_check_words(words, name) or (source.metadata_words if source else []),
            weight=_check_weight(weight),
            scope=scope,
        )
        if source is not None:
            subject.path, subject.sha256 = source.path, source.sha256
            subject.layout, subject.metadata_words = source.layout, list(source.metadata_words)
        self.subjects[name] = subject
        return subject

    def remove(self, name: str) -> None:
        """Forget a LoRA and delete its adapter from the pipeline."""
        if name not in self.subjects:
            raise ValueError(f"No LoRA named {name!r}; added: {sorted(self.subjects)}.")
        subject = self.subjects.pop(name)
        if subject.path is not None:
            self.pipeline.delete_adapters(name)

    def _check_new_name(self, name: str) -> None:
        if name in self.subjects:
            raise ValueError(f"A LoRA named {name!r} is already added; give each LoRA its own name.")
        present = getattr(self.pipeline.transformer, "peft_config", {}) or {}
        if name in present:
            raise ValueError(
                f"The transformer already has an adapter {name!r}; pick another name or `use_adapter`."
            )

    # -- running ---------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        masks: MaskInput = None,
        callback: Callable | None = None,
        progress: bool = True,
        output_type: str = "pil",
        **settings,
    ) -> FreeFuseOutput:
        """Generate. Keyword settings are those of `GenerationSettings` (seed, height, method, ...)."""
        return self.generate(
            GenerationSettings(prompt=prompt, **settings),
            masks=masks,
            callback=callback,
            progress=progress,
            output_type=output_type,
        )

    def masks(self, prompt: str | list[str], progress: bool = True, **settings) -> FreeFuseOutput:
        """Stage 1 only: run up to `mask_step`, return the masks and the x0 images they were read from."""
        settings.setdefault("method", "freefuse")
        return self.generate(
            GenerationSettings(prompt=prompt, **settings), progress=progress, stop_after_masks=True
        )

    def check_inputs(self, settings: GenerationSettings, masks: MaskInput = None) -> list[str]:
        """Every check that needs the model but no denoising; returns warnings."""
        notes = settings.validate(self.backend.size_multiple)
        method = get_method(settings.method)
        if not self.subjects:
            raise ValueError("No LoRA added; call `add_lora(path, words=[...])` (or `use_adapter`) first.")
        block = self.backend.default_block() if settings.block is None else settings.block
        if not 0 <= block < self.backend.num_blocks:
            raise ValueError(
                f"`block` {block} is out of range: this model has {self.backend.num_blocks} double-stream blocks "
                f"(0..{self.backend.num_blocks - 1})."
            )
        if settings.max_sequence_length > self.backend.max_sequence_length:
            raise ValueError(
                f"`max_sequence_length` must be <= {self.backend.max_sequence_length} for this model."
            )
        subjects = self._masked_subjects(method)
        if method.needs_words:
            if not subjects:
                raise ValueError("method='freefuse' needs at least one LoRA with scope='subject'.")
            for subject in subjects:
                if not subject.words:
                    raise ValueError(
                        f"LoRA {subject.name!r} has no activation words and none in its metadata; pass "
                        f"words=[...] (CLI: --lora PATH=WORD)."
                    )
        grid = self.backend.grid(settings.height, settings.width)
        if method.needs_words and len(subjects) > grid[0] * grid[1]:
            raise ValueError(
                f"{len(subjects)} subjects but only {grid[0] * grid[1]} image tokens at {settings.width}x"
                f"{settings.height}; use fewer subjects or a larger image."
            )
        if method.user_masks and masks is None:
            raise ValueError("method='masks' needs `masks` (one mask per subject LoRA).")
        if method.user_masks and not subjects:
            raise ValueError(
                "method='masks' needs at least one LoRA with scope='subject' to apply the masks to."
            )
        for prompt in settings.prompts:
            note = truncation_note(self.backend.tokenizer, prompt, settings.max_sequence_length)
            if note:
                notes.append(note)
        return notes

    def _masked_subjects(self, method) -> list[Subject]:
        if not method.masks_loras:
            return []
        return [s for s in self.subjects.values() if s.scope == "subject"]

    def _positions(
        self, prompts: list[str], subjects: list[Subject], max_length: int, required: bool, notes: list[str]
    ) -> list[dict[str, list[int]]]:
        """For each image, {subject name: token positions of its activation words}.

        A subject none of whose words are in a prompt is absent from that image. With `required`, a
        subject absent from every prompt is an error that shows the prompt's tokens.
        """
        tokenizer = self.backend.tokenizer
        per_image: list[dict[str, list[int]]] = [{} for _ in prompts]
        for subject in subjects:
            first_error: WordNotFoundError | None = None
            for index, prompt in enumerate(prompts):
                found: set[int] = set()
                missing = []
                for word in subject.words:
                    try:
                        found.update(find_word(tokenizer, prompt, word, max_length).positions)
                    except WordNotFoundError as error:
                        first_error = first_error or error
                        missing.append(word)
                if found:
                    per_image[index][subject.name] = sorted(found)
                    if missing:
                        notes.append(
                            f"image {index}: words {missing} of LoRA {subject.name!r} are not in the prompt."
                        )
            if required and subject.words and not any(subject.name in image for image in per_image):
                raise WordNotFoundError(f"LoRA {subject.name!r}: {first_error}")
        return per_image

    def generate(
        self,
        settings: GenerationSettings,
        masks: MaskInput = None,
        callback: Callable | None = None,
        progress: bool = True,
        output_type: str = "pil",
        stop_after_masks: bool = False,
    ) -> FreeFuseOutput:
        """Run one generation (a batch of images). `callback(step, total, info)` is called after each step.

        With `stop_after_masks`, stop once stage 1 has made the masks; `images` are then the decoded
        x0 predictions of that step (what the superpixels were cut from).
        """
        started = time.perf_counter()
        # 1. Check inputs
        notes = self.check_inputs(settings, masks)
        method = get_method(settings.method)
        if stop_after_masks and not method.reads_attention:
            raise ValueError(
                f"Only methods that read attention make masks; method={settings.method!r} does not."
            )
        backend = self.backend
        prompts, seeds = settings.image_prompts, settings.image_seeds
        batch = len(prompts)
        height, width, steps = settings.height, settings.width, settings.num_inference_steps
        grid = backend.grid(height, width)
        n_tokens = grid[0] * grid[1]
        block = backend.default_block() if settings.block is None else settings.block
        mask_step = settings.resolved_mask_step
        masked = self._masked_subjects(method)
        names = [s.name for s in masked]

        # 2. Activation words -> token positions, per image
        max_length = settings.max_sequence_length
        positions = self._positions(prompts, masked, max_length, method.needs_words, notes)
        for index, found in enumerate(positions):
            for subject in masked:
                if method.needs_words and subject.name not in found:
                    notes.append(
                        f"image {index}: LoRA {subject.name!r} is off after the mask step (its words are not in "
                        "this prompt; the steps before run every LoRA jointly)."
                    )
        negative_positions = None
        if settings.negative_prompt and settings.true_cfg_scale > 1:
            negative_positions = self._positions(
                [settings.negative_prompt] * batch, masked, max_length, False, []
            )

        # 3. Subject masks given by the caller
        image_masks: torch.Tensor | None = None  # [B, L, N] on the token grid
        mask_sets: list[MaskSet | None] = [None] * batch
        if method.user_masks:
            mask_sets = self._user_masks(masks, masked, batch, (height, width), grid)
            image_masks = torch.stack(
                [m.to_token_grid(grid).reshape(len(names), n_tokens) for m in mask_sets]
            )

        self.pipeline.set_adapters(
            list(self.subjects), adapter_weights=[s.weight for s in self.subjects.values()]
        )
        device = backend.device
        timings: dict[str, float] = {}
        previews: list[np.ndarray | None] = [None] * batch
        attention: list[dict | None] = [None] * batch
        fallbacks: list[list[str]] = [[] for _ in range(batch)]
        masker = LoraMasker(self.pipeline.transformer, names, backend.token_layout)

        with torch.inference_mode(), masker.installed():
            # 4. Encode prompts
            tick = time.perf_counter()
            conditioning = backend.encode(prompts, settings.max_sequence_length)
            negative = None
            if negative_positions is not None:
                negative = backend.encode([settings.negative_prompt] * batch, settings.max_sequence_length)
            n_text = conditioning.prompt_embeds.shape[1]
            timings["encode_s"] = time.perf_counter() - tick

            # 5. Noise, one generator per image seed
            latents, image_ids = backend.prepare_latents(
                seeds, height, width, conditioning.prompt_embeds.dtype
            )
            # 6. Timesteps
            timesteps, sigmas = backend.timesteps(steps, height, width)

            def pass_masks(text_positions: list[dict] | None) -> dict[str, AdapterMask] | None:
                if image_masks is None:
                    return None
                return self._adapter_masks(
                    names, image_masks, text_positions, n_text, settings.text_scope, device
                )

            cond_masks = uncond_masks = None
            step_times = []
            # 7. Denoising loop: plain joint steps, the capture step, then masked steps
            bar = self.pipeline.progress_bar(total=steps) if progress else None
            try:
                for i, t in enumerate(timesteps):
                    tick = time.perf_counter()
                    capture_now = method.reads_attention and i == mask_step - 1
                    if cond_masks is None and image_masks is not None:
                        cond_masks = pass_masks(positions)
                        uncond_masks = pass_masks(negative_positions) if negative is not None else None
                    masker.set_masks(cond_masks)
                    if capture_now:
                        with backend.capture(block) as tap:
                            velocity = backend.predict(
                                latents, t, conditioning, settings.guidance_scale, image_ids
                            )
                    else:
                        velocity = backend.predict(
                            latents, t, conditioning, settings.guidance_scale, image_ids
                        )
                    if negative is not None:
                        masker.set_masks(uncond_masks)
                        negative_velocity = backend.predict(
                            latents, t, negative, settings.guidance_scale, image_ids
                        )
                        velocity = negative_velocity + settings.true_cfg_scale * (
                            velocity - negative_velocity
                        )
                    if capture_now:
                        stage1 = time.perf_counter()
                        x0 = backend.predict_x0(latents, velocity, sigmas[i])
                        image_masks, mask_sets, previews, attention = self._stage1(
                            tap.result(), x0, positions, masked, settings, grid, fallbacks
                        )
                        cond_masks = None  # rebuilt from the new masks before the next step
                        timings["stage1_s"] = time.perf_counter() - stage1
                        if stop_after_masks:
                            latents = x0
                            step_times.append(time.perf_counter() - tick)
                            if bar is not None:
                                bar.update()
                            if callback is not None:
                                callback(i + 1, steps, {"latents": latents, "masks": mask_sets})
                            break
                    latents = backend.step(velocity, t, latents)
                    step_times.append(time.perf_counter() - tick)
                    if bar is not None:
                        bar.update()
                    if callback is not None:
                        callback(
                            i + 1, steps, {"latents": latents, "masks": mask_sets if capture_now else None}
                        )
            finally:
                if bar is not None:
                    bar.close()
            timings["denoise_s"] = sum(step_times)
            timings["step_s"] = step_times

            # 8. Decode
            tick = time.perf_counter()
            images = self._decode(latents, height, width, output_type)
            timings["decode_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started

        for note in notes + [msg for image in fallbacks for msg in image]:
            warnings.warn(note, FreeFuseWarning, stacklevel=2)
        from .manifest import build_manifest

        manifest = build_manifest(
            self,
            settings,
            block=block,
            positions=positions,
            mask_sets=mask_sets,
            fallbacks=fallbacks,
            notes=notes,
            timings=timings,
            masks_source=masks,
        )
        return FreeFuseOutput(
            images=images, masks=mask_sets, manifest=manifest, previews=previews, attention=attention
        )

    # -- stage pieces ----------------------------------------------------------------------------
    def _adapter_masks(self, names, image_masks, text_positions, n_text, text_scope, device):
        """Per-adapter token masks for one forward pass (cond or uncond).

        Args:
            image_masks: `[B, L, N]`; a NaN row means no mask in that image (the LoRA acts everywhere).
            text_positions: per image, {subject: token positions} in the text of this pass, or None.

        A subject with an all-zero image mask gets an all-zero text mask too: its LoRA is off there.
        """
        batch = image_masks.shape[0]
        result = {}
        for index, name in enumerate(names):
            image = image_masks[:, index].clone()
            text = torch.ones(batch, n_text)
            for b in range(batch):
                if torch.isnan(image[b]).any():
                    image[b] = 1.0
                elif not image[b].any():
                    text[b] = 0.0
                elif text_scope == "exclude-others" and text_positions is not None:
                    for other, tokens in text_positions[b].items():
                        if other != name:
                            text[b, [t for t in tokens if t < n_text]] = 0.0
            result[name] = AdapterMask(image=image.to(device), text=text.to(device))
        return result

    def _stage1(self, captured, x0, positions, subjects, settings, grid, fallbacks):
        """Masks for every image from the tapped attention.

        Returns `[B, L, N]` token masks, mask sets, previews and the stage-1 maps per image.
        """
        batch = x0.shape[0]
        names = [s.name for s in subjects]
        height, width = settings.height, settings.width
        previews = self.backend.preview(x0, height, width, settings.preview)
        image_masks = torch.zeros(batch, len(names), grid[0] * grid[1])
        mask_sets: list[MaskSet | None] = []
        attention: list[dict | None] = [None] * batch
        for b in range(batch):
            active = [name for name in names if name in positions[b]]
            full = torch.zeros(len(names), height, width)
            if not active:
                mask_sets.append(MaskSet(names, full))
                continue
            try:
                result: MaskResult = masks_from_attention(
                    captured.q_text[b].cpu(),
                    captured.q_img[b].cpu(),
                    captured.k_img[b].cpu(),
                    [positions[b][name] for name in active],
                    grid,
                    image=previews[b],
                    config=settings.mask_config,
                    image_size=(height, width),
                )
            except NonFiniteError as error:
                what = "x0 preview" if error.argument == "image" else "attention capture"
                fallbacks[b].append(
                    f"image {b}: the {what} has NaN/inf values ({error}); every LoRA acts on the whole "
                    "image for the remaining steps (same as method='merge')."
                )
                image_masks[b] = float("nan")
                mask_sets.append(None)
                continue
            fallbacks[b].extend(f"image {b}: {note}" for note in result.notes)
            attention[b] = {
                name: {"cross": result.cross_maps[slot], "refined": result.maps[slot]}
                for slot, name in enumerate(active)
            }
            hard = result.image_masks.float()[None]
            hard = torch.nn.functional.interpolate(hard, size=(height, width), mode="nearest-exact")[0]
            for slot, name in enumerate(active):
                index = names.index(name)
                image_masks[b, index] = result.token_masks[slot].reshape(-1)
                full[index] = hard[slot]
            for slot in result.empty:
                name = active[slot]
                index = names.index(name)
                if settings.empty_mask == "global":
                    image_masks[b, index] = float("nan")
                    full[index] = 1.0
                    what = "acts on the whole image (empty_mask='global')"
                else:
                    what = "is off in this image (empty_mask='off')"
                fallbacks[b].append(f"image {b}: LoRA {name!r} won no region of the image; it {what}.")
            mask_sets.append(MaskSet(names, full.clamp(0, 1)))
        return image_masks, mask_sets, list(previews), attention

    def _user_masks(self, masks: MaskInput, subjects, batch, size, grid) -> list[MaskSet]:
        """Caller's masks → one MaskSet per image, names in subject order, at image size."""
        names = [s.name for s in subjects]
        sets = (
            list(masks)
            if isinstance(masks, list | tuple) and masks and isinstance(masks[0], MaskSet)
            else [masks]
        )
        if len(sets) not in (1, batch):
            raise ValueError(f"{len(sets)} mask sets for {batch} images; give one set, or one per image.")
        result = []
        for mask_set in sets:
            result.append(self._one_mask_set(mask_set, names, size, grid))
        return result * batch if len(result) == 1 else result

    def _one_mask_set(self, masks, names, size, grid) -> MaskSet:
        if isinstance(masks, str | Path):
            masks = MaskSet.load(masks)
        if isinstance(masks, MaskSet):
            missing = [name for name in names if name not in masks.names]
            if missing:
                raise ValueError(f"The mask set has no mask for {missing}; it has {masks.names}.")
            tensors = [masks[name] for name in names]
        elif isinstance(masks, dict):
            missing = [name for name in names if name not in masks]
            if missing:
                raise ValueError(f"`masks` has no mask for {missing}; give one per subject LoRA: {names}.")
            tensors = [masks[name] for name in names]
        elif isinstance(masks, list | tuple):
            if len(masks) != len(names):
                raise ValueError(f"{len(masks)} masks for {len(names)} subject LoRAs {names}; give one each.")
            tensors = list(masks)
        else:
            raise ValueError(
                "`masks` must be a MaskSet, a dict name → mask, or a list with one mask per subject."
            )
        loaded = []
        for name, mask in zip(names, tensors, strict=True):
            if isinstance(mask, str | Path):
                mask = load_mask_image(mask)
            elif isinstance(mask, Image.Image):
                mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
            mask = torch.as_tensor(mask, dtype=torch.float32)
            if mask.ndim == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if mask.ndim != 2 or tuple(mask.shape) not in (tuple(size), tuple(grid)):
                raise ValueError(
                    f"Mask for {name!r} has shape {tuple(mask.shape)}; it must be the image size "
                    f"{size[0]}x{size[1]} (H x W) or the token grid {grid[0]}x{grid[1]}."
                )
            if not torch.isfinite(mask).all():
                raise ValueError(f"Mask for {name!r} has NaN or inf values.")
            if tuple(mask.shape) != tuple(size):
                mask = torch.nn.functional.interpolate(
                    mask[None, None], size=tuple(size), mode="nearest-exact"
                )[0, 0]
            loaded.append(mask.clamp(0, 1))
        return MaskSet(names, torch.stack(loaded))

    def _decode(self, latents, height, width, output_type):
        bad = [index for index, image in enumerate(latents) if not torch.isfinite(image).all()]
        if bad:
            raise NumericalError(
                f"The model produced NaN/inf values for image(s) {bad} (often float16 overflow); no image is "
                f"written. Use --dtype bfloat16 or float32 (dtype now {str(latents.dtype).removeprefix('torch.')})."
            )
        if output_type == "latent":
            return list(latents)
        images = self.backend.decode(latents, height, width)
        if output_type == "pt":
            return list(images.cpu())
        if output_type == "np":
            return list(images.permute(0, 2, 3, 1).cpu().numpy())
        if output_type == "pil":
            pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
            return [Image.fromarray(p) for p in pixels]
        raise ValueError(f"Unknown output_type {output_type!r}; use 'pil', 'np', 'pt' or 'latent'.")


__all__ = ["FreeFuse", "FreeFuseOutput", "FreeFuseWarning", "NumericalError", "Subject"]
