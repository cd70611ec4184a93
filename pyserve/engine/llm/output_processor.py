"""Sampled tokens into answers: each token appended, detokenized and scored; stop tokens, stop
strings, lengths and grammars decide when a sequence finishes; requests become `RequestOutput`s."""

from ...errors import ClientError, InvalidParameter
from .input_processor import Request
from .runner import SampledToken
from .sequence import CompletionOutput, RequestOutput, Sequence
from .structured import advance


class OutputProcessor:
    def __init__(self, eos_ids: list[int], max_model_len: int):
        self.eos_ids, self.max_model_len = eos_ids, max_model_len

    @staticmethod
    def add_prompt_logprobs(scored_runs) -> None:
        """Each run of scored prompt tokens into its sequence's prompt logprobs."""
        for scored in scored_runs:
            scored.seq.prompt_logprobs[scored.first:scored.first + len(scored.entries)] = scored.entries

    def accept(self, s: SampledToken) -> str | None:
        """Add a sampled token to its sequence; the sequence's finish reason if it is now done."""
        seq, p = s.seq, s.seq.params
        seq.append(s.token)
        if p.logprobs is not None:
            seq.logprobs.append({"token_id": s.token, "logprob": s.logprob, "top": s.top})
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(s.token)
        try:
            complete = seq.matcher is not None and advance(seq.matcher, s.token)
        except RuntimeError as exc:  # the constraint cannot go on (llguidance's limits): the request's fault
            raise InvalidParameter(p.structured.field, f"the constraint failed while generating: {exc}") from None
        may_stop = len(seq.output_ids) >= p.min_tokens
        reason = None
        if complete and s.token in self.eos_ids:
            reason = "stop"
        elif may_stop and ((not p.ignore_eos and s.token in self.eos_ids) or s.token in p.stop_token_ids):
            reason = "stop"
        elif may_stop and p.stop and self._cut_at_stop_string(seq):
            seq.finish_reason = "stop"  # text already cut: nothing held back is wanted
            return seq.finish_reason
        elif p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        elif len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        elif complete:  # the grammar allows nothing more
            reason = "stop"
        if reason is not None:
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.flush()
            seq.finish_reason = reason
        return reason

    @staticmethod
    def _cut_at_stop_string(seq: Sequence) -> bool:
        hits = [at for at in (seq.text.find(stop) for stop in seq.params.stop) if at >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
        return bool(hits)

    @staticmethod
    def output(request: Request, finished: bool, error: ClientError | str | None = None) -> RequestOutput:
        """The request's output; `error` a ClientError (the request's fault) or text (the model's)."""
        outs = [CompletionOutput(seq.index, seq.text, list(seq.output_ids), seq.finish_reason,
                                 list(seq.logprobs) if request.params.logprobs is not None else None)
                for seq in request.seqs]
        first = request.seqs[0]
        status, field = (error.status, error.field) if isinstance(error, ClientError) else (500, None)
        message = error.message if isinstance(error, ClientError) else error
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outs, finished, message,
                             status, field, times=request.times, num_cached_tokens=first.num_cached_tokens,
                             prompt_logprobs=first.prompt_logprobs if request.params.prompt_logprobs is not None
                             else None)
