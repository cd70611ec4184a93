"""Fine-tuning the served text models: LoRA adapters trained on chat or preference data (OpenAI's
fine-tuning formats) and served beside their base as soon as they exist.

    config.py   a job's method and hyperparameters, checked (OpenAI's names and pyserve's extensions)
    data.py     training lines as token ids, through the model's own chat template
    trainer.py  the training loop (supervised or DPO, peft LoRA), its events and checkpoints
    runner.py   where a job runs: a worker process by default (JobRunner is the interface)

Training needs the `finetune` extra: pip install "pyserve[finetune]".
"""

from .config import TrainingConfig
from .trainer import Cancelled, TrainingEvent, TrainingResult, TrainingSpec, train

__all__ = ["Cancelled", "TrainingConfig", "TrainingEvent", "TrainingResult", "TrainingSpec", "train"]
