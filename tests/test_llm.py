"""The LLM engine and the llama-family plugin against transformers on tiny random checkpoints."""

from collections import Counter

import pytest
import torch

from pyserve import LLM, SamplingParams
from pyserve.plugin import PluginRegistry
from pyserve.tasks import AttentionMetadata, KVCache

from tiny_models import load_reference, make_model

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500.0}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "gpt2": ("gpt2", {}),
}

PROMPTS = [[0, 5, 9, 40, 7], [0, 100, 3, 17, 22, 31, 8, 64, 12, 90, 4, 5, 6, 7, 8, 9, 10, 11, 44, 51, 52],
           [0, 77], [0, 15, 27, 33, 45, 56, 67, 78, 89, 90, 101, 112, 123, 134, 145, 156, 167, 178, 189, 200, 211,
                     222, 233, 244, 255, 3, 14, 25, 36, 47, 58, 69, 70, 81, 92]]


@pytest.fixture(scope="module", params=list(VARIANTS))
def model_dir(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    return make_model(tmp_path_factory.mktemp(request.param), arch, **overrides)


def one_sequence_forward(model, ids: list[int]) -> torch.Tensor:
    """All-position logits from our model for one prompt, through a fresh paged cache."""
    spec, block = model.spec, 16
    n_blocks = -(-len(ids) // block)
    cache = KVCache.allocate(spec.num_layers, n_blocks + 2, spec.num_kv_heads, block, spec.head_dim, spec.dtype,
                             spec.device)
    table = torch.arange(2, n_blocks + 2, dtype=torch.int32)  # not starting at block 0 on purpose
    slots = torch.tensor([int(table[p // block]) * block + p % block for p in range(len(ids))])
    meta = AttentionMetadata(slots, table[None], torch.tensor([len(ids)], dtype=torch.int32),
                             torch.tensor([0, len(ids)], dtype=torch.int32))
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), meta, cache)
        return model.compute_logits(hidden)


def test_prefill_logits_match_transformers(model_dir):
    model = PluginRegistry.discover().for_model(model_dir).load(model_dir)
    ref = load_reference(model_dir)
    for ids in PROMPTS:
        want = ref(torch.tensor([ids])).logits[0].float()
        got = one_sequence_forward(model, ids)
        assert (got - want).abs().max() <= 1e-4


def reference_greedy(ref, ids, n):
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=2, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_greedy_generation_matches_transformers(model_dir):
    ref = load_reference(model_dir)
    want = [reference_greedy(ref, ids, 32) for ids in PROMPTS]
    llm = LLM(model_dir, device="cpu")
    model, fused = llm.engine.model, []
    decode = model.decode

    def counted(batch, cache):  # the decode steps the model took in one call (kernels.decode_step)
        out = decode(batch, cache)
        fused.append(out is not None)
        return out
    model.decode = counted
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert llm.engine.num_free_blocks() == llm.engine.num_blocks
    # every decode step of the llama family went through the fused call; gpt2 declares none, and
    # the engine never asks it
    if model_dir.name.startswith("gpt2"):
        assert not model.fused_decode and fused == []
    else:
        assert fused and all(fused)
    assert any(fused) != model_dir.name.startswith("gpt2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama-engine"), "llama")


@pytest.fixture(scope="module")
def llama_reference(llama_dir):
    ref = load_reference(llama_dir)
    return [reference_greedy(ref, ids, 24) for ids in PROMPTS]


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("engine_args", [
    dict(max_num_batched_tokens=7),           # chunked prefill across many steps
    dict(num_blocks=6, block_size=16),        # too few blocks: preemption by recompute
    dict(enable_prefix_caching=False),
], ids=["chunked", "preempt", "no-prefix-cache"])
def test_scheduling_does_not_change_greedy_outputs(llama_dir, llama_reference, engine_args):
    llm = LLM(llama_dir, device="cpu", **engine_args)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == llama_reference
    if "num_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.num_free_blocks() == llm.engine.num_blocks


def test_a_bf16_kv_cache_holds_twice_the_tokens_and_keeps_the_greedy_outputs(llama_dir, llama_reference):
    fp32 = LLM(llama_dir, device="cpu", kv_cache_memory=2**22)
    llm = LLM(llama_dir, device="cpu", kv_cache_memory=2**22, kv_cache_dtype="bfloat16")
    assert llm.engine.num_blocks == 2 * fp32.engine.num_blocks
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == llama_reference


def test_kv_cache_dtype_is_checked():
    from pyserve.tasks import TextModelSpec, kv_cache_dtype_for
    spec = TextModelSpec(2, 2, 16, 100, 64, torch.float32, torch.device("cpu"))
    assert kv_cache_dtype_for(spec, "auto") == torch.float32
    assert kv_cache_dtype_for(spec, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        kv_cache_dtype_for(spec, "float8")
    gpu = TextModelSpec(2, 2, 16, 100, 64, torch.bfloat16, torch.device("cuda"))
    assert kv_cache_dtype_for(gpu, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="only the CPU back-end"):
        kv_cache_dtype_for(gpu, "float32")


def test_prefix_cache_hits_give_the_same_tokens(llama_dir, llama_reference):
    llm = LLM(llama_dir, device="cpu")
    long_prompt = PROMPTS[3]
    first = llm.generate([long_prompt], GREEDY)[0].token_ids
    cached_before = len(llm.engine.blocks.cached)
    assert cached_before >= 2  # full prompt blocks were registered
    again = llm.generate([long_prompt, long_prompt], GREEDY)
    assert first == llama_reference[3] and all(o.token_ids == first for o in again)


def test_every_block_is_free_after_cancelled_and_failed_requests(llama_dir):
    llm = LLM(llama_dir, device="cpu", max_num_batched_tokens=8)
    engine = llm.engine
    for i in range(6):
        engine.add_request(f"r{i}", PROMPTS[i % 4], SamplingParams(max_tokens=20, temperature=0.8, seed=i))
    engine.step()
    engine.step()
    engine.abort("r1")
    engine.abort("r4")
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("bad", PROMPTS[0], SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("bad2", [0, 10**6], SamplingParams())
    while engine.has_unfinished():
        engine.step()
    assert engine.num_free_blocks() == engine.num_blocks


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_completions(llama_dir):
    llm = LLM(llama_dir, device="cpu")
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42, n=3, ignore_eos=True)
    a = llm.generate([PROMPTS[0]], params)[0]
    b = llm.generate([PROMPTS[0], PROMPTS[1]], params)[0]  # another request in the batch
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_text_prompts_stop_strings_and_chat(llama_dir):
    llm = LLM(llama_dir, device="cpu")
    out = llm.generate("Hello world", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    tok = llm.engine.tokenizer
    assert out.prompt_token_ids == tok.encode("Hello world")
    full = tok.decode(out.token_ids)
    if "\ufffd" not in full:  # random weights may emit invalid UTF-8, whose rendering depends on cuts
        assert out.text == full
    sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
    text = llm.generate("Hello world", sampled)[0].text
    at = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    sampled.stop = [text[at:at + 2]]
    stopped = llm.generate("Hello world", sampled)[0]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.text == text[:text.find(text[at:at + 2])]
    # A stop string that straddles two tokens still stops generation and is cut from the text.
    from pyserve.tokenizer import IncrementalDetokenizer
    sampled.stop = []
    sample = llm.generate("Hello world", sampled)
    detok = IncrementalDetokenizer(tok, sample[0].prompt_token_ids)
    pieces = [detok.add(t) for t in sample[0].token_ids]
    i = next(i for i in range(len(pieces) - 1) if pieces[i] and pieces[i + 1]
             and "\ufffd" not in pieces[i][-1] + pieces[i + 1][0])
    straddle = pieces[i][-1] + pieces[i + 1][0]
    sampled.stop = [straddle]
    cut = llm.generate("Hello world", sampled)[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.text == text[:text.find(straddle)]
    chat = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, temperature=0))[0]
    assert chat.prompt_token_ids[:1] == [0] and chat.prompt_token_ids.count(0) == 1


def test_incremental_detokenizer_handles_multibyte_characters(llama_dir):
    from pyserve.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer.from_dir(llama_dir)
    text = "Ünïcödé text: café, naïve, 東京, emoji 🙂. Hello world"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [0])
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert any(piece == "" for piece in pieces)  # some tokens end inside a character and wait


def test_async_engine_streams_and_frees_blocks_on_cancel(llama_dir, llama_reference):
    import asyncio

    from pyserve.engine.llm import AsyncLLMEngine

    llm = LLM(llama_dir, device="cpu")
    engine = AsyncLLMEngine(llm.engine)

    async def collect(ids):
        outs = [out async for out in engine.generate(ids, GREEDY)]
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        return outs[-1].token_ids

    async def cancel_midway():
        stream = engine.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.token_ids) >= 3:
                break
        await stream.aclose()

    async def main():
        results = await asyncio.gather(*(collect(ids) for ids in PROMPTS), cancel_midway())
        return results[:-1]

    try:
        assert asyncio.run(main()) == llama_reference
        assert llm.engine.num_free_blocks() == llm.engine.num_blocks
        assert not llm.engine.has_unfinished()
    finally:
        engine.shutdown()


def test_a_failing_model_step_fails_only_its_requests(llama_dir):
    llm = LLM(llama_dir, device="cpu")
    engine = llm.engine
    original = engine.runner.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    engine.runner.model.forward = flaky
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=4, temperature=0))
    failed = engine.step()
    assert failed[0].error == "RuntimeError: boom" and failed[0].finished
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].token_ids) == 4
    assert engine.num_free_blocks() == engine.num_blocks


def test_generation_config_supplies_defaults(tmp_path):
    import json

    model_dir = make_model(tmp_path / "defaults", "llama")
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.8, "top_k": 5}))
    llm = LLM(model_dir, device="cpu")
    resolved = SamplingParams().resolved(llm.engine.defaults)
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.6, 0.8, 5)
    assert SamplingParams(temperature=0.0).resolved(llm.engine.defaults).temperature == 0.0


@pytest.fixture
def batch_invariant():
    from pyserve import kernels
    before = kernels.batch_invariant()
    kernels.set_batch_invariant(True)
    yield
    kernels.set_batch_invariant(before)


def test_batch_invariant_mode_makes_a_seeded_completion_bit_identical_in_any_batch(llama_dir, batch_invariant):
    """PYSERVE_BATCH_INVARIANT=1: the same seeded, sampled completion (tokens and every logprob)
    alone and inside many random mixes of other requests, prompt lengths, n, chunked prefills
    and arrival steps. (Without it, BLAS's row-count-dependent sums move logprobs by ~1e-7 and can
    flip a sampled token.)"""
    import random
    llm = LLM(llama_dir, device="cpu", max_num_batched_tokens=40)
    target = SamplingParams(max_tokens=24, temperature=1.0, seed=5, logprobs=3, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], target)[0].outputs[0]
    pick = random.Random(0)
    engine = llm.engine
    for trial in range(8):
        others = [(f"o{trial}-{i}", pick.choice(PROMPTS) + [pick.randrange(300) for _ in range(pick.randrange(30))],
                   SamplingParams(max_tokens=pick.randint(1, 30), temperature=pick.choice([0, 0.7, 1.3]),
                                  n=pick.randint(1, 4), seed=pick.randrange(100), ignore_eos=True))
                  for i in range(pick.randint(1, 5))]
        join = pick.randint(0, 3)
        for rid, prompt, params in others[:2]:
            engine.add_request(rid, prompt, params)
        for _ in range(join):
            engine.step()
        engine.add_request(f"target{trial}", PROMPTS[1], target)
        for rid, prompt, params in others[2:]:
            engine.add_request(rid, prompt, params)
        got = None
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished and out.request_id == f"target{trial}":
                    got = out.outputs[0]
        assert got.token_ids == alone.token_ids, f"trial {trial}"
        assert got.logprobs == alone.logprobs, f"trial {trial}"


def test_a_short_request_shares_its_steps_with_a_slice_of_a_huge_one(llama_dir):
    """A 4-token request that arrives beside a request holding every slot shares each of its
    steps with at most 8 of the other's 16 sequences (a step waits on all it carries), while the
    huge request goes on advancing in every step and then finishes every sequence."""
    llm = LLM(llama_dir, device="cpu", max_num_seqs=16)
    engine = llm.engine
    run = engine.runner.run
    carried = []

    def counted_run(step, *args):
        carried.append(Counter(seq.request_id for seq, _ in step.items))
        return run(step, *args)
    engine.runner.run = counted_run
    engine.add_request("huge", PROMPTS[0], SamplingParams(max_tokens=300, n=16, temperature=1.0, seed=1,
                                                          ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert carried[-1]["huge"] == 16  # alone, it brings every sequence
    for i in range(10):  # short requests back to back
        carried.clear()
        engine.add_request(f"short{i}", PROMPTS[2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        while f"short{i}" in engine.requests:
            engine.step()
        assert len(carried) <= 6  # its prefill and decodes, not a wait for slots
        assert all(0 < step["huge"] <= 8 for step in carried), carried
    while engine.has_unfinished():
        engine.step()
    assert carried[-1]["huge"] <= 16
    out = llm.engine.requests.get("huge")
    assert out is None  # every one of its sequences ran to the end
