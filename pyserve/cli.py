"""The `pyserve` command.

    pyserve plugins [--plugin-dir DIR]          what plugins were found, from where, and failures
    pyserve generate MODEL_DIR "Once upon" -n 32 offline generation, to try a model quickly
"""

import argparse
import logging
import sys

from .plugin import PluginRegistry


def _plugins(args) -> int:
    registry = PluginRegistry.discover(args.plugin_dir)
    print(f"{len(registry.plugins)} plugin(s):")
    for info in registry.plugins:
        p = info.plugin
        print(f"  {p.name:<12} task={p.task:<17} architectures={', '.join(p.architectures) or '-'}")
        print(f"  {'':<12} from {info.source}")
    if registry.failures:
        print(f"{len(registry.failures)} plugin(s) failed to load:")
        for failure in registry.failures:
            print(f"  {failure.source}: {failure.error}")
    return 0


def _generate(args) -> int:
    from . import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, plugin_dirs=args.plugin_dir)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    out = llm.generate(args.prompt, params)[0]
    print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyserve", description="An inference server for generative models.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list discovered plugins and any that failed to load")
    p.add_argument("--plugin-dir", action="append", default=[], help="a folder of drop-in plugins (repeatable)")
    p.set_defaults(run=_plugins)

    g = sub.add_parser("generate", help="generate text offline from a model directory")
    g.add_argument("model", help="a Hugging Face model directory")
    g.add_argument("prompt")
    g.add_argument("-n", "--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--plugin-dir", action="append", default=[])
    g.set_defaults(run=_generate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
