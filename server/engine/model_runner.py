"""Runs the Llama forward pass for the engine: slot-based KV cache plus per-row LoRA.

We reuse the loaded Hugging Face modules (embeddings, norms, and the quantized bitsandbytes
linears) but drive them ourselves, because HF's forward needs one padded cache for the whole
batch. Here every running request owns a *slot* of a preallocated KV cache, so a request
can join or leave between two decode steps without touching anybody else's cache. Running
requests always occupy slots 0..B-1 (the engine compacts on exit), which makes the decode
attention a plain view of the cache instead of a gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine.lora_batch import LoraBank, StepLora, matmul_rows

# Decode attention runs over cache lengths rounded up to this (see _decode_attention).
ATTENTION_BLOCK = 64
LOGIT_CHUNK = 4  # see _logits


@dataclass
class PrefillItem:
    slot: int
    token_ids: list[int]
    adapter: str | None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class ModelRunner:
    """Owns the model and the KV cache. Only the engine thread may call it."""

    def __init__(self, causal_lm, tokenizer, max_slots: int, context_window: int):
        config = causal_lm.config
        if config.model_type not in ("llama", "mistral"):
            raise ValueError(f"model_type {config.model_type!r} is not supported; loraplex serves Llama models")
        self.config = config
        self.tokenizer = tokenizer  # the engine thread's own instance, for detokenizing
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.layers = list(self.model.layers)
        self.device = self.model.embed_tokens.weight.device
        self.dtype = self.model.embed_tokens.weight.dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.context_window = context_window
        self.vocab_size = config.vocab_size
        self.attn_scale = self.head_dim**-0.5
        cache_shape = (len(self.layers), max_slots, self.num_kv_heads, context_window, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.cos, self.sin = self._rope_tables(context_window)
        self.lora = LoraBank(self.device, self.dtype)
        self._positions = torch.arange(context_window, device=self.device)

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # HF's rotary module knows every rope_scaling variant (llama3, linear, dynamic...).
        position_ids = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = self.model.rotary_emb(probe, position_ids)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    # ---- public steps -------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Fill each item's slot from position 0; returns last-token logits [len(items), vocab]."""
        token_ids = [t for item in items for t in item.token_ids]
        positions = torch.cat([self._positions[: len(item.token_ids)] for item in items])
        row_adapters = [item.adapter for item in items for _ in item.token_ids]
        spans, start = [], 0
        for item in items:
            spans.append((item.slot, start, len(item.token_ids)))
            start += len(item.token_ids)

        def attend(layer: int, q, k, v):
            return self._prefill_attention(layer, q, k, v, spans)

        hidden = self._forward(token_ids, positions, attend, self.lora.prepare(row_adapters))
        last_rows = torch.tensor([s + n - 1 for _, s, n in spans], device=self.device)
        return self._logits(hidden[last_rows])

    @torch.inference_mode()
    def decode(self, token_ids: list[int], lengths: list[int], adapters: list[str | None]) -> torch.Tensor:
        """One token for each of slots 0..B-1; `lengths[i]` tokens are already cached for slot i."""
        batch = len(token_ids)
        positions = torch.tensor(lengths, device=self.device)
        max_len = min(-(-(max(lengths) + 1) // ATTENTION_BLOCK) * ATTENTION_BLOCK, self.context_window)
        # keys past a row's own position are stale (a previous occupant of the slot) or padding
        hidden_keys = (self._positions[:max_len][None, :] > positions[:, None]).view(batch, 1, 1, max_len)
        rows = torch.arange(batch, device=self.device)

        def attend(layer: int, q, k, v):
            return self._decode_attention(layer, q, k, v, rows, positions, hidden_keys, max_len)

        hidden = self._forward(token_ids, positions, attend, self.lora.prepare(adapters))
        return self._logits(hidden)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a request's cache to another slot (used to keep running slots contiguous)."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    # ---- internals ----------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over fixed chunks of LOGIT_CHUNK rows, as `W @ rows.T` (on CPU).

        The vocabulary-sized matmul is the largest of a decode step. Fixed chunks keep each
        row's logits bit-identical whatever the batch, and the W @ x.T orientation streams W
        once per chunk: at batch 1 this is ~4x faster than F.linear padded to 4 rows.
        """
        weight = getattr(self.lm_head, "weight", None)
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

    def _forward(self, token_ids: list[int], positions: torch.Tensor, attend, step_lora: StepLora | None):
        tokens = len(token_ids)
        hidden = self.model.embed_tokens(torch.tensor(token_ids, device=self.device))
        cos = self.cos[positions].unsqueeze(1)  # [N, 1, head_dim], broadcast over heads
        sin = self.sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
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
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            if step_lora is not None:
                step_lora.apply(i, "gate_up", x, (gate, up))
            x = mlp.act_fn(gate) * up
            down = mlp.down_proj(x)
            if step_lora is not None:
                step_lora.apply(i, "down", x, (down,))
            hidden = hidden + down
        return self.model.norm(hidden)

    def _prefill_attention(self, layer: int, q, k, v, spans) -> torch.Tensor:
        outputs = []
        for slot, start, length in spans:
            k_seq = k[start : start + length].transpose(0, 1)  # [kv_heads, n, head_dim]
            v_seq = v[start : start + length].transpose(0, 1)
            self.k_cache[layer, slot, :, :length] = k_seq
            self.v_cache[layer, slot, :, :length] = v_seq
            q_seq = q[start : start + length].transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q_seq[None], k_seq[None], v_seq[None], is_causal=True, enable_gqa=True
            )
            outputs.append(out[0].transpose(0, 1).reshape(length, -1))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _decode_attention(self, layer: int, q, k, v, rows, positions, hidden_keys, max_len) -> torch.Tensor:
        # Plain matmul/softmax instead of SDPA, over a length padded to a multiple of
        # ATTENTION_BLOCK: masked keys then add exact zeros in the same order whatever else
        # is in the batch, so a request's tokens do not depend on who it is batched with
        # (SDPA's kernels split work by batch size and length).
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        k_cache[rows, :, positions] = k
        v_cache[rows, :, positions] = v
        batch = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        q = q.view(batch, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(q, k_cache[:batch, :, :max_len].transpose(-1, -2)) * self.attn_scale
        scores.masked_fill_(hidden_keys, float("-inf"))
        # softmax in float32 as HF's eager attention does: in bf16 (GPU) it visibly loses precision
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        out = torch.matmul(probs, v_cache[:batch, :, :max_len])
        return out.reshape(batch, -1)
