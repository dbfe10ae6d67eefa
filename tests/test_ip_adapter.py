"""IP-Adapter reference images on the tiny FLUX.1 pipeline: `merge` against diffusers' own pipelines
with the same LoRAs, IP-Adapter and generator (`FluxPipeline`, `FluxImg2ImgPipeline`, true CFG with
its black negative image), all-ones masks against merge, the caller's IP-Adapter scale kept, what
is refused (before loading where it can be), and the command line's files with a byte-for-byte replay.

The IP-Adapter is random (`freefuse.testing.tiny_flux_ip_adapter_state_dict`) over a tiny CLIP image
encoder; the XLabs file layout is written with the `safetensors` package.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.cli import app
from freefuse.conditions import Conditions, ip_adapter_file
from freefuse.errors import JobFileError, SettingsError
from freefuse.testing import (
    random_lora,
    tiny_clip_image_encoder,
    tiny_flux_ip_adapter,
    tiny_flux_ip_adapter_state_dict,
    tiny_flux_pipeline,
    tiny_sdxl_pipeline,
    xlabs_ip_adapter_file,
)

PROMPT = "Alice hugging Bob in the snow"
SIZE = 128
FLUX = {
    "height": SIZE,
    "width": SIZE,
    "num_inference_steps": 5,
    "max_sequence_length": 32,
    "guidance_scale": 3.5,
}


def picture(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def with_loras(pipe) -> FreeFuse:
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def run(freefuse: FreeFuse, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(PROMPT, progress=False, **{"output_type": "pt", **FLUX, **values})


def oracle(pipe, cls, seed: int, **inputs) -> torch.Tensor:
    """diffusers' pipeline `cls` over `pipe`'s components (its IP-Adapter included), both LoRAs on."""
    reference = cls(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    pipe.set_adapters(["alice", "bob"])
    generator = torch.Generator().manual_seed(seed)
    return reference(PROMPT, generator=generator, output_type="pt", **{**FLUX, **inputs}).images[0]


@pytest.fixture(scope="module")
def flux() -> FreeFuse:
    pipe = tiny_flux_pipeline(seed=0)
    tiny_flux_ip_adapter(pipe, seed=3)
    return with_loras(pipe)


def ones(names=("alice", "bob")) -> MaskSet:
    return MaskSet(list(names), torch.ones(len(names), SIZE, SIZE))


def test_merge_with_a_reference_image_is_flux_pipeline_with_it(flux: FreeFuse) -> None:
    from diffusers import FluxPipeline

    reference = picture(1)
    ours = run(flux, method="merge", seed=3, conditions=Conditions.of(ip_adapter=reference))
    theirs = oracle(flux.pipeline, FluxPipeline, 3, ip_adapter_image=reference)
    assert torch.equal(ours.images[0], theirs)
    other = run(flux, method="merge", seed=3, conditions=Conditions.of(ip_adapter=picture(2))).images[0]
    assert (other - theirs).abs().max() > 1e-2  # the reference image does change the picture
    recorded = ours.manifest["conditions"]["ip_adapter"]
    assert recorded["image"]["sha256"] == Conditions.of(ip_adapter=reference).ip_adapter.sha256
    assert recorded["scale"] == 1.0


def test_the_scale_is_the_runs_and_the_callers_comes_back(flux: FreeFuse) -> None:
    from diffusers import FluxPipeline

    reference = picture(1)
    processors = [p for p in flux.pipeline.transformer.attn_processors.values() if hasattr(p, "to_k_ip")]
    flux.pipeline.set_ip_adapter_scale(0.9)
    try:
        ours = run(
            flux, method="merge", seed=5, conditions=Conditions.of(ip_adapter=reference, ip_adapter_scale=0.4)
        )
        assert all(p.scale == [0.9] for p in processors)  # the caller's scale, as it was
        flux.pipeline.set_ip_adapter_scale(0.4)
        theirs = oracle(flux.pipeline, FluxPipeline, 5, ip_adapter_image=reference)
    finally:
        flux.pipeline.set_ip_adapter_scale(1.0)
    assert torch.equal(ours.images[0], theirs)
    assert ours.manifest["conditions"]["ip_adapter"]["scale"] == 0.4


def test_without_a_scale_the_pipelines_own_acts_and_is_recorded_and_an_error_keeps_the_callers(flux) -> None:
    from diffusers import FluxPipeline

    reference = picture(1)
    processors = [p for p in flux.pipeline.transformer.attn_processors.values() if hasattr(p, "to_k_ip")]
    flux.pipeline.set_ip_adapter_scale(0.6)
    try:
        ours = run(flux, method="merge", seed=5, conditions=Conditions.of(ip_adapter=reference))
        theirs = oracle(flux.pipeline, FluxPipeline, 5, ip_adapter_image=reference)
        assert torch.equal(ours.images[0], theirs)  # as FluxPipeline: the scale the pipeline has
        assert ours.manifest["conditions"]["ip_adapter"]["scale"] == 0.6

        def fail(*args):
            raise RuntimeError("stopped by the caller")

        with pytest.raises(RuntimeError, match="stopped by the caller"):
            run(flux, method="merge", seed=5, callback_on_step_end=fail,
                conditions=Conditions.of(ip_adapter=reference, ip_adapter_scale=0.2))  # fmt: skip
        assert all(p.scale == [0.6] for p in processors)  # put back on the way out of a failed run too
    finally:
        flux.pipeline.set_ip_adapter_scale(1.0)


def test_the_model_record_leaves_the_ip_adapter_out() -> None:
    from freefuse.manifest import model_record

    pipe = tiny_flux_pipeline(seed=0)
    before = model_record(pipe, pipe.transformer)
    tiny_flux_ip_adapter(pipe)
    assert model_record(pipe, pipe.transformer) == before  # a replay's model check compares the model alone
    assert before["base_weights_sha256"]


def test_one_run_service_loads_switches_and_lets_go_of_ip_adapters(files, monkeypatch) -> None:
    """The service keeps an IP-Adapter for the next run with it, loads the next one (its own
    encoder), and unloads it for a run without one: that run is the plain run."""
    from freefuse.runner import RunService
    from freefuse.spec import LoraSpec, RunSpec

    monkeypatch.chdir(files)
    service = RunService()
    loras = [LoraSpec(path=str(files / "alice.safetensors"), words=["Alice"]), LoraSpec(path=str(files / "bob.safetensors"), words=["Bob"])]
    settings = {"prompt": PROMPT, "seed": 3, "height": 128, "width": 128, "num_inference_steps": 3, "max_sequence_length": 32}

    def spec(**conditions):
        from freefuse.conditions import ConditionsSpec
        from freefuse.settings import GenerationSettings

        given = ConditionsSpec(**conditions) if conditions else None
        return RunSpec(str(files / "model"), loras, GenerationSettings(**settings), conditions=given)

    plain = service.run(spec()).output.images[0]
    first = spec(ip_adapter="ref.png", ip_adapter_model="ip/ip_adapter.safetensors", image_encoder="image_encoder")
    with_adapter = service.run(first).output.images[0]
    again = service.run(first).output.images[0]
    assert service.model_loads == 1 and service._ip_adapter is not None
    assert np.array_equal(np.asarray(with_adapter), np.asarray(again))
    without = service.run(spec()).output.images[0]
    assert not service._owner.backend.has_ip_adapter and service._pipeline.image_encoder is None
    assert np.array_equal(np.asarray(without), np.asarray(plain))  # nothing of the adapter left
    other = service.run(spec(ip_adapter="ref.png", ip_adapter_model="ip")).output.images[0]  # its own encoder
    loaded_from = Path(service._pipeline.image_encoder.config._name_or_path).resolve()
    assert loaded_from == (files / "ip" / "image_encoder").resolve()
    assert not np.array_equal(np.asarray(other), np.asarray(plain))


def test_an_ip_adapter_with_offload_or_compile_and_settings_without_their_image_are_refused(files) -> None:
    from freefuse.conditions import ConditionsSpec
    from freefuse.memory import MemoryOptions
    from freefuse.settings import GenerationSettings
    from freefuse.spec import LoraSpec, RunSpec

    conditions = ConditionsSpec(ip_adapter=str(files / "ref.png"), ip_adapter_model=str(files / "ip"))
    settings = GenerationSettings(prompt=PROMPT, height=128, width=128)
    loras = [LoraSpec(path=str(files / "alice.safetensors"), words=["Alice"])]
    for memory in (MemoryOptions(offload="sequential"), MemoryOptions(compile=True)):
        spec = RunSpec(str(files / "model"), loras, settings, conditions=conditions, memory=memory)
        with pytest.raises(SettingsError, match="swaps the transformer's attention processors"):
            spec.check()
    for values, message in (
        ({"ip_adapter_model": "ip", "ip_adapter_scale": 0.5}, "ip_adapter_scale applies to ip_adapter"),
        ({"image_encoder": "image_encoder"}, "image_encoder applies to ip_adapter_model"),
        ({"redux_scale": 0.5}, "redux_scale applies to redux"),
    ):
        with pytest.raises(SettingsError, match=message):
            ConditionsSpec.parse(values, "a job")


def test_true_cfg_reads_a_black_negative_reference_as_flux_pipeline_does(flux: FreeFuse) -> None:
    from diffusers import FluxPipeline

    reference = picture(4)
    negative = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
    ours = run(flux, method="merge", seed=6, conditions=Conditions.of(ip_adapter=reference), **negative)
    theirs = oracle(flux.pipeline, FluxPipeline, 6, ip_adapter_image=reference, **negative)
    assert torch.equal(ours.images[0], theirs)


def test_img2img_with_a_reference_is_flux_img2img_pipeline_with_it(flux: FreeFuse) -> None:
    from diffusers import FluxImg2ImgPipeline

    init = picture(5, size=SIZE)
    reference = picture(6)
    conditions = Conditions.of(init_image=init, strength=0.7, ip_adapter=reference)
    ours = run(flux, method="merge", seed=7, conditions=conditions).images[0]
    theirs = oracle(
        flux.pipeline, FluxImg2ImgPipeline, 7, image=init, strength=0.7, ip_adapter_image=reference
    )
    assert torch.equal(ours, theirs)


def test_a_controlnet_with_a_reference_is_flux_controlnet_pipeline_with_it(flux: FreeFuse) -> None:
    from diffusers import FluxControlNetPipeline

    from freefuse.conditions import Control
    from freefuse.testing import tiny_flux_controlnet

    net = tiny_flux_controlnet(flux.pipeline, seed=5)
    control, reference = picture(8, size=SIZE), picture(9)
    conditions = Conditions.of(controls=[Control(control, scale=0.8)], ip_adapter=reference)
    ours = run(flux, method="merge", seed=9, conditions=conditions, controlnet=net).images[0]
    pipe = flux.pipeline
    oracle_pipe = FluxControlNetPipeline(**pipe.components, controlnet=net)
    oracle_pipe.set_progress_bar_config(disable=True)
    pipe.set_adapters(["alice", "bob"])
    theirs = oracle_pipe(
        PROMPT,
        generator=torch.Generator().manual_seed(9),
        output_type="pt",
        control_image=control,
        controlnet_conditioning_scale=0.8,
        ip_adapter_image=reference,
        **FLUX,
    ).images[0]
    assert torch.equal(ours, theirs)


def test_all_ones_masks_equal_merge_with_a_reference(flux: FreeFuse) -> None:
    conditions = Conditions.of(ip_adapter=picture(7), ip_adapter_scale=0.8)
    merged = run(flux, method="merge", seed=8, conditions=conditions).images[0]
    masked = run(flux, method="masks", masks=ones(), text_scope="all", seed=8, conditions=conditions).images[
        0
    ]
    assert (merged - masked).abs().max() <= 1e-5
    half = MaskSet(["alice", "bob"], torch.stack([torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)]))
    other = run(flux, method="masks", masks=half, seed=8, conditions=conditions).images[0]
    assert (merged - other).abs().max() > 1e-3  # the masks do act beside the reference
    found = run(flux, seed=8, conditions=conditions)  # stage 1 reads attention under the reference too
    assert found.masks[0] is not None and found.masks[0].names == ["alice", "bob"]


def test_a_reference_needs_an_ip_adapter_and_an_ip_adapter_a_reference() -> None:
    plain = with_loras(tiny_flux_pipeline(seed=0))
    with pytest.raises(SettingsError, match="needs a model with an IP-Adapter"):
        run(plain, method="merge", seed=1, conditions=Conditions.of(ip_adapter=picture(1)))
    with pytest.raises(SettingsError, match="IP-Adapter scale was given without its image"):
        run(plain, method="merge", seed=1, conditions=Conditions.of(ip_adapter_scale=0.5))
    pipe = tiny_flux_pipeline(seed=0)
    tiny_flux_ip_adapter(pipe)
    loaded = with_loras(pipe)
    with pytest.raises(SettingsError, match="needs a reference image in every run"):
        run(loaded, method="merge", seed=1)
    with pytest.raises(SettingsError, match="IP-Adapter scale is a number from 0 to 10"):
        run(
            loaded,
            method="merge",
            seed=1,
            conditions=Conditions.of(ip_adapter=picture(1), ip_adapter_scale=-1),
        )
    sdxl = with_loras(tiny_sdxl_pipeline(seed=0))
    with pytest.raises(SettingsError, match="take no ip-adapter"):
        sdxl(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=2,
            seed=1,
            progress=False,
            conditions=Conditions.of(ip_adapter=picture(1)),
        )


def test_an_ip_adapter_file_is_checked_from_its_header(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    good = tmp_path / "ip_adapter.safetensors"
    save_file(xlabs_ip_adapter_file(tiny_flux_ip_adapter_state_dict(pipe.transformer)), str(good))
    assert ip_adapter_file(str(good)) == (str(tmp_path), good.name)
    assert ip_adapter_file(str(tmp_path)) == (str(tmp_path), good.name)  # its folder
    assert ip_adapter_file("XLabs-AI/flux-ip-adapter") is None  # a hub id: nothing to read here
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(SettingsError, match="not a FLUX IP-Adapter"):
        ip_adapter_file(str(lora))
    pickled = tmp_path / "ip_adapter.bin"
    pickled.write_bytes(b"not read")
    with pytest.raises(SettingsError, match="safetensors only"):
        ip_adapter_file(str(pickled))
    with pytest.raises(SettingsError, match="does not exist"):
        ip_adapter_file(str(tmp_path / "missing.safetensors"))


# -- the command line ------------------------------------------------------------------------------------

RUNNER = CliRunner()
FAST = ["--steps", "4", "--size", "128x128", "--max-sequence-length", "32", "--seed", "3"]


def invoke(*args):
    return RUNNER.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def files(assets):
    """The tiny model's assets (the working folder) with its IP-Adapter as an XLabs file, the tiny
    image encoder's folder and a reference picture beside them."""
    pipe = tiny_flux_pipeline(seed=0)
    (assets / "ip").mkdir()
    save_file(
        xlabs_ip_adapter_file(tiny_flux_ip_adapter_state_dict(pipe.transformer, seed=4)),
        str(assets / "ip" / "ip_adapter.safetensors"),
    )
    tiny_clip_image_encoder(seed=4).save_pretrained(assets / "image_encoder")
    tiny_clip_image_encoder(seed=4).save_pretrained(assets / "ip" / "image_encoder")  # found beside the adapter
    picture(9).save(assets / "ref.png")
    return assets


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
        PROMPT,
        "--out",
        out,
        *FAST,
        *extra,
    )


def test_cli_runs_an_ip_adapter_records_it_and_replays_it_byte_for_byte(files, monkeypatch) -> None:
    monkeypatch.chdir(files)
    flags = [
        "--ip-adapter",
        "ref.png@0.7",
        "--ip-adapter-model",
        "ip/ip_adapter.safetensors",
        "--image-encoder",
        "image_encoder",
    ]
    first = generate(files, "runs/a", *flags)
    assert first.exit_code == 0, first.output
    recorded = json.loads((files / "runs" / "a" / "freefuse.json").read_text())["conditions"]["ip_adapter"]
    assert recorded["scale"] == 0.7 and len(recorded["image"]["sha256"]) == 64
    assert recorded["model"] == "ip/ip_adapter.safetensors" and recorded["image_encoder"] == "image_encoder"
    assert recorded["model_from_manifest"] == "../../ip/ip_adapter.safetensors"
    replay = invoke("generate", "--manifest", "runs/a/freefuse.json", "--out", "runs/b")
    assert replay.exit_code == 0, replay.output
    assert (files / "runs" / "b" / "freefuse.png").read_bytes() == (
        files / "runs" / "a" / "freefuse.png"
    ).read_bytes()
    weaker = generate(files, "runs/c", *flags[:1], "ref.png@0.2", *flags[2:])
    assert weaker.exit_code == 0, weaker.output
    assert (files / "runs" / "c" / "freefuse.png").read_bytes() != (
        files / "runs" / "a" / "freefuse.png"
    ).read_bytes()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ip-adapter", "ref.png"], "needs a model with an IP-Adapter"),
        (
            ["--ip-adapter-model", "ip/ip_adapter.safetensors", "--image-encoder", "image_encoder"],
            "needs a reference image",
        ),
        (["--ip-adapter", "ref.png", "--ip-adapter-model", "ref.png"], "not a .safetensors file"),
        (
            ["--ip-adapter", "ref.png", "--ip-adapter-model", "ip", "--image-encoder", "ip"],
            "needs config.json",
        ),
        (
            ["--ip-adapter", "ref.png@11", "--ip-adapter-model", "ip"],
            "IP-Adapter scale is a number from 0 to 10",
        ),
    ],
    ids=["no-adapter", "no-image", "not-safetensors", "encoder-without-weights", "scale"],
)
def test_cli_refuses_ip_adapter_mistakes_before_loading(files, monkeypatch, flags, message) -> None:
    monkeypatch.chdir(files)
    monkeypatch.setattr("freefuse.runner.load_pipeline", _no_loading)
    result = generate(files, "runs/refused", *flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (files / "runs" / "refused").exists()


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded for a run refused by its flags")


def test_a_job_file_names_its_ip_adapter_relative_to_itself(files) -> None:
    from freefuse.batch import load_jobs

    job = {
        "model": str(files / "model"),
        "prompt": "{A} hugging {B}",
        "size": "128x128",
        "steps": 4,
        "max_sequence_length": 32,
        "loras": [
            {"path": str(files / "alice.safetensors"), "words": ["Alice"]},
            {"path": str(files / "bob.safetensors"), "words": ["Bob"]},
        ],
        "conditions": {
            "ip_adapter": "ref.png",
            "ip_adapter_scale": 0.5,
            "ip_adapter_model": "ip",
            "image_encoder": "image_encoder",
        },
    }
    plain = {key: value for key, value in job.items() if key != "conditions"}
    (files / "ip-jobs.jsonl").write_text(json.dumps(job) + "\n" + json.dumps(plain) + "\n")
    conditioned, unconditioned = load_jobs(files / "ip-jobs.jsonl")
    assert conditioned.conditions.ip_adapter.path == str(files / "ref.png")
    assert conditioned.conditions.ip_adapter_model == str(files / "ip")
    assert conditioned.conditions.image_encoder == str(files / "image_encoder")
    assert conditioned.id != unconditioned.id
    conditioned.check()
    bad = {**job, "conditions": {**job["conditions"], "ip_adapter_scale": 12}}
    (files / "ip-bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(
        JobFileError, match="ip-bad.jsonl line 1: conditions: .*IP-Adapter scale is a number from 0 to 10"
    ):
        load_jobs(files / "ip-bad.jsonl")


def test_a_public_page_reads_a_reference_picture_with_an_offered_model_by_name(files, tmp_path) -> None:
    import shutil

    from freefuse.runner import RunService
    from freefuse.workspace import Form, LoraSlot, Workspace

    uploads = tmp_path / "uploads"
    slots = []
    for name, word in (("alice", "Alice"), ("bob", "Bob")):
        target = uploads / name / f"{name}.safetensors"
        target.parent.mkdir(parents=True)
        shutil.copyfile(files / f"{name}.safetensors", target)
        slots.append(LoraSlot(path=str(target), words=word))
    workspace = Workspace(
        tmp_path / "sessions",
        RunService(),
        received=lambda path: path.is_relative_to(uploads.resolve()),
        local_paths=False,
        models=["tiny"],
        ip_adapters=[str(files / "ip")],
    )
    assert list(workspace.ip_adapters) == ["ip"]  # shown by name: no server path on the page
    session = workspace.new_session()
    reference = uploads / "picture" / "reference.png"
    reference.parent.mkdir()
    picture(3).convert("RGBA").save(reference)
    form = Form(prompt="Alice hugging Bob", seed=1, steps=3, width=64, height=64, reference_image=str(reference))
    with pytest.raises(SettingsError, match="IP-Adapter or by a Redux model: pick one of them"):
        workspace.check(session, "tiny", slots, form)
    with pytest.raises(SettingsError, match="This page's IP-Adapters are: ip;"):
        workspace.check(session, "tiny", slots, Form(**{**form.__dict__, "ip_adapter_model": str(files / "ip")}))
    with pytest.raises(SettingsError, match="This page's Redux models are: none;"):
        workspace.check(session, "tiny", slots, Form(**{**form.__dict__, "redux_model": "black-forest-labs/x"}))
    offered = Form(**{**form.__dict__, "ip_adapter_model": "ip", "reference_scale": 0.6})
    run = workspace.generate(session, "tiny", slots, offered)
    manifest_path = next(Path(path) for path in run.downloads if str(path).endswith(".json"))
    recorded = json.loads(manifest_path.read_text())["conditions"]["ip_adapter"]
    assert recorded["image"]["path"] == "conditions/reference.png" and recorded["scale"] == 0.6
    assert recorded["model"] == "ip" and str(files) not in manifest_path.read_text()


def test_an_image_encoder_folder_must_hold_model_safetensors(tmp_path) -> None:
    """transformers would fall back to a pickled `pytorch_model.bin` beside some other safetensors
    file: such a folder is refused before anything is read."""
    from freefuse.conditions import image_encoder_source

    folder = tmp_path / "encoder"
    tiny_clip_image_encoder().save_pretrained(folder)
    assert image_encoder_source(str(folder)) == str(folder)
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    with pytest.raises(SettingsError, match="needs config.json and model.safetensors"):
        image_encoder_source(str(folder))
    assert image_encoder_source("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
