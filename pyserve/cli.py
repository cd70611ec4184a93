"""The `pyserve` command.

    pyserve serve [MODEL_DIR ...]               the HTTP APIs on 127.0.0.1:8000, msgpack on 8001;
                                                with no directory, the built-in demo models
    pyserve plugins [--plugin-dir DIR]          what plugins were found, from where, and failures
    pyserve generate MODEL_DIR "Once upon" -n 32 offline generation, to try a model quickly
    pyserve finetune MODEL_DIR train.jsonl -o out  a LoRA adapter trained in this terminal (the same
                                                trainer as the server's fine-tuning jobs)
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import ClientError
from .kernels import WEIGHT_FORMATS
from .plugin import PluginRegistry
from .store import default_data_dir
from .tasks import KV_CACHE_DTYPES

QUANTIZATIONS = ["none", *WEIGHT_FORMATS]


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

    llm = LLM(args.model, device=args.device, plugin_dirs=args.plugin_dir, quantization=args.quantization,
              tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=args.kv_cache_dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    out = llm.generate(args.prompt, params)[0]
    print(out.text)
    return 0


# `pyserve finetune` flags that are hyperparameters, by their names in a job's `hyperparameters`
FINETUNE_FLAGS = ("n_epochs", "batch_size", "learning_rate", "learning_rate_multiplier", "beta", "sft_weight",
                  "optimizer", "weight_decay", "l1", "warmup_steps", "max_steps", "rank", "alpha", "dropout", "target_modules",
                  "validation_split", "eval_every", "early_stopping_patience")


def _finetune(args) -> int:
    """Train a LoRA adapter on a JSONL file as a server's job would, with a progress bar; write the
    adapter, its checkpoints, the loss curve (loss.png), the steps' metrics and the evaluation."""
    try:
        from .finetune import Cancelled, TrainingConfig, TrainingSpec, train
        from .finetune.report import write_report
    except ImportError as exc:
        sys.exit(f'pyserve: fine-tuning needs {exc.name}: pip install "pyserve[finetune]"')
    values = {name: getattr(args, name) for name in FINETUNE_FLAGS if getattr(args, name) is not None}
    if "target_modules" in values:
        values["target_modules"] = values["target_modules"].split(",")
    try:
        config = TrainingConfig.from_request({"type": args.method, args.method: {"hyperparameters": values}},
                                             seed=args.seed)
    except ClientError as exc:
        sys.exit(f"pyserve: --{exc.field.rpartition('.')[2].replace('_', '-')}: {exc.message.partition(': ')[2]}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    spec = TrainingSpec(str(args.model), str(args.training_file), str(out), config,
                        str(args.validation_file) if args.validation_file else None)
    try:
        result = train(spec, report=lambda event: event.kind == "message" and print(event.message), progress=True)
    except ClientError as exc:  # a line that does not fit the method or the model
        sys.exit(f"pyserve: {exc.message}")
    except (Cancelled, KeyboardInterrupt):
        sys.exit("pyserve: stopped; the checkpoints written so far are in " + str(out))
    paths = write_report(result, out, title=Path(args.model).name)
    if result.valid_losses:
        print(f"validation loss: {result.valid_loss_before:.4f} before, {result.valid_loss_after:.4f} after")
    print(f"adapter: {result.adapter_dir}\nloss curve: {paths['loss.png']}\nevaluation: {paths['eval.json']}")
    print(f"serve it: pyserve serve {args.model} --lora {args.name}={result.adapter_dir}")
    return 0


def _serve(args) -> int:
    import torch

    from .engine import EngineDriver, load_engine
    from .tasks import TEXT_GENERATION
    from .server import serve
    from .server.auth import AccessPolicy, read_key_file
    from .server.config import ServerConfig

    if args.served_model_name and len(args.served_model_name) != len(args.models):
        sys.exit("--served-model-name must be given once per model directory")
    for name in ("kv_cache_memory_gib", "max_num_seqs", "max_num_batched_tokens", "max_batch_size",
                 "max_queue_size", "max_loras", "tensor_parallel_size", "max_image_cost", "finetune_jobs",
                 "finetune_threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            sys.exit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_queue_delay_ms is not None and args.max_queue_delay_ms < 0:
        sys.exit(f"--max-queue-delay-ms must be >= 0, got {args.max_queue_delay_ms}")
    # Batching flags override each model's config only when given.
    batching = {k: v for k, v in {"max_batch_size": args.max_batch_size, "max_queue_size": args.max_queue_size,
                                  "max_queue_delay_s": None if args.max_queue_delay_ms is None
                                  else args.max_queue_delay_ms / 1000,
                                  "max_image_cost": args.max_image_cost}.items() if v is not None}
    registry = PluginRegistry.discover(args.plugin_dir)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.models:
        default_names = [Path(d).stem if Path(d).suffix == ".gguf" else Path(d).name for d in args.models]
        known = dict(zip(args.served_model_name or default_names, args.models))
    else:
        from .demo import demo_model_dirs
        known = demo_model_dirs()

    def load(name: str) -> EngineDriver:
        text = registry.for_model(known[name]).task == TEXT_GENERATION  # KeyError: unknown
        embed = text and args.task == "embed"
        engine = load_engine(known[name], registry=registry, device=args.device, dtype=dtype,
                             task="embed" if embed else None,
                             quantization=args.quantization if text and not embed else None,
                             tensor_parallel_size=args.tensor_parallel_size if text and not embed else 1,
                             kv_cache_memory=int(args.kv_cache_memory_gib * 2**30), max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens, max_loras=args.max_loras,
                             kv_cache_dtype=args.kv_cache_dtype, **batching)
        return EngineDriver(engine, name=f"pyserve-engine-{name}")

    keys = list(args.api_key or []) + [k for f in args.api_key_file for k in read_key_file(f)]
    access = AccessPolicy(keys, [args.admin_api_key] if args.admin_api_key else [], args.cache_salt_per_key)
    if args.ray:
        return _serve_on_ray(args, known, access, dict(
            device=args.device, dtype=dtype, quantization=args.quantization,
            tensor_parallel_size=args.tensor_parallel_size, kv_cache_memory=int(args.kv_cache_memory_gib * 2**30),
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_loras=args.max_loras, kv_cache_dtype=args.kv_cache_dtype, **batching))
    try:
        config = ServerConfig(host=args.host, port=args.port, msgpack_port=args.msgpack_port or None, access=access,
                              drain_seconds=args.drain_timeout,
                              data_dir=args.data_dir or str(default_data_dir()), store=args.store,
                              store_days=args.store_days,
                              max_connections=args.max_connections,
                              ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, log_level=args.log_level,
                              allowed_image_hosts=frozenset(args.allowed_image_hosts),
                              lora_adapters=tuple(_lora_pairs(args.lora)),
                              model_dirs={name: str(path) for name, path in known.items()},
                              finetune_jobs=args.finetune_jobs, finetune_threads=args.finetune_threads,
                              finetune_ray_address=args.finetune_ray_address)
        config.ssl_context()  # a bad certificate or key stops the start, before models load
        drivers = {name: load(name) for name in known} if args.models else _load_demos(known, load)
    except (ValueError, LookupError, OSError) as exc:
        sys.exit(f"pyserve: {exc}")
    try:
        serve(drivers, config, loader=load)
    except ClientError as exc:  # e.g. a --lora adapter that does not fit the model
        sys.exit(f"pyserve: {exc.message}")
    return 0


def _serve_on_ray(args, known: dict, access, engine_options: dict) -> int:
    """The same routes, each model's engine in --replicas Ray Serve replicas (pyserve.ray)."""
    try:
        from .ray import RayOptions, run
    except ImportError:
        sys.exit('pyserve: --ray needs Ray Serve: pip install "pyserve[ray]"')
    if args.replicas < 1:
        sys.exit(f"--replicas must be positive, got {args.replicas}")
    if args.lora or args.msgpack_port not in (0, 8001) or args.ssl_certfile:
        logging.getLogger("pyserve").warning("--ray serves HTTP only: --lora, the msgpack port and TLS are not used")
    from .engine import default_device
    on_gpu = (args.device or default_device()).startswith("cuda")
    autoscaling = None
    if args.max_replicas is not None:
        if args.max_replicas < args.replicas:
            sys.exit(f"--max-replicas ({args.max_replicas}) must be at least --replicas ({args.replicas})")
        autoscaling = {"min_replicas": args.replicas, "max_replicas": args.max_replicas}
    options = RayOptions(replicas=args.replicas, autoscaling=autoscaling, cpus_per_replica=args.cpus_per_replica,
                         gpus_per_replica=args.tensor_parallel_size if on_gpu else 0,
                         engine_options=engine_options, access=access,
                         allowed_image_hosts=frozenset(args.allowed_image_hosts))
    run(known, options, address=args.ray_address, host=args.host, port=args.port)
    return 0


def _load_demos(known: dict, load) -> dict:
    """Every demo model whose extras are installed; the others are named in one line each."""
    drivers = {}
    for name in known:
        try:
            drivers[name] = load(name)
        except ImportError as exc:
            logging.getLogger("pyserve").warning("demo model %s skipped: it needs %s (pip install 'pyserve[diffusion]')",
                                                 name, exc.name or exc)
    if not drivers:
        sys.exit("pyserve: no demo model could be loaded")
    return drivers


def _lora_pairs(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH, got {value!r}")
        pairs.append((name, path))
    return pairs


def _env_list(name: str) -> list[str]:
    value = os.environ.get(name)
    return [value] if value else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyserve", description="An inference server for generative models.")
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING or ERROR (default: INFO for serve, WARNING otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve models over the OpenAI-compatible HTTP API")
    s.add_argument("models", nargs="*", metavar="MODEL_DIR",
                   help="model directories (Hugging Face, diffusers, pyserve one-shot formats) or llama.cpp .gguf "
                        "files; none: the demo models")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (OpenAI /v1, KServe /v2, /metrics)")
    s.add_argument("--msgpack-port", type=int, default=8001, help="msgpack protocol port (0: off)")
    s.add_argument("--api-key", action="append", default=_env_list("PYSERVE_API_KEY"),
                   help="an inference key clients must send (HTTP 'Authorization: Bearer KEY', msgpack auth "
                        "frame); repeatable (default: $PYSERVE_API_KEY)")
    s.add_argument("--api-key-file", action="append", default=[],
                   help="a file of inference keys, one per line (# comments)")
    s.add_argument("--admin-api-key", default=os.environ.get("PYSERVE_ADMIN_API_KEY"),
                   help="the key for operations: model load/unload, feedback export (default: "
                        "$PYSERVE_ADMIN_API_KEY; without it those routes are closed once any key is set)")
    s.add_argument("--cache-salt-per-key", action="store_true",
                   help="salt every request's prefix cache by its API key, so tenants never share cached prefixes")
    s.add_argument("--ssl-certfile", default=None, help="serve both ports over TLS with this certificate (PEM)")
    s.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    s.add_argument("--data-dir", default=None,
                   help="where stored completions and responses, files and feedback are kept (default: "
                        "$XDG_DATA_HOME/pyserve or ~/.local/share/pyserve)")
    s.add_argument("--store", action="store_true",
                   help="store every chat completion that does not ask `store: false` (default: those asking "
                        "`store: true`)")
    s.add_argument("--store-days", type=float, default=None, help="delete stored completions older than this")
    s.add_argument("--task", default="generate", choices=["generate", "embed"],
                   help="what text-generation models serve: generate (default) or embed (/v1/embeddings, "
                        "the last token's hidden state, normalised)")
    s.add_argument("--finetune-jobs", type=int, default=1,
                   help="fine-tuning jobs that train at once, each in a worker process (default: 1)")
    s.add_argument("--finetune-threads", type=int, default=None,
                   help="torch threads of a fine-tuning worker (default: torch's; fewer leave more to serving)")
    s.add_argument("--finetune-ray-address", default=None, metavar="ADDRESS",
                   help="train fine-tuning jobs on this Ray cluster ('auto': the one this machine is in) instead "
                        "of a local worker process; paths must be on storage every node sees (docs/scaling.md)")
    s.add_argument("--allowed-image-host", dest="allowed_image_hosts", action="append", default=[], metavar="HOST",
                   help="a host whose http(s) image URLs chat requests may name (repeatable; default: none, "
                        "data: URLs only)")
    s.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter over the text model as NAME (repeatable)")
    s.add_argument("--max-loras", type=int, default=32, help="distinct LoRA adapters running at once")
    s.add_argument("--served-model-name", action="append", help="the API name of each model (default: folder)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")
    s.add_argument("--plugin-dir", action="append", default=[])
    s.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="text models: pack the linear layers' weights (int8/int4: a scale per 32 values, as "
                        "llama.cpp's Q8_0/Q4_0); activations and the KV cache stay in --dtype, except that "
                        "w8a8/w4a8 (int8/int4 weights) quantize decode-sized products' inputs to int8 on CPUs "
                        "(default: as the checkpoint: w8a8/w4a8 for Q8_0/Q4_0 GGUF files, none otherwise)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="CPU kernels whose results do not depend on the batch: a seeded sampled completion is "
                        "bit-identical alone and among other requests (costs prompt-processing speed; also "
                        "PYSERVE_BATCH_INVARIANT=1)")
    s.add_argument("--ray", action="store_true",
                   help="run each model in Ray Serve replicas behind the same HTTP routes (pyserve[ray])")
    s.add_argument("--ray-address", default=None, help="with --ray: a running Ray cluster (default: start one here)")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas per model")
    s.add_argument("--max-replicas", type=int, default=None,
                   help="with --ray: autoscale each model between --replicas and this many by load")
    s.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs each replica asks for")
    s.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="text models: split each over this many ranks (processes; one GPU each on CUDA)")
    s.add_argument("--kv-cache-memory-gib", type=float, default=1.0, help="KV cache size per model")
    s.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="text models: the KV cache's dtype (auto: --dtype's); on CPUs bfloat16 under float32 "
                        "activations halves the bytes long contexts read")
    s.add_argument("--max-num-seqs", type=int, default=128, help="sequences running at once")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    s.add_argument("--max-batch-size", type=int, default=None,
                   help="one-shot models: items per batch; diffusion: images per step (default: each model's config)")
    s.add_argument("--max-queue-delay-ms", type=float, default=None,
                   help="one-shot models: how long the oldest queued request waits for a batch to fill")
    s.add_argument("--max-queue-size", type=int, default=None,
                   help="one-shot models: queued items past which new requests get a 503")
    s.add_argument("--max-image-cost", type=int, default=None,
                   help="image models: the largest width x height x steps x n one request may ask for (default: "
                        "four times the model's native pixels at 50 steps)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds open requests may take to finish after SIGTERM or Ctrl-C")
    s.add_argument("--max-connections", type=int, default=None,
                   help="open connections per port; more get a 503 and are closed (default: half the process's "
                        "file-descriptor limit, less some headroom)")
    s.set_defaults(run=_serve)

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
    g.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="split the model over this many ranks")
    g.add_argument("--plugin-dir", action="append", default=[])
    g.add_argument("--batch-invariant", action="store_true",
                   help="CPU kernels whose results do not depend on the batch: a seeded sampled completion is "
                        "bit-identical alone and among other requests (costs prompt-processing speed; also "
                        "PYSERVE_BATCH_INVARIANT=1)")
    g.set_defaults(run=_generate)

    f = sub.add_parser("finetune", help="train a LoRA adapter on chat (or DPO) JSONL, with a progress bar")
    f.add_argument("model", help="a Hugging Face text model directory (e.g. pyserve/demo/models/pydoc-chat)")
    f.add_argument("training_file", help="JSONL in OpenAI's fine-tuning format: {\"messages\": [...]} lines, or "
                                         "DPO lines with --method dpo")
    f.add_argument("-o", "--output", required=True, help="where the adapter, checkpoints and report go")
    f.add_argument("--validation-file", default=None, help="held-out lines (default: --validation-split of the "
                                                           "training lines, or none)")
    f.add_argument("--method", default="supervised", choices=["supervised", "dpo"])
    f.add_argument("--name", default="finetuned", help="the adapter's name in the printed serve command")
    f.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--epochs", dest="n_epochs", type=int, default=None)
    for name, kind in (("batch_size", int), ("learning_rate", float), ("learning_rate_multiplier", float),
                       ("beta", float), ("sft_weight", float), ("optimizer", str), ("weight_decay", float),
                       ("l1", float),
                       ("warmup_steps", int), ("max_steps", int), ("rank", int), ("alpha", float), ("dropout", float),
                       ("target_modules", str), ("validation_split", float), ("eval_every", int),
                       ("early_stopping_patience", int)):
        f.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       help="comma-separated" if name == "target_modules" else None)
    f.set_defaults(run=_finetune)

    parser.set_defaults(batch_invariant=False)  # commands without the flag
    args = parser.parse_args(argv)
    if args.batch_invariant:
        os.environ["PYSERVE_BATCH_INVARIANT"] = "1"  # tensor-parallel and Ray workers read it at import
        from . import kernels
        kernels.set_batch_invariant(True)
    args.log_level = (args.log_level or ("INFO" if args.command == "serve" else "WARNING")).upper()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
