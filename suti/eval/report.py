"""The evaluation report: metrics table and, per subject, a grid of demos | each method's images per prompt.

Writes <out>/report.html (self-contained apart from the grid PNGs next to it) and <out>/report.md (the same
table and grids, for a README or a pull request). Grids are contact sheets (suti.viz.contact_sheet): one row per prompt,
the groups in the order of the legend, separated by red bars.
"""
from __future__ import annotations

import html
import os

from suti.core.png import save_png
from suti.viz.contact_sheet import contact_sheet

COLUMNS = (("identity_accuracy", "identity acc."), ("context_accuracy", "context acc."), ("dino", "DINO"),
           ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("near_copy_rate", "near copies"),
           ("seconds_per_subject", "s / subject"))
DESCRIPTIONS = {
    "suti": "SuTI few-shot (demos + prompt, no optimisation)",
    "text_only": "the apprentice without demos (text alone)",
    "dreambooth": "a DreamBooth expert fine-tuned on the demos",
    "copy": "a demo copied",
    "real_renders": "real: the true subject rendered in each prompt's context (toy ceiling)",
    "real_images": "real: the references against each other (DreamBench's 'real images')",
}


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
  return str(value)


def metric_rows(results: dict) -> tuple[list[str], list[list[str]]]:
  """The table's header and rows: one row per method (and the real-image references), only the columns some
  row has."""
  columns = [(key, title) for key, title in COLUMNS if any(key in r for r in results.values())]
  header = ["method"] + [title for _, title in columns]
  rows = [[name] + [_cell(r.get(key)) for key, _ in columns] for name, r in results.items()]
  return header, rows


def markdown_table(results: dict) -> str:
  header, rows = metric_rows(results)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def write_grids(out_dir: str, grids: dict[str, dict], methods: list[str], scale: int) -> dict[str, str]:
  """grids[subject] = {"demos": [images], "prompts": [p], method: [image per prompt]}; returns subject -> PNG path
  relative to out_dir."""
  paths = {}
  for subject, g in grids.items():
    rows = [[g["demos"]] + [[g[m][i]] for m in methods if m in g] for i in range(len(g["prompts"]))]
    rel = os.path.join("grids", f"{subject}.png")
    save_png(os.path.join(out_dir, rel), contact_sheet(rows, captions=g["prompts"], scale=scale))
    paths[subject] = rel
  return paths


def write_report(out_dir: str, *, title: str, results: dict, grids: dict[str, dict], methods: list[str],
                 settings: dict, scale: int = 4) -> str:
  """Writes report.html and report.md; returns the HTML path."""
  grid_paths = write_grids(out_dir, grids, methods, scale)
  legend_methods = [m for m in methods if any(m in g for g in grids.values())]
  legend = "demos | " + " | ".join(legend_methods)
  setting_text = ", ".join(f"{k} {v}" for k, v in settings.items())

  md = [f"# {title}", "", setting_text, "", markdown_table(results), ""]
  md += [f"- **{name}**: {DESCRIPTIONS.get(name, name)}" for name in results]
  md += ["", f"Grids: each row is a prompt; columns {legend}.", ""]
  md += [f"### {subject}\n\n![{subject}]({path})\n" for subject, path in grid_paths.items()]
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md))

  header, rows = metric_rows(results)
  table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
  for row in rows:
    table += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
  table += "</table>"
  items = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(DESCRIPTIONS.get(n, n))}</li>" for n in results)
  sections = "".join(f"<h3>{html.escape(s)}</h3><img src=\"{html.escape(p)}\" alt=\"{html.escape(s)}\">"
                     for s, p in grid_paths.items())
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
img{{image-rendering:pixelated;max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(setting_text)}</p>{table}<ul>{items}</ul>
<p>Grids: each row is a prompt; columns {html.escape(legend)}.</p>{sections}</body></html>
"""
  path = os.path.join(out_dir, "report.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path
