"""Training the ShapesWorld model on a CPU: the VAE, the base text-to-image model, one LoRA per subject.

Every stage is seeded and resumable: the batch of step k is drawn from a generator seeded with
(seed, k), and a checkpoint (safetensors: weights, optimizer state, EMA; JSON: step) is written
atomically every `checkpoint_every` steps, so a killed run continues where it stopped and gives
the same result. Loss is logged to `log.jsonl` in the run folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.flux import FLUX_LORA_TARGETS
from ..files import atomic_save, atomic_write
from .model import MAX_TEXT_TOKENS, build_pipeline, build_vae, token_grid
from .scenes import V1, WORLDS, World, random_scene


@dataclass
class TrainConfig:
    """One training stage. `out` is the run folder (checkpoints, log, result)."""

    out: Path
    steps: int
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 100
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    ema_decay: float | None = None
    extra: dict = field(default_factory=dict)
    #: which ShapesWorld ("v1" or "v3", `scenes.WORLDS`): scenes, subjects and model sizes
    world: str = "v1"


# -- data -----------------------------------------------------------------------------------------


def scene_batch(
    seed: int,
    step: int,
    batch_size: int,
    subject: str | None = None,
    mixed: bool = False,
    world: World = V1,
):
    """Pictures `[B, 3, 64, 64]` in [-1, 1] and captions for training step `step` (deterministic).

    Base scenes; with `subject`, scenes with that subject and 0-2 base objects; with `mixed`, base
    scenes and scenes with 1-2 random subjects (what the VAE must be able to draw).
    """
    rng = np.random.default_rng([seed, step])
    images, captions = [], []
    subjects = world.subjects
    for _ in range(batch_size):
        if subject is not None:
            chosen = (subjects[subject],)
        elif mixed:
            count = int(rng.integers(0, 3))
            chosen = tuple(subjects[w] for w in rng.choice(list(subjects), size=count, replace=False))
        else:
            chosen = ()
        scene = random_scene(rng, subjects=chosen, world=world) if chosen else random_scene(rng, world=world)
        images.append(scene.render())
        captions.append(scene.caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, captions


# -- checkpoints ----------------------------------------------------------------------------------


def _state_path(out: Path) -> Path:
    return out / "checkpoint"


def save_checkpoint(
    out: Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
) -> None:
    from safetensors.torch import save

    folder = _state_path(out)
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in params.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.items()})
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{index}.{key}"] = value.contiguous()
    atomic_save(folder / "state.safetensors", lambda f: f.write(save(tensors)))
    atomic_write(folder / "step.json", json.dumps({"step": step}))


def load_checkpoint(
    out: Path,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
) -> int:
    """Restore a checkpoint if there is one; return the next step to run."""
    from safetensors.torch import load_file

    folder = _state_path(out)
    if not (folder / "step.json").is_file():
        return 0
    step = int(json.loads((folder / "step.json").read_text())["step"])
    tensors = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        for key, value in params.items():
            value.copy_(tensors[f"param.{key}"])
        if ema is not None:
            for key, value in ema.items():
                value.copy_(tensors[f"ema.{key}"])
    state = optimizer.state_dict()
    for index in range(len(params)):
        entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{index}.")}
        if entries:
            state["state"][index] = entries
    optimizer.load_state_dict(state)
    return step


# -- the loop -------------------------------------------------------------------------------------


def run_loop(
    config: TrainConfig,
    params: dict[str, torch.nn.Parameter],
    loss_at: Callable[[int], torch.Tensor],
    progress: bool = True,
) -> dict[str, torch.Tensor] | None:
    """AdamW with warm-up and cosine decay over `params`; returns the EMA weights (if any)."""
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in params.items()} if config.ema_decay else None
    start = load_checkpoint(config.out, params, optimizer, ema)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn(f"[bold]{config.out.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
        )
        task = bar.add_task("train", total=config.steps, completed=start, loss=float("nan"))
        bar.start()
    log = open(config.out / "log.jsonl", "a")  # noqa: SIM115 - closed in finally
    started, running = time.perf_counter(), []
    try:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for key, value in params.items():
                        ema[key].lerp_(value.detach(), 1 - config.ema_decay)
            running.append(float(loss.detach()))
            if bar is not None:
                bar.update(task, completed=step + 1, loss=float(np.mean(running[-config.log_every :])))
            if (step + 1) % config.log_every == 0:
                record = {
                    "step": step + 1,
                    "loss": float(np.mean(running[-config.log_every :])),
                    "lr": lr_at(step),
                    "seconds": round(time.perf_counter() - started, 1),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save_checkpoint(config.out, step + 1, params, optimizer, ema)
    finally:
        log.close()
        if bar is not None:
            bar.stop()
    return ema


def _flow_loss(transformer, pipe, latents, captions, generator, text_grad: bool) -> torch.Tensor:
    """Flow-matching loss: x_t = (1 - t) x0 + t ε, the model predicts ε - x0 (t logit-normal)."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    noisy = (1 - t[:, None, None]) * latents + t[:, None, None] * noise
    with torch.set_grad_enabled(text_grad):
        embeds, pooled, text_ids = pipe.encode_prompt(
            captions, prompt_2=None, max_sequence_length=MAX_TEXT_TOKENS, device=torch.device("cpu")
        )
    side = int(math.isqrt(latents.shape[1]))
    image_ids = pipe._prepare_latent_image_ids(batch, side, side, latents.device, latents.dtype)
    prediction = transformer(
        hidden_states=noisy,
        timestep=t,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return F.mse_loss(prediction, noise - latents)


def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Packed, normalised latents `[B, N, 16]` of pictures in [-1, 1] (the VAE's mean)."""
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


# -- stages ---------------------------------------------------------------------------------------


def train_vae(config: TrainConfig, progress: bool = True):
    """The world's AutoencoderKL (v1 4x, v3 2x); saved (with latent scale/shift) to `out/vae`."""
    world = WORLDS[config.world]
    vae = build_vae(config.seed, config.world)
    vae.train()
    params = dict(vae.named_parameters())
    kl_weight = float(config.extra.get("kl_weight", 1e-6))

    def loss_at(step: int) -> torch.Tensor:
        pixels, _ = scene_batch(config.seed, step, config.batch_size, mixed=True, world=world)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        posterior = vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        return F.mse_loss(reconstruction, pixels) + kl_weight * posterior.kl().mean()

    run_loop(config, params, loss_at, progress)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(scene_batch(config.seed + 1, k, 64, mixed=True, world=world)[0]).latent_dist.mode()
                for k in range(8)
            ]
        )
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(config.out / "vae")
    return vae


def _trainable_text_to_image(pipe) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Parameter]]:
    """The transformer and both text encoders in training mode, and their parameters by full name."""
    modules = {
        "transformer": pipe.transformer,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    params = {
        f"{name}.{key}": value for name, module in modules.items() for key, value in module.named_parameters()
    }
    for module in modules.values():
        module.train()
    return modules, params


def _save_trained(pipe, modules: dict, params: dict, ema: dict | None, folder: Path) -> None:
    """The EMA weights (if any) into the model, eval mode, and the pipeline saved to `folder`."""
    with torch.no_grad():
        for key, value in (ema or {}).items():
            params[key].copy_(value)
    for module in modules.values():
        module.eval()
    pipe.save_pretrained(folder)


def train_base(
    config: TrainConfig,
    vae_dir: Path,
    progress: bool = True,
    ground_weight: float = 0.0,
    ground_blocks: list[int] | None = None,
):
    """The text-to-image model on base scenes (plain shapes in the 4 base colours).

    `ground_weight` > 0 adds the grounding loss (`grounding_loss`: each object's words attend to
    its own image tokens and back, from the rendered object masks) to flow matching from the first
    step, in the double-stream blocks `ground_blocks` (default: all but the first). This builds
    FreeFuse's premise — attention knows where each object is — into the base model for the words
    it is trained on; subject words are never in these captions.
    """
    from diffusers import AutoencoderKL

    world = WORLDS[config.world]
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
    pipe = build_pipeline(vae=vae, seed=config.seed, world=config.world)
    modules, params = _trainable_text_to_image(pipe)
    taps = None
    if ground_weight > 0:
        blocks = len(pipe.transformer.transformer_blocks)
        taps = DoubleBlockTaps(pipe.transformer, ground_blocks or list(range(1, blocks)) or [0])
        config.extra = {**config.extra, "ground_weight": ground_weight, "ground_blocks": taps.indices}
    grid = token_grid(vae)

    def loss_at(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        if taps is None:
            pixels, captions = scene_batch(config.seed, step, config.batch_size, world=world)
            return _flow_loss(pipe.transformer, pipe, encode_latents(pipe, pixels), captions, generator, True)
        pixels, captions, words, regions = grounded_batch(
            config.seed, step, config.batch_size, pipe.tokenizer_2, world=world, grid=grid
        )
        flow = _flow_loss(pipe.transformer, pipe, encode_latents(pipe, pixels), captions, generator, True)
        return flow + ground_weight * grounding_loss(taps, words, regions)

    try:
        ema = run_loop(config, params, loss_at, progress)
    finally:
        if taps is not None:
            taps.remove()
    _save_trained(pipe, modules, params, ema, config.out / "model")
    return pipe


def word_token(tokenizer, word: str) -> int:
    """The one token id `word` is to this tokenizer (the ShapesWorld words are single T5 tokens)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens to the T5 tokenizer; pivotal tuning needs one.")
    return ids[0]


def substitute_embedding(text_encoder: torch.nn.Module, token: int, row: torch.Tensor) -> list:
    """Forward hooks putting `row` in place of `token`'s embedding (pivotal tuning trains `row`).

    On every embedding module sharing the input table: T5's encoder looks tokens up through its
    own `embed_tokens`, which ties the weight of `get_input_embeddings()` but is another module.
    """
    table = text_encoder.get_input_embeddings().weight

    def hook(module, inputs, output):
        hit = (inputs[0] == token)[..., None]
        return torch.where(hit, row.to(output.dtype), output)

    return [
        module.register_forward_hook(hook)
        for module in text_encoder.modules()
        if isinstance(module, torch.nn.Embedding) and module.weight is table
    ]


def train_lora(
    config: TrainConfig,
    model_dir: Path,
    word: str,
    rank: int = 8,
    pivotal: bool = True,
    init_word: str | None = None,
    progress: bool = True,
) -> Path:
    """A LoRA that binds `word` to its subject object; written as a diffusers-layout .safetensors.

    The subject and its scenes come from `config.world`; the file's trigger phrase is the subject's
    activation words (v3: the word and its class noun, "zorblax star").

    `pivotal`: train the word's T5 embedding with the LoRA (pivotal tuning, as character LoRAs are
    trained) and bundle it in the file as `bundle_emb.<word>.t5` (OneTrainer's key, read by
    ComfyUI and by `FreeFuse.add_lora`). `init_word`: the embedding starts from this word's row
    (textual inversion's "initializer token") instead of the word's own untrained one.
    """
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    world = WORLDS[config.world]
    subject = world.subjects[word]
    pipe = FluxPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.eval().requires_grad_(False)
    pipe.transformer.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(FLUX_LORA_TARGETS)
        ),
        adapter_name=word,
    )
    params = {name: p for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    for value in params.values():
        value.requires_grad_(True)
    hooks = []
    if pivotal:
        table = pipe.text_encoder_2.get_input_embeddings().weight
        token = word_token(pipe.tokenizer_2, word)
        start = table[word_token(pipe.tokenizer_2, init_word) if init_word else token]
        params["word_embedding"] = torch.nn.Parameter(start.detach().clone())
        hooks = substitute_embedding(pipe.text_encoder_2, token, params["word_embedding"])

    def loss_at(step: int) -> torch.Tensor:
        pixels, captions = scene_batch(config.seed, step, config.batch_size, subject=word, world=world)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        return _flow_loss(pipe.transformer, pipe, encode_latents(pipe, pixels), captions, generator, pivotal)

    try:
        run_loop(config, params, loss_at, progress)
    finally:
        for hook in hooks:
            hook.remove()
    state = get_peft_model_state_dict(pipe.transformer, adapter_name=word)
    state = {f"transformer.{key}": value.detach().contiguous() for key, value in state.items()}
    if pivotal:
        state[f"bundle_emb.{word}.t5"] = params["word_embedding"].detach()[None].contiguous()
    metadata = {
        "format": "pt",
        "modelspec.trigger_phrase": subject.trigger,
        "modelspec.title": f"ShapesWorld {word}",
        "shapesworld.subject": json.dumps(asdict(subject)),
        "ss_network_dim": str(rank),
    }
    path = config.out / f"{word}.safetensors"
    atomic_save(path, lambda f: f.write(save(state, metadata=metadata)))
    return path


GRID = 8  # v1's image tokens per side: 64 px, a 4x VAE, 2x2 patches (v3: 16, `model.token_grid`)


def grounded_batch(seed: int, step: int, batch_size: int, tokenizer, world: World = V1, grid: int = GRID):
    """Base scenes with where each object is, for the grounding loss (deterministic per step).

    Returns pixels `[B, 3, 64, 64]`, captions, `words` `[B, K, T]` (1 where text token t is one of
    object k's content words: colour, texture, shape; not the article) and `regions` `[B, K, N]`
    (1 where image token n is mostly object k, N = grid²), K = 4 objects at most,
    T = MAX_TEXT_TOKENS.
    """
    rng = np.random.default_rng([seed, step, 7])
    images, captions = [], []
    words = torch.zeros(batch_size, 4, MAX_TEXT_TOKENS)
    regions = torch.zeros(batch_size, 4, grid * grid)
    for b in range(batch_size):
        scene = random_scene(rng, world=world)
        images.append(scene.render())
        caption = scene.caption
        captions.append(caption)
        offsets = tokenizer(caption, return_offsets_mapping=True, add_special_tokens=True)["offset_mapping"]
        visible = torch.from_numpy(scene.masks().astype(np.float32))
        share = F.adaptive_avg_pool2d(visible[None], grid)[0].reshape(len(scene.objects), -1)
        start = 0
        for k, obj in enumerate(scene.objects):
            phrase = obj.phrase()
            at = caption.index(phrase, start)
            first, last = at + 2, at + len(phrase)  # without the article "a "
            start = at + len(phrase)
            for t, (low, high) in enumerate(offsets[:MAX_TEXT_TOKENS]):
                if high > low and low >= first and high <= last:
                    words[b, k, t] = 1.0
            regions[b, k] = (share[k] >= 0.5).float()
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, captions, words, regions


class DoubleBlockTaps:
    """Forward hooks keeping the double-stream blocks' post-norm queries/keys and RoPE, with grad.

    `blocks`: the indices of the double-stream blocks to keep (default: all); `indices` lists them.
    """

    def __init__(self, transformer, blocks: list[int] | None = None) -> None:
        self.store: dict = {}
        self.handles = []
        self.indices = list(range(len(transformer.transformer_blocks))) if blocks is None else list(blocks)
        for index in self.indices:
            attn = transformer.transformer_blocks[index].attn
            for name, module in (
                ("q_img", attn.norm_q),
                ("k_img", attn.norm_k),
                ("q_text", attn.norm_added_q),
                ("k_text", attn.norm_added_k),
            ):
                self.handles.append(module.register_forward_hook(self._keep(index, name)))
            self.handles.append(attn.register_forward_pre_hook(self._keep_rope(index), with_kwargs=True))

    def _keep(self, index: int, name: str):
        def hook(module, inputs, output):
            self.store[index, name] = output

        return hook

    def _keep_rope(self, index: int):
        def hook(module, args, kwargs):
            self.store[index, "rope"] = kwargs.get("image_rotary_emb")

        return hook

    def qk(self, index: int) -> dict[str, torch.Tensor]:
        """`[B, H, S, D]` queries and keys of block `index` with RoPE applied."""
        from diffusers.models.embeddings import apply_rotary_emb

        cos, sin = self.store[index, "rope"]
        n_text = self.store[index, "q_text"].shape[1]
        result = {}
        for name in ("q_img", "k_img", "q_text", "k_text"):
            part = (cos[:n_text], sin[:n_text]) if name.endswith("text") else (cos[n_text:], sin[n_text:])
            result[name] = apply_rotary_emb(self.store[index, name], part, sequence_dim=1).transpose(1, 2)
        return result

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def grounding_loss(taps: DoubleBlockTaps, words: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """-log of the share of attention that lands on the right object, both directions, every tapped block.

    image→text: an object's image tokens, softmax over all keys, share of the objects' words' mass
    that goes to its own words. text→image: an object's words, softmax over all keys, share of the
    image mass that lands on its own region. Heads are averaged before the shares.
    """
    eps = 1e-6
    losses = []
    any_word = words.amax(dim=1)  # [B, T]
    for index in taps.indices:
        qk = taps.qk(index)
        keys = torch.cat([qk["k_text"], qk["k_img"]], dim=2)
        n_text = qk["k_text"].shape[2]
        scale = qk["q_img"].shape[-1] ** -0.5
        image_rows = torch.softmax(qk["q_img"] @ keys.transpose(-1, -2) * scale, dim=-1).mean(1)  # [B, N, S]
        to_text = image_rows[..., :n_text]  # [B, N, T]
        own = torch.einsum("bnt,bkt,bkn->bn", to_text, words, regions)
        total = (to_text * any_word[:, None, :]).sum(-1)
        owned = regions.amax(dim=1)  # [B, N]
        image_to_text = -(torch.log(own / (total + eps) + eps) * owned).sum() / owned.sum().clamp_min(1.0)
        text_rows = torch.softmax(qk["q_text"] @ keys.transpose(-1, -2) * scale, dim=-1).mean(1)  # [B, T, S]
        to_image = text_rows[..., n_text:]  # [B, T, N]
        own_t = torch.einsum("btn,bkn,bkt->bt", to_image, regions, words)
        total_t = to_image.sum(-1)
        text_to_image = -(
            torch.log(own_t / (total_t + eps) + eps) * any_word
        ).sum() / any_word.sum().clamp_min(1.0)
        losses.append(image_to_text + text_to_image)
    return torch.stack(losses).mean()


def train_grounding(config: TrainConfig, model_dir: Path, weight: float = 0.05, progress: bool = True):
    """Fine-tune the base model so that its attention knows where each object is.

    The 2+2-block model trained on flow matching alone attends at chance (docs/shapesworld.md): a
    word's attention does not land on its object, in either direction. FLUX.1 learns that from
    scale; here a grounding loss on the double-stream blocks' attention (`grounding_loss`, rendered
    object masks and caption words of base scenes) is added to the flow-matching loss. Subject
    words are never in these captions: whether their LoRAs' attention localizes is measured, not
    trained.
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    modules, params = _trainable_text_to_image(pipe)
    pipe.vae.eval().requires_grad_(False)
    taps = DoubleBlockTaps(pipe.transformer)
    world, grid = WORLDS[config.world], token_grid(pipe.vae)

    def loss_at(step: int) -> torch.Tensor:
        pixels, captions, words, regions = grounded_batch(
            config.seed, step, config.batch_size, pipe.tokenizer_2, world=world, grid=grid
        )
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        flow = _flow_loss(pipe.transformer, pipe, encode_latents(pipe, pixels), captions, generator, True)
        return flow + weight * grounding_loss(taps, words, regions)

    try:
        ema = run_loop(config, params, loss_at, progress)
    finally:
        taps.remove()
    _save_trained(pipe, modules, params, ema, config.out / "model")
    return pipe


def base_from_checkpoint(run: Path, vae_dir: Path, use_ema: bool = True, world: str = "v1"):
    """The base pipeline as it stands in a (possibly unfinished) run's checkpoint, for looking at samples."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    pipe = build_pipeline(vae=vae, world=world)
    tensors = load_file(str(_state_path(run) / "state.safetensors"))
    prefix = "ema." if use_ema and any(k.startswith("ema.") for k in tensors) else "param."
    modules = {
        "transformer": pipe.transformer,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    with torch.no_grad():
        for name, module in modules.items():
            for key, value in module.named_parameters():
                value.copy_(tensors[f"{prefix}{name}.{key}"])
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
