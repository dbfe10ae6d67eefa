"""What the web page does, without the page: sessions, their folders, and each button's action.

`freefuse.ui` lays out the page and wires its events to a `Workspace`; everything a button does
happens here, on the run service, and is tested without a browser. Each browser session gets
its own random folder below the workspace's root (made at its first action), so one visitor's
runs cannot be seen or replaced by another's. A run's folder holds everything its manifest names
(the LoRA files are hard-linked in), so a downloaded run replays anywhere; its manifest records
no server path.

What a visitor can reach is bounded here, whatever the page sends: a LoRA is a file Gradio itself
received as an upload (a file value naming any other path is refused), a path on the server only
when the page is served to this machine alone (`local_paths`), an example file the workspace
offers, or nothing; a condition picture (init picture, inpainting mask, control picture) is an
upload Gradio received on every page, read bounded and kept as PNG in the run's folder; the model
and a ControlNet are among the workspace's `models` and `controlnets` unless paths are local; storage
per session and in all is bounded and idle sessions are removed (`PageLimits`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .conditions import ConditionsSpec, read_image
from .core import MaskSet
from .errors import SettingsError
from .lora import adapter_name, check_lora_path, describe_lora
from .outputs import encode_outputs, output_paths, write_outputs
from .runner import RunService, StepCallback
from .settings import GenerationSettings
from .spec import LoraSpec, RunSpec, replay_spec

#: LoRA slots on the page.
MAX_LORAS = 4
#: Modes an uploaded picture may have; it is converted (RGB, or grey for a mask) before the run reads it.
UPLOAD_MODES = ("RGB", "RGBA", "L", "LA", "1", "P")


@dataclass
class LoraSlot:
    """One LoRA row of the page: an uploaded file (the path Gradio gives), or a path typed on this
    machine, or an example's file; its words, weight and scope."""

    path: str | None = None
    words: str = ""
    weight: float | None = 1.0
    scope: str = "subject"
    typed: str | None = None


@dataclass(frozen=True)
class PageLimits:
    """What one visitor, and all of them, may keep on the server."""

    max_upload_bytes: int = 2 << 30  # one uploaded LoRA file (Gradio refuses larger uploads first)
    max_session_bytes: int = 4 << 30  # one session's folder: its runs, linked LoRAs, zips
    max_total_bytes: int = 20 << 30  # every session's folder together
    session_ttl_s: float = 24 * 3600  # a session folder unused for this long is removed


@dataclass
class Form:
    """The page's run settings, as its fields give them (numbers may be empty)."""

    prompt: str = ""
    seed: float | None = 0
    steps: float | None = 8
    width: float | None = 256
    height: float | None = 256
    guidance: str | float | None = ""
    mask_method: str = "text-to-image"
    mask_step: float | None = 0
    attn_bias: str | float | None = ""  # empty: the model's attention bias; 0: off
    # Conditions (all optional): pictures as the page's image widgets give them (upload paths).
    init_image: str | None = None
    strength: float | None = 0  # 0 or empty: the model's default
    inpaint_mask: str | None = None
    control_image: str | None = None
    control_type: str = ""
    control_scale: float | None = 1.0
    controlnet: str = ""
    reference_image: str | None = None  # read by the IP-Adapter or the Redux model picked
    reference_scale: float | None = 1.0
    ip_adapter_model: str = ""
    redux_model: str = ""


@dataclass
class Session:
    """One browser session: its own folder (made at its first action), the masks it found or
    painted, its runs."""

    folder: Path
    masks: MaskSet | None = None  # on the image grid, from "Find masks" and edits
    preview: object = None  # the PIL picture the masks were found on
    edited: bool = False
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the last run's notes, shown under it
    cancel: threading.Event = field(default_factory=threading.Event)

    def fresh_cancel(self) -> threading.Event:
        """A new cancel flag for the action about to start (an old Cancel must not stop it)."""
        self.cancel = threading.Event()
        return self.cancel


@dataclass
class GeneratedRun:
    """What "Generate" shows: merge beside FreeFuse, FreeFuse's masks, the run's files and notes."""

    merge: object
    image: object
    masks: object
    downloads: list[str]
    notes: list[str]
    run_id: str


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


def replace_mask(masks: MaskSet, name: str, mask: torch.Tensor) -> MaskSet:
    """`masks` with subject `name`'s mask replaced; the painted pixels leave the other subjects."""
    stacked = masks.masks.clone()
    index = masks.names.index(name)
    stacked[index] = mask
    for other in range(len(masks.names)):
        if other != index:
            stacked[other] = stacked[other] * (1 - mask)
    return MaskSet(list(masks.names), stacked)


def summary(masks: MaskSet | None) -> str:
    if masks is None:
        return "No masks yet: press **Find masks**, or **Generate** to find them during the run."
    areas = ", ".join(
        f"{name} {float(mask.mean()):.0%}" for name, mask in zip(masks.names, masks.masks, strict=True)
    )
    return f"Masks: {areas}"


class Workspace:
    """The page's state and actions: a root folder of sessions and one run service they share.

    Args:
        root: the folder holding one folder per session.
        service: the run service (one loaded model at a time; runs take turns).
        received: whether Gradio itself received a file as an upload (its upload route's record); a
            file value naming anything else is refused, wherever Gradio put a copy of it.
        local_paths: the page is served to this machine alone: paths on it may be typed (LoRAs,
            models). Otherwise only uploads, the examples, and `models`.
        models: the models a visitor may pick (the first is the default); any with `local_paths`.
        examples: files the page itself offers (the ShapesWorld example's LoRAs).
        limits: storage bounds.
        controlnets: the ControlNets a visitor may pick (folders or hub ids, shown by name); any with
            `local_paths`.
        ip_adapters, reduxes: the IP-Adapters and Redux models a reference picture may be read by
            (files, folders or hub ids, shown by name); any with `local_paths`.
    """

    def __init__(
        self,
        root: Path,
        service: RunService,
        received: Callable[[Path], bool] | None = None,
        local_paths: bool = True,
        models: list[str] | None = None,
        examples: list[Path] | None = None,
        limits: PageLimits | None = None,
        controlnets: list[str] | None = None,
        ip_adapters: list[str] | None = None,
        reduxes: list[str] | None = None,
    ) -> None:
        self.controlnets = _by_shown_name(controlnets)
        self.ip_adapters = _by_shown_name(ip_adapters)
        self.reduxes = _by_shown_name(reduxes)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.service = service
        self.received = received or (lambda path: False)
        self.local_paths = local_paths
        self.models = list(models or ["tiny"])
        self.examples = {Path(path).resolve() for path in examples or []}
        self.limits = limits or PageLimits()

    def new_session(self) -> Session:
        """A session whose folder is made at its first action (a page load alone writes nothing)."""
        return Session(folder=self.root / secrets.token_hex(16))  # unguessable, one per session

    # -- what a visitor may name ---------------------------------------------------------------------
    def lora_file(self, slot: LoraSlot) -> Path | None:
        """The file a LoRA row names, if the visitor may use it: an upload Gradio received, an
        example, or (local pages only) a typed path. Anything else is refused by name."""
        if slot.path:
            path = Path(slot.path).resolve()
            if not self.received(path) and path not in self.examples:
                raise SettingsError(
                    "A LoRA must be a file uploaded through this page; this one was not received as an upload."
                )
            if not path.is_file():
                raise SettingsError("The uploaded LoRA file is gone (uploads expire); upload it again.")
            if path.stat().st_size > self.limits.max_upload_bytes:
                raise SettingsError(f"The uploaded LoRA is larger than {_mib(self.limits.max_upload_bytes)}, this page's limit.")
            return path
        typed = (slot.typed or "").strip()
        if typed and not self.local_paths:
            raise SettingsError("This page takes uploaded LoRA files only (paths on the server are off).")
        return Path(typed).expanduser() if typed else None

    def trigger_words(self, slot: LoraSlot) -> str:
        """The words the row's LoRA file names in its metadata (comma-separated); "" when it names
        none or may not be read."""
        try:
            path = self.lora_file(slot)
            return ", ".join(describe_lora(path)["trigger_words"]) if path is not None else ""
        except (OSError, ValueError):
            return ""

    def model(self, name: str) -> str:
        """`name` if the visitor may run it: one of `models`, or anything on a local page."""
        name = (name or "").strip()
        if name in self.models or (self.local_paths and name):
            return name
        raise SettingsError(f"This page runs {', '.join(self.models)}; pick one of them.")

    def controlnet(self, name: str) -> str:
        """The ControlNet a visitor names: one the page offers (by its shown name), or on a local
        page any typed folder or id."""
        return self._offered(name, self.controlnets, "ControlNets", "the control picture")

    def _offered(self, name: str, offered: dict[str, str], what: str, without: str) -> str:
        name = (name or "").strip()
        if name in offered:
            return offered[name]
        if self.local_paths and name:
            return name
        raise SettingsError(f"This page's {what} are: {', '.join(offered) or 'none'}; pick one of them (or leave {without} out).")

    def condition_image(self, value, what: str) -> Path:
        """The file a picture widget names, if the visitor may use it: an upload Gradio received
        (on every page, local or not: the widget only ever sends uploads), not over the upload
        limit. Anything else is refused by name, as a LoRA row's file is."""
        path = Path(str(value)).resolve()
        if not self.received(path):
            raise SettingsError(f"The {what} must be a picture uploaded through this page; this one was not received as an upload.")
        if not path.is_file():
            raise SettingsError(f"The uploaded {what} is gone (uploads expire); upload it again.")
        if path.stat().st_size > self.limits.max_upload_bytes:
            raise SettingsError(f"The uploaded {what} is larger than {_mib(self.limits.max_upload_bytes)}, this page's limit.")
        return path

    def conditions(self, folder: Path, form: Form) -> ConditionsSpec | None:
        """The form's pictures (uploads, checked as LoRA uploads are, then read bounded as any
        condition image is) written as PNG into `folder/conditions`, so that the run's folder holds
        every file its manifest names, as the conditions of a run; None without any. The init and
        control pictures are kept as RGB, the mask as grey (white: repainted)."""
        pictures = {
            "init": form.init_image,
            "mask": form.inpaint_mask,
            "control": form.control_image,
            "reference": form.reference_image,
        }
        if all(picture in (None, "") for picture in pictures.values()):
            return None
        labels = {"init": "init picture", "mask": "inpainting mask", "control": "control picture", "reference": "reference picture"}
        saved = {}
        for name, picture in pictures.items():
            if picture in (None, ""):
                continue
            source = self.condition_image(picture, labels[name])
            image = read_image(source, f"The {labels[name]}", UPLOAD_MODES).image
            path = folder / "conditions" / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.convert("L" if name == "mask" else "RGB").save(path)
            saved[name] = str(path)
        values: dict = {}
        if "init" in saved:
            values["init_image"] = saved["init"]
            if form.strength not in (None, "", 0):
                values["strength"] = float(form.strength)
        if "mask" in saved:
            values["inpaint_mask"] = saved["mask"]
        if "control" in saved:
            scale = 1.0 if form.control_scale in (None, "") else float(form.control_scale)
            values["controls"] = [{"type": (form.control_type or "").strip() or None, "image": saved["control"], "scale": scale}]
            values["controlnets"] = [self.controlnet(form.controlnet)]
        if "reference" in saved:
            values.update(self._reference(form, saved["reference"]))
        return ConditionsSpec.parse(values, "the page's pictures")

    def _reference(self, form: Form, picture: str) -> dict:
        """The reference picture's condition: read by the IP-Adapter or the Redux model picked (one)."""
        scale = 1.0 if form.reference_scale in (None, "") else float(form.reference_scale)
        adapter, redux = (form.ip_adapter_model or "").strip(), (form.redux_model or "").strip()
        if bool(adapter) == bool(redux):
            raise SettingsError(
                "A reference picture is read by an IP-Adapter or by a Redux model: pick one of them (not both), or "
                "leave the reference picture out."
            )
        if adapter:
            source = self._offered(adapter, self.ip_adapters, "IP-Adapters", "the reference picture")
            return {"ip_adapter": picture, "ip_adapter_scale": scale, "ip_adapter_model": source}
        source = self._offered(redux, self.reduxes, "Redux models", "the reference picture")
        return {"redux": picture, "redux_scale": scale, "redux_model": source}

    # -- storage -------------------------------------------------------------------------------------
    def _open(self, session: Session) -> None:
        """The session's folder, made now; old sessions removed and storage checked first."""
        self._prune(keep=session.folder)
        used = _size(session.folder)
        if used > self.limits.max_session_bytes:
            raise SettingsError(
                f"This session keeps {_mib(used)} of runs, its limit is {_mib(self.limits.max_session_bytes)}; "
                "reload the page for a new session (this one's runs stay downloadable until it expires)."
            )
        if _size(self.root) > self.limits.max_total_bytes:
            raise SettingsError("The server's storage for this page is full; try again later.")
        session.folder.mkdir(parents=True, exist_ok=True)

    def _prune(self, keep: Path) -> None:
        """Remove session folders unused for `session_ttl_s`, then the oldest while over the total limit."""
        folders = sorted(
            (folder for folder in self.root.iterdir() if folder.is_dir() and folder != keep),
            key=lambda folder: folder.stat().st_mtime,
        )
        now = time.time()
        total = _size(self.root)
        for folder in folders:
            expired = now - folder.stat().st_mtime > self.limits.session_ttl_s
            if expired or total > self.limits.max_total_bytes:
                total -= _size(folder)
                shutil.rmtree(folder, ignore_errors=True)

    def servable(self, path: Path) -> str:
        """`path` where Gradio picks up what an event returns (the system's temp folder or the working
        folder); a copy there when the root lies elsewhere. No server folder is shared with visitors."""
        resolved = Path(path).resolve()
        for base in (Path(tempfile.gettempdir()).resolve(), Path.cwd().resolve()):
            if resolved.is_relative_to(base):
                return str(resolved)
        staged = Path(tempfile.gettempdir()) / "freefuse-downloads" / resolved.relative_to(self.root.resolve())
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(resolved, staged)
        return str(staged)

    # -- a form as a run -----------------------------------------------------------------------------
    def spec(
        self,
        folder: Path,
        model: str,
        loras: list[LoraSlot],
        form: Form,
        method: str,
        masks: str | None = None,
    ) -> RunSpec:
        """A `RunSpec` from the page's fields. The LoRA files are linked (or copied) into
        `folder/loras`, so that a run's folder holds everything its manifest names."""
        for key, label in (("seed", "Seed"), ("steps", "Steps"), ("width", "Width"), ("height", "Height")):
            if getattr(form, key) in (None, ""):
                raise SettingsError(f"{label} is empty; enter a number.")
        model = self.model(model)
        specs: list[LoraSpec] = []
        taken: set[str] = set()
        for slot in loras:
            source = self.lora_file(slot)
            if source is None:
                continue
            name = adapter_name(source, taken)
            taken.add(name)
            # Any file named must be a LoRA (a regular safetensors file with a sane header) before
            # anything is linked into the session's folder.
            check_lora_path(source)
            kept = folder / "loras" / f"{name}.safetensors"
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.unlink(missing_ok=True)  # a new file under an old name must not find the old weights
            try:
                os.link(source, kept)  # no second copy of a large file where the disk allows
            except OSError:
                shutil.copyfile(source, kept)
            words = [word.strip() for word in (slot.words or "").split(",") if word.strip()] or None
            weight = float(slot.weight if slot.weight is not None else 1.0)
            specs.append(LoraSpec(path=str(kept), words=words, weight=weight, scope=slot.scope or "subject", name=name))
        settings = GenerationSettings(
            prompt=form.prompt,
            seed=int(form.seed),
            num_inference_steps=int(form.steps),
            width=int(form.width),
            height=int(form.height),
            guidance_scale=None if form.guidance in (None, "") else float(form.guidance),
            method=method,
            mask_step=None if form.mask_step in (None, "", 0) else int(form.mask_step),
            mask_config={"method": form.mask_method},
            attention_bias=None if form.attn_bias in (None, "") else float(form.attn_bias),
        )
        return RunSpec(model=model, loras=specs, settings=settings, masks=masks, conditions=self.conditions(folder, form))

    def check(self, session: Session, model: str, loras: list[LoraSlot], form: Form) -> None:
        """Everything the form's run needs that is known before loading (raises what is wrong)."""
        self._open(session)
        self.spec(session.folder / "check", model, loras, form, "freefuse").check()

    # -- the buttons ---------------------------------------------------------------------------------
    def find_masks(
        self, session: Session, model: str, loras: list[LoraSlot], form: Form, on_step: StepCallback | None = None
    ) -> list[str]:
        """Stage 1 alone: the session's masks and the picture they were found on; returns the subjects."""
        cancel = session.fresh_cancel()
        self._open(session)
        spec = self.spec(session.folder / "masks", model, loras, form, "freefuse")
        result = self.service.run(spec, on_step=on_step, cancel=cancel, stop_after_masks=True)
        if result.output.masks[0] is None:
            raise SettingsError("No subject LoRA: masks are made for LoRAs that act as a subject.")
        session.masks, session.preview, session.edited = result.output.masks[0], result.output.images[0], False
        session.notes = result.notes
        return list(session.masks.names)

    def apply_edit(self, session: Session, name: str, value: dict | None) -> None:
        """The editor's picture becomes subject `name`'s mask."""
        if session.masks is None:
            raise SettingsError("Find the masks first (or generate once).")
        if name not in session.masks.names:
            raise SettingsError("Choose a subject above, paint on its mask, then Apply.")
        mask = edited_mask(value, session.masks.size)
        if mask is None:
            raise SettingsError("The editor holds no mask: choose a subject above, paint on its mask, then Apply.")
        session.masks, session.edited = replace_mask(session.masks, name, mask), True

    def generate(
        self, session: Session, model: str, loras: list[LoraSlot], form: Form, on_step: StepCallback | None = None
    ) -> GeneratedRun:
        """FreeFuse (with the session's edited masks, if any) beside merge, same seed; the run's
        files written to its own folder and zipped."""
        cancel = session.fresh_cancel()
        self._open(session)
        number = len(session.runs) + 1
        while (session.folder / f"run-{number}").exists():  # a failed or cancelled attempt keeps its number
            number += 1
        folder = session.folder / f"run-{number}"
        folder.mkdir(parents=True)
        masks_path = None
        if session.edited and session.masks is not None:
            masks_path = folder / "masks.safetensors"
            session.masks.save(masks_path)
        method = "masks" if masks_path is not None else "freefuse"
        spec = self.spec(folder, model, loras, form, method, str(masks_path) if masks_path else None)
        result = self.service.run(spec, on_step=on_step, cancel=cancel)
        merge = self.service.run(self.spec(folder, model, loras, form, "merge"), on_step=on_step, cancel=cancel)
        paths = output_paths(folder, "freefuse", 1)
        write_outputs(result.output, paths, overwrite=False, portable=True)
        merge.output.images[0].save(folder / "merge.png")
        # The run as one download: image, masks, manifest and the LoRA files it names.
        archive = Path(shutil.make_archive(str(session.folder / f"freefuse-run-{number}"), "zip", folder))
        run = {"id": f"run {number}", "image": paths[0]["image"], "manifest": paths[0]["manifest"]}
        session.runs.append(run)
        session.notes = result.notes
        output = result.output
        return GeneratedRun(
            merge=merge.output.images[0],
            image=output.images[0],
            masks=output.masks[0].overlay(output.images[0]) if output.masks[0] is not None else None,
            downloads=[str(paths[0]["manifest"]), str(paths[0]["image"]), str(archive)],
            notes=list(result.notes),
            run_id=run["id"],
        )

    def replay(self, session: Session, run_id: str | None) -> str:
        """Run a past run again from its manifest and say whether the image comes out the same bytes."""
        if not session.runs:
            raise SettingsError("No run to replay yet: generate first.")
        cancel = session.fresh_cancel()
        run = next((r for r in session.runs if r["id"] == run_id), session.runs[-1])
        if not Path(run["manifest"]).is_file():
            raise SettingsError(f"{run['id']} was removed from the server (sessions expire); generate it again.")
        result = self.service.run(replay_spec(run["manifest"], here=Path(run["manifest"]).parent), cancel=cancel)
        replayed = encode_outputs(result.output, output_paths(session.folder / "replay", "freefuse", 1))[0]
        data = next(value for path, value in replayed.items() if path.suffix == ".png" and ".masks" not in path.name)
        same = data == Path(run["image"]).read_bytes()
        verdict = "the same image, byte for byte ✓" if same else "a different image ✗"
        return f"Replayed {run['id']} from its manifest: {verdict}"


def _size(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 when it does not exist); links are not followed."""
    if not folder.exists():
        return 0
    return sum(path.lstat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _by_shown_name(sources: list[str] | None) -> dict[str, str]:
    """Models a page offers, by the name it shows (a file's or folder's last part, or the hub id),
    so that no server path reaches the page."""
    shown_names: dict[str, str] = {}
    for source in sources or []:
        shown = (Path(source).name or source) if Path(source).expanduser().exists() else source
        while shown in shown_names:
            shown += "'"
        shown_names[shown] = source
    return shown_names
