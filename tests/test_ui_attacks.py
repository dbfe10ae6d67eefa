"""The web page served beyond this machine, attacked as a visitor would: through raw HTTP calls of
its API (hand-made values, which `gradio_client` would not send: it uploads any local file a value
names) and through `gradio_client` for what a real visitor does (no browser needed).

A visitor reaches no file but their own session's outputs: a hand-made "uploaded file" value naming
a server file is refused and nothing of that file comes back; another session's files cannot be
fetched by their server path; the model choice cannot probe the server's folders.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="Gradio is not installed (pip install 'freefuse[ui]')")
client_module = pytest.importorskip("gradio_client", reason="gradio_client comes with Gradio")
httpx = pytest.importorskip("httpx", reason="httpx comes with Gradio")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def public(tmp_path_factory, saved_tiny_model):
    """The page as `freefuse ui --host 0.0.0.0 --no-auth` makes it (bound to localhost for the test),
    and a LoRA file on the server that no visitor uploaded."""
    from freefuse.testing import free_port
    from freefuse.ui import build_app, launch

    folder = tmp_path_factory.mktemp("public")
    secret = folder / "server-only" / "alice.safetensors"
    secret.parent.mkdir()
    shutil.copyfile(saved_tiny_model / "alice.safetensors", secret)
    app = build_app(model="tiny", root=folder / "sessions", local_paths=False, public_without_login=True)
    port = free_port()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        launch(app, port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "secret": secret, "root": folder / "sessions", "app": app}
    app.close()


def client(public):
    return client_module.Client(public["url"], verbose=False)


def generate_inputs(lora, model: str = "tiny", init=None, reference=None, ip_adapter: str = "") -> list:
    """The generate endpoint's inputs: the model, four LoRA rows (file, path, words, weight, scope), the form
    (settings, then the conditions' pictures and fields)."""
    rows = [lora, "", "Alice", 1.0, "subject"] + [None, "", "", 1.0, "subject"] * 3
    form = ["Alice in the snow", 1, 3, 64, 64, "", "text-to-image", 0, ""]
    form += [init, 0, None, None, "", 1.0, ""]  # an init picture or none; no inpainting mask or ControlNet
    form += [reference, 1.0, ip_adapter, ""]  # a reference picture and the IP-Adapter that reads it, or none
    return [model, *rows, *form]


def forged(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def call(public, api_name: str, data: list) -> str:
    """One raw call of the page's API with hand-made inputs; the result stream as text."""
    url = f"{public['url']}gradio_api/call/{api_name}"
    started = httpx.post(url, json={"data": data}, timeout=60)
    assert started.status_code == 200, started.text
    return httpx.get(f"{url}/{started.json()['event_id']}", timeout=300).text


def kept_bytes(root: Path) -> list[bytes]:
    return [path.read_bytes() for path in root.rglob("*") if path.is_file()] if root.exists() else []


def test_a_forged_file_value_reads_and_hands_out_no_server_file(public) -> None:
    words = call(public, "lora_words_0", [forged(public["secret"])])
    assert "Alice" not in words  # the file's metadata names "Alice": nothing of it comes back
    result = call(public, "generate", generate_inputs(forged(public["secret"])))
    assert "event: complete" not in result or "not received as an upload" in result, result
    assert public["secret"].read_bytes() not in kept_bytes(public["root"])  # nothing linked or copied
    # The page's own check is the last line: a value naming a file its upload route never took
    # (whatever Gradio let through) is refused by the workspace.
    workspace = public["app"].freefuse_workspace
    assert not workspace.received(public["secret"])


def test_a_forged_picture_value_reads_no_server_image_and_an_uploaded_one_runs(public, tmp_path) -> None:
    from PIL import Image

    secret = tmp_path / "server-only.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(secret)
    lora = tmp_path / "alice.safetensors"
    shutil.copyfile(public["secret"], lora)
    uploaded = client_module.handle_file(str(lora))
    result = call(public, "generate", generate_inputs(None, init=forged(secret)))
    assert "event: complete" not in result or "not received as an upload" in result, result
    assert not public["app"].freefuse_workspace.received(secret)
    assert secret.read_bytes() not in kept_bytes(public["root"])
    answer = client(public).predict(
        *generate_inputs(uploaded, init=client_module.handle_file(str(secret))), api_name="/generate"
    )
    assert answer[0] == "", answer[0]
    recorded = [path.read_text() for path in public["root"].glob("*/run-*/freefuse.json")]
    assert any('"conditions/init.png"' in text for text in recorded)



def test_a_forged_reference_picture_or_a_server_path_for_its_model_reads_nothing(public, tmp_path) -> None:
    from PIL import Image

    secret = tmp_path / "server-only.png"
    Image.new("RGB", (40, 40), (10, 200, 10)).save(secret)
    lora = tmp_path / "alice.safetensors"
    shutil.copyfile(public["secret"], lora)
    result = call(public, "generate", generate_inputs(None, reference=forged(secret), ip_adapter="none"))
    assert "event: complete" not in result or "not received as an upload" in result, result
    assert secret.read_bytes() not in kept_bytes(public["root"])
    # A public page offers its IP-Adapters by name: a server path is not among the choices (Gradio itself
    # refuses it; the workspace would too: "This page's IP-Adapters are: …").
    with pytest.raises(Exception, match="not in the list of choices"):
        client(public).predict(
            *generate_inputs(client_module.handle_file(str(lora)), reference=client_module.handle_file(str(secret)),
                             ip_adapter=str(tmp_path)), api_name="/generate",
        )  # fmt: skip
    assert not list(public["root"].glob("*/run-*/conditions/reference.png"))


def test_another_sessions_files_cannot_be_fetched_and_downloads_name_no_server_path(public, tmp_path) -> None:
    mine = tmp_path / "alice.safetensors"
    shutil.copyfile(public["secret"], mine)  # the visitor's own copy, uploaded through the page
    first = client(public).predict(*generate_inputs(client_module.handle_file(str(mine))), api_name="/generate")
    assert first[0] == "", first[0]
    manifests = list(public["root"].glob("*/run-*/freefuse.json"))
    assert manifests
    for path in manifests:  # by its server path, as another visitor who learnt it would ask
        for url in (f"gradio_api/file={path}", f"file={path}", f"gradio_api/file={path.parent}/freefuse.png"):
            response = httpx.get(public["url"] + url, timeout=30)
            assert response.status_code in (403, 404), (url, response.status_code)
    downloads = first[4]
    texts = [Path(item if isinstance(item, str) else item["path"]).read_bytes() for item in downloads]
    assert all(str(public["root"]).encode() not in text for text in texts)


def test_the_model_choice_cannot_probe_the_servers_folders(public, tmp_path) -> None:
    answers = {
        call(public, "generate", generate_inputs(None, model=probe)).replace(probe, "PROBE")
        for probe in ("/etc", "/no/such/folder", str(tmp_path), "someone/some-repo")
    }
    assert len(answers) == 1, answers  # the same answer whether the path exists or not
    [answer] = answers
    assert "exist" not in answer and "incomplete" not in answer


def test_every_actions_error_path_fills_exactly_its_outputs(tmp_path) -> None:
    """A failing action answers [session, message] and leaves the rest as they were: as many values
    as the event has outputs (one too many made Gradio warn and drop a value on every mistake)."""
    from freefuse.ui import build_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = build_app(model="tiny", root=tmp_path / "sessions", local_paths=False)
    functions = app.fns.values() if isinstance(app.fns, dict) else app.fns
    checked = {f.name: (f.fn.rest_outputs + 2, len(f.outputs)) for f in functions if hasattr(f.fn, "rest_outputs")}
    assert {"find_masks", "apply_edit", "run_generate", "replay"} <= set(checked)
    assert all(wanted == wired for wanted, wired in checked.values()), checked
