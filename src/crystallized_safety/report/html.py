"""Render the report as one self-contained HTML file (Jinja2; figures inline as base64 PNG, no JS).

The template ships as package data (`report/templates/report.html.j2`) and autoescapes everything, so
prompts and responses from the store (which may contain markup) are shown as text, never interpreted.
The page loads nothing: no external URLs, scripts, fonts or style sheets.
"""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from . import tables as T
from .figures import fmt_p


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("crystallized_safety.report", "templates"),
        autoescape=select_autoescape(["html", "j2"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["rate"] = T.rate
    env.filters["p"] = fmt_p
    return env


def render_html(context: dict) -> str:
    """The report page for a build context (see `build._context`)."""
    return _environment().get_template("report.html.j2").render(**context)
