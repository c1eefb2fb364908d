"""Per-epoch training metrics as JSON lines, CSV and a PNG plot, rewritten atomically."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from captioner.files import atomic_write

LOSS_CURVES = (("train_loss", "train loss (xent + reg)"), ("reward", "SCST reward"))
SCORE_CURVES = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")


class MetricsLog:
    """metrics.jsonl, metrics.csv and metrics.png in a run folder (rank 0 writes them)."""

    def __init__(self, folder: Path):
        self.jsonl, self.csv = folder / "metrics.jsonl", folder / "metrics.csv"
        self.png = folder / "metrics.png"

    def rows(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, row: dict[str, Any]) -> None:
        """Add an epoch's row; a resumed run that redoes an epoch replaces that epoch's row."""
        rows = [r for r in self.rows() if (r["stage"], r["epoch"]) != (row["stage"], row["epoch"])]
        rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.jsonl, lambda tmp: Path(tmp).write_text(text))
        keys = list(dict.fromkeys(k for r in rows for k in r))

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.csv, write_csv)
        self._plot(rows)

    def _plot(self, rows: list[dict[str, Any]]) -> None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), layout="constrained")
        loss_ax, score_ax = fig.subplots(1, 2)
        for key, label in LOSS_CURVES:
            _curve(loss_ax, rows, key, label)
        for key in SCORE_CURVES:
            _curve(score_ax, rows, key, key)
        loss_ax.set_xlabel("epoch")
        loss_ax.legend()
        score_ax.set_xlabel("epoch")
        score_ax.set_title("validation (beam search)")
        if score_ax.lines:
            score_ax.legend()
        atomic_write(self.png, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def _curve(ax, rows: list[dict[str, Any]], key: str, label: str) -> None:
    points = [(i, r[key]) for i, r in enumerate(rows, start=1) if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
