"""Does the ShapesWorld model's attention know where each subject is? Per step and block, both directions.

    python bench/shapesworld_attention.py --seeds 12

Runs "a zorblax and a blorp" as plain joint LoRAs (merge), records every double-stream block's
post-norm, post-RoPE queries and keys at every step, and detects the two subjects in the final
picture. For each step and block it prints, averaged over the pictures where both subjects are
found by their colour:

- text→image: the share of a subject word's attention (softmax over image keys) that lands on its
  own object, relative to both words (chance 0.5) — what FreeFuse's stage 1 reads;
- image→text: for the object's image tokens, the share of their attention to the two words that
  goes to the subject's own word (chance 0.5);
- the correlation of the two words' text→image maps.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--model", default=None, help="a ShapesWorld model folder (default: the committed one)"
    )
    parser.add_argument(
        "--loras", default=None, help="a folder of the four LoRAs (default: the committed ones)"
    )
    parser.add_argument(
        "--base-words",
        action="store_true",
        help='"a red circle and a blue square", no LoRAs: the colour words of base-vocabulary objects',
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from diffusers.models.embeddings import apply_rotary_emb

    from freefuse import FreeFuse, GenerationSettings
    from freefuse.shapesworld.detect import detect
    from freefuse.shapesworld.evaluate import assign
    from freefuse.shapesworld.model import load_shapesworld, lora_path
    from freefuse.shapesworld.scenes import SUBJECTS, Subject

    pipe = load_shapesworld(args.model) if args.model else load_shapesworld()
    freefuse = FreeFuse(pipe)
    if args.base_words:
        words, prompt = ["red", "blue"], "a red circle and a blue square"
        wanted = {
            "red": Subject("red", "circle", "red", "plain"),
            "blue": Subject("blue", "square", "blue", "plain"),
        }
    else:
        words, prompt = ["zorblax", "blorp"], "a zorblax and a blorp"
        wanted = {word: SUBJECTS[word] for word in words}
        for word in words:
            freefuse.add_lora(lora_path(word, args.loras) if args.loras else lora_path(word), name=word)
        pipe.set_adapters(words)
    backend = freefuse.backend
    ids = backend.tokenizer(prompt)["input_ids"]
    word_positions = [ids.index(backend.tokenizer.convert_tokens_to_ids("▁" + word)) for word in words]
    blocks = range(len(pipe.transformer.transformer_blocks))
    store: dict = {}
    handles = []
    for block in blocks:
        attn = pipe.transformer.transformer_blocks[block].attn
        for name, module in (
            ("q", attn.norm_q),
            ("k", attn.norm_k),
            ("qt", attn.norm_added_q),
            ("kt", attn.norm_added_k),
        ):
            handles.append(
                module.register_forward_hook(lambda m, i, o, b=block, n=name: store.__setitem__((b, n), o))
            )
        handles.append(
            attn.register_forward_pre_hook(
                lambda m, a, kw, b=block: store.__setitem__((b, "rope"), kw["image_rotary_emb"]),
                with_kwargs=True,
            )
        )

    results: dict = {}
    used = 0
    for seed in range(args.seeds):
        per_step = {}
        with torch.no_grad():
            conditioning = backend.encode([prompt], 24)
            state = backend.prepare_latents(
                [torch.Generator().manual_seed(seed)], 1, 64, 64, conditioning.prompt_embeds.dtype
            )
            timesteps, _ = backend.timesteps(args.steps, 64, 64)
            settings = GenerationSettings(prompt=prompt, guidance_scale=3.5)
            for step, t in enumerate(timesteps):
                velocity = backend.predict(state, t, conditioning, settings)
                for block in blocks:
                    cos, sin = store[(block, "rope")]
                    n_text = store[(block, "kt")].shape[1]

                    def rope(x, text, c=cos, s=sin, n=n_text):
                        part = (c[:n], s[:n]) if text else (c[n:], s[n:])
                        return apply_rotary_emb(x, part, sequence_dim=1)[0].transpose(0, 1)  # [H, S, D]

                    q_img, k_img = rope(store[(block, "q")], False), rope(store[(block, "k")], False)
                    q_txt, k_txt = rope(store[(block, "qt")], True), rope(store[(block, "kt")], True)
                    scale = q_img.shape[-1] ** -0.5
                    text_to_image = torch.softmax(
                        q_txt[:, word_positions] @ k_img.transpose(1, 2) * scale, -1
                    ).mean(0)
                    keys = torch.cat([k_txt, k_img], dim=1)
                    image_to_text = (
                        torch.softmax(q_img @ keys.transpose(1, 2) * scale, -1).mean(0)[:, word_positions].T
                    )
                    per_step[(step, block)] = (text_to_image, image_to_text)
                state.latents = backend.step(velocity, t, state.latents)
            image = (backend.decode(state.latents, 64, 64)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        objects = assign([wanted[w] for w in words], detect(image))
        regions = {}
        for word in words:
            obj = objects[word]
            if obj is not None and obj.colour == wanted[word].colour:
                mask = torch.from_numpy(obj.mask.astype(np.float32))[None, None]
                regions[word] = torch.nn.functional.interpolate(mask, size=(8, 8), mode="area")[0, 0].reshape(
                    -1
                )
        if len(regions) < 2:
            continue
        used += 1
        for key, (text_to_image, image_to_text) in per_step.items():
            for kind, maps in (("text->image", text_to_image), ("image->text", image_to_text)):
                share = maps / maps.sum(dim=0, keepdim=True)
                own = np.mean(
                    [float((share[i] * regions[w]).sum() / regions[w].sum()) for i, w in enumerate(words)]
                )
                results.setdefault((*key, kind), []).append(own)
            results.setdefault((*key, "corr"), []).append(float(torch.corrcoef(text_to_image)[0, 1]))
    for handle in handles:
        handle.remove()

    print(f"pictures with both subjects found: {used} of {args.seeds}")
    print("step  " + "  ".join(f"block {b}: text->img  img->text  corr" for b in blocks))
    for step in range(0, args.steps, 2):
        row = "  ".join(
            f"         {np.mean(results[(step, b, 'text->image')]):.3f}      {np.mean(results[(step, b, 'image->text')]):.3f}"
            f"  {np.mean(results[(step, b, 'corr')]):.2f}"
            for b in blocks
        )
        print(f"{step:>4}  {row}")


if __name__ == "__main__":
    main()
