"""The scheduler and the block manager on their own: budgets, chunking, the running cap,
preemption order, prefix-cache reference counts, LRU eviction, and requests that can never fit."""

from pyserve.engine.llm.block_manager import BlockManager
from pyserve.engine.llm.params import SamplingParams
from pyserve.engine.llm.scheduler import Scheduler
from pyserve.engine.llm.sequence import Sequence, Status


def seq(name: str, prompt_len: int, first_token: int = 0) -> Sequence:
    return Sequence(name, 0, list(range(first_token, first_token + prompt_len)), SamplingParams(), seed=0)


def cached(blocks: BlockManager, name: str, prompt_len: int, first_token: int = 0) -> Sequence:
    """A sequence whose whole prompt is in the cache, its full blocks registered for prefix hits."""
    s = seq(name, prompt_len, first_token)
    blocks.ensure_capacity(s, prompt_len)
    s.num_computed = prompt_len
    blocks.register_full_blocks(s)
    return s


def run(step) -> None:
    """What the engine does after a step: the scheduled tokens are now in the cache."""
    for s, n in step.items:
        s.num_computed += n


def test_budget_chunks_long_prompts_and_decodes_go_first():
    blocks = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=16)
    a, b, c = seq("a", 10), seq("b", 10), seq("c", 40)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert [(s.request_id, n) for s, n in step.items] == [("a", 10), ("b", 6)]
    run(step)
    a.append(7)  # a sampled its first token: it now decodes one token per step
    step = sched.schedule()
    assert [(s.request_id, n) for s, n in step.items] == [("a", 1), ("b", 4), ("c", 11)]
    run(step)
    sizes = []
    while c.num_uncomputed:
        step = sched.schedule()
        sizes.append(dict((s.request_id, n) for s, n in step.items)["c"])
        run(step)
    assert sum(sizes) == 40 - 11 and all(n <= 16 for n in sizes)


def test_running_cap_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        sched.add(seq(f"r{i}", 3, first_token=10 * i))
    step = sched.schedule()
    assert [s.request_id for s, _ in step.items] == ["r0", "r1"] and len(sched.waiting) == 2


def test_preemption_takes_the_latest_admitted_and_requeues_it_first():
    blocks = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = seq("a", 8), seq("b", 8, 100), seq("c", 8, 200)
    for s in (a, b, c):
        sched.add(s)
    run(sched.schedule())  # all three fit: 2 blocks each
    assert blocks.num_free == 0
    for s in (a, b, c):
        s.append(1)  # each needs a third block for its next token: c, admitted last, gives way
    step = sched.schedule()
    assert sched.num_preemptions == 1 and c.status is Status.WAITING and c.block_table == []
    assert sched.waiting[0] is c and [s.request_id for s, _ in step.items] == ["a", "b"]
    assert c.num_computed == 0  # it will be recomputed from its first token


def test_prefix_blocks_are_shared_counted_and_revived_after_release():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = cached(blocks, "x", 9)
    assert len(first.block_hashes) == 2  # two full blocks of four
    second = seq("y", 9)
    blocks.match_prefix(second)
    assert second.block_table == first.block_table[:2] and second.num_computed == 8
    assert [blocks.ref_counts[b] for b in second.block_table] == [2, 2]
    blocks.release(first)
    assert [blocks.ref_counts[b] for b in second.block_table] == [1, 1]
    shared = list(second.block_table)
    blocks.release(second)
    assert all(blocks.ref_counts[b] == 0 and b in blocks.free for b in shared)
    third = seq("z", 9)  # freed blocks keep their contents: a later prompt takes them back
    blocks.match_prefix(third)
    assert third.block_table == shared and all(b not in blocks.free for b in shared)


def test_a_prefix_needs_one_token_left_to_compute():
    blocks = BlockManager(num_blocks=8, block_size=4)
    cached(blocks, "x", 8)
    again = seq("y", 8)
    blocks.match_prefix(again)
    assert again.num_computed == 4  # the last block is recomputed so the step yields logits


def test_eviction_takes_the_least_recently_freed_cached_block():
    blocks = BlockManager(num_blocks=2, block_size=4)
    old, new = cached(blocks, "old", 4, 0), cached(blocks, "new", 4, 50)
    old_block, new_block = old.block_table[0], new.block_table[0]
    blocks.release(old)
    blocks.release(new)
    assert len(blocks.cached) == 2
    taker = seq("taker", 4, 90)
    assert blocks.ensure_capacity(taker, 4)
    assert taker.block_table == [old_block]  # evicted first: freed first
    assert old.block_hashes == [] and list(blocks.cached.values()) == [new_block]
    fresh = seq("again", 5, 50)
    blocks.match_prefix(fresh)
    assert fresh.block_table == [new_block]


def test_a_sequence_that_can_never_fit_is_rejected_not_raised():
    blocks = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=100)
    big, small = seq("big", 20), seq("small", 3, 300)
    sched.add(big)
    sched.add(small)
    step = sched.schedule()
    assert step.rejected == [big] and big.status is Status.FINISHED
    assert [s.request_id for s, _ in step.items] == ["small"]
    assert blocks.num_free == 1


def test_block_digests_chain_sha256_over_parent_and_tokens():
    import hashlib
    from array import array

    first = BlockManager.chain_hash(None, [1, 2, 3, 4])
    assert first == hashlib.sha256(bytes(32) + array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert BlockManager.chain_hash(first, [5, 6, 7, 8]) != BlockManager.chain_hash(None, [5, 6, 7, 8])


def test_a_forced_digest_collision_never_shares_blocks(monkeypatch):
    monkeypatch.setattr(BlockManager, "chain_hash", staticmethod(lambda parent, tokens: b"same"))
    blocks = BlockManager(num_blocks=8, block_size=4)
    cached(blocks, "x", 9, 0)
    other = seq("y", 9, 50)  # different tokens, same (forced) digests
    blocks.match_prefix(other)
    assert other.block_table == [] and other.num_computed == 0


def test_a_request_holding_every_slot_gives_one_back_to_a_waiting_request():
    """One request with n=8 fills the running cap; a later one-sequence request gets a slot at the
    next step (the big request's latest sequence waits to be recomputed), not when the eight end."""
    blocks = BlockManager(num_blocks=256, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    big = [Sequence("big", i, [1, 2, 3, 4, 5], SamplingParams(n=8), seed=i) for i in range(8)]
    for s in big:
        sched.add(s)
    run(sched.schedule())
    assert len(sched.running) == 8
    small = seq("small", 3, first_token=50)
    sched.add(small)
    step = sched.schedule()
    assert small in [s for s, _ in step.items] and small.status is Status.RUNNING
    waiting = [s for s in big if s.status is Status.WAITING]
    assert len(waiting) == 1 and waiting[0] not in [s for s, _ in step.items]
    assert len(sched.running) == 8 and sched.num_preemptions == 1
    # beside one other sequence, the big request brings a slice of 4 x 1, at least 8: all 7 here
    assert sum(1 for s, _ in step.items if s.request_id == "big") == 7
    run(step)
    step = sched.schedule()  # the share holds: no more preemption while both run
    assert sched.num_preemptions == 1 and waiting[0].status is Status.WAITING
    sched.finish(small)
    assert waiting[0] in [s for s, _ in sched.schedule().items]  # the slot comes back


def test_beside_other_requests_a_request_brings_a_slice_of_its_sequences():
    blocks = BlockManager(num_blocks=512, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=32, max_num_batched_tokens=256)
    big = [Sequence("big", i, [1, 2, 3], SamplingParams(n=20), seed=i) for i in range(20)]
    for s in big:
        sched.add(s)
    run(sched.schedule())
    for s in big[:5]:
        s.num_computed += 1  # five of them are ahead
    sched.add(seq("small", 3, first_token=50))
    step = sched.schedule()
    chosen = [s for s, _ in step.items if s.request_id == "big"]
    assert len(chosen) == 8 and not any(c is b for c in chosen for b in big[:5])  # max(8, 4 x 1), least advanced first
    assert "small" in {s.request_id for s, _ in step.items}


def test_admission_takes_the_request_with_the_fewest_running_first():
    blocks = BlockManager(num_blocks=256, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=3, max_num_batched_tokens=64)
    for s in [Sequence("a", i, [1, 2, 3], SamplingParams(n=4), seed=i) for i in range(4)] + [seq("b", 3), seq("c", 3)]:
        sched.add(s)
    assert sorted(s.request_id for s, _ in sched.schedule().items) == ["a", "b", "c"]
