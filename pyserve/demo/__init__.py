"""The built-in demo models: small models trained here, on data that ships with Python and its
dependencies, and committed with the package, so `pyserve serve` with no model directory serves
something real. Each is in the format users bring (Hugging Face, diffusers, the documented one-shot
formats); the `train_*` modules beside this one made them:

    python -m pyserve.demo.train_text          # pydoc-chat: a small Llama on the stdlib's docs
    python -m pyserve.demo.train_digits        # digits-sd (and its vae/, digits-vae)
    python -m pyserve.demo.train_gan           # digits-gan
    python -m pyserve.demo.train_forecaster    # seasonal-forecaster
    python -m pyserve.demo.train_embedder      # pydoc-embed (--reranker: pydoc-rerank)

Training needs the `demo` extra (transformers, diffusers, scikit-learn); serving the image models
needs the `diffusion` extra.
"""

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"

# Served name -> directory under MODELS_DIR. The VAE is the text-to-image pipeline's own.
DEMO_MODELS = {
    "pydoc-chat": "pydoc-chat",
    "digits-sd": "digits-sd",
    "digits-vae": "digits-sd/vae",
    "digits-gan": "digits-gan",
    "seasonal-forecaster": "seasonal-forecaster",
    "pydoc-embed": "pydoc-embed",
    "pydoc-rerank": "pydoc-rerank",
}


def demo_model_dirs() -> dict[str, Path]:
    """Each demo model's served name and directory."""
    return {name: MODELS_DIR / folder for name, folder in DEMO_MODELS.items()}
