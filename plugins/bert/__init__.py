"""pyserve plugin for BERT-family encoders: embeddings and relevance scores.

Serves Hugging Face directories of BERT, RoBERTa, XLM-RoBERTa and DistilBERT checkpoints (the bare
model, or `*ForSequenceClassification` as a cross-encoder for reranking and scores), and
sentence-transformers directories (the transformer at the root, `modules.json` listing its
Pooling, Dense and Normalize modules; `config_sentence_transformers.json` prompts;
`sentence_bert_config.json` max_seq_length). A bare model with no modules.json pools its [CLS]
token.
"""

from pathlib import Path

from pyserve.plugin import EMBEDDING, Plugin

FAMILIES = ("Bert", "Roberta", "XLMRoberta", "DistilBert")


class BertPlugin(Plugin):
    name = "bert"
    task = EMBEDDING
    architectures = tuple(f"{family}{head}" for family in FAMILIES
                          for head in ("Model", "ForMaskedLM", "ForSequenceClassification"))

    def load(self, model_dir, *, device="cpu", dtype=None):
        from .model import Encoder
        return Encoder(Path(model_dir), device=device, dtype=dtype)


plugin = BertPlugin()
