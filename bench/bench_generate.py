"""FreeFuse against the base model and plain multi-LoRA: time and peak-memory ratios from one run.

    python bench/bench_generate.py                       # mid-size random FLUX-shaped model, CPU
    python bench/bench_generate.py --preset flux --device cuda   # FLUX.1 shapes, 1024², 28 steps, bf16
    python bench/bench_generate.py --bases plain fp8 int8 gguf-Q4_0 nf4 --offload none model --compile
                                                        # the small-GPU options, each base apart

Runs, same prompt, seed, steps and two random rank-16 LoRAs:
- base: the LoRAs switched off (`pipeline.disable_lora()`);
- merge, fused: the LoRAs fused into the weights (`pipeline.fuse_lora()`), what a one-off user does;
- merge, PEFT: diffusers' unfused joint adapters (`method="merge"`);
- FreeFuse: `method="freefuse"` with the fused LoRA op (one op per layer, masks in rank space);
- FreeFuse, PEFT op: the same with PEFT's per-adapter path and a mask hook per adapter;
- FreeFuse + attention bias: the same with stage 2's attention bias (`attention_bias=5`, every
  block; an additive mask per forward pass, which SDPA may answer with another kernel);
- stage 1 alone: `FreeFuse.masks` (steps up to the mask step, the capture and the masks).
Time: the runs alternate (`--repeats` rounds after one warm-up round) and medians are compared.
Memory: on CUDA the allocator's peak, reset before each run; on CPU the peak RSS, each run in a fresh process.
Random weights: the numbers measure cost, not image quality.

With `--bases` / `--offload` / `--compile`, the options table instead: per quantized base
(`freefuse.testing.quantize_denoiser`: GGUF types, bitsandbytes NF4, torchao int8, fp8 storage),
offload mode and compile, the base model, merge (PEFT) and FreeFuse on that same base, each
model built in its own process; compiled runs report the first run's compile time (a fresh
inductor cache per option: a cold compile) apart from the steady state (medians of the later runs).
`--preset small` keeps the whole CPU table to minutes; `--compile only` leaves out the uncompiled rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

PRESETS = {
    # 44M-parameter transformer: 6 heads x 64, 4 double + 8 single blocks, 1024 image tokens at 512².
    # The VAE is sized so that one decode costs what FLUX.1's does relative to a whole run: 0.45% of
    # 12 steps here vs 0.50% of 28 steps for FLUX.1 at 1024² (FLOPs counted with torch's
    # FlopCounterMode on meta tensors); a wider VAE would make the stage-1 preview look dearer
    # than it is on the real model.
    "mid": {
        "transformer": {
            "in_channels": 64,
            "num_layers": 4,
            "num_single_layers": 8,
            "attention_head_dim": 64,
            "num_attention_heads": 6,
            "joint_attention_dim": 256,
            "pooled_projection_dim": 128,
            "axes_dims_rope": (8, 28, 28),
        },
        "vae": {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "latent_channels": 16},
        "size": 512,
        "steps": 12,
        "text_tokens": 128,
        "dtype": "float32",
    },
    # The options table on a CPU (`--bases`/`--offload`/`--compile`): 2 double + 4 single blocks,
    # 4 heads x 64, 256 image tokens at 256², 6 steps; small enough for every base, offload and
    # compile combination in a few minutes, big enough that the blocks dominate a run.
    "small": {
        "transformer": {
            "in_channels": 64,
            "num_layers": 2,
            "num_single_layers": 4,
            "attention_head_dim": 64,
            "num_attention_heads": 4,
            "joint_attention_dim": 256,
            "pooled_projection_dim": 128,
            "axes_dims_rope": (8, 28, 28),
        },
        "vae": {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "latent_channels": 16},
        "size": 256,
        "steps": 6,
        "text_tokens": 64,
        "dtype": "float32",
    },
    # FLUX.1-dev transformer and VAE shapes (12B parameters), small random text encoders.
    "flux": {
        "transformer": {
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "axes_dims_rope": (16, 56, 56),
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "latent_channels": 16,
            "mid_block_add_attention": True,
        },
        "size": 1024,
        "steps": 28,
        "text_tokens": 512,
        "dtype": "bfloat16",
    },
}
PROMPT = "Alice hugging Bob in the snow, a photo"


def build(preset: dict, device: str, base: str = "plain", offload: str = "none", compiled: bool = False):
    """The random model with two rank-16 LoRAs: on `base` ("plain" or a `QUANTIZED_BASES` kind),
    offloaded (`--offload` name) and with compiled blocks as asked."""
    from freefuse import FreeFuse
    from freefuse.memory import MemoryOptions, compile_blocks
    from freefuse.memory import offload as apply_offload
    from freefuse.testing import quantize_denoiser, tiny_flux_pipeline, typical_lora_state_dict

    dtype = getattr(torch, preset["dtype"])
    pipe = tiny_flux_pipeline(
        seed=0, transformer_config=preset["transformer"], vae_config=preset["vae"], dtype=dtype, device=device
    )
    pipe.set_progress_bar_config(disable=True)
    states = [typical_lora_state_dict(pipe, rank=16, seed=seed, scale=0.3) for seed in (1, 2)]
    if base != "plain":
        # Random GGUF blocks on a GPU: quantizing 12B weights with numpy would outlast the benchmark.
        quantize_denoiser(pipe, base, random_blocks=device.startswith("cuda"))
    freefuse = FreeFuse(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (name, word), state in zip((("alice", "Alice"), ("bob", "Bob")), states, strict=True):
            pipe.load_lora_weights(state, adapter_name=name)
            freefuse.use_adapter(name, words=[word])
    if offload != "none":
        apply_offload(pipe, MemoryOptions(offload=offload, quantize="int8" if base == "int8" else None), torch.device(device))
    if compiled:
        compile_blocks(freefuse.backend.denoiser)
    return freefuse


# name -> (how the pipeline is prepared, FreeFuse call settings)
RUNS = {
    "base": ("lora off", {"method": "merge"}),
    "merge, fused": ("fuse", {"method": "merge"}),
    "merge, PEFT": ("", {"method": "merge"}),
    "FreeFuse": ("", {"method": "freefuse", "lora_op": "fused", "attention_bias": 0}),
    "FreeFuse + attention bias": ("", {"method": "freefuse", "lora_op": "fused", "attention_bias": 5}),
    "FreeFuse, PEFT op": ("", {"method": "freefuse", "lora_op": "peft", "attention_bias": 0}),
    "stage 1 alone": ("masks", {"method": "freefuse", "lora_op": "fused"}),
    "stage 1, latent preview": ("masks", {"method": "freefuse", "lora_op": "fused", "preview": "latent"}),
}
# Stage 1's own wall time (x0 preview and masks, after the capture step), per run: FreeFuse's timings.
STAGE1_SECONDS: dict[str, list[float]] = {}
# The process's CPU time of each run: on a CPU shared with other work, a fairer cost than wall time.
CPU_SECONDS: dict[str, list[float]] = {}


def run_once(freefuse, preset: dict, run: str, preview: str) -> float:
    prepare, settings = RUNS[run]
    pipe = freefuse.pipeline
    device = freefuse.backend.device
    if prepare == "lora off":
        pipe.disable_lora()
    elif prepare == "fuse":
        pipe.set_adapters(["alice", "bob"])
        pipe.fuse_lora(adapter_names=["alice", "bob"])
    call = freefuse.masks if prepare == "masks" else freefuse
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call(
                PROMPT,
                seed=0,
                height=preset["size"],
                width=preset["size"],
                num_inference_steps=preset["steps"],
                max_sequence_length=preset["text_tokens"],
                progress=False,
                **{"preview": preview, **settings},
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        CPU_SECONDS.setdefault(run, []).append(time.process_time() - start_cpu)
        timings = result.manifest.get("timings", {})
        if "stage1_s" in timings:
            STAGE1_SECONDS.setdefault(run, []).append(timings["stage1_s"])
        return seconds
    finally:
        if prepare == "lora off":
            pipe.enable_lora()
        elif prepare == "fuse":
            pipe.unfuse_lora()


def memory_worker(preset_name: str, run: str, preview: str, device: str, option: list[str] | None = None) -> dict:
    preset = PRESETS[preset_name]
    base, offload, compiled = option or ("plain", "none", "0")
    freefuse = build(preset, device, base, offload, compiled == "1")
    if compiled == "1":
        run_once(freefuse, preset, run, preview)  # compiles
    if device.startswith("cuda"):
        run_once(freefuse, preset, run, preview)  # warm-up (cuDNN/cuBLAS workspaces)
        torch.cuda.reset_peak_memory_stats()
        run_once(freefuse, preset, run, preview)
        return {"peak_bytes": torch.cuda.max_memory_allocated()}
    run_once(freefuse, preset, run, preview)
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure_memory(preset: str, run: str, preview: str, device: str, option: list[str] | None = None) -> int:
    command = [sys.executable, __file__, "--preset", preset, "--device", device, "--memory-worker", run]
    command += ["--option", *option] if option else []
    done = subprocess.run([*command, "--preview", preview], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory worker failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def profile(freefuse, preset: dict, run: str, preview: str, rows: int = 15) -> None:
    """Where one run's time goes: the ops with the most self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if freefuse.backend.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as profiler:
        run_once(freefuse, preset, run, preview)
    key = "self_cuda_time_total" if ProfilerActivity.CUDA in activities else "self_cpu_time_total"
    print(f"\nprofile of {run!r}, sorted by {key}:")
    print(profiler.key_averages().table(sort_by=key, row_limit=rows))


def attention_cost(preset: dict, device: str, repeats: int = 20) -> str:
    """One joint attention at the preset's shapes (text + image tokens, one image), SDPA without and
    with a float `[1, 1, S, S]` mask (what the attention bias hands it): time, and on CUDA the
    allocator's peak above the inputs. Isolates the kernel's share of the bias's cost."""
    config = preset["transformer"]
    heads, dim = config["num_attention_heads"], config["attention_head_dim"]
    tokens = preset["text_tokens"] + (preset["size"] // 16) ** 2
    dtype = getattr(torch, preset["dtype"])
    q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=dtype) for _ in range(3))
    mask = torch.randn(1, 1, tokens, tokens, device=device, dtype=dtype)
    cuda = device.startswith("cuda")

    def timed(attn_mask) -> tuple[float, int]:
        attention = torch.nn.functional.scaled_dot_product_attention
        for _ in range(3):
            attention(q, k, v, attn_mask=attn_mask)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            attention(q, k, v, attn_mask=attn_mask)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        return seconds, (torch.cuda.max_memory_allocated() - base) if cuda else 0

    (plain, plain_peak), (masked, masked_peak) = timed(None), timed(mask)
    text = (
        f"one joint attention ({tokens} tokens, {heads} heads x {dim}, {preset['dtype']}): {plain * 1e3:.2f} ms, "
        f"with a float mask {masked * 1e3:.2f} ms (x{masked / plain:.2f}); the mask itself "
        f"{mask.numel() * mask.element_size() / (1 << 20):.1f} MiB"
    )
    if cuda:
        text += f"; working memory {plain_peak / (1 << 20):.1f} -> {masked_peak / (1 << 20):.1f} MiB"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preview", choices=["vae", "latent"], default="vae")
    parser.add_argument("--runs", nargs="*", choices=sorted(RUNS), default=list(RUNS))
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--attention-only", action="store_true", help="only the attention kernel with and without a mask")
    parser.add_argument("--memory-worker", choices=sorted(RUNS))
    parser.add_argument("--bases", nargs="*", default=[], help="plain and/or freefuse.testing.QUANTIZED_BASES kinds")
    parser.add_argument("--offload", nargs="*", default=[], choices=["none", "model", "sequential", "group"])
    parser.add_argument(
        "--compile",
        nargs="?",
        const="also",
        choices=["also", "only"],
        help="each option also with compiled blocks (`--compile only`: only compiled)",
    )
    parser.add_argument("--option", nargs=3, help=argparse.SUPPRESS)  # base, offload, compiled: for workers
    parser.add_argument("--options-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        nargs="*",
        choices=sorted(RUNS),
        default=[],
        help="print torch.profiler's top ops of these runs",
    )
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.preset, args.memory_worker, args.preview, args.device, args.option)))
        return
    if args.options_worker:
        print(json.dumps(options_worker(args)))
        return
    if args.bases or args.offload or args.compile:
        options_table(args)
        return

    preset = PRESETS[args.preset]
    torch.set_grad_enabled(False)
    if args.attention_only:
        print(attention_cost(preset, args.device))
        return
    freefuse = build(preset, args.device)
    params = sum(p.numel() for p in freefuse.backend.denoiser.parameters())
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"preset={args.preset} device={args.device} ({device_name}) transformer={params / 1e6:.0f}M params "
        f"size={preset['size']}² steps={preset['steps']} text_tokens={preset['text_tokens']} "
        f"dtype={preset['dtype']} preview={args.preview} threads={torch.get_num_threads()}"
    )
    times: dict[str, list[float]] = {run: [] for run in args.runs}
    cuda = args.device.startswith("cuda")
    cuda_peaks: dict[str, int] = {}
    for run in times:  # warm-up round
        run_once(freefuse, preset, run, args.preview)
    for _ in range(args.repeats):
        for run in times:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[run].append(run_once(freefuse, preset, run, args.preview))
            if cuda:
                cuda_peaks[run] = max(cuda_peaks.get(run, 0), torch.cuda.max_memory_allocated())
    for run in args.profile:
        profile(freefuse, preset, run, args.preview)
    del freefuse
    medians = {run: statistics.median(values) for run, values in times.items()}
    if args.no_memory:
        memory = {}
    elif cuda:
        # The allocator's peak resets per run, so one process measures every run (a worker per run
        # would rebuild the 12B model six times).
        memory = cuda_peaks
    else:  # peak RSS never goes down: each run in a fresh process
        memory = {run: measure_memory(args.preset, run, args.preview, args.device) for run in times}
    base, merge = medians.get("base"), medians.get("merge, PEFT")
    print(f"| run | time (median of {args.repeats}) | × base | × merge, PEFT | peak memory | × merge, PEFT |")
    print("|---|---|---|---|---|---|")
    for run, seconds in medians.items():
        over_base = f"{seconds / base:.3f}" if base else "-"
        over_merge = f"{seconds / merge:.3f}" if merge else "-"
        peak = memory.get(run)
        peak_text = f"{peak / (1 << 20):.0f} MiB" if peak else "-"
        peak_ratio = f"{peak / memory['merge, PEFT']:.3f}" if peak and memory.get("merge, PEFT") else "-"
        print(f"| {run} | {seconds:.2f} s | {over_base} | {over_merge} | {peak_text} | {peak_ratio} |")
    bias, plain = "FreeFuse + attention bias", "FreeFuse"
    if bias in medians and plain in medians:
        ratios = [f"time x{medians[bias] / medians[plain]:.3f}"]
        if memory.get(bias) and memory.get(plain):
            ratios.append(f"peak memory x{memory[bias] / memory[plain]:.3f} ({(memory[bias] - memory[plain]) / (1 << 20):+.0f} MiB)")
        print(f"attention bias (scale 5, every block) over FreeFuse without it: {', '.join(ratios)}")
        print(attention_cost(preset, args.device))
    for run, values in STAGE1_SECONDS.items():
        print(f"{run}: stage 1 after the capture step (x0 preview + masks) {statistics.median(values):.3f} s")


# The options table's runs: the base alone, merge and FreeFuse, all on the same (quantized) base.
OPTION_RUNS = ("base", "merge, PEFT", "FreeFuse")


def options_worker(args) -> dict:
    """One option in its own process: times (first run apart: compile) and, on CUDA, peaks."""
    base, offload, compiled = args.option
    preset = PRESETS[args.preset]
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    freefuse = build(preset, args.device, base, offload, compiled == "1")
    result = {"build_s": time.perf_counter() - started, "first": {}, "times": {}, "peaks": {}, "cpu": {}}
    cuda = args.device.startswith("cuda")
    for run in OPTION_RUNS:  # warm-up round; with compiled blocks it compiles them
        result["first"][run] = run_once(freefuse, preset, run, args.preview)
    for _ in range(args.repeats):
        for run in OPTION_RUNS:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result["times"].setdefault(run, []).append(run_once(freefuse, preset, run, args.preview))
            if cuda:
                result["peaks"][run] = max(result["peaks"].get(run, 0), torch.cuda.max_memory_allocated())
            result["cpu"].setdefault(run, []).append(CPU_SECONDS[run][-1])
    return result


def option_refusal(base: str, offload: str, compiled: str, device: str) -> str | None:
    """Why FreeFuse's CLI refuses this option before loading (`memory.check_memory_options`), or None.
    NF4 on a CPU is measured all the same (bitsandbytes' CPU kernels, through `quantize_denoiser`)
    though the CLI refuses it there (diffusers loads NF4 onto a GPU only)."""
    from freefuse.backends.flux import FluxBackend
    from freefuse.errors import SettingsError
    from freefuse.memory import MemoryOptions, SourceFacts, check_memory_options

    if offload != "none" and not device.startswith("cuda"):
        return "waits for a GPU (on a CPU there is nothing to offload to; FreeFuse refuses it)"
    quantize = base if base in ("nf4", "int8", "fp8") else None
    source = SourceFacts(gguf=base.removeprefix("gguf-")) if base.startswith("gguf-") else SourceFacts()
    try:
        check_memory_options(
            MemoryOptions(quantize=quantize, offload=offload, compile=compiled == "1"),
            FluxBackend.architecture,
            source,
        )
    except SettingsError as error:
        return f"refused: {str(error).split(';')[0]}"
    return None


def options_table(args) -> None:
    """Per base, offload and compile: the base, merge and FreeFuse, times and peak memory."""
    bases = args.bases or ["plain"]
    offloads = args.offload or ["none"]
    compiles = {"also": ["0", "1"], "only": ["1"], None: ["0"]}[args.compile]
    cuda = args.device.startswith("cuda")
    # Ratios of wall time on CUDA; of the process's CPU time on a CPU (shared machines: wall time
    # counts the other work too).
    clock = "wall" if cuda else "CPU time"
    print(
        f"| base | offload | compile | run | wall (median of {args.repeats}) | CPU time | × base ({clock}) | "
        "× merge | compile s | peak memory | × merge |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for option in ([b, o, c] for b in bases for o in offloads for c in compiles):
        refusal = option_refusal(*option, args.device)
        if refusal is not None:
            print(f"| {option[0]} | {option[1]} | {'yes' if option[2] == '1' else 'no'} | all | {refusal} |")
            continue
        command = [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--preview", args.preview]
        command += ["--repeats", str(args.repeats), "--options-worker", "--option", *option]
        # A fresh inductor cache for each compiled option: `compile s` is a cold compile, not a
        # read of what an earlier option or run left in the shared on-disk cache.
        with tempfile.TemporaryDirectory(prefix="freefuse-inductor-") as cache:
            environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
        if done.returncode != 0:
            print(f"| {' | '.join(option)} | failed: {done.stderr.strip().splitlines()[-1][:200]} |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        walls = {run: statistics.median(values) for run, values in result["times"].items()}
        cpus = {run: statistics.median(values) for run, values in result["cpu"].items()}
        medians = walls if cuda else cpus
        peaks = result["peaks"]
        if not args.device.startswith("cuda") and not args.no_memory:
            peaks = {run: measure_memory(args.preset, run, args.preview, args.device, option) for run in OPTION_RUNS}
        for run in OPTION_RUNS:
            compile_s = result["first"][run] - walls[run] if option[2] == "1" else None
            peak = peaks.get(run)
            cells = [
                *option[:2],
                "yes" if option[2] == "1" else "no",
                run,
                f"{walls[run]:.2f} s",
                f"{cpus[run]:.2f} s",
                f"{medians[run] / medians['base']:.3f}",
                f"{medians[run] / medians['merge, PEFT']:.3f}",
                f"{compile_s:.1f}" if compile_s is not None else "-",
                f"{peak / (1 << 20):.0f} MiB" if peak else "-",
                f"{peak / peaks['merge, PEFT']:.3f}" if peak and peaks.get("merge, PEFT") else "-",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
