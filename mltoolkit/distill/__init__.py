"""Knowledge distillation (issue 5, part 6): make a small student imitate a large teacher.

    from mltoolkit.distill import DistillationLoss, FeatureDistiller, distill
    loss = DistillationLoss(temperature=4.0, alpha=0.9)          # T^2 * KL(teacher || student) and hard-label CE
    fd = FeatureDistiller(student, teacher, {"body.2": "body.6"})  # hooks + learned projection where widths differ
    history = distill(student, teacher, loader, optimizer, epochs=10, loss=loss, features=fd)
"""
from mltoolkit.distill.features import ChannelProjection, FeatureDistiller
from mltoolkit.distill.loss import DistillationLoss, DistillationOutput, distillation_loss
from mltoolkit.distill.train import DistillHistory, default_logits, distill, split_batch

__all__ = ["DistillationLoss", "DistillationOutput", "distillation_loss", "FeatureDistiller", "ChannelProjection",
           "distill", "DistillHistory", "split_batch", "default_logits"]
