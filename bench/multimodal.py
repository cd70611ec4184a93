"""Vision-language chat throughput: 32 image+text requests at once on a small LLaVA-style model
(random weights), pyserve's engine against transformers `generate` on the same requests, in one run.

    python bench/multimodal.py [--quick]

Both sides get the same requests: one image each, questions of different lengths, and between
16 and 128 new tokens each (greedy, EOS ignored), as chat traffic comes. transformers runs them as
one left-padded batch until the longest is done (a static batch: what `generate` offers);
pyserve batches continuously. Both are credited with the requested tokens only. Also reported:
the share of pyserve's time spent in the vision encoder. Writes bench/results/multimodal.json.
"""

import argparse
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import write_llava_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_result  # noqa: E402

from pyserve import LLM, SamplingParams  # noqa: E402
from pyserve.server.vision_inputs import expand_image_tokens  # noqa: E402
from pyserve.tasks import ImageInput  # noqa: E402


def make_checkpoint(out: Path, quick: bool) -> Path:
    """CLIP-style tower (224 px, 16 px patches: 196 image tokens) and a ~40M-parameter Llama."""
    import transformers

    tok = write_llava_tokenizer(out)
    vision = transformers.CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=3 if quick else 6,
                                           num_attention_heads=6, image_size=224, patch_size=16)
    text = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                    num_hidden_layers=2 if quick else 8, num_attention_heads=8, num_key_value_heads=4,
                                    max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"),
                                   image_seq_length=196)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(out, safe_serialization=True)
    transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
                                    ).save_pretrained(out)
    return out


def pictures(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 8 if args.quick else 32
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(tmp), args.quick)
        llm = LLM(model_dir, device="cpu", kv_cache_memory=2**30, max_num_seqs=64, max_num_batched_tokens=2048)
        vision = llm.engine.info.vision
        rng = random.Random(0)
        words = "describe the picture and what the objects in it might be used for today".split()
        prompts, lengths = [], [rng.randint(16, 128) if not args.quick else 16 for _ in range(n)]
        for _ in range(n):
            question = " ".join(rng.choice(words) for _ in range(rng.randint(2, 24)))
            content = [{"type": "image"}, {"type": "text", "text": question}]
            ids = llm.engine.tokenizer.encode_chat([{"role": "user", "content": content}])
            prompts.append(expand_image_tokens(ids, vision))
        def prepared(images):
            return [ImageInput(vision.preprocess(im), hashlib.sha256(im.tobytes()).hexdigest()) for im in images]

        # The warm-up sees other images: the same ones would all be prefix-cache hits.
        warmup, inputs = prepared(pictures(n, 1)), prepared(pictures(n, 0))

        encode = llm.engine.model.encode_images
        spent = {"vision": 0.0}

        def timed(pixels):
            start = time.perf_counter()
            out = encode(pixels)
            spent["vision"] += time.perf_counter() - start
            return out

        llm.engine.model.encode_images = timed

        def run_pyserve(inputs) -> float:
            start = time.perf_counter()
            for i, (image, ids, length) in enumerate(zip(inputs, prompts, lengths)):
                llm.engine.add_request(f"r{i}-{start}", ids, SamplingParams(max_tokens=length, temperature=0,
                                                                            ignore_eos=True), images=[image])
            while llm.engine.has_unfinished():
                llm.engine.step()
            return time.perf_counter() - start

        run_pyserve(warmup)
        spent["vision"] = 0.0
        ours = run_pyserve(inputs)

        import transformers
        reference = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
        pixels = torch.stack([i.pixels for i in inputs])
        width = max(len(p) for p in prompts)
        batch = torch.tensor([[2] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            reference.generate(input_ids=batch[:2], attention_mask=mask[:2], pixel_values=pixels[:2],
                               max_new_tokens=2, do_sample=False, pad_token_id=2)
            start = time.perf_counter()
            reference.generate(input_ids=batch, attention_mask=mask, pixel_values=pixels, max_new_tokens=max(lengths),
                               min_new_tokens=max(lengths), do_sample=False, pad_token_id=2)
            theirs = time.perf_counter() - start
    tokens = sum(lengths)
    result = {"requests": n, "new_tokens": tokens, "prompt_tokens": sum(len(p) for p in prompts),
              "pyserve_tokens_per_s": tokens / ours, "transformers_tokens_per_s": tokens / theirs,
              "ratio": theirs / ours, "vision_encoder_share": spent["vision"] / ours}
    print(f"{n} requests, {tokens} new tokens, {result['prompt_tokens']} prompt tokens "
          f"({vision.tokens_per_image} a image)")
    print(f"pyserve       {result['pyserve_tokens_per_s']:8.1f} tokens/s")
    print(f"transformers  {result['transformers_tokens_per_s']:8.1f} tokens/s   ratio {result['ratio']:.2f}x "
          "(target >= 2)")
    print(f"vision encoder: {100 * result['vision_encoder_share']:.1f}% of pyserve's time")
    write_result("multimodal", result, args.quick)


if __name__ == "__main__":
    main()
