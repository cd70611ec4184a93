"""Typed inputs and outputs of the kernel ops that take more than a few tensors."""

import array
from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch


@dataclass
class SamplingRow:
    """One row's sampling parameters, as a request states them."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 (or >= vocab) means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    step: int = 0  # index of the token being drawn; with seed, it fixes the random draw
    prompt_tokens: Sequence[int] = ()
    output_tokens: Sequence[int] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        """Whether the row's token is its logits' first maximum (`kernels.greedy`): temperature 0
        with nothing that changes the logits. Top-k, top-p and min-p always keep the maximum."""
        return (self.temperature == 0.0 and self.repetition_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and not self.logit_bias)


_ARRAY_TYPECODES = {torch.float32: "f", torch.int32: "i", torch.int64: "q"}


def _column(values: list, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of Python numbers (the tensor keeps the array's buffer alive)."""
    buffer = array.array(_ARRAY_TYPECODES[dtype], values)
    return torch.frombuffer(buffer, dtype=dtype) if values else torch.empty(0, dtype=dtype)


def _csr(lists: list[Sequence], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = [0]
    for items in lists:
        offsets.append(offsets[-1] + len(items))
    return _column([x for items in lists for x in items], dtype), _column(offsets, torch.int32)


@dataclass
class SamplingTensors:
    """Per-row sampling parameters for a batch, as flat tensors (ragged lists in CSR form)."""

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int32
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    seed: torch.Tensor  # [B] int64
    step: torch.Tensor  # [B] int64
    prompt_tokens: torch.Tensor  # [sum] int32
    prompt_offsets: torch.Tensor  # [B + 1] int32
    output_tokens: torch.Tensor  # [sum] int32
    output_offsets: torch.Tensor  # [B + 1] int32
    bias_tokens: torch.Tensor  # [sum] int32
    bias_values: torch.Tensor  # [sum] float32
    bias_offsets: torch.Tensor  # [B + 1] int32
    # Structured output: packed masks of allowed tokens (bit t % 32 of word t // 32 set: token t may
    # be drawn), one per constrained row; allowed_row[b] picks row b's mask, -1 leaves b unmasked.
    allowed_bits: torch.Tensor | None = None  # [M, ceil(V / 32)] int32
    allowed_row: torch.Tensor | None = None  # [B] int32

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], device: torch.device | str = "cpu") -> "SamplingTensors":
        # Each column through an array's buffer: a decode step builds these for every batch, and at
        # batch 1 torch.tensor's parsing of small lists costs about what the sampling kernel does.
        temperature, top_p, min_p, repetition, presence, frequency = (
            _column([getattr(r, name) for r in rows], torch.float32)
            for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                         "frequency_penalty"))
        seed, step = _column([r.seed for r in rows], torch.int64), _column([r.step for r in rows], torch.int64)
        prompts, outputs, biases = [r.prompt_tokens for r in rows], [r.output_tokens for r in rows], \
            [r.logit_bias for r in rows]
        if any(prompts) or any(outputs) or any(biases):
            prompt, prompt_off = _csr(prompts, torch.int32)
            output, output_off = _csr(outputs, torch.int32)
            bias_tok, bias_off = _csr([list(b) for b in biases], torch.int32)
            bias_val, _ = _csr([list(b.values()) for b in biases], torch.float32)
        else:  # the common case: no lists at all (the kernels only read these tensors)
            prompt = output = bias_tok = torch.empty(0, dtype=torch.int32)
            prompt_off = output_off = bias_off = torch.zeros(len(rows) + 1, dtype=torch.int32)
            bias_val = torch.empty(0, dtype=torch.float32)
        t = cls(temperature=temperature, top_k=_column([r.top_k for r in rows], torch.int32), top_p=top_p,
                min_p=min_p, repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
                seed=seed, step=step, prompt_tokens=prompt, prompt_offsets=prompt_off, output_tokens=output,
                output_offsets=output_off, bias_tokens=bias_tok, bias_values=bias_val, bias_offsets=bias_off)
        return t if torch.device(device).type == "cpu" else t.to(device)

    def to(self, device: torch.device | str) -> "SamplingTensors":
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return SamplingTensors(**{f.name: moved(getattr(self, f.name)) for f in fields(self)})

    def with_allowed(self, bits: torch.Tensor, rows: torch.Tensor) -> "SamplingTensors":
        """A copy whose rows draw only allowed tokens (see `allowed_bits`)."""
        dev = self.temperature.device
        return replace(self, allowed_bits=bits.to(dev), allowed_row=rows.to(dev))

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B] int64, the chosen token of each row
    logprobs: torch.Tensor  # [B] float32, its log-probability under the model's raw distribution
    top_tokens: torch.Tensor  # [B, n] int64, the n most likely tokens (raw distribution)
    top_logprobs: torch.Tensor  # [B, n] float32


@dataclass
class DecodeOutput:
    """What `kernels.decode_step` returns."""

    logits: torch.Tensor  # [B, vocab] float32
    greedy: list[int]  # each row's first maximum, as `kernels.greedy` finds it


class Coef:
    """Columns of the per-row denoising coefficient table (see `denoise_step`).

    guided = uncond + GUIDANCE * (cond - uncond)
    x0     = X0_X * x + X0_OUT * guided, then clamped to [-CLIP, CLIP] when CLIP > 0
    eps    = EPS_X * x + EPS_OUT * guided
    x_next = NEXT_X * x + NEXT_X0 * x0 + NEXT_EPS * eps + NEXT_PREV_X0 * prev_x0 + NOISE * z
    """

    GUIDANCE = 0
    X0_X = 1
    X0_OUT = 2
    EPS_X = 3
    EPS_OUT = 4
    CLIP = 5
    NEXT_X = 6
    NEXT_X0 = 7
    NEXT_EPS = 8
    NEXT_PREV_X0 = 9
    NOISE = 10
    COUNT = 11

    @classmethod
    def layout(cls) -> dict[str, int]:
        """Column name -> index (COUNT: the width), as the C++ and CUDA extensions export it too
        (their DENOISE_COEF, from csrc/denoise_coef.h)."""
        return {name: value for name, value in vars(cls).items() if name.isupper()}


@dataclass
class DecoderLayerWeights:
    """One Llama-style decoder layer's weights for `kernels.decoder_stack`. Products are [out, in]
    tensors or packed `QuantizedWeight`s; qkv rows are q heads, then k heads, then v heads, and
    gate_up rows the gate, then the up projection."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: object
    o: object
    gate_up: object
    down: object
    qkv_bias: torch.Tensor | None = None


@dataclass
class DecoderStackWeights:
    layers: list[DecoderLayerWeights]
    final_norm: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    # The C++ back-end's table of addresses, built at the first call for a given KV cache, and
    # whether that cache is one it reads.
    table: torch.Tensor | None = field(default=None, repr=False)
    table_key: tuple = field(default=(), repr=False)
    table_cache_fits: bool = field(default=False, repr=False)
    cpu_readable: bool | None = field(default=None, repr=False)  # the C++ stack can read every weight
    cpu_max_rows: int = field(default=0, repr=False)  # and takes this many rows a call


@dataclass
class DecoderModelWeights:
    """A decoder stack with its two ends, for `kernels.decode_step`: the token embeddings
    [vocab, hidden], the rotary inverse frequencies [head_dim / 2] and the output product
    [vocab, hidden] (a tensor or a packed `QuantizedWeight`; no bias)."""

    stack: DecoderStackWeights
    embedding: torch.Tensor
    inv_freq: torch.Tensor
    head: object
    checked: bool = field(default=False, repr=False)  # shapes found consistent (once: decode steps pass them)
    # The C++ back-end's: whether it reads the ends in place, the rows it takes, and the head's
    # address fields.
    cpu_readable: bool | None = field(default=None, repr=False)
    cpu_max_rows: int = field(default=0, repr=False)
    head_fields: list[int] = field(default_factory=list, repr=False)
