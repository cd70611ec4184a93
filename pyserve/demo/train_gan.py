"""Train the demo class-conditional GAN on scikit-learn's handwritten digits.

    python -m pyserve.demo.train_gan [--out pyserve/demo/models/digits-gan]

The generator is the `gan` plugin's DCGANGenerator (32x32, one channel); the discriminator, used
only here, is a spectrally normalised convolutional net with a projection of the class (Miyato &
Koyama) and an auxiliary digit classifier (AC-GAN), trained with the hinge loss. Writes the
checkpoint in the plugin's documented format, `training.png` (losses and the accuracy of a digit
classifier on generated samples) and `samples.png` (a row per digit).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pyserve_plugins.gan.model import DCGANGenerator, GeneratorModel

from .data import DIGIT_NAMES, digits
from .plots import Chart, image_grid, running_mean
from .quality import DigitClassifier

DEFAULT_OUT = Path(__file__).parent / "models" / "digits-gan"
CONFIG = {"architectures": ["DCGANGenerator"], "latent_dim": 64, "image_size": 32, "channels": 1,
          "base_channels": 32, "num_classes": 10, "class_names": list(DIGIT_NAMES),
          "batching": {"max_batch_size": 64, "max_queue_delay_s": 0.002}}


class Discriminator(nn.Module):
    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.2), nn.Flatten())
        dim = 4 * width * 16
        self.score = spectral_norm(nn.Linear(dim, 1))
        self.project = spectral_norm(nn.Embedding(num_classes, dim))
        self.classify = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.score(h)[:, 0] + (self.project(labels) * h).sum(1), self.classify(h)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    grey, labels = digits(32)
    images, labels = torch.from_numpy(grey)[:, None] * 2 - 1, torch.from_numpy(labels)
    c = CONFIG
    generator = DCGANGenerator(c["latent_dim"], c["image_size"], c["channels"], c["base_channels"], c["num_classes"])
    critic = Discriminator(c["num_classes"])
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.0, 0.9))
    classifier = DigitClassifier()
    d_curve, g_curve, accuracy = [], [], []
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (64,))
        real, real_labels = images[idx], labels[idx]
        fake_labels = torch.randint(0, 10, (64,))
        fake = generator(torch.randn(64, c["latent_dim"]), fake_labels)
        real_score, real_class = critic(real, real_labels)
        fake_score, _ = critic(fake.detach(), fake_labels)
        d_loss = F.relu(1 - real_score).mean() + F.relu(1 + fake_score).mean() + F.cross_entropy(real_class, real_labels)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        fake_score, fake_class = critic(fake, fake_labels)
        g_loss = -fake_score.mean() + F.cross_entropy(fake_class, fake_labels)
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        d_curve.append(d_loss.item())
        g_curve.append(g_loss.item())
        if step % 250 == 0 or step == args.steps - 1:
            accuracy.append((step, sample_accuracy(generator, classifier, c["latent_dim"])))
            print(f"{time.perf_counter() - started:5.0f} s  step {step:5d}  D {np.mean(d_curve[-100:]):.3f}  "
                  f"G {np.mean(g_curve[-100:]):.3f}  classifier agrees {accuracy[-1][1]:.1%}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in generator.eval().state_dict().items()}, args.out / "model.safetensors")
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    Chart("digits-gan training", "step", "loss / accuracy").line(
        "D hinge+aux (100-step mean)", range(len(d_curve)), running_mean(d_curve, 100)).line(
        "G (100-step mean)", range(len(g_curve)), running_mean(g_curve, 100)).line(
        "samples labelled right", *zip(*accuracy)).save(args.out / "training.png")
    served = GeneratorModel.load(args.out, CONFIG)
    rows = [served.run({"seed": torch.arange(8) + 100 * d, "class_label": torch.full((8,), d)})["images"].numpy()
            for d in range(10)]
    image_grid([list(r) for r in rows], args.out / "samples.png", scale=2, labels=list(DIGIT_NAMES))
    result = {"steps": args.steps, "classifier_accuracy": accuracy[-1][1], "seconds": time.perf_counter() - started}
    (args.out / "training.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


@torch.no_grad()
def sample_accuracy(generator: DCGANGenerator, classifier: DigitClassifier, latent_dim: int, n: int = 500) -> float:
    generator.eval()
    labels = torch.arange(n) % 10
    images = generator(torch.randn(n, latent_dim), labels)[:, 0]
    generator.train()
    return classifier.accuracy(((images + 1) / 2).clamp(0, 1).numpy(), labels.numpy())


if __name__ == "__main__":
    main()
