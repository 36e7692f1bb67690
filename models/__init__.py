"""Model factory: ``create(arch, ...)`` for simple_cnn and any timm model (1-logit head)."""

from models.factory import (
    MissingWeightsError,
    UnknownModelError,
    check_name,
    create,
    data_config,
    fetch_weights,
    is_resnet,
    load_weights_file,
)

__all__ = [
    "MissingWeightsError",
    "UnknownModelError",
    "check_name",
    "create",
    "data_config",
    "fetch_weights",
    "is_resnet",
    "load_weights_file",
]
