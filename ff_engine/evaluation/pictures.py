"""Pictures of frames: a labelled grid of [3, h, w] images in [-1, 1] (filmstrips, probe pictures)."""

from __future__ import annotations

from pathlib import Path


def image_grid(cells, row_labels, col_titles, title, png, figsize):
    """Save a grid of [3, h, w] images in [-1, 1] (``cells[row][col]``), rows labelled on the left, columns
    titled on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cells), len(cells[0]), figsize=figsize, squeeze=False)
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            ax = axes[r, c]
            ax.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(col_titles[c], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
