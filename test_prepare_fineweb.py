"""Tests of prepare_fineweb.py against a small Hugging Face Hub look-alike served on 127.0.0.1.

The server implements the two endpoints the script uses: the tree API (JSON, paginated
with Link headers) and resolve URLs (with HTTP Range support). It can drop a connection
mid-body, corrupt a body, list a wrong sha256 or return 404. The parquet files hold text
made up here, so no test needs the internet. tiktoken's GPT-2 files must be cached
(TIKTOKEN_CACHE_DIR) when the machine is offline.
"""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepare_fineweb

REPO, FOLDER = prepare_fineweb.HUB_SOURCES["fineweb"][:2]
SCRIPT = Path(__file__).with_name("prepare_fineweb.py")
EOT = 50256
# Small settings used by most tests: about 75k tokens in three files of three row groups.
VAL_TOKENS, SHARD_SIZE, NUM_TOKENS = 8_000, 15_000, 40_000
WORDS = ("the of and to in is was for on that with as by at from his her are were data model "
         "river city court light music winter paper garden market window history engine").split()


# -----------------------------------------------------------------------------
# Test data and the Hub look-alike

def make_documents(count, seed=0):
    """Return documents that each start with a unique number, 'Document 00042.', to identify them."""
    rng = random.Random(seed)
    documents = []
    for i in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))
        documents.append(f"Document {i:05d}. {words.capitalize()}.")
    documents[5] += " A page that quotes the GPT-2 separator <|endoftext|> in its text."
    documents[40] = f"Document {40:05d}. <|endoftext|>"
    return documents


def parquet_bytes(texts, row_group_size=40, columns=("text", "id")):
    table = {"text": texts, "id": [f"<urn:uuid:{hashlib.md5(t.encode()).hexdigest()}>" for t in texts]}
    table = pa.table({name: table[name] for name in columns})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd")
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="session")
def documents():
    return make_documents(360)


@pytest.fixture(scope="session")
def hub_files(documents):
    """Three parquet files of 120 documents in three row groups, keyed by their path in the repo."""
    return {f"{FOLDER}/{i:03d}_00000.parquet": parquet_bytes(documents[120 * i:120 * (i + 1)]) for i in range(3)}


class FakeHub:
    """A Hub look-alike on 127.0.0.1 serving files of one dataset repo."""

    def __init__(self, repo, files, page_size=2):
        self.repo, self.files, self.page_size = repo, dict(files), page_size
        self.listed_sha256 = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
        self.drop_first = set()  # paths whose first response ends after half the body
        self.corrupt_first = set()  # paths whose first response has a flipped byte
        self.missing = set()  # paths listed by the tree API whose resolve URL returns 404
        self.stalled = set()  # paths whose responses wait until release is set
        self.release = threading.Event()
        self.requests = []  # (path, Range header) of every request
        self.file_bytes_sent = 0  # body bytes of resolve responses
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.make_handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def tree_page(self, folder, cursor):
        paths = sorted(p for p in self.files if os.path.dirname(p) == folder)
        page = paths[cursor:cursor + self.page_size]
        entries = [{"type": "file", "path": p, "size": len(self.files[p]), "oid": "0" * 40,
                    "lfs": {"oid": self.listed_sha256[p], "size": len(self.files[p]), "pointerSize": 134}}
                   for p in page]
        next_cursor = cursor + self.page_size if cursor + self.page_size < len(paths) else None
        return entries, next_cursor

    def make_handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_body(self, status, body, headers=()):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path, _, query = self.path.partition("?")
                with hub.lock:
                    hub.requests.append((path, self.headers.get("Range")))
                tree_prefix = f"/api/datasets/{hub.repo}/tree/main"
                resolve_prefix = f"/datasets/{hub.repo}/resolve/main/"
                if path.startswith(tree_prefix):
                    cursor = int(query.partition("cursor=")[2] or 0)
                    entries, next_cursor = hub.tree_page(path[len(tree_prefix):].strip("/"), cursor)
                    headers = [("Content-Type", "application/json")]
                    if next_cursor is not None:
                        headers.append(("Link", f'<{hub.url}{path}?cursor={next_cursor}>; rel="next"'))
                    return self.send_body(200, json.dumps(entries).encode(), headers)
                name = path[len(resolve_prefix):]
                if not path.startswith(resolve_prefix) or name not in hub.files or name in hub.missing:
                    return self.send_body(404, b"Entry not found")
                self.send_file(name)

            def send_file(self, name):
                data = hub.files[name]
                with hub.lock:
                    drop = name in hub.drop_first
                    stall = name in hub.stalled
                    corrupt = name in hub.corrupt_first
                    hub.drop_first.discard(name)
                    hub.corrupt_first.discard(name)
                if stall:
                    hub.release.wait(timeout=60)
                if corrupt:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                status, headers, start, end = 200, [("Accept-Ranges", "bytes")], 0, len(data)
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if match:
                    start = int(match[1])
                    end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
                    status = 206
                    headers.append(("Content-Range", f"bytes {start}-{end - 1}/{len(data)}"))
                body = data[start:end]
                with hub.lock:
                    hub.file_bytes_sent += len(body) // 2 if drop else len(body)
                if not drop:
                    return self.send_body(status, body, headers)
                # Promise the whole body, send half of it and close the connection.
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for header in headers:
                    self.send_header(*header)
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.close_connection = True

        return Handler


@pytest.fixture
def hub(hub_files, monkeypatch):
    server = FakeHub(REPO, hub_files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


@pytest.fixture
def input_dir(hub_files, tmp_path):
    """The hub's parquet files as a local folder, under the same names."""
    folder = tmp_path / "input"
    folder.mkdir()
    for path, data in hub_files.items():
        (folder / os.path.basename(path)).write_bytes(data)
    return folder


# -----------------------------------------------------------------------------
# Helpers

def prepare(capsys, out_dir, *options, val_tokens=VAL_TOKENS, shard_size=SHARD_SIZE, num_tokens=NUM_TOKENS,
            workers=1):
    """Run prepare_fineweb.main with small settings; return its exit code and its stdout + stderr."""
    argv = ["--out_dir", str(out_dir), "--val_tokens", str(val_tokens), "--shard_size", str(shard_size),
            "--num_tokens", str(num_tokens), "--num_workers", str(workers), "--retry_wait", "0",
            *map(str, options)]
    code = prepare_fineweb.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def read_shard(path):
    header = np.fromfile(path, dtype="<i4", count=256)
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    return header, tokens


def shard_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).glob("fineweb_*.bin"))}


def split_documents(tokens):
    """Split a shard's tokens at EOT; a shard that starts inside a document yields its tail first."""
    starts = np.flatnonzero(tokens == EOT)
    pieces = np.split(tokens, starts)
    return [piece.tolist() for piece in pieces if len(piece)]


def document_numbers(out_dir, split):
    """Return the 'Document NNNNN.' number of every document that starts in the split's shards."""
    encoder = tiktoken.get_encoding("gpt2")
    numbers = []
    for path in sorted(Path(out_dir).glob(f"fineweb_{split}_*.bin")):
        for piece in split_documents(read_shard(path)[1]):
            if piece[0] == EOT:
                numbers.append(int(re.match(r"Document (\d+)\.", encoder.decode(piece[1:]))[1]))
    return numbers


def resolve_requests(hub):
    return [(path.rsplit("/", 1)[1], range_header) for path, range_header in hub.requests if "/resolve/" in path]


# -----------------------------------------------------------------------------
# Output format and the validation set

def test_shard_headers_and_token_counts(hub, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full")
    assert code == 0, output
    expected = {"fineweb_val_000000.bin": VAL_TOKENS, "fineweb_train_000001.bin": 15_000,
                "fineweb_train_000002.bin": 15_000, "fineweb_train_000003.bin": 10_000}
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*expected, "manifest.json", "parquet"])
    for name, count in expected.items():
        header, tokens = read_shard(tmp_path / "out" / name)
        assert header[:3].tolist() == [20240520, 1, count]
        assert not header[3:].any()
        assert len(tokens) == count
        assert tokens.max() <= EOT
    assert "val: 8,000 tokens" in output
    assert "train: 40,000 tokens" in output
    assert "tokens/s" in output


def test_val_shard_decodes_to_first_documents(hub, documents, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full", workers=2)
    assert code == 0, output
    encoder = tiktoken.get_encoding("gpt2")
    pieces = split_documents(read_shard(tmp_path / "out" / "fineweb_val_000000.bin")[1])
    assert len(pieces) > 10
    for i, piece in enumerate(pieces[:-1]):
        assert piece[0] == EOT
        assert encoder.decode(piece[1:]) == documents[i]
    # The last validation document is cut at the end of the validation set.
    last = len(pieces) - 1
    assert pieces[-1][1:] == encoder.encode_ordinary(documents[last])[:len(pieces[-1]) - 1]
    # Training starts at the next whole document.
    train = split_documents(read_shard(tmp_path / "out" / "fineweb_train_000001.bin")[1])
    assert train[0][0] == EOT
    assert encoder.decode(train[0][1:]) == documents[last + 1]


def test_val_fixed_and_disjoint_from_train(hub, tmp_path, capsys):
    for num_tokens, out in ((20_000, "small"), (NUM_TOKENS, "large")):
        code, output = prepare(capsys, tmp_path / out, "--fetch", "full", num_tokens=num_tokens)
        assert code == 0, output
    small, large = shard_bytes(tmp_path / "small"), shard_bytes(tmp_path / "large")
    assert small["fineweb_val_000000.bin"] == large["fineweb_val_000000.bin"]
    val_numbers = document_numbers(tmp_path / "large", "val")
    train_numbers = document_numbers(tmp_path / "large", "train")
    assert val_numbers == list(range(len(val_numbers)))
    assert train_numbers[0] == val_numbers[-1] + 1
    assert not set(val_numbers) & set(train_numbers)


def test_literal_endoftext_is_ordinary_text(input_dir, documents, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir, num_tokens=10**6)
    assert code == 0, output
    assert "the source ran out" in output
    tokens = np.concatenate([read_shard(p)[1] for p in sorted((tmp_path / "out").glob("fineweb_*.bin"))])
    assert (tokens == EOT).sum() == len(documents)
    encoder = tiktoken.get_encoding("gpt2")
    decoded = encoder.decode(tokens.tolist(), errors="strict")
    assert "<|endoftext|> in its text." in decoded
    assert f"Document {40:05d}. <|endoftext|>" in decoded


def test_source_too_small_for_val(input_dir, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir, val_tokens=10**7)
    assert code == 1
    assert "fewer than --val_tokens 10,000,000" in output
    assert "Lower --val_tokens" in output
    assert not list((tmp_path / "out").glob("fineweb_*.bin"))


# -----------------------------------------------------------------------------
# Downloads: interruptions, checksums, partial fetching

def test_dropped_connection_rerun_is_identical(hub, hub_files, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "reference", "--fetch", "full")
    assert code == 0, output
    first = f"{FOLDER}/000_00000.parquet"
    hub.drop_first.add(first)
    hub.requests.clear()
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full", "--retries", "0")
    assert code == 1
    assert f"{hub.url}/datasets/{REPO}/resolve/main/{first}" in output
    partial_size = (tmp_path / "out" / "parquet" / (first + ".incomplete")).stat().st_size
    assert 0 < partial_size < len(hub_files[first])
    assert not list((tmp_path / "out").glob("fineweb_*.bin"))

    hub.requests.clear()
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full", "--retries", "0")
    assert code == 0, output
    assert ("000_00000.parquet", f"bytes={partial_size}-") in resolve_requests(hub)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "reference")


def test_ctrl_c_stops_and_rerun_is_identical(hub, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "reference", "--fetch", "full")
    assert code == 0, output

    # Ctrl-C goes to the whole process group, pool workers included, while the parent waits for
    # the second file: the first file is tokenized by then, so the pool is up and idle.
    # NOTE: a Ctrl-C that reaches a worker mid-task depends on timing and is not reproduced here.
    second = f"{FOLDER}/001_00000.parquet"
    hub.stalled.add(second)
    hub.requests.clear()
    argv = [sys.executable, str(SCRIPT), "--out_dir", str(tmp_path / "out"), "--val_tokens", str(VAL_TOKENS),
            "--shard_size", str(SHARD_SIZE), "--num_tokens", str(NUM_TOKENS), "--num_workers", "2",
            "--fetch", "full"]
    process = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        for _ in range(600):
            if any(second in path for path, _ in list(hub.requests)):
                break
            threading.Event().wait(0.1)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        hub.release.set()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output
    assert "interrupted" in output

    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full")
    assert code == 0, output
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "reference")


@pytest.mark.parametrize("fetch", ["full", "range"])
def test_dropped_connection_is_retried(hub, hub_files, input_dir, fetch, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "reference", "--input_dir", input_dir)
    assert code == 0, output
    hub.drop_first.update(hub_files)
    code, output = prepare(capsys, tmp_path / "out", "--fetch", fetch, "--retries", "2")
    assert code == 0, output
    assert "retry 1/2" in output
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "reference")


def test_checksum_mismatch_is_fetched_again(hub, hub_files, input_dir, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "reference", "--input_dir", input_dir)
    assert code == 0, output
    first = f"{FOLDER}/000_00000.parquet"
    hub.corrupt_first.add(first)
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full", "--retries", "2")
    assert code == 0, output
    assert "checksum mismatch" in output
    assert [name for name, _ in resolve_requests(hub)].count("000_00000.parquet") == 2
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "reference")


def test_checksum_mismatch_is_reported(hub, tmp_path, capsys):
    first = f"{FOLDER}/000_00000.parquet"
    hub.listed_sha256[first] = "0" * 64
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full", "--retries", "1")
    assert code == 1
    assert f"checksum mismatch for {hub.url}/datasets/{REPO}/resolve/main/{first} after 2 download attempts" in output
    assert [name for name, _ in resolve_requests(hub)].count("000_00000.parquet") == 2
    assert not list((tmp_path / "out").rglob("*.parquet*"))
    assert not list((tmp_path / "out").glob("fineweb_*.bin"))


def test_small_budget_fetches_only_needed_bytes(hub, tmp_path, capsys):
    # A file of 30 row groups, large beside the 64 KiB that pyarrow reads first for the footer.
    large = parquet_bytes(make_documents(1200, seed=1))
    hub.files[f"{FOLDER}/000_00000.parquet"] = large
    hub.listed_sha256[f"{FOLDER}/000_00000.parquet"] = hashlib.sha256(large).hexdigest()
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "range", val_tokens=2_000, num_tokens=3_000)
    assert code == 0, output
    fetched = {name for name, _ in resolve_requests(hub)}
    assert fetched == {"000_00000.parquet"}
    assert all(range_header for _, range_header in resolve_requests(hub))
    assert hub.file_bytes_sent < 0.4 * len(large)
    assert not (tmp_path / "out" / "parquet").exists()


def test_whole_downloads_stop_at_budget(hub, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full", val_tokens=2_000, num_tokens=3_000)
    assert code == 0, output
    assert {name for name, _ in resolve_requests(hub)} == {"000_00000.parquet"}


def test_input_dir_range_and_full_agree(hub, input_dir, tmp_path, capsys):
    # The local run also uses another number of workers, which must not change the output.
    for out, options, workers in (("local", ["--input_dir", input_dir], 2), ("full", ["--fetch", "full"], 1),
                                  ("range", ["--fetch", "range"], 1), ("auto", [], 1)):
        code, output = prepare(capsys, tmp_path / out, *options, workers=workers)
        assert code == 0, output
    local = shard_bytes(tmp_path / "local")
    assert len(local) == 4
    assert shard_bytes(tmp_path / "full") == local
    assert shard_bytes(tmp_path / "range") == local
    assert shard_bytes(tmp_path / "auto") == local


def test_tree_api_pagination_lists_all_files(hub, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "range", num_tokens=10**6)
    assert code == 0, output
    tree_pages = [path for path, _ in hub.requests if path.startswith("/api/")]
    assert len(tree_pages) == 2
    assert {name for name, _ in resolve_requests(hub)} == {f"{i:03d}_00000.parquet" for i in range(3)}


# -----------------------------------------------------------------------------
# Reruns

def test_rerun_of_complete_output_does_nothing(hub, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "range")
    assert code == 0, output
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("fineweb_*.bin")}
    hub.requests.clear()
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "range")
    assert code == 0, output
    assert hub.requests == []
    assert output.count("reused from an earlier run") == 4
    assert "tokenized 0 tokens" in output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("fineweb_*.bin")} == before


def test_truncated_shard_is_redone(input_dir, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir)
    assert code == 0, output
    reference = shard_bytes(tmp_path / "out")
    shard = tmp_path / "out" / "fineweb_train_000002.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    kept_mtime = (tmp_path / "out" / "fineweb_train_000001.bin").stat().st_mtime_ns
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir)
    assert code == 0, output
    assert shard_bytes(tmp_path / "out") == reference
    assert (tmp_path / "out" / "fineweb_train_000001.bin").stat().st_mtime_ns == kept_mtime
    assert output.count("reused from an earlier run") == 3


def test_larger_budget_reuses_shards(input_dir, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir, num_tokens=20_000)
    assert code == 0, output
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir)
    assert code == 0, output
    assert "fineweb_train_000001.bin         15,000 tokens  (reused" in output
    assert "fineweb_train_000002.bin         15,000 tokens\n" in output
    code, output = prepare(capsys, tmp_path / "fresh", "--input_dir", input_dir)
    assert code == 0, output
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "fresh")


def test_smaller_budget_keeps_larger_output(input_dir, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir)
    assert code == 0, output
    reference = shard_bytes(tmp_path / "out")
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir, num_tokens=5_000)
    assert code == 0, output
    assert "tokenized 0 tokens" in output
    assert shard_bytes(tmp_path / "out") == reference


def test_other_settings_in_out_dir_are_rejected(input_dir, tmp_path, capsys):
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir)
    assert code == 0, output
    reference = shard_bytes(tmp_path / "out")
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir, val_tokens=9_000)
    assert code == 1
    assert "made with other settings" in output
    assert shard_bytes(tmp_path / "out") == reference


# -----------------------------------------------------------------------------
# Errors

def test_missing_text_column(tmp_path, capsys):
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "000_00000.parquet").write_bytes(parquet_bytes(["a", "b"], columns=("id",)))
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", folder)
    assert code == 1
    assert f"{folder / '000_00000.parquet'} has no 'text' column (its columns: id)" in output


def test_corrupt_parquet(tmp_path, capsys):
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "000_00000.parquet").write_bytes(b"this is not a parquet file" * 100)
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", folder)
    assert code == 1
    assert f"{folder / '000_00000.parquet'} is not a valid parquet file" in output


def test_corrupt_row_group(documents, tmp_path, capsys):
    data = bytearray(parquet_bytes(documents[:120]))
    data[200:4000] = bytes(3800)  # zero part of the first row group's compressed text
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "000_00000.parquet").write_bytes(bytes(data))
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", folder)
    assert code == 1
    assert f"of {folder / '000_00000.parquet'}" in output
    assert "corrupt" in output


def test_not_found_names_url(hub, tmp_path, capsys):
    first = f"{FOLDER}/000_00000.parquet"
    hub.missing.add(first)
    code, output = prepare(capsys, tmp_path / "out", "--fetch", "full")
    assert code == 1
    assert f"not found (HTTP 404): {hub.url}/datasets/{REPO}/resolve/main/{first}" in output


def test_unreachable_endpoint(tmp_path, capsys, monkeypatch):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens on this port now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, output = prepare(capsys, tmp_path / "out", "--retries", "1")
    assert code == 1
    assert f"failed to fetch http://127.0.0.1:{port}/api/datasets/{REPO}/tree/main/{FOLDER} after 2 tries" in output
    assert "HF_ENDPOINT" in output
    assert "--input_dir" in output


def test_unwritable_out_dir(input_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, output = prepare(capsys, tmp_path / "file" / "out", "--input_dir", input_dir)
    assert code == 1
    assert "Check that --out_dir" in output
    assert "Traceback" not in output


def test_input_dir_after_failed_download(input_dir, tmp_path, capsys, monkeypatch):
    # The error above suggests --input_dir; a manifest left without shards must not block it.
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    closed.server_close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.server_address[1]}")
    code, output = prepare(capsys, tmp_path / "out", "--retries", "0")
    assert code == 1
    code, output = prepare(capsys, tmp_path / "out", "--input_dir", input_dir)
    assert code == 0, output
    assert shard_bytes(tmp_path / "out")


def test_unknown_shards_in_out_dir_are_kept(input_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_train_000001.bin").write_bytes(b"someone else's shard")
    code, output = prepare(capsys, out, "--input_dir", input_dir)
    assert code == 1
    assert "did not record (fineweb_train_000001.bin" in output
    assert (out / "fineweb_train_000001.bin").read_bytes() == b"someone else's shard"


# -----------------------------------------------------------------------------
# Ready GPT-2 shards and the command line

def test_gpt2_shards_downloads_needed_shards(monkeypatch, tmp_path, capsys):
    files = {}
    for index in range(4):
        split = "val" if index == 0 else "train"
        header = np.zeros(256, dtype="<i4")
        header[:3] = 20240520, 1, 1000
        tokens = np.full(1000, index, dtype="<u2")
        files[f"fineweb_{split}_{index:06d}.bin"] = header.tobytes() + tokens.tobytes()
    hub = FakeHub(prepare_fineweb.GPT2_SHARDS_REPO, files)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        code, output = prepare(capsys, tmp_path / "out", "--source", "gpt2-shards", num_tokens=150_000_000)
    finally:
        hub.close()
    assert code == 0, output
    assert shard_bytes(tmp_path / "out") == {name: files[name] for name in
                                             ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                              "fineweb_train_000002.bin"]}


def test_command_line_run(input_dir, tmp_path):
    command = [sys.executable, str(SCRIPT), "--input_dir", str(input_dir), "--out_dir", str(tmp_path / "out"),
               "--val_tokens", "8000", "--shard_size", "15e3", "--num_tokens", "40_000", "--num_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 shards in" in result.stdout
    assert "train: 40,000 tokens" in result.stdout


def test_command_line_error_exit_code(tmp_path):
    command = [sys.executable, str(SCRIPT), "--input_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"no .parquet files in --input_dir {tmp_path}" in result.stderr
