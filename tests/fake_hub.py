"""A stand-in for the Hugging Face hub on 127.0.0.1, so download tests never touch the internet.

It answers the requests huggingface_hub 0.36 makes for `model_info`, `snapshot_download` and
`hf_hub_download`, the way the real hub does:

    GET  /api/models/ORG/NAME[/revision/REV]   repo info: sha, and siblings with sizes and hashes
    HEAD /ORG/NAME/resolve/REV/FILE            ETag, X-Repo-Commit and Content-Length; for large
                                               (LFS) files a redirect to /lfs/SHA256 with
                                               X-Linked-Etag and X-Linked-Size
    GET  /ORG/NAME/resolve/REV/FILE, /lfs/SHA256   the bytes, honouring Range requests

Errors carry the X-Error-Code header huggingface_hub turns into its exception types. Tests can
make the next transfer of a file drop the connection part-way (`drop_after`) or serve other bytes
than the hub's metadata promises (`tamper`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
TOKEN = "hf_stand_in_token"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False  # files need `Authorization: Bearer TOKEN`, as for a gated repo whose terms were accepted
    sha: str = field(default_factory=lambda: secrets.token_hex(20))  # a commit hash

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        sibling = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if name.endswith(LFS_SUFFIXES):
            sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return sibling


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.reset()

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.drop_after: dict[str, int] = {}  # file name -> bytes sent before the next transfer drops
        self.tamper: dict[str, bytes] = {}  # file name -> bytes served instead of the real ones

    def add(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> Repo:
        self.repos[repo_id] = Repo(dict(files), gated)
        return self.repos[repo_id]

    def downloads(self, name: str) -> list[Request]:
        """The GET requests that fetched the file ``name``'s bytes."""
        return [r for r in self.requests if r.method == "GET" and self._file_of(r.path) == name]

    def _file_of(self, path: str) -> str | None:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if path.endswith(f"/{name}") or path == f"/lfs/{hashlib.sha256(data).hexdigest()}":
                    return name
        return None

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hub._answer(self, head=False)

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

        return Handler

    def _answer(self, http: BaseHTTPRequestHandler, head: bool) -> None:
        path = http.path.split("?")[0]
        self.requests.append(Request(http.command, path, http.headers.get("Range"),
                                     http.headers.get("Authorization")))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            self._repo_info(http, match[1], match[2] or "main")
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            self._resolve(http, head, match[1], match[2], match[3])
        elif match := re.fullmatch(r"/lfs/([0-9a-f]{64})", path):
            name = self._file_of(path)
            repo = next(r for r in self.repos.values() if name in r.files)
            self._send_file(http, head, name, repo.files[name], {})
        else:
            self._error(http, 404, "EntryNotFound")

    def _find(self, http: BaseHTTPRequestHandler, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(http, 404, "RepoNotFound")
        elif revision not in ("main", repo.sha):
            self._error(http, 404, "RevisionNotFound")
        else:
            return repo
        return None

    def _repo_info(self, http: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        if (repo := self._find(http, repo_id, revision)) is None:
            return
        body = json.dumps({
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
            "gated": "manual" if repo.gated else False, "disabled": False, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [repo.sibling(name) for name in repo.files],
        }).encode()
        http.send_response(200)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(body)))
        http.end_headers()
        http.wfile.write(body)

    def _resolve(self, http: BaseHTTPRequestHandler, head: bool, repo_id: str, revision: str, name: str) -> None:
        if (repo := self._find(http, repo_id, revision)) is None:
            return
        if repo.gated and http.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._error(http, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                                "to it and be authenticated to access it. Please log in.")
            return
        if name not in repo.files:
            self._error(http, 404, "EntryNotFound", extra={"X-Repo-Commit": repo.sha})
            return
        data = repo.files[name]
        sibling = repo.sibling(name)
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{sibling["blobId"]}"'}
        if "lfs" in sibling:  # the hub redirects large files to its CDN, describing them in X-Linked-*
            sha256 = sibling["lfs"]["sha256"]
            http.send_response(302)
            for key, value in {**headers, "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)),
                               "Location": f"{self.url}/lfs/{sha256}", "Content-Length": "0"}.items():
                http.send_header(key, value)
            http.end_headers()
            return
        self._send_file(http, head, name, data, headers)

    def _send_file(self, http: BaseHTTPRequestHandler, head: bool, name: str, data: bytes,
                   headers: dict[str, str]) -> None:
        data = self.tamper.get(name, data)
        start = 0
        if (wanted := http.headers.get("Range")) and (match := re.fullmatch(r"bytes=(\d+)-", wanted)):
            start = int(match[1])
        http.send_response(206 if start else 200)
        for key, value in headers.items():
            http.send_header(key, value)
        if start:
            http.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        http.send_header("Content-Length", str(len(data) - start))
        http.end_headers()
        if head:
            return
        if name in self.drop_after:
            http.wfile.write(data[start:start + self.drop_after.pop(name)])
            http.wfile.flush()
            http.close_connection = True
            return  # the connection closes short of Content-Length, as when a network drops
        http.wfile.write(data[start:])

    def _error(self, http: BaseHTTPRequestHandler, status: int, code: str, message: str = "",
               extra: dict[str, str] | None = None) -> None:
        http.send_response(status)
        http.send_header("X-Error-Code", code)
        if message:
            http.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            http.send_header(key, value)
        http.send_header("Content-Length", "0")
        http.end_headers()
