"""`freefuse ui`: a web page over the library for people who would rather look than type.

Add LoRA files (their trigger words filled in from the metadata, editable), find the masks (stage 1
alone), paint or erase a subject's mask, generate FreeFuse beside plain multi-LoRA (merge) with the
same seed, download each run's manifest, and replay a past run. This module is the page's layout
and the wiring of its events only; what each button does, and what a visitor may reach, is
`freefuse.workspace`'s, on the run service, tested without a browser.

Needs `pip install freefuse[ui]` (Gradio).
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from PIL import Image

from .core.config import MAP_METHOD_NAMES
from .errors import describe_failure
from .runner import RunService
from .shapesworld.model import lora_path
from .workspace import MAX_LORAS, Form, LoraSlot, PageLimits, Workspace, mask_picture, summary

log = logging.getLogger("freefuse.ui")
FORM_FIELDS = (
    "prompt",
    "seed",
    "steps",
    "width",
    "height",
    "guidance",
    "mask_method",
    "mask_step",
    "attn_bias",
    "init_image",
    "strength",
    "inpaint_mask",
    "control_image",
    "control_type",
    "control_scale",
    "controlnet",
    "reference_image",
    "reference_scale",
    "ip_adapter_model",
    "redux_model",
)
#: Pictures smaller than this (a side, pixels) are shown enlarged, pixels kept sharp; downloads keep their size.
SHOWN_SIDE = 320
#: The ShapesWorld example: the committed model and two of its subject LoRAs (files the page offers).
EXAMPLE = {
    "model": "shapesworld",
    "loras": [("zorblax", "zorblax"), ("quiffle", "quiffle")],
    "prompt": "a zorblax and a quiffle",
    "size": 64,
    "steps": 20,
}
NO_LOGIN = (
    "⚠️ **This page has no login.** Anyone who can reach this address can run the model, upload LoRA "
    "files and see the runs of their own session (not other people's). Start it with `--auth USER:PASSWORD` "
    "to ask for a login."
)


def page_message(error: BaseException) -> str:
    """A failure as the page says it: the user's mistake as the library words it (without the
    command line's flag names), anything else short (the server log has the traceback)."""
    failure = describe_failure(error)
    if failure.kind == "internal":
        log.exception("freefuse ui: internal error")
        return f"⚠️ Internal error ({failure.message}); the server log has the details."
    text = re.sub(r"\s*\(CLI: [^)]*\)", "", failure.message)
    return ("⏹ " if failure.kind == "cancelled" else "⚠️ ") + text


def shown(image):
    """`image` enlarged for the page when it is small (nearest: the pixels stay as they are)."""
    if image is None or min(image.size) >= SHOWN_SIDE:
        return image
    factor = -(-SHOWN_SIDE // min(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def action(workspace: Workspace, rest: int):
    """An event handler's failure as a message on the page (outputs `[session, message, *rest]`):
    the `rest` outputs keep what they showed, no error badges and no traceback for a mistake."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(state, *args, **kwargs):
            state = state if state is not None else workspace.new_session()
            try:
                message, *outputs = function(state, *args, **kwargs)
            except Exception as error:
                return (state, page_message(error), *[gr.skip()] * rest)
            return (state, message, *outputs)

        # Read by tests: each wired action's outputs must be [session, message] and `rest` more.
        wrapper.rest_outputs = rest
        return wrapper

    return decorate


def _model_choice(workspace: Workspace, offered: dict[str, str], label: str, elem_id: str):
    """A box for a model the page runs beside the base one: typed (a local page), or picked among the
    ones it offers by their shown names ("none": no such model)."""
    if workspace.local_paths:
        return gr.Textbox("", label=f"{label} (file, folder or id)", elem_id=elem_id)
    return gr.Dropdown([("none", ""), *offered], value="", label=label, elem_id=elem_id)


def _lora_rows(workspace: Workspace) -> list[tuple]:
    rows = []
    with gr.Accordion("LoRAs", open=True):
        for index in range(MAX_LORAS):
            with gr.Row():
                with gr.Column():
                    file = gr.File(label=f"LoRA {index + 1}", file_types=[".safetensors"], elem_id=f"lora-file-{index}")
                    path = gr.Textbox(
                        label="or its path on this machine",
                        elem_id=f"lora-path-{index}",
                        max_lines=1,
                        visible=workspace.local_paths,
                    )
                words = gr.Textbox(label="Trigger words (comma-separated)", elem_id=f"lora-words-{index}")
                weight = gr.Number(1.0, label="Weight", elem_id=f"lora-weight-{index}")
                scope = gr.Radio(["subject", "global"], value="subject", label="Acts", elem_id=f"lora-scope-{index}")
            rows.append((file, path, words, weight, scope))
    return rows


def _layout(workspace: Workspace, public_without_login: bool) -> SimpleNamespace:
    """The page's components (Gradio), laid out; returned by name for the wiring."""
    app = gr.Blocks(title="FreeFuse")
    with app:
        session = gr.State(None)
        gr.Markdown("# FreeFuse\nSeveral subject LoRAs in one picture, each inside its own mask.")
        gr.Markdown(NO_LOGIN if public_without_login else "", elem_id="no-login")
        with gr.Row():
            if workspace.local_paths:
                label = "Model (folder, Hugging Face id, checkpoint file, tiny or shapesworld)"
                model_box = gr.Textbox(workspace.models[0], label=label, elem_id="model")
            else:
                model_box = gr.Dropdown(workspace.models, value=workspace.models[0], label="Model", elem_id="model")
            example = gr.Button("Load the ShapesWorld example", elem_id="example")
        lora_rows = _lora_rows(workspace)
        prompt = gr.Textbox("Alice hugging Bob in the snow", label="Prompt", elem_id="prompt")
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
            steps = gr.Number(8, label="Steps", precision=0, elem_id="steps")
            width = gr.Number(256, label="Width", precision=0, elem_id="width")
            height = gr.Number(256, label="Height", precision=0, elem_id="height")
            guidance = gr.Textbox("", label="Guidance (empty: the model's)", elem_id="guidance")
            mask_method = gr.Dropdown(list(MAP_METHOD_NAMES), value="text-to-image", label="Mask method", elem_id="mask-method")
            mask_step = gr.Number(0, label="Mask step (0: default)", precision=0, elem_id="mask-step")
            attn_bias = gr.Textbox("", label="Attention bias (empty: the model's; 0: off)", elem_id="attn-bias")
        with gr.Accordion("Start from a picture, repaint a region, ControlNet, reference picture", open=False):
            with gr.Row():
                # type="filepath" with no image_mode: the upload's own path reaches the workspace,
                # which takes only files Gradio received (as for LoRA files) and reads them bounded.
                picture = {"type": "filepath", "image_mode": None, "format": "png"}
                init_image = gr.Image(label="Init picture (img2img)", elem_id="init-image", **picture)
                inpaint_mask = gr.Image(label="Inpainting mask (white: repaint)", elem_id="inpaint-mask", **picture)
                control_image = gr.Image(label="Control picture", elem_id="control-image", **picture)
            with gr.Row():
                strength = gr.Number(0, label="Strength (0: the model's default)", elem_id="strength")
                control_type = gr.Textbox("", label="Control type (union: canny, depth, pose…)", elem_id="control-type")
                control_scale = gr.Number(1.0, label="Control scale", elem_id="control-scale")
                if workspace.local_paths:
                    controlnet = gr.Textbox("", label="ControlNet (folder or id)", elem_id="controlnet")
                else:
                    offered = [("none", ""), *workspace.controlnets]  # shown names; "" (none) also when none is offered
                    value = next(iter(workspace.controlnets), "")
                    controlnet = gr.Dropdown(offered, value=value, label="ControlNet", elem_id="controlnet")
            with gr.Row():
                reference_image = gr.Image(label="Reference picture (FLUX.1)", elem_id="reference-image", **picture)
                reference_scale = gr.Number(1.0, label="Reference scale", elem_id="reference-scale")
                ip_adapter_model = _model_choice(workspace, workspace.ip_adapters, "IP-Adapter", "ip-adapter-model")
                redux_model = _model_choice(workspace, workspace.reduxes, "Redux model", "redux-model")
        warnings_box = gr.Markdown("", elem_id="warnings")
        with gr.Row():
            find = gr.Button("Find masks", elem_id="find-masks")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
        message = gr.Markdown("", elem_id="page-message")
        status = gr.Markdown(summary(None), elem_id="mask-summary")
        with gr.Row():
            overlay = gr.Image(label="Masks over the preview", type="pil", interactive=False, elem_id="overlay")
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
            merge_image = gr.Image(label="merge (plain multi-LoRA)", type="pil", interactive=False, elem_id="merge-image")
            result_image = gr.Image(label="FreeFuse", type="pil", interactive=False, elem_id="result-image")
            result_masks = gr.Image(label="FreeFuse masks", type="pil", interactive=False, elem_id="result-masks")
        manifest_file = gr.File(
            label="Manifest and image of this run", file_count="multiple", interactive=False, elem_id="manifest"
        )
        run_notes = gr.Markdown("", elem_id="run-notes")
        gallery = gr.Gallery(label="Past runs", columns=6, height=200, elem_id="gallery")
        with gr.Row():
            run_choice = gr.Dropdown([], label="Run", elem_id="run-choice")
            replay_button = gr.Button("Replay", elem_id="replay")
        replay_status = gr.Markdown("", elem_id="replay-status")
    names = {name: value for name, value in locals().items() if name not in ("workspace", "public_without_login")}
    return SimpleNamespace(**names)


def editor_value(state, name: str | None):
    """What the mask editor shows for subject `name`: its mask, white inside, enlarged to paint on."""
    if state is None or state.masks is None or name not in state.masks.names:
        return None
    picture = shown(Image.fromarray(mask_picture(state.masks[name])))
    return {"background": picture, "layers": [], "composite": None}


def _unpack(values) -> tuple[list[LoraSlot], Form]:
    # (file, typed path, words, weight, scope) per slot, then the form's fields.
    rows = [values[i : i + 5] for i in range(0, 5 * MAX_LORAS, 5)]
    loras = [LoraSlot(file or None, words, weight, scope, typed) for file, typed, words, weight, scope in rows]
    return loras, Form(**dict(zip(FORM_FIELDS, values[5 * MAX_LORAS :], strict=True)))


def _example(workspace: Workspace) -> list:
    """The ShapesWorld example's values for [model, *every LoRA row, *form] (rows past it emptied)."""
    rows = []
    for index in range(MAX_LORAS):
        if index < len(EXAMPLE["loras"]):
            name, word = EXAMPLE["loras"][index]
            rows += [str(lora_path(name)), "", word, 1.0, "subject"]
        else:
            rows += [None, "", "", 1.0, "subject"]
    size, steps = EXAMPLE["size"], EXAMPLE["steps"]
    form = [EXAMPLE["prompt"], 0, steps, size, size, "", "text-to-image", 0, "", None, 0, None, None, "", 1.0, ""]
    return [EXAMPLE["model"], *rows, *form]


def _wire_runs(page: SimpleNamespace, workspace: Workspace, everything: list) -> list:
    """Find masks, apply an edit, generate, replay; returns the events Cancel stops."""

    def stepper(progress, description: str):
        return lambda done, total: progress((done, total), desc=description, unit="steps")

    @action(workspace, rest=4)
    def find_masks(state, model, *values, progress=gr.Progress(track_tqdm=True)):
        names = workspace.find_masks(state, model, *_unpack(values), on_step=stepper(progress, "stage 1"))
        text = "\n\n".join([summary(state.masks), *state.notes])
        return "", shown(state.masks.overlay(state.preview)), text, gr.update(choices=names, value=names[0]), editor_value(state, names[0])

    @action(workspace, rest=2)
    def apply_edit(state, name, value):
        workspace.apply_edit(state, name, value)
        return "", shown(state.masks.overlay(state.preview)), summary(state.masks) + " (edited)"

    @action(workspace, rest=7)
    def run_generate(state, model, *values, progress=gr.Progress(track_tqdm=True)):
        run = workspace.generate(state, model, *_unpack(values), on_step=stepper(progress, "denoising"))
        items = [(workspace.servable(Path(r["image"])), r["id"]) for r in state.runs]
        notes = "\n\n".join(f"note: {note}" for note in run.notes)
        choices = gr.update(choices=[r["id"] for r in state.runs], value=run.run_id)
        downloads = [workspace.servable(Path(path)) for path in run.downloads]
        images = [shown(run.merge), shown(run.image), shown(run.masks)]
        return "", *images, downloads, items, choices, notes

    @action(workspace, rest=1)
    def replay(state, run_id):
        return "", workspace.replay(state, run_id)

    finding = page.find.click(
        find_masks,
        api_name="find_masks",
        inputs=everything,
        outputs=[page.session, page.message, page.overlay, page.status, page.subject, page.editor],
    )
    page.subject.change(editor_value, inputs=[page.session, page.subject], outputs=page.editor)
    page.apply.click(
        apply_edit,
        api_name="apply_edit",
        inputs=[page.session, page.subject, page.editor],
        outputs=[page.session, page.message, page.overlay, page.status],
    )
    results = [page.merge_image, page.result_image, page.result_masks, page.manifest_file, page.gallery]
    generating = page.generate.click(
        run_generate,
        api_name="generate",
        inputs=everything, outputs=[page.session, page.message, *results, page.run_choice, page.run_notes]
    )
    replaying = page.replay_button.click(
        replay, api_name="replay", inputs=[page.session, page.run_choice], outputs=[page.session, page.message, page.replay_status]
    )
    return [finding, generating, replaying]


def _wire(page: SimpleNamespace, workspace: Workspace) -> None:
    """Each event of the page to its workspace action."""
    lora_inputs = [component for row in page.lora_rows for component in row]
    form_inputs = [page.prompt, page.seed, page.steps, page.width, page.height, page.guidance]
    form_inputs += [page.mask_method, page.mask_step, page.attn_bias, page.init_image, page.strength, page.inpaint_mask]
    form_inputs += [page.control_image, page.control_type, page.control_scale, page.controlnet]
    form_inputs += [page.reference_image, page.reference_scale, page.ip_adapter_model, page.redux_model]
    everything = [page.session, page.model_box, *lora_inputs, *form_inputs]
    for index, (file, path, words, _, _) in enumerate(page.lora_rows):
        file.change(
            lambda value: workspace.trigger_words(LoraSlot(path=value)),
            inputs=file,
            outputs=words,
            api_name=f"lora_words_{index}",
        )
        if workspace.local_paths:  # no event reads a server path on a page served beyond this machine
            path.change(
                lambda value: workspace.trigger_words(LoraSlot(typed=value)),
                inputs=path,
                outputs=words,
                trigger_mode="always_last",
                api_visibility="private",
            )
    page.example.click(
        lambda: _example(workspace),
        inputs=None,
        outputs=[page.model_box, *lora_inputs, *form_inputs],
        api_visibility="private",
    )

    def check(state, model, *values):
        state = state if state is not None else workspace.new_session()
        loras, form = _unpack(values)
        if not any(slot.path or slot.typed for slot in loras):
            return state, ""
        try:
            workspace.check(state, model, loras, form)
        except Exception as error:
            return state, page_message(error)
        return state, "✓ Ready."

    def cancel(state):
        if state is None:
            return "Nothing is running."
        state.cancel.set()
        return "⏹ Cancelled: the run stops between two steps; nothing of it is kept."

    runs = _wire_runs(page, workspace, everything)
    page.stop.click(cancel, inputs=page.session, outputs=page.message, queue=False, cancels=runs)
    for component in [page.model_box, *lora_inputs, *form_inputs]:
        # Queued apart from the runs, one at a time (a flood of checks cannot slow a run down more than
        # one check does), and only the last of a burst of keystrokes.
        component.change(
            check,
            inputs=everything,
            outputs=[page.session, page.warnings_box],
            trigger_mode="always_last",
            concurrency_id="check",
            concurrency_limit=1,
            api_visibility="private",
        )


def build_app(
    model: str = "tiny",
    root: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    local_paths: bool = True,
    models: list[str] | None = None,
    public_without_login: bool = False,
    limits: PageLimits | None = None,
    controlnets: list[str] | None = None,
    ip_adapters: list[str] | None = None,
    reduxes: list[str] | None = None,
):
    """The Gradio app; `root` holds one folder per browser session (default: a temporary folder).

    `local_paths`: offer boxes for paths on the server's machine (LoRAs, any model); the CLI turns
    it off when the page is served beyond this machine. Then visitors pick among `models` (default:
    `model` and ShapesWorld) and upload their LoRA files. `public_without_login`: say on the page
    that it has no login. `limits`: storage bounds (`PageLimits`). `controlnets`, `ip_adapters`,
    `reduxes`: the models the page offers for control and reference pictures (a local page also
    takes typed ones).
    """
    root = Path(root or tempfile.mkdtemp(prefix="freefuse-ui-"))
    offered = list(dict.fromkeys([*(models or [model]), EXAMPLE["model"]]))
    workspace = Workspace(
        root,
        RunService(device=device, dtype=dtype),
        local_paths=local_paths,
        models=offered,
        examples=[lora_path(name) for name, _ in EXAMPLE["loras"]],
        limits=limits,
        controlnets=controlnets,
        ip_adapters=ip_adapters,
        reduxes=reduxes,
    )
    page = _layout(workspace, public_without_login)
    # An upload is a file Gradio's upload route took (its own record), not any path a value names.
    workspace.received = lambda path: str(path) in page.app.upload_file_set
    with page.app:
        _wire(page, workspace)
    page.app.queue(default_concurrency_limit=1)
    page.app.freefuse_root = root
    page.app.freefuse_workspace = workspace
    return page.app


def launch(
    app,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    auth: tuple[str, str] | None = None,
    max_upload: str = "2gb",
):
    """Serve `app` on `host:port` (localhost by default). No server folder is shared: downloads are
    the files each event returns, which Gradio copies into its own cache under unguessable names."""
    return app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        auth=auth,
        max_file_size=max_upload,
        show_error=False,
        quiet=True,
    )


__all__ = ["EXAMPLE", "build_app", "launch", "page_message"]
