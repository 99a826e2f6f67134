"""The model zoo: `create_model(name, pretrained_path=None, **kwargs)`, `list_models(pattern)`, `@register_model`.

Models torchvision also has keep torchvision's names and state_dict keys (resnet18..152, efficientnet_b0..b7,
vit_b_16, vit_b_32, vit_l_16, vit_l_32), so `create_model("resnet50").load_state_dict(tv_resnet50.state_dict())`
works; timm checkpoints load through a key mapping (mltoolkit.models._timm). Inside, the models run mltoolkit's
fused conv + batch norm + activation, attention and norm ops.
"""
from mltoolkit.models import _timm, efficientnet, resnet, vit  # noqa: F401 - registers the models
from mltoolkit.models.registry import (
    create_model,
    list_models,
    load_pretrained,
    register_converter,
    register_model,
)

__all__ = ["create_model", "list_models", "register_model", "register_converter", "load_pretrained"]
