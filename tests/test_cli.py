"""The `freefuse` command line on a tiny model saved like a real one (`--model DIR`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from freefuse.cli import app, parse_lora_spec

RUNNER = CliRunner()
FAST = ["--steps", "4", "--size", "128x128", "--max-sequence-length", "32"]


def invoke(*args: str):
    return RUNNER.invoke(app, list(args), catch_exceptions=False)


def generate_args(root, out, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(root / "model"),
        "--lora",
        f"{root / 'alice.safetensors'}=Alice",
        "--lora",
        f"{root / 'bob.safetensors'}=Bob@0.8",
        "--prompt",
        "Alice hugging Bob in the snow",
        "--seed",
        "3",
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("generate", "masks", "inspect", "demo"):
        assert name in result.output


def test_generate_writes_image_overlay_masks_and_manifest(assets, tmp_path) -> None:
    result = invoke(*generate_args(assets, tmp_path))
    assert result.exit_code == 0, result.output
    for name in ("freefuse.png", "freefuse.masks.png", "freefuse.masks.json", "freefuse.json"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob("*.part"))
    manifest = json.loads((tmp_path / "freefuse.json").read_text())
    assert manifest["settings"]["seed"] == 3 and manifest["settings"]["method"] == "freefuse"
    assert [lora["weight"] for lora in manifest["loras"]] == [1.0, 0.8]
    assert all(len(lora["sha256"]) == 64 for lora in manifest["loras"])
    assert manifest["model"]["files"]  # file hashes of the model folder
    assert set(manifest["images"][0]["subjects"]) == {"alice", "bob"}
    with Image.open(tmp_path / "freefuse.png") as image:
        carried = json.loads(image.text["freefuse"])
    assert carried["settings"]["prompt"] == "Alice hugging Bob in the snow"
    # A1111's chunk, for the PNG-info readers people already use
    with Image.open(tmp_path / "freefuse.png") as image:
        prompt, parameters = image.text["parameters"].split("\n")
    assert prompt == "Alice hugging Bob in the snow"
    fields = dict(part.split(": ", 1) for part in re.split(r", (?=[A-Z][A-Za-z ]+: )", parameters))
    assert fields["Steps"] == "4" and fields["Seed"] == "3" and fields["Size"] == "128x128"
    assert fields["Model"].endswith("model")
    assert "alice=Alice@1.0" in fields["LoRAs"] and "bob=Bob@0.8" in fields["LoRAs"]
    assert fields["Lora hashes"].startswith('"alice: ')


def test_manifest_replay_gives_the_same_image(assets, tmp_path, monkeypatch) -> None:
    first = tmp_path / "first"
    assert invoke(*generate_args(assets, first)).exit_code == 0
    monkeypatch.chdir(assets)  # manifest paths must lie inside the working directory
    replay = tmp_path / "replay"
    result = invoke("generate", "--manifest", str(first / "freefuse.json"), "--out", str(replay))
    assert result.exit_code == 0, result.output
    assert (first / "freefuse.png").read_bytes() == (replay / "freefuse.png").read_bytes()


def test_manifest_paths_outside_the_working_directory_are_refused(assets, tmp_path, monkeypatch) -> None:
    first = tmp_path / "first"
    assert invoke(*generate_args(assets, first)).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = RUNNER.invoke(app, ["generate", "--manifest", str(first / "freefuse.json"), "--out", "o"])
    assert result.exit_code == 2
    assert "outside both the manifest's folder and the working directory" in result.output
    # Given on the command line, the same files are fine.
    result = RUNNER.invoke(
        app,
        [
            "generate",
            "--manifest",
            str(first / "freefuse.json"),
            "--out",
            "o",
            "--model",
            str(assets / "model"),
            "--lora",
            f"{assets / 'alice.safetensors'}=Alice",
            "--lora",
            f"{assets / 'bob.safetensors'}=Bob@0.8",
        ],
    )
    assert result.exit_code == 0, result.output


def test_existing_outputs_need_overwrite(assets, tmp_path) -> None:
    assert invoke(*generate_args(assets, tmp_path)).exit_code == 0
    before = (tmp_path / "freefuse.png").read_bytes()
    result = RUNNER.invoke(app, generate_args(assets, tmp_path, "--seed", "4"))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "freefuse.png").read_bytes() == before
    assert invoke(*generate_args(assets, tmp_path, "--seed", "4", "--overwrite")).exit_code == 0
    assert (tmp_path / "freefuse.png").read_bytes() != before


def test_masks_command_then_generate_with_those_masks(assets, tmp_path) -> None:
    result = invoke(
        "masks",
        "--model",
        str(assets / "model"),
        "--lora",
        f"{assets / 'alice.safetensors'}",
        "--lora",
        f"{assets / 'bob.safetensors'}=Bob",
        "--prompt",
        "Alice hugging Bob",
        "--out",
        str(tmp_path),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "freefuse.masks.json").is_file() and (tmp_path / "freefuse.masks.png").is_file()
    assert not (tmp_path / "freefuse.png").exists()
    out = tmp_path / "gen"
    result = invoke(
        *generate_args(assets, out, "--method", "masks", "--masks", str(tmp_path / "freefuse.masks.json"))
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "freefuse.json").read_text())
    assert manifest["masks"].endswith("freefuse.masks.json")


def test_inspect_shows_layout_and_trigger_words(assets) -> None:
    result = invoke("inspect", str(assets / "alice.safetensors"), "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)[0]
    assert report["layout"] == "diffusers" and report["trigger_words"] == ["Alice"]


def test_parse_lora_spec() -> None:
    assert parse_lora_spec("a.safetensors=Alice,the girl@0.7") == (
        "a.safetensors",
        ["Alice", "the girl"],
        0.7,
    )
    assert parse_lora_spec("a.safetensors@1.5") == ("a.safetensors", None, 1.5)
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", None, 1.0)


def test_square_brackets_survive_in_errors_and_prompts(assets, tmp_path) -> None:
    """A1111/ComfyUI prompts have brackets; Rich must not read them as markup."""
    missing = tmp_path / "loras[v2]" / "a.safetensors"
    result = RUNNER.invoke(app, generate_args(assets, tmp_path / "o") + ["--lora", f"{missing}=Carol"])
    assert result.exit_code == 2 and "loras[v2]" in result.output
    for prompt in ("[photo style] Alice hugging a cat", "[/x] Alice hugging a cat"):
        args = generate_args(assets, tmp_path / "o")
        args[args.index("--prompt") + 1] = prompt
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert prompt in result.output.replace("\n", "")  # the error quotes the prompt whole
        assert "Traceback" not in result.output and "MarkupError" not in result.output


def test_inspect_reports_every_file_and_kohya_folder_trigger_words(assets, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(assets / "bob.safetensors"))
    kohya = tmp_path / "kohya.safetensors"
    tags = '{"10_ohwx woman": {"ohwx woman": 20, "1girl": 25}}'
    save_file(state, str(kohya), metadata={"ss_tag_frequency": tags})
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        },
        str(sdxl),
    )
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    result = RUNNER.invoke(app, ["inspect", str(broken), str(kohya), str(sdxl), "--json"])
    assert result.exit_code == 2  # one file could not be read; the others are still reported
    reports = json.loads(result.output)
    assert [("error" in report) for report in reports] == [True, False, False]
    assert reports[1]["trigger_words"] == ["ohwx woman"]
    assert reports[1]["trigger_words_from"] == "ss_tag_frequency (folder name)"
    assert reports[2]["for"] == "UNet (SD 1.x / SDXL)" and reports[1]["for"] == "FLUX transformer"
    table = RUNNER.invoke(app, ["inspect", str(kohya), str(sdxl)], terminal_width=200)
    assert table.exit_code == 0 and "ohwx woman" in table.output and "UNet (SD 1.x / SDXL)" in table.output


@pytest.mark.slow
def test_demo_shows_merge_beside_freefuse_and_replays_from_another_folder(tmp_path, monkeypatch) -> None:
    """The README's main command, as a real subprocess; then its manifest replayed from elsewhere."""
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "freefuse", "demo", "--out", str(out), "--steps", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "zorblax" in done.stderr and "demo-compare.png" in done.stderr  # says what to look at
    for name in ("demo.png", "demo.masks.png", "demo.json", "demo-merge.png", "demo-compare.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "demo-compare.png") as compare, Image.open(out / "demo.png") as single:
        assert compare.width == 3 * 4 * single.width
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["model"]["id_or_path"] == "shapesworld"
    assert [lora["path_from_manifest"] for lora in manifest["loras"]] == [
        "demo-loras/zorblax.safetensors",
        "demo-loras/quiffle.safetensors",
    ]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = RUNNER.invoke(app, ["generate", "--manifest", str(out / "demo.json"), "--out", "replay"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "replay" / "freefuse.png").read_bytes() == (out / "demo.png").read_bytes()


def test_demo_on_the_tiny_model_honours_dtype(tmp_path) -> None:
    result = invoke(
        "demo",
        "--model",
        "tiny",
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--size",
        "128",
        "--dtype",
        "bfloat16",
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "demo.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert (tmp_path / "demo-loras" / "alice.safetensors").is_file()


def test_quiet_details_flags_without_types_no_bar_before_a_word_error_wide_tables(
    assets, tmp_path
) -> None:
    help_text = RUNNER.invoke(app, ["generate", "--help"], terminal_width=160).output
    flag_lines = [line for line in help_text.splitlines() if "--overwrite" in line or "--offload" in line]
    assert flag_lines and not any("<bool>" in line for line in flag_lines)
    args = generate_args(assets, tmp_path / "o")
    args[args.index("--prompt") + 1] = "Alice hugging a cat"
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2 and "'Bob' is not in the prompt" in result.output
    assert "denoising" not in result.output  # the mistake is said before any progress bar starts
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "out"
    result = RUNNER.invoke(app, generate_args(assets, deep))
    assert result.exit_code == 0, result.output
    assert str(deep / "freefuse.png") in result.output  # one table row, not wrapped at 80 columns


@pytest.mark.slow
def test_attention_bias_flags_reach_the_manifest_and_mistakes_are_said_first(assets, tmp_path) -> None:
    flags = ["--attn-bias", "2", "--attn-bias-positive", "0.5", "--attn-bias-one-way", "--attn-bias-blocks", "last-half"]
    result = invoke(*generate_args(assets, tmp_path, *flags))
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "freefuse.json").read_text())["settings"]
    assert (settings["attention_bias"], settings["attention_bias_positive"]) == (2.0, 0.5)
    assert (settings["attention_bias_bidirectional"], settings["attention_bias_blocks"]) == (False, "last-half")
    default = invoke(*generate_args(assets, tmp_path / "default"))
    assert default.exit_code == 0, default.output
    settings = json.loads((tmp_path / "default" / "freefuse.json").read_text())["settings"]
    assert settings["attention_bias"] == 0.0 and settings["attention_bias_bidirectional"] is True  # FLUX's, resolved
    bad = RUNNER.invoke(app, generate_args(assets, tmp_path / "bad", "--attn-bias-blocks", "middle"))
    assert bad.exit_code == 2 and "attention_bias_blocks" in bad.output and "denoising" not in bad.output
