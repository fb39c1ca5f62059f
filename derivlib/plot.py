"""Figure helpers shared by the chapters.

Figures have an opaque white background so that they stay legible when the book is
read in a dark theme.
"""

import matplotlib.pyplot as plt
import numpy as np

STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 11,
    "figure.dpi": 100,
    "legend.frameon": False,
}


def use_book_style():
    """Apply the book's matplotlib style (call once, in a chapter's imports cell)."""
    plt.rcParams.update(STYLE)


def matrix_pattern(ax, M, block=None, title=None, cmap="RdBu_r"):
    """Show the entries of M as colours, zero as white, with block boundaries every
    `block` = (rows, cols) entries. Returns the image."""
    M = np.asarray(M, dtype=np.float64)
    bound = np.abs(M).max() or 1.0
    image = ax.imshow(M, cmap=cmap, vmin=-bound, vmax=bound, interpolation="nearest")
    if block is not None:
        rows, cols = block
        for r in range(rows, M.shape[0], rows):
            ax.axhline(r - 0.5, color="0.3", lw=0.8)
        for c in range(cols, M.shape[1], cols):
            ax.axvline(c - 0.5, color="0.3", lw=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title)
    return image


def partition_pattern(ax, M, row_sizes, col_sizes, title=None, cmap="RdBu_r"):
    """Like `matrix_pattern`, with block boundaries after the given row and column
    block sizes (a partitioned matrix, as in the Khatri-Rao product of Appendix A).
    Returns the image."""
    image = matrix_pattern(ax, M, block=None, title=title, cmap=cmap)
    for r in np.cumsum(row_sizes)[:-1]:
        ax.axhline(r - 0.5, color="0.3", lw=0.8)
    for c in np.cumsum(col_sizes)[:-1]:
        ax.axvline(c - 0.5, color="0.3", lw=0.8)
    return image


def permutation_pattern(ax, P, title=None):
    """Show a permutation (or any 0/1) matrix as black dots on white, with a light
    grid every entry. Returns the image."""
    P = np.asarray(P, dtype=np.float64)
    image = ax.imshow(P, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, P.shape[1], 1), minor=True)
    ax.set_yticks(np.arange(-0.5, P.shape[0], 1), minor=True)
    ax.grid(which="minor", color="0.85", lw=0.5)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    if title:
        ax.set_title(title)
    return image
