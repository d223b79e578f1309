"""The review as one self-contained HTML page, or as one PNG contact sheet.

The page has no script and makes no request: every picture is a ``data:image/png;base64`` URI and
the style sheet is inline. It holds, for a batch, a table of the inputs (status, time, changed share,
mean uncertainty, tiles, guard counts) linking to each image's section; per image, the tile map,
the stage times as bars, the guard's counts and the regions, best first, each at 1:1 beside its
heat map. The PNG sheet stacks the same pictures under one text strip per image.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from refine_cli.io.writers import atomic_replace, temp_path_for
from refine_cli.overlay import COMPARE_COLOUR, MASK_COLOUR
from refine_cli.report.tiles import state_counts
from refine_cli.review.model import ImageReview, Review
from refine_cli.review.pictures import HELD_TINT, REFINED_TINT, REGION_COLOUR, STATE_LEGEND, stack, text_strip

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-top:1px solid #ccc;padding-top:10px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;
white-space:nowrap}td.l{white-space:normal}
th{background:#eee}td.l,th.l{text-align:left}.failed{color:#b00}.done{color:#070}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0 0 12px 0}figcaption{font-size:12px;color:#555}img{display:block}
.bar{display:inline-block;height:10px;background:#4a7bd0;vertical-align:middle}
.sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle;
border:1px solid #888}
.note{color:#a60}
"""


def _rgb(c: tuple[int, int, int]) -> str:
    return f"rgb({c[0]},{c[1]},{c[2]})"


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100.0 * v:.2f} %"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt)


def _guard(iv: ImageReview) -> dict[str, Any]:
    return dict((iv.entry.report or {}).get("guard") or {})


def _tiles(iv: ImageReview) -> str:
    tm = ((iv.entry.report or {}).get("tile_map") or {}).get("refine")
    if tm is None:
        t = (iv.entry.report or {}).get("tiles") or ((iv.entry.record or {}).get("result") or {}).get("tiles")
        return "" if not t else f"{t.get('refined', 0)} refined / {t.get('skipped', 0)} skipped"
    c = state_counts(tm)
    return f"{c['refined'] + c['held back']} refined / {c['skipped']} skipped"


def _batch_table(review: Review) -> str:
    rows = ['<table><tr><th>#</th><th class="l">input</th><th class="l">status</th><th>time</th>'
            "<th>changed</th><th>mean uncertainty</th><th>tiles</th><th>guard held / changed px</th>"
            '<th class="l">note</th></tr>']
    for k, iv in enumerate(review.images, 1):
        e, g, sc = iv.entry, _guard(iv), iv.scan
        wall = e.wall_seconds
        held = f"{g.get('pixels_held', 0)} / {g.get('pixels_changed', 0)}" if g.get("state") == "on" else ""
        note = e.error or "; ".join(iv.notes)
        rows.append(f'<tr><td>{k}</td><td class="l"><a href="#{iv.anchor}">{html.escape(e.name)}</a></td>'
                    f'<td class="l {html.escape(e.status)}">{html.escape(e.status)}</td>'
                    f"<td>{'' if wall is None else f'{wall:.2f} s'}</td>"
                    f"<td>{_pct(sc.changed_fraction if sc else None)}</td>"
                    f"<td>{_num(sc.mean_uncertainty if sc else None)}</td><td>{_tiles(iv)}</td>"
                    f'<td>{held}</td><td class="l">{html.escape(note)}</td></tr>')
    rows.append("</table>")
    return "\n".join(rows)


def _stages(iv: ImageReview) -> str:
    stages = {k: v for k, v in iv.entry.stages.items() if v > 0}
    wall = iv.entry.wall_seconds
    if not stages:
        return "<p>no stage times recorded</p>"
    top = max(stages.values())
    rows = ['<table><tr><th class="l">stage</th><th>seconds</th><th class="l"></th></tr>']
    for name, sec in stages.items():
        rows.append(f'<tr><td class="l">{html.escape(name)}</td><td>{sec:.2f}</td><td class="l">'
                    f'<span class="bar" style="width:{max(1, round(160 * sec / top))}px"></span></td></tr>')
    if wall is not None:
        rows.append(f'<tr><th class="l">wall</th><th>{wall:.2f}</th><th class="l">stages overlap in threads'
                    "</th></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _guard_html(iv: ImageReview) -> str:
    g = _guard(iv)
    if not g:
        return ""
    if g.get("state") != "on":
        return f"<p>guard: {html.escape(str(g.get('state')))}</p>"
    keys = ("pixels_changed", "pixels_held", "far", "detached", "unsupported", "misfit", "restored",
            "components_restored", "regions_detached")
    cells = "".join(f"<tr><td class='l'>{k.replace('_', ' ')}</td><td>{int(g.get(k, 0))}</td></tr>"
                    for k in keys)
    return (f"<table><tr><th class='l'>guard (band {g.get('band', 0):g} px)</th><th>px</th></tr>"
            f"{cells}</table>")


def _legend() -> str:
    parts = [f'<span class="sw" style="background:{_rgb(c)}"></span>{html.escape(n)}'
             for n, c in STATE_LEGEND.values()]
    parts.append(f'<span class="sw" style="border:2px solid {_rgb(REGION_COLOUR)}"></span>regions')
    return " ".join(parts)


def section(iv: ImageReview) -> str:
    """One image's section: facts, notes, tile map, stage times, guard counts and regions."""
    e, sc = iv.entry, iv.scan
    out = [f'<section id="{iv.anchor}"><h2>{html.escape(e.name)}</h2>']
    facts = [f"status <b>{html.escape(e.status)}</b>"]
    if iv.shape is not None:
        facts.append(f"{iv.shape[1]} x {iv.shape[0]} px")
    if e.report is not None:
        facts.append(f"method {html.escape(str(e.report.get('method', '')))}")
    if sc is not None:
        facts += [f"changed {_pct(sc.changed_fraction)}" if sc.changed_fraction is not None else "",
                  f"mean uncertainty {_num(sc.mean_uncertainty)}" if sc.mean_uncertainty is not None else ""]
    out.append("<p>" + " &middot; ".join(f for f in facts if f) + "</p>")
    if e.image:
        out.append(f"<p>image {html.escape(e.image)}<br>refined {html.escape(e.refined or '-')}"
                   f"<br>coarse {html.escape(e.coarse or '-')}"
                   f"<br>uncertainty {html.escape(e.uncertainty or '-')}</p>")
    out += [f'<p class="note">{html.escape(n)}</p>' for n in ([e.error] if e.error else []) + iv.notes]
    out.append('<div class="row">')
    if iv.tile_map_png is not None:
        out.append(f"<figure>{_img(iv.tile_map_png, 'tile map')}<figcaption>tile map: {_legend()}"
                   "</figcaption></figure>")
    out.append(f"<div>{_stages(iv)}{_guard_html(iv)}</div></div>")
    if sc is not None:
        by = "uncertainty" if sc.by == "uncertainty" else "change (no uncertainty map)"
        out.append(f"<h3>{len(iv.regions_png)} regions to look at, by {by}</h3>"
                   f'<p><span class="sw" style="background:{_rgb(MASK_COLOUR)}"></span>refined'
                   f'<span class="sw" style="background:{_rgb(COMPARE_COLOUR)}"></span>coarse</p>')
        if not iv.regions_png:
            out.append("<p>nothing uncertain and nothing changed</p>")
        out.append('<div class="row">')
        for k, (data, r) in enumerate(zip(iv.regions_png, sc.regions, strict=False), 1):
            w = r.window
            out.append(f"<figure>{_img(data, f'region {k}')}<figcaption>#{k} x={w.col} y={w.row} "
                       f"{w.width}x{w.height} px, score {r.score:.3f}</figcaption></figure>")
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def render_html(review: Review) -> str:
    """The whole page (see the module docstring) of a review that holds its pictures."""
    return page_head(review) + "\n".join(section(iv) for iv in review.images) + PAGE_TAIL


PAGE_TAIL = "\n</body></html>\n"
"""The end of the page."""


def page_head(review: Review) -> str:
    """The page up to the first image's section: style, title and, for several images, the table."""
    title = "refine review"
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>")
    intro = (f"<h1>{title}</h1><p>{html.escape(', '.join(review.sources))}: {len(review.images)} image(s), "
             f"the {review.top} most uncertain regions of each at 1:1 ({review.crop} px)</p>")
    parts = [head, intro]
    if review.batch or len(review.images) > 1:
        parts.append(_batch_table(review))
    return "\n".join(parts) + "\n"


def write_html(path: str, review: Review, images: Iterator[ImageReview], overwrite: bool) -> None:
    """Write the page atomically while the images are reviewed, holding one image's pictures at a time.

    Each section goes to a temporary spool file beside ``path`` as its image is done, and its pictures
    are dropped from ``review``; the head (with the batch table, which needs every image's numbers) is
    written last, before the spooled sections, to a temporary file renamed to ``path``.

    Args:
        path: the ``.html`` to write.
        review: the review's settings; ``review.images`` is filled from ``images``.
        images: the images' reviews, made one at a time.
        overwrite: replace an existing ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path_for(path)
    try:
        with tempfile.TemporaryFile(dir=folder) as spool:
            for iv in images:
                spool.write(section(iv).encode("utf-8") + b"\n")
                iv.regions_png, iv.tile_map_png = [], None
                review.images.append(iv)
            spool.seek(0)
            with open(tmp, "wb") as fh:
                fh.write(page_head(review).encode("utf-8"))
                shutil.copyfileobj(spool, fh, 1 << 20)
                fh.write(PAGE_TAIL.encode("utf-8"))
        atomic_replace(tmp, path, overwrite)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _decode(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "a picture the review encoded itself"
    return np.ascontiguousarray(bgr[..., ::-1])


def _sheet_block(iv: ImageReview, width: int) -> np.ndarray:
    e, sc = iv.entry, iv.scan
    wall = e.wall_seconds
    head = f"{e.name}: {e.status}" + ("" if wall is None else f", {wall:.2f} s")
    if sc is not None and sc.changed_fraction is not None:
        head += f", changed {_pct(sc.changed_fraction)}"
    if sc is not None and sc.mean_uncertainty is not None:
        head += f", mean uncertainty {sc.mean_uncertainty:.3f}"
    lines = [head]
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in e.stages.items() if v > 0)
    if stages:
        lines.append(stages)
    g = _guard(iv)
    if g.get("state") == "on":
        lines.append(f"guard held {g.get('pixels_held', 0)} of {g.get('pixels_changed', 0)} changed px; "
                     f"tiles {_tiles(iv)}")
    lines += [*([e.error] if e.error else []), *iv.notes]
    pics = [text_strip(lines, width)]
    if iv.tile_map_png is not None:
        pics.append(_decode(iv.tile_map_png))
    regions = [_decode(d) for d in iv.regions_png]
    for k in range(0, len(regions), 2):
        pics.append(stack(regions[k: k + 2], horizontal=True))
    return stack(pics)


def render_png(review: Review) -> np.ndarray:
    """The contact sheet: per image, a text strip, the tile map and the regions two by two.

    Returns:
        ``(h, w, 3)`` uint8 RGB.
    """
    width = 2 * (2 * review.crop + 8) + 8
    legend = ["tiles: dimmed skipped, blue refined, red: the guard held changes back",
              "yellow: regions; contours: green refined, magenta coarse"]
    blocks = [text_strip([f"refine review: {', '.join(review.sources)}"[:160], *legend], width)]
    blocks += [_sheet_block(iv, width) for iv in review.images]
    return stack(blocks, gap=24)


__all__ = ["HELD_TINT", "REFINED_TINT", "render_html", "render_png"]
