"""A local server speaking the part of the Hugging Face Hub's HTTP API that ``huggingface_hub`` uses.

There is no network in the tests. This server lets the real client (``snapshot_download``,
``hf_hub_download``, ``HfApi.model_info``, ``list_repo_files``, ``get_safetensors_metadata``) run
unpatched against repos published from local folders: point ``HF_ENDPOINT`` at ``server.url``
(``tests/support/hub_fixture.py`` does it). Stdlib only (``http.server``), one thread per request.

What it answers, as huggingface_hub 2.4 expects (``file_download.py``, ``hf_api.py``,
``utils/_http.py``):

- ``GET /api/models/{org}/{name}[/revision/{rev}]`` (``?blobs=true`` adds sizes, blob ids and LFS
  sha256): ``id``, ``sha`` (the commit), ``private``, ``gated``, ``siblings``.
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]`` (``?recursive=true``): files and folders.
- ``GET /api/whoami-v2``.
- ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}``, ``rev`` a branch, a tag or a full commit sha:
  a regular file answers 200 with ``ETag`` (its git blob sha1), ``X-Repo-Commit``,
  ``Content-Length``; an LFS file (safetensors, bin, ... or >= 10 MiB) answers 302 to a signed URL on
  a second port (a different origin, like the Hub's CDN, so the client drops the token there)
  with ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``. Both honour ``Range: bytes=a-b``
  (206 + ``Content-Range``), which is how ``get_safetensors_metadata`` reads only headers.
- Errors with the Hub's ``X-Error-Code`` headers, mapped by the client's ``hf_raise_for_status``:
  a missing or private repo without a valid ``Authorization: Bearer`` token -> 401 ``RepoNotFound``
  (``RepositoryNotFoundError``; 404 with a valid token); a gated repo's files -> 401 (no token) or
  403 (a token without access) ``GatedRepo`` (``GatedRepoError``; its info and tree stay public,
  as on the Hub); unknown revision -> 404 ``RevisionNotFound``; unknown file -> 404
  ``EntryNotFound`` with ``X-Repo-Commit``.
- Writes (issue #16 item 4): ``POST /api/repos/create``, ``POST /api/models/{repo}/preupload/{rev}``,
  the LFS batch ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer, uploads ``PUT`` to this
  server), ``POST /api/models/{repo}/commit/{rev}`` (ndjson: header, file, lfsFile, deletedFile).

Bytes of file content sent are counted per (repo, path) in ``bytes_sent`` (API JSON is counted
under path ``None``), so tests can assert that a refusal sent no weights.

Accounts: ``token`` is user ``tester`` (member of org ``org``); ``add_user`` adds more (a Space's
visitor). A user writes to its own namespace and its orgs, and reads a private or gated repo of
another namespace only when published with its token in ``readers``. ``tokens_seen`` records the
bearer token of every request, so a test can prove whose token reached the Hub.

Faults, to watch and stop downloads: ``rate`` sends file bodies at that many bytes per second;
``cuts[path]`` lists byte offsets at which successive responses for that file close the
connection early (an offset equal to the response's start sends nothing: a retry that gets no
further).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import shutil
import tempfile
import threading

import yaml
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model",
                ".npz", ".pkl", ".zip", ".tar", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Blob:
    """One file's content, stored once under its sha256."""

    size: int
    sha256: str
    git_sha1: str  # the git blob id of the file itself (regular files)
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n").encode()

    @property
    def oid(self) -> str:
        """What the Hub calls the file's ``oid``/``blobId``: the git blob id of what git stores (the
        pointer for an LFS file)."""
        return _git_sha1(self.pointer) if self.lfs else self.git_sha1


@dataclass
class Commit:
    sha: str
    files: dict[str, Blob]
    message: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: str | bool = False  # False, "auto" or "manual" (the Hub's values)
    access: set[str] = field(default_factory=set)  # tokens allowed into a gated repo's files
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision)
        if sha is None and COMMIT_SHA.match(revision):
            sha = revision
        return self.commits.get(sha) if sha else None


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


class HubServer:
    """A Hub for tests: ``publish`` folders as repos, then point ``HF_ENDPOINT`` at ``url``.

    ``token`` is the one valid user token (user ``tester``); it reads every private repo and every
    gated repo published with ``grant=True`` (the default). ``bytes_sent[(repo_id, path)]`` counts
    file content bytes sent, through both the resolve URL and the CDN URL.
    """

    def __init__(self, root: Path | None = None, host: str = "127.0.0.1"):
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="hub-server-"))
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = "hf_test_" + secrets.token_hex(12)
        self.user = "tester"
        self.users: dict[str, str] = {self.token: self.user}  # token -> user name (``add_user`` adds more)
        # user -> the organizations it writes to; reading another's private or gated repo takes ``readers``
        self.orgs: dict[str, set[str]] = {self.user: {"org"}}
        self.repos: dict[str, Repo] = {}
        self.spaces: dict[str, dict] = {}  # "spaces/org/name" -> {"sdk", "hardware"}: what deploy asked for
        self.blobs: dict[str, Blob] = {}
        self.bytes_sent: defaultdict[tuple[str, str | None], int] = defaultdict(int)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.tokens_seen: list[str | None] = []  # the bearer token of every request, in order (None: anonymous)
        self.rate: float | None = None  # file bytes per second per response, to watch and stop a download
        self.cuts: dict[str, list[int]] = {}  # path -> offsets: each response of the file is cut at the next one
        self._secret = secrets.token_bytes(16)
        self._lock = threading.RLock()
        self._api = ThreadingHTTPServer((host, 0), _handler(self, cdn=False))
        self._cdn = ThreadingHTTPServer((host, 0), _handler(self, cdn=True))
        for server in (self._api, self._cdn):
            server.daemon_threads = True
        self.url = f"http://{host}:{self._api.server_address[1]}"
        self.cdn_url = f"http://{host}:{self._cdn.server_address[1]}"
        self._threads: list[threading.Thread] = []

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> "HubServer":
        for server in (self._api, self._cdn):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._api, self._cdn):
            server.shutdown()
            server.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, repo_id: str, folder: Path | dict[str, bytes], *, revision: str = "main",
                private: bool = False, gated: str | bool = False, grant: bool = True,
                readers: tuple[str, ...] = (), message: str | None = None) -> str:
        """Commit ``folder``'s files (or a ``{path: bytes}`` dict) as the whole tree of ``repo_id``
        on branch ``revision`` (created if new); return the commit sha. Publishing again adds a
        commit on top, so older shas stay reachable (pinned revisions), and sets the repo's
        ``private``/``gated`` flags and whether ``token`` may read a gated repo (``grant``) anew."""
        files = self._files_from(folder)
        with self._lock:
            repo = self._repo(repo_id, private=private, gated=gated, grant=grant)
            repo.access |= set(readers)
            parent = repo.refs.get(revision)
            return self._commit(repo, revision, files, message or f"Publish {repo_id}", parent)

    def add_user(self, name: str, token: str | None = None) -> str:
        """Another account (a Space's visitor, say); returns its token. A user reads and writes the
        repos of its own namespace, and private or gated repos published with its token in ``readers``."""
        token = token or "hf_" + name + "_" + secrets.token_hex(12)
        with self._lock:
            self.users[token] = name
        return token

    def add_tag(self, repo_id: str, tag: str, revision: str = "main") -> None:
        with self._lock:
            repo = self.repos[repo_id]
            repo.refs[tag] = repo.resolve(revision).sha

    def sent(self, repo_id: str | None = None, *, suffix: str = "") -> int:
        """File bytes sent (for ``repo_id``, or all repos), for paths ending with ``suffix``."""
        with self._lock:
            return sum(n for (repo, path), n in self.bytes_sent.items()
                       if path is not None and (repo_id is None or repo == repo_id) and path.endswith(suffix))

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.requests.clear()

    def _repo(self, repo_id: str, *, private: bool, gated: str | bool, grant: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            repo = self.repos[repo_id] = Repo(repo_id)
        repo.private, repo.gated = private, ("auto" if gated is True else gated)
        repo.access = {self.token} if grant else set()
        return repo

    def _files_from(self, folder: Path | dict[str, bytes]) -> dict[str, Blob]:
        if isinstance(folder, dict):
            return {path: self._store(data) for path, data in folder.items()}
        folder = Path(folder)
        return {p.relative_to(folder).as_posix(): self._store(p.read_bytes(), p.relative_to(folder).as_posix())
                for p in sorted(folder.rglob("*")) if p.is_file()}

    def _store(self, data: bytes, path: str = "") -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        blob = Blob(len(data), sha256, _git_sha1(data), _is_lfs(path, len(data)))
        target = self.root / "blobs" / sha256
        if not target.exists():
            target.write_bytes(data)
        with self._lock:
            self.blobs[sha256] = Blob(blob.size, sha256, blob.git_sha1, False)
        return blob

    def _commit(self, repo: Repo, branch: str, files: dict[str, Blob], message: str, parent: str | None) -> str:
        listing = json.dumps({"parent": parent, "message": message, "time": time.time_ns(),
                              "files": {p: b.sha256 for p, b in sorted(files.items())}})
        sha = hashlib.sha1(listing.encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.commits[sha] = Commit(sha, dict(files), message, parent, date)
        repo.refs[branch] = sha
        return sha

    # -- access --------------------------------------------------------------------------------

    def _token_of(self, headers) -> str | None:
        auth = headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def writes_to(self, token: str | None, repo_id: str) -> bool:
        """Whether ``token``'s user owns ``repo_id``'s namespace (its own name or one of its orgs)."""
        user = self.users.get(token or "")
        namespace = repo_id.removeprefix("spaces/").split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, set()))

    def sign(self, sha256: str) -> str:
        return hmac.new(self._secret, sha256.encode(), "sha256").hexdigest()[:32]


# -- the request handler ---------------------------------------------------------------------

class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.body = body or {}


def _handler(hub: HubServer, *, cdn: bool):
    class Handler(_HubHandler):
        pass

    Handler.hub, Handler.cdn = hub, cdn
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    cdn: bool
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection (the client's pool outlives a test's server) ends its thread

    def log_message(self, format, *args):  # quiet: tests read ``hub.requests`` instead
        pass

    # -- plumbing ------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.body = self.rfile.read(length)
        elif "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.body = self._read_chunked()
        try:
            self._route(method)
        except HubError as err:
            self._json(err.status, {"error": err.message, **err.body}, method,
                       {**({"X-Error-Code": err.code} if err.code else {}), "X-Error-Message": err.message,
                        **err.headers})
        except Exception as exc:  # a bug here must show in the test, not hang the client
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"}, method)
            raise

    def send_response(self, code, message=None):
        with self.hub._lock:  # logged before the client can see the answer (tests read it right after)
            self.hub.requests.append((self.command, self.path, code))
            self.hub.tokens_seen.append(self.hub._token_of(self.headers))
        super().send_response(code, message)

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers, then the blank line
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk

    def _route(self, method: str) -> int:
        s = self.segments
        if self.cdn:
            if method in ("GET", "HEAD") and len(s) == 2 and s[0] == "blobs":
                return self._cdn_blob(method, s[1])
            if method == "PUT" and len(s) == 2 and s[0] == "upload":
                return self._lfs_upload(s[1])
            raise HubError(404, None, "Not found")
        if s[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami(method)
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(s) >= 4 and s[:2] == ["api", "spaces"]:  # a Space: the same store, under "spaces/"
            repo_id, rest = f"spaces/{s[2]}/{s[3]}", s[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main", method)
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), method)
            if method == "POST" and rest == ["hardware"]:
                return self._request_hardware(repo_id)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._create_commit(repo_id, rest[1])
        if len(s) == 7 and s[0] == "spaces" and s[2].endswith(".git") and s[3:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"spaces/{s[1]}/{s[2][:-4]}")
        if len(s) >= 6 and s[0] == "spaces" and s[3] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"spaces/{s[1]}/{s[2]}", s[4], "/".join(s[5:]), method)
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main", method)
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._model_info(repo_id, rest[1], method)
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), method)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._create_commit(repo_id, rest[1])
        if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(f"{s[0]}/{s[1][:-4]}")
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]), method)
        raise HubError(404, None, "Not found")

    def _send(self, status: int, body: bytes, method: str, headers: dict | None = None,
              count: tuple[str, str | None] | None = None) -> int:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD" and body:
            self._write(body, count)
        return status

    def _write(self, body: bytes, count: tuple[str, str | None] | None) -> None:
        """Send ``body``, counted before the write: the client may act on the last byte (and a test
        read the counter) before this thread runs again."""
        if count is not None:
            with self.hub._lock:
                self.hub.bytes_sent[count] += len(body)
        try:
            self.wfile.write(body)
        except OSError:  # the client went away: count nothing of it
            if count is not None:
                with self.hub._lock:
                    self.hub.bytes_sent[count] -= len(body)
            raise

    def _json(self, status: int, data, method: str, headers: dict | None = None, repo_id: str | None = None) -> int:
        body = json.dumps(data).encode()
        return self._send(status, body, method, {"Content-Type": "application/json", **(headers or {})},
                          count=(repo_id or "", None))

    def _read_json(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, None, "Body is not JSON") from None

    # -- access --------------------------------------------------------------------------------

    def _token(self) -> str | None:
        token = self.hub._token_of(self.headers)
        if token is not None and token not in self.hub.users:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return token

    def _repo(self, repo_id: str, *, files: bool = False, write: bool = False) -> Repo:
        """The repo the request may see, or the Hub's error: 401 RepoNotFound without a token (so a
        private repo and a missing one look alike), 404 with one; 401/403 GatedRepo for a gated
        repo's files."""
        token = self._token()
        with self.hub._lock:
            repo = self.hub.repos.get(repo_id)
        owner = token is not None and repo_id.removeprefix("spaces/").split("/")[0] == self.hub.users[token]
        if repo is None or (repo.private and not owner and token not in repo.access):
            status = 404 if token else 401
            raise HubError(status, "RepoNotFound", "Repository not found")
        if write and token is None:
            raise HubError(401, None, "You must be authenticated to write")
        if write and not self.hub.writes_to(token, repo_id):
            raise HubError(403, None, f"You don't have the rights to write to {repo_id}")
        if files and repo.gated and not owner and token not in repo.access:
            if token is None:
                raise HubError(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                                 "to it and be authenticated to access it. Please log in.")
            raise HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                             f"authorized list. Visit {self.hub.url}/{repo_id} to ask for access.")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # -- reads ---------------------------------------------------------------------------------

    def _whoami(self, method: str) -> int:
        if self._token() is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        name = self.hub.users[self._token()]
        return self._json(200, {"type": "user", "name": name, "fullname": name.title(), "orgs": [],
                                "avatarUrl": f"{self.hub.url}/avatars/{name}.png",
                                "auth": {"type": "access_token", "accessToken": {"role": "write"}}}, method)

    def _model_info(self, repo_id: str, revision: str, method: str) -> int:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        blobs = self.query.get("blobs", "").lower() == "true"
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        org, name = repo_id.split("/", 1)
        info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": org, "sha": commit.sha, "lastModified": commit.date, "createdAt": commit.date,
                "private": repo.private, "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "library_name": "transformers", "siblings": siblings}
        if blobs:
            info["usedStorage"] = sum(b.size for b in commit.files.values())
        return self._json(200, info, method, repo_id=repo_id)

    def _tree(self, repo_id: str, revision: str, prefix: str, method: str) -> int:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        recursive = self.query.get("recursive", "").lower() == "true"
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        if prefix and prefix in commit.files:
            raise HubError(404, "EntryNotFound", f"{prefix} is a file, not a folder")
        entries, folders = [], set()
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):].split("/")
            for depth in range(1, len(rest)):  # folders on the way
                folder = base + "/".join(rest[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder,
                                    "oid": hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest(), "size": 0})
            if recursive or len(rest) == 1:
                entry = {"type": "file", "path": path, "size": blob.size, "oid": blob.oid}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
                entries.append(entry)
        if prefix and not entries:
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {revision}")
        return self._json(200, entries, method, repo_id=repo_id)

    def _resolve(self, repo_id: str, revision: str, path: str, method: str) -> int:
        repo = self._repo(repo_id, files=True)
        commit = self._commit_of(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        common = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if blob.lfs:
            location = (f"{self.hub.cdn_url}/blobs/{blob.sha256}?sig={self.hub.sign(blob.sha256)}"
                        f"&repo={quote(repo_id, safe='')}&file={quote(path, safe='')}")
            return self._send(302, b"", method, {
                **common, "Location": location, "ETag": f'"{blob.oid}"',
                "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size),
            })
        return self._file(blob, method, {**common, "ETag": f'"{blob.oid}"'}, (repo_id, path))

    def _cdn_blob(self, method: str, sha256: str) -> int:
        if not hmac.compare_digest(self.query.get("sig", ""), self.hub.sign(sha256)):
            raise HubError(403, None, "Request has expired or its signature is invalid")
        blob = self.hub.blobs.get(sha256)
        if blob is None:
            raise HubError(404, None, "No such blob")
        return self._file(blob, method, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"},
                          (self.query.get("repo", ""), self.query.get("file", sha256)))

    def _file(self, blob: Blob, method: str, headers: dict, count: tuple[str, str]) -> int:
        """The file's bytes, or the range ``Range: bytes=a-b`` asks for (206)."""
        size = blob.size
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", wanted)
            if not match or (not match[1] and not match[2]):
                raise HubError(416, None, "Invalid range", {"Content-Range": f"bytes */{size}"})
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]), size - 1) if match[2] else size - 1
            else:  # a suffix: the last n bytes
                start = max(size - int(match[2]), 0)
            if start >= size or start > end:
                raise HubError(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        with open(self.hub.root / "blobs" / blob.sha256, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1) if method != "HEAD" else b""
        self.send_response(status)
        for key, value in {"Content-Type": "application/octet-stream", **headers,
                           "Content-Length": str(end - start + 1)}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self._send_file_body(body, start, count)
        return status

    def _send_file_body(self, body: bytes, start: int, count: tuple[str, str]) -> None:
        """``body`` (the file from byte ``start``) at ``hub.rate``, cut short where ``hub.cuts`` says:
        the connection closes after fewer bytes than its ``Content-Length``, as a dropped download does."""
        with self.hub._lock:
            offsets = self.hub.cuts.get(count[1]) or []
            cut_at = offsets.pop(0) if offsets and start <= offsets[0] < start + len(body) else None
        if cut_at is not None:
            body = body[: cut_at - start]
        step = 256 * 1024 if self.hub.rate else len(body) or 1
        for offset in range(0, len(body), step):
            self._write(body[offset: offset + step], count)
            if self.hub.rate:
                time.sleep(step / self.hub.rate)
        if cut_at is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the body end early

    # -- writes (item 4) -------------------------------------------------------------------------

    def _create_repo(self) -> int:
        if self._token() is None:
            raise HubError(401, None, "You must be authenticated to create a repo")
        data = self._read_json()
        if data.get("type") not in (None, "model", "space"):
            raise HubError(400, None, "Only model repos and Spaces are served here")
        if data.get("type") == "space" and data.get("sdk") not in ("gradio", "docker", "static"):
            raise HubError(400, None, "A Space needs an sdk: gradio, docker or static")
        token = self._token()
        org = data.get("organization") or self.hub.users[token]
        if not self.hub.writes_to(token, f"{org}/x"):
            raise HubError(403, None, f"You don't have the rights to create a repo under {org}")
        repo_id = ("spaces/" if data.get("type") == "space" else "") + f"{org}/{data['name']}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise HubError(409, None, "You already created this model repo",
                               body={"url": f"{self.hub.url}/{repo_id}"})  # as the Hub: exist_ok reads it
            private = data.get("visibility", "private" if data.get("private") else "public") != "public"
            repo = self.hub._repo(repo_id, private=private, gated=False, grant=self.hub.writes_to(self.hub.token, repo_id))
            if data.get("type") == "space":
                self.hub.spaces[repo_id] = {"sdk": data["sdk"], "hardware": data.get("hardware")}
            self.hub._commit(repo, "main", {}, "initial commit", None)
        return self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id}, "POST")

    def _validate_yaml(self) -> int:
        """A README's front matter, checked as the Hub checks it before a commit: valid YAML, a
        mapping; a Space's needs an sdk."""
        data = self._read_json()
        content, kind = data.get("content", ""), data.get("repoType", "model")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, "POST")
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]}, "POST")
        if kind == "space" and meta.get("sdk") not in ("gradio", "docker", "static"):
            return self._json(400, {"errors": [{"message": "a Space's README.md needs sdk: gradio, docker or static"}]},
                              "POST")
        return self._json(200, {"errors": [], "warnings": []}, "POST")

    def _request_hardware(self, repo_id: str) -> int:
        self._repo(repo_id, write=True)
        flavor = self._read_json().get("flavor")
        with self.hub._lock:
            self.hub.spaces[repo_id]["hardware"] = flavor
        return self._json(200, {"stage": "BUILDING", "hardware": {"current": None, "requested": flavor},
                                "storage": None, "gcTimeout": None, "replicas": None}, "POST")

    def _preupload(self, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_id, write=True)
        commit = repo.resolve(revision)
        files = []
        for entry in self._read_json().get("files", []):
            path, size = entry["path"], int(entry.get("size", 0))
            existing = commit.files.get(path) if commit else None
            files.append({"path": path, "uploadMode": "lfs" if _is_lfs(path, size) else "regular",
                          "shouldIgnore": False, **({"oid": existing.oid} if existing else {})})
        return self._json(200, {"files": files, "commitOid": commit.sha if commit else None}, "POST", repo_id=repo_id)

    def _lfs_batch(self, repo_id: str) -> int:
        self._repo(repo_id, write=True)
        data = self._read_json()
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.blobs:  # already there: no action, as git-lfs servers answer
                item["actions"] = {"upload": {"href": f"{self.hub.cdn_url}/upload/{oid}?sig={self.hub.sign(oid)}"}}
            objects.append(item)
        body = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        return self._send(200, body, "POST", {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, oid: str) -> int:
        if not hmac.compare_digest(self.query.get("sig", ""), self.hub.sign(oid)):
            raise HubError(403, None, "Request has expired or its signature is invalid")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, None, "The uploaded content does not match its sha256")
        self.hub._store(self.body)
        return self._send(200, b"", "PUT")

    def _create_commit(self, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_id, write=True)
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        with self.hub._lock:
            parent = repo.resolve(revision)
            files = dict(parent.files) if parent else {}
            header = {}
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    header = value
                    wanted_parent = value.get("parentCommit")
                    if wanted_parent and parent and wanted_parent != parent.sha:
                        raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, None, "Only base64 file content is accepted")
                    files[value["path"]] = self.hub._store(base64.b64decode(value["content"]), value["path"])
                elif key == "lfsFile":
                    stored = self.hub.blobs.get(value["oid"])
                    if stored is None:
                        raise HubError(400, None, f"LFS file {value['path']} was not uploaded")
                    files[value["path"]] = Blob(stored.size, stored.sha256, stored.git_sha1, True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "EntryNotFound", f"{value['path']} does not exist")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, None, f"Unsupported commit operation {key!r}")
            sha = self.hub._commit(repo, revision, files, header.get("summary") or "Commit", parent and parent.sha)
        return self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "commitMessage": header.get("summary"), "pullRequestUrl": None}, "POST",
                          repo_id=repo_id)
