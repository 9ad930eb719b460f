"""FP8 (e4m3) weights and activations for the language model's linear layers (``--quantization fp8``).

Why this shape: on Hopper the FP8 tensor cores run twice the BF16 rate, and the decoder's seven
linear layers per block carry nearly all of a reranker's FLOPs. Scales are per output channel for
the weights (computed once at load) and per token for the activations (computed on the fly, on the
device, no host sync), the scheme that keeps a ranking close to BF16's; the product runs in
``torch._scaled_mm`` (cuBLASLt FP8 on CUDA; torch's reference kernel on the CPU, which is how the
tests check it). Left in their own dtype: embeddings, the final norm, the FP32 score head, the
vision tower (memory-bound, and its patches are not where the FLOPs are) and every norm.

Memory: each replaced weight is stored as float8 (1 byte) plus a float32 scale per row, and the
original BF16 tensor is released, so the 7B LLM's linear weights take about half the memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FP8_DTYPE", "Fp8Linear", "fp8_supported", "quantize_fp8"]

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether FP8 matmuls run on ``device``, and why not. CUDA needs compute capability >= 8.9
    (Ada/Hopper); the CPU runs torch's reference kernel (tests only: slow)."""
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no torch._scaled_mm"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return False, f"FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is {cap[0]}.{cap[1]}"
        return True, ""
    if device.type == "cpu":
        return True, ""
    return False, f"no FP8 matmul on {device.type}"


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W in e4m3 (per-row scales) and x quantised per token on the fly."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features = int(w.shape[1])
        self.out_features = int(w.shape[0])
        self.out_dtype = w.dtype
        wf = w.float()
        scale = (wf.abs().amax(dim=1, keepdim=True) / _FP8_MAX).clamp(min=1e-12)  # (N, 1)
        self.register_buffer("weight_fp8", (wf / scale).to(FP8_DTYPE), persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # (1, N)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        # cuBLASLt's FP8 GEMM wants M a multiple of 16 on CUDA; pad the token dim there.
        self._pad_m = 16 if w.device.type == "cuda" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        pad = (-m) % self._pad_m
        if pad:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
        xf = x2.float()
        sx = (xf.abs().amax(dim=1, keepdim=True) / _FP8_MAX).clamp(min=1e-12)  # (M, 1)
        xq = (xf / sx).to(FP8_DTYPE)
        out_dtype = self.out_dtype if x.device.type == "cuda" else torch.float32
        y = torch._scaled_mm(
            xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale, out_dtype=out_dtype
        )
        if pad:
            y = y[:m]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


def quantize_fp8(language_model: Any) -> int:
    """Replace the decoder layers' attention and MLP linears of ``language_model`` by :class:`Fp8Linear`
    in place; returns how many were replaced. The original weights are released."""
    count = 0
    for layer in language_model.layers:
        for parent, names in ((layer.self_attn, _LINEARS), (layer.mlp, _MLP)):
            for name in names:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, Fp8Linear(lin))
                    count += 1
    if count and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count
