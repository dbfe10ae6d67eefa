"""The evaluation's report: `report.md` and `report.html` from the same parts, bar charts, image grids.

The table is the paper's Table 2 turned on its side: one row per method, Avg and N-Pass per
metric, over all pairs and per pair. Charts need matplotlib (`freefuse[eval]`); without it they
are skipped and the report says so. Grids show every method on the same seed, one row per prompt.
"""

from __future__ import annotations

import html
from pathlib import Path

from PIL import Image, ImageDraw

from ..core import MaskSet
from ..files import atomic_save, atomic_write
from .metrics import METRICS
from .summary import pass_label

METHOD_TEXT = {
    "diffusers": "baseline: the diffusers pipeline's own load_lora_weights + set_adapters (no FreeFuse)",
    "merge": "FreeFuse's plain joint LoRAs (every LoRA everywhere)",
    "freefuse": "FreeFuse, masks from attention (the model's default stage-1 method)",
    "masks": "user masks: each LoRA in its half of the image (<A> left, <B> right)",
    "single": "each LoRA alone on a single-subject prompt (the reference row)",
}
QUICK_BANNER = (
    "**A `--quick` run**: the tiny random model, random LoRAs and tiny random metric backbones built in memory. "
    "The numbers measure nothing; they show that every part runs and what the report looks like."
)


def method_text(method: str) -> str:
    if method.startswith("freefuse:"):
        return f"FreeFuse with the {method.split(':', 1)[1]} stage-1 method"
    return METHOD_TEXT.get(method, method)


def number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _cell_text(cell: dict) -> tuple[str, str]:
    return number(cell["avg"]), number(cell["best"])


def table_rows(summary: dict, metrics: list[str], methods: list[str], pair: str | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows (method, then Avg and N-Pass per metric) over all pairs or one pair."""
    header = ["method"]
    label = pass_label(summary["seeds"])
    for metric in metrics:
        header += [f"{METRICS[metric].title} Avg", f"{METRICS[metric].title} {label}"]
    rows = []
    for method in methods:
        row = [method]
        for metric in metrics:
            cells = summary["table"][metric][method]
            cell = cells["overall"] if pair is None else cells["pairs"].get(pair)
            row += list(_cell_text(cell)) if cell else ["–", "–"]
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- pictures ----------------------------------------------------------------------------------------


MASKS_COLUMN = "freefuse masks"


def _cell_picture(out: Path, record: dict, cell: int, with_masks: bool) -> Image.Image:
    """A record's image at `cell` pixels on its longer side (its masks over it, `with_masks`)."""
    picture = Image.open(out / record["image"]).convert("RGB")
    scale = cell / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.NEAREST if scale > 1 else Image.BICUBIC)
    if with_masks:
        masks = MaskSet.load(out / record["masks"]).resize((size[1], size[0]), mode="nearest")
        picture = masks.overlay(picture, legend=False)
    return picture


def image_grid(records: list[dict], out: Path, pair: str, methods: list[str], seed: int, rows: int = 6,
               cell: int = 192) -> Image.Image | None:  # fmt: skip
    """Every method (columns) on one seed, for the pair's first `rows` prompts (rows), and FreeFuse's
    masks over its image when it has them."""
    chosen = {(r["prompt_index"], r["method"]): r for r in records if r["pair"] == pair and r["seed"] == seed}
    prompts = sorted({index for index, _ in chosen})[:rows]
    if not prompts:
        return None
    columns = list(methods) + ([MASKS_COLUMN] if "freefuse" in methods else [])
    caption = 16
    grid = Image.new("RGB", (cell * len(columns), caption + (cell + caption) * len(prompts)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(columns):
        draw.text((column * cell + 4, 2), name, fill=(0, 0, 0))
    for row, index in enumerate(prompts):
        top = caption + row * (cell + caption)
        for column, name in enumerate(columns):
            record = chosen.get((index, "freefuse" if name == MASKS_COLUMN else name))
            wanted = "masks" if name == MASKS_COLUMN else "image"
            if record is not None and record.get(wanted):
                grid.paste(_cell_picture(out, record, cell, name == MASKS_COLUMN), (column * cell, top))
            else:
                draw.text((column * cell + 4, top + cell // 2), f"no {wanted}", fill=(200, 0, 0))
        text = next(r for (i, _), r in chosen.items() if i == index)["prompt"]
        draw.text((4, top + cell + 2), f"{index + 1}. {text}"[: cell * len(columns) // 6], fill=(0, 0, 0))
    return grid


def bar_chart(summary: dict, metric: str, methods: list[str], path: Path) -> bool:
    """Avg and N-Pass bars per method; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [summary["table"][metric][method]["overall"] for method in methods]
    positions = list(range(len(methods)))
    figure, axis = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 3.2), dpi=100)
    for offset, key, label in ((-0.2, "avg", "Avg"), (0.2, "best", pass_label(summary["seeds"]))):
        axis.bar([p + offset for p in positions], [c[key] or 0.0 for c in cells], width=0.4, label=label)
    axis.set_xticks(positions, methods, rotation=20)
    axis.set_title(METRICS[metric].title)
    axis.legend()
    figure.tight_layout()
    atomic_save(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
    return True


# -- the report ----------------------------------------------------------------------------------------


def _protocol_lines(protocol: dict) -> list[str]:
    lines = ["## Protocol", ""]
    lines.append(f"- Model: `{protocol['model']}`; settings: {protocol['settings']}.")
    lines.append(f"- Seeds: {', '.join(map(str, protocol['seeds']))} (the same for every method).")
    lines.append(f"- Prompts: {protocol['prompts']['note']}")
    lines.append("- LoRAs and their references:")
    for subject in protocol["subjects"]:
        lines.append(f"  - `{subject['name']}` (word `{subject['word']}`, sha256 {subject['sha256'][:12]}…): {subject['references']}")
    lines.append("- Methods:")
    lines += [f"  - `{method}`: {method_text(method)}" for method in protocol["methods"]]
    lines.append(f"- Subject crops: {protocol['crops']}")
    counts = ", ".join(f"{source}: {count}" for source, count in protocol["crop_counts"].items())
    lines.append(f"  - images by crop source: {counts or 'none'}")
    lines += ["", "## Metrics", ""]
    for described in protocol["metrics"]:
        metric = METRICS[described["metric"]]
        lines.append(f"- **{metric.title}** (`{metric.name}`): {metric.measures}. Library: {described['library']}; "
                     f"weights: {described['weights']}. Known weakness: {metric.weakness}.")  # fmt: skip
    for name, reason in protocol["unavailable"].items():
        lines.append(f"- **{METRICS[name].title}** (`{name}`) was not run: {reason}")
    return lines


def _failure_lines(records: list[dict]) -> list[str]:
    failed = [(r, metric, error) for r in records for metric, error in r["errors"].items()]
    lines = ["## Failures", ""]
    if not failed:
        return [*lines, "None: every image has every score it should have.", ""]
    lines.append(f"{len(failed)} scores are missing (left out of the averages, counted here):")
    lines.append("")
    for record, metric, error in failed[:30]:
        lines.append(f"- {record['pair']}, {record['method']}, prompt {record['prompt_index'] + 1}, seed {record['seed']}, "
                     f"{metric}: {error}")  # fmt: skip
    if len(failed) > 30:
        lines.append(f"- … and {len(failed) - 30} more (scores.jsonl has them all).")
    return [*lines, ""]


def write_report(out: Path, summary: dict, records: list[dict], protocol: dict) -> dict[str, Path]:
    """Write report.md, report.html, charts/ and grids/ under `out`; returns the files."""
    metrics = [m["metric"] for m in protocol["metrics"]]
    pair_methods = [m for m in protocol["methods"] if m != "single"]
    pairs = sorted({r["pair"] for r in records if r["method"] != "single"})
    files: dict[str, Path] = {}
    md: list[str] = ["# FreeFuse: evaluation of pairs", ""]
    parts: list[str] = ["<h1>FreeFuse: evaluation of pairs</h1>"]
    if protocol.get("quick"):
        md += [QUICK_BANNER, ""]
        parts.append(f"<p><b>A --quick run</b>: {html.escape(QUICK_BANNER.split(': ', 1)[1])}</p>")
    md += [f"Command: `{protocol['command']}`", ""]
    parts.append(f"<p>Command: <code>{html.escape(protocol['command'])}</code></p>")
    label = pass_label(summary["seeds"])
    intro = (f"Avg: the mean over every image; {label}: per pair and prompt, the best of the {summary['seeds']} "
             "seeds, then the mean. Higher is better for every metric.")  # fmt: skip
    md += ["## All pairs", "", intro, ""]
    parts += ["<h2>All pairs</h2>", f"<p>{html.escape(intro)}</p>"]
    header, rows = table_rows(summary, metrics, pair_methods, None)
    md += [*markdown_table(header, rows), ""]
    parts.append(html_table(header, rows))
    for pair in pairs:
        header, rows = table_rows(summary, metrics, pair_methods, pair)
        md += [f"### {pair}", "", *markdown_table(header, rows), ""]
        parts += [f"<h3>{html.escape(pair)}</h3>", html_table(header, rows)]
    md_more, html_more, pictures = _pictures(out, summary, records, protocol, metrics, pair_methods, pairs)
    md += md_more
    parts += html_more
    files.update(pictures)
    single = single_table(summary, protocol, metrics)
    if single is not None:
        md += ["## Single LoRAs", "", SINGLE_INTRO, "", *markdown_table(*single), ""]
        parts += ["<h2>Single LoRAs</h2>", f"<p>{html.escape(SINGLE_INTRO)}</p>", html_table(*single)]
    tail = len(md)
    md += _failure_lines(records)
    md += _protocol_lines(protocol)
    md += ["", "## Files", "", *protocol["files_text"], ""]
    text = "\n".join(md) + "\n"
    body = "\n".join(parts) + _html_lines(md[tail:])
    files["md"], files["html"] = out / "report.md", out / "report.html"
    atomic_write(files["md"], text)
    atomic_write(files["html"], f"<!doctype html><html><head><meta charset='utf-8'><title>FreeFuse evaluation</title>"
                 f"<style>{_CSS}</style></head><body>{body}</body></html>\n")  # fmt: skip
    return files


_CSS = "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}" \
       "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}img{max-width:100%}"


def _pictures(out, summary, records, protocol, metrics, methods, pairs) -> tuple[list[str], list[str], dict]:
    md, parts, files = ["## Charts", ""], ["<h2>Charts</h2>"], {}
    drawn = [metric for metric in metrics if bar_chart(summary, metric, methods, out / "charts" / f"{metric}.png")]
    if metrics and not drawn:
        note = "Charts skipped: matplotlib is not installed (pip install 'freefuse[eval]')."
        md += [note, ""]
        parts.append(f"<p>{html.escape(note)}</p>")
    for metric in drawn:
        files[f"chart-{metric}"] = out / "charts" / f"{metric}.png"
        md += [f"![{METRICS[metric].title}](charts/{metric}.png)", ""]
        parts.append(f"<img src='charts/{metric}.png' alt='{html.escape(METRICS[metric].title)}'>")
    seed = protocol["seeds"][0]
    md += ["## Images", "", f"Every method on seed {seed}, and FreeFuse's masks over its image; one row per prompt (the first six).", ""]
    parts += ["<h2>Images</h2>", f"<p>Every method on seed {seed}, and FreeFuse's masks over its image; one row per prompt (the first six).</p>"]
    for pair in pairs:
        grid = image_grid(records, out, pair, methods, seed)
        if grid is None:
            continue
        path = out / "grids" / f"{pair}.png"
        atomic_save(path, lambda handle, picture=grid: picture.save(handle, "PNG"))
        files[f"grid-{pair}"] = path
        md += [f"![{pair}](grids/{pair}.png)", ""]
        parts += [f"<h3>{html.escape(pair)}</h3>", f"<img src='grids/{html.escape(pair)}.png' alt='{html.escape(pair)}'>"]
    return md, parts, files


SINGLE_INTRO = (
    "Each LoRA alone on the single-subject prompt, scored against its references (n/a where these images are "
    "the references)."
)


def single_table(summary: dict, protocol: dict, metrics: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """The single-LoRA row per LoRA and subject metric (Avg), or None without single-LoRA images."""
    if "single" not in protocol["methods"]:
        return None
    subject_metrics = [m for m in metrics if METRICS[m].kind == "subject"]
    header = ["LoRA"] + [f"{METRICS[m].title} Avg" for m in subject_metrics]
    rows = []
    for subject in protocol["subjects"]:
        row = [subject["name"]]
        for metric in subject_metrics:
            cell = summary["table"][metric]["single"]["pairs"].get(subject["name"])
            row.append(number(cell["avg"]) if cell and cell["avg"] is not None else "n/a")
        rows.append(row)
    return header, rows


def _html_lines(md: list[str]) -> str:
    """Markdown headings, list items and paragraphs (the failures, protocol and files sections) as HTML."""
    parts, in_list = [], False
    for line in md:
        is_item = line.lstrip().startswith("- ")
        if is_item != in_list:
            parts.append("<ul>" if is_item else "</ul>")
            in_list = is_item
        if line.startswith("## "):
            parts.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif is_item:
            parts.append(f"<li>{html.escape(line.lstrip()[2:])}</li>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    if in_list:
        parts.append("</ul>")
    return "\n".join(parts)
