"""The outputs of a session's metric checks: the terminal table, ``metrics.json``, the
step summary and the self-contained HTML page, and the baseline thumbnails the page shows.

One concept per module: ``rows`` (check rows and the ``metrics.json`` document), ``text``
(terminal table, step summary), ``images`` (a results folder's images as data URIs),
``thumbnails`` (baseline thumbnails), ``html`` (the page; ``report.css`` and ``report.js``
are package files), ``outputs`` (writing them at the session's end).  Only the standard
library is imported at module level (the plugin loads this package in every pytest run);
Pillow is imported when a page with images is rendered.
"""

from __future__ import annotations

from .html import render_html
from .images import SAMPLES_FIX, THUMBNAIL_MAX, load_image_folder
from .outputs import Outputs, write_outputs
from .rows import (
    FORMAT_VERSION,
    PASSING,
    REWRITTEN,
    baseline_entry,
    check_record,
    document_head,
    failed,
    format_signed,
    format_value,
    is_test_failed,
    ordered_tests,
    per_prompt,
    reference,
    sample_key,
    samples,
    session_document,
)
from .text import STEP_SUMMARY_MAX_ROWS, step_summary, summary_lines
from .thumbnails import (
    BASELINE_THUMBNAIL_MAX,
    THUMBNAILS_FIX,
    baseline_images_dir,
    baseline_images_enabled,
    load_baseline_images,
    record_baseline_images,
    store_baseline_images,
)

__all__ = [
    "BASELINE_THUMBNAIL_MAX", "FORMAT_VERSION", "PASSING", "REWRITTEN", "SAMPLES_FIX", "STEP_SUMMARY_MAX_ROWS",
    "THUMBNAILS_FIX", "THUMBNAIL_MAX", "Outputs", "baseline_entry", "baseline_images_dir", "baseline_images_enabled",
    "check_record", "document_head", "failed", "format_signed", "format_value", "is_test_failed",
    "load_baseline_images", "load_image_folder", "ordered_tests", "per_prompt", "record_baseline_images",
    "reference", "render_html", "sample_key", "samples", "session_document", "step_summary", "store_baseline_images",
    "summary_lines", "write_outputs",
]
