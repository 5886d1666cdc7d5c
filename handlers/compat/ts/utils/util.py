"""``ts.utils.util``: the helpers handlers import from TorchServe, implemented by marserve."""

from handlers.errors import PredictionException
from handlers.utils import get_yaml_config, list_classes_from_module, load_label_mapping, map_class_to_label

__all__ = [
    "PredictionException",
    "get_yaml_config",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
]
