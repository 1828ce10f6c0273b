"""``fedanchor export``: a global checkpoint as a standard PEFT adapter folder that loads anywhere.

GeoLoRA with delta = 0 (the global model; delta_site never leaves a site) is DoRA:

    W = m * (W0 + U S V^T) / rownorm(W0 + U S V^T)

so each adapted trunk layer becomes a PEFT LoRA layer with ``use_dora=True``,
B = U S (d_out x r), A = V^T (r x d_in), lora_alpha = r (scaling 1) and the DoRA
magnitude m. peft itself builds and saves the adapter (``get_peft_model`` on the
trunk, ``save_pretrained``), so the folder is what ``PeftModel.from_pretrained``
expects. The parts that are not the Hugging Face trunk go beside it:
``fedanchor_head.safetensors`` (the adapted head as one dense matrix),
``fedanchor_tokenizers.safetensors`` (each modality's projector, modality
embedding and table) and ``fedanchor_export.json`` (the job config, modalities,
pooling, the round and anchor fingerprint it came from).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from .config import FedAnchorConfig
from .data.scenario import ModalitySpec
from .federation.messages import GlobalState
from .federation.state import load_shared
from .model.homogeneous import HomogeneousTransformer, build_model
from .model.trunk import load_trunk

TRUNK_PREFIX = "trunk."


def export_peft(model: HomogeneousTransformer, config: FedAnchorConfig, out: str | Path,
                state: GlobalState | None = None) -> Path:
    """Write ``model``'s trunk adapters as a PEFT DoRA adapter, plus head and tokenizers, into ``out``."""
    from peft import LoraConfig, get_peft_model

    out = Path(out)
    adapters = model.adapters()
    trunk_layers = {name[len(TRUNK_PREFIX):]: layer for name, layer in adapters.items() if name.startswith(TRUNK_PREFIX)}
    if not trunk_layers:
        raise ValueError("the model has no adapted trunk layers to export")
    moved = [n for n, layer in adapters.items() if float(layer.delta.detach().abs().max()) != 0.0]
    if moved:
        raise ValueError(f"layers {moved[:3]} carry a site's delta; export the global model (delta = 0), "
                         "which is what a checkpoint holds")
    ranks = {name: layer.rank for name, layer in trunk_layers.items()}
    rank = max(ranks.values())
    # After a basis refresh layers may differ in rank: peft's rank_pattern / alpha_pattern name them (alpha = r keeps
    # the LoRA scaling at 1, so B A is exactly U S V^T). The patterns are regexes: anchor each full name.
    pattern = {f"^{re.escape(name)}$": r for name, r in ranks.items() if r != rank}
    base = load_trunk(config.trunk)
    peft_config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, use_dora=True, bias="none",
                             target_modules=sorted(trunk_layers), rank_pattern=pattern, alpha_pattern=dict(pattern))
    peft_model = get_peft_model(base, peft_config)
    with torch.no_grad():
        for name, layer in trunk_layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.V.T)
            target.lora_B["default"].weight.copy_(layer.U @ layer.S)
            target.lora_magnitude_vector["default"].weight.copy_(layer.m)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    head = adapters["head"].dense_weight().detach().contiguous()
    save_file({"weight": head}, str(out / "fedanchor_head.safetensors"))
    tokenizers = {f"{m}/{k}": v.detach().contiguous().clone() for m in model.modalities
                  for k, v in model.tokenizer(m).state_dict().items() if v.is_floating_point()}
    save_file(tokenizers, str(out / "fedanchor_tokenizers.safetensors"))
    meta = {"format": "fedanchor-export-1", "trunk": config.trunk.name, "pooling": "mean over the attention mask",
            "head": "unit vector of fedanchor_head @ pooled", "rank": rank, "ranks": ranks, "adapted_layers": sorted(trunk_layers),
            "modalities": model.modalities,
            "round": state.round if state is not None else None,
            "anchor_fingerprint": state.anchor_fingerprint if state is not None else None}
    (out / "fedanchor_export.json").write_text(json.dumps(meta, indent=2))
    return out


def export_state(state: GlobalState, config: FedAnchorConfig, modalities: Mapping[str, ModalitySpec], out: str | Path,
                 feature_stats=None) -> Path:
    """Export a global checkpoint: build the job's model, install the state, write the PEFT folder."""
    model = build_model(config, modalities, feature_stats)
    load_shared(model, state.shared_params())
    return export_peft(model, config, out, state)
