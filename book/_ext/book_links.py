"""Links from one chapter to an equation of another, in the form every reader can
follow.

JupyterLab follows `02_vector_functions.ipynb#eq-2-4` to the top of the notebook: it
looks the anchor up among the cells it has drawn, and right after opening a notebook
it has drawn only the first few. What it does look up in the notebook itself is a
cell id, `02_vector_functions.ipynb#cell-id=eq-2-4`. So a link to another chapter
names the cell that begins with the anchor, and that cell is named after the anchor
(scripts/run_notebooks.py names it). The HTML book and the PDF have no cells, only
the anchor: this extension turns `#cell-id=eq-2-4` back into `#eq-2-4` as each page
is read, before MyST resolves the link, for every builder.

tests/test_prose.py checks that every link into another notebook has this form and
that its cell begins with its anchor."""

from sphinx import addnodes

CELL_ID = "cell-id="


def anchor_of(fragment):
    """The anchor a link fragment stands for: `cell-id=eq-2-4` -> `eq-2-4`."""
    return (
        fragment[len(CELL_ID) :]
        if fragment and fragment.startswith(CELL_ID)
        else fragment
    )


def cell_links_to_anchors(app, doctree):
    for node in doctree.findall(addnodes.pending_xref):
        if node.get("reftargetid"):
            node["reftargetid"] = anchor_of(node["reftargetid"])


def setup(app):
    app.connect("doctree-read", cell_links_to_anchors)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
