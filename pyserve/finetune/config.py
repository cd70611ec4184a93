"""A fine-tuning job's method and hyperparameters, read from OpenAI's job shape and checked.

OpenAI's fields (`method.type` supervised or dpo; `n_epochs`, `batch_size`,
`learning_rate_multiplier`, and `beta` for DPO, each a number or "auto") and pyserve's extensions
in the same `hyperparameters` object: `sft_weight` (DPO), `learning_rate`, `optimizer` (adamw, sgd, adafactor),
`weight_decay` (L2), `l1`, `warmup_steps`, `max_steps`, `rank`, `alpha`, `dropout`,
`target_modules`, `validation_split`, `eval_every`, `early_stopping_patience`. Every fault is an
InvalidParameter naming the field as the client wrote it (`method.dpo.hyperparameters.beta`).

Example:
    >>> config = TrainingConfig.from_request({"type": "supervised",
    ...                                       "supervised": {"hyperparameters": {"n_epochs": 2, "rank": 4}}})
    >>> config.n_epochs, config.rank, config.learning_rate
    (2, 4, 0.0002)
"""

import math
from dataclasses import asdict, dataclass, fields

from ..errors import InvalidParameter

METHODS = ("supervised", "dpo")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
# The projections pyserve's text models serve adapters on (pyserve.lora.adapter_layers).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# learning_rate_multiplier multiplies this (a usual LoRA rate); `learning_rate` replaces it.
BASE_LEARNING_RATE = 2e-4
AUTO_EPOCHS = 3
AUTO_BATCH_SIZE = 4
MAX_EPOCHS, MAX_BATCH_SIZE, MAX_RANK, MAX_STEPS = 1000, 1024, 256, 1_000_000


@dataclass(frozen=True)
class TrainingConfig:
    method: str = "supervised"
    n_epochs: int = AUTO_EPOCHS
    batch_size: int = AUTO_BATCH_SIZE
    learning_rate: float = BASE_LEARNING_RATE
    beta: float = 0.1  # DPO: how far the policy may move from the base model
    sft_weight: float = 0.0  # DPO: weight of the preferred answers' own likelihood in the loss (RPO)
    optimizer: str = "adamw"
    weight_decay: float = 0.0  # L2, decoupled for adamw
    l1: float = 0.0  # times the sum of |adapter weights|, added to the loss
    warmup_steps: int = 0
    max_steps: int | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    validation_split: float = 0.0  # the fraction of training examples held out when no validation file is given
    eval_every: int | None = None  # steps between evaluations (None: once an epoch)
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    seed: int = 0

    @classmethod
    def from_request(cls, method: object = None, hyperparameters: object = None, seed: object = None) -> "TrainingConfig":
        """From a job's `method` object (or the older top-level `hyperparameters`) and `seed`."""
        if method is None:
            method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters or {}}}
        if not isinstance(method, dict):
            raise InvalidParameter("method", "must be an object")
        kind = method.get("type", "supervised")
        if kind not in METHODS:
            raise InvalidParameter("method.type", f"must be one of {', '.join(METHODS)}, got {kind!r}")
        section = method.get(kind) or {}
        if not isinstance(section, dict):
            raise InvalidParameter(f"method.{kind}", "must be an object")
        values = section.get("hyperparameters") or {}
        if hyperparameters is not None and method.get(kind) is not None:
            raise InvalidParameter("hyperparameters", "give hyperparameters inside method, not both")
        if not isinstance(values, dict):
            raise InvalidParameter(f"method.{kind}.hyperparameters", "must be an object")
        prefix = f"method.{kind}.hyperparameters"
        known = {f.name for f in fields(cls)} | {"learning_rate_multiplier"}
        for name in values:
            if name not in known or name in ("method", "seed"):
                raise InvalidParameter(f"{prefix}.{name}", "is not a hyperparameter pyserve knows")
        for name in ("beta", "sft_weight"):
            if kind != "dpo" and name in values:
                raise InvalidParameter(f"{prefix}.{name}", "is a DPO hyperparameter")
        read = _Reader(values, prefix)
        multiplier = read.number("learning_rate_multiplier", 1.0, low=0.0, low_open=True, high=1e3)
        learning_rate = read.number("learning_rate", BASE_LEARNING_RATE * multiplier, low=0.0, low_open=True, high=1.0)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise InvalidParameter("seed", "must be a non-negative integer")
        targets = values.get("target_modules", list(TARGET_MODULES))
        if (not isinstance(targets, list) or not targets or not all(t in TARGET_MODULES for t in targets)):
            raise InvalidParameter(f"{prefix}.target_modules", f"must be a non-empty list of {', '.join(TARGET_MODULES)}")
        return cls(
            method=kind,
            n_epochs=read.integer("n_epochs", AUTO_EPOCHS, low=1, high=MAX_EPOCHS),
            batch_size=read.integer("batch_size", AUTO_BATCH_SIZE, low=1, high=MAX_BATCH_SIZE),
            learning_rate=learning_rate,
            beta=read.number("beta", 0.1, low=0.0, low_open=True, high=100.0),
            sft_weight=read.number("sft_weight", 0.0, low=0.0, high=100.0),
            optimizer=read.choice("optimizer", "adamw", OPTIMIZERS),
            weight_decay=read.number("weight_decay", 0.0, low=0.0, high=10.0),
            l1=read.number("l1", 0.0, low=0.0, high=10.0),
            warmup_steps=read.integer("warmup_steps", 0, low=0, high=MAX_STEPS),
            max_steps=read.integer("max_steps", None, low=1, high=MAX_STEPS),
            rank=read.integer("rank", 8, low=1, high=MAX_RANK),
            alpha=read.number("alpha", 16.0, low=0.0, low_open=True, high=1e4),
            dropout=read.number("dropout", 0.0, low=0.0, high=0.9),
            target_modules=tuple(dict.fromkeys(targets)),
            validation_split=read.number("validation_split", 0.0, low=0.0, high=0.5),
            eval_every=read.integer("eval_every", None, low=1, high=MAX_STEPS),
            early_stopping_patience=read.integer("early_stopping_patience", None, low=1, high=MAX_STEPS),
            seed=seed if seed is not None else 0,
        )

    def hyperparameters(self) -> dict:
        """The job object's `hyperparameters`: OpenAI's names, then the extensions."""
        values = asdict(self)
        values.pop("method")
        values.pop("seed")
        values["target_modules"] = list(self.target_modules)
        values["learning_rate_multiplier"] = self.learning_rate / BASE_LEARNING_RATE
        if self.method != "dpo":
            values.pop("beta")
            values.pop("sft_weight")
        return values

    def method_object(self) -> dict:
        """The job object's `method`, as OpenAI writes it."""
        return {"type": self.method, self.method: {"hyperparameters": self.hyperparameters()}}


@dataclass
class _Reader:
    values: dict
    prefix: str

    def _get(self, name: str, default):
        value = self.values.get(name, "auto")
        return default if value in ("auto", None) else value

    def integer(self, name: str, default, low: int, high: int):
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidParameter(f"{self.prefix}.{name}", f"must be an integer from {low} to {high} or \"auto\", "
                                                            f"got {value!r}")
        return value

    def number(self, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
        value = self._get(name, default)
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or value < low or (low_open and value == low) or value > high):
            bound = f"above {low}" if low_open else f"at least {low}"
            raise InvalidParameter(f"{self.prefix}.{name}", f"must be a number {bound} and at most {high}, "
                                                            f"got {value!r}")
        return float(value)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._get(name, default)
        if value not in choices:
            raise InvalidParameter(f"{self.prefix}.{name}", f"must be one of {', '.join(choices)}, got {value!r}")
        return value
