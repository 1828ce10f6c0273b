"""`fedanchor export`: the global model as a PEFT DoRA adapter that PeftModel.from_pretrained loads and that embeds
text like fedanchor does."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import tiny_config
from fedanchor.export import export_peft
from fedanchor.federation.loop import make_split
from fedanchor.model.homogeneous import build_model
from fedanchor.model.trunk import load_trunk

TEXTS = ["No acute cardiopulmonary abnormality.", "Mild cardiomegaly with small left effusion.", "Normal chest."]


@pytest.fixture
def trained_like_model():
    config = tiny_config(data={"scenario": "xray", "n_anchors": 8, "n_test": 8, "max_private_per_site": 4})
    split = make_split(config)
    model = build_model(config, {m: d.spec for m, d in split.anchors.items()}, split.feature_stats).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a model that moved: nonzero cores, changed magnitudes
        for layer in model.adapters().values():
            layer.S.copy_(0.2 * torch.randn(layer.S.shape, generator=g))
            layer.m.mul_(1 + 0.1 * torch.randn(layer.m.shape, generator=g))
    return config, model


@pytest.mark.parametrize("refreshed", [False, True], ids=["one rank", "ranks after a basis refresh"])
def test_peft_loads_the_export_and_embeds_text_like_fedanchor(tmp_path, trained_like_model, refreshed):
    config, model = trained_like_model
    if refreshed:  # a refresh leaves layers of different ranks (adapters/refresh.py)
        g = torch.Generator().manual_seed(4)
        for i, layer in enumerate(model.adapters().values()):
            r = 1 + i % (config.adapter.rank + 2)
            u = torch.linalg.qr(torch.randn(layer.out_features, r, generator=g))[0]
            v = torch.linalg.qr(torch.randn(layer.in_features, r, generator=g))[0]
            layer.set_basis(u, v, 0.2 * torch.randn(r, r, generator=g))
    out = export_peft(model, config, tmp_path / "export")
    meta = json.loads((out / "fedanchor_export.json").read_text())
    assert (out / "adapter_config.json").is_file()
    assert meta["rank"] == max(meta["ranks"].values()) and (len(set(meta["ranks"].values())) > 1) == refreshed
    peft_model = PeftModel.from_pretrained(load_trunk(config.trunk), str(out)).eval()
    head = load_file(str(out / "fedanchor_head.safetensors"))["weight"]

    encoded = model.encode("report", TEXTS)
    with torch.no_grad():
        embeds, mask = model.tokenizer("report")(encoded)
        hidden = peft_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1)
        theirs = torch.nn.functional.normalize(pooled @ head.T, dim=-1)
        ours = model.embed("report", TEXTS)
    assert torch.allclose(theirs, ours, atol=1e-5), float((theirs - ours).abs().max())
    # and the export is not the frozen trunk: without the adapter the embeddings differ
    with torch.no_grad():
        base = load_trunk(config.trunk)(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert not torch.allclose(base, hidden, atol=1e-3)


def test_export_refuses_a_site_model_with_its_delta(tmp_path, trained_like_model):
    config, model = trained_like_model
    with torch.no_grad():
        next(iter(model.adapters().values())).delta.fill_(0.1)
    with pytest.raises(ValueError, match="delta"):
        export_peft(model, config, tmp_path / "export")


def test_export_command_turns_a_job_checkpoint_into_a_peft_folder(tmp_path, capsys):
    from pathlib import Path

    from fedanchor.cli import main
    from fedanchor.config import config_from_dict, with_overrides
    from fedanchor.federation.loop import run_in_process
    from fedanchor.flare.jobs import read_job_config
    from fedanchor.flare.persistor import save_state

    job = Path(__file__).resolve().parents[1] / "jobs" / "motion"
    config = with_overrides(config_from_dict(read_job_config(job)), {"rounds": 1})
    state = run_in_process(config, progress=None).final_state
    save_state(tmp_path / "last.safetensors", state)
    assert main(["export", str(tmp_path / "last.safetensors"), "--job", str(job), "--out", str(tmp_path / "peft")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    assert json.loads((tmp_path / "peft/fedanchor_export.json").read_text())["round"] == 1
    assert main(["export", str(tmp_path / "last.safetensors"), "--job", str(job.parent / "xray"), "--out", str(tmp_path / "x")]) == 2
