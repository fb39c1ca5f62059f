"""JupyterLab's settings for reading the book, installed where JupyterLab reads a
package's defaults: `<prefix>/share/jupyter/lab/settings/overrides.d/differentials.json`.

usage: python scripts/lab_settings.py [PREFIX]   (default: this Python's sys.prefix)

Binder runs it from `postBuild`, `make` runs it when it creates .venv, and the test of
the chapters in JupyterLab (tests/test_jupyterlab.py) checks that it is in effect.

- Windowing: by default JupyterLab 4 lays out the cells it has not shown yet at an
  estimated height. A link to an equation further down a chapter then scrolls to where the
  equation would be by that estimate, and lands a few lines past it once the cells above
  take their real heights (80 px past (3.9a) of Chapter 3, the equation just above the
  view). "defer" draws every cell, in the background once the first screen is shown, so
  that once the chapter has finished drawing, a link lands on its equation.

A setting a reader changes in JupyterLab's Settings Editor still wins over these.
"""

import json
import pathlib
import sys

SETTINGS = {
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "defer"},
}


def overrides_file(prefix=sys.prefix):
    return (
        pathlib.Path(prefix)
        / "share"
        / "jupyter"
        / "lab"
        / "settings"
        / "overrides.d"
        / "differentials.json"
    )


def install(prefix=sys.prefix):
    path = overrides_file(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(SETTINGS, indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(f"JupyterLab settings for the book: {install(*sys.argv[1:2])}")
