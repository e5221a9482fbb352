"""Benchmark: `rvc-pipeline infer` on CPU, as a real-time factor (audio seconds per wall second).

A full-size v2 40k generator with pitch (random weights, exported in RVC's small-model format) and a
full-size HuBERT-base (random weights; speed does not depend on the weights) convert ~25 s of real speech
(espeak-ng) with pm f0 and RVC's fp32 windowing constants, without and with a retrieval index (index_rate
0.75, an IVF index of ~60 s of other speech features built as the index step does). The end-to-end figure
(`convert_file`: model load, weight-norm folding, ffmpeg decoding, WAV writing) and the per-stage split
(f0, HuBERT + retrieval, generator) are printed for each thread count.

    .venv/bin/python bench/bench_infer.py --seconds 25 --threads 1 2
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rvc_pipeline.audio import load_audio
from rvc_pipeline.components.embedders.random import random_embedder
from rvc_pipeline.core.layout import index_name
from rvc_pipeline.export import export_small_model
from rvc_pipeline.infer import convert_file
from rvc_pipeline.nn import build_generator, get_config
from rvc_pipeline.steps.index import build_index, write_index_atomic

TEXT = (
    "Retrieval based voice conversion changes who is speaking and keeps what is said. The pitch of the "
    "recording is measured, a self supervised speech model turns the sound into content features, and a "
    "generator trained on the target voice speaks those features again. An index of the training features "
    "pulls the content towards the target speaker before the generator runs. "
)


def speak(path: Path, seconds: float, voice: str = "en-us") -> Path:
    """Real speech of about `seconds` (espeak-ng, the text repeated as needed)."""
    reps = max(1, int(np.ceil(seconds / 17.0)))
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(raw), TEXT * reps], check=True,
                   capture_output=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-t", f"{seconds:.2f}", str(path)],
                   check=True)
    return path


def cpu_seconds() -> float:
    """CPU time of this process (user + system): less sensitive than wall time to a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=25.0, help="length of the input speech")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--index-seconds", type=float, default=60.0, help="speech behind the index")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inp = speak(work / "input.wav", args.seconds)
        audio_s = len(load_audio(inp, 16000)) / 16000
        cfg = get_config("v2", "40k")
        torch.manual_seed(0)
        g = build_generator(cfg, "v2", True)
        model = work / "bench_v2_40k.pth"
        export_small_model(g.state_dict(), cfg, "v2", True, model, "1epoch")
        del g
        emb = random_embedder("cpu", seed=0)
        other = speak(work / "other.wav", args.index_seconds, voice="en+f3")
        t0 = time.perf_counter()
        feats = emb.extract(load_audio(other, 16000), "v2", batch_seconds=30)[0]
        index, iinfo = build_index(np.ascontiguousarray(feats, dtype=np.float32), seed=0)
        index_file = work / index_name("added", iinfo["n_ivf"], "bench", "v2")
        write_index_atomic(index, index_file)
        print(f"input: {audio_s:.1f} s of espeak-ng speech; index: {index.ntotal} vectors "
              f"(IVF{iinfo['n_ivf']}, built in {time.perf_counter() - t0:.1f} s); model: v2 40k f0 "
              f"(random weights), HuBERT-base (random weights), pm f0, fp32 constants (1, 6, 38, 41)")
        print(f"{'threads':>7} {'index':>6} {'wall s':>7} {'RTF':>6} {'cpu s':>7} {'audio s/cpu s':>13} "
              f"{'f0 s':>6} {'hubert s':>9} {'synth s':>8} {'load s':>7} {'segments':>8}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for use_index in (False, True):
                c0 = cpu_seconds()
                info = convert_file(model, inp, work / "out.wav", index=index_file if use_index else None,
                                    embedder=emb, f0_method="pm", index_rate=0.75 if use_index else 0.0,
                                    device="cpu", seed=0)
                cpu = cpu_seconds() - c0
                print(f"{threads:>7} {'yes' if use_index else 'no':>6} {info['seconds']:>7.1f} "
                      f"{info['realtime_factor']:>6.2f} {cpu:>7.1f} {info['input_seconds'] / cpu:>13.2f} "
                      f"{info['f0_seconds']:>6.1f} "
                      f"{info['features_seconds']:>9.1f} {info['synthesis_seconds']:>8.1f} "
                      f"{info['load_seconds']:>7.1f} {info['segments']:>8}")
        print("RTF = input audio seconds / wall seconds of convert_file (above 1: faster than real time); "
              "cpu s = this process's CPU time (user + system)")


if __name__ == "__main__":
    main()
