"""Reference models behind a registry.

Importing this package registers every model below; build one with ``create_model(name)`` and get
its input shape, class count and example inputs from ``get_spec(name)``.
"""

from .registry import MODELS, ModelSpec, create_model, dense_params, get_spec, list_models, register_model

# Each import registers that file's models; keep one line per model file.
from . import cnn1d, efficientnet, fmnist, mlp, mobilenetv2, resnet, vit  # noqa: E402,F401  isort: skip

__all__ = ["MODELS", "ModelSpec", "create_model", "dense_params", "get_spec", "list_models", "register_model"]
