"""Train the demo embedder and reranker on the standard library's documentation.

    python -m pyserve.demo.train_embedder               # pydoc-embed: a sentence-transformers directory
    python -m pyserve.demo.train_embedder --reranker    # pydoc-rerank: a cross-encoder

The corpus is pyserve.demo.data's (the `help()` topics and the stdlib's docstrings). Each document
gives two pairs: (a question about its name, its text) and (its first sentence, the rest), so a
query that words what a function does finds its documentation. The embedder is a small BERT with
mean pooling and normalisation, trained with in-batch negatives (the other documents of a batch
are the wrong answers, as sentence-transformers' MultipleNegativesRankingLoss trains); the
reranker scores (query, document) pairs, trained to tell a pair's document from the one BM25-like
word overlap would confuse it with. A fixed 5% of documents is held out; the scripts report
held-out recall@1 (embedder) and accuracy (reranker), and write `training.json` and `training.png`.
"""

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import is_held_out, python_docs
from .plots import Chart, running_mean

MODELS = Path(__file__).parent / "models"
MAX_TOKENS = 96
QUESTIONS = ("What is {}?", "Tell me about {}.", "How do I use {}?", "{}")


def pairs(docs: dict[str, str], rng: random.Random) -> list[tuple[str, str]]:
    """(query, document) pairs: a question about the name, and the first sentence for the rest."""
    out = []
    for name, text in docs.items():
        body = " ".join(text.split())
        out.append((rng.choice(QUESTIONS).format(name.removeprefix("topic ")), body))
        first, _, rest = body.partition(". ")
        if len(rest.split()) >= 8 and len(first.split()) >= 4:
            out.append((first, rest))
    return out


def write_tokenizer(out: Path, texts: list[str], vocab_size: int = 4096) -> None:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size)
    wordpiece.save_model(str(out))
    tokenizer = BertTokenizerFast(str(out / "vocab.txt"), model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(str(out))
    (out / "vocab.txt").unlink()  # tokenizer.json holds it


def make_model(out: Path, vocab: int, scorer: bool):
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    config = BertConfig(vocab_size=vocab, hidden_size=192, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=768, max_position_embeddings=MAX_TOKENS, num_labels=1)
    return (BertForSequenceClassification if scorer else BertModel)(config)


def encode(tokenizer, texts, second=None):
    return tokenizer(texts, second, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")


def embed(model, batch) -> torch.Tensor:
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def overlap_negative(query: str, docs: list[str], words: list[set], positive: int, rng: random.Random) -> int:
    """The document (not the positive) sharing most words with the query, among a sample."""
    q = set(re.findall(r"\w+", query.lower()))
    sample = rng.sample(range(len(docs)), min(64, len(docs)))
    return max((i for i in sample if i != positive), key=lambda i: len(q & words[i]))


def train(args) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    docs = python_docs()
    kept = {k: v for k, v in docs.items() if not is_held_out(k)}
    held = {k: v for k, v in docs.items() if is_held_out(k)}
    out = Path(args.out or MODELS / ("pydoc-rerank" if args.reranker else "pydoc-embed"))
    write_tokenizer(out, [" ".join(v.split()) for v in docs.values()])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = make_model(out, tokenizer.vocab_size, args.reranker)
    train_pairs, held_pairs = pairs(kept, rng), pairs(held, random.Random(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100)
                                                 * max(0.05, 1 - s / args.steps))
    documents = [d for _, d in train_pairs]
    words = [set(re.findall(r"\w+", d.lower())) for d in documents]
    losses, started = [], time.time()
    model.train()
    for step in range(args.steps):
        batch = rng.sample(range(len(train_pairs)), args.batch)
        queries = [train_pairs[i][0] for i in batch]
        if args.reranker:  # each query with its document (1) and an overlapping wrong one (0)
            negatives = [overlap_negative(train_pairs[i][0], documents, words, i, rng) for i in batch]
            logits = model(**encode(tokenizer, queries * 2, [documents[i] for i in batch + negatives])).logits[:, 0]
            labels = torch.cat([torch.ones(len(batch)), torch.zeros(len(batch))])
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        else:  # in-batch negatives, scale 20 (a temperature of 0.05)
            q = embed(model, encode(tokenizer, queries))
            d = embed(model, encode(tokenizer, [documents[i] for i in batch]))
            loss = F.cross_entropy(20 * q @ d.T, torch.arange(len(batch)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step}: loss {running_mean(losses, 50)[-1]:.4f} ({time.time() - started:.0f} s)", flush=True)
    model.eval()
    quality = evaluate(model, tokenizer, held_pairs, args.reranker, rng)
    print(quality)
    save(model, tokenizer, out, args.reranker)
    (out / "training.json").write_text(json.dumps({"steps": args.steps, "batch": args.batch, "lr": args.lr,
                                                   "seconds": round(time.time() - started), **quality}, indent=1))
    Chart(f"{out.name}: training loss", "step", "loss").line(
        "loss (mean of 50)", range(len(losses)), running_mean(losses, 50)).save(out / "training.png")


@torch.no_grad()
def evaluate(model, tokenizer, held: list[tuple[str, str]], reranker: bool, rng: random.Random) -> dict:
    """Held-out recall@1 among all held-out documents (embedder), or accuracy on positive vs an
    overlapping negative (reranker)."""
    queries, documents = [q for q, _ in held], [d for _, d in held]
    if reranker:
        words = [set(re.findall(r"\w+", d.lower())) for d in documents]
        negatives = [overlap_negative(q, documents, words, i, rng) for i, q in enumerate(queries)]
        good = model(**encode(tokenizer, queries, documents)).logits[:, 0]
        bad = model(**encode(tokenizer, queries, [documents[i] for i in negatives])).logits[:, 0]
        return {"held_out_pairs": len(held), "held_out_accuracy": round(float((good > bad).float().mean()), 4)}
    q = torch.cat([embed(model, encode(tokenizer, queries[i:i + 64])) for i in range(0, len(queries), 64)])
    d = torch.cat([embed(model, encode(tokenizer, documents[i:i + 64])) for i in range(0, len(documents), 64)])
    hits = (q @ d.T).argmax(1) == torch.arange(len(queries))
    return {"held_out_pairs": len(held), "held_out_recall_at_1": round(float(hits.float().mean()), 4),
            "chance": round(1 / len(held), 4)}


def save(model, tokenizer, out: Path, reranker: bool) -> None:
    """A Hugging Face directory (bf16 weights: half the bytes in the package); the embedder also as
    sentence-transformers lays one out."""
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    if reranker:
        return
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], indent=1))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": model.config.hidden_size,
                                                              "pooling_mode_mean_tokens": True}, indent=1))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_TOKENS, "do_lower_case": False}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reranker", action="store_true", help="train the cross-encoder instead of the embedder")
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-4)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
