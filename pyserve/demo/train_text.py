"""Train the demo chat model: a small Llama on the standard library's documentation.

    python -m pyserve.demo.train_text [--out pyserve/demo/models/pydoc-chat] [--steps 900]

The corpus is `pydoc_data`'s help topics and the docstrings of stdlib modules, classes and
functions (see pyserve.demo.data). Each document is seen twice: as plain text, and as a chat turn
that asks about its name ("Tell me about json.dumps") and answers with the text, so the model both
continues text and answers in the chat template. A fixed 5% of documents is held out; the script
reports held-out perplexity against a unigram model of the same tokens, writes the checkpoint in
Hugging Face format (bf16 safetensors) and its training curve as `training.png`.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from .data import is_held_out, python_docs
from .plots import Chart, running_mean

DEFAULT_OUT = Path(__file__).parent / "models" / "pydoc-chat"
SPECIALS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUESTIONS = ("Tell me about {}.", "What is {}?", "Explain {}.", "How do I use {}?")
MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # Completion prompts get <s> in front, as every training document had.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def chat_text(name: str, text: str, rng: random.Random) -> str:
    subject = name.removeprefix("topic ")
    question = rng.choice(QUESTIONS).format(subject)
    return f"<|user|>{question}</s><|assistant|>{text}"


def token_stream(tok, docs: dict[str, str], rng: random.Random, chat: bool) -> np.ndarray:
    """Every document as `<s> ... </s>`, in a shuffled order, concatenated."""
    names = sorted(docs)
    rng.shuffle(names)
    texts = [chat_text(n, docs[n], rng) if chat else docs[n] for n in names]
    ids = []
    for enc in tok.encode_batch([f"<s>{t}</s>" for t in texts], add_special_tokens=False):
        ids.extend(enc.ids)
    return np.array(ids, dtype=np.int64)


def unigram_perplexity(train: np.ndarray, held_out: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(train, minlength=vocab_size) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[held_out].mean()))


@torch.no_grad()
def model_perplexity(model, stream: np.ndarray, context: int) -> float:
    """Perplexity over a token stream cut into windows of `context` tokens."""
    model.eval()
    n = (len(stream) - 1) // context
    windows = torch.from_numpy(stream[: n * context + 1])
    total, count = 0.0, 0
    for start in range(0, n, 16):
        rows = [windows[i * context: (i + 1) * context + 1] for i in range(start, min(n, start + 16))]
        batch = torch.stack(rows)
        logits = model(batch[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import transformers

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    docs = python_docs()
    train_docs = {k: v for k, v in docs.items() if not is_held_out(k)}
    held_docs = {k: v for k, v in docs.items() if is_held_out(k)}
    tok = train_tokenizer(list(train_docs.values()), args.vocab_size)
    train = np.concatenate([token_stream(tok, train_docs, rng, chat=False), token_stream(tok, train_docs, rng, chat=True)])
    held = token_stream(tok, held_docs, rng, chat=False)
    print(f"{len(train_docs)} training documents, {len(train):,} tokens; {len(held_docs)} held out, {len(held):,} tokens")

    bos, eos, pad = (tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=bos, eos_token_id=eos,
                                      pad_token_id=pad, **MODEL)
    model = transformers.LlamaForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    curve, evals = [], []
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.context - 1, (args.batch,)).tolist()
        batch = torch.stack([torch.from_numpy(train[s: s + args.context + 1]) for s in starts])
        logits = model(batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            ppl = model_perplexity(model, held[: 64 * args.context + 1], args.context)
            evals.append((step, math.log(ppl)))
            print(f"step {step:4d}  train loss {np.mean(curve[-50:]):.3f}  held-out ppl {ppl:7.2f}  "
                  f"{time.perf_counter() - started:6.0f} s", flush=True)

    result = {"held_out_perplexity": model_perplexity(model, held, args.context),
              "unigram_perplexity": unigram_perplexity(train, held, tok.get_vocab_size()),
              "steps": args.steps, "seconds": time.perf_counter() - started}
    result["ratio"] = result["unigram_perplexity"] / result["held_out_perplexity"]
    print(json.dumps(result, indent=1))
    save(model.to(torch.bfloat16), tok, args.out, result)
    Chart("pydoc-chat training", "step", "cross-entropy (nats/token)").line(
        "train (50-step mean)", range(len(curve)), running_mean(curve, 50)).line(
        "held out", *zip(*evals)).save(args.out / "training.png")
    return result


def save(model, tok, out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
         "do_sample": True, "temperature": 0.7, "top_k": 40, "repetition_penalty": 1.1}, indent=1))
    (out / "training.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
