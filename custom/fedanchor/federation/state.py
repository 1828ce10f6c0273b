"""Which tensors of the model are shared, which stay at the site, and how to move them in and out."""
from __future__ import annotations

from typing import Mapping

import torch

from ..model.homogeneous import HomogeneousTransformer
from .messages import adapter_key, projector_key


def projector_params(model: HomogeneousTransformer, modality: str) -> dict[str, torch.nn.Parameter]:
    tokenizer = model.tokenizer(modality)
    return {projector_key(modality, n): p for n, p in tokenizer.named_parameters() if p.requires_grad}


def core_params(model: HomogeneousTransformer) -> dict[str, torch.nn.Parameter]:
    """Every S and m: the shared parameters that all sites train and the merge weights by precision."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, layer in model.adapters().items():
        out[adapter_key(name, "S")] = layer.S
        out[adapter_key(name, "m")] = layer.m
    return out


def shared_tensors(model: HomogeneousTransformer, with_basis: bool = True) -> dict[str, torch.Tensor]:
    """What the server broadcasts: bases, cores, magnitudes and every modality's projector."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in model.adapters().items():
        if with_basis:
            out[adapter_key(name, "U")] = layer.U.detach().cpu().clone()
            out[adapter_key(name, "V")] = layer.V.detach().cpu().clone()
    out.update({k: v.detach().cpu().clone() for k, v in core_params(model).items()})
    for modality in model.modalities:
        out.update({k: v.detach().cpu().clone() for k, v in projector_params(model, modality).items()})
    return out


@torch.no_grad()
def load_shared(model: HomogeneousTransformer, tensors: Mapping[str, torch.Tensor]) -> None:
    """Install broadcast tensors; S and m are required, bases and projectors optional, anything unknown is an error.

    A basis of another rank (after a refresh) resizes its layer before the core is installed.
    """
    adapters = model.adapters()
    projectors: dict[str, torch.nn.Parameter] = {}
    for modality in model.modalities:
        projectors.update(projector_params(model, modality))
    bases: dict[str, dict[str, torch.Tensor]] = {}
    parts_of: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key in projectors:
            _copy(projectors[key], value, key)
            continue
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "adapter" or parts[1] not in adapters or parts[2] not in ("S", "m", "U", "V"):
            raise KeyError(f"global state entry {key!r} matches no shared tensor of this model; was the job built for another trunk or adapter config?")
        (bases if parts[2] in ("U", "V") else parts_of).setdefault(parts[1], {})[parts[2]] = value
    missing = [k for k in core_params(model) if k not in tensors]
    if missing:
        raise KeyError(f"global state lacks {len(missing)} core tensors, e.g. {missing[:3]}")
    for name, basis in bases.items():
        layer = adapters[name]
        u, v = basis.get("U", layer.U), basis.get("V", layer.V)
        if not (u.shape == layer.U.shape and v.shape == layer.V.shape
                and torch.equal(u.to(layer.U.device), layer.U) and torch.equal(v.to(layer.V.device), layer.V)):
            layer.set_basis(u, v, parts_of[name]["S"])
    for name, values in parts_of.items():
        for part, value in values.items():
            _copy(getattr(adapters[name], part), value, adapter_key(name, part))


def set_gradient_probes(model: HomogeneousTransformer, active: bool) -> None:
    """Start (or drop) every adapted layer's accumulation of its gradient with respect to its low-rank update
    (refresh.py, step 1); a round that failed half-way leaves nothing behind for the next."""
    for layer in model.adapters().values():
        if active:
            layer.start_gradient_probe()
        else:
            layer.grad_probe = None


def projected_gradients(model: HomogeneousTransformer, steps: int) -> dict[str, torch.Tensor]:
    """The mean projected gradients over ``steps``, and the probes dropped: adapter/<layer>/U is G V (d_out x r),
    adapter/<layer>/V is G^T U (d_in x r)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in model.adapters().items():
        grad_u, grad_v = layer.stop_gradient_probe()
        out[adapter_key(name, "U")] = (grad_u / max(steps, 1)).cpu()
        out[adapter_key(name, "V")] = (grad_v / max(steps, 1)).cpu()
    return out


def local_tensors(model: HomogeneousTransformer) -> dict[str, torch.Tensor]:
    """delta_site of every adapted layer: never leaves the site."""
    return {adapter_key(n, "delta"): layer.delta.detach().cpu().clone() for n, layer in model.adapters().items()}


@torch.no_grad()
def load_local(model: HomogeneousTransformer, tensors: Mapping[str, torch.Tensor]) -> None:
    adapters = model.adapters()
    for key, value in tensors.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "adapter" or parts[1] not in adapters or parts[2] != "delta":
            raise KeyError(f"site-local state entry {key!r} matches no delta of this model")
        _copy(adapters[parts[1]].delta, value, key)


def _copy(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
    target.data.copy_(value.to(target.device, target.dtype))
