"""The one training loop, its seams (Callback, LossStrategy) and its state."""

from dataflex.train.trainer.args import TrainingArguments
from dataflex.train.trainer.callbacks import Callback, TrainContext
from dataflex.train.trainer.loop import Trainer, TrainResult, make_accelerator
from dataflex.train.trainer.losses import (
    LossStrategy,
    MicroBatchLosses,
    TokenMeanLoss,
    WeightedLoss,
    forward_losses,
    per_token_losses,
)
from dataflex.train.trainer.plan import DataPlan, EpochPlan

__all__ = [
    "Callback",
    "DataPlan",
    "EpochPlan",
    "LossStrategy",
    "MicroBatchLosses",
    "TokenMeanLoss",
    "TrainContext",
    "TrainResult",
    "Trainer",
    "TrainingArguments",
    "WeightedLoss",
    "forward_losses",
    "make_accelerator",
    "per_token_losses",
]
