"""Prefix-aware routing for Ray Serve replicas (`pyserve.ray` uses it for text models).

A conversation's later turns start with its earlier ones, so the replica that served turn one
holds their KV blocks in its prefix cache. Placing by the prompt's beginning is the cheap way to
know where a prefix lives: each request's key (its first characters or tokens, with its adapter
and cache salt) picks a replica by rendezvous hashing, so keys spread evenly and few move when
replicas come or go. When that replica's queue is well above the shortest one, the request goes
by load instead (the shorter of two random queues), so one hot conversation cannot pile up.
"""

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

PREFIX_CHARS = 256  # of a text prompt: a chat template's system prompt and first turn
PREFIX_TOKENS = 64  # of a token-id prompt
IMBALANCE = 8  # queued requests past the shortest queue at which affinity gives way to load


def prefix_key(pending: PendingRequest | None) -> str | None:
    """What a request's placement is keyed by: None when it has no text prompt to key on."""
    if pending is None or len(pending.args) < 2:
        return None
    request = pending.args[1]
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, str):
        head = prompt[:PREFIX_CHARS]
    elif isinstance(prompt, list):
        head = ",".join(map(str, prompt[:PREFIX_TOKENS]))
    else:
        return None
    return f"{getattr(request, 'lora', None)}|{getattr(request, 'cache_salt', None)}|{head}"


def preference(key: str, replica_id: str) -> int:
    """Rendezvous hashing: the replica with the highest score for a key is its home."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = prefix_key(pending_request)
        by_load = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        if key is None or len(candidate_replicas) == 1:
            return [by_load]
        home = max(candidate_replicas, key=lambda r: preference(key, r.replica_id.unique_id))
        queues = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas}
        known = [q for q in queues.values() if q is not None]
        if queues[home.replica_id] is not None and known and queues[home.replica_id] - min(known) >= IMBALANCE:
            return [by_load]
        return [[home], by_load]  # home first; if its queue is full, by load
