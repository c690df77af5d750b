"""Views of FIPO's mechanism: a response's text coloured by each token's influence weight.

    diag = token_diagnostics(log_probs, old_log_probs, advantages, mask, config)
    view = TokenView.from_diagnostics(diag, row=0, tokens=[tokenizer.decode([i]) for i in ids])
    open("view.html", "w").write(influence_html([view]))
    influence_png(view, "view.png")

Colour: a diverging scale centred on f = 1 (no influence): red where FIPO up-weights a token's
advantage (f > 1), blue where it down-weights it (f < 1). In the HTML, hovering a token shows
Δlog p, FutureKL and the weights before and after clipping; filtered tokens (left out of the
Future-KL) are underlined, dual-clipped ones boxed, safety-clamped ones struck through. The PNG
draws the same text with Δlog p and FutureKL plotted beneath, for notebooks and READMEs.
"""

from __future__ import annotations

import dataclasses
import html
import warnings
from typing import Sequence

import numpy as np

from fipo_jax.core import _checks
from fipo_jax.core.losses import TokenDiagnostics

# Weights are coloured on [1 − WEIGHT_SPAN, 1 + WEIGHT_SPAN] (the official clips live inside ±0.2).
WEIGHT_SPAN = 0.2


@dataclasses.dataclass(frozen=True)
class TokenView:
    """One response's tokens and their diagnostics (host arrays, length = number of tokens)."""

    tokens: tuple[str, ...]
    log_ratio: np.ndarray
    future_kl: np.ndarray
    raw_weights: np.ndarray
    weights: np.ndarray
    filtered: np.ndarray
    dual_clipped: np.ndarray
    safety_clamped: np.ndarray
    advantage: float
    dropped: bool
    title: str = ""

    def __post_init__(self):
        n = len(self.tokens)
        for field in ("log_ratio", "future_kl", "raw_weights", "weights", "filtered", "dual_clipped",
                      "safety_clamped"):
            _checks.require(np.shape(getattr(self, field)) == (n,),
                            f"TokenView.{field} must have one value per token ({n}), got shape "
                            f"{np.shape(getattr(self, field))}")

    @classmethod
    def from_diagnostics(cls, diag: TokenDiagnostics, row: int, tokens: Sequence[str], title: str = "") -> "TokenView":
        """Row ``row`` of a batch's diagnostics; ``tokens`` are the response's token strings (its
        real tokens, in order: the first ``len(tokens)`` positions of the row are shown)."""
        n = len(tokens)
        width = np.shape(diag.weights)[1]
        _checks.require(n <= width, f"{n} tokens for a row of {width} positions")
        take = lambda x: np.asarray(x)[row, :n]  # noqa: E731
        return cls(tuple(tokens), take(diag.log_ratio), take(diag.future_kl), take(diag.raw_weights),
                   take(diag.weights), take(diag.filtered), take(diag.dual_clipped), take(diag.safety_clamped),
                   float(np.asarray(diag.advantages)[row, 0]), bool(np.asarray(diag.dropped_rows)[row]), title)


def weight_colour(weight: float) -> tuple[float, float, float]:
    """RGB in [0, 1]: white at f = 1, saturating red at 1 + `WEIGHT_SPAN`, blue at 1 − `WEIGHT_SPAN`."""
    x = float(np.clip((weight - 1.0) / WEIGHT_SPAN, -1.0, 1.0))
    if x >= 0:
        return (1.0, 1.0 - 0.75 * x, 1.0 - 0.75 * x)
    return (1.0 + 0.75 * x, 1.0 + 0.55 * x, 1.0)


def _css(rgb) -> str:
    return "#%02x%02x%02x" % tuple(round(255 * c) for c in rgb)


def _visible(token: str) -> str:
    return token.replace("\n", "⏎\n").replace(" ", "·") if token.strip() == "" else token


def influence_html(views: Sequence[TokenView], heading: str = "FIPO influence weights") -> str:
    """A standalone HTML page with one coloured block per view."""
    blocks = []
    for view in views:
        spans = []
        for i, token in enumerate(view.tokens):
            style = [f"background:{_css(weight_colour(view.weights[i]))}"]
            if view.filtered[i]:
                style.append("text-decoration:underline wavy #b00")
            if view.safety_clamped[i]:
                style.append("text-decoration:line-through")
            if view.dual_clipped[i]:
                style.append("outline:1px solid #000")
            tip = (f"token {i}: Δlog p = {view.log_ratio[i]:+.4f}, FutureKL = {view.future_kl[i]:+.4f}, "
                   f"exp(FutureKL) = {view.raw_weights[i]:.4f}, f = {view.weights[i]:.4f}"
                   + (", filtered" if view.filtered[i] else "") + (", dual-clipped" if view.dual_clipped[i] else "")
                   + (", safety-clamped" if view.safety_clamped[i] else ""))
            spans.append(f'<span style="{";".join(style)}" title="{html.escape(tip)}">'
                         f"{html.escape(_visible(token))}</span>")
        moved = np.abs(view.weights - 1) > 0.01
        caption = (f"A = {view.advantage:+.3f}; {int(moved.sum())} of {len(view.tokens)} tokens with |f − 1| > 0.01; "
                   f"f in [{view.weights.min():.3f}, {view.weights.max():.3f}]"
                   + ("; <b>dropped from the loss (E8)</b>" if view.dropped else ""))
        blocks.append(f"<h3>{html.escape(view.title)}</h3><p class='caption'>{caption}</p>"
                      f"<pre class='response'>{''.join(spans)}</pre>")
    legend = " ".join(f'<span style="background:{_css(weight_colour(w))}">f = {w:.2f}</span>'
                      for w in (1 - WEIGHT_SPAN, 0.9, 1.0, 1.1, 1 + WEIGHT_SPAN))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(heading) + "</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}pre.response{white-space:pre-wrap;"
            "font-size:15px;line-height:1.7}.caption{color:#444}</style></head><body>"
            f"<h2>{html.escape(heading)}</h2><p>{legend} — hover a token for Δlog p, FutureKL and its weights; "
            "<u>underlined</u>: ratio-filtered; boxed: dual-clipped; struck: safety-clamped.</p>"
            + "".join(blocks) + "</body></html>")


def influence_png(view: TokenView, path: str, width_chars: int = 96) -> str:
    """The view as a PNG: the coloured text (wrapped at ``width_chars``), and beneath it Δlog p and
    FutureKL per token with the weight on a second axis. Returns ``path``."""
    from fipo_jax._requires import import_module

    Figure = import_module("matplotlib.figure", "train").Figure  # no pyplot: leaves the caller's backend alone

    lines: list[list[tuple[int, str, int]]] = []  # per line: (token index, text, column)
    line: list[tuple[int, str, int]] = []
    col = 0
    for i, token in enumerate(view.tokens):
        text = _visible(token).replace("\n", "")
        if col + len(text) > width_chars and line:
            lines.append(line)
            line, col = [], 0
        line.append((i, text, col))
        col += max(len(text), 1)
        if token.endswith("\n"):
            lines.append(line)
            line, col = [], 0
    if line:
        lines.append(line)
    text_height = 0.32 * max(len(lines), 1)
    fig = Figure(figsize=(10, text_height + 2.6))
    ax_text, ax_plot = fig.subplots(2, 1, gridspec_kw={"height_ratios": [text_height, 2.2]})
    ax_text.set_xlim(0, width_chars * 1.1)  # ≈ one 9-pt monospace character per unit on a 10-inch figure
    ax_text.set_ylim(len(lines), 0)
    ax_text.axis("off")
    for row, items in enumerate(lines):
        for i, text, col in items:
            box = {"facecolor": weight_colour(view.weights[i]),
                   "edgecolor": "black" if view.dual_clipped[i] else "none",
                   "pad": 1.0}
            ax_text.text(col, row + 0.5, text, family="monospace", fontsize=9, va="center", bbox=box,
                         color="#b00" if view.filtered[i] else "black")
    ax_text.set_title(view.title or "FIPO influence weights", fontsize=10, loc="left")
    x = np.arange(len(view.tokens))
    ax_plot.plot(x, view.log_ratio, lw=1, label="Δlog p")
    ax_plot.plot(x, view.future_kl, lw=1.5, label="FutureKL")
    ax_plot.axhline(0, color="grey", lw=0.5)
    ax_plot.set_xlabel("response token")
    ax_weight = ax_plot.twinx()
    ax_weight.plot(x, view.weights, color="tab:red", lw=1, ls="--", label="f (clipped)")
    ax_weight.set_ylabel("influence weight f")
    handles = ax_plot.get_legend_handles_labels()[0] + ax_weight.get_legend_handles_labels()[0]
    ax_plot.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    ax_plot.set_title(f"A = {view.advantage:+.3f}" + ("  (dropped from the loss)" if view.dropped else ""),
                      fontsize=9, loc="left")
    with warnings.catch_warnings():  # tokens in scripts the monospace font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    return path
