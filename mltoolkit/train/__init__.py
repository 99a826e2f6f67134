"""Training stack (issue 6): the Trainer with its callbacks and loggers, training aids (mixed precision, gradient
accumulation and noise, activation checkpointing, a device prefetcher) and crash-safe checkpoints with exact
resume."""
from mltoolkit.train.aids import (
    Amp,
    DevicePrefetcher,
    GradAccumulator,
    GradientNoise,
    checkpoint_modules,
    move_to_device,
    uncheckpoint_modules,
)
from mltoolkit.train.callbacks import BestCheckpoint, Callback, EarlyStopping, LambdaCallback, LearningRateMonitor
from mltoolkit.train.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CorruptCheckpointError,
    ResumableSampler,
    capture_rng_state,
    load_checkpoint,
    model_fingerprint,
    restore_rng_state,
)
from mltoolkit.train.loggers import CSVLogger, Logger, MLflowLogger, TensorBoardLogger, WandbLogger
from mltoolkit.train.trainer import Trainer, accuracy, default_loss

__all__ = ["Trainer", "accuracy", "default_loss", "Callback", "EarlyStopping", "BestCheckpoint",
           "LearningRateMonitor", "LambdaCallback", "Logger", "CSVLogger", "TensorBoardLogger", "MLflowLogger",
           "WandbLogger",
           "Amp", "DevicePrefetcher", "GradAccumulator", "GradientNoise", "checkpoint_modules",
           "uncheckpoint_modules", "move_to_device", "CheckpointManager", "Checkpoint", "ResumableSampler",
           "load_checkpoint", "model_fingerprint", "capture_rng_state", "restore_rng_state", "CheckpointError",
           "CheckpointMismatchError", "CorruptCheckpointError", "FORMAT_VERSION"]
