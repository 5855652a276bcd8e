"""Which KV cache blocks each request owns, and which hold a prefix another request can reuse.

The KV cache is a pool of fixed-size blocks (`block_size` token positions each, every layer);
a request owns a *block table*: its positions p live in block `table[p // block_size]`, so memory
follows the tokens a request really has, not a reserved context window (vLLM's PagedAttention).

Prefix caching: once a block is full and computed, it gets a content digest chained from the
blocks before it and the adapter that computed it (LoRA changes K and V, so the same text under
another adapter is another cache entry). A new request whose first full blocks have known digests
takes those blocks by reference instead of recomputing them. A block nobody references keeps its
contents and digest in the free list, oldest-freed first, and is only overwritten when the pool
needs a block: that is the least-recently-used eviction.

Pure bookkeeping, no tensors: the engine thread alone calls it, and the runner reads the tables.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

# Block 0 is never handed out: block tables are padded with it, and it stays zeros.
NULL_BLOCK = 0


@dataclass
class BlockState:
    ref_count: int = 0
    digest: bytes | None = None  # set once the block is full and computed, while its contents last


@dataclass
class CacheStats:
    """Running totals the engine turns into metrics."""

    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of those, found computed


@dataclass
class BlockOwner:
    """What the block manager needs of a request (the Sequence carries these fields)."""

    tokens: list[int]
    adapter_key: str | None
    block_table: list[int] = field(default_factory=list)
    block_digests: list[bytes] = field(default_factory=list)
    num_computed: int = 0

    @property
    def cache_key(self) -> str | None:
        return self.adapter_key


def _digest(parent: bytes, cache_key: str | None, tokens: list[int]) -> bytes:
    """`cache_key`: what computed the KV (an adapter, a mixture of adapters, None: the base)."""
    h = hashlib.sha256(parent)
    h.update((cache_key or "").encode() + b"\0")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least two blocks (one is the padding block)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._blocks = [BlockState() for _ in range(num_blocks)]
        # blocks with no reference: first out is the next overwritten (plain blocks first, then cached LRU)
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._by_digest: dict[bytes, int] = {}
        self._fresh: list[int] = []  # blocks handed out since the runner last cleared them
        self.stats = CacheStats()

    # ---- capacity ---------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        """Token positions the pool holds (the padding block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- requests ---------------------------------------------------------------------

    def allocate(self, seq: BlockOwner) -> bool:
        """Give a waiting request blocks for all its tokens, reusing cached prefix blocks.

        False (and nothing changed) when the pool cannot hold it.
        Sets seq.num_computed to the reused tokens. The last token is never taken from the cache:
        its logits are needed to sample the next one.
        """
        hits = self._prefix_hits(seq) if self.prefix_caching else []
        needed = self.blocks_for(len(seq.tokens)) - len(hits)
        revived = sum(1 for block in hits if self._blocks[block].ref_count == 0)  # taken out of the free list
        if self.num_free - revived < needed:
            return False
        seq.block_table, seq.block_digests = [], []
        for block in hits:
            state = self._blocks[block]
            if state.ref_count == 0:
                del self._free[block]
            state.ref_count += 1
            seq.block_table.append(block)
            seq.block_digests.append(state.digest)
        for _ in range(needed):
            seq.block_table.append(self._take())
        seq.num_computed = len(hits) * self.block_size
        if self.prefix_caching:
            self.stats.queried_tokens += len(seq.tokens)
            self.stats.hit_tokens += seq.num_computed
        return True

    def append_slot(self, seq: BlockOwner) -> bool:
        """Make room for the request's next position (its last token); False when no block is free."""
        if len(seq.block_table) * self.block_size >= len(seq.tokens):
            return True
        if not self._free:
            return False
        seq.block_table.append(self._take())
        return True

    def commit(self, seq: BlockOwner) -> None:
        """Record digests of the blocks the last step filled, so later requests can reuse them."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        while len(seq.block_digests) < full:
            index = len(seq.block_digests)
            parent = seq.block_digests[-1] if seq.block_digests else b""
            start = index * self.block_size
            digest = _digest(parent, seq.cache_key, seq.tokens[start : start + self.block_size])
            seq.block_digests.append(digest)
            block = seq.block_table[index]
            if digest not in self._by_digest:  # a twin computed at the same time keeps the first copy
                self._by_digest[digest] = block
                self._blocks[block].digest = digest

    def free(self, seq: BlockOwner) -> None:
        """Drop the request's references; blocks with a digest stay reusable until overwritten."""
        for block in reversed(seq.block_table):  # tail blocks are overwritten before the prefix they extend
            state = self._blocks[block]
            state.ref_count -= 1
            if state.ref_count == 0:
                self._free[block] = None
                if state.digest is None:
                    self._free.move_to_end(block, last=False)  # nothing to keep: hand it out first
        seq.block_table, seq.block_digests = [], []
        seq.num_computed = 0

    def take_fresh(self) -> list[int]:
        """Blocks handed out since the last call (the runner zeroes them before use)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    # ---- internals ----------------------------------------------------------------------

    def _prefix_hits(self, seq: BlockOwner) -> list[int]:
        hits: list[int] = []
        parent = b""
        for index in range((len(seq.tokens) - 1) // self.block_size):
            start = index * self.block_size
            parent = _digest(parent, seq.cache_key, seq.tokens[start : start + self.block_size])
            block = self._by_digest.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        state = self._blocks[block]
        if state.digest is not None:  # evict: its contents are about to be overwritten
            if self._by_digest.get(state.digest) == block:
                del self._by_digest[state.digest]
            state.digest = None
        state.ref_count = 1
        self._fresh.append(block)
        return block
