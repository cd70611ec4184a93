"""Write a tiny random model directory to try the server with.

    python scripts/make_tiny_model.py /tmp/tiny-llama && pyserve serve /tmp/tiny-llama
    python scripts/make_tiny_model.py --image /tmp/tiny-sd && pyserve serve /tmp/tiny-sd

The first is a Llama in Hugging Face format, the second a Stable-Diffusion-style pipeline in
diffusers format (CLIP text encoder, UNet, VAE). Needs `transformers` and `diffusers` (installed
with the test extra). The weights are random: the text is noise, the images are noise.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import make_model, make_sd_pipeline  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--image", action="store_true", help="a text-to-image pipeline instead of a Llama")
    args = parser.parse_args()
    if args.image:
        out = Path(args.out or "tiny-sd")
        make_sd_pipeline(out, sample_size=32)
        print(f"wrote a tiny Stable-Diffusion-style pipeline to {out}")
    else:
        out = Path(args.out or "tiny-llama")
        make_model(out, "llama")
        print(f"wrote a tiny Llama model to {out}")
