"""Shared fixtures: tiny in-memory models (no network, no hub) and quiet progress bars."""

from __future__ import annotations

import os

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


@pytest.fixture
def tiny_pipe():
    """A fresh tiny FLUX pipeline (seed 0) for tests that add adapters or otherwise change it."""
    from freefuse.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
