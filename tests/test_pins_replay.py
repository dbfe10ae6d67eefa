"""Replaying a manifest whose LoRA file changed since it was written is refused, through the
library (`replay_spec`, `RunSpec.check` before loading and the run service's own guard after) and
through `freefuse generate --manifest`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from freefuse.cli import app
from freefuse.errors import LoraFileError, SettingsError
from freefuse.runner import RunService
from freefuse.spec import replay_spec
from freefuse.testing import random_lora, tiny_flux_pipeline

RUNNER = CliRunner()
CHANGED = "has changed since the manifest was written"


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """A run on the built-in tiny model with one LoRA, its manifest, and the LoRA's first bytes."""
    monkeypatch.chdir(tmp_path)  # a manifest's files must lie in its folder or the working one
    pipe = tiny_flux_pipeline(seed=0)
    lora = random_lora(pipe, "alice", seed=1, path=tmp_path / "alice.safetensors")
    first = RUNNER.invoke(
        app,
        [
            "generate",
            "--model",
            "tiny",
            "--lora",
            f"{lora}=Alice",
            "--prompt",
            "Alice in the snow",
            "--steps",
            "2",
            "--size",
            "64",
            "--max-sequence-length",
            "16",
            "--out",
            "first",
        ],
    )
    assert first.exit_code == 0, first.output
    manifest = tmp_path / "first" / "freefuse.json"
    original = lora.read_bytes()
    random_lora(pipe, "alice", seed=2, path=lora)  # the same name, other weights
    assert lora.read_bytes() != original
    return {"manifest": manifest, "lora": lora, "original": original, "pipe": pipe}


def test_the_library_refuses_a_lora_whose_hash_changed(recorded) -> None:
    recorded_hash = json.loads(recorded["manifest"].read_text())["loras"][0]["sha256"]
    spec = replay_spec(recorded["manifest"])
    assert spec.loras[0].sha256 == recorded_hash
    with pytest.raises(LoraFileError, match=CHANGED):
        spec.check()  # before any weights load
    with pytest.raises(SettingsError, match=CHANGED):
        RunService().run(spec, check=False)  # the run service's own guard, after loading the file
    recorded["lora"].write_bytes(recorded["original"])
    result = RunService().run(replay_spec(recorded["manifest"]))  # the recorded file again: it runs
    assert result.output.manifest["loras"][0]["sha256"] == recorded_hash


def test_the_command_line_refuses_a_lora_whose_hash_changed(recorded, tmp_path) -> None:
    result = RUNNER.invoke(app, ["generate", "--manifest", str(recorded["manifest"]), "--out", "replay"])
    assert result.exit_code == 2, result.output
    assert CHANGED in result.output and "Traceback" not in result.output
    assert not (tmp_path / "replay" / "freefuse.png").exists()
    recorded["lora"].write_bytes(recorded["original"])
    again = RUNNER.invoke(app, ["generate", "--manifest", str(recorded["manifest"]), "--out", "replay"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "replay" / "freefuse.png").read_bytes() == (
        tmp_path / "first" / "freefuse.png"
    ).read_bytes()
