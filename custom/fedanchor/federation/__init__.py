"""The federated round in plain PyTorch: site training, server merging, and an in-process driver."""
from .loop import DEFAULT_SITES, RunResult, make_split, run_in_process, site_modality
from .messages import GlobalState, SiteUpdate
from .server import ContributionRejected, FederatedServer, RoundFailed, RoundReport
from .site import SiteTrainer, embedding_spread, resolve_device

__all__ = [
    "DEFAULT_SITES", "RunResult", "make_split", "run_in_process", "site_modality", "GlobalState", "SiteUpdate",
    "ContributionRejected", "FederatedServer", "RoundFailed", "RoundReport", "SiteTrainer", "embedding_spread", "resolve_device",
]
