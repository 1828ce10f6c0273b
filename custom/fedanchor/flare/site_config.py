"""A site's own settings: what the hospital, not the job, decides.

The job (config_fed_client.json) carries the settings every site shares. Each
site may add a small JSON file in its workspace's ``local/`` folder (the same
folder as resources.json), by default ``local/fedanchor_site.json``::

    {
      "modality": "report",             # optional: checked against the job's site list
      "data": {"source": "bundled", "shard": "hospital-a"},
      "device": "auto",                 # "auto", "cpu", "cuda", "cuda:1"; overrides train.device
      "num_threads": 4,                 # torch CPU threads (optional)
      "state_dir": "/data/fedanchor",   # where delta_site is kept, in <state_dir>/<site>/ (default: the job's
                                        # run folder); set it so that a resubmitted job resumes the site's delta
      "pack": "/srv/fedanchor/my-pack"  # where this machine holds the job's anchor pack, when not at the job's data.pack
    }

Every key is optional and the file itself may be absent. The data source is
``bundled`` (the seeded split of a demo scenario) or ``folder``: the hospital's
own files, ``{"source": "folder", "path": "/data/fedanchor"}``, in the format of
``fedanchor.data.folder`` (check it with ``fedanchor check-data``); the job's
site list still decides the site's modality. A job on an anchor pack (data.pack) has
no bundled shards: its sites read folders. ``{site}`` in ``data.path`` or ``state_dir``
stands for the site's name, so one file serves every site of a simulator workspace.

Which shard of a bundled scenario a site trains on is decided, in order, by
``data.shard``, by the site's own name when the job's site list holds it, or by
the simulator / POC naming convention ``site-<i>`` standing for the i-th entry
of that list (so ``nvflare simulator -n 3`` runs the xray job whose sites are
hospital-a, hospital-b and hospital-c).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import FedAnchorConfig

DEFAULT_SITE_CONFIG_FILE = "fedanchor_site.json"
DATA_SOURCES = ("bundled", "folder")
_SITE_N = re.compile(r"^site-(\d+)$")


class SiteConfigError(ValueError):
    """The site's configuration does not fit the job; the message says what to change."""


@dataclass
class DataSource:
    source: str = "bundled"
    shard: str | None = None  # bundled only: which demo site's private shard
    path: str | None = None  # folder only: the hospital's data folder


@dataclass
class SiteConfig:
    modality: str | None = None
    data: DataSource = field(default_factory=DataSource)
    device: str | None = None
    num_threads: int | None = None
    state_dir: str | None = None
    pack: str | None = None  # this machine's copy of the job's anchor pack (overrides the job's data.pack path)
    source_file: str | None = None  # where it was read from, for messages

    def for_site(self, site: str) -> "SiteConfig":
        """The settings with ``{site}`` in data.path and state_dir replaced by the site's name."""
        def fill(value: str | None) -> str | None:
            return value.replace("{site}", site) if value else value
        return SiteConfig(self.modality, DataSource(self.data.source, self.data.shard, fill(self.data.path)), self.device,
                          self.num_threads, fill(self.state_dir), self.pack, self.source_file)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source_file: str | None = None) -> "SiteConfig":
        where = source_file or "site config"
        if not isinstance(values, Mapping):
            raise SiteConfigError(f"{where}: the top level must be a JSON object, got {type(values).__name__}")
        known = {"modality", "data", "device", "num_threads", "state_dir", "pack"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SiteConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        data_values = values.get("data") or {}
        if not isinstance(data_values, Mapping):
            raise SiteConfigError(f"{where}: 'data' must be an object such as {{\"source\": \"bundled\"}}")
        data_unknown = sorted(set(data_values) - {"source", "shard", "path"})
        if data_unknown:
            raise SiteConfigError(f"{where}: unknown key(s) under 'data': {data_unknown}; valid: ['path', 'shard', 'source']")
        data = DataSource(**dict(data_values))
        if data.source not in DATA_SOURCES:
            raise SiteConfigError(f"{where}: data.source={data.source!r} is unknown; use one of {list(DATA_SOURCES)}")
        if data.source == "folder" and not data.path:
            raise SiteConfigError(f"{where}: data.source='folder' needs data.path, the folder that holds the site's file "
                                  "(format: fedanchor.data.folder; check it with `fedanchor check-data`)")
        if data.source == "bundled" and data.path:
            raise SiteConfigError(f"{where}: data.path is set but data.source is 'bundled'; set data.source to 'folder' "
                                  "to train on that folder")
        num_threads = values.get("num_threads")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise SiteConfigError(f"{where}: num_threads={num_threads!r} must be a positive integer")
        device = values.get("device")
        if device is not None and not isinstance(device, str):
            raise SiteConfigError(f"{where}: device must be a string such as 'auto', 'cpu' or 'cuda:0'")
        pack = values.get("pack")
        if pack is not None and (not isinstance(pack, str) or not pack):
            raise SiteConfigError(f"{where}: pack must be the path of this machine's copy of the job's anchor pack")
        return cls(modality=values.get("modality"), data=data, device=device, num_threads=num_threads,
                   state_dir=values.get("state_dir"), pack=pack, source_file=source_file)


def load_site_config(path: str | Path | None) -> SiteConfig:
    """Read the site's file; an absent file means all defaults."""
    if path is None or not Path(path).is_file():
        return SiteConfig()
    try:
        values = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise SiteConfigError(f"{path}: not valid JSON ({err})") from err
    return SiteConfig.from_dict(values, source_file=str(path))


def resolve_shard(site: str, site_config: SiteConfig, job_sites: Mapping[str, str]) -> tuple[str, str]:
    """Return (shard name, modality) for this site in a bundled scenario, or fail with what to change."""
    where = site_config.source_file or "the site config"
    names = list(job_sites)
    if site_config.data.shard is not None:
        shard = site_config.data.shard
        if shard not in job_sites:
            raise SiteConfigError(f"{where}: data.shard={shard!r} is not one of the job's sites {names}")
        how = f"data.shard in {where}"
    elif site in job_sites:
        shard, how = site, "its name"
    elif (match := _SITE_N.match(site)) and 1 <= int(match.group(1)) <= len(names):
        shard, how = names[int(match.group(1)) - 1], f"the simulator/POC convention site-<i> -> entry {match.group(1)} of {names}"
    else:
        raise SiteConfigError(
            f"site {site!r} is not in the job's site list {names} (config data.sites, or the scenario's default sites); "
            f"add it to data.sites, or set data.shard in local/{DEFAULT_SITE_CONFIG_FILE} of this site")
    modality = job_sites[shard]
    if site_config.modality is not None and site_config.modality != modality:
        raise SiteConfigError(
            f"{where} says modality {site_config.modality!r}, but the job assigns shard {shard!r} ({how}) the modality "
            f"{modality!r}; fix the site file or the job's data.sites")
    return shard, modality


def effective_device(config: FedAnchorConfig, site_config: SiteConfig) -> str:
    return site_config.device or config.train.device
