"""Prometheus metrics of the operator (served on RVC_METRICS_PORT at /metrics).

rvc_experiments{phase}                   gauge: experiments seen by this operator, by phase (Pending, Queued,
                                         Running, Succeeded, Failed, Suspended)
rvc_experiment_phase{namespace,experiment,phase} gauge: 1 for each experiment's current phase
rvc_step_duration_seconds{step}          histogram: Job creation to completion of successful steps
rvc_job_failures_total{step,reason}      counter: failed step attempts (reason: BadInput, MissingWeights,
                                         OOMKilled, BackoffLimitExceeded, DeadlineExceeded, JobMissing, ...)
rvc_job_retries_total{step}              counter: retries scheduled after transient failures
rvc_jobs_created_total{step}             counter: Jobs created
rvc_reconcile_errors_total               counter: reconciles that raised (API or storage errors)
"""

from __future__ import annotations

import threading
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api import ExperimentPhase

PHASES = get_args(ExperimentPhase)  # Pending, Queued, Running, Succeeded, Failed, Suspended
# Steps last from seconds (preprocess on a few clips) to days (training).
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.experiments = Gauge("rvc_experiments", "RVCExperiments by phase", ["phase"], registry=r)
        self.step_duration = Histogram("rvc_step_duration_seconds", "Duration of successful steps",
                                       ["step"], buckets=DURATION_BUCKETS, registry=r)
        self.job_failures = Counter("rvc_job_failures_total", "Failed step attempts", ["step", "reason"],
                                    registry=r)
        self.job_retries = Counter("rvc_job_retries_total", "Retries of failed steps", ["step"], registry=r)
        self.jobs_created = Counter("rvc_jobs_created_total", "Jobs created", ["step"], registry=r)
        self.reconcile_errors = Counter("rvc_reconcile_errors_total", "Reconciles that failed", registry=r)
        self.experiment_phase = Gauge("rvc_experiment_phase", "Current phase of each experiment (1)",
                                      ["namespace", "experiment", "phase"], registry=r)
        self._phases: dict[str, str] = {}
        self._names: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        for p in PHASES:
            self.experiments.labels(p).set(0)

    def set_phase(self, uid: str, phase: str | None, namespace: str = "", name: str = "") -> None:
        with self._lock:
            old = self._phases.get(uid)
            ns_name = self._names.get(uid) or (namespace, name)
            if old and old != phase and ns_name[1]:
                self.experiment_phase.remove(*ns_name, old)
            if phase:
                self._phases[uid] = phase
                if name:
                    self._names[uid] = (namespace, name)
                    self.experiment_phase.labels(namespace, name, phase).set(1)
            else:
                self._phases.pop(uid, None)
                self._names.pop(uid, None)
            counts = dict.fromkeys(PHASES, 0)
            for p in self._phases.values():
                counts[p] = counts.get(p, 0) + 1
            for p, n in counts.items():
                self.experiments.labels(p).set(n)

    def forget(self, uid: str) -> None:
        self.set_phase(uid, None)

    def serve(self, port: int) -> None:
        if port > 0:
            start_http_server(port, registry=self.registry)


METRICS = OperatorMetrics()
