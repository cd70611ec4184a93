"""Turns a scheduled step into the model's flat batch, runs it, and samples the rows that end."""

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ... import kernels
from ...kernels.types import SamplingRow, SamplingTensors
from ...tasks import AttentionMetadata, DecodeBatch, KVCache, StepImages, TextGenerationModel
from .scheduler import ScheduledStep
from .sequence import Sequence
from .structured import MaskFiller


@dataclass
class SampledToken:
    seq: Sequence
    token: int
    logprob: float | None  # None where the request asked for no log-probabilities
    top: dict[int, float]


@dataclass
class PromptLogprobs:
    """Log-probabilities of prompt tokens first + 1 ... (each given those before), from one chunk."""

    seq: Sequence
    first: int  # the position of the first token scored
    entries: list[dict]  # {"token_id", "logprob", "top": {id: logprob}}


@dataclass
class StepResult:
    sampled: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: TextGenerationModel, cache: KVCache, block_size: int):
        self.model, self.cache, self.block_size = model, cache, block_size
        self.device = model.spec.device
        self.masks = MaskFiller(model.spec.vocab_size)

    def _metadata(self, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        ids, positions, slots, seq_lens, starts, sample_rows = [], [], [], [], [0], []
        for seq, n in step.items:
            first = seq.num_computed
            ids += seq.token_ids[first:first + n]
            for pos in range(first, first + n):
                positions.append(pos)
                slots.append(self._slot(seq, pos))
            seq_lens.append(first + n)
            starts.append(starts[-1] + n)
            if first + n == len(seq.token_ids):
                sample_rows.append(starts[-1] - 1)
        width = max(len(seq.block_table) for seq, _ in step.items)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in step.items]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(n for _, n in step.items), max_seq_len=max(seq_lens))
        return (torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(positions, dtype=torch.int64, device=dev),
                meta, sample_rows)

    def _slot(self, seq: Sequence, pos: int) -> int:
        """The KV-cache slot of the sequence's token at pos."""
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _decode_batch(self, step: ScheduledStep) -> DecodeBatch | None:
        """The step as a DecodeBatch when every sequence brings its one next token and draws the
        one after it, without a LoRA adapter or prompt scoring, and that token is not an image's
        (a prompt's last chunk may be one image token); else None."""
        batch = DecodeBatch([], [], [], [])
        for seq, n in step.items:
            pos = seq.num_computed
            if (n != 1 or pos + 1 != len(seq.token_ids) or seq.adapter >= 0 or seq.params.max_tokens == 0
                    or seq.params.prompt_logprobs is not None
                    or any(span.start <= pos < span.start + span.length for span in seq.images)):
                return None
            batch.token_ids.append(seq.token_ids[pos])
            batch.positions.append(pos)
            batch.slots.append(self._slot(seq, pos))
            batch.block_tables.append(seq.block_table)
        return batch

    @torch.inference_mode()
    def run(self, step: ScheduledStep, eos_ids: list[int], adapter_slots: dict[int, int] | None = None) -> StepResult:
        """`adapter_slots` maps the sequences' LoRA adapters to their slots in the model's layers."""
        ending = [seq for seq, n in step.items if seq.num_computed + n == len(seq.token_ids)]
        constrained = [seq.matcher for seq in ending if seq.matcher is not None and seq.params.max_tokens != 0]
        masks = self.masks.start(constrained) if constrained else None  # overlaps the forward pass
        # Decode steps go from token ids to logits in one call where the model has one (not in
        # batch-invariant mode: its fused ops round differently from the step-by-step path that
        # mixed steps take)
        batch = self._decode_batch(step) if self.model.fused_decode and not kernels.batch_invariant() else None
        out = self.model.decode(batch, self.cache) if batch is not None else None
        if out is not None:
            return StepResult(sampled=self._draw(ending, out.logits, eos_ids, masks, out.greedy))
        input_ids, positions, meta, rows = self._metadata(step)
        # A request with max_tokens 0 (prompt scoring) ends without a draw.
        sampling = [(seq, row) for seq, row in zip(ending, rows) if seq.params.max_tokens != 0]
        images = self._step_images(step)
        adapters = None
        if any(seq.adapter >= 0 for seq, _ in step.items):  # each token row its sequence's LoRA adapter
            adapters = torch.tensor([adapter_slots[seq.adapter] if seq.adapter >= 0 else -1
                                     for seq, n in step.items for _ in range(n)], dtype=torch.int32,
                                    device=self.device)
        if images is None and adapters is None:
            hidden = self.model.forward(input_ids, positions, meta, self.cache)
        else:
            hidden = self.model.forward(input_ids, positions, meta, self.cache, images, adapters)
        result = StepResult(prompt_logprobs=self._prompt_logprobs(step, hidden))
        if sampling:
            picked = [row for _, row in sampling]
            # decode steps sample every row: no gather then
            last = hidden if picked == list(range(hidden.shape[0])) else hidden[picked]
            result.sampled = self._draw([seq for seq, _ in sampling], self.model.compute_logits(last), eos_ids, masks)
        return result

    def _step_images(self, step: ScheduledStep) -> StepImages | None:
        """Features for the step's image tokens: images whose tokens this step brings are encoded
        together in one call (a chunk may bring part of an image: the rest waits on the sequence)."""
        wanted = [(seq, k) for seq, n in step.items for k, span in enumerate(seq.images)
                  if span.start < seq.num_computed + n and seq.num_computed < span.start + span.length
                  and k not in seq.image_embeds]
        if wanted:
            pixels = torch.stack([seq.images[k].image.pixels for seq, k in wanted]).to(self.device)
            for (seq, k), features in zip(wanted, self.model.encode_images(pixels)):
                seq.image_embeds[k] = features
        rows, embeds, start = [], [], 0
        for seq, n in step.items:
            first = seq.num_computed
            for k, span in enumerate(seq.images):
                lo, hi = max(first, span.start), min(first + n, span.start + span.length)
                if lo < hi:
                    rows.extend(range(start + lo - first, start + hi - first))
                    embeds.append(seq.image_embeds[k][lo - span.start:hi - span.start])
            start += n
        if not rows:
            return None
        return StepImages(torch.tensor(rows, dtype=torch.int64, device=self.device), torch.cat(embeds))

    def _draw(self, seqs: list[Sequence], logits: torch.Tensor, eos_ids: list[int], masks: Future | None,
              greedy: list[int] | None = None) -> list[SampledToken]:
        """Each sequence's next token from its row of logits; `greedy`, where given, holds each
        row's first maximum already."""
        vocab = self.model.spec.vocab_size
        rows = [self._row(seq, eos_ids, vocab) for seq in seqs]
        if masks is None and all(row.greedy and seq.params.logprobs is None for row, seq in zip(rows, seqs)):
            # the common greedy step: the sampler's first maximum, without its other passes
            tokens = greedy if greedy is not None else kernels.greedy(logits).tolist()
            return [SampledToken(seq, token, None, {}) for seq, token in zip(seqs, tokens)]
        params = SamplingTensors.from_rows(rows, self.device)
        if masks is not None:
            which, index = [], 0
            for seq in seqs:
                which.append(index if seq.matcher is not None else -1)
                index += seq.matcher is not None
            params = params.with_allowed(self.masks.wait(masks), torch.tensor(which, dtype=torch.int32))
        num_logprobs = max((seq.params.logprobs or 0) for seq in seqs)
        result = kernels.sample(logits, params, num_logprobs=num_logprobs)
        tokens, logprobs = result.tokens.tolist(), result.logprobs.tolist()
        top_ids, top_lps = result.top_tokens.tolist(), result.top_logprobs.tolist()
        return [SampledToken(seq, tokens[i], logprobs[i],
                             dict(zip(top_ids[i][:seq.params.logprobs or 0], top_lps[i][:seq.params.logprobs or 0])))
                for i, seq in enumerate(seqs)]

    def _prompt_logprobs(self, step: ScheduledStep, hidden: torch.Tensor) -> list[PromptLogprobs]:
        """Scores of the prompt tokens this step's chunks predict, for sequences that ask for them:
        the logits at position p score prompt token p + 1."""
        out, start = [], 0
        for seq, n in step.items:
            first, stop = seq.num_computed, min(seq.num_computed + n, len(seq.prompt_ids) - 1)
            if seq.params.prompt_logprobs is not None and first < stop:
                logprobs = torch.log_softmax(self.model.compute_logits(hidden[start:start + stop - first]).float(), -1)
                targets = torch.tensor(seq.prompt_ids[first + 1:stop + 1], device=logprobs.device)
                chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
                top = torch.topk(logprobs, seq.params.prompt_logprobs, dim=-1)
                top_ids, top_lps = top.indices.tolist(), top.values.tolist()
                out.append(PromptLogprobs(seq, first + 1, [
                    {"token_id": t, "logprob": lp, "top": dict(zip(ids, lps))}
                    for t, lp, ids, lps in zip(seq.prompt_ids[first + 1:stop + 1], chosen, top_ids, top_lps)]))
            start += n
        return out

    @staticmethod
    def _row(seq: Sequence, eos_ids: list[int], vocab_size: int) -> SamplingRow:
        p = seq.params
        penalised = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        bias = dict(p.logit_bias)
        if len(seq.output_ids) < p.min_tokens:  # too early to stop: ban the tokens that would
            for token in ([] if p.ignore_eos else eos_ids) + list(p.stop_token_ids):
                bias[token] = float("-inf")
        return SamplingRow(
            temperature=p.temperature, top_k=min(max(p.top_k, 0), vocab_size), top_p=p.top_p, min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, seed=seq.seed, step=len(seq.output_ids),
            prompt_tokens=seq.prompt_ids if p.repetition_penalty != 1.0 else (),
            # Only penalties read past tokens: without them, no step copies a growing list.
            output_tokens=seq.output_ids if penalised else (), logit_bias=bias)
