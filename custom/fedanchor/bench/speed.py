"""Local training speed: a fedanchor site step against the same step on a plain Hugging Face + peft LoRA model.

Both models are the same trunk, tokenizers and head (``build_model``); the
baseline swaps GeoLoRA for peft's LoRA of the same rank on the same layers
(``fed_rivals.build_lora_model``). Both take the same batches (``embed_step``:
two augmented views of a private batch and an anchor batch, in one forward),
the same two-view contrastive loss, a backward pass and an Adam step. The ratio
printed is baseline seconds / fedanchor seconds per step (1.0: GeoLoRA costs
nothing extra; the target is 0.9 or better), median of the timed steps after
warm-up, in one process, so machine noise hits both alike.

On a GPU both steps run under the site's autocast (``train.autocast``: bf16 where
the GPU has it), and fedanchor's step is also timed on the CPU of the same
machine: ``gpu_over_cpu`` is the speed-up in items per second.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from ..alignment.losses import two_view_contrastive
from ..config import FedAnchorConfig
from ..federation.loop import make_split
from ..federation.site import autocast_dtype, autocast_to, embed_step, resolve_device, same_items
from ..model.homogeneous import build_model
from .fed_rivals import build_lora_model


def _time_steps(model, config: FedAnchorConfig, split, modality: str, steps: int, warmup: int, seed: int,
                autocast: torch.dtype | None = None) -> list[float]:
    private = next(d for d in split.private.values() if d.spec.name == modality)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.train.lr)
    rng = np.random.default_rng(seed)
    batch = min(config.train.batch_size, len(private))
    anchor_batch = min(config.alignment.anchor_batch, len(split.anchors[modality]))
    device = next(model.parameters()).device
    times = []
    model.train()
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with autocast_to(device, autocast):
            items, _, z1, z2, za, _ = embed_step(model, private.spec, private, split.anchors[modality], rng, batch,
                                                 anchor_batch, config.private.augment_strength, True)
        loss = two_view_contrastive(z1, z2, config.private.temperature, same_items(items)) + za.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def step_speed(config: FedAnchorConfig, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Seconds per local step for fedanchor and the peft LoRA baseline, per modality, and their ratio."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    device = resolve_device(config.train.device)
    autocast = autocast_dtype(device, config.train.autocast)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out: dict[str, Any] = {"device": f"{device} ({name})", "autocast": str(autocast or "off"), "trunk": config.trunk.name,
                           "rank": config.adapter.rank,
                           "batch": config.train.batch_size, "anchor_batch": config.alignment.anchor_batch, "modalities": {}}
    for modality in sorted({d.spec.name for d in split.private.values()}):
        torch.manual_seed(config.train.seed)
        ours = _time_steps(build_model(config, modalities, split.feature_stats).to(device), config, split, modality,
                           steps, warmup, config.train.seed, autocast)
        torch.manual_seed(config.train.seed)
        base = _time_steps(build_lora_model(config, modalities, split.feature_stats).to(device), config, split, modality,
                           steps, warmup, config.train.seed, autocast)
        fed, lora = statistics.median(ours), statistics.median(base)
        items = 2 * config.train.batch_size + config.alignment.anchor_batch
        row = {"fedanchor_s_per_step": fed, "peft_lora_s_per_step": lora, "ratio": lora / fed, "samples_per_s": items / fed}
        if device.type == "cuda":
            torch.manual_seed(config.train.seed)
            cpu = statistics.median(_time_steps(build_model(config, modalities, split.feature_stats), config, split,
                                                modality, max(2, steps // 3), 1, config.train.seed))
            row.update({"cpu_samples_per_s": items / cpu, "gpu_over_cpu": cpu / fed})
        out["modalities"][modality] = row
    return out


def speed_markdown(result: dict[str, Any]) -> str:
    lines = [f"Local step speed on {result['device']} (trunk {result['trunk']}, rank {result['rank']}, batch "
             f"{result['batch']} x 2 views + {result['anchor_batch']} anchors, autocast {result.get('autocast', 'off')}):", "",
             "| modality | fedanchor s/step | peft LoRA s/step | ratio (LoRA / fedanchor) | fedanchor items/s | "
             "same on this machine's CPU | GPU / CPU |", "|---|---|---|---|---|---|---|"]
    for m, r in result["modalities"].items():
        cpu = (f"{r['cpu_samples_per_s']:.0f} | {r['gpu_over_cpu']:.1f}x" if "gpu_over_cpu" in r else "- | -")
        lines.append(f"| {m} | {r['fedanchor_s_per_step']:.4f} | {r['peft_lora_s_per_step']:.4f} | {r['ratio']:.2f} | "
                     f"{r['samples_per_s']:.0f} | {cpu} |")
    return "\n".join(lines) + "\n"
