"""fedanchor on NVIDIA FLARE: thin components over ``fedanchor.federation`` (DESIGN.md section 6).

Referenced by class path from plain FLARE job folders (jobs/<scenario>/); none of
them holds any maths:

- ``fedanchor.flare.executor.FedAnchorExecutor``: a site's train / validate / submit_model.
- ``fedanchor.flare.server_state.FedAnchorServerComponent``: the job's one FederatedServer.
- ``fedanchor.flare.persistor.FedAnchorPersistor``: safetensors checkpoints, atomic, resumable.
- ``fedanchor.flare.shareable.FedAnchorShareableGenerator``: global state <-> shareable.
- ``fedanchor.flare.aggregator.FedAnchorAggregator``: accept / merge / evaluate / summary JSON.
- ``fedanchor.flare.jobs``: job folder helpers and ``export_byoc``.

Submodules import nvflare; this package itself does not, so ``fedanchor.flare.jobs``
and the site-config helpers stay cheap to import.
"""
