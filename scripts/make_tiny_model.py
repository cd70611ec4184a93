"""Write a tiny random Llama model directory (Hugging Face format) to try the server with.

    python scripts/make_tiny_model.py /tmp/tiny-llama && pyserve serve /tmp/tiny-llama

Needs `transformers` (installed with the test extra). The weights are random: the text is noise.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import make_model  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama")
    make_model(out, "llama")
    print(f"wrote a tiny Llama model to {out}")
