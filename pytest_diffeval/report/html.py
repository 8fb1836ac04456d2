"""The self-contained HTML report of a session's checks: one card per check, image grids
beside the baseline's thumbnails, provenance; images inlined as data URIs, and the page's
CSS and JS (``report.css``, ``report.js``, package files) inlined too, so nothing is fetched
from the network.
"""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

from .._hashing import digest_text
from .images import ImageFolder, load_image_folder
from .rows import (
    PASSING,
    REWRITTEN,
    BaselineSamples,
    failed,
    format_signed,
    format_value,
    is_test_failed,
    ordered_tests,
    per_prompt,
    reference,
    samples,
)
from .thumbnails import BaselineThumbnails, ThumbnailCache

DISPLAY_MIN = 128  # smaller images are shown upscaled by an integer factor (pixelated)


def _asset(name: str) -> str:
    """A file of this package (the page's stylesheet or script), read once per page."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _verdict_class(verdict: str) -> str:
    if verdict not in PASSING:
        return "bad"
    return {"improved": "better", "recorded": "recorded", "updated": "recorded"}.get(verdict, "ok")


def _badge(verdict: str) -> str:
    return f'<span class="badge {_verdict_class(verdict)}">{_e(verdict)}</span>'


def _anchor(test: str) -> str:
    """The id of a test's section: its name made URL-safe, plus a short hash of the name
    (two tests whose names clean alike keep apart ids)."""
    return "t-" + re.sub(r"[^A-Za-z0-9_-]+", "-", test).strip("-")[:80] + "-" + digest_text(test, 8)


def _check_card(row: dict[str, Any], baselines: BaselineSamples) -> str:
    verdict = str(row.get("verdict"))
    direction = "higher is better" if row.get("higher_is_better", True) else "lower is better"
    facts = [("value", format_value(row.get("value"))), ("baseline ± tol / threshold", reference(row))]
    if row.get("delta") is not None:
        facts.append(("delta", format_signed(row.get("delta"))))
    facts.append(("backbone", row.get("backbone")))
    details = row.get("details") if isinstance(row.get("details"), dict) else {}
    if details.get("interpreter"):  # an external metric (metrics/external.py): the environment it ran in
        facts.append(("environment", f"{details['interpreter']} ({details.get('python')}; {details.get('packages')})"))
    prompts = per_prompt(row, baselines.get(row))
    parts = [f'<div class="check {_verdict_class(verdict)}" data-metric="{_e(row.get("metric"))}" '
             f'data-verdict="{_e(verdict)}">',
             f'<div class="check-head"><span class="metric">{_e(row.get("metric"))}</span> {_badge(verdict)}'
             f'<span class="muted"> {direction}</span></div>',
             '<dl class="facts">' + "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts) + "</dl>"]
    if row.get("baseline_file"):
        parts.append(f'<div class="muted small">baseline file: <code>{_e(row["baseline_file"])}</code></div>')
    if prompts:
        has_base = all("baseline" in p for p in prompts)
        order = "change against the baseline" if has_base else "value"
        head = "<tr><th>prompt</th><th>seeds</th><th>this run</th>" + \
               ("<th>baseline</th><th>change</th>" if has_base else "") + "</tr>"
        body = []
        for p in prompts:
            cells = [f'<td class="prompt">{_e(p["prompt"])}</td>', f'<td class="num">{p["n"]}</td>',
                     f'<td class="num">{_e(format_value(p["value"]))}</td>']
            if has_base:
                worse = (p["change"] < 0) == bool(row.get("higher_is_better", True)) and p["change"] != 0
                cells += [f'<td class="num">{_e(format_value(p["baseline"]))}</td>',
                          f'<td class="num {"neg" if worse else "pos"}">{_e(format_signed(p["change"]))}</td>']
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f'<table class="per-prompt"><caption>per prompt, mean over seeds, worst {_e(order)} first'
                     f'</caption><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>')
    parts.append(_answers_table(row))
    parts.append("</div>")
    return "\n".join(parts)


ANSWER_ROWS = 50  # images listed in a VQA check's answers table, those with failed questions first


def _answers_table(row: dict[str, Any]) -> str:
    """A VQA check's questions per image (``details["answers"]`` of vqa_score, tifa, soft_tifa):
    the failed questions with the probability of their correct answer, then every answer's
    probability; images with failed questions first.  Empty for other checks."""
    answers = (row.get("details") or {}).get("answers")
    if not isinstance(answers, list) or not answers:
        return ""
    images = [a for a in answers if isinstance(a, dict) and isinstance(a.get("questions"), list)]
    images.sort(key=lambda a: not any(not q.get("passed", True) for q in a["questions"] if isinstance(q, dict)))

    def question(q: dict[str, Any]) -> str:
        blocked = f" (blocked: parent {q['blocked_by']} failed)" if q.get("blocked_by") is not None else ""
        return f"{q.get('question')} → {q.get('answer')}: p={format_value(q.get('p'))}{blocked}"

    body = []
    for a in images[:ANSWER_ROWS]:
        questions = [q for q in a["questions"] if isinstance(q, dict)]
        failed_qs = [q for q in questions if not q.get("passed", True)]
        shown = "<br>".join(_e(question(q)) for q in failed_qs) or '<span class="muted">none</span>'
        every = ", ".join(f"{q.get('id')}: {format_value(q.get('p'))}" for q in questions)
        body.append(f'<tr><td class="prompt">{_e(a.get("prompt"))}</td><td class="num">{_e(a.get("seed"))}</td>'
                    f'<td class="{"neg" if failed_qs else ""}">{shown}</td><td class="num">{_e(every)}</td></tr>')
    more = f", first {ANSWER_ROWS} of {len(images)}" if len(images) > ANSWER_ROWS else ""
    return (f'<table class="per-prompt vqa-answers"><caption>questions per image: failed ones with the probability '
            f'of their correct answer{more}</caption><thead><tr><th>prompt</th><th>seed</th><th>failed questions</th>'
            f'<th>p(correct answer) per question</th></tr></thead><tbody>{"".join(body)}</tbody></table>')


def _display_width(width: int) -> int:
    if width >= DISPLAY_MIN:
        return min(width, 256)
    return width * math.ceil(DISPLAY_MIN / max(width, 1))


def _baseline_file_of(checks: list[dict[str, Any]]) -> str | None:
    """The baseline file the checks were compared with (None when recorded in this run)."""
    return next((str(r["baseline_file"]) for r in checks if r.get("baseline_file") and r.get("baseline") is not None
                 and r.get("verdict") not in REWRITTEN), None)


def _image_grid(folder: ImageFolder, checks: list[dict[str, Any]], baselines: BaselineSamples,
                thumbnails: BaselineThumbnails | None = None) -> str:
    """The folder's images, one row per prompt (worst prompt first), one column per seed;
    each beside the baseline's thumbnail of the same (prompt, seed) where one is stored."""
    per_sample: list[tuple[dict[str, Any], dict[tuple[int | None, str | None], dict[str, Any]]]] = []
    for row in checks:
        values = {(s["seed"], s["prompt"]): s for s in samples(row, baselines.get(row))}
        if values:
            per_sample.append((row, values))
    prompt_order: list[str | None] = []
    primary = next((r for r, _ in per_sample if failed(r)), per_sample[0][0] if per_sample else None)
    if primary is not None:
        prompt_order = [p["prompt"] for p in per_prompt(primary, baselines.get(primary))]
    for image in folder.images:
        if image.prompt not in prompt_order:
            prompt_order.append(image.prompt)
    stored = thumbnails.images if thumbnails else {}
    rows = []
    for prompt in prompt_order:
        figures = []
        for image in (i for i in folder.images if i.prompt == prompt):
            values = []
            for row, by_key in per_sample:
                sample = by_key.get((image.seed, image.prompt))
                if sample is None:
                    continue
                change = f" ({format_signed(sample['change'])})" if "change" in sample else ""
                cls = " bad" if failed(row) else ""
                values.append(f'<span class="v{cls}">{_e(row["metric"])} {_e(format_value(sample["value"]))}{_e(change)}</span>')
            label = f"seed {image.seed}" if image.seed is not None else image.file
            shown = _display_width(image.width)
            picture = (f'<img class="sample" src="{image.uri}" width="{shown}" '
                       f'alt="{_e(prompt)} (seed {_e(image.seed)})" '
                       f'title="{_e(prompt)} | seed {_e(image.seed)} | {_e(image.file)}">')
            old = stored.get(f"{image.seed}|{image.prompt}")
            width = max(shown, 160)
            if old is not None:
                width = max(2 * shown + 6, 160)
                picture = (f'<div class="pair"><div>{picture}<span class="tag">this run</span></div><div>'
                           f'<img class="baseline" src="{old.uri}" width="{shown}" '
                           f'alt="baseline: {_e(prompt)} (seed {_e(image.seed)})" '
                           f'title="baseline thumbnail ({old.width}x{old.height}) | {_e(prompt)} | seed {_e(image.seed)}">'
                           f'<span class="tag">baseline</span></div></div>')
            figures.append(
                f'<figure data-prompt="{_e(image.prompt)}" data-seed="{_e(image.seed)}" style="width:{width}px">'
                f'{picture}<figcaption><b>{_e(label)}</b>{"".join(values)}</figcaption></figure>')
        rows.append(f'<div class="prompt-row"><div class="prompt-label">{_e(prompt if prompt is not None else "")}'
                    f'</div><div class="figures">{"".join(figures)}</div></div>')
    notes = [folder.error] if folder.error else []
    if thumbnails and thumbnails.note:
        notes.append(thumbnails.note)
    note = "".join(f'<div class="muted small note">{_e(n)}</div>' for n in notes)
    where = (f'; baseline thumbnails: <code>{_e(thumbnails.folder)}</code>' if thumbnails and thumbnails.images
             else "")
    return (f'<div class="grid"><div class="muted small">images: <code>{_e(folder.path)}</code> '
            f"(full-size PNGs and grid.png){where}</div>{''.join(rows)}{note}</div>")


def _shows(row: dict[str, Any], folder: ImageFolder) -> bool:
    """Whether ``row`` measured the images in ``folder`` (its own, or unsaved ones of the same samples)."""
    if row.get("images"):
        return Path(row["images"]) == folder.path
    return [(i.prompt, i.seed) for i in folder.images] == list(zip(row.get("prompts") or [], row.get("seeds") or []))


def _provenance(rows: list[dict[str, Any]], call_kwargs: dict[str, Any]) -> str:
    provenance = next((r["provenance"] for r in rows if r.get("provenance")), None)
    if not provenance and not call_kwargs:
        return ""
    items = []
    for key in ("model", "model_hash", "revision", "pipeline_id", "load_options", "pipeline_class", "scheduler",
                "dtype", "device_kind", "execution",
                "gpu_peak_memory_mb", "gpu_s_per_image"):  # the GPU figures: None (not shown) on the CPU
        if provenance and provenance.get(key) not in (None, {}):
            value = provenance[key]
            items.append((key, json.dumps(value, sort_keys=True) if isinstance(value, dict) else value))
    if call_kwargs:
        items.append(("call kwargs", json.dumps(call_kwargs, sort_keys=True)))
    versions = (provenance or {}).get("versions") or {}
    if versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    body = "".join(f"<div><dt>{_e(k)}</dt><dd><code>{_e(v)}</code></dd></div>" for k, v in items)
    return f'<details class="provenance"><summary>provenance</summary><dl>{body}</dl></details>'


def render_html(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                outcomes: dict[str, str] | None = None) -> str:
    """The self-contained HTML page for the session's checks."""
    meta = meta or {}
    outcomes = outcomes or {}
    baselines = BaselineSamples()
    thumbnails = ThumbnailCache()
    tests = ordered_tests(rows, outcomes)
    n_failed_tests = sum(is_test_failed(r, outcomes.get(t)) for t, r in tests)
    n_failed_checks = sum(failed(r) for r in rows)

    summary = ["<table class='summary'><thead><tr><th>test</th><th>metric</th><th>backbone</th>"
               "<th class='num'>value</th><th>baseline ± tol / threshold</th><th class='num'>delta</th>"
               "<th>verdict</th></tr></thead><tbody>"]
    sections = []
    for test, checks in tests:
        status = "failed" if is_test_failed(checks, outcomes.get(test)) else "passed"
        anchor = _anchor(test)
        for row in checks:
            summary.append(f"<tr class='{status}' data-test='{_e(test)}'><td class='test'>"
                           f"<a href='#{anchor}'>{_e(test)}</a></td><td>{_e(row.get('metric'))}</td>"
                           f"<td class='muted'>{_e(row.get('backbone'))}</td>"
                           f"<td class='num'>{_e(format_value(row.get('value')))}</td><td>{_e(reference(row))}</td>"
                           f"<td class='num'>{_e(format_signed(row.get('delta')))}</td>"
                           f"<td>{_badge(str(row.get('verdict')))}</td></tr>")
        folders: list[ImageFolder] = []
        for folder in dict.fromkeys(r["images"] for r in checks if r.get("images")):
            folders.append(load_image_folder(folder))
        grids = "".join(_image_grid(f, shown, baselines, thumbnails.get(_baseline_file_of(shown)))
                        for f in folders for shown in [[r for r in checks if _shows(r, f)]])
        if not folders:
            grids = ('<div class="muted small">images of passing checks are not kept; run with '
                     '<code>--diffeval-results-always</code> to see them</div>')
        cards = "".join(_check_card(r, baselines) for r in sorted(checks, key=lambda r: not failed(r)))
        outcome = outcomes.get(test)
        note = f' <span class="muted small">pytest: {_e(outcome)}</span>' if outcome else ""
        sections.append(
            f'<section class="test {status}" id="{anchor}" data-test="{_e(test)}" data-status="{status}">'
            f'<h2>{_badge("failed" if status == "failed" else "pass")} {_e(test)}{note}</h2>'
            f'<div class="checks">{cards}</div>{grids}'
            f'{_provenance(checks, folders[0].call_kwargs if folders else {})}</section>')
    summary.append("</tbody></table>")

    info = " · ".join(_e(f"{k}: {v}") for k, v in (
        ("created", meta.get("created")), ("pytest exit status", meta.get("exitstatus")),
        ("rootdir", meta.get("rootdir")), ("args", " ".join(meta.get("args") or [])),
        ("workers", meta.get("workers")), ("pytest-diffeval", meta.get("pytest_diffeval"))) if v not in (None, ""))
    bad = " bad" if n_failed_checks else ""
    style, script = _asset("report.css"), _asset("report.js")
    return f"""<!DOCTYPE html>
<html lang="en" data-render-check="pending">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pytest-diffeval report: {n_failed_tests} of {len(tests)} tests failed</title>
<style>
{style}</style>
</head>
<body>
<header>
<h1>pytest-diffeval report</h1>
<div class="stats"><span class="stat{bad}">{n_failed_tests} of {len(tests)} tests failed</span>
<span class="stat{bad}">{n_failed_checks} of {len(rows)} metric checks failed</span></div>
<label><input type="checkbox" id="failed-only"> show only failed tests</label>
</header>
<main>
<div class="meta">{info}</div>
{"".join(summary)}
{"".join(sections)}
</main>
<script>
{script}</script>
</body>
</html>
"""
