"""Bad input and hostile visitors, round three: user mistakes that gave tracebacks or "internal error",
unbounded work, and small leaks (docs/reliability.md, "Round three"). Each case: exit 2 and one
message, and nothing written.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from freefuse.cli import app
from freefuse.testing import free_port

RUNNER = CliRunner()
FAST = ["--steps", "3", "--size", "64x64", "--max-sequence-length", "32"]
DEEP = 100_000  # levels of nesting: past Python's recursion limit


def cli(*args: str):
    return RUNNER.invoke(app, list(args))


def generate(assets: Path, out: Path, *extra: str, loras: list[str] | None = None, prompt: str = "Alice hugging Bob"):
    if loras is None:
        loras = [f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'bob.safetensors'}=Bob"]
    lora_args = [arg for spec in loras for arg in ("--lora", spec)]
    return cli(
        "generate", "--model", str(assets / "model"), *lora_args, "--prompt", prompt, "--out", str(out), *FAST, *extra
    )


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output, result.output


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def job_line(assets: Path, **fields) -> str:
    job = {
        "model": str(assets / "model"),
        "prompt": "Alice hugging Bob",
        "steps": 3,
        "size": "64x64",
        "loras": [{"path": str(assets / "alice.safetensors")}, {"path": str(assets / "bob.safetensors"), "words": ["Bob"]}],
    }
    job.update(fields)
    return json.dumps(job)


# -- 5. tracebacks and "internal error" for user mistakes -------------------------------------------------


def test_files_the_system_cannot_read_are_said_not_internal_errors(assets, tmp_path) -> None:
    unreadable = Path("/proc/self/mem")  # a regular file whose reading fails (EIO)
    if not unreadable.exists():
        pytest.skip("needs /proc")
    jobs = tmp_path / "jobs.jsonl"
    jobs.symlink_to(unreadable)
    assert_user_error(cli("batch", str(jobs), "--out", str(tmp_path / "o")), "cannot be read")
    assert_user_error(cli("generate", "--manifest", str(unreadable), "--out", str(tmp_path / "o")), "cannot be read")
    masks = tmp_path / "m.masks.json"
    masks.symlink_to(unreadable)
    result = generate(assets, tmp_path / "o", "--method", "masks", "--masks", str(masks))
    assert_user_error(result, "cannot be read")
    assert_user_error(cli("generate", "--model", "x" * 300, "--prompt", "Alice", *FAST), "cannot be used")
    assert_nothing_written(tmp_path / "o")


def test_a_busy_ui_port_is_a_clear_error(tmp_path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = cli("ui", "--port", str(port), "--root", str(tmp_path / "ui"))
    assert_user_error(result, f"Port {port}", "in use")


@pytest.mark.parametrize("device", ["mps", "xla", "meta", "xpu", "hpu", "privateuseone", "cuda:99"])
def test_devices_torch_cannot_use_are_refused_before_loading(assets, tmp_path, device) -> None:
    if device.split(":")[0] == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    result = generate(assets, tmp_path / "o", "--device", device)
    assert_user_error(result, f"--device {device}")
    assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("weight", ["1e30", "1e300", "-1e300"])
def test_a_lora_weight_so_large_the_images_would_be_nan_is_refused(assets, tmp_path, weight) -> None:
    loras = [f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'bob.safetensors'}=Bob@{weight}"]
    assert_user_error(generate(assets, tmp_path / "o", loras=loras), "weight", "at most 100")
    assert_nothing_written(tmp_path / "o")


def test_a_job_file_weight_out_of_range_names_the_line(assets, tmp_path) -> None:
    jobs = tmp_path / "weights.jsonl"
    line = job_line(assets, loras=[{"path": str(assets / "alice.safetensors"), "weight": 1e300}])
    jobs.write_text(line + "\n")
    assert_user_error(cli("batch", str(jobs), "--dry-run", "--out", str(tmp_path / "o")), "line 1", "at most 100")


def test_an_error_while_masking_is_installed_is_not_hidden_by_the_clean_up(tiny_pipe, monkeypatch) -> None:
    """The masked op is put on layer after layer; an error on one of them is the error raised (the
    clean-up once hid it behind an AttributeError)."""
    from freefuse import FreeFuse
    from freefuse.masking import LoraMasker
    from freefuse.testing import random_lora

    random_lora(tiny_pipe, "alice", seed=1)
    freefuse = FreeFuse(tiny_pipe)
    freefuse.use_adapter("alice", words=["Alice"])

    def broken_plan(self, name, layer, adapters):
        raise RuntimeError("no plan for this layer")

    monkeypatch.setattr(LoraMasker, "_plan", broken_plan)
    with pytest.raises(RuntimeError, match="no plan for this layer"):
        freefuse("Alice", num_inference_steps=2, height=64, width=64, max_sequence_length=32)
    assert all("forward" not in module.__dict__ for module in tiny_pipe.transformer.modules())


@pytest.mark.parametrize("shape", [(), (2, 3, 4), (0, 32), (1, 0)])
def test_malformed_bundled_embeddings_are_refused_before_loading(assets, tmp_path, shape) -> None:
    tensors = load_file(str(assets / "bob.safetensors"))
    tensors["bundle_emb.ohwx.t5"] = torch.zeros(shape)
    path = tmp_path / "bundled.safetensors"
    save_file(tensors, str(path))
    result = generate(assets, tmp_path / "o", loras=[f"{assets / 'alice.safetensors'}=Alice", f"{path}=ohwx"],
                      prompt="Alice hugging ohwx")
    assert_user_error(result, "bundled.safetensors", "'ohwx'")
    assert_nothing_written(tmp_path / "o")


def test_undecodable_bytes_in_a_prompt_are_a_clear_error(assets, tmp_path) -> None:
    # What Python makes of a command-line argument that is not UTF-8 (surrogateescape).
    result = generate(assets, tmp_path / "o", prompt="Alice hugging Bob \udcff")
    assert_user_error(result, "`prompt`", "not valid UTF-8", "0xff")
    jobs = tmp_path / "surrogate.jsonl"
    jobs.write_text(job_line(assets, prompt="Alice hugging Bob \ud800") + "\n")  # json.dumps writes "\\ud800"
    assert_user_error(cli("batch", str(jobs), "--dry-run", "--out", str(tmp_path / "o")), "line 1", "not valid UTF-8")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(job_line(assets, prompt="Alice hugging Bob @").encode().replace(b"@", b"\xe9") + b"\n")
    assert_user_error(cli("batch", str(latin1), "--dry-run", "--out", str(tmp_path / "o")), "latin1.jsonl", "line 1",
                      "not UTF-8")
    result = generate(assets, tmp_path / "o", loras=[f"{assets / 'alice.safetensors'}=Al\udcffice"],
                      prompt="Al\udcffice")
    assert_user_error(result, "not valid UTF-8")
    assert_nothing_written(tmp_path / "o")


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".yaml"])
def test_deeply_nested_job_files_are_refused(assets, tmp_path, suffix) -> None:
    jobs = tmp_path / f"deep{suffix}"
    if suffix == ".yaml":
        jobs.write_text("jobs: " + nested(DEEP) + "\n")
    elif suffix == ".json":
        jobs.write_text(nested(DEEP))
    else:
        jobs.write_text(job_line(assets) + "\n" + '{"model": ' + nested(DEEP) + "}\n")
    result = cli("batch", str(jobs), "--dry-run", "--out", str(tmp_path / "o"))
    assert_user_error(result, jobs.name, "nested")


def test_deeply_nested_manifests_mask_indexes_and_model_configs_are_refused(assets, tmp_path) -> None:
    manifest = tmp_path / "deep.json"
    manifest.write_text('{"format": "freefuse-manifest/1", "settings": ' + nested(DEEP) + "}")
    assert_user_error(cli("generate", "--manifest", str(manifest), "--out", str(tmp_path / "o")), "deep.json",
                      "nested")
    masks = tmp_path / "deep.masks.json"
    masks.write_text('{"names": ' + nested(DEEP) + "}")
    result = generate(assets, tmp_path / "o", "--method", "masks", "--masks", str(masks))
    assert_user_error(result, "deep.masks.json", "nested")
    import shutil

    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    (model / "model_index.json").write_text('{"_class_name": "FluxPipeline", "x": ' + nested(DEEP) + "}")
    result = cli("generate", "--model", str(model), "--lora", f"{assets / 'alice.safetensors'}=Alice", "--prompt",
                 "Alice", "--out", str(tmp_path / "o"), *FAST)
    assert_user_error(result, "model_index.json", "nested")
    assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("key", ["modelspec.trigger_phrase", "ss_tag_frequency", "ss_dataset_dirs"])
def test_deeply_nested_lora_metadata_values_are_ignored_not_a_crash(assets, tmp_path, key) -> None:
    tensors = load_file(str(assets / "bob.safetensors"))
    path = tmp_path / "deep-meta.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", key: nested(DEEP)})
    result = cli("inspect", str(path))
    assert result.exit_code == 0, result.output
    assert "internal error" not in result.output
    result = generate(assets, tmp_path / "o", loras=[f"{assets / 'alice.safetensors'}=Alice", str(path)])
    assert_user_error(result, "deep-meta")  # no words of its own: it says so, it does not crash


# -- 6. unbounded work -------------------------------------------------------------------------------------


class CountingTokenizer:
    """A tokenizer that counts how often it tokenizes a long text, and every offset read of its output."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.long_calls, self.reads = tokenizer, 0, 0

    def __call__(self, text, **kwargs):
        self.long_calls += len(text) > 100
        encoding = self.tokenizer(text, **kwargs)
        if "offset_mapping" in encoding:
            owner = self

            class Offsets(list):
                def __iter__(self):
                    for item in list.__iter__(self):
                        owner.reads += 1
                        yield item

                def __getitem__(self, index):
                    owner.reads += 1
                    return list.__getitem__(self, index)

            encoding["offset_mapping"] = Offsets(encoding["offset_mapping"])
        return encoding

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_word_matching_work_grows_with_the_prompt_not_its_square() -> None:
    from freefuse.preflight import SubjectFacts, word_positions
    from freefuse.tiny import tiny_t5_tokenizer

    subjects = [SubjectFacts("alice", ("Alice", "alice")), SubjectFacts("bob", ("Bob", "the Bob"))]
    reads = {}
    for repeats in (100, 200):
        tokenizer = CountingTokenizer(tiny_t5_tokenizer())
        prompt = "Alice hugging Bob in the snow. " * repeats
        found = word_positions(tokenizer, [prompt, prompt], subjects, 4096, True, [])
        assert len(found[0]["alice"]) == repeats and found[0] == found[1]
        assert tokenizer.long_calls == 1  # each prompt tokenized once, not once per word and image
        reads[repeats] = tokenizer.reads
    assert reads[200] < 2.5 * reads[100], reads  # linear: twice the prompt, twice the work (quadratic: 4x)


def test_an_absurdly_long_prompt_is_refused_with_the_limit(assets, tmp_path) -> None:
    result = generate(assets, tmp_path / "o", prompt="Alice hugging Bob " * 2000)
    assert_user_error(result, "`prompt` is 36,000 characters long", "at most 10,000")
    assert_nothing_written(tmp_path / "o")


def test_a_dry_run_of_a_big_grid_reads_each_file_once(assets, tmp_path, monkeypatch) -> None:
    """Per job, a dry run checks settings and words; each LoRA file, the model folder and its
    tokenizer are read once for the whole grid, not once per job."""
    import safetensors

    import freefuse.lora
    from freefuse.backends.flux import FluxBackend

    counts = {"headers": 0, "tensor reads": 0, "tokenizers": 0}
    real_open, real_safe_open = open, safetensors.safe_open
    real_tokenizer = FluxBackend.architecture.load_tokenizer

    def counting_open(file, *args, **kwargs):
        counts["headers"] += str(file).endswith(".safetensors")
        return real_open(file, *args, **kwargs)

    def counting_safe_open(*args, **kwargs):
        counts["tensor reads"] += 1
        return real_safe_open(*args, **kwargs)

    def counting_tokenizer(folder):
        counts["tokenizers"] += 1
        return real_tokenizer(folder)

    monkeypatch.setattr(freefuse.lora, "open", counting_open, raising=False)
    monkeypatch.setattr(safetensors, "safe_open", counting_safe_open)
    monkeypatch.setattr(FluxBackend.architecture, "load_tokenizer", counting_tokenizer)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"model: {assets / 'model'}\n"
        f"loras: [{{path: {assets / 'alice.safetensors'}}}, {{path: {assets / 'bob.safetensors'}, words: [Bob]}}]\n"
        "prompts: ['{A} and {B}']\nseeds: {start: 0, count: 200}\nsettings: {steps: 3, size: 64x64}\n"
    )
    result = cli("batch", str(grid), "--grid", "--dry-run", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "200 jobs, 0 done, 200 to do" in result.output
    assert counts["tokenizers"] <= 1 and counts["tensor reads"] <= 2 and counts["headers"] <= 6, counts


def test_grid_jobs_made_from_a_template_equal_jobs_made_one_by_one(assets, tmp_path) -> None:
    from freefuse.batch import expand_grid, job_from_dict

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"model: {assets / 'model'}\n"
        f"loras: [{{path: {assets / 'alice.safetensors'}}}, {{path: {assets / 'bob.safetensors'}, words: [Bob]}}]\n"
        "prompts: ['{A} and {B}']\nseeds: [3, 5, 9]\nmethods: [freefuse, merge]\nsettings: {steps: 3, size: 64x64}\n"
    )
    jobs = expand_grid(grid)
    assert [job.settings.seed for job in jobs] == [3, 3, 5, 5, 9, 9]
    loras = [{"path": str(assets / "alice.safetensors")}, {"path": str(assets / "bob.safetensors"), "words": ["Bob"]}]
    alone = job_from_dict(
        {"model": str(assets / "model"), "prompt": "{A} and {B}", "seed": 9, "method": "merge", "steps": 3,
         "size": "64x64", "loras": loras},
        tmp_path,
        "alone",
    )
    assert jobs[-1].id == alone.id and jobs[-1].stem == alone.stem and jobs[-1].settings == alone.settings
    far = tmp_path / "far.yaml"
    far.write_text(grid.read_text().replace("seeds: [3, 5, 9]", f"seeds: [3, {2**63 - 1}]"))
    with pytest.raises(ValueError, match=r"seed 9223372036854775807.*`seed` must be"):
        expand_grid(far)


# -- 7. small leaks and gaps -------------------------------------------------------------------------------


def _manifest_for_parameters(model: str) -> dict:
    from freefuse.settings import GenerationSettings

    return {
        "settings": GenerationSettings(prompt="Alice").to_dict(),
        "images": [{"prompt": "Alice", "seed": 1}],
        "model": {"id_or_path": model},
        "loras": [],
        "backend": "flux",
        "versions": {"freefuse": "x"},
    }


def test_the_png_parameters_chunk_names_no_local_file(tmp_path) -> None:
    from freefuse.outputs import a1111_parameters

    checkpoint = tmp_path / "private" / "my-finetune.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"0")
    for model in (str(checkpoint), "/home/someone/models/flux1-dev.safetensors", "models/flux1-dev.safetensors"):
        text = a1111_parameters(_manifest_for_parameters(model), 0)
        assert "/" not in text.split("Model: ")[1].split(",")[0], text
        assert Path(model).name in text
    assert "Model: black-forest-labs/FLUX.1-dev," in a1111_parameters(
        _manifest_for_parameters("black-forest-labs/FLUX.1-dev"), 0
    )


def test_a_manifests_base_model_obeys_the_same_containment_rule(tmp_path) -> None:
    from freefuse.errors import SettingsError
    from freefuse.manifest import FORMAT
    from freefuse.settings import GenerationSettings
    from freefuse.spec import replay_spec

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "inside").mkdir()
    checkpoint = work / "finetune.safetensors"
    save_file({"double_blocks.0.x": torch.zeros(1)}, str(checkpoint))
    manifest = work / "run.json"

    def write(base: str) -> None:
        record = {"id_or_path": str(checkpoint), "base_model": base}
        settings = GenerationSettings(prompt="Alice").to_dict()
        manifest.write_text(json.dumps({"format": FORMAT, "settings": settings, "loras": [], "model": record}))

    write(str(elsewhere))
    with pytest.raises(SettingsError, match="outside both"):
        replay_spec(manifest, here=work)
    assert replay_spec(manifest, here=work, base_model=str(elsewhere)).base_model == str(elsewhere)
    write(str(work / "inside"))
    assert Path(replay_spec(manifest, here=work).base_model).resolve() == (work / "inside").resolve()
    write("black-forest-labs/FLUX.1-dev")  # a Hugging Face id is not a path
    assert replay_spec(manifest, here=work).base_model == "black-forest-labs/FLUX.1-dev"


def test_untrusted_text_reaches_the_terminal_without_control_characters(assets, tmp_path) -> None:
    tensors = load_file(str(assets / "bob.safetensors"))
    path = tmp_path / "ansi.safetensors"
    hostile = "\x1b[2J\x1b]0;pwned\x07[bold]loud[/bold]\u202eevil"
    save_file(tensors, str(path), metadata={"format": "pt", "ss_output_name": hostile, "trigger_word": "ohwx\x1b[31m"})
    result = cli("inspect", str(path))
    assert result.exit_code == 0, result.output
    assert "[bold]loud[/bold]" in result.output  # shown as written, not as markup
    for control in ("\x1b", "\x07", "\u202e"):
        assert control not in result.output, repr(result.output)
    missing = tmp_path / "run\x1b[2J.json"
    result = cli("generate", "--manifest", str(missing), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "\x1b" not in result.output, repr(result.output)


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", "x" * 300, "tab\there"])
def test_an_output_name_that_is_not_a_plain_file_name_is_refused(assets, tmp_path, name) -> None:
    result = generate(assets, tmp_path / "o", "--name", name)
    assert_user_error(result, "--name")
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "escaped.json").exists()
    assert_nothing_written(tmp_path / "o")


def test_job_ids_and_mask_subject_names_are_checked(assets, tmp_path) -> None:
    jobs = tmp_path / "ids.jsonl"
    jobs.write_text(job_line(assets, id="../../etc/x\x1b") + "\n")
    assert_user_error(cli("batch", str(jobs), "--dry-run", "--out", str(tmp_path / "o")), "line 1", "`id`")
    from PIL import Image

    Image.new("L", (64, 64), 255).save(tmp_path / "m.0.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "m.1.png")
    masks = tmp_path / "m.masks.json"
    masks.write_text(json.dumps({"names": ["alice", "bo\x1bb/../x"], "files": ["m.0.png", "m.1.png"]}))
    result = generate(assets, tmp_path / "o", "--method", "masks", "--masks", str(masks))
    assert_user_error(result, "m.masks.json", "subject name")
    assert "\x1b" not in result.output


def _safetensors_with_header(path: Path, header: str, data_bytes: int) -> Path:
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_bytes))
    return path


@pytest.mark.parametrize(
    ("header", "data_bytes", "message"),
    [
        (
            '{"double_blocks.0.a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
            ' "double_blocks.0.b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
            12,
            "overlaps",
        ),
        ('{"double_blocks.0.a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', 8, "16 bytes"),
        (
            '{"double_blocks.0.a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
            ' "double_blocks.0.a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            16,
            "twice",
        ),
    ],
)
def test_corrupt_single_file_headers_say_what_is_wrong(assets, tmp_path, header, data_bytes, message) -> None:
    checkpoint = _safetensors_with_header(tmp_path / "finetune.safetensors", header, data_bytes)
    result = cli("generate", "--model", str(checkpoint), "--lora", f"{assets / 'alice.safetensors'}=Alice",
                 "--prompt", "Alice", "--out", str(tmp_path / "o"), *FAST)
    assert_user_error(result, "finetune.safetensors", message)
    assert "--base-model" not in result.output
    lora = _safetensors_with_header(tmp_path / "lora.safetensors", header.replace("double_blocks", "x"), data_bytes)
    assert_user_error(generate(assets, tmp_path / "o", loras=[f"{lora}=Alice"], prompt="Alice"), message)


@pytest.mark.parametrize("model", ["models/flux1-dev.safetensors", "./owner/name", "here/flux"])
def test_a_missing_local_path_shaped_like_a_hub_id_is_not_looked_up_on_the_hub(
    assets, tmp_path, monkeypatch, model
) -> None:
    from freefuse.models import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    result = cli("generate", "--model", model, "--lora", f"{assets / 'alice.safetensors'}=Alice", "--prompt",
                 "Alice", "--out", str(tmp_path / "o"), *FAST)
    assert_user_error(result, "does not exist")
    assert "Hugging Face" not in result.output and "cache" not in result.output
    assert is_hub_id("black-forest-labs/FLUX.1-dev")
