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


def generate_inputs(lora, model: str = "tiny") -> list:
    """The generate endpoint's inputs: the model, four LoRA rows (file, path, words, weight, scope), the form."""
    rows = [lora, "", "Alice", 1.0, "subject"] + [None, "", "", 1.0, "subject"] * 3
    form = ["Alice in the snow", 1, 3, 64, 64, "", "text-to-image", 0, ""]
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
