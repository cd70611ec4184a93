"""llama.cpp GGUF files through the llama plugin: a tiny Llama written as llama.cpp lays it out
(its tensor names, its query/key row order, its tokenizer metadata; F32, Q8_0 and Q4_0 tensors
packed by the `gguf` package) gives the logits transformers gives for the weights it holds, and a Q8_0
or Q4_0 file is packed as int8 or int4 without losing anything."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pyserve import LLM, SamplingParams  # noqa: E402
from pyserve.nn import pack_as_asked  # noqa: E402
from pyserve.plugin import PluginRegistry  # noqa: E402

from test_llm import PROMPTS, one_sequence_forward  # noqa: E402
from tiny_models import load_reference, make_model  # noqa: E402

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives query and key projections."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir, out, kind: str) -> None:
    from safetensors.numpy import load_file
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    by_id = {i: t for t, i in tok["model"]["vocab"].items()} | {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(cfg["vocab_size"])]
    specials = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])
    for name, array in load_file(model_dir / "model.safetensors").items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            target = f"blk.{layer}.{NAMES[module]}.{suffix}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg["num_attention_heads"] if module == "self_attn.q_proj" else cfg["num_key_value_heads"]
                array = llama_cpp_rows(array, heads)
        else:
            target = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}[name]
        array = array.astype(np.float32)
        if kind != "F32" and array.ndim == 2:
            qtype = gguf.GGMLQuantizationType[kind]
            packed = gguf.quants.quantize(array, qtype)
            w.add_tensor(target, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            w.add_tensor(target, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama")


def packed_reference(model_dir, kind: str):
    """transformers with every matrix replaced by its round trip through `kind` (as the gguf package packs it)."""
    ref = load_reference(model_dir)
    qtype = gguf.GGMLQuantizationType[kind]
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    return ref


@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_0"])
def test_gguf_logits_match_transformers(llama_dir, tmp_path, kind):
    path = tmp_path / f"tiny-{kind}.gguf"
    write_gguf(llama_dir, path, kind)
    model = PluginRegistry.discover().for_model(path).load(path)
    assert model.weight_format == {"F32": None, "Q8_0": "w8a8", "Q4_0": "w4a8"}[kind]
    ref = load_reference(llama_dir) if kind == "F32" else packed_reference(llama_dir, kind)
    with torch.no_grad():
        for ids in PROMPTS:
            assert (one_sequence_forward(model, ids) - ref(torch.tensor([ids])).logits[0]).abs().max() <= 1e-4
    # Served packed (the same values in pyserve's int8/int4; by default w8a8/w4a8, whose int8
    # inputs are checked in test_quantization), greedy tokens as transformers'.
    llm = LLM(path, device="cpu", quantization={"F32": None, "Q8_0": "int8", "Q4_0": "int4"}[kind])
    assert llm.engine.model.module.model.layers[0].mlp.down_proj.packed is not None or kind == "F32"
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for ids, out in zip(PROMPTS, outs):
        want = ref.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                            pad_token_id=2, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert out.token_ids == want[0, len(ids):].tolist()
    if kind != "F32":  # as a load packs it by default: with int8 inputs
        pack_as_asked(model, None)
        assert model.module.model.layers[0].mlp.down_proj.packed.int8_activations


def test_gguf_tokenizer_and_chat_template_come_from_the_file(llama_dir, tmp_path):
    from pyserve.tokenizer import Tokenizer
    path = tmp_path / "tiny.gguf"
    write_gguf(llama_dir, path, "F32")
    llm = LLM(path, device="cpu")
    ours, theirs = llm.engine.info.tokenizer, Tokenizer.from_dir(llama_dir)
    for text in ("Hello world, hello pyserve!", "Ünïcödé café 東京 🙂", "The quick brown fox"):
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.encode_chat(messages) == theirs.encode_chat(messages)
    assert ours.eos_token_ids == [1]


def sentencepiece_meta(tmp_path):
    """A SentencePiece BPE model with byte fallback trained here, and the GGUF tokenizer metadata
    llama.cpp's converter writes for such a model (pieces, scores, token types)."""
    import sentencepiece as spm
    from tiny_models import CORPUS
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS * 3))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spm"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama's
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    meta = {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            "scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
            "token_type": [kind(i) for i in range(sp.get_piece_size())], "merges": [],
            "bos_token_id": 1, "eos_token_id": 2, "add_bos_token": True, "chat_template": None}
    return sp, meta


def test_sentencepiece_vocabularies_tokenize_as_sentencepiece(tmp_path):
    """llama.cpp's "llama" tokenizer model (Llama 1/2, Mistral, TinyLlama GGUF files)."""
    from pyserve_plugins.llama.gguf_file import tokenizer_from
    sp, meta = sentencepiece_meta(tmp_path)
    ours = tokenizer_from(meta)
    texts = ["Hello world, hello pyserve!", "Once upon a time there was a tiny model.", "  two  spaces",
             "Ünïcödé café 東京 🙂", "quick\nnew line", "zebra xylophone qq", "Ωμέγα ☃"]  # unseen pieces, bytes
    for text in texts:
        assert ours.encode(text) == [1] + sp.encode(text), text
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)), text
    assert any(meta["token_type"][t] == 6 for t in sp.encode("Ωμέγα ☃"))  # the byte fallback was exercised
    assert ours.eos_token_ids == [2] and ours.eos_token == "</s>"
