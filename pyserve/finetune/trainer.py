"""LoRA training of a served text model's weights: supervised (next-token loss on the answers) or
DPO (preferred over rejected answers, against the base model as the reference), with peft's
adapters on transformers' model of the same checkpoint.

`train` is the whole job, whatever runs it: the server's worker process (pyserve.finetune.runner),
a Ray task (docs/scaling.md) or `pyserve finetune` in a terminal. It reports what happens as
`TrainingEvent`s, stops when `cancelled()` says so, and writes a PEFT adapter directory per
checkpoint (every epoch) and at the end, each servable as it is (`pyserve.lora.LoraAdapter`).

Example:
    >>> spec = TrainingSpec("pyserve/demo/models/pydoc-chat", "facts.jsonl", "out",
    ...                     TrainingConfig(n_epochs=2))                      # doctest: +SKIP
    >>> train(spec, report=print).valid_loss_after                          # doctest: +SKIP
"""

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..tokenizer import Tokenizer
from .config import TrainingConfig
from .data import IGNORED, Example, PreferenceExample, SupervisedExample, read_examples


@dataclass(frozen=True)
class TrainingSpec:
    """What to train: the base model's directory, the data, where adapters go, how."""

    base_dir: str
    training_file: str
    out_dir: str
    config: TrainingConfig = TrainingConfig()
    validation_file: str | None = None


@dataclass
class TrainingEvent:
    """`kind`: message, metrics (data: step, train_loss, valid_loss when evaluated), or
    checkpoint (data: step, path, metrics)."""

    kind: str
    message: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class TrainingResult:
    adapter_dir: str
    steps: int
    trained_tokens: int
    seconds: float
    train_losses: list[tuple[int, float]]  # (step, loss)
    valid_losses: list[tuple[int, float]]  # (step, loss), step 0 before any training
    stopped_early: bool = False

    @property
    def valid_loss_before(self) -> float | None:
        return self.valid_losses[0][1] if self.valid_losses else None

    @property
    def valid_loss_after(self) -> float | None:
        return self.valid_losses[-1][1] if self.valid_losses else None


class Cancelled(Exception):
    """The job was cancelled between two steps."""


def train(spec: TrainingSpec, report: Callable[[TrainingEvent], None] = lambda event: None,
          cancelled: Callable[[], bool] = lambda: False, progress: bool = False) -> TrainingResult:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = spec.config
    torch.manual_seed(config.seed)
    shuffler = random.Random(config.seed)
    tokenizer = Tokenizer.from_dir(spec.base_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.base_dir, dtype=torch.float32)
    max_len = model.config.max_position_embeddings
    examples = read_examples(spec.training_file, tokenizer, config.method, max_len)
    if spec.validation_file is not None:
        held_out = read_examples(spec.validation_file, tokenizer, config.method, max_len, field="validation_file")
    else:
        shuffler.shuffle(examples)
        count = round(len(examples) * config.validation_split) if len(examples) > 1 else 0
        held_out, examples = examples[:count], examples[count:]
    report(TrainingEvent("message", f"{len(examples)} training and {len(held_out)} validation examples"))

    model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                             target_modules=list(config.target_modules), task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(config, trainable)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = min(config.max_steps or math.inf, config.n_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rate(step, config.warmup_steps, total))
    pad = model.config.pad_token_id or 0  # padding is masked out: any id does
    loss_of = _dpo_loss if config.method == "dpo" else _supervised_loss

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [loss_of(model, batch, pad, config.beta, config.sft_weight).item() * len(batch)
                      for batch in _batches(held_out, config.batch_size)]
        model.train()
        return sum(losses) / len(held_out)

    result = TrainingResult(str(Path(spec.out_dir) / "final"), 0, 0, 0.0, [], [])
    if held_out:
        result.valid_losses.append((0, evaluate()))
        report(TrainingEvent("metrics", f"Step 0: validation loss={result.valid_losses[0][1]:.4f}",
                             {"step": 0, "valid_loss": result.valid_losses[0][1]}))
    best, patience, best_weights = math.inf, 0, None
    started = time.perf_counter()
    bar = tqdm(total=int(total), unit="step", desc="fine-tuning", disable=not progress)
    model.train()
    step, epoch = 0, 0
    while step < total and not result.stopped_early:
        epoch += 1
        shuffler.shuffle(examples)
        for batch in _batches(examples, config.batch_size):
            if cancelled():
                raise Cancelled
            loss = loss_of(model, batch, pad, config.beta, config.sft_weight)
            train_loss = loss.item()
            if config.l1:
                loss = loss + config.l1 * sum(p.abs().sum() for p in trainable)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.trained_tokens += sum(e.num_tokens for e in batch)
            result.train_losses.append((step, train_loss))
            metrics = {"step": step, "train_loss": train_loss}
            evaluating = held_out and (step % config.eval_every == 0 if config.eval_every
                                       else step % steps_per_epoch == 0 or step == total)
            if evaluating:
                metrics["valid_loss"] = evaluate()
                result.valid_losses.append((step, metrics["valid_loss"]))
                if metrics["valid_loss"] < best:
                    best, patience = metrics["valid_loss"], 0
                    if config.early_stopping_patience:
                        best_weights = [p.detach().clone() for p in trainable]
                else:
                    patience += 1
            report(TrainingEvent("metrics", f"Step {step}/{total}: training loss={train_loss:.4f}"
                                 + (f", validation loss={metrics['valid_loss']:.4f}" if "valid_loss" in metrics else ""),
                                 metrics))
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}")
            if config.early_stopping_patience and patience >= config.early_stopping_patience:
                result.stopped_early = True
                report(TrainingEvent("message", f"Stopped early at step {step}: the validation loss has not "
                                                f"improved for {patience} evaluations"))
                break
            if step >= total:
                break
        if step % steps_per_epoch == 0 or step >= total or result.stopped_early:
            path = Path(spec.out_dir) / f"ckpt-step-{step}"
            model.save_pretrained(path)
            report(TrainingEvent("checkpoint", f"Checkpoint at step {step} (epoch {epoch})",
                                 {"step": step, "path": str(path), "metrics": metrics}))
    bar.close()
    if best_weights is not None:  # early stopping keeps the best evaluated weights
        with torch.no_grad():
            for p, w in zip(trainable, best_weights):
                p.copy_(w)
    model.save_pretrained(result.adapter_dir)
    result.steps, result.seconds = step, time.perf_counter() - started
    return result


def _optimizer(config: TrainingConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=config.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _rate(step: int, warmup: int, total: float) -> float:
    """The learning rate's factor: a linear warm-up, then a linear decay to a tenth at the end."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1.0, total - warmup))


def _batches(examples: list[Example], size: int):
    for start in range(0, len(examples), size):
        yield examples[start:start + size]


def _padded(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels) rows as right-padded tensors: ids, labels (IGNORED on padding), attention mask."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [IGNORED] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return ids, labels, mask


def _token_logprobs(model, rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each learned token's log-probability given the tokens before it, and which are learned."""
    ids, labels, mask = _padded(rows, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    learned = targets != IGNORED
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logprobs * learned, learned


def _supervised_loss(model, batch: list[SupervisedExample], pad: int, beta: float, sft_weight: float) -> torch.Tensor:
    """The mean negative log-likelihood of the learned tokens."""
    logprobs, learned = _token_logprobs(model, [(e.input_ids, e.labels) for e in batch], pad)
    return -logprobs.sum() / learned.sum().clamp(min=1)


def _dpo_loss(model, batch: list[PreferenceExample], pad: int, beta: float, sft_weight: float) -> torch.Tensor:
    """DPO's loss, -log sigmoid(beta x (the policy's log-ratio of chosen over rejected minus the
    reference's)); the reference is the base model: the same network with its adapter off. DPO
    alone may widen the margin by pushing the rejected answers down only; `sft_weight` adds the
    preferred answers' mean token negative log-likelihood (RPO)."""
    rows = [(e.prompt_ids + answer, [IGNORED] * len(e.prompt_ids) + answer)
            for answers in ([e.chosen_ids for e in batch], [e.rejected_ids for e in batch])
            for e, answer in zip(batch, answers)]

    n = len(batch)
    logprobs, learned = _token_logprobs(model, rows, pad)
    policy = logprobs.sum(-1)
    with torch.no_grad(), model.disable_adapter():
        reference = _token_logprobs(model, rows, pad)[0].sum(-1)
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    loss = -F.logsigmoid(beta * margin).mean()
    if sft_weight:  # RPO: also raise the preferred answers' likelihood (per token), not only the margin
        loss = loss - sft_weight * (policy[:n] / learned[:n].sum(-1).clamp(min=1)).mean()
    return loss
