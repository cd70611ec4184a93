"""Index a folder of text into a vector store and ask a grounded question, against a running
pyserve, with nothing but the `openai` SDK.

    pyserve serve                                                    # the demo models
    python examples/retrieval/ask_docs.py docs "How is the KV cache paged?"

Every .md, .txt, .html and .pdf file under the folder is uploaded and attached to a new store
(embedded by the demo embedder, reranked by the demo reranker); the question is searched, and the
demo chat model answers with the sources in its prompt. The demo models are small: the sources
are the useful part of the answer.
"""

import argparse
import time
from pathlib import Path

import openai

SUFFIXES = {".md", ".txt", ".html", ".htm", ".pdf"}


def index(client: openai.OpenAI, folder: Path, reranker: str | None) -> str:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    ids = [client.files.create(file=(p.name, p.read_bytes()), purpose="assistants").id for p in files]
    store = client.vector_stores.create(name=folder.name, file_ids=ids,
                                        extra_body={"reranker": reranker} if reranker else None)
    while (state := client.vector_stores.retrieve(store.id)).file_counts.in_progress:
        time.sleep(0.2)
    print(f"indexed {state.file_counts.completed} of {len(files)} files from {folder} "
          f"({state.file_counts.failed} failed) into {store.id}")
    return store.id


def ask(client: openai.OpenAI, store_id: str, question: str, model: str, results: int) -> dict:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0,
        extra_body={"retrieval": {"vector_store_ids": [store_id], "max_num_results": results}})
    print(f"\nQ: {question}\nA: {answer.choices[0].message.content.strip()}\n\nsources:")
    sources = answer.model_extra["sources"]
    for n, source in enumerate(sources, start=1):
        print(f"  [{n}] {source['filename']} (score {source['score']:.3f}): {source['text'][:100]!r}")
    return {"answer": answer.choices[0].message.content, "sources": sources}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="pydoc-chat")
    parser.add_argument("--reranker", default="pydoc-rerank", help="a served cross-encoder ('' for none)")
    parser.add_argument("--results", type=int, default=2, help="sources put in the prompt")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=300)
    store_id = index(client, args.folder, args.reranker or None)
    return ask(client, store_id, args.question, args.model, args.results)


if __name__ == "__main__":
    main()
