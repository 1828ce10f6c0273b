"""Global-state checkpoints: safetensors, atomic writes, resumable.

One file per finished round (``round-0003.safetensors``: the state *after*
round 3, i.e. ``GlobalState.round == 3``) plus ``last.safetensors`` and, when a
round beats every earlier one on the selection metric, ``best.safetensors``.
The GlobalState meta travels JSON-encoded in the safetensors header together
with a digest of every tensor, so a file that was cut short or altered is
recognised on load and the previous round is used instead, with a warning.
Files are written to a temporary name, fsynced and renamed: a reader never sees
half a file.

A run that must survive a crash of the server has a run key: its checkpoints then
live under the server's workspace, ``fedanchor-runs/<run key>/``, not in the job's
run folder, which a resubmitted job (a new job id) does not share. The admin gives
it in the job's meta.json (``fedanchor_run_key``, with ``fedanchor_resume``; see
deploy/admin_api.py), outside the app a site approves, or as the persistor's
``run_key``. The job submitted again with the same run key and resume continues
from the newest complete checkpoint and runs only the rounds still missing, so that
it ends where the uninterrupted run would; a checkpoint of another configuration or
anchor set is refused, and so is a fresh start on a run key that already holds
checkpoints. The run key travels to the sites in every global state's meta: they
keep their own state under it (executor.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from ..config import config_differences
from ..federation.messages import GlobalState
from .server_state import get_server_component
from .shareable import learnable_to_state

log = logging.getLogger(__name__)

FORMAT = "fedanchor-global-state"
FORMAT_VERSION = "1"
ROUND_FILE = re.compile(r"^round-(\d+)\.safetensors$")
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
RUNS_DIR = "fedanchor-runs"  # under the server's (and each site's) workspace: one folder per run key
RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RUN_KEY_META, RESUME_META = "fedanchor_run_key", "fedanchor_resume"  # the run's identity in the job's meta.json
RUN_SUMMARY = "fedanchor_summary.json"  # the aggregator's summary, kept with the run so a resumed job carries it on
# Settings that may differ between the job that wrote a checkpoint and the one that continues it: the number of
# rounds (a run may be extended) and where a site trains; everything else changes what a round computes.
RESUMABLE_DIFFERENCES = frozenset({("rounds",), ("train", "device")})


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, incomplete or does not match its digest."""


class RunIdentityError(ValueError):
    """A job would continue a run that is not its own, or start afresh on top of one; the message says what to do."""


def check_run_key(run_key: str) -> str:
    """A run key names a folder on the server and on every site: letters, digits, '.', '_' and '-' only."""
    if not isinstance(run_key, str) or (run_key and not RUN_KEY.match(run_key)) or run_key in (".", ".."):
        raise ValueError(f"run key {run_key!r} is not valid: use 1-100 letters, digits, '.', '_' or '-', starting with "
                         "a letter or digit (e.g. hospitals-motion-2025-06-01)")
    return run_key


def read_job_meta(fl_ctx: FLContext) -> dict[str, Any]:
    """The job's meta.json as FLARE keeps it in this participant's run folder, where the admin's run key is ({} when
    there is none)."""
    meta_file = Path(fl_ctx.get_engine().get_workspace().get_job_meta_path(fl_ctx.get_job_id()))
    try:
        return json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file} is not valid JSON ({err})") from err


def check_resumable(state: GlobalState, job_config: Mapping[str, Any], anchor_fingerprint: str, where: str) -> None:
    """Refuse to continue from ``state`` unless it was made by a job of the same settings on the same anchor set."""
    if state.anchor_fingerprint != anchor_fingerprint:
        raise RunIdentityError(
            f"{where} holds round {state.round} of a run on anchor set {state.anchor_fingerprint[:12]}, but this job uses "
            f"anchor set {anchor_fingerprint[:12]}: it is another run. Submit this job under a new run key (or with "
            "resume=false on a run key of its own)")
    theirs = state.meta.get("job_config")
    differences = config_differences(theirs, job_config, ("checkpoint", "job"), RESUMABLE_DIFFERENCES) if isinstance(theirs, Mapping) else ["(the checkpoint records no job config)"]
    if differences:
        raise RunIdentityError(
            f"{where} holds round {state.round} of a run with other settings ({'; '.join(differences[:6])}): continuing it "
            "with this job would not reproduce that run. Resubmit the job that started the run, or start this one "
            "under a new run key")


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

    def __init__(self, server_id: str = "fedanchor_server", checkpoint_dir: str = "checkpoints",
                 resume: bool | None = None, run_key: str = "", runs_dir: str = RUNS_DIR):
        """
        Args:
            server_id: id of the FedAnchorServerComponent in config_fed_server.json.
            checkpoint_dir: folder for the round files; relative paths are under the server's run folder, or with a
                run key under the run's folder.
            resume: None: continue from the newest complete checkpoint in that folder when there is one, else start.
                True: continue, and refuse to start when there is nothing to continue. False: start, and refuse when
                the folder already holds checkpoints (another run's).
            run_key: the run's identity; set, the checkpoints live in ``<runs_dir>/<run_key>/`` so that the job,
                submitted again after a crash, finds them, and the resumed job runs only the rounds still missing.
            runs_dir: where run folders live; relative paths are under the server's workspace.
        """
        super().__init__()
        if resume not in (None, True, False):
            raise ValueError(f"resume={resume!r}: use true (continue the run), false (start it) or leave it out")
        self.server_id = server_id
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.run_key = check_run_key(run_key)
        self.runs_dir = runs_dir
        self._best: float | None = None
        self._run: tuple[str, bool | None] | None = None  # (run key, resume) of this job, read once
        self._owns_run = False  # set once load_model accepted this job on its run: only then is the run its result

    def run_settings(self, fl_ctx: FLContext) -> tuple[str, bool | None]:
        """(run key, resume) of this job: the job's meta.json (what the admin set on submitting), else the arguments."""
        if self._run is None:
            key, resume = self.run_key, self.resume
            meta = read_job_meta(fl_ctx)
            meta_key = meta.get(RUN_KEY_META) or ""
            if meta_key:
                if key and key != meta_key:
                    raise RunIdentityError(f"the job's meta.json names run {meta_key!r} but its persistor run_key is "
                                           f"{key!r}: give the run key in one place")
                key = check_run_key(str(meta_key))
            if meta.get(RESUME_META) is not None:
                resume = meta[RESUME_META]
                if resume not in (True, False):
                    raise RunIdentityError(f"meta.json {RESUME_META}={resume!r}: use true or false")
            self._run = (key, resume)
        return self._run

    def run_folder(self, fl_ctx: FLContext) -> Path | None:
        """The run key's folder on the server (None without a run key): checkpoints, summary and run.json."""
        key = self.run_settings(fl_ctx)[0]
        if not key:
            return None
        root = Path(self.runs_dir)
        if not root.is_absolute():
            root = Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / root
        return root / key

    def checkpoint_folder(self, fl_ctx: FLContext) -> Path:
        """Where the round files, last and best live (the model locator of cross-site evaluation reads it)."""
        folder = Path(self.checkpoint_dir)
        if not folder.is_absolute():
            base = self.run_folder(fl_ctx) or self._job_run_dir(fl_ctx)
            folder = base / folder
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _job_run_dir(fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def _what(self, fl_ctx: FLContext, folder: Path) -> str:
        key = self.run_settings(fl_ctx)[0]
        return f"run {key!r} ({folder})" if key else str(folder)

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        component = get_server_component(fl_ctx, self.server_id)
        server = component.server(fl_ctx)
        try:
            run_key, resume = self.run_settings(fl_ctx)
        except (RunIdentityError, ValueError) as err:
            raise self._refuse(fl_ctx, RunIdentityError(str(err)))
        component.run_key = run_key  # travels in every global state's meta: the sites keep their state under it
        folder = self.checkpoint_folder(fl_ctx)
        state = latest_state(folder) if resume is not False else None
        if resume is False and (round_files(folder) or (folder / LAST_FILE).exists()):
            found = latest_state(folder)
            raise self._refuse(fl_ctx, RunIdentityError(
                f"{self._what(fl_ctx, folder)} already holds checkpoints (up to round {found.round if found else '?'}): this job "
                "would start afresh on top of another run. To continue that run submit it with resume (fedanchor_admin.py "
                "resume); to start a new one give it a new run key"))
        if resume is True and state is None:
            raise self._refuse(fl_ctx, RunIdentityError(
                f"{self._what(fl_ctx, folder)} holds no complete checkpoint to continue from: check the run key, or submit the "
                "job without resume to start the run"))
        if state is not None:
            try:
                check_resumable(state, component.state_meta()["job_config"], server.anchor_fingerprint, self._what(fl_ctx, folder))
            except RunIdentityError as err:
                raise self._refuse(fl_ctx, err)
            server.resume(state)
            component.restore_server_memory(state.meta)
            state.meta.pop("server_memory", None)  # the resumed state goes to the sites: the server's memory stays here
            self.log_info(fl_ctx, f"resumed the global state of round {state.round} from {folder}")
            best_file = folder / BEST_FILE
            if best_file.exists():
                try:
                    self._best = selection_score(load_tensors(best_file)[1])
                except CheckpointError as err:
                    self.log_warning(fl_ctx, f"ignoring {err}")
            if run_key:
                self._carry_summary_on(fl_ctx, state.round)
                self._continue_workflow_at(fl_ctx, state.round)
        else:
            state = server.initial_state()
            component.record_initial_eval(fl_ctx, state)
            self.log_info(fl_ctx, f"initial global state: {len(state.tensors)} tensors, "
                                  f"anchor set {state.anchor_fingerprint[:12]}")
        if run_key:
            self._record_job(fl_ctx, state.round)
            self._owns_run = True
        return component.to_learnable(state)

    def _refuse(self, fl_ctx: FLContext, err: RunIdentityError) -> RunIdentityError:
        self.log_error(fl_ctx, str(err))
        return err

    def _continue_workflow_at(self, fl_ctx: FLContext, done: int) -> None:
        """Tell the round-based workflow that loads this persistor (ScatterAndGather) that ``done`` rounds of the run
        are done, so that it runs rounds done .. num_rounds-1 and the resumed run ends where the uninterrupted one does.
        It uses the workflow's own state hooks (get_persist_state / restore), which keep its other settings."""
        workflow_id = fl_ctx.get_prop(FLContextKey.WORKFLOW)
        controller = fl_ctx.get_engine().get_component(workflow_id) if workflow_id else None
        persisted = controller.get_persist_state(fl_ctx) if hasattr(controller, "get_persist_state") else None
        if not isinstance(persisted, dict) or "current_round" not in persisted or not hasattr(controller, "restore"):
            raise self._refuse(fl_ctx, RunIdentityError(
                f"the workflow {workflow_id!r} ({type(controller).__name__}) cannot be told to continue at round {done}: "
                "a run key needs a round-based workflow such as ScatterAndGather"))
        run_key = self.run_settings(fl_ctx)[0]
        start, total = int(persisted.get("start_round") or 0), persisted.get("num_rounds")
        persisted["current_round"] = max(done, start)
        controller.restore(persisted, fl_ctx)
        left = f"{max(0, start + total - done)} of {total} rounds left" if isinstance(total, int) else "rounds left"
        self.log_info(fl_ctx, f"run {run_key!r}: continuing from round {done} ({left})")

    def _carry_summary_on(self, fl_ctx: FLContext, done: int) -> None:
        """Start this job's summary from the run's, cut to the rounds the checkpoint holds (the summary of a round is
        kept before its checkpoint, so it may hold one round more), so the aggregator appends the rounds still to come."""
        kept = self.run_folder(fl_ctx) / RUN_SUMMARY
        if not kept.is_file():
            return
        try:
            summary = json.loads(kept.read_text())
        except json.JSONDecodeError as err:
            self.log_warning(fl_ctx, f"the run's summary {kept} is not readable ({err}); this job's starts empty")
            return
        summary["rounds"] = [r for r in summary.get("rounds", []) if int(r.get("round", 0)) < done]
        summary.setdefault("resumed", []).append({"job_id": fl_ctx.get_job_id(), "from_round": done})
        atomic_write_bytes(self._job_run_dir(fl_ctx) / RUN_SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())

    def _record_job(self, fl_ctx: FLContext, from_round: int) -> None:
        """run.json: which jobs worked on the run, from which round (for the admin and the next resume)."""
        path = self.run_folder(fl_ctx) / "run.json"
        try:
            record = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            record = {}
        record.setdefault("run_key", self.run_settings(fl_ctx)[0])
        record.setdefault("jobs", []).append({"job_id": fl_ctx.get_job_id(), "from_round": from_round})
        atomic_write_bytes(path, json.dumps(record, indent=2).encode())

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.END_RUN and self._owns_run:  # a refused job's result holds no other run's model
            self._mirror_into_job(fl_ctx)

    def _mirror_into_job(self, fl_ctx: FLContext) -> None:
        """At the end of a job, copy the run's checkpoints into its run folder: the downloaded result then holds the
        model (all rounds of the run, also those an earlier, crashed job made) next to its summary."""
        try:
            source = self.checkpoint_folder(fl_ctx)
            target = self._job_run_dir(fl_ctx) / (self.checkpoint_dir if not Path(self.checkpoint_dir).is_absolute()
                                                   else "checkpoints")
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(source.glob("*.safetensors")):
                shutil.copy2(path, target / path.name)
        except OSError as err:  # the run's own folder keeps them: a missing copy loses nothing
            self.log_warning(fl_ctx, f"could not copy the run's checkpoints into the job's result: {err}")

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        state = learnable_to_state(model)
        # What the server remembers between rounds goes into the checkpoint, never into the state the sites receive.
        state.meta["server_memory"] = get_server_component(fl_ctx, self.server_id).server_memory()
        folder = self.checkpoint_folder(fl_ctx)
        if self.run_settings(fl_ctx)[0]:  # the summary first: a crash before the checkpoint leaves one round too many, which resume cuts
            summary = self._job_run_dir(fl_ctx) / RUN_SUMMARY
            if summary.is_file():
                atomic_write_bytes(self.run_folder(fl_ctx) / RUN_SUMMARY, summary.read_bytes())
        save_state(folder / f"round-{state.round:04d}.safetensors", state)
        save_state(folder / LAST_FILE, state)
        score = selection_score(state.meta)
        if score is not None and (self._best is None or score > self._best):
            self._best = score
            save_state(folder / BEST_FILE, state)
            self.log_info(fl_ctx, f"round {state.round}: new best selection metric {score:.4f}")
        self.log_info(fl_ctx, f"saved global state of round {state.round} to {folder}")
