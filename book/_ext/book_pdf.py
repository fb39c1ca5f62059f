"""The whole book as one PDF: what the LaTeX builder needs, and the HTML book's link
to it.

The HTML book links to the PDF from every page's download menu ("Book .pdf"), at
`book_pdf_url`: by default `differentials.pdf` at the root of the published site,
which is `html_baseurl` if set, or else the GitHub Pages site of the repository in
_config.yml. The publish workflow copies `make pdf`'s PDF there.

What the PDF needs from the notebooks' Markdown, for Sphinx's LaTeX builder only:

The notebooks are written for every reader at once: MathJax in the HTML book,
JupyterLab and Colab, KaTeX in VS Code. So they number equations with `\\tag{2.13}`
inside `$$`, mark them with an HTML anchor `<a id="eq-2-13"></a>`, and fold solutions
in HTML `<details>`. The HTML builders use all of that as it is; this extension
rewrites it in the document tree when, and only when, the builder is LaTeX:

- Display math with a `\\tag`: the LaTeX writer wraps every display in `equation*`
  and `split`, where amsmath forbids `\\tag` ("\\tag not allowed here"). The tag
  moves out of `split` to the end of `equation*`, where it is allowed, so the PDF
  shows the note's number exactly as the HTML does.
- `<a id="..."></a>` (block or inline): a LaTeX label at that place, so that every
  link to it, within a chapter (`#eq-2-13`) or from another one
  (`02_vector_functions.ipynb#eq-2-13`), which MyST turns into `\\hyperref` to
  `<document>:<id>`, lands there in the PDF.
- `<summary>Solution</summary>`: the word in bold, so that an unfolded solution in
  the PDF still says what it is.

Every other raw HTML stays what the LaTeX writer makes of it: nothing."""

import re
from urllib.parse import urlsplit

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform

TAG = re.compile(r"\\tag\{((?:[^{}]|\{[^{}]*\})*)\}")
# One or more anchors: a block of them, or one opening tag of an inline anchor (MyST
# parses a line `<a id="eq-2-13"></a>` as a paragraph of two inline tags).
ANCHORS = re.compile(r'^(?:\s*<a\s+(?:id|name)="[^"]+"\s*>\s*(?:</a>\s*)?)+$')
ANCHOR_ID = re.compile(r'<a\s+(?:id|name)="([^"]+)"')
SUMMARY = re.compile(r"<summary>(.*?)</summary>", re.DOTALL)


def latex_display(text):
    """The LaTeX of one display whose TeX carries a single `\\tag{...}`, or None."""
    tags = TAG.findall(text)
    if len(tags) != 1:
        return None
    body = TAG.sub("", text)
    # split accepts no blank line (Sphinx would otherwise make one line per paragraph).
    body = "\n".join(line for line in body.strip().splitlines() if line.strip())
    return (
        "\\begin{equation*}\n\\begin{split}"
        + body
        + "\\end{split}\\tag{"
        + tags[0]
        + "}\n\\end{equation*}"
    )


def document_of(node):
    """The document (one chapter) that holds `node` in the LaTeX builder's single tree.

    Sphinx inlines each chapter under a start_of_file node by handing it the chapter's
    children, whose `parent` still points to the chapter's own document node: climbing
    the parents therefore ends there, at a node whose `source` names the chapter.
    """
    while node.parent is not None:
        node = node.parent
    return node


def ids_of_document(node, cache):
    """The ids of the document that holds `node`."""
    top = document_of(node)
    if id(top) not in cache:
        cache[id(top)] = {
            i for element in top.findall(nodes.Element) for i in element.get("ids", [])
        }
    return cache[id(top)]


def latex_label(docname, anchor):
    """A raw LaTeX label `docname:anchor`, the name MyST's links to the anchor refer to.

    A raw label rather than a docutils target: Sphinx's LaTeX writer drops a target that
    comes right before a section (it expects the section to carry the label), and the
    root page, laid out as front matter, labels none of its sections.
    """
    name = f"{docname}:{anchor}"
    return nodes.raw(
        "", "\\phantomsection\\label{\\detokenize{" + name + "}}", format="latex"
    )


class LatexBook(SphinxPostTransform):
    """Rewrite tagged displays, HTML anchors and solution summaries for LaTeX."""

    default_priority = 900
    builders = ("latex",)

    def run(self, **kwargs):
        for node in list(self.document.findall(nodes.math_block)):
            if node.get("nowrap"):
                continue
            latex = latex_display(node.astext())
            if latex is not None:
                node["nowrap"] = True
                node.children = [nodes.Text(latex)]
        cache = {}
        for node in list(self.document.findall(nodes.raw)):
            if "html" not in node.get("format", "").split():
                continue
            text = node.astext()
            if ANCHORS.match(text):
                # An anchor named like the heading after it (`<a id="chapter-2"></a>`
                # before `## Chapter 2`, for JupyterLab) adds no second label.
                taken = ids_of_document(node, cache)
                docname = self.env.path2doc(document_of(node)["source"])
                # The root page's sections carry no labels in the PDF, so there every
                # anchor gets one.
                root = docname == self.config.root_doc
                node.replace_self(
                    [
                        latex_label(docname, i)
                        for i in ANCHOR_ID.findall(text)
                        if root or i not in taken
                    ]
                )
            elif text.strip() == "</a>":
                node.parent.remove(node)
            elif SUMMARY.search(text):
                title = re.sub(r"<[^>]+>", "", SUMMARY.search(text).group(1)).strip()
                node.replace_self(nodes.paragraph("", "", nodes.strong(title, title)))


PDF_NAME = "differentials.pdf"


def book_pdf_url(app):
    """Where the published PDF is: `book_pdf_url`, or the site root's
    differentials.pdf."""
    if app.config.book_pdf_url:
        return app.config.book_pdf_url
    site = app.config.html_baseurl
    if not site:
        repository = app.config.html_theme_options.get("repository_url", "")
        parts = urlsplit(repository)
        owner, _, name = parts.path.strip("/").partition("/")
        if parts.netloc != "github.com" or not name:
            return None
        site = f"https://{owner}.github.io/{name}/"
    return site.rstrip("/") + "/" + PDF_NAME


def add_pdf_button(app, pagename, templatename, context, doctree):
    """Add "Book .pdf" to the download menu of the page (sphinx-book-theme's header)."""
    url = book_pdf_url(app)
    for group in context.get("header_buttons", []):
        if url and group.get("label") == "download-buttons":
            group["buttons"].append(
                {
                    "type": "link",
                    "url": url,
                    "text": "Book .pdf",
                    "tooltip": "Download the whole book as one PDF",
                    "icon": "fas fa-book",
                    "label": "download-book-pdf-button",
                }
            )


def setup(app):
    app.add_config_value("book_pdf_url", "", "html")
    app.add_post_transform(LatexBook)
    # After sphinx-book-theme has made the header buttons (priority 501).
    app.connect("html-page-context", add_pdf_button, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
