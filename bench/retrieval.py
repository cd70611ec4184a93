"""Retrieval quality of vector stores on the standard library's documentation: recall@5 of
questions written here (bench/data/retrieval-questions.json, worded without the names they look
for) over BM25 alone, the demo embedder alone, hybrid (both, fused by reciprocal rank) and hybrid
reordered by the demo reranker, through the server's /v1/vector_stores API, in one run.

    python bench/retrieval.py            # every document of pyserve.demo.data (about 1,700)
    python bench/retrieval.py --quick    # the questions' documents and 300 others

Writes bench/results/retrieval.json.
"""

import io
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import quick_flag, write_result  # noqa: E402

import json  # noqa: E402

import openai  # noqa: E402

from pyserve.demo import demo_model_dirs  # noqa: E402
from pyserve.demo.data import python_docs  # noqa: E402
from pyserve.engine import EngineDriver, load_engine  # noqa: E402
from pyserve.server import start_in_thread  # noqa: E402
from pyserve.server.config import ServerConfig  # noqa: E402

QUESTIONS = json.loads((Path(__file__).parent / "data" / "retrieval-questions.json").read_text())
RANKERS = ("keyword", "dense", "hybrid")


def main() -> None:
    quick = quick_flag(__doc__)
    docs = python_docs()
    wanted = {q["doc"] for q in QUESTIONS}
    names = sorted(docs)
    if quick:
        others = [n for n in names if n not in wanted]
        names = sorted(wanted | set(random.Random(0).sample(others, 300)))
    dirs = demo_model_dirs()
    with tempfile.TemporaryDirectory() as data_dir:
        drivers = {"pydoc-embed": EngineDriver(load_engine(dirs["pydoc-embed"], device="cpu"))}
        if dirs["pydoc-rerank"].is_dir():
            drivers["pydoc-rerank"] = EngineDriver(load_engine(dirs["pydoc-rerank"], device="cpu"))
        server = start_in_thread(drivers, ServerConfig(port=0, msgpack_port=0, log_level="warning", data_dir=data_dir))
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
            ids = [client.files.create(file=(f"{name}.txt", io.BytesIO(docs[name].encode())), purpose="assistants").id
                   for name in names]
            started = time.perf_counter()
            stores = {"plain": client.vector_stores.create(name="stdlib", file_ids=ids, extra_body={
                "embedding_model": "pydoc-embed"}).id}
            if "pydoc-rerank" in drivers:
                stores["reranked"] = client.vector_stores.create(name="stdlib-reranked", file_ids=ids, extra_body={
                    "embedding_model": "pydoc-embed", "reranker": "pydoc-rerank"}).id
            while any(client.vector_stores.retrieve(s).file_counts.in_progress for s in stores.values()):
                time.sleep(0.5)
            indexing = time.perf_counter() - started
            runs = [(f"{ranker}", stores["plain"], ranker) for ranker in RANKERS]
            if "reranked" in stores:
                runs.append(("hybrid + reranker", stores["reranked"], "hybrid"))
            rows = {}
            for label, store, ranker in runs:
                hits = []
                for q in QUESTIONS:
                    found = client.vector_stores.search(store, query=q["question"], max_num_results=20,
                                                        ranking_options={"ranker": ranker}).data
                    top = list(dict.fromkeys(r.filename.removesuffix(".txt") for r in found))[:5]
                    hits.append(q["doc"] in top)
                rows[label] = {"recall_at_5": sum(hits) / len(hits), "found": sum(hits)}
        finally:
            server.stop()
    print(f"{len(names)} documents, {len(QUESTIONS)} questions, indexed in {indexing:.1f} s")
    print(f"{'ranking':<20}{'recall@5':>10}")
    for label, row in rows.items():
        print(f"{label:<20}{row['recall_at_5']:>10.3f}")
    write_result("retrieval", {"documents": len(names), "questions": len(QUESTIONS), "indexing_seconds": indexing,
                               **rows}, quick=quick)


if __name__ == "__main__":
    main()
