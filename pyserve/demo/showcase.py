"""Draw what the demo models make, through pyserve's own engines, for the README, and measure
their quality the way the tests do.

    python -m pyserve.demo.showcase [--out docs/demo] [--results bench/results/demo-quality.json]

Writes `digits-sd.png` (a row per prompt), `digits-gan.png` (a row per class), `digits-vae.png`
(samples from the prior, and digits encoded and decoded), `forecast.png` and `chat.md` (answers
of the chat model), and a JSON file of the quality figures.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from ..engine import load_engine, run_engine
from ..engine.batch import TensorRequest
from ..server.pictures import to_uint8
from . import demo_model_dirs
from .data import DIGIT_NAMES, digits, seasonal_series
from .plots import image_grid
from .quality import DigitClassifier
from .train_forecaster import evaluate, plot_forecast

CHAT_QUESTIONS = ("Tell me about json.dumps.", "What is the with statement?", "Explain os.path.join.")
COMPLETIONS = ("The for statement", "Return a list of")


def text_samples(model_dir: Path) -> list[tuple[str, str]]:
    from .. import LLM, SamplingParams

    llm = LLM(model_dir, device="cpu")
    params = SamplingParams(max_tokens=60, temperature=0.7, top_k=40, repetition_penalty=1.1, seed=0)
    answers = [llm.chat([{"role": "user", "content": q}], params)[0].text for q in CHAT_QUESTIONS]
    completions = [llm.generate(p, params)[0].text for p in COMPLETIONS]
    return list(zip(CHAT_QUESTIONS, answers)) + list(zip(COMPLETIONS, completions))


def digit_images(model_dirs: dict, classifier: DigitClassifier, out: Path) -> dict:
    from ..engine.diffusion import ImageRequest

    prompts = [f"the digit {name}" for name in DIGIT_NAMES]
    sd = run_engine(load_engine(model_dirs["digits-sd"], device="cpu"),
             {p: ImageRequest(prompt=p, n=8, seed=i) for i, p in enumerate(prompts)})
    image_grid([list(to_uint8(sd[p].images)) for p in prompts], out / "digits-sd.png", scale=2, labels=prompts)
    labels = np.repeat(np.arange(10), 8)
    gan = run_engine(load_engine(model_dirs["digits-gan"], device="cpu"),
              {"all": TensorRequest({"seed": np.arange(80), "class_label": labels})})["all"].outputs["images"]
    image_grid([list(gan[d * 8:(d + 1) * 8]) for d in range(10)], out / "digits-gan.png", scale=2,
               labels=list(DIGIT_NAMES))
    vae = load_engine(model_dirs["digits-vae"], device="cpu")
    grey, real_labels = digits(32)
    real = rgb_pixels(grey[:8])
    sampled = run_engine(vae, {"s": TensorRequest({"seed": np.arange(8)})})["s"].outputs["images"]
    image_grid([list(real), list(round_trip(vae, real)), list(sampled)],
               out / "digits-vae.png", scale=2, labels=["real digits", "encoded+decoded", "sampled z~N(0,I)"])
    # The quality figures, as the tests measure them (more images here).
    sd_all = run_engine(load_engine(model_dirs["digits-sd"], device="cpu"),
                 {f"{d}-{v}": ImageRequest(prompt=text, n=10, seed=1000 + 10 * d + v, guidance_scale=5.0)
                  for d in range(10) for v, text in enumerate((f"the digit {DIGIT_NAMES[d]}", f"a handwritten {d}"))})
    sd_labels = np.concatenate([[int(k.split("-")[0])] * 10 for k in sd_all])
    gan_labels = np.arange(1000) % 10
    gan_all = run_engine(load_engine(model_dirs["digits-gan"], device="cpu"),
                  {"q": TensorRequest({"seed": np.arange(1000) + 10_000, "class_label": gan_labels})})["q"]
    return {"text_to_image_digit_accuracy": classifier.accuracy(np.concatenate([o.images for o in sd_all.values()]),
                                                                sd_labels),
            "text_to_image_images": len(sd_labels),
            "gan_digit_accuracy": classifier.accuracy(gan_all.outputs["images"], gan_labels), "gan_images": 1000,
            "vae_reconstruction_accuracy": classifier.accuracy(round_trip(vae, rgb_pixels(grey[:500])),
                                                               real_labels[:500]),
            "vae_images": 500}


def rgb_pixels(grey: np.ndarray) -> np.ndarray:
    """Grey images in [0, 1] as uint8 RGB, what the VAE takes."""
    return (np.repeat(grey[..., None], 3, axis=-1) * 255).round().astype(np.uint8)


def round_trip(vae, pixels: np.ndarray) -> np.ndarray:
    """Images encoded to latents and decoded again by the VAE engine."""
    latents = run_engine(vae, {"e": TensorRequest({"images": pixels})})["e"].outputs["latents"]
    return run_engine(vae, {"d": TensorRequest({"latents": latents})})["d"].outputs["images"]


def forecasts(model_dir: Path, out: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    scores = evaluate(model_dir, seasonal_series(200, config["context_length"] + config["horizon"], seed=12345))
    plot_forecast(scores, out / "forecast.png")
    return {"forecaster_mase": scores["mase_model"], "seasonal_naive_mase": scores["mase_seasonal_naive"],
            "series": 200}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/demo"))
    parser.add_argument("--results", type=Path, default=Path("bench/results/demo-quality.json"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = demo_model_dirs()
    samples = text_samples(dirs["pydoc-chat"])
    lines = ["# pydoc-chat samples", "", "Made by `python -m pyserve.demo.showcase` (temperature 0.7, top-k 40, "
             "repetition penalty 1.1, seed 0, 60 tokens).", ""]
    for prompt, text in samples:
        lines += [f"**{prompt}**", "", "> " + text.strip().replace("\n", "\n> "), ""]
    (args.out / "chat.md").write_text("\n".join(lines))
    figures = digit_images(dirs, DigitClassifier(), args.out) | forecasts(dirs["seasonal-forecaster"], args.out)
    figures["text_heldout"] = json.loads((dirs["pydoc-chat"] / "training.json").read_text())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
