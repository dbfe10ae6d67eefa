"""`freefuse ui`: a web page over the library for people who would rather look than type.

Add LoRA files (their trigger words filled in from the metadata, editable), find the masks (stage 1
alone), paint or erase a subject's mask, generate FreeFuse beside plain multi-LoRA (merge) with the
same seed, download each run's manifest, and replay a past run. Built on the library API only:
`RunSpec` checks a form before any weights load, `FreeFuse` runs it, `write_outputs` writes it,
`replay_spec` replays it.

Each browser session writes under its own random folder below the server's root, so one user's
runs cannot be seen or replaced by another's; the server binds to 127.0.0.1 unless told otherwise.
Needs `pip install freefuse[ui]` (Gradio).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAX_LORAS = 4
MASK_METHODS = ("text-to-image", "image-to-text", "combined", "routing")
log = logging.getLogger("freefuse.ui")


@dataclass
class Session:
    """One browser session: its own folder, the masks it found or painted, its runs."""

    folder: Path
    masks: Any = None  # MaskSet on the image grid, from "Find masks" and edits
    preview: Any = None  # PIL image the masks were found on
    edited: bool = False
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the last run's notes, shown under it
    cancel: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def new(cls, root: Path) -> Session:
        folder = root / secrets.token_hex(16)  # unguessable, one per session
        folder.mkdir(parents=True, exist_ok=False)
        return cls(folder=folder)


class Models:
    """One loaded model at a time for the whole server; runs take turns (one GPU, one model)."""

    def __init__(self, device: str | None = None, dtype: str | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.lock = threading.Lock()
        self.name: str | None = None
        self.pipeline = None

    def get(self, spec):
        from .models import load_pipeline

        key = (spec.model, spec.base_model)
        if self.name != key:
            self.name, self.pipeline = None, None  # free the previous model first; a failed load leaves none
            self.pipeline = load_pipeline(
                spec.model, device=self.device, dtype=self.dtype, base=spec.base_model
            )
            self.name = key
        return self.pipeline


class RunCancelled(Exception):
    """The page's Cancel button stopped a run between two steps."""


def trigger_words(path: str | None) -> str:
    """The words a LoRA file's metadata names (comma-separated), or "" when it names none."""
    if not path:
        return ""
    from .lora import describe_lora

    try:
        return ", ".join(describe_lora(path)["trigger_words"])
    except (OSError, ValueError):
        return ""


def _words(text: str) -> list[str] | None:
    words = [word.strip() for word in (text or "").split(",") if word.strip()]
    return words or None


def build_spec(
    folder: Path, model: str, loras: list[tuple], form: dict, method: str, masks: str | None = None
):
    """A `RunSpec` from the page's fields. The LoRA files are linked (or copied) into `folder/loras`,
    so that a run's folder holds everything its manifest names and replays from anywhere."""
    from .lora import check_lora_path
    from .settings import GenerationSettings, SettingsError
    from .spec import LoraSpec, RunSpec

    for key, label in (("seed", "Seed"), ("steps", "Steps"), ("width", "Width"), ("height", "Height")):
        if form.get(key) in (None, ""):
            raise SettingsError(f"{label} is empty; enter a number.")
    specs = []
    taken: set[str] = set()
    for index, (path, words, weight, scope) in enumerate(loras):
        if not path:
            continue
        source = Path(path)
        name = _adapter_name(source.stem, index, taken)
        # A typed path may name any file: it must be a LoRA (a regular safetensors file with a sane
        # header) before anything is linked where the page serves files from.
        check_lora_path(source)
        kept = folder / "loras" / f"{name}.safetensors"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.unlink(missing_ok=True)  # a new file under an old name must not find the old weights
        try:
            os.link(source, kept)  # no second copy of a large file where the disk allows
        except OSError:
            shutil.copyfile(source, kept)
        specs.append(
            LoraSpec(
                path=str(kept),
                words=_words(words),
                weight=float(weight if weight is not None else 1.0),
                scope=scope or "subject",
                name=name,
            )
        )
    settings = GenerationSettings(
        prompt=form["prompt"],
        seed=int(form["seed"]),
        num_inference_steps=int(form["steps"]),
        width=int(form["width"]),
        height=int(form["height"]),
        guidance_scale=None if form["guidance"] in (None, "") else float(form["guidance"]),
        method=method,
        mask_step=None if form["mask_step"] in (None, "", 0) else int(form["mask_step"]),
        mask_config={"method": form["mask_method"]},
    )
    return RunSpec(model=model, loras=specs, settings=settings, masks=masks)


def _adapter_name(stem: str, index: int, taken: set[str]) -> str:
    """The file's stem as an adapter name (what masks and manifests show), made unique by its slot."""
    name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in stem)[:48] or "lora"
    if name[0] in "-":
        name = "_" + name[1:]
    if name in taken:
        name = f"{name}_{index + 1}"
    taken.add(name)
    return name


def user_error(error: BaseException) -> str:
    """The message a page shows for a failed action: the user's mistake as said, anything else short."""
    from .cli import _user_errors

    if isinstance(error, _user_errors()):
        return str(error)
    log.exception("freefuse ui: internal error")
    return f"Internal error ({type(error).__name__}: {error}); the server log has the details."


def mask_picture(mask: torch.Tensor) -> np.ndarray:
    """`[H, W]` mask → an RGB picture to paint on: white inside the mask, black outside."""
    grey = ((mask.cpu().numpy() > 0.5) * 255).astype(np.uint8)
    return np.dstack([grey] * 3)


def edited_mask(value: dict | None, size: tuple[int, int]) -> torch.Tensor | None:
    """What the editor shows (its composite: the mask picture with the strokes on it) as an
    `[H, W]` mask: the light pixels. None when the editor holds no picture."""
    if not value or value.get("composite") is None:
        return None
    array = np.asarray(value["composite"]).astype(np.float32)
    if array.ndim != 3 or array.shape[2] < 3:
        return None
    mask = torch.from_numpy((array[..., :3].mean(axis=-1) > 127).astype(np.float32))
    if tuple(mask.shape) != tuple(size):
        mask = torch.nn.functional.interpolate(mask[None, None], size=size, mode="nearest")[0, 0]
    return mask


def replace_mask(masks, name: str, mask: torch.Tensor):
    """`masks` with subject `name`'s mask replaced; the painted pixels leave the other subjects."""
    from .core.maskset import MaskSet

    stacked = masks.masks.clone()
    index = masks.names.index(name)
    stacked[index] = mask
    for other in range(len(masks.names)):
        if other != index:
            stacked[other] = stacked[other] * (1 - mask)
    return MaskSet(list(masks.names), stacked)


def summary(masks) -> str:
    if masks is None:
        return "No masks yet: press **Find masks**, or **Generate** to find them during the run."
    areas = ", ".join(
        f"{name} {float(mask.mean()):.0%}" for name, mask in zip(masks.names, masks.masks, strict=True)
    )
    return f"Masks: {areas}"


def build_app(
    model: str = "tiny",
    root: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    local_paths: bool = True,
):
    """The Gradio app; `root` holds one folder per browser session (default: a temporary folder).

    `local_paths`: offer a box for a LoRA's path on the server's machine (the CLI turns it off when
    the page is served beyond this machine: anyone reaching it could point at the server's files).
    """
    import gradio as gr

    root = Path(root or tempfile.mkdtemp(prefix="freefuse-ui-"))
    root.mkdir(parents=True, exist_ok=True)
    models = Models(device, dtype)

    def fails_as_message(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except gr.Error:
                raise
            except RunCancelled:
                raise gr.Error(
                    "Cancelled: the run stopped between two steps; nothing of it was kept."
                ) from None
            except Exception as error:
                raise gr.Error(user_error(error), print_exception=False) from None

        return wrapper

    with gr.Blocks(title="FreeFuse") as app:
        session = gr.State(None)
        gr.Markdown("# FreeFuse\nSeveral subject LoRAs in one picture, each inside its own mask.")
        with gr.Row():
            model_box = gr.Textbox(
                model, label="Model (folder, Hugging Face id, checkpoint file, or tiny)", elem_id="model"
            )
        lora_rows = []
        with gr.Accordion("LoRAs", open=True):
            for index in range(MAX_LORAS):
                with gr.Row():
                    with gr.Column():
                        file = gr.File(
                            label=f"LoRA {index + 1}",
                            file_types=[".safetensors"],
                            elem_id=f"lora-file-{index}",
                        )
                        path = gr.Textbox(
                            label="or its path on this machine",
                            elem_id=f"lora-path-{index}",
                            max_lines=1,
                            visible=local_paths,
                        )
                    words = gr.Textbox(label="Trigger words (comma-separated)", elem_id=f"lora-words-{index}")
                    weight = gr.Number(1.0, label="Weight", elem_id=f"lora-weight-{index}")
                    scope = gr.Radio(
                        ["subject", "global"], value="subject", label="Acts", elem_id=f"lora-scope-{index}"
                    )
                file.change(trigger_words, inputs=file, outputs=words)
                path.change(trigger_words, inputs=path, outputs=words, trigger_mode="always_last")
                lora_rows.append((file, path, words, weight, scope))
        prompt = gr.Textbox("Alice hugging Bob in the snow", label="Prompt", elem_id="prompt")
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
            steps = gr.Number(8, label="Steps", precision=0, elem_id="steps")
            width = gr.Number(256, label="Width", precision=0, elem_id="width")
            height = gr.Number(256, label="Height", precision=0, elem_id="height")
            guidance = gr.Textbox("", label="Guidance (empty: the model's)", elem_id="guidance")
            mask_method = gr.Dropdown(
                list(MASK_METHODS), value="text-to-image", label="Mask method", elem_id="mask-method"
            )
            mask_step = gr.Number(0, label="Mask step (0: default)", precision=0, elem_id="mask-step")
        warnings_box = gr.Markdown("", elem_id="warnings")
        with gr.Row():
            find = gr.Button("Find masks", elem_id="find-masks")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
        status = gr.Markdown(summary(None), elem_id="mask-summary")
        with gr.Row():
            overlay = gr.Image(
                label="Masks over the preview", type="pil", interactive=False, elem_id="overlay"
            )
            with gr.Column():
                subject = gr.Radio([], label="Edit the mask of", elem_id="subject")
                editor = gr.ImageEditor(
                    label="The mask: paint white to add, black to remove; then Apply",
                    type="numpy",
                    image_mode="RGB",
                    brush=gr.Brush(colors=["#ffffff", "#000000"], default_color="#ffffff", default_size=24),
                    eraser=gr.Eraser(default_size=24),
                    layers=False,
                    elem_id="mask-editor",
                )
                apply = gr.Button("Apply edit", elem_id="apply-edit")
        with gr.Row():
            merge_image = gr.Image(
                label="merge (plain multi-LoRA)", type="pil", interactive=False, elem_id="merge-image"
            )
            result_image = gr.Image(label="FreeFuse", type="pil", interactive=False, elem_id="result-image")
            result_masks = gr.Image(
                label="FreeFuse masks", type="pil", interactive=False, elem_id="result-masks"
            )
        manifest_file = gr.File(
            label="Manifest and image of this run",
            file_count="multiple",
            interactive=False,
            elem_id="manifest",
        )
        run_notes = gr.Markdown("", elem_id="run-notes")
        gallery = gr.Gallery(label="Past runs", columns=6, height=200, elem_id="gallery")
        with gr.Row():
            run_choice = gr.Dropdown([], label="Run", elem_id="run-choice")
            replay_button = gr.Button("Replay", elem_id="replay")
        replay_status = gr.Markdown("", elem_id="replay-status")

        lora_inputs = [component for row in lora_rows for component in row]
        form_inputs = [prompt, seed, steps, width, height, guidance, mask_method, mask_step]

        def unpack(values):
            # (file or path, words, weight, scope) per slot; an uploaded file wins over a typed path.
            rows = [values[i : i + 5] for i in range(0, 5 * MAX_LORAS, 5)]
            loras = [
                (file or ((path or "").strip() if local_paths else "") or None, words, weight, scope)
                for file, path, words, weight, scope in rows
            ]
            rest = values[5 * MAX_LORAS :]
            form = dict(
                zip(
                    ("prompt", "seed", "steps", "width", "height", "guidance", "mask_method", "mask_step"),
                    rest,
                    strict=True,
                )
            )
            return loras, form

        def ensure(state):
            return state if state is not None else Session.new(root)

        def check(state, model_name, *values):
            state = ensure(state)
            loras, form = unpack(values)
            if not any(path for path, *_ in loras):
                return state, ""
            try:
                build_spec(state.folder / "check", model_name, loras, form, "freefuse").check()
            except Exception as error:
                return state, f"⚠️ {user_error(error)}"
            return state, "✓ Ready."

        def run_spec(spec, state=None, progress=None, stop_after_masks=False):
            """Check, load (one model at a time), run with a progress bar per step; the run's notes
            go to `state.notes`. Cancel (the page's button) stops it between two steps."""
            from .pipeline import FreeFuseWarning

            spec.check()
            total = (
                spec.settings.resolved_mask_step if stop_after_masks else spec.settings.num_inference_steps
            )
            cancel = state.cancel if state is not None else threading.Event()  # a new one per action

            def advance(pipeline, step, timestep, tensors):
                if cancel.is_set():
                    raise RunCancelled("Cancelled.")
                if progress is not None:
                    progress(
                        (step + 1, total), desc="stage 1" if stop_after_masks else "denoising", unit="steps"
                    )
                return {}

            with models.lock:
                pipeline = models.get(spec)
                from .pipeline import FreeFuse

                freefuse = FreeFuse(pipeline)
                try:
                    for lora in spec.loras:
                        freefuse.add_lora(
                            lora.path, words=lora.words, name=lora.name, weight=lora.weight, scope=lora.scope
                        )
                    freefuse.check_inputs(spec.settings, spec.masks)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        # The masks by their file, so that the manifest names it and replays.
                        output = freefuse.generate(
                            spec.settings,
                            masks=spec.masks,
                            callback_on_step_end=advance,
                            callback_on_step_end_tensor_inputs=(),
                            progress=False,
                            stop_after_masks=stop_after_masks,
                        )
                    if state is not None:
                        state.notes = [
                            str(w.message) for w in caught if issubclass(w.category, FreeFuseWarning)
                        ]
                    return output
                finally:
                    for name in list(freefuse.subjects):
                        freefuse.remove(name)

        @fails_as_message
        def find_masks(state, model_name, *values, progress=gr.Progress(track_tqdm=True)):
            state = ensure(state)
            state.cancel = threading.Event()
            loras, form = unpack(values)
            spec = build_spec(state.folder / "masks", model_name, loras, form, "freefuse")
            output = run_spec(spec, state, progress, stop_after_masks=True)
            if output.masks[0] is None:
                raise gr.Error("No subject LoRA: masks are made for LoRAs that act as a subject.")
            state.masks, state.preview, state.edited = output.masks[0], output.images[0], False
            names = state.masks.names
            overlay_image = state.masks.overlay(state.preview)
            return (
                state,
                overlay_image,
                "\n\n".join([summary(state.masks), *state.notes]),
                gr.update(choices=names, value=names[0]),
                editor_value(state, names[0]),
            )

        def editor_value(state, name):
            if state is None or state.masks is None or name not in state.masks.names:
                return None
            return {"background": mask_picture(state.masks[name]), "layers": [], "composite": None}

        @fails_as_message
        def apply_edit(state, name, value):
            if state is None or state.masks is None:
                raise gr.Error("Find the masks first (or generate once).")
            mask = edited_mask(value, state.masks.size)
            if mask is None:
                raise gr.Error(
                    "The editor holds no mask: choose a subject above, paint on its mask, then Apply."
                )
            state.masks, state.edited = replace_mask(state.masks, name, mask), True
            return state, state.masks.overlay(state.preview), summary(state.masks) + " (edited)"

        @fails_as_message
        def run_generate(state, model_name, *values, progress=gr.Progress(track_tqdm=True)):
            from .outputs import output_paths, write_outputs

            state = ensure(state)
            loras, form = unpack(values)
            state.cancel = threading.Event()
            number = len(state.runs) + 1
            while (state.folder / f"run-{number}").exists():  # a failed or cancelled attempt keeps its number
                number += 1
            folder = state.folder / f"run-{number}"
            folder.mkdir(parents=True)
            masks_path = None
            if state.edited and state.masks is not None:
                masks_path = folder / "masks.safetensors"
                folder.mkdir(parents=True, exist_ok=True)
                state.masks.save(masks_path)
            method = "masks" if masks_path is not None else "freefuse"
            spec = build_spec(
                folder, model_name, loras, form, method, str(masks_path) if masks_path else None
            )
            output = run_spec(spec, state, progress)
            notes = list(state.notes)
            merge = run_spec(build_spec(folder, model_name, loras, form, "merge"), state, progress)
            paths = output_paths(folder, "freefuse", 1)
            write_outputs(output, paths, overwrite=False)
            merge.images[0].save(folder / "merge.png")
            # The run as one download: image, masks, manifest and the LoRA files it names.
            archive = Path(shutil.make_archive(str(state.folder / f"freefuse-run-{number}"), "zip", folder))
            run = {"id": f"run {number}", "image": paths[0]["image"], "manifest": paths[0]["manifest"]}
            state.runs.append(run)
            masks_image = output.masks[0].overlay(output.images[0]) if output.masks[0] is not None else None
            items = [(str(r["image"]), r["id"]) for r in state.runs]
            return (
                state,
                merge.images[0],
                output.images[0],
                masks_image,
                [str(paths[0]["manifest"]), str(paths[0]["image"]), str(archive)],
                items,
                gr.update(choices=[r["id"] for r in state.runs], value=run["id"]),
                "\n\n".join(f"note: {note}" for note in notes),
            )

        @fails_as_message
        def replay(state, run_id):
            from .manifest import replay_spec

            if state is None or not state.runs:
                raise gr.Error("No run to replay yet: generate first.")
            state.cancel = threading.Event()
            run = next((r for r in state.runs if r["id"] == run_id), state.runs[-1])
            spec = replay_spec(run["manifest"])
            output = run_spec(spec, state)
            from .outputs import encode_outputs, output_paths

            replayed = encode_outputs(output, output_paths(state.folder / "replay", "freefuse", 1))[0]
            data = next(
                value
                for path, value in replayed.items()
                if path.suffix == ".png" and ".masks" not in path.name
            )
            same = data == Path(run["image"]).read_bytes()
            verdict = "the same image, byte for byte ✓" if same else "a different image ✗"
            return f"Replayed {run['id']} from its manifest: {verdict}"

        outputs_find = [session, overlay, status, subject, editor]
        find_event = find.click(
            find_masks, inputs=[session, model_box, *lora_inputs, *form_inputs], outputs=outputs_find
        )
        subject.change(
            lambda state, name: editor_value(state, name), inputs=[session, subject], outputs=editor
        )
        apply.click(apply_edit, inputs=[session, subject, editor], outputs=[session, overlay, status])
        generate_event = generate.click(
            run_generate,
            inputs=[session, model_box, *lora_inputs, *form_inputs],
            outputs=[
                session,
                merge_image,
                result_image,
                result_masks,
                manifest_file,
                gallery,
                run_choice,
                run_notes,
            ],
        )
        replay_event = replay_button.click(replay, inputs=[session, run_choice], outputs=replay_status)
        stop.click(
            lambda state: state.cancel.set() if state is not None else None,
            inputs=session,
            outputs=None,
            queue=False,
            cancels=[find_event, generate_event, replay_event],
        )
        # A session (its folder) from the page's first load, so Cancel has one to stop from the start.
        app.load(lambda state: ensure(state), inputs=session, outputs=session)
        for component in [model_box, *lora_inputs, *form_inputs]:
            # Outside the queue (no weights load), and only the last of a burst of keystrokes.
            component.change(
                check,
                inputs=[session, model_box, *lora_inputs, *form_inputs],
                outputs=[session, warnings_box],
                queue=False,
                trigger_mode="always_last",
            )
    app.queue(default_concurrency_limit=1)
    app.freefuse_root = root
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Serve `app` on `host:port` (localhost by default); files only from its session folders."""
    return app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(app.freefuse_root)],
        show_error=True,
        quiet=True,
    )
