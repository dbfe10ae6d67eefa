"""`freefuse eval pairs`: Table 2's arithmetic, the judge's reader, the prompts, the metric adapters,
and the `--quick` run end to end (identical seeds, resume, failures, replays)."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from freefuse.cli import app
from freefuse.evaluation import metrics as metrics_module
from freefuse.evaluation.crops import Halves, best_assignment, mask_boxes
from freefuse.evaluation.judge import judge_prompt, parse_verdict
from freefuse.evaluation.metrics import (
    Clip,
    DinoV3,
    DreamSim,
    HPSv3,
    ImageContext,
    LVFace,
    MetricOptions,
    MetricUnavailable,
    ScoreFailed,
    VlmJudge,
)
from freefuse.evaluation.prompts import PAPER_PROMPTS, UNREADABLE, fill, read_prompt_file
from freefuse.evaluation.summary import cell, table

RUNNER = CliRunner()


# -- Table 2's arithmetic ----------------------------------------------------------------------------------


def _record(method, pair, prompt, seed, value, error=None):
    record = {"method": method, "pair": pair, "prompt": prompt, "seed": seed, "metrics": {"m": value}, "errors": {}}
    if error:
        record["errors"]["m"] = error
    return record


def test_avg_and_n_pass_match_a_hand_computed_table() -> None:
    # Method "x", two pairs, two prompts each, three seeds; one score failed (left out, counted).
    #   pair P, prompt 1: 0.2 0.5 0.8   best 0.8
    #   pair P, prompt 2: 0.1 0.1 0.4   best 0.4
    #   pair Q, prompt 1: 0.9 failed 0.3  best 0.9
    #   pair Q, prompt 2: 0.0 0.6 0.6   best 0.6
    # Avg over the 11 scores: (1.5 + 0.6 + 1.2 + 1.2) / 11 = 4.5 / 11; 3-Pass: (0.8 + 0.4 + 0.9 + 0.6) / 4 = 0.675.
    # Pair P: Avg 2.1 / 6 = 0.35, 3-Pass 0.6; pair Q: Avg 2.4 / 5 = 0.48, 3-Pass 0.75.
    values = {
        ("P", 1): [0.2, 0.5, 0.8],
        ("P", 2): [0.1, 0.1, 0.4],
        ("Q", 1): [0.9, None, 0.3],
        ("Q", 2): [0.0, 0.6, 0.6],
    }
    records = [
        _record("x", pair, prompt, seed, value, None if value is not None else "RuntimeError: boom")
        for (pair, prompt), seeds in values.items()
        for seed, value in zip((42, 43, 44), seeds, strict=True)
    ]
    records.append(_record("y", "P", 1, 42, 1.0))  # another method's row does not leak in
    result = table(records, ["m"], ["x", "y"])["m"]
    overall, pairs = result["x"]["overall"], result["x"]["pairs"]
    assert overall["avg"] == pytest.approx(4.5 / 11)
    assert overall["best"] == pytest.approx(0.675)
    assert (overall["images"], overall["failed"], overall["groups"]) == (11, 1, 4)
    assert pairs["P"]["avg"] == pytest.approx(0.35) and pairs["P"]["best"] == pytest.approx(0.6)
    assert pairs["Q"]["avg"] == pytest.approx(0.48) and pairs["Q"]["best"] == pytest.approx(0.75)
    assert result["y"]["overall"]["avg"] == 1.0 and list(result["y"]["pairs"]) == ["P"]


def test_a_prompt_with_every_seed_failed_is_left_out_of_the_n_pass_mean() -> None:
    records = [_record("x", "P", 1, 42, 0.4), _record("x", "P", 2, 42, None, "ValueError: no face")]
    result = cell(records, "m")
    assert (result.avg, result.best, result.groups, result.failed) == (0.4, 0.4, 1, 1)
    assert cell([], "m").avg is None


# -- the judge's answers -------------------------------------------------------------------------------------

REAL_LOOKING = """Character Analysis: Both characters are present. The man on the left matches the first
reference (beard, round glasses); the woman's hairstyle differs slightly from her reference.

Character Score: 41

Prompt Analysis: They are roasting marshmallows by a fire and laughing, as asked.

Prompt Score: 22

Clarity Analysis: Sharp, with a small artifact on the left hand.

Clarity Score: 20

Total Score: 83

Reasoning: Good likeness and prompt following; minor hand artifact."""

MARKDOWN = """**Character Analysis:** fine.
**Character Score:** 45/50
**Prompt Analysis:** fine.
**Prompt Score:** 20 / 25
- **Clarity Score:** [18]
### Total Score: 83 points"""


@pytest.mark.parametrize(
    ("answer", "parts"),
    [
        (REAL_LOOKING, {"character": 41, "prompt": 22, "clarity": 20}),
        (MARKDOWN, {"character": 45, "prompt": 20, "clarity": 18}),
        ("Character Score: 12.5\nPrompt Score: 10 out of 25\nClarity Score: 25", {"character": 12.5, "prompt": 10, "clarity": 25}),
    ],
)
def test_the_judge_reader_takes_real_looking_answers(answer: str, parts: dict) -> None:
    verdict = parse_verdict(answer)
    assert verdict.error is None and verdict.parts == parts
    assert verdict.total == sum(parts.values())


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty answer"),
        ("I would rate this image 83/100 overall.", "no Character Score"),
        ("Character Score: [0-50]\nPrompt Score: 20\nClarity Score: 20", "not a number"),
        ("Character Score: about 40\nPrompt Score: 20\nClarity Score: 20", "not a number"),
        ("Character Score: 40\nPrompt Score: 20", "no Clarity Score"),
        ("Character Score: 40\nCharacter Score: 45\nPrompt Score: 20\nClarity Score: 20", "different values"),
        ("Character Score: 40\nPrompt Score: 20\nClarity Score: 20\nTotal Score: 90", "not the sum"),
        ("Character Score: 8/10\nPrompt Score: 20\nClarity Score: 20", "out of 10, not out of 50"),
    ],
)
def test_the_judge_reader_records_malformed_answers_instead_of_guessing(answer: str, reason: str) -> None:
    verdict = parse_verdict(answer)
    assert verdict.parts is None and verdict.total is None
    assert reason in verdict.error


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("Character Score: 55\nPrompt Score: 20\nClarity Score: 20", "Character Score 55 is outside 0-50"),
        ("Character Score: 40\nPrompt Score: 26\nClarity Score: 20", "Prompt Score 26 is outside 0-25"),
        ("Character Score: 40\nPrompt Score: 20\nClarity Score: -3", "Clarity Score -3 is outside 0-25"),
        ("Character Score: 40\nPrompt Score: 20\nClarity Score: 20\nTotal Score: 180", "Total Score 180 is outside 0-100"),
    ],
)
def test_the_judge_reader_refuses_out_of_range_numbers(answer: str, reason: str) -> None:
    verdict = parse_verdict(answer)
    assert verdict.parts is None and reason in verdict.error


def test_the_judge_prompt_is_appendix_c_with_its_placeholders_filled() -> None:
    text = judge_prompt("harry_potter", "daiyu_lin", "harry_potter hugging daiyu_lin", 2)
    assert text.startswith("You are an image quality evaluator specializing in character generation")
    assert "The first 2 images show reference characters harry_potter and daiyu_lin that should appear" in text
    assert 'Generation prompt: "harry_potter hugging daiyu_lin"' in text
    assert "1. Character presence and clarity (50 points)" in text and "Clarity Score: [0-25]\n\nTotal Score: [0-100]" in text
    assert "{" not in text and "<B>" not in text


# -- the prompts ------------------------------------------------------------------------------------------------

# The paper's own filled-in captions (Fig. 2, Appendix D), word for word.
CAPTIONS = {
    19: ("daiyu_lin", "haoran_liu", "daiyu_lin and haoran_liu paddling, both faces determined, close-up of their focused expressions."),
    40: ("daiyu_lin", "rihanna", "daiyu_lin and rihanna sharing a secret glance, their eyes meeting in the crowded room."),
    11: ("daiyu_lin", "sherlock", "daiyu_lin catching sherlock, both looking at each other's faces, smiling in relief on the ice."),
    24: ("haoran_liu", "sherlock", "haoran_liu holding up an artifact for sherlock, their faces close as they study it curiously."),
    48: ("harry-potter", "daiyu-lin", "harry-potter tucking a flower in daiyu-lin's hair, both smiling warmly face-to-face."),
    32: ("harry_potter", "rihanna", "harry_potter and rihanna talking seriously on the swings, close-up on their thoughtful expressions."),
}


def test_the_paper_prompts_are_48_of_50_with_their_provenance() -> None:
    assert len(PAPER_PROMPTS) == 48
    numbers = [p.number for p in PAPER_PROMPTS if p.number is not None]
    assert len(numbers) == len(set(numbers)) == 47
    assert set(range(1, 51)) - set(numbers) == set(UNREADABLE)
    for prompt in PAPER_PROMPTS:
        assert prompt.text.count("<A>") >= 1 and prompt.text.count("<B>") >= 1, prompt
        assert prompt.extracted and prompt.source in ("restored", "reconstructed", "appendix-d")
    [potion] = [p for p in PAPER_PROMPTS if p.source == "appendix-d"]
    assert potion.number is None and "bubbling potion" in potion.text
    by_number = {p.number: p for p in PAPER_PROMPTS}
    for number, (a, b, caption) in CAPTIONS.items():
        assert fill(by_number[number].text, a, b) == caption


def test_a_prompt_file_needs_both_subjects_on_every_line(tmp_path: Path) -> None:
    good = tmp_path / "prompts.txt"
    good.write_text("# mine\n<A> and <B> playing chess\n\n{A} hugging {B}\n")
    assert [p.text for p in read_prompt_file(good)] == ["<A> and <B> playing chess", "<A> hugging <B>"]
    bad = tmp_path / "bad.txt"
    bad.write_text("<A> and <B> at the beach\n<A> alone\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: .* has no <B>"):
        read_prompt_file(bad)


# -- crops ----------------------------------------------------------------------------------------------------------


def test_mask_boxes_take_the_largest_region_and_best_assignment_the_best_total() -> None:
    masks = torch.zeros(2, 8, 8)
    masks[0, 1:4, 1:3] = 1
    masks[0, 7, 7] = 1  # a stray superpixel far away does not widen the box
    assert mask_boxes(masks, (16, 16)) == [(2, 2, 6, 8), None]
    assert Halves().detect(Image.new("RGB", (10, 4)), 2) == [(0, 0, 5, 4), (5, 0, 10, 4)]
    chosen, scores = best_assignment([[0.9, 0.8], [0.85, 0.1]])
    assert chosen == [1, 0] and scores == [0.8, 0.85]  # 1.65 beats the greedy 0.9 + 0.1


def test_owlv2_detector_returns_separate_boxes_inside_the_image() -> None:
    """OWLv2 at toy width in memory (random weights, the tiny CLIP tokenizer): the real detection path."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    from freefuse.evaluation.crops import Owlv2, _iou
    from freefuse.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    detector = Owlv2(threshold=0.0)
    detector.model = Owlv2ForObjectDetection(config).eval()
    detector.processor = Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 64, "width": 64}), tokenizer)
    image = _picture(5, (64, 48))
    boxes = detector.detect(image, 2)
    assert 1 <= len(boxes) <= 2 and boxes == sorted(boxes)  # random boxes overlap: fewer is allowed, not more
    assert all(_iou(a, b) < 0.5 for a in boxes for b in boxes if a != b)
    assert all(0 <= left < right <= 64 and 0 <= top < bottom <= 48 for left, top, right, bottom in boxes)
    assert "owlv2" in detector.describe()


# -- metric adapters -------------------------------------------------------------------------------------------


def _picture(value: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(value)
    return Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", [DinoV3, Clip])
def test_toy_backbones_score_an_image_against_itself_highest(kind) -> None:
    metric = kind(MetricOptions(toy=True))
    metric.load()
    assert not metric.model.training
    same, other = metric.similarities([_picture(1), _picture(2)], [_picture(1)], "refs")
    assert same == pytest.approx(1.0, abs=1e-5) and other < same
    assert "tiny random backbone" in metric.describe()["weights"]


def _fake_library(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_dreamsim_adapter_embeds_preprocessed_crops_and_gives_one_minus_distance(monkeypatch) -> None:
    calls = []

    class Model:
        def embed(self, pixels):
            calls.append(tuple(pixels.shape))
            return torch.stack([pixels.mean(), torch.tensor(1.0)])[None]

    def preprocess(image):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        return torch.from_numpy(np.asarray(image.resize((224, 224)), dtype=np.float32) / 255).permute(2, 0, 1)[None]

    def dreamsim(pretrained, device, dreamsim_type):
        calls.append(("load", pretrained, device, dreamsim_type))
        return Model(), preprocess

    _fake_library(monkeypatch, "dreamsim", dreamsim=dreamsim)
    metric = DreamSim(MetricOptions(device="cpu"))
    crop, reference = _picture(1), _picture(2)
    [value] = metric.similarities([crop], [reference], "a")
    assert calls[0] == ("load", True, "cpu", "ensemble") and calls[1:] == [(1, 3, 224, 224)] * 2
    a, b = (torch.tensor([preprocess(p).mean(), 1.0]) for p in (reference, crop))
    assert value == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), abs=1e-6)


def test_lvface_adapter_compares_rgb_arrays_and_averages_over_references(monkeypatch) -> None:
    seen = []

    class Recognizer:
        def __init__(self, name):
            seen.append(name)

        def compare(self, face, reference):
            seen.append((face.dtype, face.shape, reference.shape))
            return types.SimpleNamespace(cosine=0.5 if reference.shape[0] == 48 else 0.7)

    _fake_library(monkeypatch, "lvface", FaceRecognizer=Recognizer)
    metric = LVFace()
    [value] = metric.similarities([_picture(1, (30, 20))], [_picture(2), _picture(3, (10, 10))], "a")
    assert value == pytest.approx(0.6)
    assert seen == ["LVFace-T_Glint360K", (np.uint8, (20, 30, 3), (48, 40, 3)), (np.uint8, (20, 30, 3), (10, 10, 3))]


def test_hpsv3_adapter_scores_the_image_file_with_its_prompt(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    class Inferencer:
        def __init__(self, device):
            seen["device"] = device

        def reward(self, prompts, image_paths):
            seen.update(prompts=prompts, image_paths=image_paths)
            return [torch.tensor([9.75, 0.4])]

    _fake_library(monkeypatch, "hpsv3", HPSv3RewardInferencer=Inferencer)
    path = tmp_path / "image.png"
    _picture(1).save(path)
    context = ImageContext(Image.open(path), path, "alice hugging bob", ("alice", "bob"), [[], []])
    value, _ = HPSv3(MetricOptions(device="cpu")).score(context)
    assert value == 9.75 and seen == {"device": "cpu", "prompts": ["alice hugging bob"], "image_paths": [str(path)]}


class _Inputs(dict):
    def to(self, device):
        self["device"] = device
        return self


def _judge(answer: str):
    seen = {}
    metric = VlmJudge(MetricOptions(device="cpu", judge_references=1))

    def apply_chat_template(messages, **options):
        seen.update(messages=messages, options=options)
        return _Inputs(input_ids=torch.zeros(1, 5, dtype=torch.long))

    def generate(**inputs):
        seen["generate"] = {k: v for k, v in inputs.items() if k != "input_ids"}
        return torch.zeros(1, 8, dtype=torch.long)

    def batch_decode(tokens, skip_special_tokens):
        seen["decoded"] = tuple(tokens.shape)
        return [answer]

    metric.processor = types.SimpleNamespace(apply_chat_template=apply_chat_template, batch_decode=batch_decode)
    metric.model = types.SimpleNamespace(generate=generate)
    metric.loaded = True
    return metric, seen


def test_vlm_judge_shows_the_references_then_the_image_with_appendix_c(tmp_path: Path) -> None:
    metric, seen = _judge(REAL_LOOKING)
    image, refs_a, refs_b = _picture(1), [_picture(2), _picture(3)], [_picture(4)]
    context = ImageContext(image, tmp_path / "x.png", "alice hugging bob", ("alice", "bob"), [refs_a, refs_b])
    value, details = metric.score(context)
    assert value == 83 and details["character"] == 41 and details["answer"] == REAL_LOOKING
    [message] = seen["messages"]
    images = [part["image"] for part in message["content"] if part["type"] == "image"]
    assert len(images) == 3 and np.array_equal(np.asarray(images[0]), np.asarray(refs_a[0]))
    assert np.array_equal(np.asarray(images[1]), np.asarray(refs_b[0])) and np.array_equal(np.asarray(images[2]), np.asarray(image))
    text = message["content"][-1]["text"]
    assert "The first 2 images show reference characters alice and bob" in text and '"alice hugging bob"' in text
    assert seen["generate"]["do_sample"] is False and seen["decoded"] == (1, 3)  # only the new tokens are read
    metric, _ = _judge("Looks great, 9/10!")
    with pytest.raises(ScoreFailed, match="unparseable judge answer: no Character Score") as failure:
        metric.score(context)
    assert failure.value.details["answer"] == "Looks great, 9/10!"


def test_a_missing_library_or_weights_is_a_clear_message(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hpsv3" else real_find_spec(name, *a))
    with pytest.raises(MetricUnavailable, match=r"metric hpsv3 \(HPSv3\) needs hpsv3, which is not installed: pip install 'freefuse\[eval\]'"):
        HPSv3().check()
    with pytest.raises(MetricUnavailable, match="has no tiny in-memory model"):
        VlmJudge(MetricOptions(toy=True)).check()
    offline = DinoV3(MetricOptions(models={"dinov3": "freefuse-tests/no-such-dinov3"}))
    with pytest.raises(MetricUnavailable, match=r"its weights freefuse-tests/no-such-dinov3 could not be loaded"):
        offline.load()
    assert set(metrics_module.PAPER_METRICS) <= set(metrics_module.METRICS)


# -- the --quick run, end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    """`freefuse eval pairs --quick`, run once through the command line."""
    out = tmp_path_factory.mktemp("eval-quick") / "run"
    result = RUNNER.invoke(app, ["eval", "pairs", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _scores(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_quick_run_writes_the_report_with_table_grid_scores_and_manifests(quick: Path) -> None:
    report = (quick / "report.md").read_text()
    assert "| method | DINOv3 Avg | DINOv3 2-Pass | CLIP-I Avg | CLIP-I 2-Pass |" in report
    for row in ("| diffusers |", "| merge |", "| freefuse |", "| masks |"):
        assert row in report
    assert "48 of the paper's 50 prompts" in report and "serve as references" in report
    assert ("Charts skipped: matplotlib is not installed" in report) != (quick / "charts" / "dinov3.png").is_file()
    assert "<table>" in (quick / "report.html").read_text()
    assert Image.open(quick / "grids" / "alice+bob.png").width == 5 * 192  # four methods and FreeFuse's masks
    records = _scores(quick)
    assert len(records) == 1 * 2 * 2 * 4 + 2 * 2  # pair x prompts x seeds x methods, and the single-LoRA images
    for record in records:
        assert (quick / record["manifest"]).is_file() and set(record["metrics"]) == {"dinov3", "clip"}
        assert not record["errors"]
    pair_rows = [r for r in records if r["method"] != "single"]
    assert all(isinstance(r["metrics"]["dinov3"], float) for r in pair_rows)
    assert {r["crops"] for r in pair_rows} == {"FreeFuse masks of this seed"}
    alice = [r for r in records if r["method"] == "single" and r["pair"] == "alice"]
    assert all(r["metrics"]["dinov3"] is None and "references" in r["not_applicable"]["dinov3"] for r in alice)


@pytest.mark.slow
def test_every_method_runs_on_the_same_seeds_and_prompts(quick: Path) -> None:
    records = [r for r in _scores(quick) if r["method"] != "single"]
    samples: dict[tuple, set] = {}
    for record in records:
        manifest = json.loads((quick / record["manifest"]).read_text())
        [image] = manifest["images"]
        assert (image["seed"], image["prompt"]) == (record["seed"], record["prompt"])
        samples.setdefault((record["prompt_index"], record["seed"]), set()).add(record["method"])
    assert sorted(samples) == [(0, 42), (0, 43), (1, 42), (1, 43)]
    assert all(methods == {"diffusers", "merge", "freefuse", "masks"} for methods in samples.values())
    # The plain diffusers run and FreeFuse's merge start from the same noise: on FLUX they are the same image.
    by_key = {(r["method"], r["prompt_index"], r["seed"]): r for r in records}
    for prompt_index, seed in samples:
        plain, merge = by_key[("diffusers", prompt_index, seed)], by_key[("merge", prompt_index, seed)]
        assert np.array_equal(_pixels(quick / plain["image"]), _pixels(quick / merge["image"]))


@pytest.mark.slow
def test_any_row_replays_to_the_same_image(quick: Path, tmp_path: Path, monkeypatch) -> None:
    from freefuse.runner import RunService
    from freefuse.spec import replay_spec

    monkeypatch.chdir(quick)  # manifests are untrusted: the files they name must be under here (or given again)
    records = {r["method"]: r for r in _scores(quick) if r["seed"] == 43 and r["prompt_index"] == 1}
    result = RUNNER.invoke(app, ["eval", "replay", str(quick / records["diffusers"]["manifest"]), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    [replayed] = tmp_path.glob("*.png")
    assert np.array_equal(_pixels(replayed), _pixels(quick / records["diffusers"]["image"]))
    service = RunService(device="cpu")
    for method in ("freefuse", "masks"):
        output = service.run(replay_spec(quick / records[method]["manifest"])).output
        assert np.array_equal(np.asarray(output.images[0]), _pixels(quick / records[method]["image"]))


@pytest.mark.slow
def test_a_metric_that_fails_on_some_images_records_it_and_the_rest_go_on(quick: Path, tmp_path: Path, monkeypatch) -> None:
    from freefuse.evaluation import run as evaluation
    from freefuse.evaluation.scoring import Scorer

    out = tmp_path / "run"
    shutil.copytree(quick, out)
    for shard in out.glob("scores.cache.p*.jsonl"):
        shard.unlink()  # score everything again
    original = Scorer._subject_score

    def flaky(self, metric, item, image, boxes, named):
        if metric.name == "clip" and item.method == "merge" and item.seed == 43:
            raise RuntimeError("clip broke on this image")
        return original(self, metric, item, image, boxes, named)

    monkeypatch.setattr(Scorer, "_subject_score", flaky)
    config, options = evaluation.quick_setup(out)
    evaluation.run_pairs(config, options, out)
    records = _scores(out)
    broken = [r for r in records if r["errors"]]
    assert len(broken) == 2 and {(r["method"], r["seed"]) for r in broken} == {("merge", 43)}
    assert all(r["errors"] == {"clip": "RuntimeError: clip broke on this image"} for r in broken)
    assert all(isinstance(r["metrics"]["dinov3"], float) and r["metrics"]["clip"] is None for r in broken)
    summary = json.loads((out / "summary.json").read_text())["table"]["clip"]["merge"]["overall"]
    assert (summary["images"], summary["failed"]) == (2, 2)
    assert "clip: RuntimeError: clip broke on this image" in (out / "report.md").read_text()
    monkeypatch.setattr(Scorer, "_subject_score", original)
    evaluation.run_pairs(config, options, out)  # the next run scores what failed
    assert _scores(out) == _scores(quick)


@pytest.mark.slow
def test_resuming_after_an_interruption_gives_identical_scores(quick: Path, tmp_path: Path, monkeypatch) -> None:
    from freefuse.evaluation import run as evaluation

    out = tmp_path / "run"
    calls = {"n": 0}
    original = DinoV3.similarities

    def interrupted(self, crops, references, key):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # as a kill would stop it, mid-way through the scores
        return original(self, crops, references, key)

    monkeypatch.setattr(DinoV3, "similarities", interrupted)
    config, options = evaluation.quick_setup(out)
    with pytest.raises(KeyboardInterrupt):
        evaluation.run_pairs(config, options, out)
    assert not (out / "scores.jsonl").exists()
    [shard] = out.glob("scores.cache.p*.jsonl")
    kept = shard.read_text().count("\n")
    assert 0 < kept < 16 * 2 + 2 * 2  # scores kept, and not all of them (alice's single images have none)
    with open(shard, "a") as handle:
        handle.write('{"key": "cut short by the ki')  # a line a kill left half-written
    monkeypatch.setattr(DinoV3, "similarities", original)
    config, options = evaluation.quick_setup(out)
    evaluation.run_pairs(config, options, out)
    assert _scores(out) == _scores(quick)
    assert (out / "scores.jsonl").read_bytes() == (quick / "scores.jsonl").read_bytes()


def test_a_metric_whose_library_is_missing_stops_the_run_before_any_image(assets: Path, tmp_path: Path, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dreamsim" else real_find_spec(name, *a))
    loras = ["--lora", f"{assets / 'alice.safetensors'}=Alice", "--lora", f"{assets / 'bob.safetensors'}=Bob"]
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["eval", "pairs", "--model", str(assets / "model"), *loras, "--metric", "dreamsim", "--out", str(out)])
    assert result.exit_code == 2
    assert "needs dreamsim, which is not installed: pip install 'freefuse[eval]'" in result.output
    assert not (out / "images").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_to_identical_scores(quick: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of the scores (a real kill, no clean-up), then the same command again."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "freefuse", "eval", "pairs", "--quick", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = out / "scores.cache.p0.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if shard.is_file() and shard.read_text().count("\n") >= 4:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert shard.is_file() and not (out / "scores.jsonl").exists(), "the kill came after the run had finished"
    result = RUNNER.invoke(app, ["eval", "pairs", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "scores.jsonl").read_bytes() == (quick / "scores.jsonl").read_bytes()
