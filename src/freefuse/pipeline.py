"""The two-stage FreeFuse run on top of a diffusers pipeline.

    ff = FreeFuse(pipeline)
    ff.add_lora("alice.safetensors", words=["Alice"])
    ff.add_lora("bob.safetensors", words=["Bob"])
    out = ff("Alice hugging Bob in the snow", seed=42)
    out.images[0], out.masks[0], out.manifest

Stage 1: the first `mask_step` steps run as plain joint multi-LoRA inference; during the last of
them one block's queries/keys are tapped, x0 is predicted and previewed, and `freefuse.core`
turns them into one mask per subject. Stage 2: the remaining steps continue the same trajectory
with every subject LoRA's delta masked per token. Nothing is recomputed. What differs between
`merge`, `masks` and `freefuse` lives in `freefuse.methods`; what differs between architectures
lives in `freefuse.backends`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attention_bias import AttentionBiaser, PassBias, pass_bias
from .backends import Conditioning, backend_for
from .backends.base import CapturedAttention, PassName, flat_controlnets
from .conditions import ConditionFacts, Conditions, has_reference, inpaint_region, loaded_controlnet_facts
from .core import BiasConfig, MaskSet
from .embeddings import InstalledEmbeddings, check_embeddings
from .embeddings import install as install_embeddings
from .embeddings import uninstall as uninstall_embeddings
from .errors import EmbeddingError, NumericalError
from .lora import (
    LoraFileError,
    adapter_name,
    check_adapter_name,
    check_lora_weight,
    read_lora_file,
    text_encoder_parts,
)
from .manifest import ModelSource, build_manifest
from .masking import AdapterMask, LoraMasker, adapters_for_run, is_compiled, pass_masks
from .methods import MaskInput, RunContext, SubjectMasks, get_method
from .preflight import MaskFacts, ModelFacts, SubjectFacts, preflight
from .settings import GenerationSettings, check_text

SCOPES = ("subject", "global")
# What `callback_on_step_end` may ask for, as in diffusers' `_callback_tensor_inputs`.
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class FreeFuseWarning(UserWarning):
    """Something in a run fell back to a stated behaviour (also recorded in the manifest)."""


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
        owned: this FreeFuse loaded the adapter (so `remove` deletes it); False for `use_adapter`.
        text_encoders: text encoders the file also adapts; those parts act on the whole prompt of
            every image (a masked LoRA's text-encoder part is not masked).
        embeddings: trigger-word embeddings the file bundled and `add_lora` put into the text
            encoders ("placeholder/encoder"); like text-encoder parts, they act on the whole prompt.
    """

    name: str
    words: list[str]
    weight: float = 1.0
    scope: str = "subject"
    path: str | None = None
    sha256: str | None = None
    layout: str | None = None
    metadata_words: list[str] = field(default_factory=list)
    owned: bool = False
    text_encoders: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)

    def facts(self) -> SubjectFacts:
        """What `freefuse.preflight` checks of this LoRA."""
        return SubjectFacts(
            name=self.name,
            words=tuple(self.words),
            scope=self.scope,
            bundled=tuple(tuple(item.rsplit("/", 1)) for item in self.embeddings),
            text_encoders=tuple(self.text_encoders),
            source=Path(self.path).name if self.path else None,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "words": list(self.words),
            "weight": self.weight,
            "scope": self.scope,
            "path": self.path,
            "sha256": self.sha256,
            "layout": self.layout,
            **({"text_encoders_unmasked": list(self.text_encoders)} if self.text_encoders else {}),
            **({"bundled_embeddings": list(self.embeddings)} if self.embeddings else {}),
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


def _check_weight(weight) -> float:
    try:
        return check_lora_weight(weight)
    except ValueError as error:
        raise ValueError(f"LoRA {error}") from None


def _check_words(words, name: str) -> list[str]:
    if words is None:
        return []
    if isinstance(words, str):
        words = [words]
    cleaned = [check_text(str(word), f"words of LoRA {name!r}", limit=None).strip() for word in words]
    if any(not word for word in cleaned):
        raise ValueError(f"LoRA {name!r} has an empty activation word; pass words like ['ohwx'].")
    return cleaned


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; use 'subject' (masked) or 'global' (never masked).")
    return scope


class FreeFuse:
    """Several subject LoRAs in one image, each kept to its own subject.

    Args:
        pipeline: a loaded diffusers pipeline (FLUX.1: `FluxPipeline`).
        backend: backend name; default: detected from the pipeline.
        source: where the pipeline came from when its folders do not say (a single-file
            checkpoint and its base), for the manifest.
    """

    def __init__(self, pipeline, backend: str | None = None, source: ModelSource | None = None) -> None:
        self.pipeline = pipeline
        self.backend = backend_for(pipeline, backend)
        self.source = source
        self.subjects: dict[str, Subject] = {}
        self._embeddings: dict[str, InstalledEmbeddings] = {}

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
        _check_scope(scope)
        weight = _check_weight(weight)
        path = Path(path)
        name = check_adapter_name(name or adapter_name(path))
        words = _check_words(words, name)
        self._check_new_name(name)
        lora = read_lora_file(path)
        for subject in self.subjects.values():
            if subject.sha256 == lora.sha256:
                raise LoraFileError(
                    f"{path} is the same file as LoRA {subject.name!r} ({subject.path}); add it once."
                )
        slots = self.backend.architecture.embedding_slots
        try:
            check_embeddings(lora.embeddings, slots, self.pipeline, path.name, self._bundled_words())
        except EmbeddingError as error:
            raise LoraFileError(str(error)) from None
        self.backend.load_lora(lora, name)
        try:
            installed = install_embeddings(lora.embeddings, slots, self.pipeline)
        except BaseException:
            self.pipeline.delete_adapters(name)
            raise
        if installed.names:
            self._embeddings[name] = installed
        subject = Subject(
            name=name,
            words=words or lora.trigger_words,
            weight=weight,
            scope=scope,
            path=str(path),
            sha256=lora.sha256,
            layout=lora.layout,
            metadata_words=lora.trigger_words,
            owned=True,
            text_encoders=text_encoder_parts(lora.state_dict),
            embeddings=installed.names,
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
        """Control a LoRA already loaded into the denoiser as PEFT adapter `name` (borrowed: `remove`
        forgets it but leaves the adapter in the pipeline).

        `source`: the Subject the adapter was loaded as (by `add_lora` on another FreeFuse over the
        same pipeline); its file path, hash, layout and metadata words go into this run's manifest,
        and its metadata words are the default `words`.
        """
        _check_scope(scope)
        present = sorted(getattr(self.backend.denoiser, "peft_config", {}) or {})
        if name not in present:
            raise ValueError(f"The model has no adapter {name!r}; loaded adapters are {present}.")
        if name in self.subjects:
            raise ValueError(f"Adapter {name!r} is already added.")
        subject = Subject(
            name=name,
            words=_check_words(words, name) or (list(source.metadata_words) if source else []),
            weight=_check_weight(weight),
            scope=scope,
        )
        if source is not None:
            subject.path, subject.sha256 = source.path, source.sha256
            subject.layout, subject.metadata_words = source.layout, list(source.metadata_words)
            subject.text_encoders, subject.embeddings = list(source.text_encoders), list(source.embeddings)
        self.subjects[name] = subject
        return subject

    def set_weight(self, name: str, weight: float) -> None:
        """Change a LoRA's strength for the next runs (the pipeline's own adapter weights are untouched)."""
        if name not in self.subjects:
            raise ValueError(f"No LoRA named {name!r}; added: {sorted(self.subjects)}.")
        self.subjects[name].weight = _check_weight(weight)

    def remove(self, name: str) -> None:
        """Forget a LoRA; delete its adapter from the pipeline if this FreeFuse loaded it."""
        if name not in self.subjects:
            raise ValueError(f"No LoRA named {name!r}; added: {sorted(self.subjects)}.")
        subject = self.subjects.pop(name)
        installed = self._embeddings.pop(name, None)
        if installed is not None:
            uninstall_embeddings(installed, self.pipeline)
        if subject.owned:
            self.pipeline.delete_adapters(name)

    def _bundled_words(self) -> dict[str, str]:
        """Placeholder → who set its embedding: this FreeFuse's LoRAs, and tokens another FreeFuse
        over the same pipeline added to its tokenizers (read from the tokenizers themselves)."""
        taken = {
            item.rsplit("/", 1)[0]: f"LoRA {name!r}"
            for name, installed in self._embeddings.items()
            for item in installed.names
        }
        for tokenizer_name, _ in self.backend.architecture.embedding_slots.values():
            tokenizer = getattr(self.pipeline, tokenizer_name, None)
            for token in getattr(tokenizer, "get_added_vocab", dict)():
                if token not in taken and token not in getattr(tokenizer, "all_special_tokens", ()):
                    taken[token] = "a LoRA loaded by another FreeFuse over this pipeline"
        return taken

    def _check_new_name(self, name: str) -> None:
        if name in self.subjects:
            raise ValueError(f"A LoRA named {name!r} is already added; give each LoRA its own name.")
        present = getattr(self.backend.denoiser, "peft_config", {}) or {}
        if name in present:
            raise ValueError(
                f"The model already has an adapter {name!r}; pick another name or `use_adapter`."
            )

    # -- running ---------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        masks: MaskInput = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        progress: bool = True,
        output_type: str = "pil",
        conditions: Conditions | None = None,
        controlnet: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
        redux=None,
        **settings: Any,
    ) -> FreeFuseOutput:
        """Generate. Keyword settings are `GenerationSettings` fields (seed, height, method, ...).

        `generator`, `latents` and `callback_on_step_end` work as in diffusers pipelines: a
        generator (or one per image) for the noise instead of `seed`, initial latents instead of
        noise, and `callback_on_step_end(freefuse, step_index, timestep, callback_kwargs)` after each
        step, whose returned dict may replace `latents`. `conditions`: an init image and
        `strength`, an inpainting mask, control images, an IP-Adapter or Redux reference image
        (`freefuse.Conditions.of(...)`); `controlnet`: the ControlNet model(s) the control images are
        for; `redux`: the `FluxPriorReduxPipeline` (its text encoders unused) the Redux image is for.
        """
        return self.generate(
            GenerationSettings(prompt=prompt, **settings),
            masks=masks,
            generator=generator,
            latents=latents,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            progress=progress,
            output_type=output_type,
            conditions=conditions,
            controlnet=controlnet,
            redux=redux,
        )

    def masks(
        self,
        prompt: str | list[str],
        progress: bool = True,
        conditions: Conditions | None = None,
        controlnet: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
        redux=None,
        **settings: Any,
    ) -> FreeFuseOutput:
        """Stage 1 only: run up to `mask_step`, return the masks and the x0 images they were read from."""
        settings.setdefault("method", "freefuse")
        return self.generate(
            GenerationSettings(prompt=prompt, **settings),
            progress=progress,
            stop_after_masks=True,
            conditions=conditions,
            controlnet=controlnet,
            redux=redux,
        )

    def check_inputs(
        self,
        settings: GenerationSettings,
        masks: MaskInput = None,
        conditions: Conditions | None = None,
        controlnet: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
        redux=None,
    ) -> tuple[GenerationSettings, RunContext, list[str]]:
        """Every check that needs the model but no denoising (`freefuse.preflight` with this model's facts).

        Returns the settings with the model's defaults filled in (block, token limit, guidance),
        the run's context (activation-word positions per image, the conditions with their
        strength resolved) and the notes to show.
        """
        backend = self.backend
        model = ModelFacts(
            architecture=backend.architecture,
            tokenizer=backend.tokenizer,
            size_multiple=backend.size_multiple,
            num_blocks=backend.num_blocks,
        )
        if not self.subjects:
            raise ValueError("No LoRA added; call `add_lora(path, words=[...])` (or `use_adapter`) first.")
        nets = flat_controlnets(controlnet)
        backend.check_controlnets(nets)
        sources = list(conditions.controlnets) if conditions is not None else []
        facts = None
        if conditions is not None:
            facts = ConditionFacts(
                conditions,
                [loaded_controlnet_facts(net, sources[i] if i < len(sources) else f"{i + 1}") for i, net in enumerate(nets)],
                ip_adapter=backend.has_ip_adapter,
                redux=redux is not None,
            )
        elif nets:
            raise ValueError("`controlnet` was given without control images; pass `conditions=Conditions.of(controls=[...])`.")
        elif backend.has_ip_adapter or redux is not None:  # a model waiting for a reference image
            facts = ConditionFacts(Conditions(), ip_adapter=backend.has_ip_adapter, redux=redux is not None)
        checked = preflight(
            model, settings, [s.facts() for s in self.subjects.values()], mask_facts(masks), facts
        )
        prompts = checked.settings.image_prompts
        context = RunContext(
            settings=checked.settings,
            backend=backend,
            names=checked.masked,
            positions=checked.positions,
            background=checked.background,
            grid=backend.grid(checked.settings.height, checked.settings.width),
            fallbacks=[[] for _ in prompts],
            negative_prompt=checked.negative_prompt,
            negative_positions=checked.negative_positions,
            conditions=checked.conditions,
            denoised=checked.steps if checked.steps != checked.settings.num_inference_steps else None,
        )
        return checked.settings, context, checked.notes

    def generate(
        self,
        settings: GenerationSettings,
        masks: MaskInput = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        progress: bool = True,
        output_type: str = "pil",
        stop_after_masks: bool = False,
        conditions: Conditions | None = None,
        controlnet: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
        redux=None,
    ) -> FreeFuseOutput:
        """Run one generation (a batch of images); see `__call__` for the arguments.

        With `stop_after_masks`, stop once stage 1 has made the masks; `images` are then the decoded
        x0 predictions of that step (what the superpixels were cut from).
        """
        started = time.perf_counter()
        # 1. Check inputs
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}; use one of {list(OUTPUT_TYPES)}.")
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSOR_INPUTS))
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not available; use {list(CALLBACK_TENSOR_INPUTS)}."
            )
        settings, context, notes = self.check_inputs(settings, masks, conditions, controlnet, redux)
        conditions = context.conditions
        method = get_method(settings.method)
        if stop_after_masks and not method.reads_attention:
            raise ValueError(
                f"Only methods that read attention make masks; method={settings.method!r} does not."
            )
        backend = self.backend
        batch = context.batch
        generators = self._generators(settings, generator, latents, batch, notes)

        # 2. Masks given by the caller
        subject_masks = method.initial_masks(context, masks)

        timings: dict[str, Any] = {}
        masker = LoraMasker(
            backend.denoiser,
            context.names,
            backend.token_layout,
            unmasked=[name for name in self.subjects if name not in context.names]
            if method.masks_loras
            else [],
            op=settings.lora_op,
            static=is_compiled(backend.denoiser),
        )
        bias_config = backend.architecture.attention_bias(settings)
        biaser = AttentionBiaser(
            backend.bias_sites(bias_config.blocks) if bias_config.active and method.masks_loras else []
        )
        capture_steps = method.capture_steps(settings)
        steps = settings.num_inference_steps

        run_adapters = adapters_for_run(
            self.pipeline, list(self.subjects), [s.weight for s in self.subjects.values()]
        )
        # no_grad, not inference_mode: model CPU offload moves weights during the run, and weights
        # re-made under inference_mode become inference tensors that PEFT can no longer switch
        # (`requires_grad_` on them fails in `set_adapter` afterwards).
        ip_scale = contextlib.nullcontext()
        if has_reference(conditions):
            if conditions.ip_adapter_scale is None:  # the pipeline's own, recorded as it is
                conditions = replace(conditions, ip_adapter_scale=backend.ip_adapter_scales())
            else:
                ip_scale = backend.ip_adapter_scale(conditions.ip_adapter_scale)
        with run_adapters as enabled_for_run, torch.no_grad(), masker.installed(), biaser.installed(), ip_scale:
            if enabled_for_run:
                notes.append(
                    "the pipeline's LoRA layers were disabled (`disable_lora()`); this run enabled them for its own "
                    "LoRAs and disabled them again after."
                )
            # 3. Encode prompts
            tick = time.perf_counter()
            conditioning = backend.encode(settings.image_prompts, settings.max_sequence_length)
            negative = None
            if context.negative_prompt is not None:
                negative = backend.encode_negative([context.negative_prompt] * batch, settings)
            if has_reference(conditions):
                backend.add_reference(conditioning, negative, conditions, settings.width, settings.height)
            if conditions is not None and conditions.redux is not None:
                backend.add_redux(conditioning, conditions, redux)
            timings["encode_s"] = time.perf_counter() - tick

            # 4. Timesteps (first: some schedulers scale the initial noise by their first sigma; from
            # an init image, the last `strength` share of them);
            # 5. noise, one generator per image (an init image noised, control images encoded)
            strength = None if conditions is None or conditions.init_image is None else conditions.strength
            timesteps, sigmas = backend.schedule(steps, settings.height, settings.width, strength)
            state = backend.prepare(
                generators,
                batch,
                settings.height,
                settings.width,
                conditioning.prompt_embeds.dtype,
                latents,
                conditions,
                timesteps[:1],
                flat_controlnets(controlnet),
            )
            region = inpaint_region(conditions, context.size)
            per_pass = pass_masks_of(context, subject_masks, conditioning, negative)
            per_pass_bias = pass_biases_of(context, subject_masks, conditioning, negative, bias_config)
            # Where every LoRA acts everywhere: no masks, or all-ones ones for compiled blocks.
            unmasked = pass_masks_of(context, everywhere(context) if masker.static else None, conditioning, negative)

            def switch_masks(name: PassName) -> None:
                # The masks and the attention bias of the pass about to run; none before the step they start at.
                waiting = subject_masks is not None and i < subject_masks.from_step
                masks = (unmasked if waiting else per_pass)[name]
                masker.set_masks(unmasked[name] if masks is None else masks)
                biaser.set_pass(None if waiting else per_pass_bias[name])

            step_times = []
            captured = []
            # 6. Denoising loop: plain joint steps, the capture step(s), then masked steps
            bar = self.pipeline.progress_bar(total=len(timesteps)) if progress else None
            try:
                for i, t in enumerate(timesteps):
                    tick = time.perf_counter()
                    tap_here = i in capture_steps
                    # Uncompiled: the first step (each fused layer measures its shapes) and a tapped
                    # step (the tap's hooks would change what was compiled).
                    with eager_while(masker.static and (i == 0 or tap_here)):
                        prediction, tap = backend.guided_prediction(
                            state,
                            t,
                            conditioning,
                            negative,
                            settings,
                            switch_masks,
                            settings.block if tap_here else None,
                        )
                    mask_step_here = bool(capture_steps) and i == capture_steps[-1]
                    if tap_here:
                        captured.append(tap.result().cpu())
                    if mask_step_here:
                        tick_stage1 = time.perf_counter()
                        x0 = backend.predict_x0(state.latents, prediction, float(sigmas[i]))
                        subject_masks = method.masks_from_capture(
                            context, CapturedAttention.concat(captured), x0
                        )
                        if region is not None:  # subjects only where the image is repainted
                            subject_masks = cut_to_region(subject_masks, region, context.grid)
                        captured = []
                        per_pass = pass_masks_of(context, subject_masks, conditioning, negative)
                        per_pass_bias = pass_biases_of(context, subject_masks, conditioning, negative, bias_config)
                        timings["stage1_s"] = time.perf_counter() - tick_stage1
                    stop = mask_step_here and stop_after_masks
                    state.latents = x0 if stop else backend.step(prediction, t, state.latents)
                    if state.inpainting is not None and not stop:
                        following = timesteps[i + 1] if i + 1 < len(timesteps) else None
                        state.latents = backend.keep_outside_mask(state, following)
                    step_times.append(time.perf_counter() - tick)
                    if bar is not None:
                        bar.update()
                    if callback_on_step_end is not None:
                        available = {"latents": state.latents, "prompt_embeds": conditioning.prompt_embeds}
                        returned = callback_on_step_end(
                            self, i, t, {name: available[name] for name in callback_on_step_end_tensor_inputs}
                        )
                        state.latents = (returned or {}).get("latents", state.latents)
                    if stop:
                        break
            finally:
                biaser.set_pass(None)  # the last pass's bias mask is not kept through the decode
                if bar is not None:
                    bar.close()
            timings["denoise_s"] = sum(step_times)
            timings["step_s"] = step_times

            # 7. Decode
            tick = time.perf_counter()
            images = self._decode(state.latents, settings.height, settings.width, output_type)
            timings["decode_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started

        for note in notes + [message for image in context.fallbacks for message in image]:
            warnings.warn(note, FreeFuseWarning, stacklevel=2)
        found = subject_masks or SubjectMasks(tokens={})
        mask_sets = found.sets or [None] * batch
        manifest = build_manifest(
            self,
            settings,
            positions=context.positions,
            mask_sets=mask_sets,
            fallbacks=context.fallbacks,
            notes=notes,
            timings=timings,
            masks_source=masks,
            seeds=None if generators_from_caller(generator, latents) else settings.image_seeds,
            conditions=conditions,
            controlnets=flat_controlnets(controlnet),
        )
        return FreeFuseOutput(
            images=images,
            masks=mask_sets,
            manifest=manifest,
            previews=found.previews or [None] * batch,
            attention=found.attention or [None] * batch,
        )

    # -- pieces ------------------------------------------------------------------------------------
    @staticmethod
    def _generators(
        settings: GenerationSettings,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        batch: int,
        notes: list[str],
    ) -> list[torch.Generator] | torch.Generator:
        """One CPU generator per image from `seed` (image j of a prompt: seed + j), so a seed means the
        same noise on any device and in any batch; or the caller's, used as diffusers uses it."""
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images; pass one, or one per image.")
        if latents is not None and latents.shape[0] != batch:
            raise ValueError(f"`latents` holds {latents.shape[0]} images but the run makes {batch}.")
        if generators_from_caller(generator, latents):
            notes.append(
                "the noise came from the caller's `generator`/`latents`, not from `seed`; the manifest cannot "
                "replay it."
            )
            return generator
        return [torch.Generator("cpu").manual_seed(int(seed)) for seed in settings.image_seeds]

    def _decode(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> list:
        bad = [index for index, image in enumerate(latents) if not torch.isfinite(image).all()]
        if bad:
            raise NumericalError(
                f"The model produced NaN/inf values for image(s) {bad} (often float16 overflow); no image is "
                f"written. Use bfloat16 or float32 (CLI: --dtype; dtype now {str(latents.dtype).removeprefix('torch.')})."
            )
        if output_type == "latent":
            return list(latents)
        images = self.backend.decode(latents, height, width)
        if output_type == "pt":
            return list(images.cpu())
        if output_type == "np":
            return list(images.permute(0, 2, 3, 1).cpu().numpy())
        from PIL import Image

        pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(p) for p in pixels]


def pass_masks_of(
    context: RunContext,
    found: SubjectMasks | None,
    conditioning: Conditioning,
    negative: Conditioning | None,
) -> dict[PassName, dict[str, AdapterMask] | None]:
    """Each forward pass's adapter masks: the prompt's pass, and the negative prompt's (its own words)."""
    if found is None:
        return {"cond": None, "uncond": None}
    device = context.backend.device
    tokens = {name: mask.to(device) for name, mask in found.tokens.items()}
    scope = context.settings.text_scope
    padding = context.backend.sequence_multiple  # how the denoiser pads each image's tokens
    result: dict[PassName, dict[str, AdapterMask] | None] = {"cond": None, "uncond": None}
    for name, encoded, positions in (
        ("cond", conditioning, context.positions),
        ("uncond", negative, context.negative_positions),
    ):
        if encoded is not None:
            result[name] = pass_masks(
                tokens,
                positions,
                encoded.num_text_tokens,
                scope,
                found.everywhere,
                context.grid,
                text_lengths=encoded.text_lengths,
                image_multiple=padding,
            )
    return result


def pass_biases_of(
    context: RunContext,
    found: SubjectMasks | None,
    conditioning: Conditioning,
    negative: Conditioning | None,
    config: BiasConfig,
) -> dict[PassName, PassBias | None]:
    """Each forward pass's attention bias (the negative prompt's with its own words); a note for
    each image of a run with several subjects where fewer than two have a region to bias."""
    result: dict[PassName, PassBias | None] = {"cond": None, "uncond": None}
    if found is None or not config.active:
        return result
    device = context.backend.device
    tokens = {name: mask.to(device) for name, mask in found.tokens.items()}
    result["cond"], unbiased = pass_bias(
        tokens, context.positions, conditioning.num_text_tokens, config, context.grid, found.everywhere
    )
    if len(context.names) > 1:
        for b in unbiased:
            context.fallbacks[b].append(
                f"image {b}: no attention bias in this image: it needs two subjects that each have a region of "
                "their own (some of the image, not all of it)."
            )
    if negative is not None:
        result["uncond"], _ = pass_bias(
            tokens, context.negative_positions, negative.num_text_tokens, config, context.grid, found.everywhere
        )
    return result


def everywhere(context: RunContext) -> SubjectMasks:
    """Every masked LoRA on every token of every image (what `merge` does), as masks."""
    tokens = {
        name: torch.ones(context.batch, context.grid[0] * context.grid[1], device=context.backend.device)
        for name in context.names
    }
    return SubjectMasks(tokens=tokens, everywhere={(name, b) for name in context.names for b in range(context.batch)})


def eager_while(condition: bool):
    """Compiled code runs as plain Python inside (`torch.compiler.set_stance`) when `condition`."""
    return torch.compiler.set_stance("force_eager") if condition else contextlib.nullcontext()


def mask_facts(masks: MaskInput) -> MaskFacts | None:
    """What preflight can know of the caller's masks without reading a file (None: no masks)."""
    if masks is None:
        return None
    if isinstance(masks, MaskSet):
        return MaskFacts(names=tuple(masks.names), size=masks.size)
    if isinstance(masks, dict):
        return MaskFacts(names=tuple(masks))
    return MaskFacts()


def generators_from_caller(generator, latents) -> bool:
    return generator is not None or latents is not None


def cut_to_region(found: SubjectMasks, region: torch.Tensor, grid: tuple[int, int]) -> SubjectMasks:
    """Stage 1's masks cut to an inpainting mask (`region`, `[H, W]`, 1 where repainted): each subject
    acts only where the image is repainted (token masks times the region's share of each token)."""
    share = torch.nn.functional.interpolate(region[None, None], size=grid, mode="area")[0, 0].reshape(-1)
    tokens = {name: mask * share.to(mask) for name, mask in found.tokens.items()}
    sets = [
        None if mask_set is None else MaskSet(list(mask_set.names), mask_set.masks * region)
        for mask_set in found.sets
    ]
    return replace(found, tokens=tokens, sets=sets)


__all__ = ["FreeFuse", "FreeFuseOutput", "FreeFuseWarning", "NumericalError", "Subject"]
