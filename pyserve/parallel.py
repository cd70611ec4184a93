"""Tensor parallelism: one text model split over N ranks of a torch.distributed process group, as
Megatron-LM splits a transformer.

Rank 0 is the serving process: its engine schedules, keeps the cache's books and samples as
always. Each step it sends the batch to ranks 1..N-1 (worker processes it started), and every
rank runs the forward pass on its slice: column-parallel products (q/k/v heads, gate/up
columns) need no exchange, row-parallel ones (attention output, down) end in one all-reduce
each. Every rank holds its own slice of the weights and of the KV cache (its KV heads); the
embedding and the output layer stay whole. Gloo on CPUs, NCCL on GPUs.

    model = load_tensor_parallel(plugin, "path/to/llama", 2, device="cpu")
    engine = LLMEngine(model)   # as with any text model

A plugin supports it with a `shard(group)` method on its module (see plugins/llama).
"""

from __future__ import annotations  # torch builds without distributed support still import this

import atexit
import dataclasses
import datetime
import logging
import multiprocessing
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import InvalidParameter
from .tasks import KVCache

log = logging.getLogger("pyserve.parallel")

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering fails the others' collectives


@dataclasses.dataclass
class Group:
    """This rank's place in the tensor-parallel group, and the collectives the model uses."""

    rank: int
    size: int
    pg: dist.ProcessGroup
    device: torch.device  # where collective buffers live (NCCL wants them on the rank's GPU)

    def all_reduce(self, t: torch.Tensor) -> None:
        self.pg.allreduce([t]).wait()

    def send(self, message) -> None:
        """Rank 0: broadcast a picklable message (tensors travel through host memory)."""
        data = torch.frombuffer(bytearray(pickle.dumps(_moved(message, torch.device("cpu")))), dtype=torch.uint8)
        self.pg.broadcast(torch.tensor([data.numel()], device=self.device), 0).wait()
        self.pg.broadcast(data.to(self.device), 0).wait()

    def receive(self, device: torch.device):
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.pg.broadcast(size, 0).wait()
        data = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        self.pg.broadcast(data, 0).wait()
        return _moved(pickle.loads(data.cpu().numpy().tobytes()), device)


def rendezvous(size: int, port: int = 0) -> dist.TCPStore:
    """Rank 0's store on a free port (port 0: the system picks it), opened before the workers
    start (so it does not wait for them here: the process group does), or a worker's connection to it."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=port == 0, timeout=TIMEOUT, wait_for_workers=False)


def connect(rank: int, size: int, store: dist.TCPStore, device: torch.device) -> Group:
    if device.type == "cuda":
        pg = dist.ProcessGroupNCCL(store, rank, size)
    else:
        pg = dist.ProcessGroupGloo(store, rank, size, TIMEOUT)
    return Group(rank, size, pg, device)


def sliced_linear(linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  keep_bias: bool = True):
    """A copy of a pyserve.nn.Linear holding weight[rows][:, cols] (its bias sliced by rows, or
    dropped where `keep_bias` is False: a row-parallel layer adds its bias on one rank only)."""
    from .nn import Linear

    weight = linear.weight if rows is None else linear.weight[rows]
    weight = weight if cols is None else weight[:, cols]
    has_bias = linear.bias is not None and keep_bias
    out = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if has_bias:
        out.bias.data.copy_(linear.bias if rows is None else linear.bias[rows])
    return out.requires_grad_(False)


def kv_heads_of_rank(kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, KV heads) a rank keeps. With fewer KV heads than ranks each is replicated:
    the ranks whose query heads read KV head k all hold a copy of it (as vLLM does), so a model with
    one KV head splits over any number of ranks that divides its query heads."""
    if kv_heads >= size:
        if kv_heads % size:
            raise ValueError(f"the model's key/value heads ({kv_heads}) do not split over {size} ranks")
        return rank * (kv_heads // size), kv_heads // size
    if size % kv_heads:
        raise ValueError(f"the model's key/value heads ({kv_heads}) cannot be replicated over {size} ranks")
    return rank // (size // kv_heads), 1


def head_rows(first_head: int, heads: int, head_dim: int, offset: int = 0) -> torch.Tensor:
    """The output rows of `heads` heads starting at `first_head`, in a projection whose part
    starts at row `offset`."""
    return offset + torch.arange(first_head * head_dim, (first_head + heads) * head_dim)


class TensorParallelModel:
    """Rank 0's model: its slice, plus the workers that hold the other slices."""

    def __init__(self, model, group: Group, workers: list):
        self.model, self.group, self.workers = model, group, workers
        self.spec, self.tokenizer = model.spec, model.tokenizer
        atexit.register(self.close)  # before multiprocessing's own exit hook kills the workers

    vision = None
    fused_decode = False  # the ranks' steps go through forward

    def decode(self, batch, cache):
        return None

    def forward(self, input_ids, positions, meta, cache: KVCache, images=None, adapters=None):
        if images is not None or adapters is not None:
            raise InvalidParameter("model", "images and LoRA adapters are not served with tensor parallelism")
        self.group.send(("step", tuple(cache.keys[0].shape), cache.keys[0].dtype, len(cache.keys), input_ids,
                         positions, meta))
        return self.model.forward(input_ids, positions, meta, cache)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)

    def adapter_layers(self, adapter):
        raise InvalidParameter("lora", "LoRA adapters are not served with tensor parallelism")

    def close(self) -> None:
        """Stop the workers (done at exit too)."""
        if self.workers:
            try:
                self.group.send(("stop",))
            except RuntimeError:  # a worker is gone already: the others stop when their pipe closes
                log.warning("tensor-parallel workers could not be told to stop; terminating them")
                for worker in self.workers:
                    worker.terminate()
            for worker in self.workers:
                worker.join(timeout=30)
            self.workers = []


def load_tensor_parallel(plugin, model_dir: str | Path, size: int, *, device: str, dtype: torch.dtype | None = None,
                         quantization: str | None = None, plugin_dirs: list[str] | None = None) -> TensorParallelModel:
    """Start ranks 1..size-1 as worker processes, load this rank's slice, and connect them.

    The ranks load their checkpoints first and say so through a pipe before any of them joins the
    process group, whose set-up waits for every rank: a rank that fails to start fails this call
    at once with its own error, instead of leaving the others waiting out the group's timeout."""
    if size < 2:
        raise ValueError(f"tensor parallelism needs at least 2 ranks, got {size}")
    if torch.device(device).type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"--tensor-parallel-size {size} needs {size} GPUs, this machine has "
                         f"{torch.cuda.device_count()}")
    store = rendezvous(size)
    # Each rank gets its share of the cores (rank 0 keeps its own setting: it serves too).
    threads = max(1, torch.get_num_threads() // size)
    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    for rank in range(1, size):
        ours, theirs = context.Pipe(duplex=False)
        worker = context.Process(target=_worker, name=f"pyserve-tp-rank{rank}", daemon=True, args=(
            rank, size, store.port, str(model_dir), device, dtype, quantization, plugin_dirs, threads, theirs))
        worker.start()
        theirs.close()
        workers.append(worker)
        pipes.append(ours)
    try:
        model = plugin.load(Path(model_dir), device=str(_rank_device(device, 0)), dtype=dtype)
        for rank, (worker, pipe) in enumerate(zip(workers, pipes), start=1):
            _wait_loaded(rank, worker, pipe)
        group = connect(0, size, store, _rank_device(device, 0))
        _shard(model, group, quantization)
    except BaseException:
        for worker in workers:
            worker.terminate()
        raise
    log.info("%s: tensor parallel over %d ranks (%s)", Path(model_dir).name, size,
             "nccl" if group.device.type == "cuda" else "gloo")
    return TensorParallelModel(model, group, workers)


def _shard(model, group: Group, quantization: str | None) -> None:
    """Keep this rank's slice of a loaded model, then pack it as asked."""
    from .nn import pack_as_asked

    model.module.shard(group)
    model.spec = dataclasses.replace(model.spec,
                                     num_kv_heads=kv_heads_of_rank(model.spec.num_kv_heads, group.rank, group.size)[1])
    pack_as_asked(model, quantization)


def _wait_loaded(rank: int, worker, pipe) -> None:
    """Wait for a worker's word that its checkpoint is loaded; raise its error, or its death."""
    while not pipe.poll(0.1):
        if not worker.is_alive():
            raise RuntimeError(f"tensor-parallel rank {rank} exited while starting (exit code {worker.exitcode})")
    try:
        error = pipe.recv()
    except EOFError:  # closed without a word: it died
        worker.join(timeout=5)
        raise RuntimeError(f"tensor-parallel rank {rank} exited while starting (exit code {worker.exitcode})") \
            from None
    if error is not None:
        raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {error}")


def _worker(rank, size, port, model_dir, device, dtype, quantization, plugin_dirs, threads, pipe) -> None:
    from .plugin import PluginRegistry

    torch.set_num_threads(threads)
    try:
        plugin = PluginRegistry.discover(plugin_dirs).for_model(model_dir)
        model = plugin.load(Path(model_dir), device=str(_rank_device(device, rank)), dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - rank 0 raises it
        pipe.send(f"{type(exc).__name__}: {exc}")
        return
    pipe.send(None)
    try:
        group = connect(rank, size, rendezvous(size, port), _rank_device(device, rank))
        _shard(model, group, quantization)
    except Exception as exc:  # noqa: BLE001 - rank 0 meets the same fault (the same split) and reports it
        log.error("tensor-parallel rank %d did not start: %s", rank, exc)
        return
    spec, cache = model.spec, None
    with torch.inference_mode():
        while True:
            try:
                message = group.receive(spec.device)
            except RuntimeError:  # rank 0 is gone (killed, or exited without closing)
                log.warning("tensor-parallel rank %d: rank 0 went away; stopping", rank)
                return
            if message[0] == "stop":
                return
            _, shape, cache_dtype, layers, input_ids, positions, meta = message
            if cache is None or tuple(cache.keys[0].shape) != shape:  # rank 0's engine sized the cache
                cache = KVCache.allocate(layers, *shape, cache_dtype, spec.device)
            model.forward(input_ids, positions, meta, cache)


def _rank_device(device: str, rank: int) -> torch.device:
    device = torch.device(device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _moved(obj, device: torch.device):
    """obj with every tensor inside (tuples, lists, dataclasses) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(x, device) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _moved(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj

