"""The xray scenario: IU chest X-ray reports paired with their manual MeSH finding codes.

Read straight from torchxrayvision's bundled data/NLMCXR_reports.tgz (3955 OpenI XML
reports) with tarfile + xml.etree; nothing is extracted to disk and the package is
never imported.
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET

import numpy as np

from .bundled import bundled_file
from .scenario import ModalityData, ModalitySpec, PairedScenario

_PURPOSE = "the xray scenario reads its bundled reports"
_ARCHIVE = "data/NLMCXR_reports.tgz"
_LICENCES = {
    "http://creativecommons.org/licenses/by-nc-nd/4.0/": "CC BY-NC-ND 4.0",
}


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _code(major: str) -> str:
    # "Cardiomegaly/mild" -> "cardiomegaly"; internal whitespace is collapsed because
    # the corpus spells one heading both "Subcutaneous Emphysema" and "Subcutaneous  Emphysema".
    return _collapse(major.split("/", 1)[0]).lower()


def _report_number(sample_id: str) -> int:
    digits = re.sub(r"\D", "", sample_id)
    return int(digits) if digits else -1


def _parse(xml_bytes: bytes) -> tuple[str, str, frozenset[str], str]:
    root = ET.fromstring(xml_bytes)
    uid = root.find("uId")
    sample_id = uid.get("id", "") if uid is not None else ""
    sections = {a.get("Label"): a.text or "" for a in root.iter("AbstractText")}
    # The impression first: it summarises what the MeSH codes index, and survives truncation to a few dozen tokens.
    text = _collapse(f"{sections.get('IMPRESSION', '')} {sections.get('FINDINGS', '')}")
    codes = frozenset(c for m in root.iter("major") if m.text and (c := _code(m.text)))
    licence_url = (root.findtext("licenseURL") or "").strip()
    return sample_id, text, codes, licence_url


def load_xray() -> PairedScenario:
    """Reports with non-empty FINDINGS/IMPRESSION text and at least one code (3927 of 3955)."""
    path = bundled_file("torchxrayvision", _ARCHIVE, _PURPOSE)
    records: list[tuple[str, str, frozenset[str]]] = []
    licence_urls: set[str] = set()
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            sample_id, text, codes, url = _parse(handle.read())
            if text and codes and sample_id:
                records.append((sample_id, text, codes))
                licence_urls.add(url)
    if not records:
        raise ValueError(f"{path} held no usable reports; reinstall torchxrayvision==1.5.7")
    # Tar order is lexicographic ("CXR1", "CXR10", ...); numeric order is stable and readable.
    records.sort(key=lambda r: (_report_number(r[0]), r[0]))

    vocab = tuple(sorted(set().union(*(r[2] for r in records))))
    code_id = {c: i for i, c in enumerate(vocab)}
    code_items = [tuple(sorted(code_id[c] for c in r[2])) for r in records]
    semantic_names = sorted({"|".join(sorted(r[2])) for r in records})
    semantic_id = {s: i for i, s in enumerate(semantic_names)}
    labels = np.array([semantic_id["|".join(sorted(r[2]))] for r in records], dtype=np.int64)
    sample_ids = [r[0] for r in records]

    report = ModalitySpec("report", "text")
    findings = ModalitySpec("findings", "codes", vocab=vocab)
    licences = sorted(_LICENCES.get(u, u or "unstated") for u in licence_urls)
    return PairedScenario(
        name="xray",
        modalities={"report": report, "findings": findings},
        data={
            "report": ModalityData(report, [r[1] for r in records], list(sample_ids), labels.copy()),
            "findings": ModalityData(findings, code_items, list(sample_ids), labels.copy()),
        },
        semantic_names=semantic_names,
        licence=(
            f"IU chest X-ray reports (OpenI, Indiana University), {', '.join(licences)} "
            "(read from the installed torchxrayvision package)"
        ),
    )
