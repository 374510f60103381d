"""The one training loop and its state."""

from dataflex.train.trainer.args import TrainingArguments
from dataflex.train.trainer.loop import TrainContext, Trainer, TrainResult, make_accelerator, standard_loss
from dataflex.train.trainer.losses import MicroBatchLosses, forward_losses, per_token_losses
from dataflex.train.trainer.plan import DataPlan, EpochPlan

__all__ = [
    "DataPlan",
    "EpochPlan",
    "MicroBatchLosses",
    "TrainContext",
    "TrainResult",
    "Trainer",
    "TrainingArguments",
    "forward_losses",
    "make_accelerator",
    "per_token_losses",
    "standard_loss",
]
