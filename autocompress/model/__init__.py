"""Loading models offline and describing their structure."""

from autocompress.model.anatomy import BlockInfo, LinearSite, ModelAnatomy
from autocompress.model.loading import DEFAULT_MODEL, LoadedModel, load_model, state_dict_hash, tiny_model

__all__ = [
    "DEFAULT_MODEL",
    "BlockInfo",
    "LinearSite",
    "LoadedModel",
    "ModelAnatomy",
    "load_model",
    "state_dict_hash",
    "tiny_model",
]
