"""Re-execute the book's notebooks in place, so their stored outputs are the baseline
that nbval compares against.

usage: python scripts/run_notebooks.py [NOTEBOOK ...]   (default: every notebook in _toc.yml)
       python scripts/run_notebooks.py --bibliography   (only book/bibliography.md)

Running it twice leaves no diff: cells are executed top to bottom in a fresh kernel and
timing metadata is not recorded. The notebook metadata is what a fresh python3 kernel
writes (with the Python version of the machine that ran it), so that JupyterLab does not
mark a chapter modified when it opens it. The first cell of each notebook, which installs derivlib when the
chapter is opened in Colab, is rewritten from the repository settings in _config.yml,
so that a fork only has to change the URL there.

It also writes book/bibliography.md from book/references.bib, as plain Markdown, so that
the references read the same in the book, the PDF and JupyterLab (which shows a MyST
`{bibliography}` directive as raw text).
"""

import os
import pathlib
import re
import sys

import nbformat
import yaml
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB_TAG = "colab-setup"


def toc_notebooks():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    entries = [toc["root"]]
    stack = list(toc.get("chapters", [])) + list(toc.get("parts", []))
    while stack:
        entry = stack.pop(0)
        if "file" in entry:
            entries.append(entry["file"])
        stack.extend(entry.get("sections", []) + entry.get("chapters", []))
    return [ROOT / f"{e}.ipynb" for e in entries if (ROOT / f"{e}.ipynb").exists()]


def colab_cell():
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    url = repo["url"].rstrip("/")
    source = (
        "# In Colab, install derivlib from the book's repository; elsewhere do nothing.\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        f'    source = "git+{url}@{repo["branch"]}"\n'
        '    %pip install --quiet "derivlib[check,book] @ {source}"'
    )
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata = {"tags": ["remove-cell", COLAB_TAG]}
    return cell


CAPTION_TAG = "figure-caption"
HIDE_INPUT = "hide-input"


def caption_cell(caption):
    """The caption of the figure above, as JupyterLab and Colab readers see it (they do
    not show `mystnb` metadata); the book, which shows the caption under the figure,
    removes this cell."""
    cell = nbformat.v4.new_markdown_cell(f"**Figure.** {caption}")
    cell.metadata = {"tags": ["remove-cell", CAPTION_TAG]}
    return cell


def kernel_metadata():
    """What a fresh python3 kernel writes into a notebook that JupyterLab opens: the
    kernelspec's display name and the kernel's language_info. Stored as it is, so that
    opening a chapter does not mark it modified."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    spec = KernelSpecManager().get_kernel_spec("python3")
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        language_info = client.kernel_info(reply=True, timeout=60)["content"][
            "language_info"
        ]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return {
        "kernelspec": {
            "display_name": spec.display_name,
            "language": spec.language,
            "name": "python3",
        },
        "language_info": language_info,
    }


def prepare(nb, metadata=None):
    """Put the Colab cell first (replacing an older one), drop volatile metadata, and
    make every form of the chapter read as the book does.

    - A cell tagged hide-input (a figure's code, the check under a folded solution) is
      also collapsed in JupyterLab (`jupyter.source_hidden`) and shown as a form in
      Colab (`cellView`), which ignore the tag.
    - A figure's caption (its `mystnb` metadata) is repeated in a Markdown cell under
      it, tagged remove-cell, since only the book shows that metadata.
    - A Markdown cell that begins with an anchor takes the anchor's name as its id
      (`cell_id`).
    """
    cells = [
        c
        for c in nb.cells
        if not {COLAB_TAG, CAPTION_TAG} & set(c.get("metadata", {}).get("tags", []))
    ]
    nb.cells = [colab_cell()]
    for cell in cells:
        cell.metadata.pop("execution", None)
        cell.pop("id", None)
        nb.cells.append(cell)
        if cell.cell_type != "code":
            continue
        hidden = HIDE_INPUT in cell.metadata.get("tags", [])
        if hidden:
            cell.metadata.setdefault("jupyter", {})["source_hidden"] = True
            cell.metadata.setdefault("colab", {})["cellView"] = "form"
        else:
            cell.metadata.get("jupyter", {}).pop("source_hidden", None)
            cell.metadata.get("colab", {}).pop("cellView", None)
        for key in ["jupyter", "colab"]:
            if cell.metadata.get(key) == {}:
                del cell.metadata[key]
        caption = cell.metadata.get("mystnb", {}).get("figure", {}).get("caption")
        if caption:
            nb.cells.append(caption_cell(caption))
    nb.metadata = kernel_metadata() if metadata is None else metadata
    nb.nbformat, nb.nbformat_minor = 4, 5
    for i, cell in enumerate(nb.cells):
        cell["id"] = cell_id(cell, i)
    return nb


LEADING_ANCHOR = re.compile(r'<a id="([A-Za-z0-9_-]{1,64})"></a>')


def cell_id(cell, i):
    """The id of the i-th cell: a Markdown cell that begins with an anchor is named after
    it, so that another chapter can link to it as `chapter.ipynb#cell-id=eq-2-4`, the one
    form of link JupyterLab follows into a notebook it has not drawn yet; the book reads
    the same link as `#eq-2-4`. Every other cell is `cell-<i>`."""
    source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
    match = LEADING_ANCHOR.match(source) if cell.cell_type == "markdown" else None
    return match.group(1) if match else f"cell-{i}"


BIBLIOGRAPHY_HEAD = """# Bibliography

The references of the note, which supplied much of its material, and those that the
chapters of Part II cite.

<!-- Written by scripts/run_notebooks.py from references.bib: add an entry there, then
run `python scripts/run_notebooks.py --bibliography`. -->

"""


def _bib_text(text):
    """BibTeX field text as Markdown: no protective braces, `--` as an en dash."""
    return re.sub(r"[{}]", "", text).replace("--", "\u2013").replace("\\&", "&").strip()


def bibliography_entry(key, entry):
    """One reference as a Markdown list item, with an anchor named by its key."""

    fields = entry.fields
    names = [
        " ".join(
            person.first_names
            + person.middle_names
            + person.prelast_names
            + person.last_names
        )
        for person in entry.persons.get("author", [])
    ]
    authors = (
        names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    )
    year = f" ({fields['year']})" if "year" in fields else ""
    title = _bib_text(fields["title"])
    book_like = entry.type in {"book", "manual"}
    parts = [
        f"{_bib_text(authors)}{year}.",
        f"*{title}*." if book_like else f"{title}.",
    ]
    if "journal" in fields:
        venue = f"*{_bib_text(fields['journal'])}*"
        if "volume" in fields:
            venue += f", {fields['volume']}" + (
                f"({fields['number']})" if "number" in fields else ""
            )
        if "pages" in fields:
            venue += f", {_bib_text(fields['pages'])}"
        parts.append(venue + ".")
    for name in ["series", "publisher", "institution", "note"]:
        if name in fields:
            parts.append(_bib_text(fields[name]) + ".")
    url = re.search(r"\\url\{([^}]*)\}", fields.get("howpublished", "")) or re.search(
        r"(\S+)", fields.get("url", "")
    )
    if url:
        parts.append(f"<{url.group(1)}>")
    return f'- <a id="{key}"></a>' + " ".join(parts)


def bibliography_markdown():
    """book/bibliography.md as written from book/references.bib, sorted by author and year."""
    from pybtex.database import parse_file

    entries = parse_file(ROOT / "book" / "references.bib").entries
    order = sorted(
        entries,
        key=lambda key: (
            entries[key].persons["author"][0].last_names[-1].lower()
            if entries[key].persons.get("author")
            else "",
            entries[key].fields.get("year", ""),
            key,
        ),
    )
    return (
        BIBLIOGRAPHY_HEAD
        + "\n".join(bibliography_entry(key, entries[key]) for key in order)
        + "\n"
    )


def write_bibliography():
    path = ROOT / "book" / "bibliography.md"
    text = bibliography_markdown()
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


def merge_streams(outputs):
    """Join consecutive writes to the same stream: how the kernel chunks them depends
    on timing, and the stored outputs must not."""
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            out.get("output_type") == "stream"
            and prev is not None
            and prev.get("output_type") == "stream"
            and prev["name"] == out["name"]
        ):
            prev["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def run(path, metadata):
    nb = prepare(nbformat.read(path, as_version=4), metadata)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=900,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    nb.metadata = metadata
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
            for out in cell.outputs:
                if out.get("output_type") == "stream" and out.get("name") == "stderr":
                    raise SystemExit(
                        f"{path.name}: a cell wrote to stderr:\n{out['text']}"
                    )
    nbformat.write(nb, path)
    print(f"executed {path.relative_to(ROOT)}")


def main(argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    write_bibliography()
    if argv == ["--bibliography"]:
        return
    paths = [pathlib.Path(a).resolve() for a in argv] or toc_notebooks()
    metadata = kernel_metadata()
    for path in paths:
        run(path, metadata)


if __name__ == "__main__":
    main(sys.argv[1:])
