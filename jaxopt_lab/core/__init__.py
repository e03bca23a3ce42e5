"""The core every technique reads: the model map and the one Flax hook layer."""

from jaxopt_lab.core.mapping import LeafInfo, ModelMap, model_map

__all__ = ("LeafInfo", "ModelMap", "model_map")
