"""Global-state checkpoints: safetensors, atomic writes, resumable.

One file per finished round (``round-0003.safetensors``: the state *after*
round 3, i.e. ``GlobalState.round == 3``) plus ``last.safetensors`` and, when a
round beats every earlier one on the selection metric, ``best.safetensors``.
The GlobalState meta travels JSON-encoded in the safetensors header together
with a digest of every tensor, so a file that was cut short or altered is
recognised on load and the previous round is used instead, with a warning.
Files are written to a temporary name, fsynced and renamed: a reader never sees
half a file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from ..federation.messages import GlobalState
from .server_state import get_server_component
from .shareable import learnable_to_state

log = logging.getLogger(__name__)

FORMAT = "fedanchor-global-state"
FORMAT_VERSION = "1"
ROUND_FILE = re.compile(r"^round-(\d+)\.safetensors$")
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, incomplete or does not match its digest."""


# -- file helpers (also used by the executor for delta_site) -------------------
def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], kind: str = FORMAT,
                 mode: int = 0o644) -> None:
    """Atomically write tensors plus JSON meta and a content digest."""
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"format": kind, "version": FORMAT_VERSION, "meta": json.dumps(dict(meta), sort_keys=True, default=str),
              "digest": _digest(clean)}
    atomic_write_bytes(path, st_save(clean, metadata=header), mode=mode)


def load_tensors(path: str | Path, kind: str = FORMAT) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by :func:`save_tensors`; raise CheckpointError if it is not whole."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header = _read_header(data)
    except Exception as err:  # OSError, or safetensors' own SafetensorError on a cut or garbled file
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if header.get("format") != kind:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected {kind!r}")
    if header.get("digest") != _digest(tensors):
        raise CheckpointError(f"{path}: content digest does not match its header (file altered or cut short)")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: meta is not valid JSON") from err
    return tensors, meta


def _read_header(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or 8 + size > len(data):
        raise ValueError("safetensors header length exceeds the file")
    return dict(json.loads(data[8:8 + size]).get("__metadata__") or {})


def save_state(path: str | Path, state: GlobalState) -> None:
    arrays_meta = {"round": state.round, "anchor_fingerprint": state.anchor_fingerprint, **state.meta}
    save_tensors(path, state.tensors, arrays_meta)


def load_state(path: str | Path) -> GlobalState:
    tensors, meta = load_tensors(path)
    try:
        return GlobalState.from_arrays({k: v.numpy() for k, v in tensors.items()}, meta)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def round_files(folder: str | Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := ROUND_FILE.match(name))]
    return sorted(found, reverse=True)


def latest_state(folder: str | Path) -> GlobalState | None:
    """The newest complete checkpoint in ``folder``: last.safetensors, else the newest verifiable round file."""
    folder = Path(folder)
    candidates = ([folder / LAST_FILE] if (folder / LAST_FILE).exists() else []) + [p for _, p in round_files(folder)]
    best: GlobalState | None = None
    for path in candidates:
        try:
            state = load_state(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s; falling back to the previous round", err)
            continue
        if best is None or state.round > best.round:
            best = state
        if path.name != LAST_FILE:
            break  # round files are sorted newest first: the first good one is the answer
    return best


def selection_score(meta: Mapping[str, Any]) -> float | None:
    value = meta.get("selection_metric")
    return float(value) if isinstance(value, (int, float)) else None


# -- the FLARE component --------------------------------------------------------
class FedAnchorPersistor(ModelPersistor):
    """Loads the initial or resumed global state from the shared server component; saves each round."""

    def __init__(self, server_id: str = "fedanchor_server", checkpoint_dir: str = "checkpoints", resume: bool = True):
        """
        Args:
            server_id: id of the FedAnchorServerComponent in config_fed_server.json.
            checkpoint_dir: folder for the round files; relative paths are under the server's run folder.
            resume: continue from the newest complete checkpoint in that folder when there is one.
        """
        super().__init__()
        self.server_id = server_id
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self._best: float | None = None

    def checkpoint_folder(self, fl_ctx: FLContext) -> Path:
        """Where the round files, last and best live (the model locator of cross-site evaluation reads it)."""
        folder = Path(self.checkpoint_dir)
        if not folder.is_absolute():
            workspace = fl_ctx.get_engine().get_workspace()
            folder = Path(workspace.get_run_dir(fl_ctx.get_job_id())) / folder
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        component = get_server_component(fl_ctx, self.server_id)
        server = component.server(fl_ctx)
        folder = self.checkpoint_folder(fl_ctx)
        state = latest_state(folder) if self.resume else None
        if state is not None:
            server.resume(state)
            self.log_info(fl_ctx, f"resumed the global state of round {state.round} from {folder}")
            best_file = folder / BEST_FILE
            if best_file.exists():
                try:
                    self._best = selection_score(load_tensors(best_file)[1])
                except CheckpointError as err:
                    self.log_warning(fl_ctx, f"ignoring {err}")
        else:
            state = server.initial_state()
            component.record_initial_eval(fl_ctx, state)
            self.log_info(fl_ctx, f"initial global state: {len(state.tensors)} tensors, "
                                  f"anchor set {state.anchor_fingerprint[:12]}")
        return component.to_learnable(state)

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        state = learnable_to_state(model)
        folder = self.checkpoint_folder(fl_ctx)
        save_state(folder / f"round-{state.round:04d}.safetensors", state)
        save_state(folder / LAST_FILE, state)
        score = selection_score(state.meta)
        if score is not None and (self._best is None or score > self._best):
            self._best = score
            save_state(folder / BEST_FILE, state)
            self.log_info(fl_ctx, f"round {state.round}: new best selection metric {score:.4f}")
        self.log_info(fl_ctx, f"saved global state of round {state.round} to {folder}")
