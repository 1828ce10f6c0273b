"""FLARE's TensorBoard receiver under fedanchor's name, so that a server allow-list of ``fedanchor.`` admits it.

It writes the analytics events the aggregator fires each round (``tracking.py``)
into ``<server run dir>/tensorboard``; it imports tensorboard, which the aggregator
itself never needs.
"""
from __future__ import annotations

from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

TB_FOLDER = "tensorboard"


class FedAnchorTensorBoard(TBAnalyticsReceiver):
    def __init__(self, tb_folder: str = TB_FOLDER):
        """
        Args:
            tb_folder: folder under the server's run folder for the TensorBoard event files.
        """
        super().__init__(tb_folder=tb_folder)
