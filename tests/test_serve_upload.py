"""The streamed upload endpoint (``PUT /api/studies/{id}/uploads``) with files larger than the
server's 1 MiB write blocks, against a real server subprocess: bytes stored exactly whatever the
client's chunking, hashes right, non-FCS content of several blocks not kept, the size limit
enforced while streaming, and a client that disconnects mid-file leaves nothing behind.

SQLite only: the streaming path does not touch the database until the file is in (the rows it
then writes are exercised on both backends by test_serve_api.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import flowio
import pytest

from tests.conftest import shared_path
from tests.serve_support import STUDY, serving

LIMIT = 6_000_000  # --max-file-size of this module's server: 100715.fcs (4.2 MB) fits


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(
        tmp_path_factory.mktemp("serve_upload") / "data", "sqlite", None, "--max-file-size", "6MB"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def study(server):
    c = server.client()
    r = c.post("/api/studies", json={"name": "upload study", **STUDY}, headers=c.h)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def stored_files(server) -> list:
    return [p for p in (server.data / "blobs").rglob("*") if p.is_file()]


def test_a_file_of_several_blocks_is_stored_byte_for_byte_whatever_the_chunking(server, study):
    source = shared_path("FlowIO", "data", "fcs_files", "100715.fcs")  # 4.2 MB: 4 write blocks
    data = source.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    c = server.client()
    r = c.upload(study, source)
    assert r.status_code == 201, r.text
    row = r.json()
    assert row["sha256"] == sha and row["size"] == len(data) and row["status"] == "ok"
    # validated by cytopipe validate's rules: the event count of a peer reader (FlowIO)
    assert row["events"] == flowio.FlowData(str(source)).event_count == 65016
    blob = server.data / "blobs" / sha[:2] / sha
    assert blob.read_bytes() == data

    def ragged():  # odd chunk sizes across the block boundaries, no Content-Length
        sizes, pos = [1, 5, 1000, 3 << 20, 7, 65536, 1 << 20], 0
        i = 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            yield data[pos : pos + n]
            pos, i = pos + n, i + 1

    r = c.put(f"/api/studies/{study}/uploads", params={"name": "ragged.fcs"}, content=ragged(), headers=c.h)
    assert r.status_code == 200 and r.json()["duplicate"] and r.json()["sha256"] == sha, r.text
    assert list((server.data / "tmp").iterdir()) == []


def test_non_fcs_content_of_several_blocks_is_hashed_but_not_kept(server, study):
    before = stored_files(server)
    content = b"%PDF-1.7\n" + os.urandom(3 << 20)
    c = server.client()
    r = c.put(f"/api/studies/{study}/uploads", params={"name": "report.fcs"}, content=content, headers=c.h)
    assert r.status_code == 201 and r.json()["status"] == "rejected", r.text
    assert "PDF" in r.json()["reason"] and r.json()["sha256"] == hashlib.sha256(content).hexdigest()
    assert stored_files(server) == before and list((server.data / "tmp").iterdir()) == []


def test_the_size_limit_holds_while_streaming(server, study):
    before = stored_files(server)
    c = server.client()

    def endless():  # no Content-Length: only counting while streaming can stop it
        yield b"FCS3.1"
        for _ in range(4 * LIMIT // (1 << 20)):
            yield b"\0" * (1 << 20)

    r = c.put(f"/api/studies/{study}/uploads", params={"name": "huge.fcs"}, content=endless(), headers=c.h)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert stored_files(server) == before and list((server.data / "tmp").iterdir()) == []
    used = sum(p.stat().st_size for p in server.data.rglob("*") if p.is_file())
    assert used < 2 * LIMIT  # the data folder (database included) did not take the 24 MB sent


def test_a_client_that_disconnects_mid_file_leaves_nothing_behind(server, study):
    c = server.client()
    data = shared_path("FlowIO", "data", "fcs_files", "100715.fcs").read_bytes()
    head = (
        f"PUT /api/studies/{study}/uploads?name=cut.fcs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"X-CSRF-Token: {c.h['X-CSRF-Token']}\r\nCookie: {'; '.join(f'{k}={v}' for k, v in c.cookies.items())}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + data[: len(data) // 2])  # half the file (2 write blocks), then gone
        deadline = time.monotonic() + 60
        while not list((server.data / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((server.data / "tmp").iterdir()), "the server never started writing the upload"
    deadline = time.monotonic() + 60  # the server notices the closed connection on its own time
    while list((server.data / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list((server.data / "tmp").iterdir()) == []
    names = [u["name"] for u in c.get(f"/api/studies/{study}").json()["uploads"]]
    assert "cut.fcs" not in names
    audit = c.get("/api/audit", params={"limit": 50}).json()
    assert not any("cut.fcs" in str(e["after"]) for e in audit)


def _raw_put(server, client, study: int, name: str, length: int, batch: int) -> bytes:
    """The request line and headers of a PUT whose body the caller sends itself."""
    return (
        f"PUT /api/studies/{study}/uploads?name={name}&batch={batch} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"X-CSRF-Token: {client.h['X-CSRF-Token']}\r\n"
        f"Cookie: {'; '.join(f'{k}={v}' for k, v in client.cookies.items())}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_batch_limit_counts_the_uploads_still_streaming(server, study):
    """The page sends two files at once: while one streams, another of the same batch may only
    use what the batch has left after it."""
    c = server.client()
    data = shared_path("FlowIO", "data", "fcs_files", "100715.fcs").read_bytes()
    b = c.post(f"/api/studies/{study}/batches", json={"files": 1, "bytes": len(data)}, headers=c.h).json()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            _raw_put(server, c, study, "first.fcs", len(data), b["batch_id"]) + data[: len(data) // 2]
        )
        deadline = time.monotonic() + 60
        while not list((server.data / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((server.data / "tmp").iterdir()), "the server never started writing the first upload"
        # any bytes more in the same batch while the first is still streaming: over what it declared
        r = c.put(f"/api/studies/{study}/uploads", params={"name": "second.fcs", "batch": b["batch_id"]},
                  content=data[:1000], headers=c.h)  # fmt: skip
        assert r.status_code == 413 and "batch" in r.json()["detail"], r.text
        sock.sendall(data[len(data) // 2 :])
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 20"), answer[:300]  # 201, or 200 if an earlier test stored it
    assert list((server.data / "tmp").iterdir()) == []


def test_uploads_of_one_batch_at_the_same_time_are_all_counted_and_kept_once(server, study):
    """A batch sent as the page sends it, two files at a time, one file twice: the batch declared
    exactly these bytes and takes every file (no byte counted twice), one row for the repeated
    bytes (that answer says duplicate), and after the last file one byte more is refused."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    names = ["100715.fcs", "100715.fcs", "3FITC_4PE_004.fcs", "B01 KC-A-W---91-US.fcs", "G11.fcs",
             "data1.fcs", "variable_int_example.fcs", "data_start_offset_discrepancy_example.fcs"]  # fmt: skip
    bodies = [shared_path("FlowIO", "data", "fcs_files", n).read_bytes() for n in names]
    c = server.client()
    s = c.post("/api/studies", json={"name": "batch at once", **STUDY}, headers=c.h).json()["id"]
    b = c.post(f"/api/studies/{s}/batches", json={"files": len(bodies), "bytes": sum(map(len, bodies))},
               headers=c.h).json()  # fmt: skip
    clients = [server.client() for _ in range(2)]
    answers, lock, queue = [None] * len(bodies), threading.Lock(), iter(range(len(bodies)))

    def worker(k: int) -> None:  # like the page: each takes the next file when its last one is answered
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            answers[i] = clients[k].put(f"/api/studies/{s}/uploads", params={"name": f"f{i}.fcs", "batch": b["batch_id"]},
                                        content=bodies[i], headers=clients[k].h)  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(worker, range(2)))
    assert sorted(r.status_code for r in answers) == [200] + [201] * (len(bodies) - 1), [
        r.text for r in answers
    ]
    assert [r.json()["duplicate"] for r in answers].count(True) == 1
    rows = c.get(f"/api/studies/{s}").json()["uploads"]
    assert len(rows) == len(bodies) - 1
    assert sum(r["sha256"] == hashlib.sha256(bodies[0]).hexdigest() for r in rows) == 1
    r = c.put(f"/api/studies/{s}/uploads", params={"name": "more.fcs", "batch": b["batch_id"]},
              content=b"FCS3.1", headers=c.h)  # fmt: skip
    assert r.status_code == 413, r.text
