"""One configuration place for fedanchor, with nested, named keys.

Every driver (the in-process loop, the FLARE job JSON, the command line) builds a
``FedAnchorConfig`` through :func:`config_from_dict`, so a key that is misspelt
or a value that is out of range fails in one place with a message that names it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

DEFAULT_TRUNK = "all-MiniLM-L6-v2"
TINY_TRUNK = "tiny"


@dataclass
class TrunkConfig:
    """The frozen pretrained encoder shared by every site."""

    name: str = DEFAULT_TRUNK  # "all-MiniLM-L6-v2", "tiny", a local folder, or a cached hub name
    max_text_tokens: int = 32  # the impression comes first in xray reports; 32 tokens keep a CPU step near a second
    embed_dim: int = 128  # p: width of the shared head's unit vectors
    tiny_hidden: int = 128  # only for name="tiny": a random-init BERT for fast tests
    tiny_layers: int = 2  # only for name="tiny"
    tiny_heads: int = 4  # only for name="tiny"


@dataclass
class AdapterConfig:
    """GeoLoRA on the trunk's linear layers (DESIGN.md section 2)."""

    rank: int = 8  # r: the core S is r x r per adapted layer
    targets: tuple[str, ...] = ("query", "key", "value", "attention.output.dense")  # linear layers adapted, by name suffix or glob
    basis_init: str = "svd"  # "svd": top singular vectors of W0; "random": seeded orthonormal
    seed: int = 0  # seeds the bases, the projectors and the head: identical at every site
    refresh_every: int = 0  # T: 0 keeps the basis fixed; T >= 2 refreshes it every T rounds (adapters/refresh.py)
    refresh_tolerance: float = 0.1  # tau: a refresh discards singular values whose norm is at most tau of the core's
    rank_max: int = 0  # the most a layer's rank may grow to at a refresh; 0: adapter.rank


@dataclass
class AlignmentConfig:
    """Anchor Gram alignment and the cross-modal anchor term (DESIGN.md section 3)."""

    lambda_cka: float = 1.0  # weight of 1 - CKA(site anchor Gram, consensus)
    lambda_cross: float = 1.0  # weight of the cross-modal anchor InfoNCE against the other modalities' anchor targets
    lambda_delta: float = 1e-3  # L2 penalty on the site's own log-gains delta
    temperature: float = 0.1  # of the anchor InfoNCE
    consensus_ema: float = 0.5  # weight of the previous consensus
    modality_weights: dict[str, float] = field(default_factory=dict)  # beta_m; missing = 1
    anchor_batch: int = 64  # anchors per local step
    readout: str = "cca"  # "cca": the server fits a per-modality anchor CCA map on the global model (alignment/readout.py); "none"
    readout_blocks: tuple[str, ...] = ("base", "codebook", "model")  # the readout's input: training-free "base" features, the private "codebook" block, the "model" embedding
    readout_reg: float = 0.0  # ridge of the readout, relative to each covariance's mean eigenvalue; 0: chosen by anchor cross-validation
    readout_dims: int = 0  # directions kept; 0: chosen by anchor cross-validation
    readout_folds: int = 5  # k of the anchor cross-validation that chooses the readout (alignment/readout_choice.py)
    readout_repeats: int = 0  # reshuffled repetitions of the k-fold split; 0: enough to rank about 200 held-out anchors
    readout_text_tokens: int = 128  # tokens of a text item's base features (the whole report, not the training crop)
    codebook_size: int = 160  # centres of a modality's private codebook (alignment/codebook.py); 0: no codebook
    codebook_components: int = 40  # principal components of the anchors' base features the centres live in
    codebook_temperature: float = 0.0  # of the soft assignment, relative to the anchors' median squared distance; 0: chosen by anchor cross-validation (the block's position part always is)
    codebook_min_cluster: int = 5  # private items a centroid must average before it may leave a site


@dataclass
class PrivateConfig:
    """The site's own self-supervised objective on its private data."""

    weight: float = 1.0  # weight of the two-view contrastive loss on private data
    temperature: float = 0.1  # of that loss
    augment_strength: float = 1.0  # scales every augmentation (0: identical views)


@dataclass
class PrecisionConfig:
    """Precision-weighted merging (DESIGN.md section 4)."""

    method: str = "iterate_variance"  # "iterate_variance", "fisher" or "uniform"
    window: int = 8  # last local steps whose iterates (or gradients) estimate the precision
    sample_exponent: float = 0.5  # gamma in n_k ** gamma
    # pi_k from the embedding spread under sampled cores. Off by default: at full scale (motion, MiniLM, 5 x 20 steps,
    # 3 splits) it swung 2-5x between rounds for the same site and cost a clean federation recall (docs/results/README.md).
    site_scalar: bool = False
    site_scalar_samples: int = 4  # cores sampled around S_k with variance 1/Lambda for the epistemic spread
    site_scalar_anchors: int = 32  # anchors (and private items) the site scalar embeds
    # The server's anchor check: it embeds two augmented views of public anchors of the site's modality with each
    # site's update applied and scores their agreement (the sites' own two-view loss, on public data); a site far
    # worse than the other sites of its modality (robust z-score) weighs less in the next round. Off by default: on
    # small anchor sets its losses move more from round to round than between a garbage site and a clean one, and it
    # took a clean site's say for a round (docs/results/README.md, "Precision"); the information check replaced it.
    anchor_check: bool = False
    anchor_check_items: int = 64  # anchors embedded (in two views) per update
    anchor_check_min_sites: int = 3  # sites of a modality every check needs to tell an odd one out (fewer: factor 1)
    # The server's data check: how far each site's codebook centroids (already sent, once) lie from the public anchors
    # of its modality; a site far from its peers (the same robust z-score) weighs less from then on, and its centroids
    # stay out of the codebook. Needs the private codebook (alignment.readout_blocks with "codebook", no DP).
    data_check: bool = True
    # The server's information check: from each site's reported two-view loss on its private data, the information
    # its two views share (the InfoNCE bound, log(2B - 1) - loss); a site's say scales with its share of its
    # modality's median (at most 1), in the same round: the server holds the round's updates to its end (their bytes
    # up, per site) and folds them there. A site under half its say when the codebook is built adds no centres to it.
    # Random or noise-drowned items teach the model nothing, so their site's loss stays near chance whatever the
    # number of local steps. Needs anchor_check_min_sites sites of the modality; judges images and signals only (a
    # text, codes or vector view keeps a random item matchable); nothing under DP (the loss is not released).
    information_check: bool = True
    # The server's typicality check (typicality.py): each site sends, once it holds alignment.codebook_min_cluster
    # private items or more, the mean and spread over its items of statistics of its raw data measured against its
    # modality's public anchors (energy; for images and signals, roughness; for text, coherence, the word order the
    # frozen trunk reads), and over the anchors of the level and dispersion of its own copy of them (a pipeline that
    # rescales what the site reads shows there); a site far from its peers and the anchors (robust z-score over 2)
    # weighs less, from the round its report arrives on, and adds no centres to the codebook. Static: local steps do
    # not wash it out. Needs anchor_check_min_sites sites of the modality; nothing under DP.
    typicality_check: bool = True
    # What the information check reads: "training", the mean loss of the round's own steps; or "received", the
    # two-view loss of the model the site received, before its local steps, averaged over information_draws batches
    # (one more forward per draw, no gradients). On motion (3 splits) "received" left a garbage site 0.15 of a clean
    # site's weight (0.37 with "training") but a noisy one 0.83 (0.75): the received model learns the noisy site's
    # recordings too (docs/results/README.md, "Precision").
    information_reading: str = "training"
    information_draws: int = 8  # batches of train.batch_size private items, each in two fresh views
    # Sites the consortium vouches for (a known other scanner or protocol): every check still measures them and the
    # round report shows what it read, but none takes their say, leaves them out or keeps their centroids from the
    # codebook. The checks judge a site unlike its peers, not harmful, and which sites to trust is the consortium's
    # call. On digits at full scale a blurred pixel site vouched for reads what uniform averaging reads, 0.018 instance
    # R@10 above leaving it out on one split's strength; a random site does as well there (docs/results/README.md).
    vouched_sites: tuple[str, ...] = ()
    eps: float = 1e-12  # floor of a precision


@dataclass
class TrainConfig:
    """Local training at each site."""

    local_steps: int = 20  # optimiser steps per site per round
    batch_size: int = 32  # private items per step (each in two augmented views)
    lr: float = 5e-3  # Adam learning rate of S, m and delta
    projector_lr: float = 2e-2  # a code table starts at word-embedding scale (~0.05) and must move within a few rounds
    weight_decay: float = 0.0  # Adam weight decay
    warmup_fraction: float = 0.25  # of local steps, with a linear learning-rate warm-up each round
    seed: int = 0  # private batches, augmentations and dropout, per site and round
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    autocast: str = "auto"  # "auto": bf16 autocast on a CUDA GPU that supports it, else fp32; "bf16"; "off"


@dataclass
class DataConfig:
    """The scenario and its seeded split into anchors, test pairs and private sets."""

    scenario: str = "xray"  # "xray", "digits" or "motion": the bundled data and its public anchors (when pack is empty)
    # An anchor pack folder (data/pack.py, docs/PACKS.md): the federation's own modalities, anchors and validation
    # pairs; the sites read their private items from their data folders. Empty: the bundled scenario.
    pack: str = ""
    pack_fingerprint: str = ""  # the pack's digest (fedanchor pack info): every site and the server must hold this one
    n_anchors: int = 200  # public paired anchors
    n_test: int = 500  # held-out pairs, for evaluation only
    seed: int = 0  # the split into anchors, test pairs and private shards
    max_private_per_site: int | None = None  # cap on each site's private shard (null: all)
    sites: dict[str, str] = field(default_factory=dict)  # site name -> modality; empty = scenario default


@dataclass
class PrivacyConfig:
    """Optional differential privacy of what a site uploads (dp.py): clipped, Gaussian-noised cores and Gram."""

    dp: bool = False  # release each upload through the Gaussian mechanism (dp.py)
    noise_multiplier: float = 1.0  # noise std on every coordinate = noise_multiplier x the clip bound
    clip_update: float = 1.0  # L2 bound on the change of the cores, magnitudes and projector in one round
    clip_gram: float = 1.0  # L2 bound on the Gram upper triangle (a centred, unit-norm Gram has norm <= 1)
    delta: float = 1e-5  # the delta of the reported (epsilon, delta)


@dataclass
class ServerConfig:
    """What the server accepts."""

    # An update whose change of the cores and magnitudes (L2, relative to the global model it started from) exceeds
    # this many times the median change of the updates accepted in the current and previous round is rejected.
    outlier_factor: float = 10.0
    outlier_min_reference: int = 2  # accepted updates needed before the outlier check applies
    # Whatever the others sent: an update whose cores and magnitudes, or whose projector, move by more than this many
    # times the global model's own norm holds absurd (if finite) values, and is refused.
    max_change: float = 1000.0


@dataclass
class FedAnchorConfig:
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    private: PrivateConfig = field(default_factory=PrivateConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    rounds: int = 5  # federated rounds (a FLARE job's num_rounds)

    def validate(self) -> "FedAnchorConfig":
        checks = [
            (self.rounds >= 1, f"rounds={self.rounds} must be at least 1"),
            (self.adapter.rank >= 1, f"adapter.rank={self.adapter.rank} must be at least 1"),
            (self.adapter.refresh_every == 0 or self.adapter.refresh_every >= 2,
             f"adapter.refresh_every={self.adapter.refresh_every}: a refresh takes two rounds (gradients, then the "
             "augmented core); use 0 (fixed basis) or at least 2"),
            (0.0 <= self.adapter.refresh_tolerance < 1.0,
             f"adapter.refresh_tolerance={self.adapter.refresh_tolerance} must be in [0, 1), e.g. 0.1"),
            (self.adapter.rank_max >= 0, f"adapter.rank_max={self.adapter.rank_max} must be >= 0 (0: adapter.rank)"),
            (not (self.adapter.refresh_every and self.privacy.dp),
             "adapter.refresh_every > 0 sends projected gradients, which privacy.dp does not release through the "
             "Gaussian mechanism; set adapter.refresh_every=0 under differential privacy"),
            (self.adapter.basis_init in ("svd", "random"),
             f"adapter.basis_init={self.adapter.basis_init!r} is unknown; use 'svd' or 'random'"),
            (len(self.adapter.targets) > 0, "adapter.targets is empty; name at least one linear layer, e.g. 'query'"),
            (self.precision.method in ("iterate_variance", "gradient_variance", "fisher", "uniform"),
             f"precision.method={self.precision.method!r} is unknown; use 'iterate_variance', 'gradient_variance', 'fisher' or 'uniform'"),
            (self.precision.window >= 2, f"precision.window={self.precision.window} must be at least 2"),
            (self.precision.information_reading in ("received", "training"),
             f"precision.information_reading={self.precision.information_reading!r} is unknown; use 'received' or 'training'"),
            (len(set(self.precision.vouched_sites)) == len(self.precision.vouched_sites)
             and all(isinstance(s, str) and s for s in self.precision.vouched_sites),
             f"precision.vouched_sites={list(self.precision.vouched_sites)!r}: name each site once, as the job names it"),
            (not self.data.sites or set(self.precision.vouched_sites) <= set(self.data.sites),
             f"precision.vouched_sites names {sorted(set(self.precision.vouched_sites) - set(self.data.sites))}, not "
             f"sites of data.sites ({', '.join(self.data.sites)}); name the sites as data.sites does"),
            (self.precision.information_draws >= 1,
             f"precision.information_draws={self.precision.information_draws} must be at least 1"),
            (self.train.local_steps >= self.precision.window or self.precision.method == "uniform",
             f"train.local_steps={self.train.local_steps} is below precision.window={self.precision.window}; "
             "raise local_steps or lower the window"),
            (self.train.batch_size >= 2, f"train.batch_size={self.train.batch_size} must be at least 2 (contrastive views)"),
            (self.train.lr > 0, f"train.lr={self.train.lr} must be positive"),
            (self.train.autocast in ("auto", "bf16", "off"), f"train.autocast={self.train.autocast!r} is unknown; use 'auto', 'bf16' or 'off'"),
            (0.0 <= self.train.warmup_fraction <= 1.0, f"train.warmup_fraction={self.train.warmup_fraction} must be in [0, 1]"),
            (self.alignment.anchor_batch >= 4, f"alignment.anchor_batch={self.alignment.anchor_batch} must be at least 4"),
            (0.0 <= self.alignment.consensus_ema < 1.0,
             f"alignment.consensus_ema={self.alignment.consensus_ema} must be in [0, 1)"),
            (self.alignment.temperature > 0, "alignment.temperature must be positive"),
            (self.alignment.readout in ("cca", "none"), f"alignment.readout={self.alignment.readout!r} is unknown; use 'cca' or 'none'"),
            (self.alignment.readout_reg >= 0, f"alignment.readout_reg={self.alignment.readout_reg} must be positive, or 0 to choose it by anchor cross-validation"),
            (self.alignment.readout_dims >= 0, f"alignment.readout_dims={self.alignment.readout_dims} must be >= 0 (0: chosen by anchor cross-validation)"),
            (len(self.alignment.readout_blocks) > 0 and len(set(self.alignment.readout_blocks)) == len(self.alignment.readout_blocks)
             and set(self.alignment.readout_blocks) <= {"base", "codebook", "model"},
             f"alignment.readout_blocks={self.alignment.readout_blocks!r}: name 'base', 'codebook' and/or 'model', each once, "
             "e.g. ['base', 'codebook', 'model']"),
            (self.alignment.codebook_size >= 0, f"alignment.codebook_size={self.alignment.codebook_size} must be >= 0 (0: no codebook)"),
            (self.alignment.codebook_components >= 1, f"alignment.codebook_components={self.alignment.codebook_components} must be at least 1"),
            (self.alignment.codebook_temperature >= 0,
             f"alignment.codebook_temperature={self.alignment.codebook_temperature} must be positive, or 0 to choose it by anchor cross-validation"),
            (self.alignment.codebook_min_cluster >= 2,
             f"alignment.codebook_min_cluster={self.alignment.codebook_min_cluster} must be at least 2: a centroid of one item is that record"),
            (self.alignment.readout_folds >= 2, f"alignment.readout_folds={self.alignment.readout_folds} must be at least 2"),
            (self.alignment.readout_repeats >= 0, f"alignment.readout_repeats={self.alignment.readout_repeats} must be >= 0 (0: automatic)"),
            (self.alignment.readout_text_tokens >= 8, f"alignment.readout_text_tokens={self.alignment.readout_text_tokens} must be at least 8"),
            (self.server.outlier_factor > 1.0,
             f"server.outlier_factor={self.server.outlier_factor} must be above 1 (10 rejects only gross outliers; use a large value to turn the check off)"),
            (self.server.max_change > 0, f"server.max_change={self.server.max_change} must be positive"),
            (self.server.outlier_min_reference >= 1, f"server.outlier_min_reference={self.server.outlier_min_reference} must be at least 1"),
            (not self.privacy.dp or self.privacy.noise_multiplier > 0,
             f"privacy.noise_multiplier={self.privacy.noise_multiplier}: differential privacy needs noise (> 0); or set privacy.dp=false"),
            (self.privacy.clip_update > 0 and self.privacy.clip_gram > 0, "privacy.clip_update and privacy.clip_gram must be positive"),
            (0 < self.privacy.delta < 1, f"privacy.delta={self.privacy.delta} must be in (0, 1), e.g. 1e-5"),
            (self.data.n_anchors >= 4, f"data.n_anchors={self.data.n_anchors} must be at least 4"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


def config_to_dict(config: FedAnchorConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: Mapping[str, Any] | None = None) -> FedAnchorConfig:
    """Build a config from nested dicts; unknown keys fail with the valid ones listed."""
    values = dict(values or {})
    return _build(FedAnchorConfig, values, path="").validate()


def _build(cls: type, values: Mapping[str, Any], path: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {path or '<root>'!r} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(repr(path + k) for k in unknown)}; "
            f"valid keys under {path or '<root>'!r}: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else fields[name].default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, path=f"{path}{name}.")
        elif isinstance(default, tuple):
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"config key {path + name!r} is a list; got {value!r}: write e.g. {json.dumps([value])}")
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_differences(first: Mapping[str, Any], second: Mapping[str, Any], labels: tuple[str, str],
                       exclude: frozenset[tuple[str, ...]] = frozenset()) -> list[str]:
    """``section.key: <label> value, <label> value`` for every setting in which two nested config dicts differ;
    keys in ``exclude`` ((section,) or (section, key)) are left out."""
    import json

    a, b = json.loads(json.dumps(first, default=list)), json.loads(json.dumps(second, default=list))
    out = []
    for section in sorted(set(a) | set(b)):
        va, vb = a.get(section), b.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [f"{section}.{key}: {labels[0]} {va.get(key)!r}, {labels[1]} {vb.get(key)!r}"
                    for key in sorted(set(va) | set(vb)) if (section, key) not in exclude and va.get(key) != vb.get(key)]
        elif (section,) not in exclude and va != vb:
            out.append(f"{section}: {labels[0]} {va!r}, {labels[1]} {vb!r}")
    return out


def with_overrides(config: FedAnchorConfig, overrides: Mapping[str, Any]) -> FedAnchorConfig:
    """Apply dotted overrides such as {"alignment.lambda_cka": 0.0}."""
    nested = config_to_dict(config)
    for dotted, value in overrides.items():
        node = nested
        parts = dotted.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ValueError(f"override {dotted!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"override {dotted!r}: unknown key {parts[-1]!r}; valid: {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return config_from_dict(nested)
