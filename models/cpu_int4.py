"""The base's linears as 4-bit groups computed by PyTorch's own CPU kernel (quantization `int4`, the CPU default).

Why this format on a CPU (loadtests: `python -m loadtests.bench_decode_step --breakdown 1,16` before and after,
docs/decode-profile.md): PyTorch ships a weight-only int4 matmul for CPUs, `aten._weight_int4pack_mm_for_cpu`
(groups of 32 inputs, one scale and one offset per group, bf16 activations), which on this project's
machines runs a decode step's linears several times faster than bitsandbytes' CPU 4-bit path and gives a
row the same bits whatever the number of rows (the batch invariance the engine promises). bitsandbytes' NF4
stays the CUDA path.

Why no second rounding: a group of this kernel dequantizes as `(q - 8) * scale + zero` with q in 0..15,
which is exactly llama.cpp's Q4_1 block (`d * q + m`: scale = d, zero = m + 8d) and Q4_0 block
(`d * (q - 8)`): the embedded default's GGUF blocks are taken as they are, not dequantized and quantized
again. Other weights (a Hugging Face folder in 16 or 32 bits, GGUF tensors of other types) are quantized
once, from full precision, to the same asymmetric 4-bit groups. The scales are held in bf16 (the kernel
wants them in the activations' dtype): a relative error of at most 2^-9 on each, far below the
quantization step.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("loraplex.model")

GROUP = 32  # inputs per scale: GGUF's Q4_0 / Q4_1 block size
ACTIVATION_DTYPE = torch.bfloat16  # the kernel's fast path; int4 with float32 activations is a slow fallback


def supported() -> str | None:
    """None when the int4 CPU kernel runs here, else why not."""
    try:
        q = torch.zeros(16, GROUP, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales = torch.zeros(1, 16, 2, dtype=ACTIVATION_DTYPE)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, GROUP, dtype=ACTIVATION_DTYPE), packed, GROUP,
                                                   scales)
    except (RuntimeError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class Int4Linear(torch.nn.Module):
    """y = x @ W.T with W held as 4-bit groups (see the module's docstring); no bias (Llama has none)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """q: [out, in] integers 0..15; scale, zero: [out, in // GROUP] (float)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP or self.out_features % 16:
            raise ValueError(f"int4 needs in_features a multiple of {GROUP} and out_features of 16, not "
                             f"{self.in_features} and {self.out_features}")
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # the kernel's layout: [in // GROUP, out, (scale, zero)]
        self.register_buffer("scales_zeros", torch.stack((scale.float(), zero.float()), -1).transpose(0, 1)
                             .contiguous().to(ACTIVATION_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of a full-precision [out, in] weight: per group of GROUP inputs, 16 levels from its
    min to its max (what llama.cpp's Q4_1 does)."""
    out, inp = weight.shape
    groups = weight.float().reshape(out, inp // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = ((groups - low[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(out, inp)
    return q, scale, low + 8 * scale


def from_gguf_blocks(kind: str, raw: np.ndarray, shape: tuple[int, int]):
    """(q, scale, zero) of a GGUF Q4_0 / Q4_1 tensor (`raw`: its [out, blocks * bytes] uint8 data), taken as
    stored; None for other types (the caller dequantizes and calls `quantize`)."""
    out, inp = shape
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(out, inp // GROUP, -1)  # a copy: GGUF maps read-only
    if kind == "Q4_1":  # d (f16), m (f16), 16 bytes: inputs 0-15 in the low nibbles, 16-31 in the high ones
        d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        nibbles = blocks[..., 4:20]
        zero = m + 8 * d
    elif kind == "Q4_0":  # d (f16), 16 bytes; w = d * (q - 8)
        d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
        nibbles = blocks[..., 2:18]
        zero = torch.zeros_like(d)
    else:
        return None
    q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(out, inp)
    return q, d, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight the groups stand for (before the bf16 rounding of scale and zero)."""
    out, inp = q.shape
    groups = (q.float().reshape(out, inp // GROUP, GROUP) - 8) * scale[..., None] + zero[..., None]
    return groups.reshape(out, inp)


def fuse(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Int4Linear:
    """One Int4Linear computing several linears of the same input side by side (their outputs concatenated)."""
    return Int4Linear(*(torch.cat(tensors) for tensors in zip(*parts)))
