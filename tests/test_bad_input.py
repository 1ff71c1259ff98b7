"""Random bytes as a CSV, TSV or JSON Lines file: prepare loads them or refuses them with a clear error, never a traceback."""
import os
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from mingpt import prepare

CSV_PIECES = st.sampled_from([b"review", b"sentiment", b",", b"\n", b"\r\n", b'"', b"1", b"0", b"-1",
                              "好看".encode(), "难看".encode(), b"\xef\xbb\xbf", b"\xff", b"\x00", b" "])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.one_of(st.binary(max_size=300), st.lists(CSV_PIECES, max_size=60).map(b"".join)))
def test_random_csv_bytes_never_crash_prepare(with_header, content):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.csv")
        with open(path, "wb") as f:
            f.write((b"review,sentiment\n" if with_header else b"") + content)
        code = prepare.main(["--csv", path, "--data_dir", os.path.join(folder, "out"), "--block_size", "8"])
        assert code in (0, 2)


JSONL_PIECES = st.sampled_from([b"{", b"}", b'"text"', b'"label"', b'"review"', b":", b",", b"\n", b"\t", b"1", b"0",
                                b"-1", b"[", b"]", b"null", b"true", b"1e999", b'"', b"\\", "好看".encode(),
                                "好看".encode("gbk"), "\ufeff".encode("gb18030"), b"\xff\xfe", b"\xff", b" "])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([b"", b'{"text": "x", "label": 1}\n', b"review\tsentiment\n"]),
       st.lists(JSONL_PIECES, max_size=60).map(b"".join), st.sampled_from(["auto", "csv", "tsv", "jsonl"]))
def test_random_jsonl_and_tsv_bytes_never_crash_prepare(start, content, fmt):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.jsonl")
        with open(path, "wb") as f:
            f.write(start + content)
        code = prepare.main(["--csv", path, "--format", fmt, "--data_dir", os.path.join(folder, "out"),
                             "--block_size", "8"])
        assert code in (0, 2)
