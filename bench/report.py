"""Where benchmark results go: bench/results/NAME.json (NAME-quick.json for --quick runs)."""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, result: dict, quick: bool = False) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return out
