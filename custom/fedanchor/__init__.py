"""fedanchor: federated training of one multimodal transformer across sites that hold different modalities.

The core (config, data, model, adapters, alignment, precision, federation) is plain
PyTorch and imports nothing from NVIDIA FLARE; ``fedanchor.flare`` holds the thin
FLARE components that call into it.
"""
__version__ = "0.1.0"
