"""The model zoo: `create_model(name, pretrained_path=None, **kwargs)`, `list_models(pattern)`, `@register_model`,
`from_pretrained(path)` / `save_pretrained(model, folder)`.

Models torchvision also has keep torchvision's names and state_dict keys (resnet18..152, efficientnet_b0..b7,
vit_b_16, vit_b_32, vit_l_16, vit_l_32), so `create_model("resnet50").load_state_dict(tv_resnet50.state_dict())`
works; timm checkpoints load through a key mapping (mltoolkit.models._timm). The text models (bert_*, gpt2*,
llama_*) keep transformers' keys and load Hugging Face folders (mltoolkit.models.hf); Keras ResNet weights (.h5)
load into resnet50_keras / resnet101_keras / resnet152_keras (mltoolkit.models.keras). Inside, the models run
mltoolkit's fused conv + batch norm + activation, attention and norm ops. `example_input(name, model)` gives a
random input of the right kind (images or token ids) for any registered model.
"""
from mltoolkit.models import _timm, bert, efficientnet, gpt, keras, resnet, vit  # noqa: F401 - registers the models
from mltoolkit.models.registry import (
    create_model,
    example_input,
    from_pretrained,
    list_models,
    load_pretrained,
    register_converter,
    register_model,
    save_pretrained,
)

__all__ = ["create_model", "list_models", "register_model", "register_converter", "load_pretrained",
           "from_pretrained", "save_pretrained", "example_input"]
