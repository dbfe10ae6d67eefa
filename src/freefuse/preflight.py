"""Every check a run can have before any weights load, written once, as one pure function.

`preflight(model, settings, subjects, masks)` knows the architecture's facts and rules, the
tokenizer of the tapped text (when one can be had), the settings, each LoRA's words and bundled
embeddings, and what is known of the caller's masks. The command line, a job-file line, a
manifest replay and the web page call it with what they know before loading (the model folder's
configs and tokenizer, the LoRA files' headers); `FreeFuse.check_inputs` calls it again with the
loaded model's facts. It reads no file and touches no model: a mistake is said before a
multi-GB load, and said the same way by every front end.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .conditions import CONTROLNET, IMG2IMG, INPAINT, ConditionFacts, Conditions, check_scale
from .errors import EmbeddingError, SettingsError, WordNotFoundError
from .methods import Method, get_method
from .settings import GenerationSettings
from .tokens import PromptTokens, find_word, shared_word, truncation_note, word_spans


@dataclass(frozen=True)
class ModelFacts:
    """What is known of the model: always its architecture; the rest once it can be read.

    Attributes:
        architecture: the architecture's facts and rules (`backends.base.Architecture`); None when
            it cannot be told before loading (a hub id not in the cache): its rules wait for the load.
        tokenizer: the fast tokenizer of the tapped attention's text, or None (words are checked
            once the model loads).
        size_multiple: pixels per image token along a side, or None.
        num_blocks: tappable blocks, or None.
    """

    architecture: type | None
    tokenizer: object | None = None
    size_multiple: int | None = None
    num_blocks: int | None = None


@dataclass(frozen=True)
class SubjectFacts:
    """One LoRA of a run as preflight sees it, keyed by its adapter name.

    Attributes:
        name: the adapter name.
        words: its activation words (given, or from its file's metadata).
        scope: "subject" (masked) or "global" (never masked).
        bundled: (placeholder, encoder) of each trigger-word embedding its file bundles.
        text_encoders: the text encoders its file also adapts (acting on the whole prompt).
        source: its file's name, for messages.
    """

    name: str
    words: tuple[str, ...] = ()
    scope: str = "subject"
    bundled: tuple[tuple[str, str], ...] = ()
    text_encoders: tuple[str, ...] = ()
    source: str | None = None


@dataclass(frozen=True)
class MaskFacts:
    """What is known of the caller's masks before denoising: the subjects they name and their
    `(H, W)` size, each None when not known (masks given as plain tensors)."""

    names: tuple[str, ...] | None = None
    size: tuple[int, int] | None = None


@dataclass
class Checked:
    """What preflight found. B images (prompts × images per prompt).

    Attributes:
        settings: the settings with the model's defaults filled in where known (block, token
            limit, mask constants, guidance).
        method: the run's method.
        masked: adapter names of the subject LoRAs the method masks, in the given order.
        notes: odd but valid choices, to show before the run.
        positions: per image, {adapter name: token positions of its words}; None without a tokenizer.
        background: per image, positions of the background words; None without a tokenizer.
        negative_prompt: the text of the second pass, or None.
        negative_positions: per image, {adapter name: positions in the negative prompt}, or None.
        conditions: the run's conditions with `strength` resolved (the architecture's default), or None.
        steps: how many steps the denoising loop runs (fewer than `num_inference_steps` from an
            init image: the last `strength` share).
    """

    settings: GenerationSettings
    method: Method
    masked: list[str]
    notes: list[str] = field(default_factory=list)
    positions: list[dict[str, list[int]]] | None = None
    background: list[list[int]] | None = None
    negative_prompt: str | None = None
    negative_positions: list[dict[str, list[int]]] | None = None
    conditions: Conditions | None = None
    steps: int | None = None


def preflight(
    model: ModelFacts,
    settings: GenerationSettings,
    subjects: Sequence[SubjectFacts],
    masks: MaskFacts | None = None,
    conditions: ConditionFacts | None = None,
) -> Checked:
    """Check a run against what is known of its model; raise a `FreeFuseError` (a `ValueError`)
    that names the setting and the fix, or return the resolved run. `masks`: None when the caller
    gives none; `conditions`: the run's conditions (images read) and its ControlNets' facts."""
    architecture = model.architecture
    method = get_method(settings.method)
    if model.size_multiple is not None:
        settings.check_size(model.size_multiple)
    notes = settings.notes()
    if architecture is not None:
        notes = architecture.check_settings(settings) + notes
        if method.reads_attention:
            architecture.check_mask_config(settings)
        architecture.check_attention_bias(settings)
    if not subjects:
        raise SettingsError("No LoRA given; a run needs at least one LoRA with its activation words.")
    resolved, steps = None, settings.num_inference_steps
    if conditions is not None and (not conditions.conditions.empty or conditions.ip_adapter or conditions.redux):
        resolved = check_conditions(architecture, settings, conditions)
        if resolved.strength is not None and architecture is not None:
            steps = _denoised_steps(architecture, settings, resolved.strength)
    settings = _resolved(model, settings, steps) if architecture is not None else settings
    _check_masks(method, settings, masks, [s.name for s in subjects if s.scope == "subject"], model)
    masked = [s for s in subjects if s.scope == "subject"] if method.masks_loras else []
    grid = _grid(settings, model.size_multiple)
    method.check([s.name for s in masked], grid, (settings.height, settings.width))
    _check_words(method, settings, masked)
    if architecture is not None:
        _check_embeddings(architecture, subjects, model.tokenizer)
    if method.masks_loras and architecture is not None:
        notes.extend(
            f"LoRA {s.name!r} also adapts {', '.join(s.text_encoders)}; that part changes the prompt every image "
            f"token reads, so it acts everywhere (only the {architecture.denoiser_name} part is masked)."
            for s in masked
            if s.text_encoders
        )
    checked = Checked(
        settings=settings,
        method=method,
        masked=[s.name for s in masked],
        notes=notes,
        negative_prompt=None if architecture is None else architecture.negative_prompt(settings),
        conditions=resolved,
        steps=steps,
    )
    if model.tokenizer is not None and architecture is not None:
        _find_words(model.tokenizer, checked, masked)
    return checked


def _resolved(model: ModelFacts, settings: GenerationSettings, steps: int) -> GenerationSettings:
    """The model's defaults for what the caller left unset, and the block range once it is known.
    `steps`: how many steps the loop runs (from an init image, fewer than `num_inference_steps`);
    the mask step is counted among them."""
    architecture = model.architecture
    block = settings.block
    if model.num_blocks is not None:
        block = architecture.default_block(model.num_blocks) if block is None else block
        for index in [block] if isinstance(block, int) else block:
            if not 0 <= index < model.num_blocks:
                raise SettingsError(
                    f"`block` {index} is out of range: this model has {model.num_blocks} {architecture.block_kind}s "
                    f"(0..{model.num_blocks - 1})."
                )
    guidance = settings.guidance_scale
    bias = architecture.attention_bias(settings)
    # The architecture's share of the steps (few-step models read earlier), not the paper's 6/28.
    mask_step = settings.mask_step or architecture.default_mask_step(steps)
    late = get_method(settings.method).takes_masks and settings.user_masks_from == "mask-step"
    if (get_method(settings.method).reads_attention or late) and mask_step > steps:
        raise SettingsError(
            f"`mask_step` {mask_step} is past the last of the {steps} steps this run denoises (`strength` "
            f"leaves {steps} of {settings.num_inference_steps}); use a value from 1 to {steps}, or a higher `strength`."
        )
    if get_method(settings.method).reads_attention and settings.capture_steps > mask_step:
        raise SettingsError(
            f"`capture_steps` {settings.capture_steps} reaches before the first step: the last of them is the mask "
            f"step {mask_step} ({architecture.name}'s default for {settings.num_inference_steps} steps); use at most "
            f"{mask_step}, or set `mask_step`."
        )
    return settings.model_copy(
        update={
            "attention_bias": bias.scale,
            "attention_bias_positive": bias.positive,
            "attention_bias_bidirectional": bias.bidirectional,
            "attention_bias_blocks": bias.blocks,
            "block": block,
            "mask_step": mask_step,
            "max_sequence_length": settings.max_sequence_length or architecture.default_sequence_length(model.tokenizer),
            "mask_config": architecture.mask_config(settings),
            "guidance_scale": architecture.default_guidance if guidance is None else guidance,
        }
    )


def _grid(settings: GenerationSettings, size_multiple: int | None) -> tuple[int, int] | None:
    if size_multiple is None:
        return None
    return settings.height // size_multiple, settings.width // size_multiple


def _check_masks(
    method: Method,
    settings: GenerationSettings,
    masks: MaskFacts | None,
    subjects: list[str],
    model: ModelFacts,
) -> None:
    """The caller's masks against the method, the subjects and the image size."""
    if masks is not None and not method.takes_masks:
        raise SettingsError(
            f"Masks are only used by method='masks' (method is {settings.method!r}); run method 'masks' with them, "
            "or leave the masks out."
        )
    if method.takes_masks and masks is None:
        raise SettingsError(
            "Method 'masks' needs masks, one per subject LoRA (a .masks.json or .safetensors from `freefuse masks`)."
        )
    if masks is None:
        return
    if masks.names is not None:
        missing = [name for name in subjects if name not in masks.names]
        if missing:
            raise SettingsError(f"The masks have no mask for {missing}; they have {list(masks.names)}.")
    if masks.size is not None:
        size = (settings.height, settings.width)
        grid = _grid(settings, model.size_multiple)
        sizes = [size] + ([grid] if grid is not None else [])
        if tuple(masks.size) not in sizes:
            wanted = " or ".join(f"{h}x{w}" for h, w in sizes)
            raise SettingsError(
                f"The mask set has {masks.size[0]}x{masks.size[1]} masks; this run needs {wanted} (H x W: the image, "
                "or its token grid)."
            )


def _check_words(method: Method, settings: GenerationSettings, masked: list[SubjectFacts]) -> None:
    """Background words only where attention is read, never a subject's; every masked subject has
    words, and no two subjects share one."""
    if settings.background_words and not method.reads_attention:
        raise SettingsError(
            f"Background words only act in methods that read attention (method is {settings.method!r})."
        )
    for word in settings.background_words:
        for subject in masked:
            clash = next((w for w in subject.words if word_spans(w, word) or word_spans(word, w)), None)
            if clash is not None:
                raise SettingsError(
                    f"Background word {word!r} is also LoRA {subject.name!r}'s word {clash!r}; a word cannot mark "
                    "both a subject and the background. Pick a background word of its own."
                )
    if not method.needs_words:
        return
    for subject in masked:
        if not subject.words:
            raise SettingsError(
                f"LoRA {subject.name!r} has no activation words and none in its metadata; give it its trigger "
                "word (e.g. the word it was trained with)."
            )
    clash = shared_word({s.name: list(s.words) for s in masked})
    if clash:
        raise SettingsError(shared_word_message(*clash))


def _check_embeddings(architecture, subjects: Sequence[SubjectFacts], tokenizer) -> None:
    """Bundled embeddings this model can take: known encoders, one LoRA per word, no special tokens."""
    owners: dict[str, str] = {}
    specials = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for subject in subjects:
        for placeholder, encoder in subject.bundled:
            source = subject.source or subject.name
            if encoder not in architecture.embedding_slots and not encoder.endswith("_out"):
                raise EmbeddingError(
                    f"{source} bundles an embedding for text encoder {encoder!r}, which {architecture.name} models do "
                    f"not have (they have {sorted(architecture.embedding_slots)}); the LoRA was made for another model."
                )
            if placeholder in specials:
                raise EmbeddingError(
                    f"{source} bundles an embedding for {placeholder!r}, one of the tokenizer's special tokens; "
                    "replacing it would change every prompt's encoding. The file is broken or hostile: do not use it."
                )
            owner = owners.setdefault(placeholder, subject.name)
            if owner != subject.name:
                raise EmbeddingError(
                    f"LoRAs {owner!r} and {subject.name!r} both bundle an embedding for {placeholder!r}; two LoRAs "
                    "cannot both define one word. Use one of them, or a copy without `bundle_emb.*` tensors."
                )


def _find_words(tokenizer, checked: Checked, masked: list[SubjectFacts]) -> None:
    """Token positions of every subject's and background word in every image's prompt (and the
    negative prompt's), with the notes on what is missing or cut off. Each prompt is tokenized once."""
    settings, method = checked.settings, checked.method
    length = settings.max_sequence_length
    tokens = tokenized(tokenizer)
    for prompt in settings.prompts:
        note = truncation_note(tokenizer, prompt, length, tokens(prompt))
        if note:
            checked.notes.append(note)
    prompts = settings.image_prompts
    checked.positions = word_positions(
        tokenizer, prompts, masked, length, method.needs_words, checked.notes, tokens=tokens
    )
    if method.needs_words:
        _check_distinct_tokens(tokenizer, prompts, checked.positions, masked, tokens)
        for index, found in enumerate(checked.positions):
            checked.notes.extend(
                f"image {index}: LoRA {subject.name!r} is off after the mask step (its words are not in this prompt; "
                "the steps before run every LoRA jointly)."
                for subject in masked
                if subject.name not in found
            )
    checked.background = _background_positions(tokenizer, prompts, settings.background_words, length, tokens)
    if checked.negative_prompt is not None:
        negatives = [checked.negative_prompt] * len(prompts)
        checked.negative_positions = word_positions(tokenizer, negatives, masked, length, False, [], tokens=tokens)


def tokenized(tokenizer) -> Callable[[str], PromptTokens]:
    """`PromptTokens.of(tokenizer, prompt)`, computed once per prompt for the caller's lifetime."""
    return functools.lru_cache(maxsize=None)(functools.partial(PromptTokens.of, tokenizer))


def word_positions(
    tokenizer,
    prompts: list[str],
    subjects: Sequence[SubjectFacts],
    max_length: int,
    required: bool,
    notes: list[str],
    tokens: Callable[[str], PromptTokens] | None = None,
) -> list[dict[str, list[int]]]:
    """For each prompt, {subject name: token positions of its activation words}.

    A subject none of whose words are in a prompt is absent from that prompt's dict. With
    `required`, a subject absent from every prompt is an error that shows the prompt's tokens.
    `tokens`: the caller's `tokenized(tokenizer)`, so that each prompt is tokenized once.
    """
    tokens = tokens or tokenized(tokenizer)
    per_image: list[dict[str, list[int]]] = [{} for _ in prompts]
    for subject in subjects:
        first_error: WordNotFoundError | None = None
        for index, prompt in enumerate(prompts):
            found: set[int] = set()
            missing = []
            for word in subject.words:
                try:
                    found.update(find_word(tokenizer, prompt, word, max_length, tokens(prompt)).positions)
                except WordNotFoundError as error:
                    first_error = first_error or error
                    missing.append(word)
            if found:
                per_image[index][subject.name] = sorted(found)
                if missing:
                    notes.append(f"image {index}: words {missing} of LoRA {subject.name!r} are not in the prompt.")
        if required and subject.words and not any(subject.name in image for image in per_image):
            raise WordNotFoundError(f"LoRA {subject.name!r}: {first_error}")
    return per_image


def _check_distinct_tokens(
    tokenizer,
    prompts: list[str],
    positions: list[dict[str, list[int]]],
    masked: list[SubjectFacts],
    tokens: Callable[[str], PromptTokens],
) -> None:
    """Two subjects whose words become the same tokens (both unknown to the tokenizer: `<unk>`)
    cannot be told apart by attention, whatever their spelling."""
    for index, prompt in enumerate(prompts):
        ids = tokens(prompt).ids
        seen: dict[tuple[int, ...], str] = {}
        for subject in masked:
            found = positions[index].get(subject.name)
            if not found:
                continue
            subject_tokens = tuple(sorted({ids[p] for p in found if p < len(ids)}))
            other = seen.setdefault(subject_tokens, subject.name)
            if other != subject.name:
                shown = tokenizer.convert_ids_to_tokens(list(subject_tokens))
                raise WordNotFoundError(
                    f"LoRAs {other!r} and {subject.name!r} have words the model reads as the same tokens {shown} "
                    f"(in {prompt!r}); FreeFuse tells subjects apart by their words' tokens. Use words the "
                    "tokenizer knows, or the LoRAs' bundled embeddings."
                )


def _background_positions(
    tokenizer, prompts: list[str], words: list[str], max_length: int, tokens: Callable[[str], PromptTokens]
) -> list[list[int]]:
    """Per prompt, token positions of the background words found in it."""
    result = []
    for prompt in prompts:
        found: set[int] = set()
        for word in words:
            with contextlib.suppress(WordNotFoundError):
                found.update(find_word(tokenizer, prompt, word, max_length, tokens(prompt)).positions)
        result.append(sorted(found))
    if words and not any(result):
        raise WordNotFoundError(f"None of the background words {words} is in the prompt; put them in it.")
    return result


def shared_word_message(name: str, other: str, word: str, other_word: str) -> str:
    same = "the activation word" if word.lower() == other_word.lower() else "overlapping activation words"
    shown = repr(word) if word.lower() == other_word.lower() else f"{word!r} and {other_word!r}"
    return (
        f"LoRAs {name!r} and {other!r} share {same} {shown}; FreeFuse finds each subject by its own words, so "
        "give each LoRA a word of its own, e.g. trained default words such as 'ohwx' replaced by the subject's name."
    )


# -- conditions: init image, inpainting mask, ControlNets --------------------------------------------------


def check_conditions(architecture, settings: GenerationSettings, facts: ConditionFacts) -> Conditions:
    """A run's conditions against its settings and architecture (None: not known yet); returns them
    with `strength` resolved. Refused: what the architecture does not take, an IP-Adapter image for
    a model without an IP-Adapter (or an IP-Adapter without its image), `strength` without an init
    image or outside (0, 1], images of another size than the run's, an inpainting mask that
    repaints nothing or everything, ControlNets for another architecture or without their images."""
    conditions = facts.conditions
    kinds = conditions.kinds
    if architecture is not None:
        refused = [kind for kind in kinds if kind not in architecture.conditions]
        if refused:
            takes = ", ".join(architecture.conditions) or "none of them"
            raise SettingsError(
                f"{architecture.name} runs take no {' or '.join(refused)} in FreeFuse (they take: {takes}); FLUX.1 and "
                "SDXL models do."
            )
    if conditions.strength is not None and conditions.init_image is None:
        raise SettingsError("`strength` applies to an init image; give one (CLI: --init-image), or leave it out.")
    if conditions.inpaint_mask is not None and conditions.init_image is None:
        raise SettingsError("An inpainting mask needs the image it repaints: give it (CLI: --init-image).")
    if conditions.init_image is not None and conditions.controls:
        raise SettingsError(
            "A ControlNet with an init image (ControlNet img2img or inpainting) is not supported yet; use one of them."
        )
    check_ip_adapter(facts)
    for what, image in _images(conditions):
        if image.size != (settings.width, settings.height):
            width, height = image.size
            raise SettingsError(
                f"{what} is {width}x{height} pixels but the run makes {settings.width}x{settings.height}; resize it, or "
                f"pass --size {width}x{height}."
            )
    share = conditions.mask_share()
    if share is not None and share in (0.0, 1.0):
        what = "nothing (it is all black)" if share == 0.0 else "the whole image (it is all white)"
        fix = "leave the mask out for img2img" if share == 1.0 else "paint white where the image is redrawn"
        raise SettingsError(f"The inpainting mask repaints {what}; {fix}.")
    _check_controls(architecture, conditions, facts)
    strength = conditions.strength
    if conditions.init_image is not None:
        if strength is None:
            kind = INPAINT if conditions.inpaint_mask is not None else IMG2IMG
            strength = (architecture.default_strength.get(kind) if architecture is not None else None) or 1.0
        if not 0 < strength <= 1:
            raise SettingsError(f"`strength` must be above 0 and at most 1 (CLI: --strength), got {strength!r}.")
    return replace(conditions, strength=strength)


#: Per reference-image condition (a `Conditions` and `ConditionFacts` field): what it is, its flag,
#: and what to say of an image without its model and of a model without its image.
_REFERENCES = {
    "ip_adapter": (
        "IP-Adapter",
        "--ip-adapter",
        "An IP-Adapter image needs a model with an IP-Adapter: give one (CLI: --ip-adapter-model FILE_OR_ID, e.g. "
        "XLabs-AI/flux-ip-adapter; library: `pipe.load_ip_adapter(...)` before `FreeFuse(pipe)`).",
        "The model has an IP-Adapter, which needs a reference image in every run: give one (CLI: --ip-adapter "
        "IMAGE; library: `Conditions.of(ip_adapter=image)`), or leave the IP-Adapter out (`pipe.unload_ip_adapter()`).",
    ),
    "redux": (
        "Redux",
        "--redux",
        "A Redux image needs a Redux model to read it: give one (CLI: --redux-model FOLDER_OR_ID, e.g. "
        "black-forest-labs/FLUX.1-Redux-dev; library: `redux=FluxPriorReduxPipeline.from_pretrained(...)`).",
        "A Redux model was given without its reference image: add it (CLI: --redux IMAGE; library: "
        "`Conditions.of(redux=image)`), or leave the model out.",
    ),
}


def check_ip_adapter(facts: ConditionFacts) -> None:
    """An IP-Adapter image needs a model with an IP-Adapter, and an IP-Adapter its image; the same
    for a Redux image and its model; their scales are from 0 to `MAX_SCALE`."""
    conditions = facts.conditions
    for kind, (what, flag, without_model, without_image) in _REFERENCES.items():
        image, has_model = getattr(conditions, kind), getattr(facts, kind)
        if image is not None and has_model is False:
            raise SettingsError(without_model)
        if image is None and has_model:
            raise SettingsError(without_image)
        scale = getattr(conditions, f"{kind}_scale")
        if image is None and scale not in (None, 1.0):
            raise SettingsError(f"The {what} scale was given without its image ({flag} IMAGE@SCALE); give both.")
        if scale is not None:
            _check_scale(scale, what, flag)


def _check_scale(scale: float, what: str, flag: str) -> None:
    try:
        check_scale(scale, f"The {what} scale")
    except ValueError as error:
        raise SettingsError(f"{error} (CLI: {flag} IMAGE@SCALE).") from None


def _images(conditions: Conditions):
    if conditions.init_image is not None:
        yield "The init image", conditions.init_image
    if conditions.inpaint_mask is not None:
        yield "The inpainting mask", conditions.inpaint_mask
    for index, control in enumerate(conditions.controls):
        yield f"Control image {index + 1} ({control.type or 'no type'})", control.image


def _check_controls(architecture, conditions: Conditions, facts: ConditionFacts) -> None:
    controls, nets = conditions.controls, facts.controlnets
    if not controls:
        if nets:
            raise SettingsError("A ControlNet was given without a control image; add --control TYPE=IMAGE.")
        return
    most = None if architecture is None else architecture.max_controls
    if most is not None and (len(controls) > most or len(nets) > most):
        raise SettingsError(
            f"{architecture.name} runs take at most {most} ControlNet with {most} control image (as its diffusers "
            f"pipeline); {len(controls)} control images and {len(nets)} ControlNets were given."
        )
    if CONTROLNET in conditions.kinds and not nets:
        raise SettingsError("Control images need a ControlNet to read them (CLI: --controlnet MODEL; library: `controlnet=`).")
    for index, control in enumerate(controls):
        if control.controlnet >= len(nets):
            raise SettingsError(
                f"Control image {index + 1} is for ControlNet {control.controlnet + 1} but {len(nets)} were given; give "
                "one ControlNet for all the controls, or one per control (in the same order)."
            )
    for net in nets:
        allowed = () if architecture is None else architecture.controlnet_classes
        if architecture is not None and net.class_name is not None and net.class_name not in allowed:
            raise SettingsError(
                f"ControlNet {net.source} is a {net.class_name}, for another architecture: {architecture.name} models run "
                f"{' or '.join(allowed) or 'no ControlNet'}."
            )
        if net.global_pool:
            raise SettingsError(
                f"ControlNet {net.source} pools its conditions (global_pool_conditions: diffusers runs it in guess mode), "
                "which FreeFuse does not support yet."
            )
    modes = () if architecture is None else architecture.union_modes
    for index, control in enumerate(controls):
        net = nets[control.controlnet]
        if net.modes is not None and control.type not in modes[: net.modes]:
            raise SettingsError(
                f"ControlNet {net.source} is a union ControlNet: control image {index + 1} needs its type, one of "
                f"{list(modes[: net.modes])} (CLI: --control TYPE=IMAGE), got {control.type!r}."
            )


def _denoised_steps(architecture, settings: GenerationSettings, strength: float) -> int:
    steps = architecture.denoised_steps(settings.num_inference_steps, strength)
    if steps < 1:
        raise SettingsError(
            f"`strength` {strength} leaves none of the {settings.num_inference_steps} steps to denoise; raise --strength "
            "or --steps."
        )
    return steps
