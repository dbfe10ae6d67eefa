"""The metrics of the paper's Table 2, as small plug-ins, each through the library its authors publish.

| name | what | library (`pip install 'freefuse[eval]'`) | weights, fetched on first use by |
|---|---|---|---|
| `dinov3` | subject crops vs. the LoRA's training images, DINOv3 CLS cosine | transformers | transformers (`from_pretrained`) |
| `dreamsim` | the same with DreamSim: 1 - distance | dreamsim | dreamsim's own loader |
| `lvface` | face similarity, LVFace cosine | lvface | lvface's own loader |
| `hpsv3` | human preference of the whole image for its prompt | hpsv3 | hpsv3's own loader |
| `vlm` | the Appendix C judge (character 50 + prompt 25 + clarity 25) | transformers | transformers |
| `clip` | CLIP image embedding cosine (not in the paper; a second backbone) | transformers | transformers |

Nothing is imported or loaded until a metric is asked for: `check()` says, before any image is
made, whether its library is installed, and `load()` raises `MetricUnavailable` with the install
command or the weights it could not get. `dinov3` and `clip` also build tiny random backbones in
memory (`MetricOptions(toy=True)`: the `--quick` path and the tests); for the others no model can
be built without downloading, and their adapters are tested with stand-ins of their libraries.

A subject metric scores one crop against one subject's reference images (the mean over the
references); an image metric scores a whole image (with its prompt, and the references for the
judge). A metric that fails on one image raises; the scorer records the failure and goes on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ..errors import SettingsError
from .judge import judge_prompt, parse_verdict

INSTALL = "pip install 'freefuse[eval]'"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class MetricUnavailable(SettingsError):
    """A metric that cannot run here: its library is not installed, or its weights cannot be had."""


class ScoreFailed(RuntimeError):
    """A metric ran on an image and gave no score (an unparseable judge answer); `details` are kept."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


@dataclass
class MetricOptions:
    """How metrics load: device, dtype ("bfloat16", "float16", "float32"; None: float32 on a CPU,
    bfloat16 for the judge on a GPU), tiny random backbones (`toy`), model ids by metric name."""

    device: str | None = None  # None: the CPU here; the evaluation sets each process's device
    dtype: str | None = None
    toy: bool = False
    models: dict[str, str] = field(default_factory=dict)
    judge_references: int = 1
    judge_max_new_tokens: int = 768


@dataclass
class ImageContext:
    """What an image metric sees: the picture, its file, its prompt, the two subjects' words and
    reference images (one list per subject, in prompt order: `<A>` first)."""

    image: Image.Image
    path: Path
    prompt: str
    words: tuple[str, ...]
    references: list[list[Image.Image]]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _torch_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else getattr(torch, name)


class Metric(ABC):
    """One metric. Subclasses set the class attributes and `_load`, and score (see the two kinds)."""

    name: ClassVar[str]
    title: ClassVar[str]
    kind: ClassVar[str]  # "subject" or "image"
    #: (import name, distribution name) of every library it needs.
    packages: ClassVar[tuple[tuple[str, str], ...]] = ()
    default_model: ClassVar[str | None] = None
    has_toy: ClassVar[bool] = False
    measures: ClassVar[str] = ""
    weakness: ClassVar[str] = ""

    def __init__(self, options: MetricOptions | None = None) -> None:
        self.options = options or MetricOptions()
        self.loaded = False

    @property
    def device(self) -> str:
        return self.options.device or "cpu"

    @property
    def model_id(self) -> str | None:
        if self.options.toy and self.has_toy:
            return None
        return self.options.models.get(self.name, self.default_model)

    def check(self) -> None:
        """Raise `MetricUnavailable` when a library it needs is not installed (nothing is imported)."""
        missing = [dist for module, dist in self.packages if importlib.util.find_spec(module) is None]
        if missing:
            raise MetricUnavailable(
                f"metric {self.name} ({self.title}) needs {', '.join(missing)}, which is not installed: {INSTALL}."
            )
        if self.options.toy and not self.has_toy:
            raise MetricUnavailable(
                f"metric {self.name} ({self.title}) has no tiny in-memory model; it needs its real weights "
                f"({self.default_model or 'its library default'}), which --quick does not fetch."
            )

    def load(self) -> None:
        """Import the library and load the weights (once); a missing library or weights is `MetricUnavailable`."""
        if self.loaded:
            return
        self.check()
        try:
            self._load()
        except (OSError, ImportError) as error:
            raise MetricUnavailable(
                f"metric {self.name} ({self.title}): its weights {self.model_id or ''} could not be loaded ({error}). "
                "They are fetched on first use by the library's own loader, which needs the network once (or a "
                "copy in its cache); with HF_HUB_OFFLINE=1 only cached weights load."
            ) from None
        self.loaded = True

    @abstractmethod
    def _load(self) -> None: ...

    def describe(self) -> dict:
        """What the report names: the library and its version, and the weights."""
        libraries = ", ".join(f"{dist} {_version(dist)}" for _, dist in self.packages)
        return {
            "metric": self.name,
            "title": self.title,
            "kind": self.kind,
            "library": libraries,
            "weights": "tiny random backbone built in memory (not a measurement)" if self.model_id is None else self.model_id,
        }

    def fingerprint(self) -> dict:
        """What decides its scores (kept with every cached score: a change recomputes)."""
        return {**self.describe(), "judge_references": self.options.judge_references if self.kind == "image" else None}


# -- subject metrics ----------------------------------------------------------------------------------


class SubjectMetric(Metric):
    """Scores crops of one subject against that subject's reference images."""

    kind = "subject"

    @abstractmethod
    def similarities(self, crops: list[Image.Image], references: list[Image.Image], key: str) -> list[float]:
        """Per crop, the mean similarity to `references` (`key` names them, for caching)."""


def to_pixels(
    images: list[Image.Image], size: int, mean: tuple, std: tuple, center_crop: bool
) -> torch.Tensor:
    """`[n, 3, size, size]` normalised pixels: bicubic resize (the shorter side, then a centre crop,
    with `center_crop`; else straight to size × size)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if center_crop:
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BICUBIC)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class FeatureMetric(SubjectMetric):
    """Cosine similarity of image embeddings; reference embeddings are computed once per subject."""

    def __init__(self, options: MetricOptions | None = None) -> None:
        super().__init__(options)
        self._references: dict[str, torch.Tensor] = {}

    @abstractmethod
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """`[n, d]` embeddings, one per image."""

    def similarities(self, crops: list[Image.Image], references: list[Image.Image], key: str) -> list[float]:
        self.load()
        if key not in self._references:
            self._references[key] = torch.nn.functional.normalize(self.embed(references).float(), dim=-1)
        crops_embedded = torch.nn.functional.normalize(self.embed(crops).float(), dim=-1)
        return (crops_embedded @ self._references[key].T).mean(dim=1).tolist()


def toy_dinov3():
    """A DINOv3 ViT at toy width (32 wide, 2 layers, 64 px), random weights, in eval mode."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
        image_size=64, num_register_tokens=4,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DINOv3ViTModel(config).eval()


def toy_clip():
    """A CLIP vision tower at toy width (32 wide, 2 layers, 64 px, 16-d projection), random, in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
        image_size=64, projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return CLIPVisionModelWithProjection(config).eval()


class DinoV3(FeatureMetric):
    name, title = "dinov3", "DINOv3"
    packages = (("transformers", "transformers"),)
    default_model = "facebook/dinov3-vitb16-pretrain-lvd1689m"
    has_toy = True
    measures = "how much each subject's region looks like the LoRA's training images (DINOv3 CLS features, cosine)"
    weakness = (
        "the paper notes it scores artifact-heavy images high: self-supervised features match textures and "
        "colours, so a smeared copy of a training image can score well"
    )

    def _load(self) -> None:
        if self.model_id is None:
            self.model, self.size = toy_dinov3(), 64
        else:
            from transformers import AutoModel

            self.model, self.size = AutoModel.from_pretrained(self.model_id).eval(), 224
        self.model.to(self.device, _torch_dtype(self.options.dtype, torch.float32))

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = to_pixels(images, self.size, IMAGENET_MEAN, IMAGENET_STD, center_crop=False)
        pixels = pixels.to(self.device, self.model.dtype)
        return self.model(pixel_values=pixels).pooler_output


class Clip(FeatureMetric):
    name, title = "clip", "CLIP-I"
    packages = (("transformers", "transformers"),)
    default_model = "openai/clip-vit-large-patch14"
    has_toy = True
    measures = "how much each subject's region looks like the LoRA's training images (CLIP image embeddings, cosine)"
    weakness = "not in the paper; CLIP features are semantic and coarse: any person in similar clothes scores close"

    def _load(self) -> None:
        if self.model_id is None:
            self.model, self.size = toy_clip(), 64
        else:
            from transformers import CLIPVisionModelWithProjection

            self.model, self.size = CLIPVisionModelWithProjection.from_pretrained(self.model_id).eval(), 224
        self.model.to(self.device, _torch_dtype(self.options.dtype, torch.float32))

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = to_pixels(images, self.size, CLIP_MEAN, CLIP_STD, center_crop=True)
        return self.model(pixel_values=pixels.to(self.device, self.model.dtype)).image_embeds


class DreamSim(FeatureMetric):
    name, title = "dreamsim", "DreamSim (1 - distance)"
    packages = (("dreamsim", "dreamsim"),)
    default_model = "ensemble"
    measures = (
        "perceptual similarity of each subject's region to the LoRA's training images, tuned to human "
        "judgements; 1 - DreamSim distance, i.e. the cosine of DreamSim embeddings"
    )
    weakness = "compares whole crops: pose, framing and background in the crop move it as much as identity does"

    def _load(self) -> None:
        from dreamsim import dreamsim

        self.model, self.preprocess = dreamsim(pretrained=True, device=self.device, dreamsim_type=self.model_id)

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        # DreamSim's distance is 1 - cosine of these embeddings, so the mean cosine is 1 - distance.
        return torch.cat([self.model.embed(self.preprocess(image.convert("RGB")).to(self.device)) for image in images])


class LVFace(SubjectMetric):
    name, title = "lvface", "LVFace"
    packages = (("lvface", "lvface"),)
    default_model = "LVFace-T_Glint360K"
    measures = "face identity: LVFace embedding cosine between the face in each subject's region and the reference faces"
    weakness = (
        "needs a detectable face in the crop and in each reference (a failure is recorded, not scored 0); "
        "stylised or small faces detect poorly"
    )

    def _load(self) -> None:
        from lvface import FaceRecognizer

        self.recognizer = FaceRecognizer(self.model_id)

    def similarities(self, crops: list[Image.Image], references: list[Image.Image], key: str) -> list[float]:
        self.load()
        arrays = [np.asarray(reference.convert("RGB")) for reference in references]
        scores = []
        for crop in crops:
            face = np.asarray(crop.convert("RGB"))
            scores.append(float(np.mean([self.recognizer.compare(face, reference).cosine for reference in arrays])))
        return scores


# -- image metrics ------------------------------------------------------------------------------------


class ImageMetric(Metric):
    """Scores a whole image; returns the value and details worth keeping."""

    kind = "image"

    @abstractmethod
    def score(self, context: ImageContext) -> tuple[float, dict]: ...


class HPSv3(ImageMetric):
    name, title = "hpsv3", "HPSv3"
    packages = (("hpsv3", "hpsv3"),)
    default_model = "MizzenAI/HPSv3"
    measures = "human preference for the whole image given its prompt (quality, lighting, realism, prompt following)"
    weakness = "blind to identity: a beautiful image of the wrong people scores high"

    def _load(self) -> None:
        from hpsv3 import HPSv3RewardInferencer

        self.inferencer = HPSv3RewardInferencer(device=self.device)

    def score(self, context: ImageContext) -> tuple[float, dict]:
        self.load()
        with torch.no_grad():
            rewards = self.inferencer.reward(prompts=[context.prompt], image_paths=[str(context.path)])
        return float(rewards[0][0]), {}  # each reward is (mean, uncertainty); the score is the mean


class VlmJudge(ImageMetric):
    name, title = "vlm", "VLM judge (Appendix C)"
    packages = (("transformers", "transformers"),)
    default_model = "Qwen/Qwen2.5-VL-7B-Instruct"
    measures = "a vision-language model's 0-100 score: both characters present and recognisable (50), prompt (25), clarity (25)"
    weakness = (
        "the paper used Gemini-2.5; a local model scores on its own scale, so compare methods within one run, not "
        "with the paper's numbers; answers that do not follow the format are recorded as unparseable"
    )

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        on_gpu = not str(self.device).startswith("cpu")
        dtype = _torch_dtype(self.options.dtype, torch.bfloat16 if on_gpu else torch.float32)
        self.processor = AutoProcessor.from_pretrained(self.model_id)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=dtype).to(self.device).eval()

    @torch.no_grad()
    def ask(self, images: list[Image.Image], text: str) -> str:
        """The model's answer to `text` about `images` (greedy decoding: the same answer every time)."""
        content = [{"type": "image", "image": image.convert("RGB")} for image in images]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=self.options.judge_max_new_tokens, do_sample=False)
        answer = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(answer, skip_special_tokens=True)[0]

    def score(self, context: ImageContext) -> tuple[float, dict]:
        self.load()
        references = [image for images in context.references for image in images[: self.options.judge_references]]
        text = judge_prompt(context.words[0], context.words[1], context.prompt, len(references))
        answer = self.ask([*references, context.image], text)
        verdict = parse_verdict(answer)
        details = {"answer": answer[:4000]}
        if verdict.parts is None:
            raise ScoreFailed(f"unparseable judge answer: {verdict.error}", details)
        return float(verdict.total), {**details, **verdict.parts}


METRICS: dict[str, type[Metric]] = {
    metric.name: metric for metric in (DinoV3, DreamSim, LVFace, HPSv3, VlmJudge, Clip)
}
#: The paper's Table 2, in its order.
PAPER_METRICS = ("dinov3", "dreamsim", "lvface", "hpsv3", "vlm")
#: The `--quick` run: the two backbones that build at toy width in memory.
TOY_METRICS = ("dinov3", "clip")


def build_metrics(names: list[str], options: MetricOptions) -> list[Metric]:
    """The metrics named, in that order; an unknown name lists the known ones."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise SettingsError(f"Unknown metric {unknown[0]!r}; use one of {', '.join(METRICS)}.")
    if len(set(names)) != len(names):
        raise SettingsError("A metric is given twice; give each once.")
    return [METRICS[name](options) for name in names]
