"""Local training speed: fedanchor's real local step against a plain peft LoRA step on the same trunk.

fedanchor's step is ``SiteTrainer.local_step`` itself, on a round started from the
server's initial state: two augmented views of a private batch and an anchor batch
in one forward, the two-view loss, the CKA term against the consensus Gram, the
cross-modal anchor term, the delta penalty, the Adam step with its warm-up and the
precision tracker's record. The baseline is what a plain LoRA fine-tune of the same
trunk, tokenizers and head takes per step: peft's LoRA of the same rank on the same
layers (``fed_rivals.build_lora_model``), the same private batch in two views, the
two-view loss, backward and Adam; no anchors, no alignment. The ratio printed is
baseline seconds / fedanchor seconds per step (1.0: fedanchor's step costs what a
plain LoRA step does), median of the timed steps after warm-up, both in this
process, so machine noise hits both alike.

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
from ..config import FedAnchorConfig, with_overrides
from ..federation.loop import make_split
from ..federation.messages import GlobalState
from ..federation.server import FederatedServer
from ..federation.site import SiteTrainer, autocast_dtype, autocast_to, embed_step, resolve_device, same_items
from .fed_rivals import build_lora_model


def _timed(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each call of ``step(i)`` after ``warmup`` untimed ones (the device synchronised around each)."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def initial_state(config: FedAnchorConfig, split, device: torch.device) -> GlobalState:
    """The server's round-0 state on ``device``: what a site's first round starts from."""
    modalities = {m: d.spec for m, d in split.anchors.items()}
    return FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats,
                           device=str(device)).initial_state()


def fedanchor_step_times(config: FedAnchorConfig, split, state: GlobalState, modality: str, steps: int, warmup: int,
                         device: torch.device) -> list[float]:
    """``SiteTrainer.local_step`` of the first site of ``modality``, in a round started from ``state``."""
    modalities = {m: d.spec for m, d in split.anchors.items()}
    site, private = next((s, d) for s, d in split.private.items() if d.spec.name == modality)
    trainer = SiteTrainer(config, site, private, split.anchors[modality], split.anchor_fingerprint, modalities,
                          split.feature_stats, device=str(device))
    trainer.install(state)
    local = trainer.start_round(state)
    trainer.model.train()
    return _timed(lambda i: trainer.local_step(local, i), steps, warmup, device)


def lora_step_times(config: FedAnchorConfig, split, modality: str, steps: int, warmup: int, device: torch.device,
                    autocast: torch.dtype | None) -> list[float]:
    """A plain peft LoRA step of the same trunk: two views of the same private batch, the two-view loss, Adam."""
    modalities = {m: d.spec for m, d in split.anchors.items()}
    model = build_lora_model(config, modalities, split.feature_stats).to(device)
    private = next(d for d in split.private.values() if d.spec.name == modality)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
    rng = np.random.default_rng(config.train.seed)
    batch = min(config.train.batch_size, len(private))
    model.train()

    def step(_: int) -> None:
        with autocast_to(device, autocast):
            items, _, z1, z2, _, _ = embed_step(model, private.spec, private, split.anchors[modality], rng, batch, 0,
                                                config.private.augment_strength, False)
        loss = two_view_contrastive(z1, z2, config.private.temperature, same_items(items))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _timed(step, steps, warmup, device)


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
    state = initial_state(config, split, device)
    on_cpu = with_overrides(config, {"train.device": "cpu"})
    cpu_state = initial_state(on_cpu, split, torch.device("cpu")) if device.type == "cuda" else None
    for modality in sorted({d.spec.name for d in split.private.values()}):
        torch.manual_seed(config.train.seed)
        fed = statistics.median(fedanchor_step_times(config, split, state, modality, steps, warmup, device))
        torch.manual_seed(config.train.seed)
        lora = statistics.median(lora_step_times(config, split, modality, steps, warmup, device, autocast))
        items = 2 * config.train.batch_size + config.alignment.anchor_batch
        row = {"fedanchor_s_per_step": fed, "peft_lora_s_per_step": lora, "ratio": lora / fed, "samples_per_s": items / fed,
               "lora_samples_per_s": 2 * config.train.batch_size / lora}
        if device.type == "cuda":
            torch.manual_seed(config.train.seed)
            cpu = statistics.median(fedanchor_step_times(on_cpu, split, cpu_state, modality, max(2, steps // 3), 1,
                                                         torch.device("cpu")))
            row.update({"cpu_samples_per_s": items / cpu, "gpu_over_cpu": cpu / fed})
        out["modalities"][modality] = row
    return out


def speed_markdown(result: dict[str, Any]) -> str:
    lines = [f"Local step speed on {result['device']} (trunk {result['trunk']}, rank {result['rank']}, batch "
             f"{result['batch']} x 2 views + {result['anchor_batch']} anchors, autocast {result.get('autocast', 'off')}):", "",
             "| modality | fedanchor s/step | peft LoRA s/step | ratio (LoRA / fedanchor) | fedanchor items/s | "
             "LoRA items/s | fedanchor on this machine's CPU | GPU / CPU |", "|---|---|---|---|---|---|---|---|"]
    for m, r in result["modalities"].items():
        cpu = (f"{r['cpu_samples_per_s']:.0f} | {r['gpu_over_cpu']:.1f}x" if "gpu_over_cpu" in r else "- | -")
        lines.append(f"| {m} | {r['fedanchor_s_per_step']:.4f} | {r['peft_lora_s_per_step']:.4f} | {r['ratio']:.2f} | "
                     f"{r['samples_per_s']:.0f} | {r['lora_samples_per_s']:.0f} | {cpu} |")
    return "\n".join(lines) + "\n"
