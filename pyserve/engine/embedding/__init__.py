"""The encoder engine: embeddings and relevance scores over packed sequences, batched by tokens."""

from .engine import EncodeOutput, EncodeRequest, EncoderEngine

__all__ = ["EncodeOutput", "EncodeRequest", "EncoderEngine"]
