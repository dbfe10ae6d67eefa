"""One settings model for the library, the command line, job files and manifests."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from freefuse import GenerationSettings, SettingsError
from freefuse.cli import app
from freefuse.settings import CLI_FLAGS
from freefuse.testing import random_lora, tiny_flux_pipeline

RUNNER = CliRunner()
FAST = ["--steps", "3", "--size", "64x64", "--max-sequence-length", "16"]


def test_unknown_settings_are_errors_that_list_the_valid_ones() -> None:
    with pytest.raises(SettingsError, match=r"Unknown setting `colour`; valid ones are \[.*'height'"):
        GenerationSettings(prompt="x", colour="red")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"height": True}, "`height`: Input should be a valid integer"),
        ({"guidance_scale": "3"}, "must be a number"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be >= 1"),
        ({"seed": -1}, "`seed` must be a whole number"),
        ({"seed": [1, 2]}, "2 seeds for 1 images"),
        ({"text_scope": "some"}, "`text_scope`: Input should be 'exclude-others' or 'all'"),
        ({"method": "magic"}, r"Unknown method 'magic'; valid methods are \['freefuse', 'masks', 'merge'\]"),
        ({"mask_step": 9, "num_inference_steps": 4}, "`mask_step` 9 is past the last of 4 steps"),
        ({"size": "64x64", "width": 64}, "give `size` or `width`/`height`, not both"),
        ({"background_words": [" "]}, "`background_words` has an empty word"),
        ({"mask_config": {"p_sink": 2.0}}, "`p_sink` must be a fraction"),
        ({"mask_config": {"sinks": 1}}, "Unknown mask settings"),
        ({"mask_config": {"p_sink": "0.01"}}, "`p_sink` must be a number"),
    ],
)
def test_bad_values_name_the_setting(values: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        GenerationSettings(prompt="Alice", **values)


def test_short_names_and_size_are_accepted_as_in_job_files() -> None:
    settings = GenerationSettings.from_dict(
        {"prompt": "x", "steps": 4, "guidance": 2.0, "true_cfg": 1.5, "images": 2, "size": "96x64"}
    )
    assert (settings.num_inference_steps, settings.guidance_scale, settings.true_cfg_scale) == (4, 2.0, 1.5)
    assert (settings.num_images_per_prompt, settings.width, settings.height) == (2, 96, 64)


def test_the_manifest_record_round_trips() -> None:
    settings = GenerationSettings(prompt=["a", "b"], seed=[1, 2], background_words=["sky"], mask_step=2)
    again = GenerationSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings


def test_assignment_is_validated_too() -> None:
    settings = GenerationSettings(prompt="x")
    with pytest.raises(ValueError, match="num_inference_steps"):
        settings.num_inference_steps = 0


def options_of(command: str) -> set[str]:
    result = RUNNER.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(--[a-z][a-z-]+)", result.output))


def test_generate_and_masks_share_one_option_set_built_from_the_settings_model() -> None:
    generate, masks = options_of("generate"), options_of("masks")
    assert generate == masks
    for flags, _ in CLI_FLAGS.values():
        assert set(flags[0].split("/")) <= generate  # an on/off pair: both flags
    for flag in ("--global-lora", "--negative-prompt", "--empty-mask", "--images", "--background-word"):
        assert flag in masks
    help_text = RUNNER.invoke(app, ["generate", "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
    assert "PATH=WORD[,WORD][@WEIGHT]" in help_text  # brackets survive Rich
    assert "[default: 28]" in help_text


def generate_args(root, out, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(root / "model"),
        "--lora",
        f"{root / 'alice.safetensors'}=Alice",
        "--lora",
        f"{root / 'bob.safetensors'}=Bob",
        "--prompt",
        "Alice hugging Bob",
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def test_flags_given_with_a_manifest_win_and_are_said(assets, tmp_path, monkeypatch) -> None:
    first = tmp_path / "first"
    assert RUNNER.invoke(app, generate_args(assets, first)).exit_code == 0
    monkeypatch.chdir(assets)
    replay = tmp_path / "replay"
    result = RUNNER.invoke(
        app, ["generate", "--manifest", str(first / "freefuse.json"), "--seed", "5", "--out", str(replay)]
    )
    assert result.exit_code == 0, result.output
    assert "seed 0 -> 5" in result.output
    manifest = json.loads((replay / "freefuse.json").read_text())
    assert manifest["settings"]["seed"] == 5 and manifest["settings"]["num_inference_steps"] == 3
    assert (first / "freefuse.png").read_bytes() != (replay / "freefuse.png").read_bytes()
    resized = RUNNER.invoke(
        app,
        [
            "generate",
            "--manifest",
            str(first / "freefuse.json"),
            "--size",
            "96x64",
            "--out",
            str(tmp_path / "r2"),
        ],
    )
    assert resized.exit_code == 0, resized.output
    manifest = json.loads((tmp_path / "r2" / "freefuse.json").read_text())
    assert (manifest["settings"]["width"], manifest["settings"]["height"]) == (96, 64)


def test_masks_without_method_masks_is_an_error(assets, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("freefuse.runner.load_pipeline", never_load)
    masks = tmp_path / "m.masks.json"
    masks.write_text("{}")
    result = RUNNER.invoke(app, generate_args(assets, tmp_path / "o", "--masks", str(masks)))
    assert result.exit_code == 2
    assert "only used by method='masks'" in result.output
    assert not (tmp_path / "o").exists()


def never_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the mistake was reported")


def test_negative_prompt_without_true_cfg_is_an_error_before_loading(assets, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("freefuse.runner.load_pipeline", never_load)
    result = RUNNER.invoke(app, generate_args(assets, tmp_path / "o", "--negative-prompt", "blurry"))
    assert result.exit_code == 2
    assert "`negative_prompt` only acts with true CFG" in result.output and "--true-cfg" in result.output
    assert not (tmp_path / "o").exists()


def test_masks_command_takes_global_loras_and_negative_prompts(assets, tmp_path) -> None:
    style = tmp_path / "style.safetensors"
    random_lora(tiny_flux_pipeline(seed=0), "style", seed=9, path=style)
    args = generate_args(assets, tmp_path / "m", "--global-lora", str(style), "--negative-prompt", "dark")
    args += ["--true-cfg", "2", "--images", "2", "--empty-mask", "off"]
    result = RUNNER.invoke(app, ["masks", *args[1:]])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "freefuse-1.masks.json").is_file()
    manifest = json.loads((tmp_path / "m" / "freefuse-1.json").read_text())
    assert manifest["settings"]["empty_mask"] == "off" and manifest["settings"]["negative_prompt"] == "dark"
    assert [lora["scope"] for lora in manifest["loras"]] == ["subject", "subject", "global"]
