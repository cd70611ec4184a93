"""Engines: drive models through the task protocols (llm/ for text generation)."""
