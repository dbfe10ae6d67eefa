"""`freefuse ui`: a web page over the library for people who would rather look than type.

Add LoRA files (their trigger words filled in from the metadata, editable), find the masks (stage 1
alone), paint or erase a subject's mask, generate FreeFuse beside plain multi-LoRA (merge) with the
same seed, download each run's manifest, and replay a past run. This module is the page's layout
and the wiring of its events only; what each button does is `freefuse.workspace`'s, on the run
service, and is tested without a browser.

Needs `pip install freefuse[ui]` (Gradio).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .core.config import MAP_METHOD_NAMES
from .errors import describe_failure
from .runner import RunService
from .workspace import MAX_LORAS, Form, LoraSlot, Workspace, mask_picture, summary, trigger_words

log = logging.getLogger("freefuse.ui")
FORM_FIELDS = ("prompt", "seed", "steps", "width", "height", "guidance", "mask_method", "mask_step")


def as_page_error(function):
    """An action's failure as a message on the page (`gr.Error`), never a traceback; bugs are
    logged in full on the server."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            failure = describe_failure(error)
            if failure.kind == "internal":
                log.exception("freefuse ui: internal error")
                message = f"Internal error ({failure.message}); the server log has the details."
            else:
                message = failure.message
            raise gr.Error(message, print_exception=False) from None

    return wrapper


def _layout(model: str, local_paths: bool) -> SimpleNamespace:
    """The page's components (Gradio), laid out; returned by name for the wiring."""
    app = gr.Blocks(title="FreeFuse")
    with app:
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
                list(MAP_METHOD_NAMES), value="text-to-image", label="Mask method", elem_id="mask-method"
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
    names = {name: value for name, value in locals().items() if name not in ("model", "local_paths")}
    return SimpleNamespace(**names)


def editor_value(state, name: str | None):
    """What the mask editor shows for subject `name`: its mask, white inside, to paint on."""
    if state is None or state.masks is None or name not in state.masks.names:
        return None
    return {"background": mask_picture(state.masks[name]), "layers": [], "composite": None}


def _wire(page: SimpleNamespace, workspace: Workspace, local_paths: bool) -> None:
    """Each event of the page to its workspace action."""
    lora_inputs = [component for row in page.lora_rows for component in row]
    form_inputs = [page.prompt, page.seed, page.steps, page.width, page.height, page.guidance]
    form_inputs += [page.mask_method, page.mask_step]
    everything = [page.session, page.model_box, *lora_inputs, *form_inputs]

    def unpack(values) -> tuple[list[LoraSlot], Form]:
        # (file or path, words, weight, scope) per slot; an uploaded file wins over a typed path.
        rows = [values[i : i + 5] for i in range(0, 5 * MAX_LORAS, 5)]
        loras = [
            LoraSlot((file or ((path or "").strip() if local_paths else "") or None), words, weight, scope)
            for file, path, words, weight, scope in rows
        ]
        return loras, Form(**dict(zip(FORM_FIELDS, values[5 * MAX_LORAS :], strict=True)))

    def ensure(state):
        return state if state is not None else workspace.new_session()

    def stepper(progress, description: str):
        return lambda done, total: progress((done, total), desc=description, unit="steps")

    def check(state, model, *values):
        state = ensure(state)
        loras, form = unpack(values)
        if not any(slot.path for slot in loras):
            return state, ""
        try:
            workspace.check(state, model, loras, form)
        except Exception as error:
            return state, f"⚠️ {describe_failure(error).message}"
        return state, "✓ Ready."

    @as_page_error
    def find_masks(state, model, *values, progress=gr.Progress(track_tqdm=True)):
        state = ensure(state)
        names = workspace.find_masks(state, model, *unpack(values), on_step=stepper(progress, "stage 1"))
        return (
            state,
            state.masks.overlay(state.preview),
            "\n\n".join([summary(state.masks), *state.notes]),
            gr.update(choices=names, value=names[0]),
            editor_value(state, names[0]),
        )

    @as_page_error
    def apply_edit(state, name, value):
        state = ensure(state)
        workspace.apply_edit(state, name, value)
        return state, state.masks.overlay(state.preview), summary(state.masks) + " (edited)"

    @as_page_error
    def run_generate(state, model, *values, progress=gr.Progress(track_tqdm=True)):
        state = ensure(state)
        run = workspace.generate(state, model, *unpack(values), on_step=stepper(progress, "denoising"))
        items = [(str(r["image"]), r["id"]) for r in state.runs]
        notes = "\n\n".join(f"note: {note}" for note in run.notes)
        choices = gr.update(choices=[r["id"] for r in state.runs], value=run.run_id)
        return state, run.merge, run.image, run.masks, run.downloads, items, choices, notes

    @as_page_error
    def replay(state, run_id):
        return workspace.replay(ensure(state), run_id)

    find_event = page.find.click(
        find_masks, inputs=everything, outputs=[page.session, page.overlay, page.status, page.subject, page.editor]
    )
    page.subject.change(editor_value, inputs=[page.session, page.subject], outputs=page.editor)
    page.apply.click(
        apply_edit, inputs=[page.session, page.subject, page.editor], outputs=[page.session, page.overlay, page.status]
    )
    results = [page.merge_image, page.result_image, page.result_masks, page.manifest_file, page.gallery]
    generate_event = page.generate.click(
        run_generate, inputs=everything, outputs=[page.session, *results, page.run_choice, page.run_notes]
    )
    replay_event = page.replay_button.click(
        replay, inputs=[page.session, page.run_choice], outputs=page.replay_status
    )
    page.stop.click(
        lambda state: state.cancel.set() if state is not None else None,
        inputs=page.session,
        outputs=None,
        queue=False,
        cancels=[find_event, generate_event, replay_event],
    )
    # A session (its folder) from the page's first load, so Cancel has one to stop from the start.
    page.app.load(ensure, inputs=page.session, outputs=page.session)
    for component in [page.model_box, *lora_inputs, *form_inputs]:
        # Outside the queue (no weights load), and only the last of a burst of keystrokes.
        component.change(
            check,
            inputs=everything,
            outputs=[page.session, page.warnings_box],
            queue=False,
            trigger_mode="always_last",
        )


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
    root = Path(root or tempfile.mkdtemp(prefix="freefuse-ui-"))
    workspace = Workspace(root, RunService(device=device, dtype=dtype))
    page = _layout(model, local_paths)
    with page.app:
        _wire(page, workspace, local_paths)
    page.app.queue(default_concurrency_limit=1)
    page.app.freefuse_root = root
    page.app.freefuse_workspace = workspace
    return page.app


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
