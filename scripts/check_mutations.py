"""Break the method on purpose, one line at a time, and check that the test suite notices.

Each mutation below is a realistic bug: one a review once slipped past the whole suite, or one a
mutation run found surviving until a test was written for it. The script applies one mutation to
the source, runs pytest (stopping at the first failure), restores the file, and prints which test
caught it. Each entry names the test files that should catch it (`tests`); those run by default,
which keeps a run of the whole list to minutes. Run the whole list before each stop.

    python scripts/check_mutations.py                 # every entry, each against its own tests
    python scripts/check_mutations.py --list          # the entries, and whether each still applies
    python scripts/check_mutations.py --only sink     # the entries whose name contains "sink"
    python scripts/check_mutations.py --whole-suite   # each entry against the whole suite (slow)
    python scripts/check_mutations.py --tests tests/test_core_sinks.py   # against these paths instead
    python scripts/check_mutations.py --no-baseline   # skip the first, unmutated run of the tests

Before any mutation, the chosen tests run once on the unmutated source (the baseline): a test that
already fails would "catch" every mutation. The source under test is this checkout's `src/`
(put first on the subprocess's PYTHONPATH), whatever `freefuse` the interpreter has installed.
Each mutation is written into the file itself and undone afterwards (also on Ctrl-C): do not run
tests or edit `src/` in this checkout while the script runs.

An entry is STALE when its `old` text occurs in its file zero times or more than once (the code
moved on: find the line's current form and update the entry), when its mutated file no longer
compiles, or when a test path it names does not exist. Stale entries are never counted as
survivors: they are listed separately and make the script exit 3.

Exit status: 0 every chosen mutation was caught; 1 some mutation survived; 3 some entry is stale
(whatever else happened); 4 the baseline failed (nothing was mutated); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "freefuse"

EXIT_SURVIVED, EXIT_USAGE, EXIT_STALE, EXIT_BASELINE = 1, 2, 3, 4


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to src/freefuse
    old: str
    new: str
    tests: tuple[
        str, ...
    ] = ()  # test paths (relative to the repository) that should catch it; () = whole suite


MUTATIONS = (
    Mutation(
        "each LoRA gets the next subject's mask in stage 2",
        "masking.py",
        "for name, image in image_masks.items():",
        "for name, image in zip(image_masks, [*list(image_masks.values())[1:], *list(image_masks.values())[:1]]):",
        ("tests/test_stage2_layers.py",),
    ),
    Mutation(
        "stage 1's masks handed to the next subject",
        "methods.py",
        "masks.tokens[name][b] = result.token_masks[slot].reshape(-1)",
        "masks.tokens[name][b] = result.token_masks[(slot + 1) % len(active)].reshape(-1)",
        ("tests/test_stage2_layers.py",),
    ),
    Mutation(
        "single-stream layout declared [image, text]",
        "backends/flux.py",
        'return NO_TOKENS if ".norm." in module_name else ("text", "image")',
        'return NO_TOKENS if ".norm." in module_name else ("image", "text")',
        ("tests/test_stage2_layers.py",),
    ),
    Mutation(
        "joint masks concatenated in reverse order",
        "masking.py",
        "return torch.cat(parts, dim=1)[..., None]",
        "return torch.cat(parts[::-1], dim=1)[..., None]",
        ("tests/test_stage2_layers.py",),
    ),
    Mutation(
        "fused LoRA op ignores the masks",
        "masking.py",
        "masks[a].for_layout(plan.layout, shape) if a in masks else None for a in plan.adapters",
        "None for a in plan.adapters",
        ("tests/test_stage2_layers.py",),
    ),
    Mutation(
        "fused LoRA op reuses one layer's scaling for another",
        "masking.py",
        "key = (*plan.cache_key, tuple(low.shape[:-1]) if plan.layout else 0)",
        "key = (*plan.cache_key[:3], tuple(low.shape[:-1]) if plan.layout else 0)",
        ("tests/test_lora_ops.py::test_alpha_set_per_layer_is_kept_by_the_fused_op",),
    ),
    Mutation(
        "sink rule: top-k anywhere",
        "core/attention.py",
        "kept = rows.masked_fill(top & border, 0.0)",
        "kept = rows.masked_fill(top, 0.0)",
        ("tests/test_core_sinks.py",),
    ),
    Mutation(
        "sink rule: the whole border",
        "core/attention.py",
        "kept = rows.masked_fill(top & border, 0.0)",
        "kept = rows.masked_fill(border.expand_as(top), 0.0)",
        ("tests/test_core_sinks.py",),
    ),
    Mutation(
        "stage 1 taps the negative prompt's pass",
        "backends/base.py",
        "            prediction = self.predict(latents, timestep, conditioning, settings)\n        if negative",
        "            prediction = self.predict(latents, timestep, conditioning, settings)\n"
        "            if negative is not None:\n"
        "                self.predict(latents, timestep, negative, settings)\n"
        "        if negative",
        ("tests/test_pipeline.py::test_with_true_cfg_stage_one_reads_the_prompts_pass_not_the_negative_one",),
    ),
    Mutation(
        "x0 sign flipped",
        "backends/flux.py",
        "return latents - float(sigma) * prediction",
        "return latents + float(sigma) * prediction",
        ("tests/test_backend_contract.py",),
    ),
    Mutation(
        "negative pass uses the prompt's word positions",
        "pipeline.py",
        '("uncond", negative, context.negative_positions),',
        '("uncond", negative, context.positions),',
        ("tests/test_stage2_layers.py::test_the_negative_pass_masks_the_negative_prompts_own_words",),
    ),
    Mutation(
        "empty_mask=global no longer makes the LoRA act everywhere",
        "methods.py",
        "masks.tokens[name][b] = 1.0\n                masks.everywhere.add((name, b))\n                full[name]",
        "full[name]",
        ("tests/test_stage2_layers.py",),
    ),
    Mutation(
        "a LoRA on AdaLN (modulation) layers unmasked",
        "masking.py",
        "return self.image.mean(dim=1, keepdim=True)",
        "return torch.ones_like(self.image[:, :1])",
        ("tests/test_stage2_layers.py",),
    ),
    Mutation(
        "routing contrast summed in the subjects' order",
        "core/methods.py",
        "total = scores.sort(dim=0).values.sum(dim=0, keepdim=True)",
        "total = scores.sum(dim=0, keepdim=True)",
        ("tests/test_core_methods.py",),
    ),
    Mutation(
        "SDXL: a mask repeated up to a finer UNet level comes out mirrored",
        "masking.py",
        'return torch.nn.functional.interpolate(mask, size=tuple(size), mode="nearest")',
        'return torch.nn.functional.interpolate(mask, size=tuple(size), mode="nearest").flip(-1)',
        ("tests/test_sdxl.py",),
    ),
    Mutation(
        "SDXL: cross-attention values declared image tokens",
        "backends/sdxl.py",
        '_CROSS_ATTENTION_TEXT_SIDE = ("attn2.to_k", "attn2.to_v")',
        '_CROSS_ATTENTION_TEXT_SIDE = ("attn2.to_k",)',
        ("tests/test_sdxl.py",),
    ),
    Mutation(
        "SDXL: noise drawn before the schedule sets its first sigma",
        "pipeline.py",
        "timesteps, sigmas = backend.schedule(steps, settings.height, settings.width, strength)\n"
        "            state = backend.prepare(\n"
        "                generators,\n"
        "                batch,\n"
        "                settings.height,\n"
        "                settings.width,\n"
        "                conditioning.prompt_embeds.dtype,\n"
        "                latents,\n"
        "                conditions,\n"
        "                timesteps[:1],\n"
        "                flat_controlnets(controlnet),\n"
        "            )",
        "state = backend.prepare(\n"
        "                generators, batch, settings.height, settings.width, conditioning.prompt_embeds.dtype, latents,\n"
        "                conditions, None, flat_controlnets(controlnet),\n"
        "            )\n"
        "            timesteps, sigmas = backend.schedule(steps, settings.height, settings.width, strength)",
        ("tests/test_sdxl.py",),
    ),
    Mutation(
        "SDXL: an unset negative prompt encoded instead of zeros",
        "backends/sdxl.py",
        "if settings.negative_prompt is None and self.pipeline.config.get(",
        "if False and self.pipeline.config.get(",
        ("tests/test_sdxl.py",),
    ),
    # -- SDXL at a non-square size: every test above runs SDXL at 128x128 -----------------------------
    Mutation(
        "SDXL non-square: a UNet level's mask grid sized w x h",
        "masking.py",
        "size = (max(1, round(h * scale)), max(1, round(w * scale)))",
        "size = (max(1, round(w * scale)), max(1, round(h * scale)))",
        ("tests/test_pins_sdxl_nonsquare.py",),
    ),
    Mutation(
        "SDXL non-square: the image mask read as a w x h grid before resizing",
        "masking.py",
        "mask = self.image.reshape(-1, 1, *self.grid)",
        "mask = self.image.reshape(-1, 1, *self.grid[::-1])",
        ("tests/test_pins_sdxl_nonsquare.py",),
    ),
    Mutation(
        "SDXL non-square: size conditioning given as (width, height)",
        "backends/sdxl.py",
        "(height, width), (0, 0), (height, width), dtype=dtype",
        "(width, height), (0, 0), (width, height), dtype=dtype",
        ("tests/test_pins_sdxl_nonsquare.py",),
    ),
    # -- the mask methods' arithmetic, against hand-computed tensors ----------------------------------
    Mutation(
        "image-to-text threshold background in image-token units (1/N, not 1/T)",
        "core/methods.py",
        "return _split(shares, shares, len(token_sets), 1.0 / capture.k_text.shape[1], config)",
        "return _split(shares, shares, len(token_sets), 1.0 / capture.q_img.shape[1], config)",
        ("tests/test_pins_core_methods.py",),
    ),
    Mutation(
        "peak-scaled maps keep the density background level",
        "core/methods.py",
        "maps, level = peak_scaled(maps, config.p_top), config.peak_background",
        "maps, level = peak_scaled(maps, config.p_top), level",
        ("tests/test_pins_core_methods.py",),
    ),
    Mutation(
        "combined method: arithmetic mean of the two directions, not geometric",
        "core/methods.py",
        "cross = as_distribution((forward * backward).sqrt())",
        "cross = as_distribution((forward + backward) / 2)",
        ("tests/test_pins_core_methods.py",),
    ),
    Mutation(
        "shared sinks looked for among the subjects' own words only",
        "core/attention.py",
        "candidates = shared_sinks(q_text, k_img, p_sink, chunk_elements)",
        "candidates = shared_sinks(q_text[:, positions], k_img, p_sink, chunk_elements)",
        ("tests/test_pins_core_methods.py",),
    ),
    # -- error paths that undo work -------------------------------------------------------------------
    Mutation(
        "an embedding install failing half-way keeps what it had changed",
        "embeddings.py",
        "        uninstall(installed, pipeline)\n        raise",
        "        raise",
        ("tests/test_pins_undo.py",),
    ),
    Mutation(
        "add_lora keeps the adapter when its embeddings fail to install",
        "pipeline.py",
        "            self.pipeline.delete_adapters(name)\n            raise",
        "            raise",
        ("tests/test_pins_undo.py",),
    ),
    Mutation(
        "write_all: a failed rename leaves the new files, removes replaced ones",
        "core/storage.py",
        "            if not existed:",
        "            if existed:",
        ("tests/test_pins_undo.py",),
    ),
    Mutation(
        "write_all: the clean-up after a failed rename unlinks a temporary name again",
        "core/storage.py",
        "                os.unlink(path)",
        "                os.unlink(tmp)",
        ("tests/test_pins_undo.py",),
    ),
    # -- the caller's adapter state after a run -------------------------------------------------------
    Mutation(
        "adapter state saved and restored on the denoiser only (text encoders forgotten)",
        "masking.py",
        "    for component in pipeline.components.values():",
        '    for component in [getattr(pipeline, "unet", None) or pipeline.transformer]:',
        ("tests/test_pins_adapter_state.py",),
    ),
    Mutation(
        # A run enables LoRA layers the caller disabled, for the run only (a run that applied none
        # would be a silent wrong result), and gives the caller's state back after it.
        "LoRAs the caller disabled stay enabled after a run",
        "masking.py",
        "            module.enable_adapters(not off)",
        "            module.enable_adapters(True)",
        ("tests/test_pins_adapter_state.py::test_loras_the_caller_disabled_stay_disabled_after_a_run",),
    ),
    Mutation(
        "a run after disable_lora() applies none of its LoRAs",
        "masking.py",
        "        disabled = [module for module, *_, off in saved if off]",
        "        disabled = []",
        ("tests/test_pins_adapter_state.py::test_a_run_after_disable_lora_applies_its_loras_and_says_so",),
    ),
    # -- replay of a manifest whose LoRA changed ------------------------------------------------------
    Mutation(
        "replay forgets the manifest's LoRA hashes",
        "spec.py",
        '("words", "weight", "scope", "name", "sha256")',
        '("words", "weight", "scope", "name")',
        ("tests/test_pins_replay.py",),
    ),
    Mutation(
        "RunSpec.check compares a LoRA file's hash with itself",
        "spec.py",
        "                if found != lora.sha256:",
        "                if found != found:",
        ("tests/test_pins_replay.py",),
    ),
    Mutation(
        "the run service compares the kept adapter's hash with itself",
        "runner.py",
        "if lora.sha256 is not None and lora.sha256 != kept.subject.sha256:",
        "if lora.sha256 is not None and kept.subject.sha256 != kept.subject.sha256:",
        ("tests/test_pins_replay.py",),
    ),
    # -- round three: the web page's visitor boundary, and what preflight catches ---------------------
    Mutation(
        "the page takes a file value naming any path as an upload",
        "workspace.py",
        "if not self.received(path) and path not in self.examples:",
        "if False and not self.received(path) and path not in self.examples:",
        ("tests/test_workspace.py",),
    ),
    Mutation(
        "a page served beyond this machine takes typed server paths",
        "workspace.py",
        "if typed and not self.local_paths:",
        "if False:",
        ("tests/test_workspace.py",),
    ),
    Mutation(
        "the page's model choice takes any name",
        "workspace.py",
        "if name in self.models or (self.local_paths and name):",
        "if name:",
        ("tests/test_workspace.py",),
    ),
    Mutation(
        "a page run's manifest keeps server paths",
        "workspace.py",
        "write_outputs(result.output, paths, overwrite=False, portable=True)",
        "write_outputs(result.output, paths, overwrite=False, portable=False)",
        ("tests/test_workspace.py",),
    ),
    Mutation(
        "a bundled embedding for a special token is taken",
        "preflight.py",
        "            if placeholder in specials:",
        "            if False:",
        ("tests/test_preflight.py",),
    ),
    Mutation(
        "a background word that is a subject's word is taken",
        "preflight.py",
        "            if clash is not None:",
        "            if False:",
        ("tests/test_preflight.py",),
    ),
    Mutation(
        "two subjects read as the same tokens are taken",
        "preflight.py",
        "            if other != subject.name:",
        "            if False:",
        ("tests/test_preflight.py",),
    ),
    Mutation(
        "a replay does not compare the model files it recorded",
        "spec.py",
        "            if cached_sha256(path) != digest:",
        "            if False:",
        ("tests/test_preflight.py",),
    ),
    Mutation(
        "a replay of an in-memory model does not compare its weights",
        "runner.py",
        "            if spec.recorded_model:",
        "            if False:",
        ("tests/test_preflight.py",),
    ),
    Mutation(
        "user masks from the mask step act from the first step",
        "methods.py",
        "from_step=context.settings.resolved_mask_step if late else 0)",
        "from_step=0)",
        ("tests/test_pipeline.py::test_user_masks_from_the_mask_step_act_only_after_it",),
    ),
    # -- the fused op's coefficients in float32 -------------------------------------------------------
    Mutation(
        "fused op coefficients in the activations' dtype (bf16 0.8 = 0.80078)",
        "masking.py",
        "coefficients = _coefficient_values(plan, self._masks or {}, low.shape).to(low.device)",
        "coefficients = _coefficient_values(plan, self._masks or {}, low.shape).to(low.device, low.dtype)",
        ("tests/test_pins_fused_dtype.py",),
    ),
    Mutation(
        "fused op scalings made in the LoRA weights' dtype",
        "masking.py",
        "[torch.full((layer.lora_A[a].weight.shape[0],), float(layer.scaling[a])) for a in adapters]",
        "[torch.full((layer.lora_A[a].weight.shape[0],), float(layer.scaling[a]), dtype=layer.lora_A[a].weight.dtype) for a in adapters]",
        ("tests/test_pins_fused_dtype.py",),
    ),
    # -- Z-Image and FLUX.2 [klein] -----------------------------------------------------------------------
    Mutation(
        "Z-Image's joint sequence declared text first",
        "backends/zimage.py",
        'JOINT: TokenLayout = ("image", "text")',
        'JOINT: TokenLayout = ("text", "image")',
        ("tests/test_zimage.py::test_token_layout_of_zimage_layers_follows_the_model",),
    ),
    Mutation(
        "FLUX.2's single-stream sequence declared image first",
        "backends/flux2.py",
        'JOINT: TokenLayout = ("text", "image")',
        'JOINT: TokenLayout = ("image", "text")',
        ("tests/test_flux2.py::test_token_layout_of_flux2_layers_follows_the_model",),
    ),
    Mutation(
        "image padding tokens take the LoRA at full strength",
        "masking.py",
        "return torch.cat([self.image, share.expand(-1, padding)], dim=1)",
        "return torch.cat([self.image, torch.ones_like(share).expand(-1, padding)], dim=1)",
        ("tests/test_backend_contract.py::test_each_lora_acts_only_inside_its_own_mask_in_every_layer",),
    ),
    Mutation(
        "a batch's text padding read as a short prompt's own text in stage 1",
        "backends/base.py",
        'if name.endswith("_text") and length is not None:',
        'if name.endswith("_text") and length is None:',
        ("tests/test_zimage.py::test_in_a_batch_a_short_prompt_reads_only_its_own_text",),
    ),
    Mutation(
        "activation words at their offsets in the bare prompt, not the templated one",
        "backends/qwen.py",
        "start, end = len(before), len(before) + len(text)",
        "start, end = 0, len(text)",
        ("tests/test_zimage.py::test_word_positions_are_those_of_the_templated_prompt",),
    ),
    Mutation(
        "FLUX.2's attention output read with the MLP columns",
        "backends/flux2.py",
        'result["o_img"] = store["o"][:, n_text:, : self.inner_dim]',
        'result["o_img"] = store["o"][:, n_text:, -self.inner_dim :]',
        ("tests/test_flux2.py::test_tap_matches_the_processor_queries_and_keys",),
    ),
    Mutation(
        "FLUX.1 and FLUX.2 feed-forward widths swapped",
        "lora.py",
        "return FLUX1_FAMILY if ratio == flux1 else FLUX2_FAMILY",
        "return FLUX2_FAMILY if ratio == flux1 else FLUX1_FAMILY",
        ("tests/test_flux2.py::test_flux_generations_are_told_apart_at_real_widths",),
    ),
    Mutation(
        "Z-Image's mask step the paper's 6 of 28",
        "backends/zimage.py",
        "paper_mask_step = (3, 12)",
        "paper_mask_step = (6, 28)",
        ("tests/test_zimage.py::test_default_tap_block_and_step_follow_the_authors_share",),
    ),
    Mutation(
        "inpainting keeps the step's latents outside the mask (init latents not put back)",
        "backends/base.py",
        "return (1 - keep.mask) * kept + keep.mask * state.latents",
        "return state.latents",
        ("tests/test_conditions.py::test_inpainting_keeps_the_init_image_outside_the_mask_and_cuts_the_subjects_to_it",),
    ),
    Mutation(
        "stage 1's subject masks not cut to the inpainting mask",
        "pipeline.py",
        "subject_masks = cut_to_region(subject_masks, region, context.grid)",
        "subject_masks = subject_masks",
        ("tests/test_conditions.py::test_inpainting_keeps_the_init_image_outside_the_mask_and_cuts_the_subjects_to_it",),
    ),
    Mutation(
        "a page's condition picture taken without Gradio's record of the upload",
        "workspace.py",
        "if not self.received(path):",
        "if False:",
        ("tests/test_conditions_cli.py::test_the_page_takes_pictures_and_its_downloaded_run_replays_from_itself",),
    ),
    Mutation(
        "the fused op ignores the masks on quantized layers (GGUF, bitsandbytes, torchao, fp8)",
        "masking.py",
        "coefficients = plan.coefficients if static else self._coefficients(plan, low)",
        "coefficients = plan.coefficients if static else (self._coefficients(plan, low) if type(layer.base_layer)"
        " is torch.nn.Linear and type(layer.base_layer.weight) in (torch.Tensor, torch.nn.Parameter) and"
        " layer.base_layer.weight.dtype.itemsize > 1 else plan.scales.to(low.device))",
        ("tests/test_quantized.py",),
    ),
    Mutation(
        "compiled blocks: the first step runs compiled (fused layers measure their shapes inside the graph)",
        "pipeline.py",
        "with eager_while(masker.static and (i == 0 or tap_here)):",
        "with eager_while(masker.static and tap_here):",
        ("tests/test_memory.py::test_a_compiled_freefuse_run_never_recompiles",),
    ),
    Mutation(
        "compiled blocks: a masks-free run (merge, LoRAs off) writes mask buffers",
        "masking.py",
        "if not masks and not self._plans:",
        "if False:",
        ("tests/test_memory.py::test_compiled_blocks_run_merge_and_the_lora_free_base",),
    ),
    Mutation(
        "--compile with --quantize fp8 let through (refused only with an offload)",
        "memory.py",
        'if options.quantize == "fp8":',
        'if options.quantize == "fp8" and options.offload != "none":',
        ("tests/test_memory.py::test_combinations_that_cannot_work_are_refused_before_loading",),
    ),
    Mutation(
        "the negative pass reads the prompt's reference image instead of a black one",
        "backends/flux.py",
        "                [black] * count, None, self.device, negative.prompt_embeds.shape[0]",
        "                [reference] * count, None, self.device, negative.prompt_embeds.shape[0]",
        ("tests/test_ip_adapter.py::test_true_cfg_reads_a_black_negative_reference_as_flux_pipeline_does",),
    ),
    Mutation(
        "the IP-Adapter scale of a run is left set after it",
        "backends/flux.py",
        "                processor.scale = scales",
        "                pass",
        ("tests/test_ip_adapter.py::test_the_scale_is_the_runs_and_the_callers_comes_back",),
    ),
    Mutation(
        "a replay's model check counts the IP-Adapter's image encoder as the model's",
        "manifest.py",
        "        if name in IP_ADAPTER_COMPONENTS and ip_adapter_loaded(denoiser):",
        "        if False:",
        (
            "tests/test_ip_adapter.py::test_cli_runs_an_ip_adapter_records_it_and_replays_it_byte_for_byte",
            "tests/test_ip_adapter.py::test_the_model_record_leaves_the_ip_adapter_out",
        ),
    ),
    Mutation(
        "an in-memory model's weight hash counts the IP-Adapter's projections",
        "manifest.py",
        "        and not (ip_adapter and (\".processor.\" in key or key.startswith(\"encoder_hid_proj.\")))",
        "        and True",
        ("tests/test_ip_adapter.py::test_the_model_record_leaves_the_ip_adapter_out",),
    ),
    Mutation(
        "a run service keeps the previous IP-Adapter for a run without one",
        "runner.py",
        "                pipeline.unload_ip_adapter()  # also lets the image encoder go",
        "                pass",
        ("tests/test_ip_adapter.py::test_one_run_service_loads_switches_and_lets_go_of_ip_adapters",),
    ),
    Mutation(
        "Redux image tokens put before the prompt's (the subjects' words would move)",
        "backends/flux.py",
        "joined = torch.cat([embeds, image_tokens.expand(batch, -1, -1).to(embeds.dtype)], dim=1)",
        "joined = torch.cat([image_tokens.expand(batch, -1, -1).to(embeds.dtype), embeds], dim=1)",
        ("tests/test_redux.py",),
    ),
    Mutation(
        "the Redux scale left out",
        "backends/flux.py",
        "conditioning.prompt_embeds = joined * scale[:, None, None]",
        "conditioning.prompt_embeds = joined",
        ("tests/test_redux.py",),
    ),
    Mutation(
        "Z-Image inpainting keeps the init image clean outside the mask instead of noised to the next step",
        "backends/zimage.py",
        "        return self.pipeline.scheduler.scale_noise(clean, timestep, noise)",
        "        return clean",
        ("tests/test_zimage.py::test_img2img_and_inpainting_merge_are_the_zimage_pipelines",),
    ),
    Mutation(
        "img2img denoises every step (strength's schedule ignored; the shared schedule, read on Z-Image)",
        "backends/base.py",
        "        return timesteps, sigmas[len(sigmas) - 1 - len(timesteps) :]",
        "        return self.timesteps(num_inference_steps, height, width)",
        ("tests/test_zimage.py::test_img2img_and_inpainting_merge_are_the_zimage_pipelines",),
    ),
    Mutation(
        "FLUX.1 Fill reads blank masked-picture inputs",
        "backends/flux_fill.py",
        "joined = Latents(torch.cat((latents.latents, fill.latents), dim=2), latents.positions)",
        "joined = Latents(torch.cat((latents.latents, torch.zeros_like(fill.latents)), dim=2), latents.positions)",
        ("tests/test_flux_fill.py",),
    ),
    Mutation(
        "FLUX.1 Fill's masked picture keeps the region it repaints",
        "backends/flux_fill.py",
        "masked = (init * (1 - region)).to(device=self.device, dtype=dtype)",
        "masked = init.to(device=self.device, dtype=dtype)",
        ("tests/test_flux_fill.py",),
    ),
    Mutation(
        "Z-Image ControlNet's scale ignored",
        "backends/zimage.py",
        "images, time, embeds, control.image, conditioning_scale=control.scale",
        "images, time, embeds, control.image, conditioning_scale=1.0",
        ("tests/test_zimage.py::test_controlnet_merge_is_the_zimage_controlnet_pipeline",),
    ),
)


@dataclass
class Outcome:
    failed: bool
    test: str
    seconds: float
    returncode: int
    tail: str


def test_env() -> dict[str, str]:
    """The subprocess's environment: this checkout's src/ first on PYTHONPATH, one thread per BLAS."""
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def run_pytest(tests: list[str], timeout: int, stop_first: bool = True) -> Outcome:
    """Run pytest on `tests`; whether it failed and the first failing test."""
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *(["-x"] if stop_first else []),
        *tests,
    ]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=test_env(), check=False
        )
    except subprocess.TimeoutExpired:
        return Outcome(True, f"(timed out after {timeout} s)", time.perf_counter() - started, -1, "")
    seconds = time.perf_counter() - started
    failed = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.MULTILINE)
    errors = re.findall(r"^ERROR (\S+)", done.stdout, flags=re.MULTILINE)
    first = (failed or errors or ["(no test id: see pytest output)"])[0]
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return Outcome(done.returncode != 0, first, seconds, done.returncode, tail)


def problem_of(mutation: Mutation, own_tests: bool = True) -> str | None:
    """Why the entry cannot be applied as written (it is stale), or None when it applies."""
    path = SRC / mutation.file
    if not path.is_file():
        return f"its file src/freefuse/{mutation.file} does not exist"
    source = path.read_text()
    count = source.count(mutation.old)
    if count != 1:
        return f"its `old` text occurs {count} times in {mutation.file} (needs exactly 1)"
    try:
        compile(source.replace(mutation.old, mutation.new), str(path), "exec")
    except SyntaxError as error:
        return f"the mutated {mutation.file} does not compile ({error.msg}, line {error.lineno})"
    missing = [test for test in mutation.tests if own_tests and not (ROOT / test.split("::")[0]).exists()]
    if missing:
        return f"its test path {missing[0]} does not exist"
    return None


def tests_for(mutation: Mutation, args: argparse.Namespace) -> list[str]:
    if args.tests:
        return list(args.tests)
    if args.whole_suite or not mutation.tests:
        return ["tests"]
    return list(mutation.tests)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="run the entries whose name contains this text")
    parser.add_argument(
        "--list", action="store_true", help="list the entries and whether each applies; run nothing"
    )
    parser.add_argument("--whole-suite", action="store_true", help="run the whole suite for each entry")
    parser.add_argument(
        "--tests", nargs="+", default=None, help="pytest paths for every entry instead of its own"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the unmutated run of the chosen tests"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    args = parser.parse_args()

    chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    if not chosen:
        parser.error(f"no mutation name contains {args.only!r}")
    problems = {m.name: problem_of(m, own_tests=args.tests is None) for m in chosen}
    stale = [m for m in chosen if problems[m.name]]

    if args.list:
        for index, mutation in enumerate(chosen, 1):
            state = f"STALE: {problems[mutation.name]}" if problems[mutation.name] else "applies"
            print(f"{index:2d}. {mutation.name}  [{mutation.file}]  {state}")
            print(f"      tests: {' '.join(tests_for(mutation, args))}")
        print(f"{len(chosen) - len(stale)} of {len(chosen)} entries apply, {len(stale)} stale")
        return EXIT_STALE if stale else 0

    for mutation in stale:
        print(f"[STALE]    {mutation.name}: {problems[mutation.name]}")
    runnable = [m for m in chosen if not problems[m.name]]

    started = time.perf_counter()
    if runnable and not args.no_baseline:
        paths = list(dict.fromkeys(path for m in runnable for path in tests_for(m, args)))
        baseline = run_pytest(paths, args.timeout, stop_first=False)
        if baseline.returncode in (4, 5):  # pytest: usage error / no tests collected
            print(
                f"[STALE]    a test path names no test (pytest exit {baseline.returncode}):\n{baseline.tail}"
            )
            return EXIT_STALE
        if baseline.failed:
            print(f"[baseline] the tests fail without any mutation: {baseline.test}\n{baseline.tail}")
            return EXIT_BASELINE
        print(f"[baseline] {len(paths)} test paths pass unmutated ({baseline.seconds:.0f} s)")

    survivors = []
    for mutation in runnable:
        path = SRC / mutation.file
        original = path.read_text()
        try:
            path.write_text(original.replace(mutation.old, mutation.new))
            outcome = run_pytest(tests_for(mutation, args), args.timeout)
        finally:
            path.write_text(original)
        if outcome.returncode in (4, 5):  # pytest: usage error / no tests collected
            last = (outcome.tail.splitlines() or ["no output"])[-1]
            print(f"[STALE]    {mutation.name}: pytest found no tests to run ({last})")
            stale.append(mutation)
        elif outcome.failed:
            print(f"[caught]   {mutation.name}: {outcome.test} ({outcome.seconds:.0f} s)")
        else:
            print(f"[SURVIVED] {mutation.name} ({outcome.seconds:.0f} s)")
            survivors.append(mutation.name)

    ran = len(chosen) - len(stale)
    print(
        f"{ran - len(survivors)} of {ran} mutations caught, {len(survivors)} survived, {len(stale)} stale "
        f"({time.perf_counter() - started:.0f} s)"
    )
    if stale:
        print(
            "Stale entries were not run: their `old` text no longer matches the source exactly once (or a "
            "test path is gone). Update each entry to the line's current form, then run it again."
        )
        return EXIT_STALE
    return EXIT_SURVIVED if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
