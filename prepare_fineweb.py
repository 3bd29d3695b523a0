"""
Prepare FineWeb as GPT-2 token shards for train.py.

Lists FineWeb's sample/10BT parquet files through the Hugging Face Hub tree API
(or reads local parquet files), tokenizes the `text` column with tiktoken's
GPT-2 BPE in a process pool, and writes shards in the llm.c / modded-nanogpt
format to --out_dir:

    fineweb_val_000000.bin     the first --val_tokens tokens of the source
    fineweb_train_000001.bin   then --shard_size tokens a shard, until
    fineweb_train_000002.bin   --num_tokens training tokens are written
    ...

A shard is a header of 256 little-endian int32 (magic 20240520, version 1,
token count, zeros) followed by the tokens as uint16. Every document starts
with the end-of-text token 50256. The document that crosses the end of the
validation set is cut there and the training shards start at the next one,
so no validation text is trained on, and the validation set is the same for
every --num_tokens.

    python prepare_fineweb.py                        # 2B training tokens of FineWeb
    python prepare_fineweb.py --num_tokens 2e6 --val_tokens 262144     # CPU demo
    python prepare_fineweb.py --source fineweb-edu   # FineWeb-Edu, to data/fineweb_edu10B
    python prepare_fineweb.py --input_dir DIR        # local parquet files, no download
    python prepare_fineweb.py --source gpt2-shards   # ready shards of kjj0/fineweb10B-gpt2

Downloads go to a temporary name, resume with HTTP Range after an interruption,
are checked against the size and sha256 that the Hub lists, and are renamed
into place only when complete. A small budget reads only the parquet row
groups it needs with HTTP range requests (see --fetch). HF_ENDPOINT selects a
Hub mirror. tiktoken downloads its GPT-2 files once and caches them (set
TIKTOKEN_CACHE_DIR to choose where). A rerun keeps the complete shards listed
in out_dir/manifest.json and redoes missing or truncated ones. The same
source files and settings give byte-identical shards.
"""

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from glob import glob
from urllib.parse import urljoin

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import tiktoken
from tqdm import tqdm

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
EOT = 50256  # <|endoftext|> in tiktoken's gpt2 encoding
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the token count as int32
HUB_SOURCES = {  # --source: (Hub dataset repo, folder of parquet files, default --out_dir)
    "fineweb": ("HuggingFaceFW/fineweb", "sample/10BT", "data/fineweb10B"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample/10BT", "data/fineweb_edu10B"),
}
GPT2_SHARDS_REPO = "kjj0/fineweb10B-gpt2"  # FineWeb 10B as GPT-2 shards of 100M tokens
GPT2_SHARDS_REPO_SHARD_TOKENS = 100_000_000
# Estimate: sample/10BT contains about 10B GPT-2 tokens in about 30.7 GB of parquet.
TOKENS_PER_PARQUET_BYTE = 0.33
CHARS_PER_TOKEN = 4  # rough GPT-2 ratio for English text, used only to limit read-ahead
DOCS_PER_TASK = 128  # documents in one tokenizer task
TASKS_PER_WORKER = 4  # tokenizer tasks in flight per worker process
MANIFEST = "manifest.json"
START_OVER = "Delete the fineweb_*.bin shards and manifest.json in {out_dir} to start over."


class PrepareError(Exception):
    """An error the user can act on: main() prints it and exits with status 1."""


class TransientHTTPError(Exception):
    """A failed request worth retrying: HTTP 429, a 5xx status or a short body."""

    def __init__(self, message, retry_after=0.0):
        super().__init__(message)
        self.retry_after = retry_after


RETRYABLE = (requests.ConnectionError, requests.Timeout,
             requests.exceptions.ChunkedEncodingError, TransientHTTPError)


# -----------------------------------------------------------------------------
# HTTP: the Hub tree API, verified resumable downloads, range reads

class HubClient:
    """A requests session for one Hub endpoint, with retries and errors that name the URL."""

    def __init__(self, endpoint, retries, retry_wait):
        self.endpoint = endpoint.rstrip("/")
        self.retries = retries
        self.retry_wait = retry_wait
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "prepare_fineweb.py"

    def get(self, url, headers=None, stream=False):
        """Send one GET and return the response if its status is below 400."""
        response = self.session.get(url, headers=headers, stream=stream, timeout=(10, 60))
        status = response.status_code
        if status == 429 or status >= 500:
            retry_after = response.headers.get("Retry-After", "")
            response.close()
            wait = float(retry_after) if retry_after.isdigit() else 0.0
            raise TransientHTTPError(f"HTTP {status}", retry_after=min(wait, 300.0))
        if status == 404:
            raise PrepareError(f"not found (HTTP 404): {url}\n"
                               "Check --source, and HF_ENDPOINT if you use a mirror.")
        if status >= 400:
            raise PrepareError(f"HTTP {status} for {url}: {response.text[:200]}")
        return response

    def retry(self, url, attempt):
        """Call attempt() until it succeeds, waiting retry_wait * 2**i seconds (at most 60) after failure i."""
        for i in range(self.retries + 1):
            try:
                return attempt()
            except RETRYABLE as err:
                error = err
                if i == self.retries:
                    break
                wait = max(min(self.retry_wait * 2**i, 60.0), getattr(err, "retry_after", 0.0))
                tqdm.write(f"retry {i + 1}/{self.retries} of {url} in {wait:g}s after: {err}")
                time.sleep(wait)
        raise PrepareError(f"failed to fetch {url} after {self.retries + 1} tries: {error}\n"
                           "Check the network, set HF_ENDPOINT to a reachable Hub mirror, "
                           "or use --input_dir DIR with local parquet files.")


@dataclass
class SourceFile:
    name: str  # path in the Hub repo, or path relative to --input_dir
    size: int  # bytes
    sha256: str = None  # of the whole file, as the Hub tree API lists it (LFS files)
    git_oid: str = None  # git blob sha1, which the Hub lists for files not in LFS
    url: str = None
    local_path: str = None


def list_hub_files(client, repo, folder, suffix):
    """List the files of a Hub dataset folder ending in suffix, sorted by path."""
    url = f"{client.endpoint}/api/datasets/{repo}/tree/main"
    url += f"/{folder}" if folder else ""
    files = []
    while url:
        response = client.retry(url, lambda: client.get(url))
        try:
            entries = response.json()
        except ValueError:
            raise PrepareError(f"{url} did not return JSON. Is HF_ENDPOINT a Hugging Face Hub?")
        for entry in entries:
            if entry.get("type") != "file" or not entry["path"].endswith(suffix):
                continue
            lfs = entry.get("lfs") or {}
            files.append(SourceFile(
                name=entry["path"], size=entry["size"], sha256=lfs.get("oid"),
                git_oid=entry.get("oid"), url=f"{client.endpoint}/datasets/{repo}/resolve/main/{entry['path']}"))
        next_url = response.links.get("next", {}).get("url")  # the tree API paginates with Link headers
        url = urljoin(url, next_url) if next_url else None
    if not files:
        raise PrepareError(f"no {suffix} files in {repo}/{folder} at {client.endpoint}")
    return sorted(files, key=lambda f: f.name)


def ensure_free_space(directory, nbytes, purpose):
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise PrepareError(f"not enough free disk space in {directory} for {purpose}: "
                           f"{nbytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free. "
                           "Free some space or choose another --out_dir or --download_dir.")


def file_digest(path, git_blob=False):
    """Return the sha256 of a file, or its git blob sha1 when git_blob is set."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path)) if git_blob else hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def fetch_remaining_bytes(client, file, partial, bar):
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    if have == file.size:
        return
    headers = {"Range": f"bytes={have}-"} if 0 < have < file.size else None
    with client.get(file.url, headers=headers, stream=True) as response:
        if response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            os.remove(partial)
            raise TransientHTTPError(f"{file.url} sent a different range than requested")
        if response.status_code != 206:  # the server sent the whole file
            have = 0
            bar.reset(total=file.size)
        with open(partial, "ab" if have else "wb") as out:
            # Small blocks, because the block being read when a connection drops is lost.
            for block in response.iter_content(1 << 14):
                out.write(block)
                bar.update(len(block))
    size = os.path.getsize(partial)
    if size > file.size:
        os.remove(partial)
        raise PrepareError(f"{file.url} sent {size} bytes, more than the {file.size} the Hub lists")
    if size < file.size:
        raise TransientHTTPError(f"connection closed after {size} of {file.size} bytes")


def download(client, file, dest):
    """Download file to dest, resuming dest.incomplete, and verify its size and checksum."""
    if os.path.exists(dest) and os.path.getsize(dest) == file.size:
        return  # only a verified download is renamed to dest
    partial = dest + ".incomplete"
    for attempt in range(client.retries + 1):
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        ensure_free_space(os.path.dirname(dest), file.size - have, file.name)
        with tqdm(total=file.size, initial=have, unit="B", unit_scale=True,
                  desc=os.path.basename(dest), leave=False) as bar:
            client.retry(file.url, lambda: fetch_remaining_bytes(client, file, partial, bar))
        expected = file.sha256 or file.git_oid
        actual = file_digest(partial, git_blob=not file.sha256)
        if expected is None or actual == expected:
            os.replace(partial, dest)
            return
        os.remove(partial)
        if attempt < client.retries:
            tqdm.write(f"checksum mismatch for {file.url}: expected {expected}, got {actual}. "
                       f"Downloading it again ({attempt + 1}/{client.retries}).")
    raise PrepareError(f"checksum mismatch for {file.url} after {client.retries + 1} download attempts "
                       f"(expected {expected}). The download was deleted. Try again later, "
                       "or set HF_ENDPOINT to another mirror.")


class RangeFile(io.RawIOBase):
    """Read-only seekable view of a remote file that fetches each read with an HTTP range request.

    pyarrow reads the parquet footer and then one range per column chunk through it.
    Range reads cannot be checked against the sha256 of the whole file, so only the
    total size in each Content-Range header is checked against the size the Hub lists.
    """

    def __init__(self, client, file):
        self.client, self.file, self.position = client, file, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.file.size}[whence]
        self.position = base + offset
        return self.position

    def readinto(self, buffer):
        count = min(len(buffer), self.file.size - self.position)
        if count <= 0:
            return 0
        data = self.client.retry(self.file.url, lambda: self.fetch(self.position, count))
        buffer[:count] = data
        self.position += count
        return count

    def fetch(self, start, count):
        url = self.file.url
        response = self.client.get(url, headers={"Range": f"bytes={start}-{start + count - 1}"})
        if response.status_code != 206:
            raise PrepareError(f"{url} ignores HTTP range requests. Use --fetch full.")
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if total != str(self.file.size):
            raise PrepareError(f"{url} has {total} bytes, but the Hub lists {self.file.size}")
        if len(response.content) != count:
            raise TransientHTTPError(f"got {len(response.content)} of {count} bytes")
        return response.content


# -----------------------------------------------------------------------------
# Reading documents

@dataclass
class Position:
    """A place in the source's token stream: a document and a token offset inside it."""
    file: str = None  # SourceFile.name; None is the start of the source
    row_group: int = 0
    row: int = 0  # document index inside the row group
    token: int = 0  # tokens of this document already written, its EOT included


def open_parquet(file, args, client, tokens_needed):
    """Open a source file for reading, downloading it whole or reading it by range requests."""
    source = where = file.local_path
    if file.local_path is None:
        where = file.url
        mode = args.fetch
        if mode == "auto":  # a whole download is verifiable, so use it when much of the file is needed
            mode = "range" if tokens_needed < 0.5 * file.size * TOKENS_PER_PARQUET_BYTE else "full"
        if mode == "full":
            source = os.path.join(args.download_dir, file.name)
            os.makedirs(os.path.dirname(source), exist_ok=True)
            download(client, file, source)
        else:
            source = RangeFile(client, file)
    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as err:
        raise PrepareError(f"{where} is not a valid parquet file ({err}). Replace or delete it.")
    if "text" not in parquet.schema_arrow.names:
        raise PrepareError(f"{where} has no 'text' column (its columns: {', '.join(parquet.schema_arrow.names)}). "
                           "--input_dir needs parquet files with FineWeb's 'text' column.")
    return parquet, where


def iter_text_batches(files, start, open_file):
    """Yield (file_index, row_group, first_row, texts) in source order from start, one row group in memory."""
    start_index = 0 if start.file is None else [f.name for f in files].index(start.file)
    for file_index in range(start_index, len(files)):
        parquet, where = open_file(files[file_index])
        at_start = file_index == start_index
        for group in range(start.row_group if at_start else 0, parquet.num_row_groups):
            try:
                texts = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
            except (pa.ArrowException, OSError) as err:
                raise PrepareError(f"cannot read row group {group} of {where} ({err}). "
                                   "The file is corrupt: replace or delete it.")
            first_row = start.row if at_start and group == start.row_group else 0
            for row in range(first_row, len(texts), DOCS_PER_TASK):
                yield file_index, group, row, texts[row:row + DOCS_PER_TASK]


# -----------------------------------------------------------------------------
# Tokenization

def init_worker():
    global encoder
    # Ctrl-C reaches every process of the group. Only the parent handles it: a worker killed mid-task
    # can leave the pool's queues half-read or half-written, and the pool then hangs on shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    encoder = tiktoken.get_encoding("gpt2")


def tokenize_documents(texts):
    """Tokenize documents, each after one EOT; return the uint16 tokens and each document's length."""
    arrays = []
    for text in texts:
        ids = encoder.encode_ordinary(text or "")  # a literal "<|endoftext|>" stays ordinary text
        tokens = np.empty(len(ids) + 1, dtype=np.int32)
        tokens[0] = EOT
        tokens[1:] = ids
        arrays.append(tokens)
    tokens = np.concatenate(arrays)
    if tokens.max() >= 2**16:  # gpt2 ids are below 50257, so this guards the uint16 format only
        raise ValueError(f"token id {tokens.max()} does not fit uint16")
    return tokens.astype("<u2"), np.array([len(a) for a in arrays])


class TokenStream:
    """Source tokens in order from a Position, tokenized by a process pool a few tasks ahead."""

    def __init__(self, pool, files, start, batches, tokens_needed, max_in_flight):
        self.pool, self.files, self.start, self.batches = pool, files, start, batches
        self.tokens_needed, self.max_in_flight = tokens_needed, max_in_flight
        self.pending = deque()  # (file_index, row_group, first_row, estimated tokens, async result)
        self.tokens = None  # the current batch
        self.cursor = 0

    def in_flight_estimate(self):
        return sum(task[3] for task in self.pending)

    def read_ahead(self):
        # Read ahead only while the tokens in flight may still be needed, so a run does not
        # fetch row groups or whole files past its budget.
        while len(self.pending) < self.max_in_flight and (
                not self.pending or self.in_flight_estimate() < self.tokens_needed()):
            batch = next(self.batches, None)
            if batch is None:
                return
            file_index, group, row, texts = batch
            estimate = sum(len(t or "") for t in texts) // CHARS_PER_TOKEN
            result = self.pool.apply_async(tokenize_documents, (texts,))
            self.pending.append((file_index, group, row, estimate, result))

    def next_batch(self):
        self.read_ahead()
        if not self.pending:
            return False
        file_index, group, row, _, result = self.pending.popleft()
        self.tokens, lengths = result.get()
        self.doc_ends = np.cumsum(lengths)
        self.batch_start = (file_index, group, row)
        self.cursor = 0
        if self.start is not None:  # resuming inside a document
            if self.start.token >= self.doc_ends[0]:
                raise PrepareError(f"{self.files[file_index].name} changed since the shards were written. "
                                   "Delete the shards and manifest.json in the output folder to start over.")
            self.cursor, self.start = self.start.token, None
        return True

    def read(self, max_tokens):
        """Return up to max_tokens next tokens; an empty array at the end of the source."""
        while self.tokens is None or self.cursor >= len(self.tokens):
            if not self.next_batch():
                return np.empty(0, dtype="<u2")
        chunk = self.tokens[self.cursor:self.cursor + max_tokens]
        self.cursor += len(chunk)
        return chunk

    def current_document(self):
        doc = int(np.searchsorted(self.doc_ends, self.cursor, side="right"))
        doc_start = int(self.doc_ends[doc - 1]) if doc else 0
        return doc, doc_start

    def position(self):
        if self.tokens is None:
            return self.start
        doc, doc_start = self.current_document()
        file_index, group, row = self.batch_start
        return Position(self.files[file_index].name, group, row + doc, self.cursor - doc_start)

    def skip_rest_of_document(self):
        if self.tokens is None:
            return
        doc, doc_start = self.current_document()
        if self.cursor > doc_start:
            self.cursor = int(self.doc_ends[doc])


# -----------------------------------------------------------------------------
# Shards and the manifest

def shard_is_complete(path, tokens):
    if not os.path.exists(path) or os.path.getsize(path) != HEADER_BYTES + 2 * tokens:
        return False
    header = np.fromfile(path, dtype="<i4", count=3)
    return header.tolist() == [MAGIC, VERSION, tokens]


def write_shard(stream, path, capacity, bar, require_full=False):
    """Write up to capacity tokens from stream to path and return the count.

    Nothing is written when the count is 0, or below capacity with require_full set.
    """
    ensure_free_space(os.path.dirname(path), HEADER_BYTES + 2 * capacity, os.path.basename(path))
    temporary = path + ".tmp"
    count = 0
    try:
        with open(temporary, "wb") as out:
            out.write(bytes(HEADER_BYTES))  # the header is filled in once the count is known
            while count < capacity:
                chunk = stream.read(capacity - count)
                if len(chunk) == 0:
                    break
                out.write(chunk.tobytes())
                count += len(chunk)
                bar.update(len(chunk))
            header = np.zeros(HEADER_INTS, dtype="<i4")
            header[:3] = MAGIC, VERSION, count
            out.seek(0)
            out.write(header.tobytes())
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.remove(temporary)
        raise
    if count == 0 or (require_full and count < capacity):
        os.remove(temporary)
    else:
        os.replace(temporary, path)
    return count


def load_manifest(out_dir, settings):
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        unknown = sorted(glob(os.path.join(out_dir, "fineweb_*.bin")))
        if unknown:
            raise PrepareError(f"{out_dir} has shards that this script did not record ({os.path.basename(unknown[0])} ...). "
                               "Move them away or choose another --out_dir.")
        return []
    try:
        with open(path) as f:
            manifest = json.load(f)
        for shard in manifest["shards"]:
            shard["start"], shard["end"] = Position(**shard["start"]), Position(**shard["end"])
    except (ValueError, KeyError, TypeError) as err:
        raise PrepareError(f"{path} is invalid ({err!r}). {START_OVER.format(out_dir=out_dir)}")
    has_shards = any(os.path.exists(os.path.join(out_dir, shard["name"])) for shard in manifest["shards"])
    if not has_shards:
        return []  # a run that failed before its first shard: nothing to keep, whatever its settings
    if manifest.get("settings") != settings:
        raise PrepareError(f"the shards in {out_dir} were made with other settings:\n  {manifest.get('settings')}\n"
                           f"this run uses:\n  {settings}\nChoose another --out_dir, or "
                           + START_OVER.format(out_dir=out_dir).lower())
    return manifest["shards"]


def save_manifest(out_dir, settings, shards):
    entries = [{**{k: v for k, v in shard.items() if k != "reused"}, "start": vars(shard["start"]),
                "end": vars(shard["end"])} for shard in shards]
    temporary = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(temporary, "w") as f:
        json.dump({"settings": settings, "shards": entries}, f, indent=1)
    os.replace(temporary, os.path.join(out_dir, MANIFEST))


# -----------------------------------------------------------------------------
# The two modes: tokenize parquet files, or fetch ready shards

def list_source_files(args, client):
    if args.input_dir is None:
        repo, folder, _ = HUB_SOURCES[args.source]
        return list_hub_files(client, repo, folder, ".parquet")
    paths = sorted(glob(os.path.join(args.input_dir, "**", "*.parquet"), recursive=True))
    if not paths:
        raise PrepareError(f"no .parquet files in --input_dir {args.input_dir}")
    return [SourceFile(name=os.path.relpath(p, args.input_dir), size=os.path.getsize(p), local_path=p) for p in paths]


class SourceReader:
    """Opens token streams at positions of the source; lists its files and starts the pool on first use."""

    def __init__(self, args, client, tokens_left):
        self.args, self.client, self.tokens_left = args, client, tokens_left
        self.files, self.pool, self.stream = None, None, None

    def tokens_needed(self):
        buffered = len(self.stream.tokens) - self.stream.cursor if self.stream and self.stream.tokens is not None else 0
        return self.tokens_left() - buffered

    def stream_at(self, position):
        if self.stream is not None and self.stream.position() == position:
            return self.stream
        args = self.args
        self.files = self.files or list_source_files(args, self.client)
        if position.file is not None and position.file not in [f.name for f in self.files]:
            raise PrepareError(f"{position.file} is no longer in the source. {START_OVER.format(out_dir=args.out_dir)}")
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(args.num_workers, initializer=init_worker)
        open_file = lambda f: open_parquet(f, args, self.client, self.tokens_needed())
        batches = iter_text_batches(self.files, position, open_file)
        self.stream = TokenStream(self.pool, self.files, position, batches, self.tokens_needed,
                                  TASKS_PER_WORKER * args.num_workers)
        return self.stream

    def close(self):
        # close() and join() let the few tasks still in flight finish. terminate() would kill workers
        # that may be writing a result, which can leave the result queue half-written and hang the pool.
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def is_reusable(old, name, position, path, capacity):
    """Check that a shard of an earlier run is complete and is the shard this run would write."""
    if old is None or old["name"] != name or old["start"] != position:
        return False
    if not shard_is_complete(path, old["tokens"]):
        return False
    # A shard longer than capacity comes from a run with a larger --num_tokens and is kept whole.
    return old["tokens"] >= capacity or old["source_ended"]


def tokenize_source(args, client):
    """Write the val shard and the train shards, keeping the complete ones of an earlier run."""
    if args.input_dir:
        source = f"local:{os.path.abspath(args.input_dir)}"
    else:
        source = "hub:" + "/".join(HUB_SOURCES[args.source][:2])
    settings = {"source": source, "tokenizer": "gpt2", "val_tokens": args.val_tokens, "shard_size": args.shard_size}
    old_shards = load_manifest(args.out_dir, settings)
    save_manifest(args.out_dir, settings, old_shards)  # so that shards renamed into place are always recorded
    try:
        tiktoken.get_encoding("gpt2")  # fetch tiktoken's files once, before the workers need them
    except Exception as err:  # tiktoken raises several kinds of errors when its download fails
        raise PrepareError(f"cannot load tiktoken's gpt2 encoding ({err}). It is downloaded once: "
                           "run with internet access, or set TIKTOKEN_CACHE_DIR to a folder that has its files.")

    bar = tqdm(total=args.val_tokens + args.num_tokens, unit="tok", unit_scale=True, desc="tokens")
    reader = SourceReader(args, client, tokens_left=lambda: bar.total - bar.n)
    shards, written, position, train_tokens = [], 0, Position(), 0
    try:
        for index in range(1 + -(-args.num_tokens // args.shard_size)):
            split = "val" if index == 0 else "train"
            capacity = args.val_tokens if index == 0 else min(args.shard_size, args.num_tokens - train_tokens)
            name = f"fineweb_{split}_{index:06d}.bin"
            path = os.path.join(args.out_dir, name)
            old = old_shards[index] if index < len(old_shards) else None

            if is_reusable(old, name, position, path, capacity):
                shard = dict(old, reused=True)
                bar.update(min(old["tokens"], capacity))
            else:
                stream = reader.stream_at(position)
                count = write_shard(stream, path, capacity, bar, require_full=index == 0)
                if index == 0 and count < capacity:
                    raise PrepareError(f"the source has only {count:,} tokens, fewer than --val_tokens {capacity:,}, "
                                       "so no shard was written. Lower --val_tokens "
                                       f"(for example --val_tokens {count // 2}) or add more input.")
                if count == 0:  # the source ended exactly at the end of the previous shard
                    shards[-1]["source_ended"] = True
                    save_manifest(args.out_dir, settings, shards)
                    break
                if index == 0:
                    stream.skip_rest_of_document()  # the cut document's rest is not used for training
                shard = dict(name=name, split=split, tokens=count, start=position, end=stream.position(),
                             source_ended=count < capacity, reused=False)
                written += count

            shards.append(shard)
            position = shard["end"]
            train_tokens += shard["tokens"] if index else 0
            save_manifest(args.out_dir, settings, shards + old_shards[index + 1:])
            if shard["source_ended"] or train_tokens >= args.num_tokens:
                break
        bar.close()
    finally:
        reader.close()
    remove_stale_shards(args, settings, shards, old_shards)
    return shards, written


def remove_stale_shards(args, settings, shards, old_shards):
    """Delete the shards of an earlier run that do not continue this run's shards, and keep those that do."""
    entries, end = list(shards), shards[-1]["end"]
    for old in old_shards[len(shards):]:
        if old["start"] != end or shards[-1]["source_ended"]:
            path = os.path.join(args.out_dir, old["name"])
            if os.path.exists(path):
                print(f"removing {path}: it does not continue the shards of this run")
                os.remove(path)
            continue
        entries.append(old)
        end = old["end"]
    if len(entries) > len(shards):
        print(f"keeping {len(entries) - len(shards)} more train shards of an earlier run with a larger --num_tokens")
    save_manifest(args.out_dir, settings, entries)


def fetch_gpt2_shards(args, client):
    """Download the val shard and enough train shards of kjj0/fineweb10B-gpt2 for --num_tokens."""
    if os.path.exists(os.path.join(args.out_dir, MANIFEST)):
        raise PrepareError(f"{args.out_dir} contains shards tokenized by this script. Choose another --out_dir.")
    files = {f.name: f for f in list_hub_files(client, GPT2_SHARDS_REPO, "", ".bin")}
    count = -(-args.num_tokens // GPT2_SHARDS_REPO_SHARD_TOKENS)
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, count + 1)]
    shards, written = [], 0
    for name in names:
        if name not in files:
            raise PrepareError(f"{GPT2_SHARDS_REPO} has no {name}. It contains {len(files) - 1} train shards "
                               f"of {GPT2_SHARDS_REPO_SHARD_TOKENS:,} tokens, so lower --num_tokens.")
        path = os.path.join(args.out_dir, name)
        reused = os.path.exists(path) and os.path.getsize(path) == files[name].size
        download(client, files[name], path)
        tokens = int(np.fromfile(path, dtype="<i4", count=3)[2])
        if not shard_is_complete(path, tokens):
            raise PrepareError(f"{files[name].url} is not a shard in the llm.c format")
        shards.append(dict(name=name, split=name.split("_")[1], tokens=tokens, reused=reused))
        written += 0 if reused else tokens
    return shards, written


# -----------------------------------------------------------------------------

def parse_count(text):
    """Parse a token count written as 2000000000, 2_000_000_000 or 2e9."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number")
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a whole non-negative number")
    return int(value)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=[*HUB_SOURCES, "gpt2-shards"], default="fineweb",
                        help="data set: the sample/10BT parquet files of FineWeb or FineWeb-Edu to tokenize, or "
                             f"the ready GPT-2 shards of {GPT2_SHARDS_REPO}, 100M tokens each, downloaded as they "
                             "are (default: %(default)s)")
    parser.add_argument("--input_dir", metavar="DIR",
                        help="tokenize the local parquet files in this folder and its subfolders, in path order, "
                             "instead of downloading; only their 'text' column is read")
    parser.add_argument("--out_dir", metavar="DIR",
                        help="folder for the shards (default: data/fineweb10B, or data/fineweb_edu10B "
                             "for --source fineweb-edu)")
    parser.add_argument("--num_tokens", type=parse_count, default=2_000_000_000, metavar="N",
                        help="training tokens to write after the validation tokens, such as 2e9 or "
                             "20_000_000 (default: %(default)s)")
    parser.add_argument("--val_tokens", type=parse_count, default=10_485_760, metavar="N",
                        help="validation tokens, taken from the start of the source; 10 x 2^20 is what "
                             "modded-nanogpt evaluates on (default: %(default)s)")
    parser.add_argument("--shard_size", type=parse_count, default=100_000_000, metavar="N",
                        help="tokens per train shard (default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count(), metavar="N",
                        help="tokenizer processes (default: the number of CPUs, %(default)s here)")

    downloads = parser.add_argument_group("downloads from the Hub (endpoint: $HF_ENDPOINT, else https://huggingface.co)")
    downloads.add_argument("--fetch", choices=["auto", "full", "range"], default="auto",
                           help="how to read parquet files: 'full' downloads whole files and checks their sha256, "
                                "'range' reads only the needed row groups with HTTP range requests and checks the "
                                "file size only, 'auto' uses range reads when the run needs under half of a file "
                                "(default: %(default)s)")
    downloads.add_argument("--download_dir", metavar="DIR",
                           help="folder for whole downloaded parquet files, kept for reruns (default: OUT_DIR/parquet)")
    downloads.add_argument("--retries", type=int, default=5, metavar="N",
                           help="retries of a request after a connection error, HTTP 429 or 5xx, and downloads "
                                "of a file after a checksum mismatch (default: %(default)s)")
    downloads.add_argument("--retry_wait", type=float, default=1.0, metavar="SECONDS",
                           help="wait before the first retry, doubled for each further retry (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.input_dir and args.source == "gpt2-shards":
        parser.error("--input_dir reads parquet files and cannot be used with --source gpt2-shards")
    if not 1 <= args.val_tokens <= MAX_SHARD_TOKENS or not 1 <= args.shard_size <= MAX_SHARD_TOKENS:
        parser.error(f"--val_tokens and --shard_size must be between 1 and {MAX_SHARD_TOKENS:,}")
    if args.num_workers < 1 or args.retries < 0 or args.retry_wait < 0:
        parser.error("--num_workers must be at least 1, and --retries and --retry_wait at least 0")
    if args.input_dir and not os.path.isdir(args.input_dir):
        parser.error(f"--input_dir {args.input_dir} is not a folder")
    args.out_dir = args.out_dir or HUB_SOURCES.get(args.source, HUB_SOURCES["fineweb"])[2]
    args.download_dir = args.download_dir or os.path.join(args.out_dir, "parquet")
    return args


def main(argv=None):
    args = parse_args(argv)
    client = HubClient(os.environ.get("HF_ENDPOINT") or "https://huggingface.co", args.retries, args.retry_wait)
    started = time.time()
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if args.source == "gpt2-shards":
            shards, written = fetch_gpt2_shards(args, client)
        else:
            shards, written = tokenize_source(args, client)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only or full disk, or a folder that cannot be created
        print(f"\nerror: {err}. Check that --out_dir {args.out_dir} is writable and has free space; "
              "the complete shards already written are kept.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the complete shards in {args.out_dir} are kept, and the same command "
              "continues from them", file=sys.stderr)
        return 130
    elapsed = time.time() - started

    print(f"{len(shards)} shards in {args.out_dir}:")
    for shard in shards:
        note = "  (reused from an earlier run)" if shard["reused"] else ""
        print(f"  {shard['name']}  {shard['tokens']:>13,} tokens{note}")
    for split in ("val", "train"):
        print(f"{split}: {sum(s['tokens'] for s in shards if s['split'] == split):,} tokens")
    verb = "downloaded" if args.source == "gpt2-shards" else "tokenized"
    print(f"{verb} {written:,} tokens in {elapsed:.1f}s ({written / max(elapsed, 1e-9):,.0f} tokens/s)")
    train_tokens = sum(s["tokens"] for s in shards if s["split"] == "train")
    if shards and shards[-1].get("source_ended") and train_tokens < args.num_tokens:
        print(f"note: the source ran out, so only {train_tokens:,} of the {args.num_tokens:,} requested "
              "training tokens were written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
