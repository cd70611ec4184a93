"""The benchmark model as llama.cpp files, with llama.cpp's own converter and quantizer, so both
servers read the same weights.

    python bench/make_gguf.py MODEL_DIR LLAMA_CPP_DIR OUT_DIR

LLAMA_CPP_DIR is a llama.cpp source tree (e.g. `vendor/llama.cpp` of the llama-cpp-python source
distribution) with `llama-quantize` built in `build/bin`. Writes OUT_DIR/f32.gguf, q8_0.gguf and
q4_0.gguf. The converter recognises tokenizers by a hash of how they split a test string; the
benchmark's tokenizer (trained here) is not in its list, so it is declared GPT-2-style (byte-level
BPE), which is what it is.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path


def convert(model_dir: Path, llama_cpp: Path, out: Path, outtype: str) -> None:
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", llama_cpp / "convert_hf_to_gguf.py")
    converter = importlib.util.module_from_spec(spec)
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]  # newer converters import modules beside them
    spec.loader.exec_module(converter)
    # older trees define TextModel in the script, newer ones in their `conversion` package
    text_model = getattr(converter, "TextModel", None) or importlib.import_module("conversion.base").TextModel
    text_model.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", outtype]
    converter.main()


def main() -> None:
    model_dir, llama_cpp, out_dir = (Path(a) for a in sys.argv[1:4])
    out_dir.mkdir(parents=True, exist_ok=True)
    convert(model_dir, llama_cpp, out_dir / "f32.gguf", "f32")
    for kind in ("q8_0", "q4_0"):
        subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(out_dir / "f32.gguf"),
                        str(out_dir / f"{kind}.gguf"), kind.upper()], check=True, capture_output=True)
        print(f"wrote {out_dir / f'{kind}.gguf'}")


if __name__ == "__main__":
    main()
