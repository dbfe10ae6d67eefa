"""`freefuse ui` in a real headless Chromium: add two LoRA files, find masks, paint one, generate,
download the run, and replay the downloaded manifest to the same image bytes.

Needs Gradio and Playwright (the dev extras) and a Chromium on the machine (Debian's `chromium`;
nothing is downloaded at run time). Without them the tests skip and say why. Screenshots of each
step go to $FREEFUSE_UI_SCREENSHOTS (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="Gradio is not installed (pip install 'freefuse[ui]')")
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (dev extras)")

CHROMIUM = os.environ.get("FREEFUSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium on this machine (Debian: apt-get install chromium; or set FREEFUSE_CHROMIUM)",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the tiny model, on a free localhost port, and two LoRA files with trigger words."""
    from freefuse.testing import free_port, random_lora, tiny_flux_pipeline
    from freefuse.ui import build_app, launch

    folder = tmp_path_factory.mktemp("ui")
    pipe = tiny_flux_pipeline(seed=0)
    for seed, (name, word) in enumerate((("alice", "Alice"), ("bob", "Bob")), start=1):
        random_lora(
            pipe,
            name,
            seed=seed,
            path=folder / f"{name}.safetensors",
            metadata={"modelspec.trigger_phrase": word},
        )
    # A FLUX IP-Adapter for the tiny model, with its image encoder in its folder (found there).
    from safetensors.torch import save_file

    from freefuse.testing import (
        tiny_clip_image_encoder,
        tiny_flux_ip_adapter_state_dict,
        xlabs_ip_adapter_file,
    )

    (folder / "ip").mkdir()
    save_file(xlabs_ip_adapter_file(tiny_flux_ip_adapter_state_dict(pipe.transformer)), str(folder / "ip" / "ip_adapter.safetensors"))
    tiny_clip_image_encoder().save_pretrained(folder / "ip" / "image_encoder")
    app = build_app(model="tiny", root=folder / "sessions")
    port = free_port()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        launch(app, port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "folder": folder, "app": app}
    app.close()


@pytest.fixture
def page(server):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1900}, accept_downloads=True)
            # Waits end on what the page shows, not on a clock: generous for a loaded machine.
            page.set_default_timeout(300_000)
            page.goto(server["url"])
            page.wait_for_selector("#lora-file-0")
            yield page
        finally:
            browser.close()


def text_of(page, selector: str) -> str:
    return page.locator(selector).first.input_value()


def toasts(page) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('.toast-body')).map(e => e.innerText)")


def message(page) -> str:
    return page.inner_text("#page-message")


def error_badges(page) -> int:
    """Components Gradio marks as failed (the red "Error" state)."""
    return page.evaluate("document.querySelectorAll('.error, [data-testid=\"status-tracker\"] .error').length")


def test_add_loras_find_masks_paint_generate_download_and_replay(server, page, tmp_path, monkeypatch) -> None:
    shots = Path(os.environ.get("FREEFUSE_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    folder = server["folder"]

    # 1. Two LoRAs, one uploaded and one by its path: their trigger words come from the files' metadata.
    page.locator("#lora-file-0 input[type=file]").set_input_files(str(folder / "alice.safetensors"))
    page.locator("#lora-path-1 textarea, #lora-path-1 input").first.fill(str(folder / "bob.safetensors"))
    # The upload's event and the typed path's event finish in either order on a loaded machine.
    page.wait_for_function(
        "document.querySelector('#lora-words-1 textarea, #lora-words-1 input').value === 'Bob'"
        " && document.querySelector('#lora-words-0 textarea, #lora-words-0 input').value !== ''"
    )
    assert text_of(page, "#lora-words-0 textarea, #lora-words-0 input") == "Alice"
    page.wait_for_function("document.querySelector('#warnings').innerText.includes('Ready')")
    page.screenshot(path=str(shots / "1-loras.png"), full_page=True)

    # 2. Find masks (stage 1 alone): one mask per subject, shown over the preview.
    page.click("#find-masks")
    page.wait_for_function(
        "document.querySelector('#mask-summary').innerText.includes('Masks:')"
    )
    found = page.inner_text("#mask-summary")
    assert "alice" in found and "bob" in found
    page.screenshot(path=str(shots / "2-masks.png"), full_page=True)

    # 3. Paint on alice's mask with the white brush, and apply: her share of the picture grows. The
    # editor loads the mask picture after the summary shows (on a busy machine, seconds later): a stroke
    # made before it holds one paints nothing, and Apply says so; then paint again. Each wait ends on
    # what the page shows, not on a clock.
    for attempt in range(5):
        page.wait_for_selector("#mask-editor canvas")
        page.locator("#mask-editor").scroll_into_view_if_needed()  # the mouse paints in the viewport
        box = page.locator("#mask-editor canvas").first.bounding_box()
        page.locator("#mask-editor button[aria-label='Brush']").click()
        x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(25):
            page.mouse.move(x + step * 10, y + step * 5)
        page.mouse.up()
        page.screenshot(path=str(shots / f"3-painted-{attempt}.png"), full_page=True)
        page.click("#apply-edit")
        page.wait_for_function(
            "document.querySelector('#mask-summary').innerText.includes('edited')"
            " || document.querySelector('#page-message').innerText.includes('holds no mask')"
        )
        if "edited" in page.inner_text("#mask-summary"):
            break  # else only "not ready yet" ("The editor holds no mask") is retried
        page.wait_for_timeout(500)  # not a wait for the page: the gap between two strokes
    edited = page.inner_text("#mask-summary")
    assert "edited" in edited, edited

    def share(text: str, name: str) -> float:
        return float(text.split(f"{name} ")[1].split("%")[0])

    assert share(edited, "alice") > share(found, "alice")

    # 4. Generate: FreeFuse with the painted masks beside merge, and the run in the list.
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#run-choice input') && document.querySelector('#run-choice input').value === 'run 1'",
    )
    assert not toasts(page) and not message(page).strip()
    page.screenshot(path=str(shots / "4-generated.png"), full_page=True)

    # 5. Download the manifest, the image and the run (zip), and replay the downloaded manifest elsewhere.
    downloads = {}
    for name in ("freefuse.json", "freefuse.png", "freefuse-run-1.zip"):
        with page.expect_download() as download:
            page.locator(f"#manifest a[href$='{name}']").first.click()
        downloads[name] = tmp_path / "downloads" / name
        download.value.save_as(str(downloads[name]))
    manifest = json.loads(downloads["freefuse.json"].read_text())
    assert manifest["settings"]["method"] == "masks" and manifest["masks"]
    elsewhere = tmp_path / "elsewhere"
    with zipfile.ZipFile(downloads["freefuse-run-1.zip"]) as archive:
        archive.extractall(elsewhere)
    shutil.copyfile(downloads["freefuse.json"], elsewhere / "freefuse.json")  # the manifest as downloaded
    from typer.testing import CliRunner

    from freefuse.cli import app as cli

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["generate", "--manifest", str(elsewhere / "freefuse.json"), "--out", "replayed"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "replayed" / "freefuse.png").read_bytes() == downloads["freefuse.png"].read_bytes()

    # 6. Replay in the page too.
    page.click("#replay")
    page.wait_for_function(
        "document.querySelector('#replay-status').innerText.includes('Replayed')"
    )
    assert "byte for byte" in page.inner_text("#replay-status")
    page.screenshot(path=str(shots / "5-replayed.png"), full_page=True)


def test_mistakes_are_messages_in_the_page_not_stack_traces(server, page) -> None:
    page.click("#generate")
    page.wait_for_function("document.querySelector('#page-message').innerText.includes('No LoRA')")
    assert "Traceback" not in page.inner_text("body") and not toasts(page) and error_badges(page) == 0
    # A failed edit says why, keeps what the page showed, and marks no component as failed.
    page.click("#apply-edit")
    page.wait_for_function("document.querySelector('#page-message').innerText.includes('Find the masks first')")
    assert error_badges(page) == 0
    page.locator("#lora-file-0 input[type=file]").set_input_files(str(server["folder"] / "alice.safetensors"))
    page.locator("#prompt textarea").fill("Bob in the snow")  # alice's word is not in the prompt
    page.wait_for_function("document.querySelector('#warnings').innerText.includes('⚠')")
    assert "Alice" in page.inner_text("#warnings")
    # A path to a file that is no LoRA is refused, and nothing of it lands in the session's folder.
    secret = server["folder"] / "secret.txt"
    secret.write_text("not a LoRA")
    page.locator("#lora-path-1 textarea, #lora-path-1 input").first.fill(str(secret))
    page.wait_for_function("document.querySelector('#warnings').innerText.includes('secret.txt')")
    kept = [path.read_bytes() for path in (server["folder"] / "sessions").rglob("*") if path.is_file()]
    assert b"not a LoRA" not in kept


def test_the_server_is_local_and_shares_no_folder(server) -> None:
    assert server["app"].server_name == "127.0.0.1"
    assert str(server["app"].freefuse_root) not in [str(path) for path in server["app"].allowed_paths]


def test_cancel_stops_a_run_and_leaves_no_half_written_run(server, page) -> None:
    earlier = set((server["folder"] / "sessions").glob("*/run-*"))  # other tests' sessions share the server
    page.locator("#lora-file-0 input[type=file]").set_input_files(str(server["folder"] / "alice.safetensors"))
    page.wait_for_function(
        "document.querySelector('#lora-words-0 textarea, #lora-words-0 input').value === 'Alice'"
    )
    # 1000 steps at 512²: minutes, unless Cancel really stops the run (the next one waits for it).
    page.locator("#steps input").fill("1000")
    page.locator("#width input").fill("512")
    page.locator("#height input").fill("512")
    page.locator("#prompt textarea").fill("Alice in the snow")
    page.click("#generate")
    page.wait_for_function("document.body.innerText.includes('denoising')")  # running
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#page-message').innerText.includes('Cancelled')")
    # The server is free again: the next run starts and finishes. Runs take turns in one queue, so
    # had Cancel been ignored, the 1000-step run would have finished (and written its image) first.
    page.locator("#steps input").fill("4")
    page.locator("#width input").fill("128")
    page.locator("#height input").fill("128")
    page.click("#find-masks")
    page.wait_for_function("document.querySelector('#mask-summary').innerText.includes('Masks:')")
    runs = set((server["folder"] / "sessions").glob("*/run-*")) - earlier
    assert runs and not any((run / "freefuse.png").exists() for run in runs), runs


def test_an_init_picture_uploaded_in_the_page_conditions_the_run(server, page, tmp_path) -> None:
    from PIL import Image

    start = tmp_path / "start.png"
    Image.new("RGBA", (64, 64), (10, 200, 30, 255)).save(start)  # RGBA, as many browsers' pictures are
    page.locator("#lora-file-0 input[type=file]").set_input_files(str(server["folder"] / "alice.safetensors"))
    page.wait_for_function(
        "document.querySelector('#lora-words-0 textarea, #lora-words-0 input').value === 'Alice'"
    )
    page.locator("#prompt textarea").fill("Alice in the snow")
    page.locator("#steps input").fill("3")
    page.locator("#width input").fill("128")
    page.locator("#height input").fill("64")
    page.get_by_text("Start from a picture, repaint a region, ControlNet").click()
    page.locator("#init-image input[type=file]").set_input_files(str(start))
    # A picture of another size than the run's is said before anything loads.
    page.wait_for_function("document.querySelector('#warnings').innerText.includes('64x64 pixels')")
    page.locator("#width input").fill("64")
    page.locator("#strength input").fill("0.7")
    page.wait_for_function("document.querySelector('#warnings').innerText.includes('Ready')")
    earlier = set((server["folder"] / "sessions").glob("*/run-*"))  # other tests' sessions share the server
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#run-choice input') && document.querySelector('#run-choice input').value === 'run 1'",
    )
    assert not toasts(page) and not message(page).strip()
    [run] = set((server["folder"] / "sessions").glob("*/run-*")) - earlier
    manifest = json.loads((run / "freefuse.json").read_text())
    assert manifest["conditions"]["init_image"]["path"] == "conditions/init.png"
    assert manifest["conditions"]["strength"] == 0.7
    assert Image.open(run / "conditions" / "init.png").mode == "RGB"


def test_a_reference_picture_read_by_a_typed_ip_adapter_conditions_the_run(server, page, tmp_path) -> None:
    from PIL import Image

    reference = tmp_path / "reference.png"
    Image.new("RGB", (40, 30), (200, 40, 90)).save(reference)  # any size: the image encoder resizes it
    page.locator("#lora-file-0 input[type=file]").set_input_files(str(server["folder"] / "alice.safetensors"))
    page.wait_for_function(
        "document.querySelector('#lora-words-0 textarea, #lora-words-0 input').value === 'Alice'"
    )
    page.locator("#prompt textarea").fill("Alice in the snow")
    page.locator("#steps input").fill("3")
    page.locator("#width input").fill("64")
    page.locator("#height input").fill("64")
    page.get_by_text("reference picture").first.click()
    page.locator("#reference-image input[type=file]").set_input_files(str(reference))
    # Without a model to read it, the picture is refused before anything runs.
    page.wait_for_function("document.querySelector('#warnings').innerText.includes('IP-Adapter or by a Redux model')")
    page.locator("#ip-adapter-model textarea, #ip-adapter-model input").first.fill(str(server["folder"] / "ip"))
    page.locator("#reference-scale input").fill("0.5")
    page.wait_for_function("document.querySelector('#warnings').innerText.includes('Ready')")
    earlier = set((server["folder"] / "sessions").glob("*/run-*"))
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#run-choice input') && document.querySelector('#run-choice input').value === 'run 1'",
    )
    assert not toasts(page) and not message(page).strip()
    [run] = set((server["folder"] / "sessions").glob("*/run-*")) - earlier
    recorded = json.loads((run / "freefuse.json").read_text())["conditions"]["ip_adapter"]
    assert recorded["image"]["path"] == "conditions/reference.png" and recorded["scale"] == 0.5
    # Found beside the adapter, and named in the downloadable manifest without the server's paths.
    assert recorded["model"] == "ip" and recorded["image_encoder"] == "image_encoder"
    assert Image.open(run / "conditions" / "reference.png").size == (40, 30)
