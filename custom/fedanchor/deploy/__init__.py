"""Provisioned FLARE deployments of fedanchor: startup kits, site files, processes, the admin side.

- ``kits``: run ``nvflare provision``, find the kits, install a participant's local/ files
  (provision/site/*.json at a hospital, provision/server/*.json at the server).
- ``distributed``: FLARE's distributed provisioning (``nvflare cert`` / ``nvflare package``): each participant
  makes its own key; the project admin only signs (docs/it/provisioning.md).
- ``processes``: start a kit's FLARE process in its own session, find and stop exactly the processes a
  deployment started (they carry a marker in their environment).
- ``admin_api``: the FLARE API from an admin kit: submit a job folder, watch it, download and read its result.
- ``loopback``: the whole federation on 127.0.0.1 in a temporary folder (``make trial``, tests/deployment).
- ``trial``: ``make trial``: provision, start, submit as the lead, wait, download, print, shut down.

Nothing here imports torch; only reading a downloaded model does.
"""
