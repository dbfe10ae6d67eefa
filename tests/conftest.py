"""Shared fixtures: tiny in-memory models (no network, no hub) and quiet progress bars."""

from __future__ import annotations

import os

import pytest

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
