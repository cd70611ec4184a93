"""Where benchmark results go: bench/results/NAME.json (NAME-quick.json for --quick runs)."""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, result: dict, quick: bool = False) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_ratios(alone: list[float], beside: list[float]) -> dict:
    """p50 and p99 of request latencies alone and beside a load, and beside / alone for each."""
    row = {"p50_alone_s": percentile(alone, 0.5), "p99_alone_s": percentile(alone, 0.99),
           "p50_beside_s": percentile(beside, 0.5), "p99_beside_s": percentile(beside, 0.99)}
    row["p50_ratio"] = row["p50_beside_s"] / row["p50_alone_s"]
    row["p99_ratio"] = row["p99_beside_s"] / row["p99_alone_s"]
    return row


def print_latency_ratios(row: dict, alone: str, beside: str) -> None:
    print(f"{'phase':<34}{'p50 s':>10}{'p99 s':>10}")
    print(f"{alone:<34}{row['p50_alone_s']:>10.3f}{row['p99_alone_s']:>10.3f}")
    print(f"{beside:<34}{row['p50_beside_s']:>10.3f}{row['p99_beside_s']:>10.3f}")
    print(f"p99 ratio {row['p99_ratio']:.2f}x, p50 ratio {row['p50_ratio']:.2f}x")


def quick_flag(doc: str) -> bool:
    """The command line of a benchmark whose only option is --quick (its docstring is the help)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    return parser.parse_args().quick
