"""The fused LoRA op keeps its coefficients (scaling x mask) in float32, as PEFT's scaling is a
Python float: in bfloat16 a weight of 0.8 would be 0.80078125, every delta 0.1 % too strong.

One PEFT `lora.Linear` in bfloat16 with a zero base layer, so the layer's output IS the LoRA delta.
Against the exact delta `0.8 * B(A(x))` (float64 from the same bf16 weights), the least-squares
gain of the output is 1 up to rounding noise (measured within 1e-4 over several inputs); a bf16
coefficient gives 1 + 9.8e-4. PEFT's own path, the reference, is held to the same bound.
"""

from __future__ import annotations

import pytest
import torch

from freefuse.masking import AdapterMask, LoraMasker

WEIGHT = 0.8
RANK = 8


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def bf16_lora_net() -> Net:
    from peft import LoraConfig, inject_adapter_in_model

    net = inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["proj"]), Net(), adapter_name="alice"
    )
    layer = net.proj
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.lora_A["alice"].weight.copy_(torch.randn(RANK, 64, generator=generator) / 8)
        layer.lora_B["alice"].weight.copy_(torch.randn(96, RANK, generator=generator))
    layer.set_scale("alice", WEIGHT)  # scaling = weight * alpha / r = 0.8, a Python float
    assert layer.scaling["alice"] == WEIGHT
    return net.to(torch.bfloat16).eval()


def gain(output: torch.Tensor, exact: torch.Tensor) -> float:
    """The factor c minimising |output - c * exact|."""
    output = output.double()
    return float((output * exact).sum() / (exact * exact).sum())


@pytest.mark.parametrize("masked", [False, True], ids=["no-masks", "all-ones-mask"])
def test_a_bf16_delta_at_weight_0_8_is_peft_float_scaling(masked: bool) -> None:
    net = bf16_lora_net()
    x = torch.randn(8, 256, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    layer = net.proj
    down, up = (
        layer.lora_A["alice"].weight.detach().double(),
        layer.lora_B["alice"].weight.detach().double(),
    )
    exact = WEIGHT * (x.double() @ down.T @ up.T)
    with torch.no_grad():
        peft = net(x)
        masker = LoraMasker(net, ["alice"], lambda name: ("image",), op="fused")
        with masker.installed():
            if masked:
                masks = {"alice": AdapterMask(image=torch.ones(8, 256), text=torch.ones(8, 0), grid=(16, 16))}
                masker.set_masks(masks)
            assert "forward" in layer.__dict__  # the fused op took the layer
            fused = net(x)
    assert fused.dtype == peft.dtype == torch.bfloat16
    assert abs(gain(peft, exact) - 1) < 4e-4, gain(peft, exact)
    assert abs(gain(fused, exact) - 1) < 4e-4, gain(fused, exact)
