"""Summaries of what a run measured: latency percentiles per stage, bytes, accuracy. numpy only (the device uses it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splitleak.core.records import ALL_STAGES, FrameRecord


def summarize(records: Sequence[FrameRecord]) -> dict:
    """Median and p95 of each stage (ms), mean bytes per frame each way, accuracy over the labelled frames, all of
    the frames answered without an error; those the cloud refused (errors), never answered (the run ended first) or
    were sent again after a break (resent) are counted."""
    done = [r for r in records if r.error is None and not r.unanswered]
    labelled = [r for r in done if r.label >= 0]
    summary: dict = {
        "frames": len(records),
        "errors": sum(r.error is not None for r in records),
        "unanswered": sum(r.unanswered for r in records),
        "resent": sum(r.resent for r in records),
        "accuracy": float(np.mean([r.prediction == r.label for r in labelled])) if labelled else None,
        "labelled": len(labelled),
        "bytes_up": float(np.mean([r.bytes_up for r in done])) if done else None,
        "bytes_down": float(np.mean([r.bytes_down for r in done])) if done else None,
        "stages_ms": {},
    }
    stages_ms = [r.stages_ms() for r in done]
    for stage in ALL_STAGES:
        values = np.array([stages[stage] for stages in stages_ms if stage in stages])
        if len(values):
            summary["stages_ms"][stage] = {"median": float(np.median(values)), "p95": float(np.percentile(values, 95))}
    if len(done) > 1:
        span_s = (max(r.end_ns for r in done) - min(r.start_ns for r in done)) / 1e9
        summary["frames_per_s"] = len(done) / span_s
    return summary


def format_summary(summary: dict) -> str:
    unanswered = f", {summary['unanswered']} unanswered" if summary.get("unanswered") else ""
    lines = [f"frames: {summary['frames']} ({summary['errors']} errors{unanswered})"]
    if summary.get("reconnects"):
        lines.append(
            f"reconnects: {summary['reconnects']} ({summary['resent']} frames sent again, "
            f"{summary['duplicate_answers']} duplicate answers ignored)"
        )
    if summary["accuracy"] is not None:
        lines.append(f"accuracy: {summary['accuracy']:.4f} over {summary['labelled']} labelled frames")
    if summary["bytes_up"] is not None:
        lines.append(f"bytes per frame: {summary['bytes_up']:.0f} up, {summary['bytes_down']:.0f} down")
    if "frames_per_s" in summary:
        lines.append(f"throughput: {summary['frames_per_s']:.1f} frames/s")
    width = max([11, *(len(stage) + 1 for stage in summary["stages_ms"])])
    lines.append(f"{'stage':<{width}}{'median ms':>10}{'p95 ms':>10}")
    for stage, stats in summary["stages_ms"].items():
        lines.append(f"{stage:<{width}}{stats['median']:>10.2f}{stats['p95']:>10.2f}")
    return "\n".join(lines)
