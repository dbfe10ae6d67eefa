"""The web page's actions and its visitor boundary, without a browser (`freefuse.workspace`).

What a visitor may reach: uploads Gradio received, the page's examples, typed paths only on a page
served to this machine alone, the offered models only; storage per session and in all is bounded,
old sessions are removed, and a downloaded run's manifest names no server path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from freefuse.cli import app
from freefuse.errors import LoraFileError, SettingsError
from freefuse.lora import check_lora_path
from freefuse.runner import RunService
from freefuse.workspace import Form, LoraSlot, PageLimits, Workspace

FORM = Form(prompt="Alice hugging Bob", seed=1, steps=3, width=64, height=64, guidance="")


def public(tmp_path: Path, uploads: Path, **limits) -> Workspace:
    """A page served beyond this machine whose upload route took the files under `uploads`."""
    return Workspace(
        tmp_path / "sessions",
        RunService(),
        received=lambda path: path.is_relative_to(uploads.resolve()),
        local_paths=False,
        models=["tiny"],
        limits=PageLimits(**limits) if limits else None,
    )


def uploaded(assets: Path, uploads: Path) -> list[LoraSlot]:
    """alice and bob as Gradio keeps uploads: `<upload folder>/<hash>/<file name>`."""
    slots = []
    for name, word in (("alice", "Alice"), ("bob", "Bob")):
        target = uploads / f"h{name}" / f"{name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(assets / f"{name}.safetensors", target)
        slots.append(LoraSlot(path=str(target), words=word))
    return slots


def test_a_file_value_naming_any_other_path_is_refused(assets, tmp_path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    workspace = public(tmp_path, uploads)
    session = workspace.new_session()
    forged = LoraSlot(path=str(assets / "alice.safetensors"), words="Alice")  # a server file, never uploaded
    assert workspace.trigger_words(forged) == ""  # nothing of it is read back
    with pytest.raises(SettingsError, match="not received as an upload"):
        workspace.check(session, "tiny", [forged], FORM)
    escape = uploads / "link.safetensors"
    escape.symlink_to(assets / "alice.safetensors")  # inside by name, outside once resolved
    with pytest.raises(SettingsError, match="not received as an upload"):
        workspace.lora_file(LoraSlot(path=str(escape)))
    with pytest.raises(SettingsError, match="uploaded LoRA files only"):
        workspace.lora_file(LoraSlot(typed=str(assets / "alice.safetensors")))
    # Nothing of the server's file was linked or copied into the session.
    kept = [path.read_bytes() for path in workspace.root.rglob("*") if path.is_file()]
    assert (assets / "alice.safetensors").read_bytes() not in kept
    # An upload is read, and its words come back.
    assert workspace.trigger_words(uploaded(assets, uploads)[0]) == "Alice"


def test_a_local_page_takes_typed_paths_and_any_model(assets, tmp_path) -> None:
    workspace = Workspace(tmp_path / "s", RunService(), local_paths=True)
    assert workspace.trigger_words(LoraSlot(typed=str(assets / "alice.safetensors"))) == "Alice"
    assert workspace.model(str(assets / "model")) == str(assets / "model")


def test_the_model_box_cannot_probe_the_servers_folders(tmp_path) -> None:
    workspace = public(tmp_path, tmp_path / "uploads")
    messages = set()
    for probe in ("/etc", "/no/such/folder", "black-forest-labs/FLUX.1-dev", str(tmp_path)):
        with pytest.raises(SettingsError) as refused:
            workspace.model(probe)
        messages.add(str(refused.value))
    assert messages == {"This page runs tiny; pick one of them."}  # the same whatever exists
    assert workspace.model("tiny") == "tiny"


def test_a_page_load_writes_nothing_and_sessions_are_apart(tmp_path) -> None:
    workspace = public(tmp_path, tmp_path / "uploads")
    first, second = workspace.new_session(), workspace.new_session()
    assert first.folder != second.folder and len(first.folder.name) == 32
    assert not any(workspace.root.iterdir())


def test_storage_limits_and_old_sessions_are_removed(assets, tmp_path) -> None:
    uploads = tmp_path / "uploads"
    workspace = public(tmp_path, uploads, max_session_bytes=1, session_ttl_s=3600)
    slots = uploaded(assets, uploads)
    old = workspace.root / ("0" * 32)
    (old / "run-1").mkdir(parents=True)
    (old / "run-1" / "freefuse.png").write_bytes(b"x" * 100)
    os.utime(old, (time.time() - 7200, time.time() - 7200))  # unused for two hours
    session = workspace.new_session()
    workspace.generate(session, "tiny", slots, FORM)
    assert not old.exists()  # expired, removed when a session opened
    with pytest.raises(SettingsError, match="its limit is 0.0 MiB"):  # its first run filled its share
        workspace.generate(session, "tiny", slots, FORM)
    crowded = public(tmp_path / "other", uploads, max_total_bytes=50)
    older, newer = crowded.root / ("1" * 32), crowded.root / ("2" * 32)
    for folder in (older, newer):
        folder.mkdir(parents=True)
        (folder / "run.png").write_bytes(b"x" * 40)
    os.utime(older, (time.time() - 60, time.time() - 60))
    crowded.check(crowded.new_session(), "tiny", slots, FORM)
    assert not older.exists() and newer.exists()  # the oldest went to bring the total under the limit


def test_a_downloaded_run_names_no_server_path_and_replays_from_itself(assets, tmp_path, monkeypatch) -> None:
    uploads = tmp_path / "uploads"
    workspace = public(tmp_path, uploads)
    session = workspace.new_session()
    run = workspace.generate(session, "tiny", uploaded(assets, uploads), FORM)
    manifest_path, image_path, archive = (Path(path) for path in run.downloads)
    text = manifest_path.read_text()
    assert str(tmp_path) not in text and str(session.folder) not in text
    manifest = json.loads(text)
    assert manifest["command"] == [] and all(not Path(lora["path"]).is_absolute() for lora in manifest["loras"])
    with zipfile.ZipFile(archive) as zipped:
        inside = b"".join(zipped.read(name) for name in zipped.namelist() if name.endswith(".json"))
    assert str(tmp_path).encode() not in inside
    elsewhere = tmp_path / "downloaded"
    shutil.unpack_archive(archive, elsewhere)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", "--manifest", str(elsewhere / "freefuse.json"), "--out", "again"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "freefuse.png").read_bytes() == image_path.read_bytes()


def test_downloads_from_a_root_outside_the_temp_folder_are_copies_there(assets, tmp_path, monkeypatch) -> None:
    root = tmp_path / "srv"
    (root / "abc").mkdir(parents=True)
    (root / "abc" / "f.json").write_text("{}")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.chdir(assets)
    workspace = Workspace(root, RunService(), local_paths=False)
    served = Path(workspace.servable(root / "abc" / "f.json"))
    assert served.is_relative_to(tmp_path / "tmp") and served.read_text() == "{}"


def test_a_files_first_bytes_are_never_shown_in_a_message(tmp_path) -> None:
    secret = tmp_path / "shadow.safetensors"
    secret.write_bytes(b"root:*:20000:0:99999:7:::\n")
    with pytest.raises(LoraFileError) as refused:
        check_lora_path(secret)
    number = int.from_bytes(b"root:*:2", "little")
    assert str(number) not in str(refused.value) and "root" not in str(refused.value).replace(str(tmp_path), "")


def test_serving_beyond_this_machine_needs_a_login_or_saying_there_is_none(monkeypatch) -> None:
    monkeypatch.delenv("FREEFUSE_UI_AUTH", raising=False)
    result = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "--auth USER:PASSWORD" in result.output and "--no-auth" in result.output
    bad = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0", "--auth", "nopassword"])
    assert bad.exit_code == 2 and "USER:PASSWORD" in bad.output


def test_the_pages_attention_bias_field_reaches_the_run_settings(assets, tmp_path) -> None:
    workspace = Workspace(tmp_path / "s", RunService(), local_paths=True)
    session = workspace.new_session()
    slots = [LoraSlot(typed=str(assets / f"{name}.safetensors"), words=word) for name, word in (("alice", "Alice"), ("bob", "Bob"))]
    made = workspace.spec(tmp_path / "run", "tiny", slots, dataclasses.replace(FORM, attn_bias="2.5"), "freefuse")
    assert made.settings.attention_bias == 2.5
    assert workspace.spec(tmp_path / "run2", "tiny", slots, FORM, "freefuse").settings.attention_bias is None
    with pytest.raises(SettingsError, match="attention_bias"):  # refused before anything loads
        workspace.check(session, "tiny", slots, dataclasses.replace(FORM, attn_bias="-1"))
