"""`rvc-pipeline` ends every foreseeable failure with one `error:` line and the right exit code.

Permanent (exit 2, the operator does not retry): wrong S3 credentials, no permission, a missing bucket,
bad URIs, manifests that cannot be parsed, values the spec accepts but the run cannot use. Transient
(exit 1, retried): refused connections, timeouts, 5xx/SlowDown. No traceback for any of them; only an
unexpected exception prints one. Storage cases run against a real S3 API (moto server).
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from rvc_pipeline import cli
from rvc_pipeline.core.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT

from tests.s3server import S3Endpoint, free_port, start_moto

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = "kind: RVCExperiment\nmetadata: {name: a}\nspec:\n  dataset: {source: d}\n  storage: {uri: o}\n"


def write_manifest(tmp_path: Path, dataset: str, storage: dict[str, Any], name: Any = "alice",
                   **spec: Any) -> Path:
    doc = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": name},
           "spec": {"dataset": {"source": dataset}, "storage": storage,
                    "resources": {"device": "cpu", "parallelism": 1}, **spec}}
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
            ) -> tuple[int, str, bool]:
    """(exit code, the single `error:` line, whether a traceback was logged or printed)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rvc_pipeline"):
        code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) <= 1, err
    traceback = "Traceback" in err or any(r.exc_info for r in caplog.records)
    return code, (lines[0] if lines else ""), traceback


def assert_one_line(result: tuple[int, str, bool], code: int, *needles: str) -> None:
    got, line, traceback = result
    print(line)  # shown with -rP
    assert got == code, (got, line)
    assert line and all(n in line for n in needles), (line, needles)
    assert not traceback, line
    assert len(line) < 2100 and not any(ord(c) < 32 for c in line)


# ---------------------------------------------------------------- manifests and spec values (no storage)


@pytest.mark.parametrize(("text", "needle"), [
    ("spec: [unclosed\n", "not valid YAML: expected ',' or ']'"),
    ("a: b\n  c: d: e\n", "not valid YAML: mapping values are not allowed here at line 2"),
    ("spec: *nowhere\n", "not valid YAML: found undefined alias"),
    ("- a\n- b\n", "found 0 (a YAML list is not a manifest)"),
    ("just a sentence\n", "found 0 (a YAML str is not a manifest)"),
    ("", "found 0"),
    ("kind: RVCExperiment\nmetadata: [x]\nspec: {dataset: {source: d}, storage: {uri: o}}\n",
     "metadata: expected a mapping"),
    ("kind: RVCExperiment\nspec: {dataset: {source: d}, storage: {uri: o}}\n", "metadata.name: required"),
    ("kind: RVCExperiment\nmetadata: {name: a}\n", "spec: required"),
    ("kind: RVCExperiment\nmetadata: {name: a}\nspec: hello\n", "spec: Input should be a valid dictionary"),
    ("kind: Job\nmetadata: {name: a}\nspec: {}\n", "found 0"),
    ("kind: RVCExperiment\napiVersion: rvc-operator.dev/v9\nmetadata: {name: a}\nspec: {}\n",
     "apiVersion: got 'rvc-operator.dev/v9'"),
    (MINIMAL + "  resources: {affinity: {a: " + "[" * 5000 + "]" * 5000 + "}}\n", "nested too deeply"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefg", "bcdefgh"))
     + MINIMAL + "  resources: {affinity: {x: *h}}\n",  # 10^8 values by reference: a YAML alias bomb
     "spec.resources.affinity: Value error, too large"),
    (MINIMAL + "  train: {epochs: 1" + "0" * 5000 + "}\n", "not valid YAML: Exceeds the limit (4300 digits)"),
    (MINIMAL + "  train: {seed: !!python/object/apply:os.system [echo PWNED]}\n",
     "not valid YAML: could not determine a constructor for the tag"),
    (MINIMAL + "  resources: {affinity: {a: \"\\e[2J\"}}\n",
     "spec.resources.affinity: Value error, contains the control character '\\x1b'"),
])
def test_unparseable_manifest_is_exit_2(tmp_path: Path, text: str, needle: str,
                                        capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    assert_one_line(run_cli(["run", "--spec", str(p)], capsys, caplog), EXIT_BAD_INPUT, "exp.yaml: ", needle)


def test_unreadable_manifest_files_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    binary = tmp_path / "model.pth"
    binary.write_bytes(b"\x80\x02\xff\xfe" * 100)
    assert_one_line(run_cli(["validate", "--spec", str(binary)], capsys, caplog), EXIT_BAD_INPUT,
                    "model.pth: not a UTF-8 text file")
    assert_one_line(run_cli(["f0", "--spec", str(tmp_path)], capsys, caplog), EXIT_BAD_INPUT,
                    "cannot read manifest: Is a directory")
    assert_one_line(run_cli(["run", "--spec", str(tmp_path / "absent.yaml")], capsys, caplog),
                    EXIT_BAD_INPUT, "absent.yaml: cannot read manifest")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n")
    assert_one_line(run_cli(["run", "--spec", str(huge)], capsys, caplog), EXIT_BAD_INPUT,
                    "huge.yaml:", "a manifest is at most")


@pytest.mark.parametrize(("storage", "needle"), [
    ({"uri": "ftp://host/runs"}, "spec.storage.uri: Value error, 'ftp://host/runs': unsupported URI"),
    ({"uri": "s3:/x"}, "spec.storage.uri: Value error, 's3:/x': an S3 URI is written s3://bucket/prefix"),
    ({"uri": "s3://"}, "spec.storage.uri: Value error, s3:// URI without a bucket"),
    ({"uri": "s3:///runs"}, "spec.storage.uri: Value error, s3:// URI without a bucket"),
    ({"uri": "s3://My_Bucket/runs"}, "'My_Bucket' is not a valid S3 bucket name"),
    ({"uri": "s3://10.0.0.1/runs"}, "'10.0.0.1' is not a valid S3 bucket name"),
    ({"uri": "s3://ok-bucket/runs", "endpoint": "minio:9000"}, "spec.storage.endpoint: Value error, "
                                                                "'minio:9000': expected an http:// or https://"),
    ({"uri": "s3://ok-bucket/runs", "endpoint": "http://key:secret@minio:9000"},
     "spec.storage.endpoint: Value error, must not contain credentials"),
])
def test_bad_storage_uri_is_exit_2_before_any_work(tmp_path: Path, storage: dict[str, Any], needle: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    p = write_manifest(tmp_path, str(tmp_path / "voices"), storage)
    assert_one_line(run_cli(["preprocess", "--spec", str(p)], capsys, caplog), EXIT_BAD_INPUT, needle)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(("name", "spec", "needle"), [
    ("../escape", {}, "metadata.name: '../escape' is not a valid experiment name"),
    ("a/b", {}, "metadata.name: 'a/b' is not a valid experiment name"),
    (".hidden", {}, "metadata.name: '.hidden'"),
    ("alice\n", {}, "metadata.name: 'alice\\n'"),
    ("alice", {"experimentName": ".."}, "spec.experimentName: Value error, must be lower-case"),
    ("alice", {"preprocess": {"segmentSeconds": 20}},
     "segmentSeconds 20: training uses pieces of 0.76 to 6.75"),
    ("alice", {"preprocess": {"segmentSeconds": 0.6, "overlapSeconds": 0.1}}, "segmentSeconds 0.6"),
    ("alice", {"train": {"resumeFrom": "s3://b/logs/bob/D_10.pth"}}, "is not a G_*.pth checkpoint"),
    ("alice", {"train": {"epochs": 10**12}}, "spec.train.epochs: Input should be less than or equal to"),
    ("alice", {"train": {"learningRate": float("nan")}}, "spec.train.learningRate: Input should be a finite"),
    ("alice", {"resources": {"memory": "16GB"}}, "spec.resources.memory: Value error, '16GB' is not a "
                                                 "Kubernetes quantity"),
])
def test_values_the_run_cannot_use_are_exit_2(tmp_path: Path, name: str, spec: dict[str, Any], needle: str,
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    p = write_manifest(tmp_path, str(tmp_path / "voices"), {"uri": str(tmp_path)}, name=name, **spec)
    assert_one_line(run_cli(["run", "--spec", str(p)], capsys, caplog), EXIT_BAD_INPUT, needle)
    assert not (tmp_path / "logs").exists()


def test_unknown_step_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                caplog: pytest.LogCaptureFixture) -> None:
    p = write_manifest(tmp_path, str(tmp_path / "voices"), {"uri": str(tmp_path)})
    assert_one_line(run_cli(["run", "--spec", str(p), "--steps", "preprocess,tune"], capsys, caplog),
                    EXIT_BAD_INPUT, "--steps: unknown step(s) ['tune']")


def test_interrupt_is_130_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_steps", interrupted)
    p = write_manifest(tmp_path, str(tmp_path / "voices"), {"uri": str(tmp_path)})
    assert cli.main(["run", "--spec", str(p)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted; completed steps keep their markers, rerun to continue"


def test_unexpected_exception_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        return 1 // 0

    monkeypatch.setattr(cli, "run_steps", boom)
    p = write_manifest(tmp_path, str(tmp_path / "voices"), {"uri": str(tmp_path)})
    code, line, traceback = run_cli(["run", "--spec", str(p)], capsys, caplog)
    assert code == EXIT_TRANSIENT and traceback
    assert line == "error: ZeroDivisionError: integer division or modulo by zero"


# ---------------------------------------------------------------- storage: real S3 API


@pytest.fixture(scope="module")
def iam_s3() -> Iterator[tuple[str, dict[str, dict[str, str]]]]:
    """A moto server that checks credentials: 5 unauthenticated requests create a user with full S3
    rights ("trainer") and one without any policy ("nobody"); every later request must be signed."""
    url, stop = start_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "5"})
    try:
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = {}
        for user in ("trainer", "nobody"):
            iam.create_user(UserName=user)
            k = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {"AWS_ACCESS_KEY_ID": k["AccessKeyId"],
                          "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"]}
            if user == "trainer":
                iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                     aws_access_key_id=keys["trainer"]["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=keys["trainer"]["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="secure")
        yield url, keys
    finally:
        stop()


def _quick_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("RVC_STORAGE_ATTEMPTS", "1")
    monkeypatch.setenv("RVC_STORAGE_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("RVC_STORAGE_READ_TIMEOUT", "1")
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("which", ["unknown-key", "wrong-secret", "no-permission"])
def test_bad_credentials_and_access_denied_are_exit_2(
    iam_s3: tuple[str, dict[str, dict[str, str]]], which: str, tmp_path: Path, voice_dir: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    url, keys = iam_s3
    _quick_storage(monkeypatch)
    creds = dict(keys["nobody" if which == "no-permission" else "trainer"])
    if which == "unknown-key":
        creds["AWS_ACCESS_KEY_ID"] = "AKIANOTAREALKEY00000"
    elif which == "wrong-secret":
        creds["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    p = write_manifest(tmp_path, str(voice_dir), {"uri": "s3://secure/runs", "endpoint": url})
    assert_one_line(run_cli(["preprocess", "--spec", str(p)], capsys, caplog), EXIT_BAD_INPUT,
                    "error: s3://secure/runs", "access denied")


def test_missing_bucket_is_exit_2(s3: S3Endpoint, tmp_path: Path, voice_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                  caplog: pytest.LogCaptureFixture) -> None:
    _quick_storage(monkeypatch)
    p = write_manifest(tmp_path, str(voice_dir), {"uri": "s3://no-such-bucket-here/runs", "endpoint": s3.url})
    assert_one_line(run_cli(["preprocess", "--spec", str(p)], capsys, caplog), EXIT_BAD_INPUT,
                    "error: s3://no-such-bucket-here: bucket does not exist")
    # a dataset in a missing bucket, storage fine: the same, naming the dataset's bucket
    p = write_manifest(tmp_path, "s3://no-such-voices/alice/", {"uri": s3.uri("runs"), "endpoint": s3.url})
    assert_one_line(run_cli(["preprocess", "--spec", str(p)], capsys, caplog), EXIT_BAD_INPUT,
                    "s3://no-such-voices")


class _SlowDown(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with 503 SlowDown, as S3 does under load."""

    def _answer(self) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *_a: Any) -> None:
        pass


@pytest.fixture
def slowdown_endpoint() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["refused", "slowdown", "timeout"])
def test_transient_storage_failures_are_exit_1_without_traceback(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, voice_dir: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    _quick_storage(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = {"refused": lambda: f"http://127.0.0.1:{free_port()}",
                "slowdown": lambda: request.getfixturevalue("slowdown_endpoint"),
                "timeout": lambda: request.getfixturevalue("silent_endpoint")}[kind]()
    p = write_manifest(tmp_path, str(voice_dir), {"uri": "s3://busy/runs", "endpoint": endpoint})
    needle = "SlowDown" if kind == "slowdown" else endpoint
    assert_one_line(run_cli(["preprocess", "--spec", str(p)], capsys, caplog), EXIT_TRANSIENT,
                    "s3://busy/runs", needle)


def test_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The installed entry point as the operator's pod runs it: stderr holds one line, no traceback."""
    p = write_manifest(tmp_path, str(tmp_path / "voices"), {"uri": "s3://ok-bucket/runs"},
                       train={"batchSize": 0, "learningRate": float("inf")})
    out = subprocess.run([sys.executable, "-m", "rvc_pipeline.cli", "run", "--spec", str(p)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "spec.train.batchSize: Input should be greater than or equal to 1" \
        in line and "spec.train.learningRate: Input should be a finite number" in line


def test_weights_cache_unreachable_is_transient_not_missing(s3: S3Endpoint, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 outage while looking for weights must be retried (exit 1), not reported as missing (exit 3)."""
    from rvc_pipeline.core.errors import EXIT_NO_WEIGHTS, classify
    from rvc_pipeline.core.spec import parse_spec
    from rvc_pipeline.weights import resolve_weight

    _quick_storage(monkeypatch)
    monkeypatch.setenv("RVC_WEIGHTS_DIR", str(tmp_path / "cache"))
    down = f"http://127.0.0.1:{free_port()}"
    for ref, cache in [("hubert_base.pt", "s3://weights/"), ("s3://weights/hubert_base.pt", None)]:
        spec = parse_spec({"dataset": {"source": str(tmp_path)},
                           "storage": {"uri": str(tmp_path), "endpoint": down}, "weightsCache": cache})
        with pytest.raises(Exception) as ei:
            resolve_weight(ref, spec, what="HuBERT", allow_online=False)
        f = classify(ei.value)
        assert f.code == EXIT_TRANSIENT and f.expected and down in f.message, f
    # the same look-ups on a live endpoint whose bucket does not hold the file: missing weights (exit 3)
    for ref, cache in [("hubert_base.pt", s3.uri("weights")), (s3.uri("weights/hubert_base.pt"), None),
                       ("hubert_base.pt", "s3://no-such-weights/")]:
        spec = parse_spec({"dataset": {"source": str(tmp_path)},
                           "storage": {"uri": str(tmp_path), "endpoint": s3.url}, "weightsCache": cache})
        with pytest.raises(Exception) as ei:
            resolve_weight(ref, spec, what="HuBERT", allow_online=False)
        assert classify(ei.value).code == EXIT_NO_WEIGHTS, ei.value
