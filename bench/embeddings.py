"""Embeddings per second: pyserve's encoder engine against sentence-transformers' `encode` on the
same weights, in one run, at batch 32 and batch 1, tokenization included on both sides.

The model has all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads, mean pooling, Normalize)
with random weights and a WordPiece vocabulary trained here on the standard library's help
topics; the texts are paragraphs of those topics, 16 to 256 tokens, as documents to index are.

    python bench/embeddings.py            # 512 texts at batch 32, 128 at batch 1
    python bench/embeddings.py --quick    # 128 and 32

Writes bench/results/embeddings.json.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import quick_flag, write_result  # noqa: E402

from pyserve.engine import load_engine  # noqa: E402
from pyserve.engine.embedding import EncodeRequest  # noqa: E402
from pyserve.kernels import cpu  # noqa: E402


def corpus() -> list[str]:
    from pydoc_data.topics import topics
    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.split()) >= 12]
    return [" ".join(p.split()[:180]) for p in paragraphs]


def make_model(folder: Path, texts: list[str]) -> Path:
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    base = folder / "base"
    base.mkdir()
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=8000)
    wordpiece.save_model(str(base))
    BertTokenizerFast(str(base / "vocab.txt")).save_pretrained(str(base))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=384, num_hidden_layers=6,
                         num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)).save_pretrained(base)
    transformer = models.Transformer(str(base), max_seq_length=256)
    st = SentenceTransformer(modules=[transformer, models.Pooling(384, pooling_mode="mean"), models.Normalize()],
                             device="cpu")
    st.save(str(folder / "st"))
    return folder / "st"


def ours(engine, texts: list[str], batch: int) -> float:
    """Seconds to embed `texts`, `batch` at a time: tokenization, then the engine's steps."""
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        items = [engine.model.tokenizer.encode_input(t, truncate_to=256)[0] for t in texts[i:i + batch]]
        engine.add(f"r{i}", EncodeRequest(items))
        while engine.has_unfinished():
            engine.step()
    return time.perf_counter() - start


def theirs(model, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i:i + batch], batch_size=batch)
    return time.perf_counter() - start


def main() -> None:
    from sentence_transformers import SentenceTransformer
    quick = quick_flag(__doc__)
    texts = corpus()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = make_model(Path(folder), texts)
        reference = SentenceTransformer(str(model_dir), device="cpu")
        engine = load_engine(model_dir, device="cpu")
        rows = {}
        for batch, count in ((32, 128 if quick else 512), (1, 32 if quick else 128)):
            sample = texts[:count]
            ours(engine, sample[:batch], batch), theirs(reference, sample[:batch], batch)  # warm up
            timings = {"pyserve": [], "sentence_transformers": []}
            for _ in range(3):  # alternating, best of three each
                timings["pyserve"].append(ours(engine, sample, batch))
                timings["sentence_transformers"].append(theirs(reference, sample, batch))
            row = {name: count / min(seconds) for name, seconds in timings.items()}
            row["ratio"] = row["pyserve"] / row["sentence_transformers"]
            rows[f"batch_{batch}"] = {"texts": count, "embeddings_per_s": row}
            print(f"batch {batch:>2}: pyserve {row['pyserve']:8.1f}/s, sentence-transformers "
                  f"{row['sentence_transformers']:8.1f}/s, ratio {row['ratio']:.2f}x")
        lengths = [len(engine.model.tokenizer.encode_input(t, truncate_to=256)[0]) for t in texts[:512]]
    write_result("embeddings", {"isa": cpu.best_isa(), "threads": torch.get_num_threads(),
                                "model": "MiniLM-L6 shape, random weights, fp32",
                                "mean_tokens": sum(lengths) / len(lengths), **rows}, quick=quick)


if __name__ == "__main__":
    main()
