"""The base's linears as 4-bit groups computed by a CPU kernel (quantization `int4`, the CPU default).

Why this format on a CPU (loadtests: `python -m loadtests.bench_decode_step --breakdown 1,16` before and after,
docs/decode-profile.md): a decode step on a CPU is its linears, and 4-bit groups of 32 inputs with one scale and
one offset each are what llama.cpp's Q4_1 holds. Two kernels compute them:

- ours (int4_matmul.cpp, built on first use by models/native.py) where the CPU has AVX-512 BF16: each group's
  16 integer levels are widened to bf16 exactly and dotted with the rows' bf16 inputs in float32
  (vdpbf16ps), then scaled; rows are taken eight at a time, so the weights are unpacked once per eight rows.
  It holds the scales and offsets in float16, as the GGUF does.
- PyTorch's `aten._weight_int4pack_mm_for_cpu` elsewhere (scales and offsets in bf16: a relative error of at
  most 2^-9 on each). It unpacks the weights again for every four rows, so its cost grows with the batch.

Both give a row the same bits whatever the number of rows (the batch invariance the engine promises).
bitsandbytes' NF4 stays the CUDA path.

The tied embedding / lm_head (the largest matmul of a one-row step: vocabulary x hidden) is held where our
kernel runs as GGUF's Q8_0 blocks (`Int8Table`: int8 levels, one float16 scale per 32 inputs), the embedded
GGUF's own `token_embd` blocks as stored, which is also what llama.cpp computes its logits with: half the bytes
of bf16 to read at every step. Elsewhere it stays in bf16.

Why no second rounding: a group dequantizes as `(q - 8) * scale + zero` with q in 0..15, which is exactly
llama.cpp's Q4_1 block (`d * q + m`: scale = d, zero = m + 8d) and Q4_0 block (`d * (q - 8)`): the embedded
default's GGUF blocks are taken as they are, not dequantized and quantized again. Other weights (a Hugging
Face folder in 16 or 32 bits, GGUF tensors of other types) are quantized once, from full precision, to the
same asymmetric 4-bit groups.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from models import native

log = logging.getLogger("loraplex.model")

GROUP = 32  # inputs per scale: GGUF's Q4_0 / Q4_1 block size
ACTIVATION_DTYPE = torch.bfloat16  # the kernel's fast path; int4 with float32 activations is a slow fallback


KERNEL_SOURCE = Path(__file__).with_name("int4_matmul.cpp")
COLUMNS = 16  # int4_matmul.cpp: output columns per block


@functools.cache
def kernel() -> tuple[object | None, str]:
    """(our AVX-512 BF16 int4 matmul, "") or (None, why it does not run here). Built once per process."""
    if not native.cpu_has("avx512_bf16"):
        return None, "the CPU has no AVX-512 BF16"
    why = native.avx512() or native.build("loraplex_int4_avx512bf16", KERNEL_SOURCE, native.AVX512_BF16_FLAGS)
    return (None, why) if why else (torch.ops.loraplex_int4.int4_matmul, "")


def int8_kernel():
    """Our AVX-512 BF16 Q8_0 matmul (built with the int4 one), or None where that does not run."""
    return torch.ops.loraplex_int4.int8_matmul if kernel()[0] is not None else None


def supported() -> str | None:
    """None when an int4 CPU kernel runs here (ours or PyTorch's), else why not."""
    if kernel()[0] is not None:
        return None
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

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ours: bool | None = None):
        """q: [out, in] integers 0..15; scale, zero: [out, in // GROUP] (float). `ours`: our kernel (None: where
        it runs; False: PyTorch's)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP or self.out_features % COLUMNS:
            raise ValueError(f"int4 needs in_features a multiple of {GROUP} and out_features of {COLUMNS}, not "
                             f"{self.in_features} and {self.out_features}")
        self._ours = kernel()[0] if ours is not False else None
        if ours and self._ours is None:
            raise ValueError(f"our int4 kernel does not run here: {kernel()[1]}")
        if self._ours is not None:
            self.register_buffer("packed", pack(q, scale, zero))
            self.scales_zeros = None
            return
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # PyTorch's layout: [in // GROUP, out, (scale, zero)]
        self.register_buffer("scales_zeros", torch.stack((scale.float(), zero.float()), -1).transpose(0, 1)
                             .contiguous().to(ACTIVATION_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        if self._ours is not None:
            out = self._ours(rows.contiguous(), self.packed, self.out_features)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales_zeros is None else self.scales_zeros.numel() * 2
        return self.packed.numel() * self.packed.element_size() + extra

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


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Our kernel's layout (int4_matmul.cpp): per block of 16 output columns and group of 32 inputs, 16 pairs
    of inputs as 16 bytes (byte i: column i's pair, the first in the low nibble), then the 16 columns' scales
    and offsets (zero - 8 * scale) in float16."""
    out, inp = q.shape
    groups = inp // GROUP
    levels = q.to(torch.uint8).view(out // COLUMNS, COLUMNS, groups, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
    nibbles = (levels[..., 0] | (levels[..., 1] << 4)).reshape(out // COLUMNS, groups, -1)
    offset = zero.float() - 8 * scale.float()
    return torch.cat((nibbles, _by_column(scale, "int4 scale"), _by_column(offset, "int4 offset")),
                     dim=-1).reshape(-1)


def _by_column(values: torch.Tensor, name: str) -> torch.Tensor:
    """[out, groups] per-group values as the kernels' blocks hold them: per block of COLUMNS outputs and group,
    the block's values in float16, as bytes ([out // COLUMNS, groups, 2 * COLUMNS])."""
    out, groups = values.shape
    half = values.float().view(out // COLUMNS, COLUMNS, groups).permute(0, 2, 1).to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError(f"{name}s beyond float16's range")
    return half.contiguous().view(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight the groups stand for (before the kernel's rounding of scale and zero: float16 for
    ours, exact for GGUF blocks; bf16 for PyTorch's)."""
    out, inp = q.shape
    groups = (q.float().reshape(out, inp // GROUP, GROUP) - 8) * scale[..., None] + zero[..., None]
    return groups.reshape(out, inp)


class Int8Table(torch.nn.Module):
    """A [rows, dim] table (the embedding, and its tied lm_head) in GGUF's Q8_0 blocks: w = q * scale, q an
    int8, one scale per 32 values; held only in our kernel's layout (`pack_int8`). As the embedding it returns
    the rows of `ids` in float32 (int8 times a float16 is exact there); `logits(x)` is x @ table.T by the kernel
    (each row's bits independent of the other rows, as int4_matmul's)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        if self.embedding_dim % GROUP or self.num_embeddings % COLUMNS:
            raise ValueError(f"int8 tables need a width that is a multiple of {GROUP} and a multiple of {COLUMNS} "
                             f"rows, not {self.embedding_dim} and {self.num_embeddings}")
        self._op = int8_kernel()
        if self._op is None:
            raise ValueError(f"our int8 kernel does not run here: {kernel()[1]}")
        self.register_buffer("packed", pack_int8(q, scale))

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels [blocks, groups, pair, column, 2] int8, scales [blocks, groups, column] float16) of `packed`."""
        groups = self.embedding_dim // GROUP
        blocks = self.packed.view(self.num_embeddings // COLUMNS, groups, -1)
        levels = blocks[..., :GROUP * COLUMNS].view(torch.int8).unflatten(-1, (GROUP // 2, COLUMNS, 2))
        return levels, blocks[..., GROUP * COLUMNS:].view(torch.float16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        levels, scales = self._views()
        flat = ids.reshape(-1)
        block, column = flat // COLUMNS, flat % COLUMNS
        rows = levels[block, :, :, column, :].float().flatten(2) * scales[block, :, column].float()[..., None]
        return rows.reshape(*ids.shape, self.embedding_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ table.T in float32, x's rows taken in bf16."""
        rows = x.reshape(-1, self.embedding_dim).to(ACTIVATION_DTYPE).contiguous()
        return self._op(rows, self.packed, self.num_embeddings).reshape(*x.shape[:-1], self.num_embeddings)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, q8_0"


class Int8Head(torch.nn.Module):
    """The lm_head over an `Int8Table` (tied to the embedding, or its own table): float32 logits."""

    def __init__(self, table: Int8Table):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.logits(x)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a full-precision [rows, dim] table in Q8_0 blocks: per 32 values, scale = max |w| / 127
    and q = round(w / scale) (what llama.cpp's Q8_0 does), the scale rounded to float16 first."""
    rows, dim = weight.shape
    groups = weight.float().reshape(rows, dim // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 127).to(torch.float16).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (groups / safe[..., None]).round().clamp(-128, 127).to(torch.int8).reshape(rows, dim)
    return q, scale


def from_gguf_q8(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a GGUF Q8_0 tensor (`raw`: its [rows, blocks * 34] uint8 data) as stored: per block a
    float16 d then 32 int8."""
    rows, dim = shape
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(rows, dim // GROUP, 2 + GROUP)
    scale = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    return blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, dim), scale


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Our int8 kernel's layout (int4_matmul.cpp): per block of 16 rows (output columns) and group of 32
    values, 16 pairs of values as 32 bytes (column i's pair at bytes 2i, 2i+1), then the 16 scales in float16."""
    rows, dim = q.shape
    groups = dim // GROUP
    levels = q.to(torch.int8).view(rows // COLUMNS, COLUMNS, groups, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
    levels = levels.reshape(rows // COLUMNS, groups, -1).view(torch.uint8)
    return torch.cat((levels, _by_column(scale, "int8 scale")), dim=-1).reshape(-1)


def fuse(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Int4Linear:
    """One Int4Linear computing several linears of the same input side by side (their outputs concatenated)."""
    return Int4Linear(*(torch.cat(tensors) for tensors in zip(*parts)))


if __name__ == "__main__":  # `make install`: build the kernel now rather than at the first server start
    op, why = kernel()
    print("int4 / int8 CPU kernels:", "built" if op is not None else f"not used ({why})")
