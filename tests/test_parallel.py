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


def test_one_kv_head_is_replicated_over_two_ranks(tmp_path):
    """8 query heads over one KV head: each rank keeps 4 query heads and a copy of the KV head,
    and the split model draws the single process's greedy tokens."""
    model_dir = make_model(tmp_path / "qwen2-mqa", arch="qwen2", num_attention_heads=8, num_key_value_heads=1)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(model_dir, device="cpu").generate(PROMPTS, params)]
    split = LLM(model_dir, device="cpu", tensor_parallel_size=2)
    try:
        assert split.engine.model.spec.num_kv_heads == 1
        assert [o.token_ids for o in split.generate(PROMPTS, params)] == want
    finally:
        split.engine.model.close()


FLAKY = '''
import multiprocessing

from pyserve_plugins.llama import LlamaPlugin


class FlakyLlama(LlamaPlugin):
    """Loads in the serving process; any other rank fails to start."""
    name = "flaky-llama"

    def load(self, model_dir, **options):
        if multiprocessing.parent_process() is not None:
            raise RuntimeError("this rank cannot start")
        return super().load(model_dir, **options)


plugin = FlakyLlama()
'''


def test_a_rank_that_fails_to_start_fails_the_call_with_its_error(tmp_path):
    import json
    import threading
    model_dir = make_model(tmp_path / "llama", arch="llama")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "pyserve": {"plugin": "flaky-llama"}}))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "flaky.py").write_text(FLAKY)
    raised = []

    def start():
        try:
            LLM(model_dir, device="cpu", tensor_parallel_size=2, plugin_dirs=[str(tmp_path / "plugins")])
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            raised.append(exc)
    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(timeout=120)  # the group's own timeout is 10 minutes: a wait for it would end here
    assert not thread.is_alive(), "the call waited on a rank that had failed"
    assert len(raised) == 1 and "rank 1 failed to start: RuntimeError: this rank cannot start" in str(raised[0])
