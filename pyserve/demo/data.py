"""The data the demo models learn from: all of it ships with Python or its dependencies, so
training needs no download. Everything here is deterministic for a given Python and
scikit-learn release."""

import hashlib
import importlib
import inspect
import json
import math
import subprocess
import sys

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Modules whose import has side effects (a window, a browser, a printed poem) or that are huge.
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
                 "ensurepip", "venv", "pydoc_data", "__hello__", "__phello__"}


def python_docs() -> dict[str, str]:
    """English text from the standard library: the `help()` topics of `pydoc_data` and the
    docstrings of stdlib modules, classes, functions and methods, keyed by a name for each.
    Collected in a child process, since it imports every stdlib module it can."""
    found = subprocess.run([sys.executable, "-W", "ignore", "-m", __name__], capture_output=True, check=True)
    return json.loads(found.stdout)


def _collect_docs() -> dict[str, str]:
    from pydoc_data.topics import topics

    docs = {f"topic {name}": text for name, text in sorted(topics.items())}
    for module_name in sorted(sys.stdlib_module_names):
        if module_name.startswith("_") or module_name in _SKIP_MODULES:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - platform-specific modules simply don't contribute
            continue
        _add_doc(docs, module_name, module)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                _add_doc(docs, f"{module_name}.{attr}", obj)
            if inspect.isclass(obj):
                for method_name, method in sorted(vars(obj).items()):
                    if not method_name.startswith("_") and inspect.isfunction(method):
                        _add_doc(docs, f"{module_name}.{attr}.{method_name}", method)
    return docs


def _add_doc(docs: dict[str, str], name: str, obj) -> None:
    text = inspect.getdoc(obj)
    if text and len(text) >= 80:
        docs[name] = text.strip()


def is_held_out(name: str, fraction: float = 0.05) -> bool:
    """A fixed split by name: the same documents are held out on every run."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return digest / 2**32 < fraction


def digits(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled to size x size with
    bilinear filtering: float32 images [N, size, size] in [0, 1] (ink bright), int64 labels [N]."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return big[:, 0].clamp(0, 1).numpy(), data.target.astype(np.int64)


def digit_caption(label: int, variant: int) -> str:
    """One of a few phrasings a user might type for a digit."""
    name = DIGIT_NAMES[label]
    return (f"the digit {name}", f"a handwritten {name}", f"the number {label}", name,
            f"a picture of the digit {label}")[variant % 5]


def seasonal_series(n: int, length: int, period: int = 12, seed: int = 0) -> np.ndarray:
    """Synthetic seasonal series (level, trend, seasonality, noise), float32 [n, length]."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    level = rng.uniform(5, 50, (n, 1))
    trend = rng.uniform(-0.05, 0.1, (n, 1)) * level / 10
    amplitude = rng.uniform(0.1, 0.5, (n, 1)) * level
    phase = rng.uniform(0, 2 * math.pi, (n, 1))
    noise = rng.normal(0, 0.05, (n, length)) * level
    return (level + trend * t + amplitude * np.sin(2 * math.pi * t / period + phase) + noise).astype(np.float32)


if __name__ == "__main__":
    json.dump(_collect_docs(), sys.stdout)
