"""Training stack (issue 6)."""
from mltoolkit.train.aids import (
                                  Amp,
                                  DevicePrefetcher,
                                  GradAccumulator,
                                  GradientNoise,
                                  checkpoint_modules,
                                  move_to_device,
                                  uncheckpoint_modules,
)

__all__ = ["Amp", "DevicePrefetcher", "GradAccumulator", "GradientNoise", "checkpoint_modules",
           "uncheckpoint_modules", "move_to_device"]
