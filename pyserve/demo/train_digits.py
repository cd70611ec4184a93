"""Train the demo text-to-image pipeline on scikit-learn's handwritten digits.

    python -m pyserve.demo.train_digits [--out pyserve/demo/models/digits-sd]

A Stable-Diffusion-style pipeline in diffusers format, trained in two stages:
1. a KL autoencoder (`AutoencoderKL`) from 32x32 digit images to 4x8x8 latents, with a light KL
   weight as Stable Diffusion's has: reconstructions are faithful, latents stay near unit scale,
   and decoding z ~ N(0, I) gives strokes rather than digits. The same directory (`vae/`) is the
   demo VAE;
2. a character-level CLIP text encoder and a conditional UNet, trained together on the scaled
   latents with the DDPM noise-prediction loss, the caption ("the digit seven", "a handwritten
   7", ...) dropped 10% of the time so classifier-free guidance works.
Writes the pipeline (fp16 weights; DPM-Solver++ 2M, 20 steps by default), `training.png` with both loss
curves, and `samples.png`, a grid of one row per digit drawn with diffusers' own pipeline.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import DIGIT_NAMES, digit_caption, digits
from .plots import Chart, image_grid, running_mean

DEFAULT_OUT = Path(__file__).parent / "models" / "digits-sd"
SIZE = 32
TOKENS = 32  # caption length in characters (plus start and end)


def write_char_clip_tokenizer(out: Path) -> None:
    """A character-level CLIP tokenizer (vocab.json with every byte symbol, alone and word-final;
    no merges), which transformers' CLIPTokenizer loads as it loads Stable Diffusion's."""
    out.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the rest for 256 + n.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n")


def build(tokenizer_dir: Path):
    import diffusers
    import transformers

    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=SIZE)
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           model_max_length=TOKENS + 2)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENS + 2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    schedule = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=1)
    return vae, tokenizer, text_encoder, unet, schedule


def train_vae(vae, images: torch.Tensor, steps: int, kl_weight: float, log) -> list[float]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    curve = []
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (64,))]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / batch[0].numel()  # per pixel value, as the reconstruction loss
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"vae  step {step:5d}  loss {np.mean(curve[-100:]):.4f}  kl/value {kl.item():.4f}")
    return curve


def train_denoiser(unet, text_encoder, tokenizer, schedule, latents_mean, latents_std, labels, steps: int, log):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warmup = 100
    lr_at = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    alphas = schedule.alphas_cumprod
    generator = torch.Generator().manual_seed(1)
    curve = []
    for step in range(steps):
        idx = torch.randint(0, len(labels), (64,), generator=generator)
        x0 = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=generator)
        captions = [digit_caption(int(labels[i]), int(v)) for i, v in
                    zip(idx, torch.randint(0, 5, (64,), generator=generator))]
        captions = [c if keep else "" for c, keep in zip(captions, torch.rand(64, generator=generator) > 0.1)]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        t = torch.randint(0, len(alphas), (64,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        predicted = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_at.step()
        curve.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step:5d}  loss {np.mean(curve[-100:]):.4f}")
    return curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--kl-weight", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import diffusers

    torch.manual_seed(args.seed)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:6.0f} s  {message}", flush=True)

    grey, labels = digits(SIZE)
    images = torch.from_numpy(grey)[:, None].repeat(1, 3, 1, 1) * 2 - 1  # RGB in [-1, 1]
    tokenizer_dir = args.out / "tokenizer"
    write_char_clip_tokenizer(tokenizer_dir)
    vae, tokenizer, text_encoder, unet, schedule = build(tokenizer_dir)
    vae_curve = train_vae(vae.train(), images, args.vae_steps, args.kl_weight, log)

    with torch.no_grad():
        posterior = vae.eval().encode(images).latent_dist
    scaling = 1.0 / float(posterior.mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latent scaling factor {scaling:.4f}")
    unet_curve = train_denoiser(unet.train(), text_encoder.train(), tokenizer, schedule, posterior.mean * scaling,
                                posterior.std * scaling, torch.from_numpy(labels), args.unet_steps, log)

    pipe = diffusers.StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                             unet=unet.eval(), scheduler=schedule, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    Chart("digits-sd training", "step", "loss").line("VAE (100-step mean)", range(len(vae_curve)),
                                                     running_mean(vae_curve, 100)).line(
        "UNet (100-step mean)", range(len(unet_curve)), running_mean(unet_curve, 100)).save(args.out / "training.png")
    rows = []
    for label in range(10):
        generator = torch.Generator().manual_seed(label)
        out = pipe([f"the digit {DIGIT_NAMES[label]}"] * 8, num_inference_steps=20, guidance_scale=5.0,
                   generator=generator, output_type="np", height=SIZE, width=SIZE).images
        rows.append([(img * 255).round().astype(np.uint8) for img in out])
    image_grid(rows, args.out / "samples.png", scale=2, labels=[f"the digit {n}" for n in DIGIT_NAMES])
    pipe.to(dtype=torch.float16).save_pretrained(args.out)  # half the bytes; loaders upcast to the dtype they run in
    (args.out / "training.json").write_text(json.dumps(
        {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "kl_weight": args.kl_weight,
         "latent_scaling_factor": scaling, "seconds": time.perf_counter() - started}, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
