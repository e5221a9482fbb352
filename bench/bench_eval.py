"""Seconds per checkpoint evaluation on CPU, and as a share of the training time it judges.

One evaluation = what the training loop runs after each save (rvc_pipeline.evaluation.evaluate): the
full-size v2 40k pitch generator reconstructs `--heldout` seconds of held-out pieces (3.7 s each, real
speech from the demo's voices) from their own features and f0, converts `--previews` pieces through
infer.convert (HuBERT-size random embedder, pm pitch), and scores everything with every metric that runs
here (mel_l1, mrstft, speaker_sim, dnsmos, f0). The share is against a training epoch of a
`--dataset-minutes` dataset on the same CPU (steps of batch 4 timed with bench_train's GanStep), and
against the whole run between two evaluations (`--save-every` epochs).

    .venv/bin/python bench/bench_eval.py [--heldout 60] [--previews 2] [--threads 2] [--dataset-minutes 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from bench_train import make_batch, setup
from rvc_pipeline.audio import resample
from rvc_pipeline.components.metrics.base import Clip
from rvc_pipeline.demo.voices import make_voice_set
from rvc_pipeline.evaluation.evaluate import Piece, evaluate, load_metrics
from rvc_pipeline.nn import build_generator, get_config

PIECE = 3.7


def pieces(folder: Path, seconds: float) -> list[Piece]:
    """Held-out pieces of real speech with plausible features and f0 files, as the steps write them."""
    voices = make_voice_set(folder / "voices", n_files=max(1, int(seconds // 10) + 1), seconds_each=12.0,
                            sr=40000)
    out, rng, need = [], np.random.default_rng(0), int(seconds // PIECE)
    for wav in voices:
        x, sr = sf.read(wav, dtype="float32")
        for j in range(int(len(x) / sr // PIECE)):
            if len(out) >= need:
                return out
            seg = x[int(j * PIECE * sr): int((j + 1) * PIECE * sr)]
            stem = f"{len(out)}_0"
            p = Piece(stem, folder / f"{stem}.wav", folder / f"{stem}_16k.wav", folder / f"{stem}.npy",
                      folder / f"{stem}_c.npy", folder / f"{stem}_f.npy")
            sf.write(p.gt, seg, sr)
            sf.write(p.wav16k, resample(seg, sr, 16000), 16000)
            n = int(PIECE * 100)
            np.save(p.feats, rng.standard_normal((n // 2, 768)).astype(np.float32))
            hz = 120 + 30 * np.sin(np.arange(n) / 40)
            np.save(p.coarse, np.clip(np.rint(hz / 4), 1, 255).astype(np.int64))
            np.save(p.nsf, hz)
            out.append(p)
    return out


def converter(net_g: torch.nn.Module):  # noqa: ANN201
    from rvc_pipeline import infer
    from rvc_pipeline.components.embedders.base import load_embedder

    emb = load_embedder(None, "cpu", False)
    meta = {"version": "v2", "f0": True, "sr": 40000}
    return lambda a, tr: infer.convert(a, net_g, meta, emb, pitch=tr, f0_method="pm", half=False, seed=0)


def epoch_seconds(minutes: float, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds per epoch) of batch-4 training on this CPU."""
    step = setup(torch.device("cpu"), "fp32")
    cfg = get_config("v2", "40k")
    batch = make_batch(cfg, 4, PIECE, torch.device("cpu"))
    step(batch, 1)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batch, i + 2)
    per = (time.perf_counter() - t0) / steps
    return per, per * (minutes * 60 / PIECE / 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", type=float, default=60.0, help="seconds of held-out audio")
    ap.add_argument("--previews", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset-minutes", type=float, default=10.0)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ps = pieces(Path(tmp), a.heldout)
        net_g = build_generator(get_config("v2", "40k"), "v2", True).eval()
        chosen, skipped = load_metrics(None)
        sources = [Clip(sf.read(p.wav16k, dtype="float32")[0], 16000, name=p.stem) for p in ps[: a.previews]]
        conv = converter(net_g)
        evaluate(net_g, ps[:1], 40000, 0, chosen, conv, sources[:1])  # warm-up: models load once per run
        t0 = time.perf_counter()
        res = evaluate(net_g, ps, 40000, 0, chosen, conv, sources)
        wall = time.perf_counter() - t0
    per_step, per_epoch = epoch_seconds(a.dataset_minutes, a.train_steps)
    print(f"held-out {len(ps) * PIECE:.0f} s in {len(ps)} pieces, {a.previews} previews, "
          f"{a.threads} threads; metrics {sorted(res.metrics)}; skipped {skipped or res.skipped or 'none'}")
    print(f"evaluation: {wall:.1f} s ({len(ps) * PIECE / wall:.1f}x real time)")
    print(f"training: {per_step:.2f} s/step, {per_epoch:.0f} s/epoch for {a.dataset_minutes:g} min of data")
    print(f"evaluation / epoch: {wall / per_epoch:.1%}; evaluation / (save-every {a.save_every} epochs): "
          f"{wall / (per_epoch * a.save_every):.1%}  (target < 10%)")


if __name__ == "__main__":
    main()
