"""Writing figures to disk: interactive HTML that opens offline, and static images (PNG, SVG, PDF ...).

Static export, offline
----------------------
Plotly renders static images with a headless browser through ``kaleido``. kaleido 1.x drives a system
Chrome/Chromium and, when there is none, downloads one from Google -- impossible on an offline machine. The
workbench therefore pins ``kaleido==0.2.1`` (extras ``test`` and ``figures``): that wheel bundles its own
headless Chromium, fonts (Lato) and MathJax, ~80 MB download / ~220 MB installed, no network and no system
packages. Plotly 7 no longer drives kaleido 0.2 itself (``fig.to_image`` asks for kaleido >= 1), so
:func:`to_image` calls kaleido 0.2's ``PlotlyScope`` directly and hands it the plotly.js bundled with the
installed ``plotly`` package (kaleido 0.2 would otherwise fetch plotly.js from a CDN). One kaleido process is
started on first use (~2 s) and reused for the rest of the Python session (~0.1-0.3 s per figure).

When kaleido >= 1 is installed instead, images go through ``fig.to_image``; that works only where a
Chrome/Chromium is installed (e.g. Debian ``apt-get install chromium``). Anything else raises
:class:`ImageExportError` saying how to fix it.

HTML
----
By default (``include_plotlyjs="directory"``) each HTML file loads ``plotly.min.js`` from its own folder, and
:func:`save_figure` writes that file (the plotly.js of the installed ``plotly``, ~4.8 MB) once per folder: a
folder of figures opens offline and carries one copy of plotly.js, not one per figure. Pass
``include_plotlyjs=True`` for single self-contained files (each ~4.8 MB larger), or ``"cdn"`` for small files
that need the network.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import plotly
import plotly.graph_objects as go

from ..errors import WorkbenchError

#: Formats :func:`save_figure` can write: ``html`` plus kaleido's static formats.
IMAGE_FORMATS = ("png", "svg", "pdf", "jpeg", "jpg", "webp")
FORMATS = ("html",) + IMAGE_FORMATS
DEFAULT_WIDTH, DEFAULT_HEIGHT = 800, 500

_HOW_TO_FIX = ('install the pinned exporter, which bundles its own headless Chromium and works offline: '
               '`pip install "kaleido==0.2.1"` (or `pip install -e ".[figures]"`); '
               'with kaleido>=1 a Chrome/Chromium must be installed (e.g. `apt-get install chromium`)')


class ImageExportError(RuntimeError):
    """Static image export is not possible in this environment (the message says how to fix it)."""


def kaleido_version() -> str | None:
    """The installed kaleido version, or ``None`` when kaleido is not installed."""
    try:
        return metadata.version("kaleido")
    except metadata.PackageNotFoundError:
        return None


def image_engine() -> str:
    """Which static-export route this environment uses: ``"kaleido-0.2"`` (bundled Chromium, offline) or
    ``"kaleido>=1"`` (needs a system Chrome). Raises :class:`ImageExportError` when kaleido is missing."""
    try:
        import kaleido  # noqa: F401
    except ImportError as e:
        raise ImageExportError(f"static image export needs kaleido, which is not installed; {_HOW_TO_FIX}") from e
    try:  # kaleido 0.2.x: the scope API and a bundled Chromium (kaleido 1.x has neither)
        from kaleido.scopes.plotly import PlotlyScope  # noqa: F401
    except ImportError:
        return "kaleido>=1"
    return "kaleido-0.2"


def plotlyjs_path() -> Path:
    """The ``plotly.min.js`` bundled with the installed plotly package."""
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise ImageExportError(f"the plotly package has no bundled plotly.js at {str(path)!r}; reinstall plotly")
    return path


@functools.lru_cache(maxsize=4)
def _kaleido02_scope(plotlyjs: str):
    """One kaleido 0.2 ``PlotlyScope`` (a persistent headless-Chromium process) per plotly.js bundle."""
    from kaleido.scopes.plotly import PlotlyScope

    return PlotlyScope(plotlyjs=plotlyjs)


def _check_figure(fig) -> None:
    if not isinstance(fig, go.Figure):
        raise WorkbenchError(f"expected a plotly go.Figure, got {type(fig).__name__}")


def _check_format(fmt: str, allowed: Sequence[str]) -> str:
    f = str(fmt).lower().lstrip(".")
    if f not in allowed:
        raise WorkbenchError(f"unknown figure format {fmt!r}; expected one of {list(allowed)}")
    return "jpeg" if f == "jpg" else f


def to_image(fig: go.Figure, format: str = "png", width: int | None = None, height: int | None = None,
             scale: float = 2.0) -> bytes:
    """Render ``fig`` to image bytes offline (see the module docstring for the route).

    Args:
        format: ``png``, ``svg``, ``pdf``, ``jpeg`` or ``webp``.
        width, height: layout pixels (default: the figure's own layout size, else 800 x 500).
        scale: pixel density (2 = crisp PNGs for papers).

    Raises:
        ImageExportError: no working exporter (kaleido missing, or kaleido>=1 without Chrome) or a render failure.
    """
    _check_figure(fig)
    fmt = _check_format(format, IMAGE_FORMATS)
    width = width or fig.layout.width or fig.layout.template.layout.width or DEFAULT_WIDTH
    height = height or fig.layout.height or fig.layout.template.layout.height or DEFAULT_HEIGHT
    engine = image_engine()
    if engine == "kaleido-0.2":
        scope = _kaleido02_scope(str(plotlyjs_path()))
        try:
            with warnings.catch_warnings():  # kaleido 0.2 calls the deprecated Thread.setDaemon on start-up
                warnings.filterwarnings("ignore", message=".*setDaemon", category=DeprecationWarning)
                return scope.transform(fig, format=fmt, width=int(width), height=int(height), scale=scale)
        except ValueError as e:  # kaleido 0.2 reports render and start-up failures as ValueError
            raise ImageExportError(f"kaleido {kaleido_version()} could not render the figure as {fmt}: {e}") from e
    try:
        return fig.to_image(format=fmt, width=int(width), height=int(height), scale=scale)
    except Exception as e:  # noqa: BLE001 -- kaleido 1.x raises several types when Chrome is missing
        msg = str(e)
        if "chrome" in msg.lower() or "browser" in msg.lower():
            raise ImageExportError(f"kaleido {kaleido_version()} found no Chrome/Chromium (it would download one "
                                   f"from Google, which needs the network); {_HOW_TO_FIX}") from e
        raise ImageExportError(f"kaleido {kaleido_version()} could not render the figure as {fmt}: {msg}") from e


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_figure(
    fig: go.Figure,
    path: str | os.PathLike,
    formats: Sequence[str] = ("html", "png"),
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 2.0,
    include_plotlyjs: bool | str = "directory",
) -> dict[str, Path]:
    """Write ``fig`` as ``<path>.html``, ``<path>.png`` ... (every image is rendered before any file is written).

    Args:
        path: the output path without suffix (a suffix that names a format, e.g. ``fig.png``, is dropped);
            missing parent folders are created.
        formats: any of ``html``, ``png``, ``svg``, ``pdf``, ``jpeg``, ``webp``.
        width, height, scale: static image size (see :func:`to_image`).
        include_plotlyjs: ``"directory"`` (default: ``plotly.min.js`` beside the HTML, written and kept up to
            date by this function; opens offline), ``True`` (inlined, self-contained) or ``"cdn"`` (needs network).

    Returns:
        ``{format: path written}``.

    Raises:
        ImageExportError: an image format was asked for and no exporter works here (nothing is written).
    """
    _check_figure(fig)
    if isinstance(formats, str):
        formats = (formats,)
    fmts = list(dict.fromkeys(_check_format(f, FORMATS) for f in formats))
    if not fmts:
        raise WorkbenchError("save_figure needs at least one format")
    if include_plotlyjs not in (True, "directory", "cdn"):
        raise WorkbenchError(f"include_plotlyjs must be 'directory', True or 'cdn', got {include_plotlyjs!r}")
    base = Path(path)
    if base.suffix.lower().lstrip(".") in FORMATS:
        base = base.with_suffix("")
    if not base.name:
        raise WorkbenchError(f"save_figure needs a file name, got {str(path)!r}")
    images = {f: to_image(fig, f, width, height, scale) for f in fmts if f != "html"}
    base.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if "html" in fmts:
        target = Path(f"{base}.html")
        fig.write_html(str(target), include_plotlyjs=include_plotlyjs, full_html=True,
                       config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": scale}})
        if include_plotlyjs == "directory":
            bundle = target.parent / "plotly.min.js"
            js = plotlyjs_path().read_bytes()
            if not bundle.exists() or bundle.read_bytes() != js:  # plotly only writes it when absent
                _write_bytes(bundle, js)
        out["html"] = target
    for f, data in images.items():
        target = Path(f"{base}.{f}")
        _write_bytes(target, data)
        out[f] = target
    return out
