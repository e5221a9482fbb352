"""`rvc-pipeline convert`: many recordings converted with one model, loaded once.

The model, embedder, pitch weights and index are loaded once per process (`infer.load_for_inference`),
then every recording goes through `infer.read_input` + `infer.convert_loaded`, the same path as
`rvc-pipeline infer`. Inputs: the audio files directly inside each given folder (sub-folders are not
searched; the audio suffixes of `evaluation.sources`), or files named one by one. A link inside a folder
that points outside it, and anything that is not a regular file (pipes, devices, dangling links), is
skipped with a warning. Outputs `<output>/<stem>.<format>`; WAV is written here, FLAC / Ogg Vorbis / MP3
through ffmpeg; every output is written atomically, so an existing output is a complete one and a rerun
skips it (`overwrite` redoes it). A bad recording is reported and skipped; the others still convert.
`CONVERT_REPORT_FILE` in the output folder lists every input with its status and error.

Parallelism: on CUDA one process converts the files one after another. On the CPU, `workers` processes
(each loading the model once, torch threads split between them) or, with 1, this process with all
threads; DEFAULT_CPU_WORKERS is the figure bench/bench_convert.py measured.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from rvc_pipeline.core.fileio import atomic_path, temp_glob, write_text_atomic
from rvc_pipeline.core.folders import AUDIO_SUFFIXES, inside, looks_like_audio, scan
from rvc_pipeline.core.layout import CONVERT_FORMATS, CONVERT_REPORT_FILE, converted_name
from rvc_pipeline.core.spec import RVC_CONVERSION
from rvc_pipeline.infer import InferError, LoadedModel, check_options

log = logging.getLogger("rvc_pipeline")

FORMATS = CONVERT_FORMATS  # (core.layout: the spec's convert.format reads them too)
_CODECS = {"flac": ["-f", "flac"], "ogg": ["-f", "ogg", "-c:a", "libvorbis", "-q:a", "6"],
           "mp3": ["-f", "mp3", "-c:a", "libmp3lame", "-b:a", "192k"]}
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)  # what MP3 can carry
DEFAULT_CPU_WORKERS = 2  # bench/bench_convert.py, 2 cores: 2.1x the files/s of 1 (docs/client.md)


@dataclass(frozen=True)
class Setup:
    """What every converting process loads once (`infer.load_for_inference`'s arguments); picklable."""

    model: str
    index: str | None = None
    embedder: str = "hubert_base.pt"
    demo_random_weights: bool = False
    device: str = "auto"
    f0_method: str = "pm"
    f0_weights: tuple[tuple[str, str], ...] = ()
    index_rate: float = RVC_CONVERSION.index_rate


@dataclass(frozen=True)
class BatchOptions:
    setup: Setup
    inputs: tuple[str, ...]
    output: Path
    fmt: str = "wav"
    transpose_csv: Path | None = None
    overwrite: bool = False
    workers: int = 0  # 0: DEFAULT_CPU_WORKERS on the CPU, 1 on CUDA
    convert: Mapping[str, Any] = field(default_factory=dict)  # `infer.convert`'s options; pitch = default


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path
    pitch: float


@dataclass
class Outcome:
    """One input: converted, existing (a complete output was there), failed or ignored (not converted)."""

    input: str
    output: str | None
    status: str
    error: str | None = None
    input_seconds: float = 0.0
    seconds: float = 0.0
    pitch: float | None = None  # the transpose used (semitones)


@dataclass
class BatchReport:
    outcomes: list[Outcome]
    seconds: float

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def input_seconds(self) -> float:
        return round(sum(o.input_seconds for o in self.outcomes), 3)

    @property
    def realtime_factor(self) -> float | None:
        return round(self.input_seconds / self.seconds, 3) if self.seconds > 0 else None

    def summary(self) -> str:
        return (f"converted {self.count('converted')}, skipped {self.count('existing')} already done, "
                f"failed {self.count('failed')}; {self.input_seconds:.1f} s of audio in {self.seconds:.1f} s "
                f"({self.realtime_factor or 0:.2f}x real time)")

    def to_json(self) -> dict[str, Any]:
        return {"converted": self.count("converted"), "existing": self.count("existing"),
                "failed": self.count("failed"), "ignored": self.count("ignored"),
                "input_seconds": self.input_seconds, "seconds": round(self.seconds, 3),
                "realtime_factor": self.realtime_factor, "files": [asdict(o) for o in self.outcomes]}


# ------------------------------------------------------------------------------------------------ inputs


def scan_folder(folder: Path) -> tuple[list[Path], list[Outcome]]:
    """The audio files directly inside `folder` (sorted), and the audio-named entries skipped with a warning
    (core.folders' rule; other names, such as a notes.txt or a sub-folder, are passed over quietly)."""
    files, skipped = scan(folder)
    ignored: list[Outcome] = []
    for s in skipped:
        if looks_like_audio(s.path.name):
            log.warning("convert: skipping %s: %s", s.path, s.why)
            ignored.append(Outcome(str(s.path), None, "ignored", s.why))
    return files, ignored


def list_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[Outcome], list[Path]]:
    """(files to convert, entries skipped, the folders given); InferError for a path that is not there."""
    files: list[Path] = []
    ignored: list[Outcome] = []
    folders: list[Path] = []
    for text in inputs:
        p = Path(text).expanduser()
        if p.is_dir():
            found, skipped = scan_folder(p)
            if not found and not skipped:
                log.warning("convert: %s holds no audio files (%s)", p, ", ".join(AUDIO_SUFFIXES))
            files += found
            ignored += skipped
            folders.append(p)
        elif p.exists() or p.is_symlink():
            files.append(p)
        else:
            raise InferError(f"--input {p}: no such file or folder")
    return files, ignored, folders


def check_output(output: Path, folders: list[Path], jobs: list[Job]) -> None:
    """InferError when the output folder is, or lies inside, an input folder, or an output would
    replace an input."""
    out = output.expanduser().resolve()
    for d in folders:
        if inside(out, d.resolve()):
            raise InferError(f"--output {output} is inside the input folder {d}; choose a folder outside it")
    sources = {j.source.resolve(): j.source for j in jobs}
    for j in jobs:
        if j.output.resolve() in sources:
            raise InferError(f"--output {output}: {j.output.name} would replace the input "
                             f"{sources[j.output.resolve()]}")
    if output.exists() and not output.is_dir():
        raise InferError(f"--output {output}: not a folder")


def read_transpose_csv(path: Path, files: list[Path]) -> dict[Path, float]:
    """`file,semitones` rows (a header optional) -> semitones per input; `file` is an input's name or
    stem. InferError naming the CSV line for an unknown file, a bad number or a file given twice."""
    by_name = {p.name: p for p in files} | {p.stem: p for p in files}
    out: dict[Path, float] = {}
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InferError(f"--transpose-csv {path}: cannot read ({e})") from None
    for n, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        where = f"--transpose-csv {path} line {n}"
        if len(cells) != 2:
            raise InferError(f"{where}: expected 'file,semitones', got {','.join(cells)!r}")
        try:
            semis = float(cells[1])
        except ValueError:
            if n == 1:
                continue  # the header
            raise InferError(f"{where}: {cells[1]!r} is not a number of semitones") from None
        target = by_name.get(cells[0]) or by_name.get(Path(cells[0]).name)
        if target is None:
            raise InferError(f"{where}: {cells[0]!r} is not one of the inputs")
        if target in out or not -48 <= semis <= 48 or semis != semis:
            raise InferError(f"{where}: {cells[0]!r} " + ("given twice" if target in out else
                                                          f"transpose {cells[1]} outside -48..48"))
        out[target] = semis
    return out


def plan(files: list[Path], output: Path, fmt: str, pitch: float,
         transposes: Mapping[Path, float]) -> list[Job]:
    """One job per input, `<output>/<stem>.<fmt>`; InferError naming two inputs of one stem."""
    seen: dict[str, Path] = {}
    jobs = []
    for f in files:
        if f.stem in seen:
            raise InferError(f"inputs {seen[f.stem]} and {f} would both be written to {f.stem}.{fmt}; "
                             "rename one")
        seen[f.stem] = f
        jobs.append(Job(f, output / converted_name(f.name, fmt), float(transposes.get(f, pitch))))
    return jobs


# ------------------------------------------------------------------------------------------------ outputs


def is_done(path: Path) -> bool:
    """Outputs are renamed into place whole, so one that exists (and is not empty) is complete."""
    return path.is_file() and not path.is_symlink() and path.stat().st_size > 0


def _clear_partials(job: Job) -> None:
    """What a killed writer of this output left (its temporary file)."""
    for p in job.output.parent.glob(temp_glob(job.output.name)):
        p.unlink(missing_ok=True)


def _mp3_rate(sr: int) -> int:
    return next((r for r in MP3_RATES if r >= sr), MP3_RATES[-1])


def write_output(path: Path, samples: Any, sr: int, fmt: str) -> None:
    """int16 mono samples as `fmt` at `path`, atomically (WAV here; the others through ffmpeg)."""
    if fmt == "wav":
        from rvc_pipeline.infer import write_wav_int16

        write_wav_int16(path, samples, sr)
        return
    rate = ["-ar", str(_mp3_rate(sr))] if fmt == "mp3" and sr not in MP3_RATES else []
    with atomic_path(path) as tmp:
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-f", "s16le", "-ar", str(int(sr)),
               "-ac", "1", "-i", "pipe:0", *rate, *_CODECS[fmt], str(tmp)]
        proc = subprocess.run(cmd, input=samples.tobytes(), capture_output=True, check=False)
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise InferError(f"{path.name}: ffmpeg could not write {fmt} ({why[0][:200]})")


# ------------------------------------------------------------------------------------------------ converting

_LOADED: dict[Setup, LoadedModel] = {}  # per process: the model each worker loaded once


def _loaded(setup: Setup) -> LoadedModel:
    if setup not in _LOADED:
        from rvc_pipeline.infer import load_for_inference

        _LOADED.clear()
        _LOADED[setup] = load_for_inference(
            setup.model, setup.index, setup.embedder, None, setup.demo_random_weights, device=setup.device,
            f0_method=setup.f0_method, f0_weights=dict(setup.f0_weights) or None, index_rate=setup.index_rate)
    return _LOADED[setup]


def _per_file(setup: Setup, opts: Mapping[str, Any], pitch: float) -> dict[str, Any]:
    """`infer.convert`'s options for one recording (the pitch method and index rate live in `setup`)."""
    return {**opts, "f0_method": setup.f0_method, "index_rate": setup.index_rate, "pitch": pitch}


def convert_job(setup: Setup, fmt: str, opts: Mapping[str, Any], threads: int, job: Job) -> Outcome:
    """Convert one recording (loading the model on this process's first call). A bad recording is a
    failed Outcome naming it; a model that cannot load raises (it ends the whole batch)."""
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    from rvc_pipeline.core.errors import classify
    from rvc_pipeline.infer import SR, convert_loaded, read_input

    t0 = time.perf_counter()
    try:
        audio = read_input(job.source)  # before loading: a rerun left with only bad files loads nothing
    except (ValueError, RuntimeError, OSError) as e:
        return Outcome(str(job.source), str(job.output), "failed", classify(e).message, pitch=job.pitch)
    loaded = _loaded(setup)  # a model, index or embedder that cannot load ends the whole batch
    try:
        samples, sr, _ = convert_loaded(loaded, audio, **_per_file(setup, opts, job.pitch))
        _clear_partials(job)
        write_output(job.output, samples, sr, fmt)
    except (ValueError, RuntimeError, OSError) as e:  # this file only; the others go on
        return Outcome(str(job.source), str(job.output), "failed", classify(e).message,
                       seconds=round(time.perf_counter() - t0, 3), pitch=job.pitch)
    return Outcome(str(job.source), str(job.output), "converted", None, round(len(audio) / SR, 3),
                   round(time.perf_counter() - t0, 3), job.pitch)


def _pool_size(opts: BatchOptions, device: str, jobs: int) -> int:
    from rvc_pipeline.steps.processes import cpu_count

    if device.startswith("cuda"):
        return 1  # one GPU: one process, sequential
    return max(1, min(opts.workers or DEFAULT_CPU_WORKERS, jobs, cpu_count()))


def _progress(it: Iterator[Any], total: int) -> Iterator[Any]:
    from tqdm import tqdm  # type: ignore[import-untyped]

    yield from tqdm(it, total=total, desc="convert", unit="file", file=sys.stderr, dynamic_ncols=True,
                    disable=os.environ.get("RVC_NO_PROGRESS") == "1", mininterval=1.0)


def run_jobs(opts: BatchOptions, jobs: list[Job],
             on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Convert `jobs` in this process or a pool, with a progress bar; outcomes in input order.
    `on_outcome` is called as each one finishes (the convert step's progress and graceful stop)."""
    from rvc_pipeline.core.fileio import pick_device
    from rvc_pipeline.steps.processes import cpu_count, parallel_map

    device = pick_device(opts.setup.device, what="convert")
    setup = replace(opts.setup, device=device)
    workers = _pool_size(opts, device, len(jobs))
    threads = max(1, cpu_count() // workers) if workers > 1 else 0
    fn = partial(convert_job, setup, opts.fmt, dict(opts.convert), threads)
    done: dict[Path, Outcome] = {}
    log.info("convert: %d file(s) on %s, %d process(es)", len(jobs), device, workers)
    try:
        for job, outcome in _progress(parallel_map(fn, jobs, workers, torch_workers=True), len(jobs)):
            if outcome.status == "failed":
                log.warning("convert: %s failed: %s", job.source, outcome.error)
            done[job.source] = outcome
            if on_outcome is not None:
                on_outcome(outcome)
    finally:
        _LOADED.clear()
    return [done[j.source] for j in jobs]


def prepare(opts: BatchOptions) -> tuple[list[Job], list[Outcome]]:
    """Every check that needs no model: options, inputs, output folder, names, transpose CSV. Returns
    the jobs and the inputs skipped (with a warning) or already done."""
    if opts.fmt not in FORMATS:
        raise InferError(f"--format {opts.fmt!r}: expected one of {', '.join(FORMATS)}")
    check_options(**_per_file(opts.setup, opts.convert, 0.0))
    files, ignored, folders = list_inputs(opts.inputs)
    if not files:
        raise InferError(f"--input {' '.join(opts.inputs)}: no audio files to convert "
                         f"({', '.join(AUDIO_SUFFIXES)})")
    transposes = read_transpose_csv(opts.transpose_csv, files) if opts.transpose_csv else {}
    jobs = plan(files, opts.output, opts.fmt, float(opts.convert.get("pitch", 0.0)), transposes)
    check_output(opts.output, folders, jobs)
    existing = [] if opts.overwrite else [j for j in jobs if is_done(j.output)]
    done = [Outcome(str(j.source), str(j.output), "existing", pitch=j.pitch) for j in existing]
    return [j for j in jobs if j not in existing], ignored + done


def run_batch(opts: BatchOptions) -> BatchReport:
    """Convert every input (see the module docstring); writes CONVERT_REPORT_FILE in the output folder."""
    t0 = time.perf_counter()
    jobs, skipped = prepare(opts)
    opts.output.mkdir(parents=True, exist_ok=True)
    outcomes = run_jobs(opts, jobs) if jobs else []
    report = BatchReport(skipped + outcomes, time.perf_counter() - t0)
    write_text_atomic(opts.output / CONVERT_REPORT_FILE, json.dumps(report.to_json(), indent=1) + "\n")
    return report
