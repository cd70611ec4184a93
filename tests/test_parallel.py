"""Tensor parallelism on two CPU ranks (gloo): the split model against the single-process engine."""

import pytest

from pyserve import LLM, SamplingParams

from tiny_models import make_model

PROMPTS = ["The quick brown fox jumps over the lazy dog. Hello", "Once upon a time", "Ünïcödé 東京 🙂"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # GQA (4 heads, 2 KV heads); q/k/v biases
def test_two_ranks_match_one_process(arch, tmp_path):
    model_dir = make_model(tmp_path / arch, arch=arch)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=5, logprobs=5)
    want = LLM(model_dir, device="cpu").generate(PROMPTS, params)
    split = LLM(model_dir, device="cpu", tensor_parallel_size=2)
    workers = list(split.engine.model.workers)
    try:
        assert [w.is_alive() for w in workers] == [True]
        assert split.engine.model.spec.num_kv_heads == 1  # each rank holds one of the two KV heads
        got = split.generate(PROMPTS, params)
        # A decode step after the first batch, with cached blocks: another request on the same prefix.
        plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)  # (scoring skips the cache)
        again = split.generate(PROMPTS[0] + " again", plain)[0]
    finally:
        split.engine.model.close()
    for g, w in zip(got, want):
        for scored_g, scored_w in zip(g.prompt_logprobs[1:] + g.outputs[0].logprobs,
                                        w.prompt_logprobs[1:] + w.outputs[0].logprobs):
            assert scored_g["token_id"] == scored_w["token_id"]
            assert abs(scored_g["logprob"] - scored_w["logprob"]) <= 1e-4
            assert scored_g["top"].keys() == scored_w["top"].keys()
            assert max(abs(scored_g["top"][t] - scored_w["top"][t]) for t in scored_w["top"]) <= 1e-4
        assert g.token_ids == w.token_ids
    assert again.num_cached_tokens > 0
    assert again.token_ids == LLM(model_dir, device="cpu").generate(PROMPTS[0] + " again", plain)[0].token_ids
    assert not any(worker.is_alive() for worker in workers)  # close() stopped the other rank


def test_what_tensor_parallelism_refuses(tmp_path):
    from pyserve.errors import ClientError
    model_dir = make_model(tmp_path / "llama", arch="llama")
    with pytest.raises(ValueError, match="attention heads \\(4\\) do not split over 3 ranks"):
        LLM(model_dir, device="cpu", tensor_parallel_size=3)
    import peft
    from tiny_models import load_reference
    peft.get_peft_model(load_reference(model_dir), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    split = LLM(model_dir, device="cpu", tensor_parallel_size=2)
    try:
        with pytest.raises(ClientError, match="not served with tensor parallelism"):
            split.engine.load_lora("x", tmp_path / "adapter")
        assert split.generate("Hello", SamplingParams(max_tokens=2))[0].token_ids  # still serving
    finally:
        split.engine.model.close()
    gpt2 = make_model(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel does not support tensor parallelism"):
        LLM(gpt2, device="cpu", tensor_parallel_size=2)
