"""FLUX.1 single-file checkpoints: a transformer-only file in the original (BFL) layout, the rest of
the pipeline from --base-model, as FLUX fine-tunes are shipped.

diffusers' BFL converter assumes FLUX.1's width (3072), so the transformer here has that width
with one block of each kind (0.5B parameters, built in bfloat16); the other parts are tiny. SDXL's
single files are tested in `test_sdxl.py`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from freefuse.backends.flux import FluxBackend
from freefuse.models import ModelLoadError, architecture_of, load_pipeline, model_source
from freefuse.testing import flux_single_file_state_dict, tiny_flux_pipeline

FLUX_WIDTH = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "axes_dims_rope": (16, 56, 56),
}


@pytest.mark.slow
def test_a_flux_transformer_file_loads_with_the_rest_from_the_base_model(tmp_path) -> None:
    tiny = tiny_flux_pipeline(seed=0)
    base = tmp_path / "base"
    tiny.save_pretrained(base)
    wide = tiny_flux_pipeline(seed=1, transformer_config=FLUX_WIDTH, dtype=torch.bfloat16).transformer
    # The base folder gives the transformer's config only; its weights come from the file.
    shutil.rmtree(base / "transformer")
    wide.save_config(base / "transformer")
    checkpoint = tmp_path / "flux-finetune.safetensors"
    save_file(flux_single_file_state_dict(wide), str(checkpoint))

    assert architecture_of(str(checkpoint)) is FluxBackend.architecture
    loaded = load_pipeline(str(checkpoint), base=str(base), dtype="bfloat16")
    assert type(loaded).__name__ == "FluxPipeline"
    theirs = loaded.transformer.state_dict()
    for key, value in wide.state_dict().items():
        assert torch.equal(theirs[key], value), key
    for name in ("vae", "text_encoder", "text_encoder_2"):
        theirs = getattr(loaded, name).state_dict()
        for key, value in getattr(tiny, name).state_dict().items():
            assert torch.equal(theirs[key].float(), value.to(torch.bfloat16).float()), (name, key)
    assert model_source(str(checkpoint), str(base)).base_model == str(base.resolve())


def test_a_base_model_of_another_architecture_is_a_clear_error(tmp_path) -> None:
    from freefuse.testing import tiny_sdxl_pipeline

    folder = tmp_path / "sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    checkpoint = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(9, 3)}, str(checkpoint))
    with pytest.raises(ModelLoadError, match="--base-model"):
        load_pipeline(str(checkpoint), base=str(folder))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_flux_single_file_defaults_and_refusals(tmp_path) -> None:
    from freefuse.models import base_model_for

    dev, schnell = tmp_path / "dev.safetensors", tmp_path / "schnell.safetensors"
    save_file({"double_blocks.0.x": torch.zeros(1), "guidance_in.in_layer.weight": torch.zeros(1)}, str(dev))
    save_file({"double_blocks.0.x": torch.zeros(1)}, str(schnell))
    assert base_model_for(str(dev), None) == "black-forest-labs/FLUX.1-dev"
    assert base_model_for(str(schnell), None) == "black-forest-labs/FLUX.1-schnell"
    assert base_model_for(str(dev), "my/base") == "my/base"
    scaled = tmp_path / "scaled.safetensors"
    save_file({"double_blocks.0.x": torch.zeros(1), "scaled_fp8": torch.zeros(1)}, str(scaled))
    with pytest.raises(ModelLoadError, match="scaled fp8"):
        load_pipeline(str(scaled), base=str(tmp_path))
