"""accuracy.png: per-task accuracy of the compared models, horizontal bars with 95 % interval whiskers.

Drawn with Pillow (already a dependency) so that evaluation needs no plotting library.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")
BAR, GAP, LEFT, RIGHT, TOP, BOTTOM = 14, 10, 230, 110, 60, 40
WIDTH = 900


def _font(size: int):
    return ImageFont.load_default(size=size)


def accuracy_png(reports: dict, title: str = "accuracy per task (95% interval)") -> bytes:
    """PNG bytes of the chart: one group of bars (one per model in `reports`) for overall and each task."""
    names = list(reports)
    tasks = sorted({t for r in reports.values() for t in r.get("tasks", {})})
    groups = [("overall", lambda r: r.get("overall"))] + [(t, lambda r, t=t: r.get("tasks", {}).get(t))
                                                          for t in tasks]
    group_h = BAR * len(names) + GAP
    height = TOP + BOTTOM + group_h * len(groups)
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    small, label = _font(11), _font(13)
    x0, x1 = LEFT, WIDTH - RIGHT

    def x(v: float) -> float:
        return x0 + (x1 - x0) * v

    draw.text((10, 8), title, fill="black", font=_font(15))
    for i, name in enumerate(names):  # legend
        lx = x0 + i * 170
        draw.rectangle([lx, 34, lx + 12, 46], fill=PALETTE[i % len(PALETTE)])
        draw.text((lx + 16, 33), name[:22], fill="black", font=small)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid
        draw.line([x(v), TOP - 4, x(v), height - BOTTOM], fill="#DDDDDD")
        draw.text((x(v) - 10, height - BOTTOM + 6), f"{int(v * 100)}%", fill="black", font=small)
    for g, (task, get) in enumerate(groups):
        top = TOP + g * group_h
        draw.text((10, top + (group_h - GAP) / 2 - 7), task[:32], fill="black", font=label)
        for i, name in enumerate(names):
            s = get(reports[name])
            y = top + i * BAR
            if not s or s.get("accuracy") is None:
                continue
            color = PALETTE[i % len(PALETTE)]
            draw.rectangle([x0, y + 1, x(s["accuracy"]), y + BAR - 2], fill=color)
            lo, hi = s["ci95"]
            mid = y + BAR / 2
            draw.line([x(lo), mid, x(hi), mid], fill="black", width=1)
            for end in (lo, hi):
                draw.line([x(end), y + 3, x(end), y + BAR - 4], fill="black", width=1)
            draw.text((x(hi) + 4, y), f"{100 * s['accuracy']:.1f} (n={s['n']})", fill="#333333", font=small)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
