"""Shared fixtures: tiny in-memory models (no network, no hub) and quiet progress bars."""

from __future__ import annotations

import os
import shutil

# One torch/BLAS thread per test process: on a small, shared machine the threads of several
# processes (tests start CLI subprocesses and accelerate workers) otherwise fight for the cores
# and a run that takes two minutes takes forty. Set before torch is imported; children inherit it.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """Built once: a tiny FLUX pipeline saved as a model folder (`model/`) and three LoRA files as a
    user would have them (`alice.safetensors` names its trigger word "Alice" in its metadata;
    `bob` and `carol` name none). Tests take a copy (`assets`), never this folder."""
    from freefuse.testing import random_lora, tiny_flux_pipeline

    root = tmp_path_factory.mktemp("saved-tiny-model")
    pipe = tiny_flux_pipeline(seed=0)
    pipe.save_pretrained(root / "model")
    alice = {"modelspec.trigger_phrase": "Alice"}
    random_lora(pipe, "alice", seed=1, path=root / "alice.safetensors", metadata=alice)
    random_lora(pipe, "bob", seed=2, path=root / "bob.safetensors")
    random_lora(pipe, "carol", seed=3, path=root / "carol.safetensors")
    return root


@pytest.fixture(scope="module")
def assets(saved_tiny_model, tmp_path_factory):
    """A test module's own copy of the saved tiny model and its LoRA files (see `saved_tiny_model`)."""
    root = tmp_path_factory.mktemp("assets")
    for item in saved_tiny_model.iterdir():
        copy = shutil.copytree if item.is_dir() else shutil.copy2
        copy(item, root / item.name)
    return root


@pytest.fixture
def tiny_pipe():
    """A fresh tiny FLUX pipeline (seed 0) for tests that add adapters or otherwise change it."""
    from freefuse.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
