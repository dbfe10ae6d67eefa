"""Conditions on the command line, in job files and in manifests: `--init-image`, `--strength`,
`--inpaint-mask`, `--control TYPE=IMAGE[@SCALE]` with `--controlnet`, recorded with every image's
hash, replayed byte for byte, and refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from freefuse.cli import app, parse_control
from freefuse.errors import JobFileError, SettingsError
from freefuse.testing import tiny_flux_controlnet, tiny_flux_pipeline

RUNNER = CliRunner()
FAST = ["--steps", "4", "--size", "128x128", "--max-sequence-length", "32", "--seed", "3"]


def invoke(*args: str):
    return RUNNER.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def files(assets):
    """The tiny model's assets with an init picture, an inpainting mask and a saved tiny union
    ControlNet beside them: one folder, the working folder of these tests (a replay finds a
    manifest's files only inside the working folder or the manifest's)."""
    root = assets
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((128, 128)).save(root / "init.png")
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[32:96, 40:100] = 255
    Image.fromarray(mask, "L").save(root / "mask.png")
    Image.new("RGBA", (128, 128)).save(root / "rgba.png")
    tiny_flux_controlnet(tiny_flux_pipeline(seed=0), seed=5, union=True).save_pretrained(root / "controlnet")
    (root / "sdxl-controlnet").mkdir()
    (root / "sdxl-controlnet" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    return root


def generate(assets, out, *extra):
    return invoke(
        "generate",
        "--model",
        assets / "model",
        "--lora",
        f"{assets / 'alice.safetensors'}=Alice",
        "--lora",
        f"{assets / 'bob.safetensors'}=Bob",
        "--prompt",
        "Alice hugging Bob in the snow",
        "--out",
        out,
        *FAST,
        *extra,
    )


def test_parse_control() -> None:
    assert parse_control("depth=d.png@0.7") == {"type": "depth", "image": "d.png", "scale": 0.7}
    assert parse_control("canny=my@pic.png") == {"type": "canny", "image": "my@pic.png", "scale": 1.0}
    with pytest.raises(SettingsError, match="TYPE=IMAGE"):
        parse_control("d.png")


@pytest.mark.parametrize(
    "flags",
    [
        ["--init-image", "init.png", "--strength", "0.7"],
        ["--init-image", "init.png", "--inpaint-mask", "mask.png", "--strength", "0.9"],
        ["--control", "depth=init.png@0.6", "--control", "pose=mask.png", "--controlnet", "controlnet"],
    ],
    ids=["img2img", "inpaint", "controlnet"],
)
def test_a_conditioned_run_records_its_images_and_replays_byte_for_byte(
    assets, files, tmp_path, monkeypatch, flags
) -> None:
    monkeypatch.chdir(files)
    tmp_path = files / f"runs-{flags[0].strip('-')}-{len(flags)}"
    first = generate(assets, tmp_path / "a", *flags)
    assert first.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "a" / "freefuse.json").read_text())
    conditions = manifest["conditions"]
    images = [conditions.get("init_image"), conditions.get("inpaint_mask")]
    images += [control["image"] for control in conditions.get("controls", [])]
    for image in filter(None, images):
        assert len(image["sha256"]) == 64 and image["path_from_manifest"].endswith(".png")
    if "controls" in conditions:
        assert [c["type"] for c in conditions["controls"]] == ["depth", "pose"]
        assert conditions["controlnets"][0]["files"]["config.json"]
    else:
        assert conditions["strength"] == float(flags[flags.index("--strength") + 1])
    plain = generate(assets, tmp_path / "plain")
    assert plain.exit_code == 0
    assert (tmp_path / "plain" / "freefuse.png").read_bytes() != (tmp_path / "a" / "freefuse.png").read_bytes()
    replay = invoke("generate", "--manifest", tmp_path / "a" / "freefuse.json", "--out", tmp_path / "b")
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "b" / "freefuse.png").read_bytes() == (tmp_path / "a" / "freefuse.png").read_bytes()


def test_a_replay_finds_changed_images_and_a_given_flag_wins(assets, files, monkeypatch) -> None:
    monkeypatch.chdir(files)
    tmp_path = files / "runs-replay"
    tmp_path.mkdir()
    init = tmp_path / "init.png"
    init.write_bytes((files / "init.png").read_bytes())
    first = generate(assets, tmp_path / "a", "--init-image", init, "--strength", "0.6")
    assert first.exit_code == 0, first.output
    manifest = tmp_path / "a" / "freefuse.json"
    changed = invoke("generate", "--manifest", manifest, "--out", tmp_path / "b", "--strength", "0.8")
    assert changed.exit_code == 0, changed.output
    assert "conditions given instead of its own: strength" in " ".join(changed.output.split())
    assert json.loads((tmp_path / "b" / "freefuse.json").read_text())["conditions"]["strength"] == 0.8
    Image.new("RGB", (128, 128), "red").save(init)
    refused = invoke("generate", "--manifest", manifest, "--out", tmp_path / "c")
    assert refused.exit_code == 2
    assert "has changed since the manifest was written" in " ".join(refused.output.split())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--control", "canny=init.png", "--controlnet", "sdxl-controlnet"], "is a ControlNetModel, for another"),
        (["--control", "init.png", "--controlnet", "controlnet"], "is not TYPE=IMAGE"),
        (["--control", "edges=init.png", "--controlnet", "controlnet"], "union ControlNet"),
        (["--control", "depth=init.png"], "need a ControlNet"),
        (["--init-image", "init.png", "--strength", "1.5"], "at most 1"),
        (["--init-image", "rgba.png"], "'RGBA' image"),
        (["--init-image", "init.png", "--inpaint-mask", "init.png"], "it must be 'L' or '1'"),
        (["--ip-adapter", "init.png@0.5"], "needs a model with an IP-Adapter"),
        (["--init-image", "missing.png"], "does not exist"),
    ],
)
def test_conditions_are_refused_before_the_model_loads(assets, files, tmp_path, monkeypatch, flags, message) -> None:
    import freefuse.runner

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded for a run that cannot finish")

    monkeypatch.setattr(freefuse.runner, "load_pipeline", no_loading)
    monkeypatch.chdir(files)
    result = generate(assets, tmp_path / "out", *flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_a_job_file_takes_conditions_relative_to_itself(assets, files, tmp_path) -> None:
    from freefuse.batch import load_jobs

    job = {
        "model": str(assets / "model"),
        "prompt": "{A} hugging {B}",
        "size": "128x128",
        "steps": 4,
        "max_sequence_length": 32,
        "loras": [{"path": str(assets / "alice.safetensors"), "words": ["Alice"]}, {"path": str(assets / "bob.safetensors"), "words": ["Bob"]}],
        "conditions": {"controls": [{"type": "depth", "image": "init.png", "scale": 0.5}], "controlnets": ["controlnet"]},
    }
    (files / "jobs.jsonl").write_text(json.dumps(job) + "\n" + json.dumps({k: v for k, v in job.items() if k != "conditions"}) + "\n")
    conditioned, plain = load_jobs(files / "jobs.jsonl")
    assert conditioned.conditions.controls[0].image.path == str(files / "init.png")
    assert conditioned.conditions.controlnets == [str(files / "controlnet")]
    assert conditioned.id != plain.id  # the conditions are part of what a job is
    conditioned.check()
    bad = {**job, "conditions": {"controls": [{"type": "depth", "image": "init.png", "scale": 99}]}}
    (files / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(JobFileError, match="bad.jsonl line 1: conditions: .*scale is a number from 0 to 10"):
        load_jobs(files / "bad.jsonl")


def test_the_page_takes_pictures_and_its_downloaded_run_replays_from_itself(assets, files, tmp_path, monkeypatch) -> None:
    import shutil
    import zipfile

    from freefuse.runner import RunService
    from freefuse.workspace import Form, LoraSlot, Workspace

    uploads = tmp_path / "uploads"
    slots = []
    for name, word in (("alice", "Alice"), ("bob", "Bob")):
        target = uploads / name / f"{name}.safetensors"
        target.parent.mkdir(parents=True)
        shutil.copyfile(assets / f"{name}.safetensors", target)
        slots.append(LoraSlot(path=str(target), words=word))
    workspace = Workspace(
        tmp_path / "sessions",
        RunService(),
        received=lambda path: path.is_relative_to(uploads.resolve()),
        local_paths=False,
        models=["tiny"],
        controlnets=[str(files / "controlnet")],
    )
    session = workspace.new_session()
    picture = uploads / "picture" / "init.png"  # as Gradio's upload route keeps it: RGBA is converted
    picture.parent.mkdir()
    Image.open(files / "init.png").resize((64, 64)).convert("RGBA").save(picture)
    # A picture naming any server file Gradio did not receive is refused, as a LoRA file is.
    elsewhere_picture = Form(prompt="Alice hugging Bob", seed=1, steps=3, width=64, height=64,
                             init_image=str(files / "init.png"))
    with pytest.raises(SettingsError, match="init picture must be a picture uploaded through this page"):
        workspace.check(session, "tiny", slots, elsewhere_picture)
    form = Form(prompt="Alice hugging Bob", seed=1, steps=3, width=64, height=64, init_image=str(picture), strength=0.7)
    run = workspace.generate(session, "tiny", slots, form)
    manifest_path, image_path, archive = (Path(path) for path in run.downloads)
    conditions = json.loads(manifest_path.read_text())["conditions"]
    assert conditions["init_image"]["path"] == "conditions/init.png" and conditions["strength"] == 0.7
    with zipfile.ZipFile(archive) as zipped:
        assert "conditions/init.png" in zipped.namelist()
    elsewhere = tmp_path / "downloaded"
    shutil.unpack_archive(archive, elsewhere)
    monkeypatch.chdir(tmp_path)
    result = RUNNER.invoke(app, ["generate", "--manifest", str(elsewhere / "freefuse.json"), "--out", "again"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "freefuse.png").read_bytes() == image_path.read_bytes()
    control = Form(prompt="Alice hugging Bob", seed=1, steps=3, width=64, height=64, control_image=str(picture),
                   control_type="depth", controlnet=str(files / "sdxl-controlnet"))
    with pytest.raises(SettingsError, match="This page's ControlNets are"):
        workspace.check(session, "tiny", slots, control)
    # Offered ControlNets are shown and picked by name: the server's path is not on the page, nor taken.
    assert list(workspace.controlnets) == ["controlnet"]
    with pytest.raises(SettingsError, match="This page's ControlNets are: controlnet;"):
        workspace.check(session, "tiny", slots, Form(**{**control.__dict__, "controlnet": str(files / "controlnet")}))
    offered = Form(**{**control.__dict__, "controlnet": "controlnet"})
    workspace.check(session, "tiny", slots, offered)
    # An inpainting mask uploaded as a colour picture is kept grey; an all-white one is refused.
    mask = uploads / "picture" / "mask.png"
    drawn = Image.new("RGB", (64, 64))
    drawn.paste((255, 255, 255), (16, 16, 48, 40))
    drawn.save(mask)
    masked = Form(prompt="Alice hugging Bob", seed=1, steps=3, width=64, height=64, init_image=str(picture),
                  inpaint_mask=str(mask), strength=0.9)
    workspace.check(session, "tiny", slots, masked)
    assert Image.open(session.folder / "check" / "conditions" / "mask.png").mode == "L"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(mask)
    with pytest.raises(SettingsError, match="repaints the whole image"):
        workspace.check(session, "tiny", slots, masked)
