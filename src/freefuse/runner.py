"""The run service under every front end: one model at a time, its LoRAs kept loaded, runs in turn.

The command line, the batch runner, the web page and the demo each turn what their user gave
into a `RunSpec` and call `RunService.run`, which checks it (before any weights load), loads the
model when it changes, adds the LoRAs (each file read once, kept as an adapter for the next run),
runs FreeFuse with a step callback and a cancel flag, and returns the output with the run's
notes. None of the front ends loads a model, adds a LoRA or collects notes itself.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conditions import (
    IP_ADAPTER_WEIGHT_NAME,
    controlnet_facts,
    image_encoder_source,
    ip_adapter_file,
    redux_source,
)
from .errors import LoraFitError, ModelLoadError, RunCancelled, SettingsError
from .manifest import ModelSource, model_differences, model_record
from .memory import MemoryOptions, offload_name
from .models import fitting_loras, load_failure, load_pipeline, model_source, offline, pick_device
from .pipeline import FreeFuse, FreeFuseOutput, FreeFuseWarning, Subject
from .spec import LoraSpec, RunSpec, changed_lora_message, model_changed_message

#: `on_step(done, total)`: called after every denoising step of a run.
StepCallback = Callable[[int, int], None]


@dataclass
class RunResult:
    """A run's output and what it said: the spec's notes (from before loading) and the run's own."""

    output: FreeFuseOutput
    notes: list[str] = field(default_factory=list)


@dataclass
class _Loaded:
    """A LoRA kept loaded as an adapter between runs: which file it was read from, and as what."""

    identity: tuple[str, int, int]  # resolved path, size, modification time (ns)
    subject: Subject


class RunService:
    """Loads, caches and runs. One model is loaded at a time (a new one frees the previous first);
    up to `max_loras` LoRA adapters stay loaded between runs, keyed by adapter name and file hash.
    Runs take turns (`lock`), so one service can serve several page sessions.

    Args:
        device, dtype, offload: where and how models load (see `freefuse.models.load_pipeline`).
        max_loras: adapters kept loaded; the least recently used beyond this are deleted.
        memory: quantization, offload and compile for specs that name none (`RunSpec.memory`);
            default: `offload` alone.
    """

    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool | str = False,
        max_loras: int = 8,
        memory: MemoryOptions | None = None,
    ) -> None:
        if device is not None:
            pick_device(device)  # a device this machine cannot run on is said now, before anything loads
        self.device, self.dtype, self.offload = device, dtype, offload
        self.memory = memory if memory is not None else MemoryOptions(offload=offload_name(offload))
        self.max_loras = max_loras
        self.lock = threading.RLock()
        self.model_loads = 0
        self.lora_loads = 0
        self._model: tuple[str, str | None, MemoryOptions] | None = None
        self._pipeline = None
        self._source: ModelSource | None = None
        self._owner: FreeFuse | None = None  # owns the kept adapters (and their bundled embeddings)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._controlnets: dict[str, torch.nn.Module] = {}  # kept for the next run of the same model
        self._ip_adapter: tuple[str, str] | None = None  # (IP-Adapter, image encoder) loaded into the pipeline
        self._redux: tuple[str, object] | None = None  # (source, FluxPriorReduxPipeline) kept for the next run

    # -- models and LoRAs --------------------------------------------------------------------------
    def pipeline(self, model: str, base_model: str | None = None, memory: MemoryOptions | None = None):
        """The pipeline of `model` loaded as `memory` says (default: the service's), loaded now unless
        it is the one loaded."""
        with self.lock:
            memory = memory if memory is not None else self.memory
            if self._model != (model, base_model, memory):
                self.close()  # free the previous model first; a failed load leaves none
                self._pipeline = load_pipeline(model, device=self.device, dtype=self.dtype, base=base_model, memory=memory)
                self._source = model_source(model, base_model, memory)
                self._owner = FreeFuse(self._pipeline, source=self._source)
                self._model = (model, base_model, memory)
                self.model_loads += 1
            return self._pipeline

    def close(self) -> None:
        """Forget the loaded model and its adapters."""
        with self.lock:
            self._model, self._pipeline, self._source, self._owner = None, None, None, None
            self._loaded.clear()
            self._controlnets.clear()
            self._ip_adapter = None
            self._redux = None

    def freefuse(self, spec: RunSpec) -> FreeFuse:
        """A `FreeFuse` over `spec`'s model with exactly `spec`'s LoRAs (each loaded once, then kept)."""
        with self.lock:
            pipeline = self.pipeline(spec.model, spec.base_model, spec.memory)
            wanted = {lora.adapter_name for lora in spec.loras}
            self._unload(lambda name, kept: name not in wanted and bool(kept.subject.embeddings))
            freefuse = FreeFuse(pipeline, source=self._source)
            for lora in spec.loras:
                source = self._adapter(lora)
                subject = freefuse.use_adapter(
                    source.name, words=lora.words, weight=lora.weight, scope=lora.scope, source=source
                )
                subject.path = lora.path  # the same bytes, perhaps under another path
            excess = len(self._loaded) - self.max_loras
            if excess > 0:
                stale = [name for name in self._loaded if name not in wanted][:excess]
                self._unload(lambda name, kept: name in stale)
            return freefuse

    def _adapter(self, lora: LoraSpec) -> Subject:
        """The kept adapter for `lora`'s file under its name, loaded now if it is not kept."""
        name = lora.adapter_name
        path = Path(lora.path).expanduser().resolve()
        stat = path.stat()
        identity = (str(path), stat.st_size, stat.st_mtime_ns)
        kept = self._loaded.get(name)
        if kept is not None and kept.identity != identity:
            self._unload(lambda other, _: other == name)  # another file (or a changed one) under this name
            kept = None
        if kept is None:
            try:
                subject = self._owner.add_lora(path, name=name)
            except LoraFitError as error:  # for another model: say where LoRAs for a built-in one come from
                hint = fitting_loras(self._model[0]) if self._model else ""
                if not hint:
                    raise
                raise LoraFitError(f"{error}{hint}") from None
            kept = self._loaded[name] = _Loaded(identity=identity, subject=subject)
            self.lora_loads += 1
        if lora.sha256 is not None and lora.sha256 != kept.subject.sha256:
            raise SettingsError(changed_lora_message(lora.path, kept.subject.sha256 or "", lora.sha256))
        self._loaded.move_to_end(name)
        return kept.subject

    def controlnets(self, spec: RunSpec) -> list[torch.nn.Module]:
        """`spec`'s ControlNets on the loaded model's device and dtype (each loaded once and kept
        while runs use it; the others are let go)."""
        with self.lock:
            wanted = list(spec.conditions.controlnets) if spec.conditions is not None else []
            for source in [source for source in self._controlnets if source not in wanted]:
                del self._controlnets[source]
            for source in wanted:
                if source not in self._controlnets:
                    self._controlnets[source] = self._load_controlnet(source)
            return [self._controlnets[source] for source in wanted]

    def ip_adapter(self, spec: RunSpec) -> None:
        """The loaded pipeline with `spec`'s IP-Adapter and image encoder, and no other (loaded once
        and kept while runs use it; unloaded for a run without one, which diffusers could not run)."""
        conditions = spec.conditions
        wanted = None
        if conditions is not None and conditions.ip_adapter_model is not None:
            wanted = (conditions.ip_adapter_model, conditions.ip_encoder)
        with self.lock:
            if self._ip_adapter == wanted:
                return
            pipeline = self._pipeline
            if self._ip_adapter is not None:
                pipeline.unload_ip_adapter()  # also lets the image encoder go
                self._ip_adapter = None
            if wanted is not None:
                self._load_ip_adapter(pipeline, *wanted)
                self._ip_adapter = wanted

    def redux(self, spec: RunSpec):
        """`spec`'s Redux model (a `FluxPriorReduxPipeline` without text encoders, on the model's
        device and dtype, loaded once and kept while runs use it), or None."""
        source = spec.conditions.redux_model if spec.conditions is not None else None
        with self.lock:
            if source is None:
                self._redux = None
                return None
            if self._redux is None or self._redux[0] != source:
                self._redux = None
                self._redux = (source, self._load_redux(source))
            return self._redux[1]

    def _load_redux(self, source: str):
        """The image parts of a Redux model (folder or hub id), safetensors weights only."""
        from diffusers import FluxPriorReduxPipeline

        backend = self._owner.backend
        try:
            prior = FluxPriorReduxPipeline.from_pretrained(
                redux_source(source),
                text_encoder=None,
                tokenizer=None,
                text_encoder_2=None,
                tokenizer_2=None,
                torch_dtype=backend.denoiser.dtype,
                use_safetensors=True,
                local_files_only=offline(),
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(load_failure(source, error)) from None
        return prior.to(backend.device)

    def _load_ip_adapter(self, pipeline, source: str, encoder: str) -> None:
        """`load_ip_adapter` from a safetensors file (checked by `ip_adapter_file`) or a hub id. Its
        CLIP image encoder is loaded here first, safetensors only, and registered, so that diffusers
        (which would also take pickled weights) loads none; a failed load is unloaded again."""
        from transformers import CLIPVisionModelWithProjection

        if not hasattr(pipeline, "load_ip_adapter"):
            raise SettingsError(f"{type(pipeline).__name__} takes no IP-Adapter; FLUX.1 models do.")
        located = ip_adapter_file(source) or (source, IP_ADAPTER_WEIGHT_NAME)
        backend = self._owner.backend
        try:
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                image_encoder_source(encoder),
                torch_dtype=backend.denoiser.dtype,
                use_safetensors=True,
                local_files_only=offline(),
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(load_failure(encoder, error)) from None
        pipeline.register_modules(image_encoder=image_encoder.to(backend.device).eval())
        try:
            pipeline.load_ip_adapter(located[0], weight_name=located[1], local_files_only=offline())
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            pipeline.unload_ip_adapter()  # the encoder registered, processors half swapped: none of it stays
            raise ModelLoadError(load_failure(source, error)) from None

    def _load_controlnet(self, source: str) -> torch.nn.Module:
        """A ControlNet folder or hub id, of the class its config names (the architecture's own:
        checked before loading), with safetensors weights only."""
        import diffusers

        freefuse = self._owner
        architecture = freefuse.backend.architecture
        facts = controlnet_facts(source)
        name = facts.class_name or architecture.controlnet_classes[0]
        if name not in architecture.controlnet_classes:
            raise SettingsError(f"ControlNet {source} is a {name}; {architecture.name} models run {architecture.controlnet_classes}.")
        local = Path(source).expanduser()
        denoiser = freefuse.backend.denoiser
        try:
            net = getattr(diffusers, name).from_pretrained(
                str(local) if local.is_dir() else source,
                torch_dtype=denoiser.dtype,
                use_safetensors=True,
                local_files_only=offline(),
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(load_failure(source, error)) from None
        return net.to(freefuse.backend.device).eval().requires_grad_(False)

    def _unload(self, which: Callable[[str, _Loaded], bool]) -> None:
        for name, kept in list(self._loaded.items()):
            if which(name, kept):
                self._owner.remove(name)
                del self._loaded[name]

    def _check_recorded_model(self, spec: RunSpec, freefuse: FreeFuse) -> None:
        """A replay's model, loaded, is the one its manifest recorded (file hashes, weights hash)."""
        current = model_record(freefuse.pipeline, freefuse.backend.denoiser, freefuse.source)
        differences = model_differences(spec.recorded_model, current)
        if differences:
            raise SettingsError(model_changed_message(spec.model, differences))

    # -- running -----------------------------------------------------------------------------------
    def run(
        self,
        spec: RunSpec,
        *,
        check: bool = True,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        stop_after_masks: bool = False,
    ) -> RunResult:
        """Check `spec` (unless the caller did), load what it needs and run it.

        `on_step(done, total)` follows the denoising; `cancel`, when set, stops the run between two
        steps with `RunCancelled`. With `stop_after_masks`, stage 1 only (`FreeFuse.masks`).
        """
        if check:
            spec.check()
        settings = spec.settings
        total = settings.num_inference_steps

        def step_end(freefuse, step: int, timestep, tensors) -> dict:
            if cancel is not None and cancel.is_set():
                raise RunCancelled("Cancelled.")
            if on_step is not None:
                on_step(min(step + 1, total), total)
            return {}

        with self.lock:
            freefuse = self.freefuse(spec)
            if spec.recorded_model:
                self._check_recorded_model(spec, freefuse)
            conditions = spec.conditions.load() if spec.conditions is not None and not spec.conditions.empty else None
            nets = self.controlnets(spec)
            self.ip_adapter(spec)
            redux = self.redux(spec)
            # A word error before any progress is shown; the mask step as the model resolves it.
            checked, context, _ = freefuse.check_inputs(settings, spec.masks, conditions, nets, redux)
            total = context.steps
            if stop_after_masks:
                total = checked.resolved_mask_step
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FreeFuseWarning)
                output = freefuse.generate(
                    settings,
                    masks=spec.masks,
                    callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=(),
                    progress=False,
                    stop_after_masks=stop_after_masks,
                    conditions=conditions,
                    controlnet=nets,
                    redux=redux,
                )
        notes = [str(w.message) for w in caught if issubclass(w.category, FreeFuseWarning)]
        return RunResult(output=output, notes=notes)
