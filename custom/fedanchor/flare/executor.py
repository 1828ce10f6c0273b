"""The site's FLARE Executor: train, validate and submit_model on top of ``SiteTrainer``.

It reads the job's shared settings (its ``config`` argument) and the site's own
file (``local/fedanchor_site.json``, see ``site_config.py``), builds the
SiteTrainer once per run, keeps delta_site (the site's own log-gains, which
never leave it) in a safetensors file in the site's workspace and reloads it
when the site restarts. When the run has a run key (its identity, which the admin
sets in the job's meta.json on submitting; the server also sends it with every
global state) that file lives in ``fedanchor-runs/<run key>/<site>/`` of the
site's workspace (or under the site's state_dir), where the job submitted again
after a crash finds it. The delta of the round before is kept too: a restarted
server may ask again for the round a site had already trained, and the site then
trains it again from the delta it started that round with.

- ``train``: GlobalState from the task's DXO -> ``train_round`` -> SiteUpdate as a DXO (COLLECTION).
- ``validate``: the received global state on the site's own view of the public anchors: retrieval
  of the other modalities' anchor targets and CKA to the consensus Gram (METRICS).
- ``submit_model``: the shared tensors (cores, magnitudes, its projector) of the last update train
  released, as they left (noised under differential privacy); never delta_site, never anything new.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from ..alignment.gram import centred_gram, consensus_agreement, from_upper_triangle
from ..config import FedAnchorConfig, config_differences, config_from_dict, config_to_dict, with_overrides
from ..evaluation import retrieval
from ..federation.loop import make_split, site_modality
from ..federation.messages import GlobalState, SiteUpdate
from ..federation.server import centre_on_anchors, to_scoring_space
from ..federation.site import SiteTrainer
from .persistor import (RUN_KEY_META, RUNS_DIR, CheckpointError, atomic_write_bytes, check_run_key, load_tensors,
                        read_job_meta, save_tensors)
from .shareable import dxo_to_state, update_to_dxo
from ..data.folder import load_folder
from .site_config import (DEFAULT_SITE_CONFIG_FILE, SiteConfig, SiteConfigError, effective_device, load_site_config,
                          resolve_shard)

DELTA_FORMAT = "fedanchor-delta-site"
BASES_FORMAT = "fedanchor-bases"  # the public global bases a site holds, kept beside delta_site
# Keys a site may set differently from the server without changing what the federation computes.
SITE_LOCAL_KEYS = frozenset({("train", "device")})


class TaskAborted(Exception):
    pass


def anchor_validation(trainer: SiteTrainer, state: GlobalState) -> dict[str, float]:
    """The global state seen from this site: its anchors against the other modalities' anchors, in the readout's
    space when the job fits one (the other modalities' scored anchors come with the state), else anchor-centred."""
    trainer.install(state)  # the site then holds this state's bases: a later state may leave them out
    modality = trainer.modality
    z = trainer.model.embed_all(modality, trainer.anchors.items)
    labels = trainer.anchors.semantic_labels
    readout, scored = state.readout(), state.scored_anchors()
    blocks = state.readout_blocks(trainer.config.alignment.readout_blocks)
    if readout is not None and scored:
        base = {modality: trainer.anchor_base_features()} if {"base", "codebook"} & set(blocks) else None
        mine = to_scoring_space({modality: z}, {modality: z}, readout, base, blocks, state.codebooks())[modality]
        others = {m: v for m, v in scored.items() if m != modality}
    else:
        targets = state.targets()
        mine = centre_on_anchors(z, z)
        others = {m: centre_on_anchors(v, v) for m, v in targets.items() if m != modality}
    metrics: dict[str, float] = {}
    for other, theirs in others.items():
        for key, value in retrieval(mine, theirs, labels, labels).items():
            if not key.startswith("chance_"):
                metrics[f"anchor/{modality}->{other}/{key}"] = value
    kernel = state.consensus()
    if kernel is not None:
        metrics["anchor/cka_to_consensus"] = consensus_agreement(centred_gram(z.double()), from_upper_triangle(kernel.double()))
    return metrics


class FedAnchorExecutor(Executor):
    def __init__(self, config: dict | None = None, site_config_file: str = DEFAULT_SITE_CONFIG_FILE,
                 train_task: str = "train", validate_task: str = "validate", submit_model_task: str = "submit_model",
                 check_job_config: bool = True):
        """
        Args:
            config: the job's shared settings, nested like ``fedanchor.config.config_from_dict``.
            site_config_file: the site's own settings, looked up in the site workspace's local/ folder
                (an absolute path is used as is); absent means defaults.
            train_task, validate_task, submit_model_task: task names this executor answers.
            check_job_config: refuse a global state whose job config (sent by the server) differs from ours.
        """
        super().__init__()
        self.config = dict(config or {})
        self.site_config_file = site_config_file
        self.train_task = train_task
        self.validate_task = validate_task
        self.submit_model_task = submit_model_task
        self.check_job_config = check_job_config
        self._cfg: FedAnchorConfig | None = None
        self._site_config: SiteConfig | None = None
        self._trainer: SiteTrainer | None = None
        self._setup_error: str | None = None
        self._delta_path: Path | None = None
        self._bases_path: Path | None = None
        self._run_key: str | None = None  # the run whose state the site holds ("" for a job without a run key)
        self._saved_bases: str | None = None
        self._last_round: int | None = None  # the round of the delta_site the trainer holds (None: as initialised)
        self._initial_delta: dict[str, torch.Tensor] | None = None  # delta_site as initialised: a run's round 0 starts here
        self._released: SiteUpdate | None = None  # the last update train sent: all that submit_model may send again

    # -- set-up ------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._ensure_setup(fl_ctx)

    def _ensure_setup(self, fl_ctx: FLContext) -> bool:
        if self._setup_error is not None:  # first: a set-up that failed half-way may have made a trainer
            return False
        if self._trainer is not None:
            return True
        try:
            self._setup(fl_ctx)
            return True
        except (SiteConfigError, ValueError, KeyError, FileNotFoundError, RuntimeError, CheckpointError) as err:
            self._setup_error = f"fedanchor site {fl_ctx.get_identity_name()!r} cannot start: {err}"
            self.log_error(fl_ctx, self._setup_error)
            self.system_panic(self._setup_error, fl_ctx)
            return False

    def _site_config_path(self, fl_ctx: FLContext) -> Path:
        path = Path(self.site_config_file)
        if path.is_absolute():
            return path
        return Path(fl_ctx.get_engine().get_workspace().get_file_path_in_site_config(self.site_config_file))

    def _setup(self, fl_ctx: FLContext) -> None:
        started = time.perf_counter()
        site = fl_ctx.get_identity_name()
        self._cfg = cfg = config_from_dict(self.config)
        path = self._site_config_path(fl_ctx)
        self._site_config = site_cfg = load_site_config(path).for_site(site)
        shard, modality = resolve_shard(site, site_cfg, site_modality(cfg))
        if site_cfg.num_threads:
            torch.set_num_threads(site_cfg.num_threads)
        if site_cfg.pack and cfg.data.pack:  # where this machine keeps the job's pack; a bundled job has none to move
            cfg = self._cfg = with_overrides(cfg, {"data.pack": site_cfg.pack})
        if cfg.data.pack and site_cfg.data.source != "folder":
            raise SiteConfigError(f"the job runs on anchor pack {cfg.data.pack}, which holds no private data: set "
                                  f"\"data\": {{\"source\": \"folder\", \"path\": ...}} in {path}")
        split = make_split(cfg)  # a pack other than the job's (by fingerprint) is refused here, naming both
        modalities = {name: data.spec for name, data in split.anchors.items()}
        # The job's site list decides the modality; a hospital's own folder replaces the bundled shard's items.
        private = load_folder(site_cfg.data.path, modalities[modality]) if site_cfg.data.source == "folder" else split.private[shard]
        self._trainer = trainer = SiteTrainer(cfg, site, private, split.anchors[modality], split.anchor_fingerprint,
                                              modalities, split.feature_stats, device=effective_device(cfg, site_cfg))
        self._initial_delta = trainer.local_state()
        source = f"folder {site_cfg.data.path}" if site_cfg.data.source == "folder" else f"shard {shard}"
        self.log_info(fl_ctx, f"fedanchor site {site}: {source} ({modality}, {len(private)} private samples), "
                              f"{len(split.anchors[modality])} anchors, trunk {cfg.trunk.name}, device {trainer.device}, "
                              f"site config {path if path.is_file() else 'absent (defaults)'} "
                              f"[{time.perf_counter() - started:.1f}s]")
        self._bind_run(job_run_key(fl_ctx), fl_ctx)

    def _bind_run(self, run_key: str, fl_ctx: FLContext) -> None:
        """Find the site's state of the job's run: delta_site and the bases it holds."""
        trainer, site = self._trainer, fl_ctx.get_identity_name()
        state_dir = self._state_dir(fl_ctx, self._site_config, site, run_key)
        self._delta_path = state_dir / f"delta_site-{trainer.anchor_fingerprint[:12]}.safetensors"
        self._bases_path = state_dir / f"bases-{trainer.anchor_fingerprint[:12]}.safetensors"
        resumed = self._load_delta(site)
        self._load_bases(fl_ctx)
        self._run_key = run_key
        self.log_info(fl_ctx, f"fedanchor site {site}{', run ' + run_key if run_key else ''}: delta_site "
                              f"{'resumed from round ' + str(resumed) if resumed is not None else 'new'} at {self._delta_path}")

    @staticmethod
    def _state_dir(fl_ctx: FLContext, site_cfg: SiteConfig, site: str, run_key: str) -> Path:
        """Where delta_site and the bases live. A state_dir or a run key outlives the job (a resubmitted job finds the
        site's state there); one sub-folder per site, so that sites sharing a file system or a simulator workspace
        never read each other's, and one per run key, so that one run never continues from another's."""
        workspace = fl_ctx.get_engine().get_workspace()
        if site_cfg.state_dir:
            return Path(site_cfg.state_dir) / site / run_key if run_key else Path(site_cfg.state_dir) / site
        if run_key:
            return Path(workspace.get_root_dir()) / RUNS_DIR / run_key / site
        return Path(workspace.get_run_dir(fl_ctx.get_job_id())) / "fedanchor"

    def _site(self) -> SiteTrainer:
        """The site's trainer, made at START_RUN; a task before a finished set-up raises (python -O keeps it)."""
        if self._trainer is None:
            raise RuntimeError("the fedanchor site is not set up: START_RUN did not complete (see the error above)")
        return self._trainer

    def _load_delta(self, site: str) -> int | None:
        self._site()
        if not self._delta_path.exists():
            return None
        try:
            tensors, meta = load_tensors(self._delta_path, kind=DELTA_FORMAT)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; delete it to start this site's delta_site from zero") from err
        if meta.get("site") != site:
            raise SiteConfigError(f"{self._delta_path} belongs to site {meta.get('site')!r}, not {site!r}; "
                                  "give each site its own state_dir")
        self._trainer.load_local_state(tensors)
        self._trainer._dp_rounds = int(meta.get("dp_rounds", 0))  # the privacy accountant counts on after a restart
        self._last_round = meta.get("round")
        return self._last_round

    def _previous_path(self) -> Path:
        return self._delta_path.with_name(self._delta_path.name.replace(".safetensors", ".previous.safetensors"))

    def _delta_before(self, round_: int, fl_ctx: FLContext) -> None:
        """Give the trainer the delta_site this site started round ``round_`` with. Normally that is the one it holds
        (from its last round, or as initialised); a restarted server may ask again for a round the site already
        trained: then the delta kept from the round before, or for the run's round 0 the initial one."""
        if self._last_round is None or self._last_round < round_:
            return
        previous = self._previous_path()
        try:
            tensors, meta = load_tensors(previous, kind=DELTA_FORMAT) if round_ > 0 and previous.exists() else ({}, {})
        except CheckpointError as err:
            self.log_warning(fl_ctx, f"kept delta_site of the round before not used ({err})")
            tensors, meta = {}, {}
        if tensors:
            if meta.get("round") is not None and meta["round"] < round_:
                # _dp_rounds stays: the first training of this round may have released its update already, and the
                # noise is fresh each time, so the retrained round is one more release for the accountant.
                self._trainer.load_local_state(tensors)
                self._last_round = meta["round"]
                self.log_info(fl_ctx, f"round {round_} again (a restarted server): training it from the delta_site of "
                                      f"round {self._last_round}, as the first time")
                return
        if round_ > 0:
            self.log_warning(fl_ctx, f"round {round_}: this site holds delta_site of round {self._last_round} and none "
                                     "from before it; training from the initial delta_site (the run will not reproduce "
                                     "an uninterrupted one)")
        self._trainer.load_local_state(self._initial_delta)
        self._last_round = None

    def _save_delta(self, round_: int) -> None:
        trainer = self._site()
        if self._delta_path.exists():  # keep the delta of the round before: the round may be asked for again
            try:
                kept = load_tensors(self._delta_path, kind=DELTA_FORMAT)[1].get("round")
            except CheckpointError:
                kept = None
            if kept is not None and kept < round_:  # copied, not moved: a crash here must not leave no delta_site
                atomic_write_bytes(self._previous_path(), self._delta_path.read_bytes(), mode=0o600)
        save_tensors(self._delta_path, trainer.local_state(),
                     {"site": trainer.site, "modality": trainer.modality, "round": round_,
                      "anchor_fingerprint": trainer.anchor_fingerprint, "run_key": self._run_key,
                      "dp_rounds": trainer._dp_rounds}, kind=DELTA_FORMAT, mode=0o600)
        self._save_bases()

    def _save_bases(self) -> None:
        """The global bases this site holds, kept when they change: after a restart the server may send a state
        without them (flare/basis_cache.py), and the site then needs them from its disk, not a lost round."""
        trainer = self._site()
        if trainer.basis_digest is None or trainer.basis_digest == self._saved_bases:
            return
        save_tensors(self._bases_path, trainer.held_bases(), {"digest": trainer.basis_digest}, kind=BASES_FORMAT)
        self._saved_bases = trainer.basis_digest

    def _load_bases(self, fl_ctx: FLContext) -> None:
        self._site()
        if not self._bases_path.exists():
            return
        try:
            tensors, meta = load_tensors(self._bases_path, kind=BASES_FORMAT)
            self._trainer.hold_bases(tensors)
        except (CheckpointError, ValueError) as err:  # the server sends them whole after one lost round
            self.log_warning(fl_ctx, f"kept bases not used ({err})")
            return
        self._saved_bases = self._trainer.basis_digest

    # -- tasks -------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (self.train_task, self.validate_task, self.submit_model_task):
            self.log_error(fl_ctx, f"task {task_name!r} is not one of {self.train_task!r}, {self.validate_task!r}, "
                                   f"{self.submit_model_task!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if not self._ensure_setup(fl_ctx):
            self.log_error(fl_ctx, self._setup_error or "set-up failed")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if task_name == self.submit_model_task:
            return self._submit_model(fl_ctx)
        try:
            state = self._read_state(shareable)
        except (ValueError, TypeError, KeyError) as err:  # not a fedanchor global state, or another job's
            self.log_error(fl_ctx, f"task {task_name}: {err}")
            return make_reply(ReturnCode.BAD_TASK_DATA)

        if task_name == self.validate_task:
            metrics = anchor_validation(self._trainer, state)
            self.log_info(fl_ctx, f"validate round {state.round}: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                                             if k.endswith(("recall@1", "consensus"))))
            return DXO(data_kind=DataKind.METRICS, data=metrics, meta={"round": state.round}).to_shareable()
        return self._train(state, fl_ctx, abort_signal)

    def _read_state(self, shareable: Shareable) -> GlobalState:
        state = dxo_to_state(from_shareable(shareable))
        their_run = str(state.meta.get("run_key") or "")
        if their_run != self._run_key:  # the same meta.json reached the server and this site: another job's state
            raise ValueError(f"the global state belongs to {'run ' + repr(their_run) if their_run else 'no run key'}, "
                             f"this job to {'run ' + repr(self._run_key) if self._run_key else 'no run key'}")
        server_config = state.meta.get("job_config")
        if self.check_job_config and server_config is not None:
            differences = config_differences(config_to_dict(self._cfg), server_config, ("site", "server"), SITE_LOCAL_KEYS)
            if differences:
                raise ValueError("this site's job config differs from the server's: " + "; ".join(differences[:6]))
        return state

    def _train(self, state: GlobalState, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        trainer = self._site()

        def progress(step: int, total: int, loss: float) -> None:
            if abort_signal.triggered:
                raise TaskAborted(f"aborted at step {step}/{total}")

        # delta_site as it was: an interrupted round must not leave it half-trained, nor changed for a repeated round
        held = (trainer.local_state(), self._last_round, trainer._dp_rounds)

        def restore() -> None:
            trainer.load_local_state(held[0])
            self._last_round, trainer._dp_rounds = held[1], held[2]

        self._delta_before(state.round, fl_ctx)
        try:
            update = trainer.train_round(state, progress=progress)
        except TaskAborted as err:
            restore()
            self.log_warning(fl_ctx, f"round {state.round}: {err}")
            return make_reply(ReturnCode.TASK_ABORTED)
        except ValueError as err:  # e.g. another anchor set than the server's
            restore()
            self.log_error(fl_ctx, f"round {state.round}: {err}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        except FloatingPointError as err:
            restore()
            self.log_error(fl_ctx, f"round {state.round}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        self._save_delta(state.round)
        self._last_round = state.round
        self._released = update
        self.log_info(fl_ctx, f"fedanchor site {trainer.site} round {state.round + 1}: {round_summary(update)}")
        return update_to_dxo(update).to_shareable()

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        """The shared parameters of the last update this site released, as they left (after differential privacy's
        noise when the job uses it): submitting a model sends nothing that train did not already send."""
        released = self._released
        if released is None:
            self.log_error(fl_ctx, "submit_model: this site has released no update in this run yet; a site submits only "
                                   "what a train round already sent (run a round first)")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        tensors = {k: v.detach().cpu().numpy() for k, v in released.params.items()}
        meta = {"site": released.site, "modality": released.modality, "round": released.round,
                "anchor_fingerprint": released.anchor_fingerprint}
        self.log_info(fl_ctx, f"submit_model: the {len(tensors)} shared tensors released in round {released.round} "
                              "(delta_site stays here)")
        return DXO(data_kind=DataKind.WEIGHTS, data=tensors, meta=meta).to_shareable()


def job_run_key(fl_ctx: FLContext) -> str:
    """The run key the admin gave the job (``fedanchor_run_key`` in its meta.json, which FLARE puts in the site's run
    folder); "" for a job without one."""
    return check_run_key(str(read_job_meta(fl_ctx).get(RUN_KEY_META) or ""))


def round_summary(update: SiteUpdate) -> str:
    """A train round in one log line: the losses, or under differential privacy the privacy spent (the losses depend
    on private data and stay at the site)."""
    m = update.metrics
    if "loss/loss" in m:
        what = (f"loss {m['loss/loss']:.4f} (private {m['loss/private']:.4f}, cka {m['loss/cka']:.4f}, cross "
                f"{m['loss/cross']:.4f}), cka to consensus {m.get('cka_to_consensus', float('nan')):.3f}, uncertainty "
                f"scalar {update.uncertainty:.3g}")
    else:
        what = (f"differential privacy, epsilon {m.get('dp/epsilon', float('nan')):.3g} at delta "
                f"{m.get('dp/delta', float('nan')):g} after {m.get('dp/rounds', 0):.0f} round(s); losses stay here")
    return f"{what}, {update.nbytes()} bytes up, {m.get('seconds', float('nan')):.1f}s"
