"""LoRA: the batched kernel (each row gathers its own adapter, Punica's BGMV) on every back-end
against the reference, and the reference against the plain definition."""

import pytest
import torch

from pyserve import kernels
from pyserve.kernels import reference

from conftest import backend_params

BACKENDS = backend_params()


def adapters(count: int, n: int, k: int, ranks: list[int], seed: int = 0):
    """Stacked adapter weights padded to the largest rank (padding left as noise: it must not be read)."""
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    a, b = torch.randn(count, r, k, generator=g), torch.randn(count, n, r, generator=g)
    return a, b, torch.tensor(ranks, dtype=torch.int32), torch.rand(count, generator=g) + 0.5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("tokens,n,k", [(1, 8, 16), (7, 100, 70), (40, 300, 256)])
def test_mixed_adapters_and_ranks_match_the_reference(backend, device, tokens, n, k):
    a, b, rank, scale = adapters(4, n, k, [1, 8, 3, 16])
    g = torch.Generator().manual_seed(tokens)
    x, y = torch.randn(tokens, k, generator=g), torch.randn(tokens, n, generator=g)
    index = torch.randint(-1, 4, (tokens,), generator=g, dtype=torch.int32)
    index[0] = 3
    want = y.clone()
    reference.lora(want, x, a, b, index, rank, scale)
    got = y.clone().to(device)  # (to() on the same device would alias y)
    kernels.lora(got, x.to(device), a.to(device), b.to(device), index.to(device), rank.to(device), scale.to(device),
                 backend=backend)
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-4)
    for t, i in enumerate(index.tolist()):  # the definition, row by row
        delta = 0 if i < 0 else scale[i] * (b[i, :, :rank[i]] @ (a[i, :rank[i]] @ x[t]))
        torch.testing.assert_close(want[t], y[t] + delta, atol=1e-3, rtol=1e-4)


def test_lora_checks_its_arguments():
    a, b, rank, scale = adapters(2, 8, 16, [2, 4])
    y, x = torch.zeros(3, 8), torch.zeros(3, 16)
    with pytest.raises(kernels.KernelInputError, match="index must be in"):
        kernels.lora(y, x, a, b, torch.tensor([0, 2, -1], dtype=torch.int32), rank, scale)
    with pytest.raises(kernels.KernelInputError, match="rank must be in"):
        kernels.lora(y, x, a, b, torch.zeros(3, dtype=torch.int32), torch.tensor([2, 9], dtype=torch.int32), scale)
    with pytest.raises(kernels.KernelInputError, match="b must have shape"):
        kernels.lora(y, x, a, b[:, :4], torch.zeros(3, dtype=torch.int32), rank, scale)


# -- adapters on a model, against transformers + peft ----------------------------------------------

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig arguments
    "all": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora-some": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gate-only": dict(r=2, lora_alpha=16, target_modules=["gate_proj"]),
    "attn-out": dict(r=3, lora_alpha=6, target_modules=["o_proj", "k_proj"]),
}


@pytest.fixture(scope="module")
def peft_models(tiny_llama_dir, tmp_path_factory):
    """name -> (adapter directory, the peft model): random A and B (B non-zero), saved by peft."""
    import peft
    from tiny_models import load_reference
    out = {}
    for name, kw in ADAPTERS.items():
        torch.manual_seed(len(out))
        model = peft.get_peft_model(load_reference(tiny_llama_dir), peft.LoraConfig(init_lora_weights=False, **kw))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model.eval())
    return out


@pytest.fixture(scope="module")
def lora_llm(tiny_llama_dir, peft_models):
    from pyserve import LLM
    return LLM(tiny_llama_dir, device="cpu", lora={name: path for name, (path, _) in peft_models.items()})


PROMPT = "The quick brown fox jumps over the lazy dog. Hello"


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapters_match_peft(lora_llm, peft_models, name):
    from pyserve import SamplingParams
    model = peft_models[name][1]
    ids = lora_llm.engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        tokens = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                pad_token_id=2)[0, len(ids):].tolist()
    out = lora_llm.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0),
                            lora=name)[0]
    got = torch.tensor([e["logprob"] for e in out.prompt_logprobs[1:]])
    torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
    assert out.token_ids == tokens


def test_one_batch_mixes_adapters_and_the_base(lora_llm):
    from pyserve import SamplingParams
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    names = [None, "all", "rslora-some", "gate-only", "attn-out", "all", None]
    prompts = [PROMPT, PROMPT, "Hello world", PROMPT, PROMPT, "Once upon a time", "Hello world"]
    alone = [lora_llm.generate(p, params, lora=n)[0].token_ids for p, n in zip(prompts, names)]
    together = lora_llm.generate(prompts, params, lora=names)
    assert [o.token_ids for o in together] == alone
    assert len({tuple(t) for t, p in zip(alone, prompts) if p == PROMPT}) == 4  # each adapter matters


def test_the_prefix_cache_never_crosses_adapters(lora_llm):
    from pyserve import SamplingParams
    params = SamplingParams(max_tokens=2, temperature=0)
    prompt = "Ünïcödé text: café, naïve, 東京, emoji 🙂. " * 2
    lora_llm.generate(prompt, params, lora="all")
    assert lora_llm.generate(prompt, params, lora="all")[0].num_cached_tokens > 0
    assert lora_llm.generate(prompt, params, lora="gate-only")[0].num_cached_tokens == 0
    assert lora_llm.generate(prompt, params)[0].num_cached_tokens == 0


def test_bad_adapters_are_refused(lora_llm, tmp_path, peft_models):
    import json
    from pyserve import SamplingParams
    from pyserve.errors import ClientError
    with pytest.raises(ClientError, match="no LoRA adapter named 'nope'"):
        lora_llm.generate("Hi", SamplingParams(max_tokens=1), lora="nope")
    with pytest.raises(ClientError, match="is not a PEFT LoRA adapter"):
        lora_llm.engine.load_lora("empty", tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    from safetensors.torch import save_file
    (bad / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "peft_type": "LORA"}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(10, 2)}, bad / "adapter_model.safetensors")
    with pytest.raises(ClientError, match="lm_head"):
        lora_llm.engine.load_lora("bad", bad)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 63),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              bad / "adapter_model.safetensors")
    with pytest.raises(ClientError, match="q_proj has shapes"):
        lora_llm.engine.load_lora("bad", bad)
    assert "bad" not in lora_llm.engine.adapters


# -- served by name --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_llama_dir, peft_models):
    from conftest import serving
    with serving(tiny_llama_dir, lora_adapters=(("all", str(peft_models["all"][0])),)) as running:
        yield running


def test_adapters_are_models_on_every_api(served, lora_llm):
    import openai
    from pyserve import SamplingParams
    from pyserve.client import Client
    server = served[0]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    listed = {m.id: m for m in client.models.list().data}
    assert listed["all"].model_extra["parent"] == "tiny" and listed["tiny"].model_extra["parent"] is None
    want = lora_llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), lora="all")[0].text
    base = lora_llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0].text
    got = client.completions.create(model="all", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert got == want != base
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == base
    with Client("127.0.0.1", server.msgpack_port) as c:
        assert c.generate("all", PROMPT, max_tokens=8, temperature=0).text == want
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


def test_load_and_unload_at_run_time_while_another_request_streams(served, peft_models, lora_llm):
    import threading
    import urllib.request
    import json
    import openai
    from pyserve import SamplingParams
    server = served[0]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def post(route, body):
        request = urllib.request.Request(server.url + route, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    streamed = []
    stream = threading.Thread(target=lambda: streamed.append("".join(
        c.choices[0].text for c in client.completions.create(model="all", prompt=PROMPT, max_tokens=40,
                                                             stream=True, extra_body={"ignore_eos": True}))))
    stream.start()
    assert post("/v1/load_lora_adapter", {"lora_name": "gate", "lora_path": str(peft_models["gate-only"][0])})[0] == 200
    want = lora_llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0), lora="gate-only")[0].text
    assert client.completions.create(model="gate", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text == want
    status, body = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"})
    assert status == 400 and "lora" in body["error"]["message"]
    assert post("/v1/unload_lora_adapter", {"lora_name": "gate"})[0] == 200
    assert post("/v1/unload_lora_adapter", {"lora_name": "gate"})[0] == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gate", prompt=PROMPT, max_tokens=2)
    stream.join()
    assert streamed and streamed[0]


def test_broken_adapters_are_a_400_read_off_the_engine_thread(served, peft_models, tmp_path):
    """Each fault of an adapter directory is a 400 naming it (these were 500s), and a FIFO where
    the config should be is refused unread (read on the engine's thread it blocked all generation)."""
    import json
    import os
    import shutil
    import urllib.request
    server = served[0]

    def post(body):
        request = urllib.request.Request(server.url + "/v1/load_lora_adapter", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    good = peft_models["all"][0]
    config = json.loads((good / "adapter_config.json").read_text())

    def broken(name: str, config_text: str | None = None, weights: bytes | None = None, fifo: bool = False):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if fifo:
            (folder / "adapter_config.json").unlink()
            os.mkfifo(folder / "adapter_config.json")
        if config_text is not None:
            (folder / "adapter_config.json").write_text(config_text)
        if weights is not None:
            (folder / "adapter_model.safetensors").write_bytes(weights)
        return str(folder)

    cases = {
        "no r": broken("no-r", json.dumps({k: v for k, v in config.items() if k != "r"})),
        "bad json": broken("bad-json", "{not json"),
        "r = 0": broken("r-0", json.dumps({**config, "r": 0})),
        "broken weights": broken("bad-weights", weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"x\""),
        "fifo": broken("fifo", fifo=True),
        "long path": "/" + "x" * 100_000,
    }
    for case, path in cases.items():
        status, body = post({"lora_name": "broken", "lora_path": path})
        assert status == 400 and body["error"]["param"] == "lora", (case, body)
    assert post({"lora_name": "fine", "lora_path": str(good)})[0] == 200  # and the route still works


def test_a_pool_of_one_slot_swaps_adapters_in_and_out(tiny_llama_dir, peft_models, lora_llm):
    """max_loras=1: one adapter resident and one per step; the others wait in host memory and
    come back when their requests run, with the tokens a pool holding all of them gives."""
    from pyserve import LLM, SamplingParams
    llm = LLM(tiny_llama_dir, device="cpu", max_loras=1,
              lora={name: path for name, (path, _) in peft_models.items()})
    names = ["all", "gate-only", None, "all", "rslora-some", "gate-only"]
    seen = []
    llm.engine.step_observers.append(lambda rows, tokens: seen.append(
        {s.adapter for s in llm.engine.scheduler.running if s.adapter >= 0}))
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = llm.generate([PROMPT] * len(names), params, lora=names)
    assert seen and max(len(s) for s in seen) == 1
    pool = llm.engine.adapters
    assert len(pool.resident) == 1 and pool.swaps >= 4  # every change of adapter was a swap
    assert [o.token_ids for o in outs] == [o.token_ids for o in lora_llm.generate([PROMPT] * len(names), params,
                                                                                  lora=names)]
    llm.engine.unload_lora("gate-only")  # the resident one: its slot is free again
    assert not pool.resident
    assert llm.generate(PROMPT, params, lora="all")[0].token_ids == outs[0].token_ids


def test_gpt2_adapters_match_peft(tmp_path):
    import peft
    from pyserve import LLM, SamplingParams
    from tiny_models import load_reference, make_model
    base = make_model(tmp_path / "gpt2", arch="gpt2")
    models = {}
    for i, (name, targets) in enumerate((("attn", ["c_attn"]), ("all", ["c_attn", "c_proj", "c_fc"]))):
        torch.manual_seed(i)
        model = peft.get_peft_model(load_reference(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, init_lora_weights=False))
        model.save_pretrained(tmp_path / name)
        models[name] = model.eval()
    llm = LLM(base, device="cpu", lora={name: tmp_path / name for name in models})
    ids = llm.engine.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([ids] * 3, params, lora=[*models, None])  # one batch: both adapters and the base
    for out, (name, model) in zip(outs, models.items()):
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            tokens = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                    pad_token_id=1)[0, len(ids):].tolist()
        got = torch.tensor([e["logprob"] for e in out.prompt_logprobs[1:]])
        torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
        assert out.token_ids == tokens, name
    assert len({tuple(o.token_ids) for o in outs}) == 3
