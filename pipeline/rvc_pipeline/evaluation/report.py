"""`report.html`: one self-contained page (inline SVG curves, embedded audio) that opens from disk or S3.

Audio is embedded as 16 kHz 16-bit WAV data URIs, each cut to PREVIEW_SECONDS, for the best epoch and the
latest MAX_EMBEDDED_EPOCHS - 1 others, so the page stays a few MB and needs no server and no relative links.
"""

from __future__ import annotations

import base64
import html
import io
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rvc_pipeline.evaluation.history import EvalRecord, best, latest_per_epoch

PREVIEW_SECONDS = 6.0
MAX_EMBEDDED_EPOCHS = 8
EMBED_SR = 16000
_W, _H, _PAD = 360, 180, 56

_CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
tr.best td{background:#e8f6e8;font-weight:600}.charts{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;padding:6px}figcaption{font-size:12px;color:#555}
.clip{display:inline-block;margin:4px 12px 4px 0}.clip span{display:block;font-size:12px;color:#555}"""


def wav_data_uri(audio: np.ndarray, sr: int) -> str:
    """A mono float clip as a 16 kHz 16-bit WAV data URI (cut to PREVIEW_SECONDS)."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)[: int(PREVIEW_SECONDS * sr)]
    if sr != EMBED_SR and x.size:
        t = np.arange(int(x.size * EMBED_SR / sr)) * (sr / EMBED_SR)
        x = np.interp(t, np.arange(x.size), x)
    pcm = (np.clip(np.nan_to_num(x), -1.0, 1.0) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(EMBED_SR)
        w.writeframes(pcm)
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def _scale(values: Sequence[float], lo_px: float, hi_px: float) -> list[float]:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return [lo_px + (v - lo) / span * (hi_px - lo_px) for v in values]


def svg_chart(name: str, points: Sequence[tuple[int, float]], best_epoch: int | None) -> str:
    """A small line chart of one metric over epochs, the best epoch marked."""
    if not points:
        return ""
    xs = _scale([p[0] for p in points], _PAD, _W - 10) if len(points) > 1 else [(_W + _PAD) / 2]
    ys = _scale([p[1] for p in points], _H - 22, 12)
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if e == best_epoch else 3}" '
        f'fill="{"#2a9d2a" if e == best_epoch else "#3060c0"}"><title>epoch {e}: {v:.4g}</title></circle>'
        for x, y, (e, v) in zip(xs, ys, points))
    vals = [p[1] for p in points]
    axis = (f'<text x="2" y="16" font-size="10">{max(vals):.4g}</text>'
            f'<text x="2" y="{_H - 20}" font-size="10">{min(vals):.4g}</text>'
            f'<text x="{_PAD}" y="{_H - 4}" font-size="10">epoch {points[0][0]}</text>'
            f'<text x="{_W - 70}" y="{_H - 4}" font-size="10">epoch {points[-1][0]}</text>')
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
            f'aria-label="{html.escape(name)}"><polyline fill="none" stroke="#3060c0" stroke-width="1.5" '
            f'points="{line}"/>{dots}{axis}</svg><figcaption>{html.escape(name)}</figcaption></figure>')


def _caption(name: str, better: Mapping[str, bool]) -> str:
    if name not in better:
        return name
    return f"{name} ({'higher' if better[name] else 'lower'} is better)"


def _metric_names(records: Sequence[EvalRecord]) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r.metrics))
    return list(names)


def _table(records: Sequence[EvalRecord], names: list[str], best_epoch: int | None) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["epoch", "step", "score", *names])
    rows = []
    for r in records:
        cells = [str(r.epoch), str(r.step), "" if r.score is None else f"{r.score:.4f}"]
        cells += [f"{r.metrics[n]:.4g}" if n in r.metrics else "" for n in names]
        cls = ' class="best"' if r.epoch == best_epoch else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _players(clips: Mapping[int, Sequence[tuple[str, np.ndarray, int]]], keep: set[int]) -> str:
    parts = []
    for epoch in sorted(e for e in clips if e in keep):
        items = "".join(f'<div class="clip"><span>{html.escape(label)}</span><audio controls preload="none" '
                        f'src="{wav_data_uri(a, sr)}"></audio></div>' for label, a, sr in clips[epoch])
        parts.append(f"<h3>epoch {epoch}</h3>{items}")
    return "".join(parts)


def render(experiment: str, records: Sequence[EvalRecord],
           clips: Mapping[int, Sequence[tuple[str, np.ndarray, int]]], rule: str,
           higher_is_better: Mapping[str, bool] | None = None) -> str:
    """The whole page. `clips[epoch]` = [(label, audio, sample_rate)]; `rule` describes the score;
    `higher_is_better` (metric key -> direction) labels the charts."""
    better = higher_is_better or {}
    recs = latest_per_epoch(records)
    top = best(recs)
    best_epoch = top.epoch if top else None
    names = _metric_names(recs)
    scored = [(r.epoch, r.score) for r in recs if r.score is not None]
    charts = svg_chart("score (higher is better)", scored, best_epoch) + "".join(
        svg_chart(_caption(n, better), [(r.epoch, r.metrics[n]) for r in recs if n in r.metrics], best_epoch)
        for n in names)
    latest = sorted(clips)[-(MAX_EMBEDDED_EPOCHS - 1):] if clips else []
    keep = set(latest) | ({best_epoch} if best_epoch is not None else set())
    summary = (f"Best: epoch {top.epoch} (step {top.step}), score {top.score:.4f}, checkpoint "
               f"<code>{html.escape(top.checkpoint)}</code>" if top and top.score is not None
               else "No checkpoint has a score yet.")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(experiment)}: "
            f"evaluation</title><style>{_CSS}</style></head><body><h1>{html.escape(experiment)}: which "
            f"checkpoint is the good voice</h1><p>{summary}</p><p>Score: {html.escape(rule)}</p>"
            f"<h2>Metrics per evaluated epoch</h2><div class='charts'>{charts}</div>"
            f"<h2>Table</h2>{_table(recs, names, best_epoch)}<h2>Listen</h2>{_players(clips, keep)}"
            "</body></html>")


def write(path: Path, page: str) -> None:
    """Write the page next to eval.jsonl (the caller uploads it with the step's outputs)."""
    path.write_text(page, encoding="utf-8")
