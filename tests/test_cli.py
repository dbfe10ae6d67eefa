"""The `freefuse` command line on a tiny model saved like a real one (`--model DIR`)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import freefuse
from freefuse.cli import app, parse_lora_spec, split_lora_name
from freefuse.errors import FreeFuseError

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
    assert reports[2]["for"] == "UNet (SD 1.x / SDXL)" and reports[1]["for"] == "FLUX.1 transformer"
    table = RUNNER.invoke(app, ["inspect", str(kohya), str(sdxl)], terminal_width=200)
    assert table.exit_code == 0 and "ohwx woman" in table.output and "UNet (SD 1.x / SDXL)" in table.output


@pytest.mark.slow
def test_demo_shows_merge_beside_freefuse_and_replays_from_another_folder(tmp_path, monkeypatch) -> None:
    """The README's main command, as a real subprocess, twice into one folder (the demo replaces its own
    files); the generate line it prints, as pasted; then its manifest replayed from elsewhere."""
    out = tmp_path / "demo"
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "freefuse", "demo", "--out", str(out), "--steps", "8"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "COLUMNS": "400"},
        )
        assert done.returncode == 0, done.stderr
    assert "replacing the previous demo's files" in done.stderr
    made = run_printed_generate_line(done.stderr)  # ShapesWorld, no text-length flag: its own 24 tokens
    assert json.loads(made.with_suffix(".json").read_text())["settings"]["max_sequence_length"] == 24
    said = " ".join(done.stderr.split())
    assert "demo-compare.png: left, merge" in said and "purple: the zorblax's" in said  # what to look at
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
    assert (elsewhere / "replay" / "demo.png").read_bytes() == (out / "demo.png").read_bytes()  # its own name


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
    # The line it prints runs as pasted: LoRAs that fit the tiny model, every setting it needs.
    made = run_printed_generate_line(result.output)
    assert made.exists()


def run_printed_generate_line(output: str) -> Path:
    """Run the `freefuse generate …` line a demo printed, parsed as a shell would; return its image."""
    [line] = [line for line in output.splitlines() if line.startswith("freefuse generate --model")]
    args = shlex.split(line)[1:]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, (line, result.output)
    return Path(args[args.index("--out") + 1]) / "freefuse.png"


def test_a_lora_for_another_model_on_a_built_in_one_says_where_fitting_ones_come_from(tmp_path) -> None:
    shapes_lora = Path(freefuse.__file__).parent / "shapesworld" / "weights" / "loras" / "zorblax.safetensors"
    result = RUNNER.invoke(
        app,
        ["generate", "--model", "tiny", "--lora", f"{shapes_lora}=zorblax", "--prompt", "a zorblax",
         "--out", str(tmp_path), *FAST],
        terminal_width=400,
    )
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "a LoRA for a model of another size" in said
    assert "freefuse demo --model tiny --out DIR" in said


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


def test_h_is_help_for_every_command_and_help_shows_no_type() -> None:
    for args in ([], ["generate"], ["inspect"], ["demo"], ["batch"], ["eval"], ["eval", "shapesworld"]):
        result = RUNNER.invoke(app, [*args, "-h"], terminal_width=160)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output
        [line] = [line for line in result.output.splitlines() if "--help" in line]
        assert "-h" in line and "<bool>" not in line


def test_split_lora_name_keeps_windows_and_unix_paths() -> None:
    assert split_lora_name("carol::loras/kohya_flux_carol_double.safetensors=Carol@0.8") == (
        "carol",
        "loras/kohya_flux_carol_double.safetensors=Carol@0.8",
    )
    for path in (r"C:\loras\a.safetensors=Alice", "/home/me/a.safetensors@0.5", "a.safetensors"):
        assert split_lora_name(path) == (None, path)
    with pytest.raises(FreeFuseError, match="not usable as an adapter name"):
        split_lora_name("-carol::a.safetensors")
    with pytest.raises(FreeFuseError, match="NAME::PATH"):
        split_lora_name("::a.safetensors")


def test_lora_named_on_the_command_line(assets, tmp_path) -> None:
    args = generate_args(assets, tmp_path)
    args[args.index(f"{assets / 'bob.safetensors'}=Bob@0.8")] = f"robert::{assets / 'bob.safetensors'}=Bob@0.8"
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "freefuse.json").read_text())
    assert [lora["name"] for lora in manifest["loras"]] == ["alice", "robert"]
    assert set(manifest["images"][0]["subjects"]) == {"alice", "robert"}
    assert json.loads((tmp_path / "freefuse.masks.json").read_text())["names"] == ["alice", "robert"]


def test_help_inspect_and_flag_mistakes_import_no_torch(tmp_path) -> None:
    """Start-up: what needs no model must not wait seconds for torch and diffusers to import."""
    lora = Path(freefuse.__file__).parent / "shapesworld" / "weights" / "loras" / "zorblax.safetensors"
    calls = [
        (["--help"], 0),
        (["generate", "-h"], 0),
        (["inspect", str(lora)], 0),
        (["generate", "--model", "tiny"], 2),  # no --prompt
        (["generate", "--model", "tiny", "--prompt", "a", "--lora", "x.safetensors="], 2),
        (["demo", "--size", "abc"], 2),
        (["batch", str(tmp_path / "missing.jsonl")], 2),
    ]
    script = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from freefuse.cli import app\n"
        "codes = [CliRunner().invoke(app, args).exit_code for args in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules, 'diffusers': 'diffusers' in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps([args for args, _ in calls])],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["codes"] == [code for _, code in calls]
    assert not found["torch"] and not found["diffusers"]


def test_replay_is_named_after_its_manifest_and_says_what_differs(assets, tmp_path, monkeypatch) -> None:
    first = tmp_path / "first"
    assert invoke(*generate_args(assets, first, "--name", "demo")).exit_code == 0
    monkeypatch.chdir(assets)
    # bob again without its @0.8, the same --steps, another --seed, alice renamed
    result = RUNNER.invoke(
        app,
        [
            "generate",
            "--manifest",
            str(first / "demo.json"),
            "--out",
            str(tmp_path / "replay"),
            "--lora",
            f"ally::{assets / 'alice.safetensors'}=Alice",
            "--lora",
            f"{assets / 'bob.safetensors'}=Bob",
            "--steps",
            "4",
            "--seed",
            "5",
        ],
        terminal_width=400,
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "replay" / "demo.png").is_file() and not (tmp_path / "replay" / "freefuse.png").exists()
    said = " ".join(result.output.split())
    assert "--seed 3 -> 5" in said and "--steps" not in said.split("differ from it:")[1].split(".")[0]
    assert "LoRA 'bob' weight 1.0 (the manifest: 0.8)" in said
    assert "LoRA 'ally' name 'ally' (the manifest: 'alice')" in said  # matched by its file
    assert "LoRA 'alice'" not in said.replace("(the manifest: 'alice')", "")


def test_the_demo_replaces_its_own_files_and_no_one_elses(tmp_path) -> None:
    """The demo run twice into one folder replaces what it wrote; a folder with another run named demo
    is left alone without --overwrite. (ShapesWorld, as the README runs it: the slow test above.)"""
    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny", "--out", str(out), "--steps", "2", "--size", "64"]
    first = RUNNER.invoke(app, args, terminal_width=400)
    assert first.exit_code == 0, first.output
    assert json.loads((out / "demo.json").read_text())["demo"] is True
    again = RUNNER.invoke(app, [*args, "--seed", "1"], terminal_width=400)
    assert again.exit_code == 0, again.output
    assert "replacing the previous demo's files" in " ".join(again.output.split())
    assert json.loads((out / "demo.json").read_text())["settings"]["seed"] == 1
    other = tmp_path / "other"
    other.mkdir()
    foreign = {"outputs": {"image": "demo.png"}, "loras": [{"path_from_manifest": "../mine.safetensors"}]}
    (other / "demo.json").write_text(json.dumps(foreign))
    refused = RUNNER.invoke(app, [*args[:3], "--out", str(other), *args[5:]], terminal_width=400)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert json.loads((other / "demo.json").read_text()) == foreign


def test_the_demo_picture_draws_each_mask_in_its_subjects_colour_and_the_legend_below() -> None:
    from freefuse.core import MaskSet
    from freefuse.demo import compare_picture, plan_demo

    plan = plan_demo()  # ShapesWorld: zorblax purple, quiffle orange
    assert plan.colours == {"zorblax": (155, 60, 215), "quiffle": (250, 140, 20)}
    assert "purple" in plan.look_at and "orange" in plan.look_at
    masks = torch.zeros(2, 16, 16)
    masks[0, :, :8] = 1
    masks[1, :, 8:] = 1
    black = Image.new("RGB", (16, 16), (0, 0, 0))
    picture = compare_picture(black, black, MaskSet(["zorblax", "quiffle"], masks), scale=4, colours=plan.colours)
    pixels = np.asarray(picture).astype(int)
    cell, caption = 64, 14
    assert picture.size[0] == 3 * cell and picture.size[1] > caption + cell  # the legend under the panels
    zorblax, quiffle = pixels[caption + 32, 2 * cell + 16], pixels[caption + 32, 2 * cell + 48]
    assert zorblax[2] > zorblax[1] and zorblax[0] > zorblax[1]  # purple-ish: the zorblax's own colour
    assert quiffle[0] > quiffle[1] > quiffle[2]  # orange-ish: the quiffle's own
    legend = pixels[caption + cell :]
    assert (np.abs(legend - np.array([155, 60, 215])).max(axis=-1) == 0).any()  # its square in the legend


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
