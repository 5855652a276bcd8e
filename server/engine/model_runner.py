"""Runs the Llama forward pass for the engine over a paged KV cache, with per-row LoRA.

We reuse the loaded Hugging Face modules (embeddings, norms, and the quantized bitsandbytes
linears) but drive them ourselves, because HF's forward needs one padded cache for the whole
batch. Here the cache is a pool of blocks (block_manager.py decides who owns which) and one
forward pass runs any mix of requests: decode rows (one new token) and prefill chunks (a run of
prompt tokens continuing what the cache already holds for that request). Every query row attends
to its own request's positions only, gathered through its block table.

Determinism: a row's attention is computed over its own length rounded up (see _padded_length),
with masked keys adding exact zeros, as plain matmul/softmax; SDPA's kernels split work by batch
and length. So a request's tokens do not depend on who shares the step, nor on how its prompt was
cut into chunks or how much of it came from the prefix cache (tests/test_kv_cache.py). On a CPU with
AVX-512, single-query rows attend through a C++ kernel reading the cache in place instead
(cpu_attention.py), which holds the same promise by computing each row alone over its own length.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from adapters.lora import BaseShape
from models import native
from models.cpu_int4 import Int8Head
from server.engine import cpu_attention
from server.engine.lora_batch import KernelStepLora, LoraBank, RowAdapter, StepLora, matmul_rows
from server.engine.transfer import to_device

# Attention runs over key lengths rounded up to multiples of this; a kv block size must divide it.
ATTENTION_BLOCK = 64
LOGIT_CHUNK = 4  # see _logits


@dataclass
class StepItem:
    """One request's part of a forward pass: `token_ids` at positions start.. of its cache."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    adapter: RowAdapter  # None: the base; an adapter key; or a mixture ((key, weight), ...)
    wants_logits: bool = True  # its last token's logits are sampled (False: a prompt chunk mid-way)


def _padded_length(length: int) -> int:
    """Keys a row of `length` positions attends over: its length rounded up to ATTENTION_BLOCK,
    then to the next of 2^k or 1.5 * 2^k past 256 (rows of similar length share one matmul, and
    no row reads more than 1.5x its own length)."""
    padded = -(-length // ATTENTION_BLOCK) * ATTENTION_BLOCK
    if padded <= 256:
        return padded
    power = 1 << (padded - 1).bit_length()
    return power * 3 // 4 if padded <= power * 3 // 4 else power


def kv_block_bytes(config, dtype: torch.dtype, block_size: int) -> int:
    """Bytes one block takes: K and V, every layer, `block_size` positions."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * head_dim * element


def resolve_kv_dtype(setting: str, compute: torch.dtype, int4_base: bool) -> torch.dtype:
    """The KV cache's dtype. auto: bfloat16 under an int4 CPU base (its linears already take bf16 inputs; half
    the memory and half the bytes attention reads, a rounding far below what 4-bit weights change), where the
    CPU computes bf16 natively; else the compute dtype (a full-precision base keeps its exactness)."""
    if setting != "auto":
        return getattr(torch, setting)
    if int4_base and compute == torch.float32 and cpu_has_bf16():
        return torch.bfloat16
    return compute


def cpu_has_bf16() -> bool:
    return native.cpu_has("avx512_bf16") or native.cpu_has("amx_bf16")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class ModelRunner:
    """Owns the model and the KV block pool. Only the engine thread may call it."""

    def __init__(self, causal_lm, tokenizer, num_blocks: int, block_size: int, context_window: int,
                 adapter_slots: int = 8, max_adapter_rank: int = 64, batch_invariant: bool = True,
                 lora_kernels: str = "torch", cuda_graphs: str = "off", max_batch_size: int = 64,
                 graph_budget: int | None = None, kv_dtype: str = "auto", attention: str = "auto"):
        """`graph_budget`: bytes the CUDA graphs captured at start may take (start-up plans it before the
        KV cache; None: a share of what is free after the cache, see decode_graphs.auto_budget).
        `kv_dtype`: the KV cache's (see resolve_kv_dtype). `attention`: how single-query rows attend on a
        CPU (see cpu_attention.py)."""
        config = causal_lm.config
        if config.model_type not in ("llama", "mistral"):
            raise ValueError(f"model_type {config.model_type!r} is not supported; loraplex serves Llama models")
        if ATTENTION_BLOCK % block_size:
            raise ValueError(f"kv block size {block_size} must divide {ATTENTION_BLOCK}")
        self.config = config
        self.tokenizer = tokenizer  # the engine thread's own instance, for detokenizing
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.layers = list(self.model.layers)
        self.fused = hasattr(self.layers[0].self_attn, "qkv_proj")
        self.device = self.model.norm.weight.device  # the embedding may be a table of int8 blocks (no .weight)
        # the compute dtype: the norms' (embeddings and lm_head may be held narrower, see models/cpu_int4.py)
        self.dtype = self.model.norm.weight.dtype
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.dtype, self.fused)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.context_window = context_window
        self.vocab_size = config.vocab_size
        self.attn_scale = self.head_dim**-0.5
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [layer, block, position in block, kv head, head_dim]; block 0 is the zero padding block
        cache_shape = (len(self.layers), num_blocks, block_size, self.num_kv_heads, self.head_dim)
        # torch.empty: on a CPU the pool's pages become resident as blocks are first handed out (each is zeroed
        # then, clear_blocks), so memory follows use up to the pool's size; the padding block is zeroed now
        self.k_cache = torch.empty(cache_shape, device=self.device, dtype=self.kv_dtype)
        self.v_cache = torch.empty(cache_shape, device=self.device, dtype=self.kv_dtype)
        self.k_cache[:, 0].zero_()
        self.v_cache[:, 0].zero_()
        self.cos, self.sin = self._rope_tables(context_window)
        # single-query rows (decode rows, and a prompt's one-token pieces) on a CPU: the in-place kernel or None
        self.attention_kernel = cpu_attention.resolve(attention, self.device, self.head_dim,
                                                      self.num_heads // self.num_kv_heads)
        self.lora = LoraBank(self.device, self.dtype, BaseShape.from_config(config), adapter_slots, max_adapter_rank,
                             batch_invariant, lora_kernels)
        if cuda_graphs not in ("auto", "off"):
            raise ValueError(f"cuda_graphs must be auto or off, not {cuda_graphs!r}")
        self.graphs = None  # decode steps as CUDA graphs: CUDA only (decode_graphs.py)
        if cuda_graphs == "auto" and self.device.type == "cuda":
            from server.engine.decode_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_batch_size, capture=True, budget=graph_budget)
            self.graphs.warm_up()  # every planned shape captured now, before any request

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of the base's weights as held (quantized linears packed, a tied lm_head counted once)."""
        seen, total = set(), 0
        for tensor in [*self.model.parameters(), *self.model.buffers(), *self.lm_head.parameters(),
                       *self.lm_head.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        return total

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # HF's rotary module knows every rope_scaling variant (llama3, linear, dynamic...).
        position_ids = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = self.model.rotary_emb(probe, position_ids)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    # ---- public steps -------------------------------------------------------------------

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero blocks just handed out: a block's previous contents never reach a new owner, even
        as masked padding (0 x NaN would be NaN)."""
        if blocks:
            index = to_device(blocks, self.device)
            self.k_cache.index_fill_(1, index, 0)
            self.v_cache.index_fill_(1, index, 0)

    @torch.inference_mode()
    def step(self, items: list[StepItem]) -> torch.Tensor:
        """Run every item's tokens; returns the last-token logits of items that want them, in order."""
        if self.graphs is not None:
            logits = self.graphs.run(items)
            if logits is not None:
                return logits
        return self.eager_step(items)

    def eager_step(self, items: list[StepItem]) -> torch.Tensor:
        """`step` without CUDA graphs: any mix of decode rows and prompt chunks."""
        token_ids = [t for item in items for t in item.token_ids]
        positions, slots, row_adapters, spans = [], [], [], []
        size = self.block_size
        for item in items:
            spans.append((len(positions), len(item.token_ids)))
            for pos in range(item.start, item.start + len(item.token_ids)):
                positions.append(pos)
                slots.append(item.block_table[pos // size] * size + pos % size)
            row_adapters += [item.adapter] * len(item.token_ids)
        plan = self._attention_plan(items, spans)
        slot_index = to_device(slots, self.device)

        def attend(layer: int, q, k, v):
            return self._attention(layer, q, k, v, slot_index, plan)

        position_tensor = to_device(positions, self.device)
        hidden = self._forward(to_device(token_ids, self.device), position_tensor, attend,
                               self.lora.prepare(row_adapters))
        last_rows = [start + count - 1 for item, (start, count) in zip(items, spans) if item.wants_logits]
        if not last_rows:
            return torch.empty(0, self.vocab_size, device=self.device)
        return self._logits(hidden[to_device(last_rows, self.device)])

    def static_decode(self, shape) -> torch.Tensor:
        """A decode step over the fixed buffers of a `decode_graphs.StaticDecode`: no host reads, no
        data-dependent shapes (what a CUDA graph can record); logits of every row, padding included."""

        def attend(layer: int, q, k, v):
            return self._static_attention(layer, q, k, v, shape)

        return self._logits(self._forward(shape.tokens, shape.positions, attend, shape.step_lora))

    # ---- attention ------------------------------------------------------------------------

    def _attention_plan(self, items: list[StepItem], spans) -> tuple[list, list, tuple | None]:
        """(decode groups, prefill chunks, kernel rows): how this step's query rows are put into matmuls.

        A single-token row is one matrix of `group` query rows against its own keys; rows of the
        same padded length share one batched matmul. A prompt chunk is cut at multiples of the
        block size into pieces, and each piece is one matrix of its positions' query rows against
        keys padded from the piece's end. Pieces therefore do not depend on where a chunk started or
        stopped, nor on how much of the prompt came from the prefix cache: prompt tokens get the
        same numbers however the scheduler cut them (the scheduler keeps chunk ends on block
        boundaries). Every matrix has at least `group` rows and its own padded length, so a row never
        depends on which other rows share the step (CPU BLAS picks kernels by shape).

        With the CPU attention kernel, every single-query row goes to it instead, the one-token pieces of prompt
        chunks included (so a prompt's last token gets the same bits whether it came alone after a prefix-cache
        hit or at the end of a chunk): kernel rows are (rows, [rows, width] block tables, lengths).
        """
        singles: dict[int, list[int]] = {}
        chunks = []
        kernel_rows: list[tuple[int, list[int], int]] = []  # (row, block table, keys)
        for index, item in enumerate(items):
            count = len(item.token_ids)
            if count == 1 and self.attention_kernel is not None:
                kernel_rows.append((spans[index][0], item.block_table, item.start + 1))
                continue
            if count == 1:
                singles.setdefault(_padded_length(item.start + 1), []).append(index)
                continue
            end = item.start + count
            blocks = self._block_index([item], _padded_length(end))
            pieces: dict[tuple[int, int], list[int]] = {}  # (padded length, piece length) -> piece starts
            piece_start = item.start
            while piece_start < end:
                piece_end = min(end, (piece_start // self.block_size + 1) * self.block_size)
                if piece_end - piece_start == 1 and self.attention_kernel is not None:
                    kernel_rows.append((spans[index][0] + piece_start - item.start, item.block_table, piece_end))
                    piece_start = piece_end
                    continue
                pieces.setdefault((_padded_length(piece_end), piece_end - piece_start), []).append(piece_start)
                piece_start = piece_end
            groups = []
            for (padded, length), starts in pieces.items():  # consecutive positions, hence consecutive rows
                positions = self._tensor([[p + i for i in range(length)] for p in starts])  # [n, length]
                hidden = torch.arange(padded, device=self.device)[None, None, :] > positions[:, :, None]
                row = spans[index][0] + starts[0] - item.start
                groups.append((row, len(starts), length, padded, hidden))
            chunks.append((blocks, groups))
        decode = []
        for padded, members in sorted(singles.items()):
            rows = self._tensor([spans[i][0] for i in members])
            positions = self._tensor([items[i].start for i in members])
            hidden = torch.arange(padded, device=self.device)[None, :] > positions[:, None]
            decode.append((rows, self._block_index([items[i] for i in members], padded), hidden))
        step_rows = spans[-1][0] + spans[-1][1] if spans else 0
        return decode, chunks, self._kernel_plan(kernel_rows, step_rows) if kernel_rows else None

    def _kernel_plan(self, kernel_rows: list[tuple[int, list[int], int]], step_rows: int) -> tuple:
        """(the rows, or None when they are every row of the step in order; block tables; lengths) for the
        kernel, made once per step (not per layer)."""
        width = max(-(-length // self.block_size) for _, _, length in kernel_rows)
        tables = self._tensor([(table + [0] * width)[:width] for _, table, _ in kernel_rows])
        lengths = self._tensor([length for _, _, length in kernel_rows])
        rows = [row for row, _, _ in kernel_rows]
        return (None if rows == list(range(step_rows)) else self._tensor(rows)), tables, lengths

    def _tensor(self, values) -> torch.Tensor:
        return to_device(values, self.device)

    def _block_index(self, items: list[StepItem], padded: int) -> torch.Tensor:
        """[rows, padded // block_size] block ids, padded with the zero block."""
        width = padded // self.block_size
        return self._tensor([(item.block_table + [0] * width)[:width] for item in items])

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[rows, kv_heads, padded, head_dim] of the rows' blocks, contiguous."""
        rows, width = blocks.shape
        # index_select copies whole blocks (memcpy per block); advanced indexing (cache[blocks]) gathers element
        # by element and was most of the attention's time at long lengths. Same values, so the same bits.
        gathered = cache.index_select(0, blocks.reshape(-1))  # [rows * width, block_size, kv_heads, head_dim]
        gathered = gathered.view(rows, width * self.block_size, self.num_kv_heads, self.head_dim)
        return gathered.transpose(1, 2).to(self.dtype).contiguous()  # .to alone may alias a same-dtype view

    def _attend(self, queries, keys, values, hidden) -> torch.Tensor:
        scores = torch.matmul(queries, keys.transpose(-1, -2)) * self.attn_scale
        scores.masked_fill_(hidden, float("-inf"))
        # softmax in float32 as HF's eager attention does: in bf16 (GPU) it visibly loses precision
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        return torch.matmul(probs, values)

    def _attention(self, layer: int, q, k, v, slot_index, plan) -> torch.Tensor:
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        flat = (-1, self.num_kv_heads, self.head_dim)
        k_cache.view(flat).index_copy_(0, slot_index, k.to(self.kv_dtype))
        v_cache.view(flat).index_copy_(0, slot_index, v.to(self.kv_dtype))
        kv_heads, group, head_dim = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        decode, chunks, kernel = plan
        if kernel is not None and kernel[0] is None:
            return self._kernel_attention(q, k_cache, v_cache, kernel)  # a decode-only step: every row
        out = q.new_empty(q.shape[0], self.num_heads * head_dim)
        if kernel is not None:
            rows = kernel[0]
            out.index_copy_(0, rows, self._kernel_attention(q.index_select(0, rows), k_cache, v_cache, kernel))
        for rows, blocks, hidden in decode:
            n = len(rows)
            queries = q.index_select(0, rows).view(n, kv_heads, group, head_dim)
            result = self._attend(queries, self._gather(k_cache, blocks), self._gather(v_cache, blocks),
                                  hidden.view(n, 1, 1, -1))
            out.index_copy_(0, rows, result.reshape(n, -1))
        for blocks, groups in chunks:
            keys, values = self._gather(k_cache, blocks), self._gather(v_cache, blocks)  # [1, kv, padded, d]
            for row, n, length, padded, hidden in groups:
                # [n pieces, kv_heads, group * length, head_dim]: one matrix per piece, rows (group, position)
                queries = q[row : row + n * length].view(n, length, kv_heads, group, head_dim)
                queries = queries.permute(0, 2, 3, 1, 4).reshape(n, kv_heads, group * length, head_dim)
                mask = hidden[:, None, None].expand(n, 1, group, length, padded).reshape(n, 1, group * length, padded)
                result = self._attend(queries, keys[:, :, :padded], values[:, :, :padded], mask)
                result = result.view(n, kv_heads, group, length, head_dim).permute(0, 3, 1, 2, 4)
                out[row : row + n * length] = result.reshape(n * length, -1)
        return out

    def _kernel_attention(self, q, k_cache, v_cache, kernel) -> torch.Tensor:
        """[rows, heads * head_dim] in the compute dtype: the CPU kernel over the rows' own blocks."""
        _, tables, lengths = kernel
        queries = q.reshape(len(tables), self.num_heads, self.head_dim).float().contiguous()
        result = self.attention_kernel(queries, k_cache, v_cache, tables, lengths, self.attn_scale)
        return result.view(len(tables), -1).to(q.dtype)

    def _static_attention(self, layer: int, q, k, v, shape) -> torch.Tensor:
        """Every row against `shape.width` blocks of its own table; padding rows write zeros (into slot 0
        of the padding block, which stays zero)."""
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        flat = (-1, self.num_kv_heads, self.head_dim)
        keep = (shape.valid != 0)[:, None, None]
        k_cache.view(flat).index_copy_(0, shape.slots, torch.where(keep, k, 0).to(self.kv_dtype))
        v_cache.view(flat).index_copy_(0, shape.slots, torch.where(keep, v, 0).to(self.kv_dtype))
        n, group = shape.rows, self.num_heads // self.num_kv_heads
        queries = q.view(n, self.num_kv_heads, group, self.head_dim)
        length = shape.width * self.block_size
        hidden = torch.arange(length, device=self.device)[None, :] > shape.positions[:, None]
        result = self._attend(queries, self._gather(k_cache, shape.block_table), self._gather(v_cache, shape.block_table),
                              hidden.view(n, 1, 1, length))
        return result.reshape(n, -1)

    # ---- internals ----------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over fixed chunks of LOGIT_CHUNK rows, as `W @ rows.T` (on CPU).

        The vocabulary-sized matmul is the largest of a decode step. Fixed chunks keep each
        row's logits bit-identical whatever the batch, and the W @ x.T orientation streams W
        once per chunk: at batch 1 this is ~4x faster than F.linear padded to 4 rows.
        """
        if isinstance(self.lm_head, Int8Head):  # the int4 CPU base's Q8_0 table: each row's bits its own already
            return self.lm_head(hidden)
        weight = getattr(self.lm_head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and hidden.dtype == torch.float32:
            # the int4 CPU base's bf16 lm_head: one oneDNN bf16 matmul over every row gives each row the same bits
            # whatever the batch (checked for 1-64 rows on 1 and 2 threads) at about the cost of one row, where
            # LOGIT_CHUNK pieces would cost one row's each; contiguous fp32 for the sampler
            return torch.nn.functional.linear(hidden.to(weight.dtype), weight).float()
        if not isinstance(weight, torch.Tensor) or weight.dtype != hidden.dtype or self.lm_head.bias is not None:
            return matmul_rows(hidden, self.lm_head).float()  # e.g. a quantized lm_head
        if hidden.device.type != "cpu":
            # GPU GEMMs are not batch-invariant whatever we do; one launch beats 16 at batch 64
            return (hidden @ weight.T).float()
        rows = hidden.shape[0]
        padded = -(-rows // LOGIT_CHUNK) * LOGIT_CHUNK
        if padded != rows:
            hidden = torch.cat((hidden, hidden.new_zeros(padded - rows, hidden.shape[1])))
        chunks = [weight @ hidden[start : start + LOGIT_CHUNK].T for start in range(0, padded, LOGIT_CHUNK)]
        return torch.cat(chunks, dim=1).T[:rows].float()

    def _forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend,
                 step_lora: StepLora | KernelStepLora | None):
        tokens = len(token_ids)
        hidden = self.model.embed_tokens(token_ids).to(self.dtype)
        cos = self.cos[positions].unsqueeze(1)  # [N, 1, head_dim], broadcast over heads
        sin = self.sin[positions].unsqueeze(1)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            if self.fused:  # one matmul for q/k/v and one for gate/up (models/cpu_int4.py)
                q, k, v = attn.qkv_proj(x).split((q_width, kv_width, kv_width), dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            if step_lora is not None:
                step_lora.apply(i, "qkv", x, (q, k, v))
            q = _apply_rope(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
            k = _apply_rope(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
            attn_out = attend(i, q, k, v.view(tokens, self.num_kv_heads, self.head_dim))
            o = attn.o_proj(attn_out)
            if step_lora is not None:
                step_lora.apply(i, "o", attn_out, (o,))
            hidden = hidden + o
            x = layer.post_attention_layernorm(hidden)
            if self.fused:
                gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            if step_lora is not None:
                step_lora.apply(i, "gate_up", x, (gate, up))
            x = mlp.act_fn(gate) * up
            down = mlp.down_proj(x)
            if step_lora is not None:
                step_lora.apply(i, "down", x, (down,))
            hidden = hidden + down
        return self.model.norm(hidden)
