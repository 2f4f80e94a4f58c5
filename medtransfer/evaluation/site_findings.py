"""What ``site_report`` found, as ``sites.json`` and as the text the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.evaluation.site_labels import PREVALENCE_DIFFERENCE, PREVALENCE_P

SITES_FILE = "sites.json"
EMBEDDING_FILE = "sites_embedding.png"
INTENSITY_FILE = "sites_intensity.png"


@dataclass
class SiteReport:
    """What ``site_report`` found; ``to_json()`` is ``sites.json``."""

    sites: list[str]
    counts: dict[str, dict[str, int]]
    intensity: dict[str, dict[str, Any]]
    tags: dict[str, dict[str, dict[str, int]]]
    prevalence: dict[str, dict[str, float]]
    prevalence_tests: list[dict[str, Any]]
    separability: dict[str, Any]
    warnings: list[str]
    out_dir: Path | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # [n, 2] PCA coordinates
    embedding_sites: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "counts": self.counts,
            "intensity": self.intensity,
            "dicom_tags": self.tags,
            "prevalence": self.prevalence,
            "prevalence_tests": self.prevalence_tests,
            "prevalence_rule": (
                f"warn when a class's prevalence differs between sites with chi-square "
                f"p < {PREVALENCE_P} and an absolute difference > {PREVALENCE_DIFFERENCE}"
            ),
            "separability": self.separability,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        total = sum(c["total"] for c in self.counts.values())
        lines = [f"{len(self.sites)} site(s), {total} images (train/val/test):"]
        lines += self._site_lines() + self._tag_lines()
        for test in self.prevalence_tests:
            lines.append(
                f"  prevalence of {test['class']}: max difference {test['max_difference']:.3f}, "
                f"chi-square p = {test['p_value']:.2g}"
            )
        lines += self._separability_lines()
        lines += [f"WARNING: {w}" for w in self.warnings]
        if self.out_dir is not None:
            lines.append(
                f"wrote {self.out_dir / SITES_FILE}, {EMBEDDING_FILE} and {INTENSITY_FILE}"
            )
        return "\n".join(lines)

    def _site_lines(self) -> list[str]:
        """Per site: images per split, the pixels' summary and the label prevalence."""
        width = max(len(s) for s in self.sites)
        lines = []
        for site in self.sites:
            c, i = self.counts[site], self.intensity.get(site, {})
            prevalence = ", ".join(f"{k} {v:.2f}" for k, v in self.prevalence[site].items())
            pixels = (
                f"intensity mean {i['mean']:.3f} sd {i['sd']:.3f} "
                f"[p1 {i['p1']:.3f}, p50 {i['p50']:.3f}, p99 {i['p99']:.3f}]"
                if i
                else "no pixels read"
            )
            lines.append(
                f"  {site:<{width}}  {c['total']:6d} ({c['train']}/{c['val']}/{c['test']})  "
                f"{pixels}  prevalence: {prevalence}"
            )
        return lines

    def _tag_lines(self) -> list[str]:
        lines = []
        for site, tags in self.tags.items():
            shown = "; ".join(
                f"{tag} " + ", ".join(f"{v or '-'} ({n})" for v, n in values.items())
                for tag, values in tags.items()
            )
            if shown:
                lines.append(f"  DICOM {site}: {shown}")
        return lines

    def _separability_lines(self) -> list[str]:
        s = self.separability
        if s.get("auroc") is None:
            return [f"  site separability: not computed ({s.get('reason')})"]
        lines = [
            f"  site separability: domain-classifier AUROC {s['auroc']:.3f} "
            f"({s['folds']}-fold CV, {s['n_images']} images; features: {s['features']})"
        ]
        for name, value in s.get("source_vs_target", {}).items():
            lines.append(f"    {name}: AUROC {value:.3f}")
        return lines
