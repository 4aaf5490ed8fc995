"""The validator never crashes and never loses a line, whatever the bytes."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi3ops.data.validation import jsonl_files, validate_files
from phi3ops.errors import InvalidDataError

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]}).encode()
# Lines that look like data: mixes of real rows, JSON fragments, and arbitrary bytes.
LINES = st.one_of(
    st.just(GOOD),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"{", b"[]", b"null", b'{"messages": []}', b"\xef\xbb\xbf" + GOOD,
                     GOOD + b"\r", b'{"messages": [{"role": "user", "content": "a"}]}',
                     b"[" * 5000]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(LINES, max_size=30))
def test_lines_in_equal_accepted_plus_rejected(tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("v")
    path = tmp / "data.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    report = validate_files([path], tmp, tmp / "quarantine.jsonl")
    assert report.n_lines == len(lines)
    assert len(report.accepted) + report.n_rejected == len(lines)
    quarantined = [json.loads(x) for x in (tmp / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantined) == report.n_rejected
    assert all(q["file"] == "data.jsonl" and 1 <= q["line"] <= len(lines) for q in quarantined)


def test_folder_of_files_reports_each_file(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(GOOD + b"\n{oops\n")
    (tmp_path / "d" / "b.jsonl").write_bytes(b"[1]\n" + GOOD + b"\n")
    report = validate_files(jsonl_files(tmp_path / "d"), tmp_path, tmp_path / "q.jsonl")
    assert report.examples == ["d/a.jsonl:2: invalid_json: Expecting property name enclosed in "
                               "double quotes at column 2",
                               "d/b.jsonl:1: not_an_object: top level is list"]
    assert "2 rejected (50.0%)" in report.summary()


def test_a_missing_path_and_an_empty_file_are_clear_errors(tmp_path: Path):
    with pytest.raises(InvalidDataError, match=r"missing\.jsonl: no such file or folder"):
        jsonl_files(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    report = validate_files(jsonl_files(tmp_path / "empty.jsonl"), tmp_path, tmp_path / "q.jsonl")
    with pytest.raises(InvalidDataError, match=r"empty\.jsonl: no conversation in 0 line"):
        report.check(max_reject_fraction=0.2)
