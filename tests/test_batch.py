"""Batch runs: job files, grids, resume after SIGKILL, corrupt results, many processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from freefuse.batch import JobFileError, expand_grid, load_jobs, read_index, run_batch
from freefuse.cli import app
from freefuse.files import sha256_file
from freefuse.runner import RunService
from freefuse.testing import free_port

RUNNER = CliRunner()
SETTINGS = {"steps": 3, "size": "64x64", "max_sequence_length": 32}


def write_jobs(root: Path, count: int = 6, name: str = "jobs.jsonl") -> Path:
    lines = []
    for seed in range(count // 2):
        for prompt in ("{A} hugging {B}", "{B} and {A} dancing"):
            lines.append(
                json.dumps(
                    {
                        "model": "model",
                        "prompt": prompt,
                        "seed": seed,
                        **SETTINGS,
                        "loras": [
                            {"path": "alice.safetensors"},
                            {"path": "bob.safetensors", "words": ["Bob"], "weight": 0.8},
                        ],
                    }
                )
            )
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png")) if ".masks" not in p.name}


def test_job_files_in_jsonl_and_yaml_with_placeholders_and_relative_paths(assets: Path) -> None:
    jobs = load_jobs(write_jobs(assets))
    assert len(jobs) == 6
    assert jobs[0].settings.prompt == "Alice hugging Bob"  # {A} from alice's metadata, {B} from the job
    assert jobs[1].settings.prompt == "Bob and Alice dancing"
    assert jobs[0].settings.num_inference_steps == 3 and (
        jobs[0].settings.width,
        jobs[0].settings.height,
    ) == (64, 64)
    assert Path(jobs[0].loras[0].path).is_absolute() and Path(jobs[0].model) == assets / "model"
    assert len({job.id for job in jobs}) == 6
    yaml_path = assets / "jobs.yaml"
    yaml_path.write_text(
        "jobs:\n"
        "  - model: model\n    prompt: '{A} with {B}'\n    seed: 4\n    steps: 2\n    size: 64x64\n"
        "    loras: [{path: alice.safetensors}, {path: bob.safetensors, words: Bob}]\n"
    )
    [job] = load_jobs(yaml_path)
    assert job.settings.prompt == "Alice with Bob" and job.settings.seed == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"}', "needs `model` and `prompt`"),
        (
            '{"model": "m", "prompt": "{A} and {B}", "loras": [{"path": "bob.safetensors", "words": ["Bob"]}]}',
            r"uses \['B'\]",
        ),
        ('{"model": "model", "prompt": "Bob", "size": "65x64", "loras": []}', "not a multiple"),
        ('{"model": "m", "prompt": "Bob", "colour": "red", "loras": []}', "Unknown setting `colour`"),
        ("not json", "not a JSON object"),
    ],
)
def test_bad_job_lines_name_the_line(assets: Path, line: str, message: str) -> None:
    path = assets / "bad.jsonl"
    path.write_text('{"model": "model", "prompt": "fine", "loras": []}\n' + line + "\n")
    with pytest.raises(JobFileError, match=message) as raised:
        load_jobs(path)
    assert "2" in str(raised.value)


def test_grid_expands_groups_prompts_seeds_and_methods(assets: Path) -> None:
    grid = assets / "grid.yaml"
    grid.write_text(
        "model: model\n"
        "loras:\n  - {path: alice.safetensors, words: [Alice], name: alice}\n"
        "  - {path: bob.safetensors, words: [Bob], name: bob}\n  - {path: carol.safetensors, words: [Carol], name: carol}\n"
        "group_size: [2, 3]\n"
        "prompts: ['{A} hugging {B}', '{A} and {B} dancing', '{A}, {B} and {C} at the beach']\n"
        "seeds: {start: 10, count: 2}\nmethods: [freefuse, merge]\nsettings: {steps: 3, size: 64x64}\n"
    )
    jobs = expand_grid(grid)
    # pairs: 3 groups x 2 prompts x 2 seeds x 2 methods; triples: 1 x 1 x 2 x 2
    assert len(jobs) == 3 * 2 * 2 * 2 + 1 * 1 * 2 * 2
    assert len({job.id for job in jobs}) == len(jobs)
    assert {job.settings.method for job in jobs} == {"freefuse", "merge"}
    assert any(job.settings.prompt == "Bob, Carol and Alice at the beach" for job in jobs) is False
    assert any(job.settings.prompt == "Alice, Bob and Carol at the beach" for job in jobs)


def test_model_and_loras_load_once_and_rerun_skips_everything(assets: Path, tmp_path: Path) -> None:
    jobs = load_jobs(write_jobs(assets))
    service = RunService()
    report = run_batch(jobs, tmp_path, service)
    assert report.done == 6 and not report.failed
    assert service.model_loads == 1 and service.lora_loads == 2
    index = read_index(tmp_path)
    assert set(index) == {job.id for job in jobs}
    again = run_batch(jobs, tmp_path, RunService())
    assert again.done == 0 and again.skipped == 6 and again.model_loads == 0
    merged = (tmp_path / "index.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in merged] == [job.id for job in jobs]


def test_corrupt_result_and_half_written_index_line_are_redone(assets: Path, tmp_path: Path) -> None:
    jobs = load_jobs(write_jobs(assets))
    run_batch(jobs, tmp_path, RunService())
    before = images(tmp_path)
    victim = tmp_path / f"{jobs[2].stem}.png"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated by a failing disk, say
    with open(tmp_path / "index.p0.jsonl", "a") as handle:
        handle.write('{"id": "half-writ')  # a crash in the middle of an index append
    report = run_batch(jobs, tmp_path, RunService())
    assert report.done == 1 and report.skipped == 5
    assert images(tmp_path) == before
    assert all(line.startswith("{") for line in (tmp_path / "index.p0.jsonl").read_text().splitlines()[:-1])


def test_a_job_with_a_mistake_is_refused_before_any_model_loads(assets: Path, tmp_path: Path) -> None:
    path = write_jobs(assets, count=2, name="mixed.jsonl")
    lines = path.read_text().splitlines()
    broken = json.loads(lines[0])
    broken["prompt"] = "a cat and {B}"
    path.write_text("\n".join([json.dumps(broken), lines[1]]) + "\n")
    result = RUNNER.invoke(app, ["batch", str(path), "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "mixed.jsonl line 1" in result.output and "'Alice' is not in the prompt" in result.output
    assert not list(tmp_path.glob("*.png"))  # nothing ran: the mistake was found first


def test_a_job_that_fails_while_running_is_recorded_and_the_others_finish(
    assets: Path, tmp_path: Path, monkeypatch
) -> None:
    import freefuse.batch as batch_module

    jobs = load_jobs(write_jobs(assets, count=2, name="runtime.jsonl"))
    original = batch_module.run_job

    def failing_first(session, job, out):
        if job is jobs[0]:
            raise RuntimeError("the device fell over")
        return original(session, job, out)

    monkeypatch.setattr(batch_module, "run_job", failing_first)
    report = run_batch(jobs, tmp_path, RunService())
    assert report.done == 1 and len(report.failed) == 1
    failures = [json.loads(line) for line in (tmp_path / "failed.p0.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and "line 1" in failures[0]["source"] and "fell over" in failures[0]["error"]
    assert len(read_index(tmp_path)) == 1
    assert not list((tmp_path / ".claims").glob("*.claim"))  # claims are released, also after a failure


def batch_command(jobs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "freefuse", "batch", str(jobs), "--out", str(out)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_every_image_once_with_the_same_bytes(
    assets: Path, tmp_path: Path
) -> None:
    jobs_file = write_jobs(assets, count=12, name="many.jsonl")
    reference = tmp_path / "reference"
    subprocess.run(batch_command(jobs_file, reference), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        batch_command(jobs_file, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shard = killed / "index.p0.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if shard.is_file() and len(shard.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    interrupted = len(read_index(killed))
    assert 3 <= interrupted < 12, "the kill should land in the middle of the batch"
    assert not (killed / "index.jsonl").exists()
    subprocess.run(batch_command(jobs_file, killed), check=True, capture_output=True, timeout=600)
    assert images(killed) == images(reference)
    assert len(images(killed)) == 12
    ids = [json.loads(line)["id"] for line in (killed / "index.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 12
    assert not list(killed.glob("*.part"))


@pytest.mark.slow
def test_accelerate_launch_two_processes_on_cpu_does_every_job_once(assets: Path, tmp_path: Path) -> None:
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher, "accelerate is a dependency and must be installed"
    jobs_file = write_jobs(assets, count=6, name="dist.jsonl")
    out = tmp_path / "dist"
    # No GPU for the workers even on a GPU machine: with one GPU, rank 1 would ask for cuda:1.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [
            launcher,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "freefuse",
            "batch",
            str(jobs_file),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(out.glob("index.p*.jsonl"))
    assert [s.name for s in shards] == ["index.p0.jsonl", "index.p1.jsonl"]
    per_shard = [len(s.read_text().splitlines()) for s in shards]
    assert per_shard == [3, 3]
    ids = [json.loads(line)["id"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(job.id for job in load_jobs(jobs_file))
    assert len(images(out)) == 6


def test_repeated_jobs_run_once_and_a_deleted_mask_png_is_redone(assets: Path, tmp_path: Path) -> None:
    import warnings

    from freefuse.batch import BatchWarning

    path = write_jobs(assets, count=2, name="repeat.jsonl")
    first = path.read_text().splitlines()[0]
    path.write_text(path.read_text() + first + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs = load_jobs(path)
    assert len(jobs) == 2
    assert any(issubclass(w.category, BatchWarning) and "repeats" in str(w.message) for w in caught)
    report = run_batch(jobs, tmp_path, RunService())
    assert report.done == 2
    mask_png = next(tmp_path.glob(f"{jobs[0].stem}.masks.0-*.png"))
    mask_png.unlink()
    again = run_batch(jobs, tmp_path, RunService())
    assert again.done == 1 and again.skipped == 1 and mask_png.is_file()


def test_job_ids_follow_file_content_not_folder(assets: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(assets, moved, ignore=shutil.ignore_patterns("out*"))
    original = [job.id for job in load_jobs(write_jobs(assets, count=2, name="ids.jsonl"))]
    assert [job.id for job in load_jobs(write_jobs(moved, count=2, name="ids.jsonl"))] == original
    (moved / "bob.safetensors").write_bytes((assets / "carol.safetensors").read_bytes())
    changed = [job.id for job in load_jobs(moved / "ids.jsonl")]
    assert set(changed).isdisjoint(original)


# -- hostile job files -----------------------------------------------------------------------------------


def test_a_fifo_as_lora_path_is_refused_not_waited_on(assets: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    jobs = tmp_path / "fifo.jsonl"
    jobs.write_text(
        json.dumps({"model": str(assets / "model"), "prompt": "{A} here", "loras": [{"path": str(fifo)}]})
    )
    started = time.perf_counter()
    result = RUNNER.invoke(app, ["batch", str(jobs), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output
    assert time.perf_counter() - started < 30


def test_huge_grids_and_alias_bombs_are_refused_quickly(assets: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"model: {assets / 'model'}\nloras: [{{path: {assets / 'alice.safetensors'}}}, {{path: {assets / 'bob.safetensors'}}}]\n"
        "prompts: ['{A} and {B}']\nseeds: {start: 0, count: 20000000}\n"
    )
    started = time.perf_counter()
    result = RUNNER.invoke(app, ["batch", str(grid), "--grid", "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "20,000,000 jobs" in result.output, result.output
    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for index in range(1, 9):
        previous = chr(ord("a") + index - 1)
        levels.append(
            f"{chr(ord('a') + index)}: &{chr(ord('a') + index)} [{', '.join(['*' + previous] * 9)}]"
        )
    bomb.write_text("\n".join(levels) + "\njobs: [{model: m, prompt: x, loras: [{path: p, words: *i}]}]\n")
    result = RUNNER.invoke(app, ["batch", str(bomb), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "expands to more than" in result.output, result.output
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"path": "alice.safetensors", "words": 5}, "`words`: Input should be a valid list"),
        ({"path": "alice.safetensors", "words": ["x" * 500]}, "at most 200 characters"),
        ({"path": "alice.safetensors", "weight": "strong"}, "`weight`"),
        ({"path": "alice.safetensors", "name": "../../etc"}, "`name`"),
        ({"path": "alice.safetensors", "colour": "red"}, "Unknown setting `colour`"),
    ],
)
def test_every_lora_field_is_type_and_size_checked(assets: Path, lora: dict, message: str) -> None:
    path = assets / "fields.jsonl"
    path.write_text(json.dumps({"model": "model", "prompt": "Alice", "loras": [lora]}) + "\n")
    with pytest.raises(JobFileError, match=message):
        load_jobs(path)


def test_repeated_jobs_are_said_as_notes_not_python_warnings(assets: Path, tmp_path: Path) -> None:
    line = json.dumps(
        {"model": "model", "prompt": "{A}", "loras": [{"path": "alice.safetensors"}], **SETTINGS}
    )
    jobs = assets / "repeats.jsonl"
    jobs.write_text(line + "\n" + line + "\n")
    result = RUNNER.invoke(app, ["batch", str(jobs), "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "note: repeats.jsonl line 2 repeats" in result.output and "BatchWarning" not in result.output


def test_two_batches_on_one_folder_claim_jobs(tmp_path: Path) -> None:
    from freefuse.batch import claim, release

    assert claim(tmp_path, "job1")
    assert not claim(tmp_path, "job1")  # this (living) process holds it
    release(tmp_path, "job1")
    assert claim(tmp_path, "job1")
    stale = tmp_path / ".claims" / "job2.claim"
    stale.write_text(json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname()}))
    assert claim(tmp_path, "job2")  # its process is gone: taken over


def test_a_job_with_images_makes_that_many_numbered_images(assets: Path, tmp_path: Path) -> None:
    """`images` is a job setting (README): a job makes N images, numbered, each with its manifest."""
    path = assets / "images.jsonl"
    job = {
        "model": "model",
        "prompt": "{A} hugging {B}",
        "seed": 7,
        "images": 2,
        **SETTINGS,
        "loras": [{"path": "alice.safetensors"}, {"path": "bob.safetensors", "words": ["Bob"]}],
    }
    path.write_text(json.dumps(job) + "\n")
    [loaded] = load_jobs(path)
    assert loaded.settings.num_images_per_prompt == 2
    report = run_batch([loaded], tmp_path, RunService())
    assert report.done == 1 and report.images == 2 and not report.failed
    made = images(tmp_path)
    assert sorted(made) == [f"{loaded.stem}-0.png", f"{loaded.stem}-1.png"] and len(set(made.values())) == 2
    seeds = [json.loads((tmp_path / f"{loaded.stem}-{i}.json").read_text())["images"][0]["seed"] for i in (0, 1)]
    assert seeds == [7, 8]
    [entry] = read_index(tmp_path).values()
    assert entry["images"] == sorted(made)
    (tmp_path / f"{loaded.stem}-1.png").unlink()  # the job is not done while one of its images is missing
    again = run_batch([loaded], tmp_path, RunService())
    assert again.done == 1 and (tmp_path / f"{loaded.stem}-1.png").is_file()


# -- round three: batches on one folder ---------------------------------------------------------------


def _fake_run_job(made: list[str]):
    """A stand-in for `run_job` that writes one small file per job and records which jobs it made."""

    def run_job(service, job, out):
        made.append(job.id)
        image = out / f"{job.stem}.png"
        image.write_bytes(job.id.encode())
        manifest = out / f"{job.stem}.json"
        manifest.write_text("{}")
        return {
            "id": job.id,
            "stem": job.stem,
            "source": job.source,
            "image": image.name,
            "manifest": manifest.name,
            "images": [image.name],
            "files": {image.name: sha256_file(image), manifest.name: sha256_file(manifest)},
        }

    return run_job


def test_a_job_another_batch_finished_meanwhile_is_not_made_again(assets: Path, tmp_path: Path, monkeypatch) -> None:
    """The index is read again after each claim: a job another batch on the same folder finished
    after this one started is skipped, not made a second time."""
    import freefuse.batch as batch_module

    jobs = load_jobs(write_jobs(assets, count=4, name="meanwhile.jsonl"))
    made: list[str] = []
    fake = _fake_run_job(made)

    def run_job(service, job, out):
        entry = fake(service, job, out)
        if job is jobs[0]:  # meanwhile, another batch on this folder finishes job 1 and job 3
            for other in (jobs[1], jobs[3]):
                batch_module.append_index(out / "index.p7.jsonl", fake(service, other, out))
        return entry

    monkeypatch.setattr(batch_module, "run_job", run_job)
    report = run_batch(jobs, tmp_path, RunService())
    assert sorted(made) == sorted(job.id for job in jobs)  # each job once, here or "there"
    assert len(made) == len(set(made))
    assert report.done == 2 and report.skipped == 2


@pytest.mark.slow
def test_two_batch_processes_on_one_folder_make_each_job_exactly_once(assets: Path, tmp_path: Path) -> None:
    jobs_file = write_jobs(assets, count=8, name="shared.jsonl")
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(batch_command(jobs_file, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr.decode()[-3000:]
    lines = [json.loads(line) for line in (out / "index.p0.jsonl").read_text().splitlines() if line.strip()]
    made = [entry["id"] for entry in lines]
    assert sorted(made) == sorted(job.id for job in load_jobs(jobs_file)), "every job made exactly once"
    assert len(images(out)) == 8


def test_a_claim_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path: Path) -> None:
    import socket

    from freefuse.batch import claim

    folder = tmp_path / ".claims"
    folder.mkdir()
    # pid 1 (init) and our parent are alive, but neither is the batch that wrote these claims.
    for number, pid in enumerate((1, os.getppid())):
        (folder / f"reused{number}.claim").write_text(
            json.dumps({"pid": pid, "host": socket.gethostname(), "start": "12345", "token": "an old batch"})
        )
        assert claim(tmp_path, f"reused{number}")
    assert not claim(tmp_path, "reused0")  # now it is ours, and we are alive


@pytest.mark.parametrize("planted", [".claims", "claim", "index.p0.jsonl", "failed.p0.jsonl"])
def test_links_planted_in_the_output_folder_are_never_written_through(
    assets: Path, tmp_path: Path, monkeypatch, planted: str
) -> None:
    import freefuse.batch as batch_module
    from freefuse.errors import OutputFolderError

    [job] = load_jobs(write_jobs(assets, count=2, name="planted.jsonl"))[:1]
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if planted == ".claims":
        (out / ".claims").symlink_to(elsewhere)
    elif planted == "claim":
        (out / ".claims").mkdir()
        (out / ".claims" / f"{job.id}.claim").symlink_to(victim)
    else:
        (out / planted).symlink_to(victim)
    made: list[str] = []
    fake = _fake_run_job(made)

    def run_job(service, job, out):
        if planted.startswith("failed"):
            raise RuntimeError("the device fell over")
        return fake(service, job, out)

    monkeypatch.setattr(batch_module, "run_job", run_job)
    with pytest.raises(OutputFolderError, match="symbolic link"):
        run_batch([job], out, RunService())
    assert victim.read_text() == "precious\n"
    assert not list(elsewhere.iterdir())
    assert not made  # refused before any job ran


def test_an_output_file_planted_as_a_link_is_replaced_not_written_through(assets: Path, tmp_path: Path) -> None:
    [job] = load_jobs(write_jobs(assets, count=2, name="planted-out.jsonl"))[:1]
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (out / f"{job.stem}.png").symlink_to(victim)
    report = run_batch([job], out, RunService())
    assert report.done == 1
    assert victim.read_bytes() == b"precious"
    assert not (out / f"{job.stem}.png").is_symlink()
