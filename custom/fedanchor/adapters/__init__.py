"""GeoLoRA adapters: shared-basis cores that merge exactly."""
from .geolora import GeoLoRALinear, geolora_layers, inject_geolora, orthonormal_basis

__all__ = ["GeoLoRALinear", "geolora_layers", "inject_geolora", "orthonormal_basis"]
