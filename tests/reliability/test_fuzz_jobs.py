"""Fuzzed job payloads through the real Redis path: every invalid payload ends ``failed`` with a readable
reason naming the problem, no worker crashes, nothing stays pending, and the queue keeps serving.

A real service (embedded redis-server, local Ray, the bundled demo model) reads ``{p}:jobs``; hypothesis
generates payloads and the test ``XADD``s them exactly as a client would. Each generated case carries its
oracle: the fragments its error must contain (the field path and the problem). The base job the cases
mutate is valid and points at a real clip, so a payload the service wrongly accepts would run and end
``done``, failing the test.

Payloads without a usable job id (not JSON, not an object, no ``job`` field, a bad ``job_id``) fail under
``{p}:job:entry-<stream entry id>``: the entry id ``XADD`` returned is how a client finds them.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import string
import time
from dataclasses import dataclass
from typing import Any

import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import KEYS, RunningService, clip_video, results, service_settings

from pipeline.schemas import JOB_ID_PATTERN, JobRequest

ID = "\x00job-id\x00"  # replaced by a fresh job id per submission
SOURCE = "\x00source\x00"  # replaced by the path of a real, valid clip
VALID = {"job_id": ID, "source": SOURCE, "kind": "ask", "question": "what colour is the cross ?"}
EXAMPLES = 16  # hypothesis examples; each submits one payload of every category at once
FAIL_WITHIN_S = 10.0


@dataclass(frozen=True)
class Case:
    """One payload and its oracle."""

    what: str
    payload: Any  # a JSON-able value (placeholders inside), or the raw field text when ``raw``
    expect: tuple[str, ...]  # every fragment must appear in the error
    usable_id: bool = True  # False: the failure is recorded under entry-<entry id>
    raw: bool = False
    field_name: str = "job"

    def fields(self, job_id: str, source: str) -> dict[str, str]:
        text = self.payload if self.raw else json.dumps(_fill(self.payload, job_id, source))
        return {self.field_name: text}


def _fill(value: Any, job_id: str, source: str) -> Any:
    if isinstance(value, str):
        return value.replace(ID, job_id).replace(SOURCE, source)
    if isinstance(value, dict):
        return {k: _fill(v, job_id, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, job_id, source) for v in value]
    return value


def _with(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != name}


# -- value strategies -------------------------------------------------------------------------------

# Text a client can send (Redis field values are bytes; redis-py encodes str as UTF-8, which a lone
# surrogate cannot be). Lone surrogates reach the service as JSON escapes instead (see bad_unicode).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=12)
not_dicts = st.lists(json_values, max_size=3) | st.integers() | text | st.booleans()
letters = st.text(string.ascii_letters, min_size=1, max_size=12)
FIELDS = set(JobRequest.model_fields)


def _shown(name: str) -> tuple[str, ...]:
    """What of an unknown key the error must show: the key itself when it is short and printable."""
    return (f"{name}: unknown field",) if name and name.isprintable() and len(name) <= 64 else ("unknown field",)


@st.composite
def missing_field(draw):
    name = draw(st.sampled_from(["source", "kind", "question"]))
    expect = "an ask job needs a question" if name == "question" else f"{name}: Field required"
    return Case(f"missing {name}", _without(name), (expect,))


@st.composite
def unknown_field(draw):
    name = draw(text | st.text(min_size=100, max_size=5000))
    if name in FIELDS:
        name += "_x"
    value = draw(json_values)
    section = draw(st.sampled_from([None, "sampling", "pruning", "generation"]))
    if section is None:
        return Case("unknown field", _with(**{name: value}), _shown(name))
    return Case(f"unknown {section} field", _with(**{section: {name: value}}), ("unknown field", f"{section}."))


@st.composite
def wrong_type(draw):
    name = draw(st.sampled_from(["source", "kind", "question", "sampling", "generation", "pruning", "priority",
                                 "deadline"]))
    if name == "source":
        value = draw(st.none() | st.integers() | st.booleans() | st.lists(json_values, max_size=2)
                     | st.dictionaries(text, json_values, max_size=2))
        return Case("source type", _with(source=value), ("source: Input should be a valid string",))
    if name == "kind":
        value = draw(json_values.filter(lambda v: v not in ("ask", "caption")))
        return Case("kind", _with(kind=value), ("kind: Input should be 'ask' or 'caption'",))
    if name == "question":
        value = draw(st.integers() | st.lists(json_values, max_size=2) | st.just(""))
        return Case("question type", _with(question=value), ("question: ",))
    if name in ("sampling", "generation"):
        value = draw(not_dicts | st.none())
        return Case(f"{name} type", _with(**{name: value}), (f"{name}: Input should be a valid dictionary",))
    if name == "pruning":
        value = draw(st.lists(json_values, max_size=2) | st.integers() | st.booleans()
                     | text.filter(lambda v: v != "off"))
        expect = "pruning must be an object" if isinstance(value, str) else "pruning: Input should be a valid dictionary"
        return Case("pruning type", _with(pruning=value), (expect,))
    if name == "priority":
        value = draw(letters | st.none() | st.lists(json_values, max_size=2)
                     | st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)))
        return Case("priority type", _with(priority=value), ("priority: Input should be",))
    value = draw(letters | st.just("2030-01-01T00:00:00"))
    expect = "needs a time zone" if value.startswith("2030") else "deadline: Input should be a valid datetime"
    return Case("deadline", _with(deadline=value), (expect,))


@st.composite
def bad_job_id(draw):
    value = draw(st.integers() | st.lists(json_values, max_size=2)
                 | text.filter(lambda v: re.fullmatch(JOB_ID_PATTERN, v) is None)
                 | st.builds(lambda a, s: a + s, st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
                             st.sampled_from([":results", ":windows", ":events"])))
    return Case("job_id", _with(job_id=value), ("job_id: ",), usable_id=False)


@st.composite
def huge_string(draw):
    name = draw(st.sampled_from(["source", "question"]))
    limit = 4096 if name == "source" else 2000
    value = "a" * draw(st.integers(limit + 1, 200_000))
    return Case(f"huge {name}", _with(**{name: value}), (f"{name}: String should have at most {limit} characters",))


@st.composite
def bad_unicode(draw):
    head, tail = draw(text), draw(text)
    if draw(st.booleans()):
        name = draw(st.sampled_from(["source", "question"]))
        bad = draw(st.sampled_from(["\ud800", "\udfff", "\udc80"]))  # lone surrogates, as JSON escapes
        return Case(f"surrogate in {name}", _with(**{name: head + bad + tail}), (f"{name}: Input should be a valid string",))
    control = chr(draw(st.integers(0, 31)))  # fine in a question, never in a source
    return Case("control in source", _with(source=head + control + tail), ("source must not contain control characters",))


FLOATS = [("sampling", "window_s"), ("sampling", "stride_s"), ("sampling", "start_s"), ("sampling", "end_s"),
          ("sampling", "max_fps"), ("generation", "temperature"), ("pruning", "encoder_reduction"),
          ("pruning", "fastv_ratio")]


@st.composite
def non_finite(draw):
    section, name = draw(st.sampled_from(FLOATS))
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return Case(f"{name}={value}", _with(**{section: {name: value}}), (f"{section}.{name}: Input should be a finite number",))


@st.composite
def out_of_range(draw):
    options = {
        ("sampling", "frames_per_clip"): st.integers(max_value=0) | st.integers(65, 10**40),
        ("sampling", "window_s"): st.floats(max_value=0) | st.floats(3600.001, 1e300),
        ("sampling", "stride_s"): st.floats(max_value=0) | st.floats(3600.001, 1e300),
        ("sampling", "start_s"): st.floats(max_value=-1e-9),
        ("sampling", "end_s"): st.floats(max_value=0),
        ("sampling", "max_fps"): st.floats(max_value=0) | st.floats(240.001, 1e300),
        ("generation", "max_new_tokens"): st.integers(max_value=0) | st.integers(1025, 10**40),
        ("generation", "temperature"): st.floats(max_value=-1e-9) | st.floats(5.001, 1e300),
        ("pruning", "encoder_reduction"): st.floats(max_value=-1e-9) | st.floats(1.0, 1e300),
        ("pruning", "fastv_ratio"): st.floats(max_value=-1e-9) | st.floats(1.0, 1e300),
        ("pruning", "fastv_k"): st.integers(max_value=0),
        ("pruning", "min_per_frame"): st.integers(max_value=-1),
        (None, "priority"): st.integers(max_value=-1) | st.integers(10, 10**40),
    }
    section, name = draw(st.sampled_from(sorted(options, key=str)))
    value = draw(options[(section, name)].filter(math.isfinite))
    if section is None:
        return Case(f"{name}={value}", _with(**{name: value}), (f"{name}: Input should be",))
    return Case(f"{name}={value}", _with(**{section: {name: value}}), (f"{section}.{name}: Input should be",))


@st.composite
def start_after_end(draw):
    end = draw(st.floats(0.001, 1e6))
    start = draw(st.floats(end, 1e7))
    return Case("start ≥ end", _with(sampling={"start_s": start, "end_s": end}), ("end_s must be greater than start_s",))


def model_misfit(layers: int, patches: int):
    """Pruning the schema accepts but the loaded model cannot run: refused when the job is accepted."""
    fastv = st.integers(layers, 10**9).map(
        lambda k: Case("fastv_k", _with(pruning={"fastv_k": k, "fastv_ratio": 0.5}), (f"fastv_k={k}",)))
    strategy = letters.filter(lambda s: s not in ("uniform", "global", "redundancy")).map(
        lambda s: Case("temporal_strategy", _with(pruning={"temporal_strategy": s}), ("temporal_strategy must be one of",)))
    minimum = st.integers(patches + 1, 10**9).map(
        lambda m: Case("min_per_frame", _with(pruning={"encoder_method": "cls", "min_per_frame": m}),
                       (f"min_per_frame={m}",)))
    return fastv | strategy | minimum


def forbidden_source(outside: str):
    fixed = st.sampled_from([
        f"concat:{outside}|{outside}", f"subfile,,start,0,end,64,,:{outside}", f"subfile:{outside}",
        f"file://{outside}", outside, "/etc/passwd", "file:///etc/passwd", "data:video/mp4;base64,AAAA", "pipe:0",
        "fd:3", "crypto:/etc/passwd", "cache:/etc/passwd", "async:file:/etc/passwd", "ftp://127.0.0.1/x.mp4",
        "gopher://127.0.0.1/x", "javascript:alert(1)", "file://evil.example/etc/passwd", "smb://127.0.0.1/x.mp4",
    ])
    # SOURCE is a file in the root: two steps up leave the root.
    dotdot = st.integers(2, 12).map(lambda n: SOURCE + "/.." * n + "/etc/passwd")
    scheme = st.from_regex(r"[a-z][a-z0-9+.-]{0,10}", fullmatch=True).filter(
        lambda s: s not in ("file", "http", "https", "rtsp", "rtmp", "udp", "tcp", "hls"))
    other = st.builds(lambda s, rest: f"{s}://127.0.0.1/{rest}", scheme, letters)
    return (fixed | dotdot | other).map(lambda src: Case("forbidden source", _with(source=src), ("SourceForbidden",)))


@st.composite
def kind_mismatch(draw):
    if draw(st.booleans()):
        return Case("caption with question", _with(kind="caption"), ("a caption job takes a prompt, not a question",))
    return Case("deadline passed", _with(deadline="2001-01-01T00:00:00Z"), ("deadline passed",))


not_json = st.text(st.characters(exclude_categories=("Cs",)), max_size=200).filter(lambda t: not _is_json(t))
huge_number = st.integers(4301, 50_000).map(lambda n: '{"job_id": "x", "priority": 1' + "0" * n + "}")


def _is_json(t: str) -> bool:
    try:
        json.loads(t)
    except ValueError:
        return False
    return True


def envelope_cases():
    return (
        not_json.map(lambda t: Case("not JSON", t, ("invalid job: not JSON",), usable_id=False, raw=True))
        | huge_number.map(lambda t: Case("huge number", t, ("invalid job: not JSON",), usable_id=False, raw=True))
        | not_dicts.map(lambda v: Case("not an object", v, ("expected a JSON object",), usable_id=False))
        | text.filter(lambda n: n != "job").map(
            lambda n: Case("no job field", VALID, ("needs one field named 'job'",), usable_id=False, field_name=n))
    )


def categories(layers: int, patches: int, outside: str) -> list[st.SearchStrategy[Case]]:
    """One strategy per kind of bad input; every hypothesis example draws one case from each."""
    return [
        missing_field(), unknown_field(), wrong_type(), bad_job_id(), huge_string(), bad_unicode(), non_finite(),
        out_of_range(), start_after_end(), model_misfit(layers, patches), forbidden_source(outside), kind_mismatch(),
        envelope_cases(),
    ]


# -- the service ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    media = tmp_path_factory.mktemp("fuzz_media")
    outside = tmp_path_factory.mktemp("fuzz_outside")
    (outside / "secret.mp4").write_bytes(b"not for jobs")
    clip, sample = clip_video(media / "clip.mp4", 0)
    svc = RunningService(service_settings(media, **{"workers.max_active_jobs": "2"}))
    yield svc, str(clip), sample, str(outside / "secret.mp4")
    svc.close()
    ray.shutdown()


def _actor_pids(svc: RunningService) -> list[int]:
    s = svc.service
    return ray.get([a.pid.remote() for a in s.clip_actors + s.llm_workers], timeout=60)


def _submit_valid(r, job_id: str, clip: str, question: str) -> None:
    r.xadd(KEYS.jobs, {"job": json.dumps({"job_id": job_id, "source": clip, "kind": "ask", "question": question})})


def test_fuzzed_invalid_payloads_fail_readably_and_wedge_nothing(fuzz_env, checks):
    svc, clip, sample, outside = fuzz_env
    r = svc.redis
    model = svc.service.model_config
    layers = model.text_config.num_hidden_layers
    patches = (model.vision_config.image_size // model.vision_config.patch_size) ** 2
    pids_before = _actor_pids(svc)
    dead_before = r.xlen(KEYS.dead_letter)
    ids = itertools.count()
    seen: list[tuple[str, float]] = []

    kinds = categories(layers, patches, outside)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example, HealthCheck.filter_too_much])
    @given(st.tuples(*kinds))
    def submit_batch(cases: list[Case]) -> None:
        sent = []
        for case in cases:
            job_id = f"fz-{next(ids)}"
            at = time.time()
            entry = r.xadd(KEYS.jobs, case.fields(job_id, clip)).decode()
            sent.append((case, job_id if case.usable_id else f"entry-{entry}", at))
        for case, key, at in sent:
            state = checks.wait_final(r, key, timeout_s=FAIL_WITHIN_S)
            checks.assert_readable_failure(state, *case.expect, context=case.what)
            seen.append((case.what, float(state["finished_at"]) - at))

    submit_batch()
    slowest = max(seen, key=lambda s: s[1])
    print(f"\n{len(seen)} fuzzed payloads failed readably; slowest {slowest[1]:.2f} s ({slowest[0]}); "
          f"kinds: {sorted({w.split('=')[0] for w, _ in seen})}")
    assert len(seen) >= EXAMPLES * len(kinds)
    # Nothing left behind: no entry pending or waiting, nothing dead-lettered (bad input is never retried).
    assert checks.pending_count(r) == 0
    assert r.xlen(KEYS.jobs) == 0
    assert r.xlen(KEYS.dead_letter) == dead_before
    # No worker crashed (a crashed actor restarts with a new pid) and the queue still answers.
    assert _actor_pids(svc) == pids_before
    _submit_valid(r, "fz-after", clip, sample.qa.question)
    state = checks.wait_final(r, "fz-after", timeout_s=120)
    assert state["state"] == "done", state
    assert len(results(r, "fz-after")) == 1


def test_an_invalid_payload_reusing_a_finished_jobs_id_leaves_that_job_alone(fuzz_env, checks):
    """The failure of a bad duplicate is not written over the result of the job that owns the id."""
    svc, clip, sample, _ = fuzz_env
    r = svc.redis
    _submit_valid(r, "fz-owner", clip, sample.qa.question)
    assert checks.wait_final(r, "fz-owner", timeout_s=120)["state"] == "done"
    r.xadd(KEYS.jobs, {"job": json.dumps({"job_id": "fz-owner", "kind": "nonsense"})})
    deadline = time.monotonic() + 30
    while r.xlen(KEYS.jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.xlen(KEYS.jobs) == 0 and checks.pending_count(r) == 0
    assert checks.job_fields(r, "fz-owner")["state"] == "done"
    assert len(results(r, "fz-owner")) == 1


def test_a_job_id_naming_another_jobs_keys_is_refused(fuzz_env, checks):
    """``x:results`` is the results stream of job ``x``: such an id would make Redis answer WRONGTYPE."""
    svc, clip, sample, _ = fuzz_env
    r = svc.redis
    _submit_valid(r, "fz-named", clip, sample.qa.question)
    assert checks.wait_final(r, "fz-named", timeout_s=120)["state"] == "done"
    entries = [r.xadd(KEYS.jobs, {"job": json.dumps(_fill(VALID, f"fz-named{suffix}", clip))}).decode()
               for suffix in (":results", ":windows", ":events")]
    for entry in entries:
        state = checks.wait_final(r, f"entry-{entry}", timeout_s=FAIL_WITHIN_S)
        checks.assert_readable_failure(state, "job_id: ", "another job's keys")
    assert checks.job_fields(r, "fz-named")["state"] == "done"
    assert len(results(r, "fz-named")) == 1
    _submit_valid(r, "fz-named-after", clip, sample.qa.question)
    assert checks.wait_final(r, "fz-named-after", timeout_s=120)["state"] == "done"


# -- payloads that once broke the service loop itself (workers/service.py, pipeline/queue.py) --------


def test_non_utf8_payloads_fail_readably_and_block_nothing(fuzz_env, checks):
    svc, clip, sample, _ = fuzz_env
    r = svc.redis
    poison = [r.xadd(KEYS.jobs, {"job": b"\xff\xfe{\x80"}).decode(), r.xadd(KEYS.jobs, {b"\xc3\x28": b"x"}).decode()]
    try:
        _submit_valid(r, "fz-utf8-after", clip, sample.qa.question)
        for entry in poison:
            state = checks.wait_final(r, f"entry-{entry}", timeout_s=5)
            checks.assert_readable_failure(state, "invalid job")
        assert checks.wait_final(r, "fz-utf8-after", timeout_s=60)["state"] == "done"
        assert checks.pending_count(r) == 0
    finally:  # a poison entry left pending is reclaimed every lease and would disturb the next tests
        for entry in poison:
            r.xack(KEYS.jobs, KEYS.group, entry)
            r.xdel(KEYS.jobs, entry)


def test_deeply_nested_json_fails_readably_and_the_service_keeps_serving(fuzz_env, checks):
    svc, clip, sample, _ = fuzz_env
    r = svc.redis
    entries = [r.xadd(KEYS.jobs, {"job": payload}).decode() for payload in ("[" * 100_000, '{"a": ' * 50_000)]
    for entry in entries:
        state = checks.wait_final(r, f"entry-{entry}", timeout_s=5)
        checks.assert_readable_failure(state, "invalid job: not JSON", "nested too deeply")
    _submit_valid(r, "fz-deep-after", clip, sample.qa.question)
    assert checks.wait_final(r, "fz-deep-after", timeout_s=60)["state"] == "done"
    assert checks.pending_count(r) == 0
