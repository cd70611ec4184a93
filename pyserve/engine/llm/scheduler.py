"""Continuous batching: which sequences run in the next step, and how many tokens each brings.

Each step has a token budget. Running sequences go first (a decode brings one token, a
sequence still prefilling brings its next chunk); waiting sequences are admitted while budget,
blocks and the running cap allow, their prompts split across steps when long (chunked
prefill). Admission is fair between requests: the next sequence admitted is the first waiting
one of the request with the fewest running, and when the running cap is reached, a request
holding more than its share of it (the cap over the requests that want slots) gives a sequence
back for each waiting request below its share, so one request with n=128 does not hold every
slot while another's 4 tokens wait for it. And since a step waits on every sequence it carries,
beside other requests a request brings only a slice of its sequences to each step (`_slices`).
When blocks run out, the most recently admitted running sequence is preempted: its blocks are
freed and it waits to be recomputed (its cached prefix is reused). A waiting sequence that
cannot fit even into an empty cache is rejected (the engine refuses such requests at admission;
this is the backstop).
"""

from collections import Counter, deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status

# Beside other requests, a request brings at most max(SLICE_ROWS, JOIN_FACTOR x their sequences)
# of its own to a step (see Scheduler._slices).
SLICE_ROWS = 8
JOIN_FACTOR = 4


@dataclass
class ScheduledStep:
    items: list[tuple[Sequence, int]]  # (sequence, number of new tokens this step)
    rejected: list[Sequence] = field(default_factory=list)  # removed from the queue: they can never fit

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int = 32):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras  # distinct LoRA adapters among the running sequences
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        items: list[tuple[Sequence, int]] = []
        budget = self._schedule_running(items, self.max_tokens, self._slices())
        rejected: list[Sequence] = []
        adapters = {s.adapter for s in self.running if s.adapter >= 0}
        running_by = Counter(s.request_id for s in self.running)
        self._share_slots(running_by, items)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = min(self.waiting, key=lambda s: running_by[s.request_id])  # the first of the fewest
            if seq.adapter >= 0 and seq.adapter not in adapters and len(adapters) >= self.max_loras:
                break  # in order: it waits until a running adapter's sequences are done
            if seq.adapter >= 0:
                adapters.add(seq.adapter)
            if seq.params.prompt_logprobs is None:  # scoring the prompt recomputes a cached prefix
                self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.ensure_capacity(seq, seq.num_computed + n):
                if self.running:  # blocks will come free as they finish
                    break
                self.finish(seq)  # nothing holds blocks, yet it does not fit: it never will
                rejected.append(seq)
                continue
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            running_by[seq.request_id] += 1
            items.append((seq, n))
            budget -= n
        return ScheduledStep(items, rejected)

    def _slices(self) -> set[int]:
        """The running sequences this step carries (by id()): all of them, except that beside other
        requests, one request brings at most max(SLICE_ROWS, JOIN_FACTOR x the others' running
        sequences), its least advanced first. A step costs about the same for each sequence and
        every sequence in it waits for all: a 4-token request beside another's 128 sequences took
        20 times as long as alone; beside a slice of 8 it takes about twice."""
        by_request: dict[str, list[Sequence]] = {}
        for seq in self.running:
            if seq.status is Status.RUNNING:
                by_request.setdefault(seq.request_id, []).append(seq)
        wanting = Counter({request_id: len(seqs) for request_id, seqs in by_request.items()})
        wanting.update(s.request_id for s in self.waiting)  # those about to be admitted count too
        total = sum(wanting.values())
        carried = set()
        for request_id, seqs in by_request.items():
            others = total - wanting[request_id]
            if others and len(seqs) > max(SLICE_ROWS, JOIN_FACTOR * others):
                seqs = sorted(seqs, key=lambda s: s.num_computed)[:max(SLICE_ROWS, JOIN_FACTOR * others)]
            carried.update(id(seq) for seq in seqs)
        return carried

    def _schedule_running(self, items: list[tuple[Sequence, int]], budget: int, carried: set[int]) -> int:
        """The carried running sequences into `items`, preempting the latest admitted when blocks
        run out; the budget left."""
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or id(seq) not in carried:
                continue  # preempted earlier in this loop, or sits out this step
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.ensure_capacity(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                items.append((seq, n))
                budget -= n
        return budget

    def _share_slots(self, running_by: Counter, items: list[tuple[Sequence, int]]) -> None:
        """With the running cap reached: for each waiting request (in arrival order) below its
        share of the cap, preempt the most advanced sequence of the request holding the most
        slots, if that is more than its share; the freed slot goes to the waiting request (admission picks
        the request with the fewest running)."""
        if len(self.running) < self.max_num_seqs or not self.waiting:
            return
        share = max(1, self.max_num_seqs // len(set(running_by) | {s.request_id for s in self.waiting}))
        for request_id in dict.fromkeys(s.request_id for s in self.waiting):
            if running_by[request_id] >= share:
                continue
            hog = max(running_by, key=running_by.get)
            if running_by[hog] <= share:
                return
            # its most advanced sequence waits: the slot may go back and forth, no sequence falls behind
            victim = max((s for s in self.running if s.request_id == hog), key=lambda s: s.num_computed)
            self._preempt(victim)
            items[:] = [(s, n) for s, n in items if s is not victim]
            running_by[hog] -= 1

    def commit(self, step: ScheduledStep) -> list[Sequence]:
        """Count a step's tokens as computed and offer their full blocks to the prefix cache; the
        sequences that are done with nothing to draw (max_tokens 0: their prompt scored), finished."""
        done = []
        for seq, n in step.items:
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
            for k, span in enumerate(seq.images):  # an image's features are done with once its tokens are in
                if span.start + span.length <= seq.num_computed:
                    seq.image_embeds.pop(k, None)
            if seq.params.max_tokens == 0 and seq.num_computed == len(seq.token_ids):
                seq.finish_reason = "length"
                self.finish(seq)
                done.append(seq)
        return done

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
