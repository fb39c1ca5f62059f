# Two commands do all the set-up on a fresh machine:
#   make book   builds the HTML book into _build/html
#   make test   runs derivlib's tests, every notebook under nbval, the book build, and
#               every page of the built book in headless Chromium
#   make pdf    builds the whole book as one PDF, _build/latex/differentials.pdf
#   make test-pdf  builds it and tests its text (tests/test_pdf.py)
#   make test-lab  opens every chapter in JupyterLab, in headless Chromium
#               (tests/test_jupyterlab.py)
#   make lab    opens the chapters in JupyterLab, set up as Binder sets it up
# Both create .venv on first use and install requirements.txt into it; `make test` also
# installs Debian's chromium (apt-get) and the npm packages of package.json (MathJax);
# `make pdf` installs Debian's TeX Live (xelatex, latexmk), fonts and pdftotext.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHROMIUM := /usr/bin/chromium
NODE_MODULES := node_modules/.package-lock.json
# Installs Debian packages, or says why it cannot.
APT_INSTALL = command -v apt-get >/dev/null || { echo "make: the browser test needs Debian's $(1), and there is no apt-get here to install it" >&2; exit 1; }; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1)
export JAX_PLATFORMS := cpu
export PYTHONHASHSEED := 0
# JAX keeps what it compiles in .cache/jax, so a warm run skips most compilation (the
# tests compile many small shapes). The cache is keyed by JAX's version and the
# compiled program, so a stale entry is never used; `make clean` empties it.
export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS := 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES := 0
# Numba keeps the compiled loops of the PnP rules (derivlib/_pnp_kernels.py) there too
export NUMBA_CACHE_DIR := $(CURDIR)/.cache/numba
# Test processes, one per core (pytest-xdist). `--dist loadfile` runs each file in one
# process: all cells of a notebook share one kernel, in order. (pytest 9 derives node ids
# in a way that xdist's `loadgroup` cannot extend, so finer groups are not available.)
WORKERS ?= auto
# Each worker's BLAS runs on one thread: with one worker per core, BLAS threads of their
# own only wait for each other (Chapter 4's scikit-learn fits took 16 s instead of 5).
# Workers take files in the order given: the longest first, so that the last files to
# run are short ones and both workers finish together (pytest drops the repeats). The
# two browser files are not the first two: both wait for the one build of the book, and
# a second worker that starts with a notebook is not idle while the first builds it.
SLOWEST_FIRST := tests/test_browser.py book/04_reverse_mode.ipynb tests/test_browser_chapters.py \
	tests/test_losses.py book/B_differentials.ipynb book/06_camera_geometry.ipynb \
	book/03_loss_functions.ipynb

.PHONY: book test browser-deps notebooks benchmark clean pdf pdf-deps test-pdf test-lab lab

$(STAMP): requirements.txt pyproject.toml scripts/lab_settings.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python scripts/lab_settings.py
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going --all

test: $(STAMP) browser-deps
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile -m "not pdf and not jupyterlab" --nbval --nbval-current-env $(SLOWEST_FIRST) tests book

# What tests/test_browser.py needs besides .venv: a browser, and MathJax to serve it.
browser-deps: $(CHROMIUM) $(NODE_MODULES)

$(CHROMIUM):
	$(call APT_INSTALL,chromium)

$(NODE_MODULES): package.json package-lock.json
	command -v npm >/dev/null || { $(call APT_INSTALL,npm); }
	npm ci --no-audit --no-fund

# The PDF: Sphinx's LaTeX builder, xelatex through latexmk. The LaTeX folder is rebuilt
# from scratch: latexmk would otherwise take a stale run for an up-to-date one.
PDF := _build/latex/differentials.pdf
TEX_PACKAGES := texlive-xetex texlive-latex-extra texlive-fonts-recommended texlive-fonts-extra \
	latexmk fonts-freefont-otf poppler-utils

pdf: $(STAMP) pdf-deps
	rm -rf _build/latex
	$(BIN)/jupyter-book build . --builder pdflatex --all -W -n --keep-going
	test -s $(PDF)

test-pdf: pdf
	$(BIN)/python -m pytest -m pdf tests/test_pdf.py

# JupyterLab (pinned in requirements.txt, as Binder installs it) on 127.0.0.1.
test-lab: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -m jupyterlab tests/test_jupyterlab.py

# The chapters in JupyterLab, with the settings Binder uses (scripts/lab_settings.py).
lab: $(STAMP)
	$(BIN)/jupyter lab book

# xelatex with the packages Sphinx and Jupyter Book load (bbm.sty is in fonts-extra,
# pzdr.tfm in fonts-recommended), Sphinx's default fonts (FreeFont), and pdftotext.
pdf-deps:
	@command -v xelatex >/dev/null && command -v latexmk >/dev/null && command -v pdftotext >/dev/null \
		&& kpsewhich bbm.sty pzdr.tfm fncychap.sty >/dev/null && test -n "$$(fc-list FreeSerif)" \
		|| { command -v apt-get >/dev/null || { echo "make: the PDF needs Debian's $(TEX_PACKAGES), and there is no apt-get here to install them" >&2; exit 1; }; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(TEX_PACKAGES); }

notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py

# Every script at the libraries' default threads and at one thread (benchmarks/run.py).
benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf _build .cache
