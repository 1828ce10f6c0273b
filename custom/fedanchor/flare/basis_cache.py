"""The server's task-data filter that leaves the bases U and V out of a site's train task when the site holds them.

U and V are most of the global state with MiniLM (``fedanchor bench`` prints the bytes down
per site and round, with and without them) and change only at a basis refresh (adapters/refresh.py). Each site reports in its
update the digest of the bases it trained on; when the next round's state runs on
the same bases, this filter sends that site the state without them, naming their
digest (``FederatedServer.state_for``). A site keeps the bases it holds beside its
delta_site (the executor's state folder), so a restart does not lose them; a site
that does not hold them anyway fails that round with the reason, and the server
sends them whole next round.

FLARE applies server task-data filters per site, with the site as the peer, just
before the task leaves: config_fed_server.json's ``task_data_filters`` for "train".
"""
from __future__ import annotations

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from .server_state import get_server_component
from .shareable import dxo_to_state, state_to_dxo


class BasisCacheFilter(Filter):
    def __init__(self, server_id: str = "fedanchor_server"):
        """
        Args:
            server_id: id of the FedAnchorServerComponent that knows which bases each site holds.
        """
        super().__init__()
        self.server_id = server_id

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else None
        if not site:
            return shareable
        try:
            component = get_server_component(fl_ctx, self.server_id)
            state = dxo_to_state(from_shareable(shareable))
            with component.lock:
                sent = component.server(fl_ctx).state_for(site, state)
            if sent is state:
                return shareable
            out = Shareable(shareable)  # FLARE's task headers (round, task name) travel on
            out[ReservedHeaderKey.HEADERS] = dict(shareable.get(ReservedHeaderKey.HEADERS, {}))
            state_to_dxo(sent).update_shareable(out)
        except Exception as err:  # the whole state is always a valid task: never fail a site's round over a saving
            self.log_warning(fl_ctx, f"sending {site} the whole state: could not leave its bases out ({err})")
            return shareable
        self.log_debug(fl_ctx, f"{site} holds bases {str(sent.basis_digest())[:12]}: U and V left out of round {state.round}")
        return out
