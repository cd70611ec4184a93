"""KV-cache blocks: allocation, reference counts and prefix caching.

A full block is identified by a SHA-256 digest chained over the tokens of every block before it,
and rooted in the sequence's cache keys (its cache salt, later its adapter), so equal prefixes
under equal keys map to the same blocks and nothing else does; a hit is also checked against the
block's stored parent digest and tokens, so not even a forced digest collision hands one request
another's keys and values. Freed blocks
keep their digest and sit in an LRU list; a later prompt with the same prefix takes them back, and
allocation evicts the least recently freed.
"""

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # What a cached block was computed from: its parent's digest and its own tokens.
        self.block_key: list[tuple[bytes | None, tuple[int, ...]] | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.cached: dict[bytes, int] = {}  # digest -> block

    @property
    def num_free(self) -> int:
        return len(self.free)

    @staticmethod
    def root_digest(*keys: str) -> bytes | None:
        """The digest every chain of a sequence starts from; None (the shared root) without keys."""
        if not any(keys):
            return None
        digest = hashlib.sha256(b"pyserve-prefix-root")
        for key in keys:
            data = key.encode()
            digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two lists collide
        return digest.digest()

    @staticmethod
    def chain_hash(parent: bytes | None, tokens: list[int]) -> bytes:
        """The block's digest: SHA-256 over the parent block's digest and this block's token ids."""
        digest = hashlib.sha256(parent or bytes(32))
        digest.update(array("q", tokens).tobytes())
        return digest.digest()

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]  # evicted: its contents are about to be overwritten
        self.block_hash[block] = None
        self.block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest cached prefix of full blocks."""
        if not self.caching or seq.block_table:
            return
        bs = self.block_size
        parent = seq.cache_root
        # Leave at least one token to compute, so the step produces logits for it.
        for i in range((len(seq.token_ids) - 1) // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = self.chain_hash(parent, tokens)
            block = self.cached.get(h)
            # Parent and tokens must match too (the chain before was checked the same way), so a
            # digest collision can only cost a cache miss, never hand out another prompt's KV.
            if block is None or self.block_key[block] != (parent, tuple(tokens)):
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * bs
        if not seq.output_ids:
            seq.num_cached_tokens = seq.num_computed

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Allocate blocks so that seq can hold num_tokens; False (nothing allocated) if short."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed > self.num_free:
            return False
        for _ in range(max(needed, 0)):
            seq.block_table.append(self._take())
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Record hashes of blocks that the last step filled, for later prefix hits."""
        if not self.caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_root
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = self.chain_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
                self.block_key[block] = (parent, tuple(tokens))

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks that reach zero become free (keeping their hash)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0
