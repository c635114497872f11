"""A small Hugging Face Hub-compatible HTTP server for the tests (standard library and PyYAML only).

It speaks the part of the Hub's HTTP API that huggingface_hub 2.x uses to create repos and branches, commit
files (regular ones inline, large/binary ones through the LFS batch -> upload -> verify protocol), list them
and download them (`resolve`, with the headers `file_download` needs, and byte ranges for `HfFileSystem`), so that
huggingface_hub, diffusers and datasets (streaming too) run unmodified against `http://127.0.0.1:<port>`. Model
and dataset repos are hosted; a dataset repo is kept in `repos` as "datasets/<id>", as its URLs name it. Clients
must set `HF_HUB_DISABLE_XET=1`: this server does not speak xet.

    with HubServer(tokens={"hf_alice": "alice"}) as hub:
        HfApi(endpoint=hub.url, token="hf_alice").create_repo("alice/m", private=True)
        assert hub.repos["alice/m"].private

Auth: `tokens` maps each valid token to its user, who may write to their own namespace and to the
organisations `orgs` lists for them (user -> org names; whoami reports them with roleInOrg "write"). Tokens in
`read_only` are valid but may not write (whoami reports role "read"; writes get 403). A token that is not in
`tokens` gets 401 ("Invalid credentials in Authorization header", as the Hub answers); a private or missing
repo is 401 RepoNotFound without a token and 404 RepoNotFound with a valid one.
Fault injection: `fail_next(path_substring, status=503, times=1)` answers the next matching requests with
that status and `headers` (e.g. Retry-After), or drops the connection with `disconnect=True`; with
`after=True` the request is carried out first and only its answer is lost. Every request is recorded in `requests`
(method, path, status, user, body; never the token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Stored as LFS objects, like the Hub's default .gitattributes; so is any binary or > 10 MB file.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".jpeg", ".npy", ".npz", ".zip")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
_MAX_REGULAR_SIZE = 10 * 1024 * 1024
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_YAML_BLOCK = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(?:\r?\n|$)")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub reports as a file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A file in a commit: inline `data` for regular files, `sha256` (content in the LFS store) for LFS ones."""

    size: int
    data: bytes | None = None
    sha256: str | None = None

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def oid(self) -> str:
        """The git oid: of the content for regular files, of the pointer file for LFS ones."""
        return git_blob_oid(self.data if self.sha256 is None else self.pointer)

    @property
    def etag(self) -> str:
        return self.oid if self.sha256 is None else self.sha256


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.removeprefix("datasets/").split("/")[0]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # URL-decoded, without the query string
    status: int
    user: str | None
    body: bytes


@dataclass
class _Fault:
    substring: str
    status: int
    times: int
    method: str | None
    disconnect: bool
    after: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.payload = headers or {}, {"error": message, **(payload or {})}


class HubServer:
    """An in-memory Hub on 127.0.0.1 (port chosen by the OS); use as a context manager or start()/stop()."""

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        orgs: dict[str, list[str]] | None = None,
        read_only: set[str] | None = None,
    ) -> None:
        self.tokens = dict(tokens or {})
        self.orgs = dict(orgs or {})
        self.read_only = set(read_only or ())
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-hub", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(
        self,
        path_substring: str,
        status: int = 503,
        times: int = 1,
        method: str | None = None,
        disconnect: bool = False,
        after: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `times` requests whose path contains `path_substring` with `status` and `headers` (or
        a dropped connection), before any other processing; `after`: drop the connection after processing."""
        with self._lock:
            self._faults.append(_Fault(path_substring, status, times, method, disconnect, after, dict(headers or {})))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file of `repo_id` at `revision` (a branch or commit oid)."""
        with self._lock:
            repo = self.repos[repo_id]
            commit = repo.commits[repo.branches.get(revision, revision)]
            return {path: self.content(blob) for path, blob in commit.files.items()}

    def content(self, blob: Blob) -> bytes:
        return blob.data if blob.sha256 is None else self.lfs_objects[blob.sha256]

    def requests_matching(self, path_substring: str, method: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if path_substring in r.path and method in (None, r.method)]

    # ----- state changes (called with the lock held) -----

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        listing = sorted((path, blob.oid) for path, blob in files.items())
        oid = hashlib.sha1(json.dumps([parent, message, listing, len(repo.commits)]).encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, files)
        return repo.commits[oid]

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and fault.substring in path and fault.method in (None, method):
                    fault.times -= 1
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    # ----- plumbing -----

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default one-line-per-request log on stderr."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        # a dataset repo's routes are a model repo's with "datasets/" after "/api/" or "/"; the handlers see the id
        path, self.kind = url.path, ""
        for prefix, replacement in (("/api/datasets/", "/api/models/"), ("/datasets/", "/")):
            if path.startswith(prefix):
                path, self.kind = replacement + path.removeprefix(prefix), "datasets/"
                break
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        self.user: str | None = None
        self.can_write = False
        fault = self.hub._take_fault(self.command, unquote(url.path))
        if fault is not None and fault.disconnect and not fault.after:
            self._record(unquote(url.path), 0)
            self.close_connection = True
            return
        try:
            if fault is not None and not fault.after:
                raise _HttpError(fault.status, f"injected failure {fault.status}", headers=fault.headers)
            self.user = self._authenticate()
            for method, pattern, handler in _ROUTES:
                match = pattern.match(path)
                if match and self.command in method:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.hub._lock:
                        status, payload, headers = handler(self, **args)
                    break
            else:
                raise _HttpError(404, f"no route for {self.command} {url.path}")
        except _HttpError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            status, payload = err.status, err.payload
        if fault is not None and fault.after:  # done, but the client never hears of it
            self._record(unquote(url.path), 0)
            self.close_connection = True
            return
        self._record(unquote(url.path), status)
        self._send(status, payload, headers)

    def _record(self, path: str, status: int) -> None:
        with self.hub._lock:
            self.hub.requests.append(RecordedRequest(self.command, path, status, self.user, self.body))

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        if isinstance(payload, bytes):
            body, content_type = payload, "application/octet-stream"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", content_type))
        self.send_header("Content-Length", headers.pop("Content-Length", str(len(body))))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise _HttpError(400, f"invalid JSON body: {err}") from None

    # ----- auth and lookups -----

    def _authenticate(self) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        self.can_write = token not in self.hub.read_only
        return user

    def _namespaces(self) -> tuple[str | None, ...]:
        """The user's own namespace and their organisations'."""
        return (self.user, *self.hub.orgs.get(self.user, []))

    def _may_write_to(self, namespace: str) -> bool:
        return self.can_write and namespace in self._namespaces()

    def _readable(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(self.kind + repo_id)
        if repo is None or (repo.private and repo.namespace not in self._namespaces()):
            raise _HttpError(401 if self.user is None else 404, "Repository not found", code="RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        if self.user is None:
            raise _HttpError(401, "You must be authenticated to write to a repository")
        repo = self._readable(repo_id)
        if not self._may_write_to(repo.namespace):
            raise _HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision, revision)
        if oid not in repo.commits:
            raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[oid]

    @staticmethod
    def _branch(repo: Repo, revision: str) -> str:
        if revision not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {revision}: not a branch", code="RevisionNotFound")
        return revision

    # ----- endpoints -----

    def whoami(self) -> tuple[int, Any, dict[str, str]]:
        if self.user is None:
            raise _HttpError(401, "You must be authenticated")
        access = {"displayName": "test", "role": "write" if self.can_write else "read"}
        orgs = [{"type": "org", "name": org, "roleInOrg": "write"} for org in self.hub.orgs.get(self.user, [])]
        return 200, {"type": "user", "name": self.user, "orgs": orgs, "auth": {"accessToken": access}}, {}

    def create_repo(self) -> tuple[int, Any, dict[str, str]]:
        if self.user is None:
            raise _HttpError(401, "You must be authenticated to create a repository")
        payload = self._json()
        namespace = payload.get("organization") or self.user
        if payload.get("type") not in (None, "model", "dataset"):
            raise _HttpError(400, "this fake Hub hosts model and dataset repos only")
        if not self._may_write_to(namespace):
            raise _HttpError(403, f"You don't have the rights to create a repository under {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        key = ("datasets/" if payload.get("type") == "dataset" else "") + repo_id
        url = f"{self.hub.url}/{key}"
        if key in self.hub.repos:
            raise _HttpError(409, "You already created this repo", payload={"url": url})
        repo = self.hub.repos[key] = Repo(key, private=payload.get("visibility") == "private")
        gitattributes = Blob(size=len(GITATTRIBUTES), data=GITATTRIBUTES.encode())
        repo.branches["main"] = self.hub._new_commit(
            repo, None, "initial commit", {".gitattributes": gitattributes}
        ).oid
        return 200, {"url": url, "name": repo_id}, {}

    def model_info(self, repo: str, revision: str = "main") -> tuple[int, Any, dict[str, str]]:
        model = self._readable(repo)
        commit = self._commit(model, revision)
        info: dict[str, Any] = {
            "id": repo,
            "modelId": repo,
            "author": model.namespace,
            "sha": commit.oid,
            "private": model.private,
            "lastModified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            "tags": [],
        }
        card = commit.files.get("README.md")
        match = _YAML_BLOCK.match(self.hub.content(card).decode()) if card else None
        metadata = yaml.safe_load(match.group(1)) if match else None
        if isinstance(metadata, dict):
            info.update(cardData=metadata, tags=metadata.get("tags", []))
            info.update({k: metadata[k] for k in ("library_name", "pipeline_tag", "model-index") if k in metadata})
        return 200, info, {}

    def create_branch(self, repo: str, revision: str) -> tuple[int, Any, dict[str, str]]:
        model = self._writable(repo)
        if revision in model.branches:
            raise _HttpError(409, f"Reference already exists: refs/heads/{revision}")
        start = self._json().get("startingPoint") or "main"
        model.branches[revision] = self._commit(model, start).oid
        return 200, {}, {}

    def list_refs(self, repo: str) -> tuple[int, Any, dict[str, str]]:
        model = self._readable(repo)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in model.branches.items()]
        return 200, {"branches": branches, "tags": [], "converts": []}, {}

    def validate_yaml(self) -> tuple[int, Any, dict[str, str]]:
        match = _YAML_BLOCK.match(self._json().get("content", ""))
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}]}, {}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "the metadata block must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def preupload(self, repo: str, revision: str) -> tuple[int, Any, dict[str, str]]:
        model = self._writable(repo)
        commit = self._commit(model, self._branch(model, revision))
        answers = []
        for entry in self._json()["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = entry["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or entry["size"] > _MAX_REGULAR_SIZE
            existing = commit.files.get(entry["path"])
            oid = None if existing is None else (existing.sha256 or existing.oid)
            answers.append(
                {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {"files": answers, "commitOid": commit.oid}, {}

    def lfs_batch(self, repo: str) -> tuple[int, Any, dict[str, str]]:
        self._writable(repo)
        payload = self._json()
        if payload.get("operation") != "upload":
            raise _HttpError(400, "only LFS uploads are supported")
        objects = []
        for obj in payload["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/{self.kind}{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def lfs_upload(self, oid: str) -> tuple[int, Any, dict[str, str]]:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise _HttpError(400, "uploaded content does not match its sha256")
        self.hub.lfs_objects[oid] = self.body
        return 200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}

    def lfs_verify(self, repo: str) -> tuple[int, Any, dict[str, str]]:
        self._writable(repo)
        payload = self._json()
        stored = self.hub.lfs_objects.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            raise _HttpError(404, f"LFS object {payload['oid']} was not uploaded")
        return 200, {"success": True}, {}

    def commit(self, repo: str, revision: str) -> tuple[int, Any, dict[str, str]]:
        model = self._writable(repo)
        if self.query.get("create_pr"):
            raise _HttpError(400, "pull requests are not supported by this fake Hub")
        head = self._commit(model, self._branch(model, revision))
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, head.oid):
            raise _HttpError(412, "A commit has happened since the parent commit")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Blob(size=len(data), data=data)
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise _HttpError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = Blob(size=len(self.hub.lfs_objects[value["oid"]]), sha256=value["oid"])
            elif key == "deletedFile":
                files.pop(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise _HttpError(400, f"unknown commit operation {key!r}")
        commit = self.hub._new_commit(model, head.oid, header["summary"], files)
        model.branches[revision] = commit.oid
        url = f"{self.hub.url}/{self.kind}{repo}/commit/{commit.oid}"
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None}, {}

    def _entries(self, commit: Commit, paths: list[str] | None, folder: str, recursive: bool) -> list[dict]:
        """Tree entries: the given `paths`, or the content of `folder` (its children, or all descendants)."""
        folders = sorted({p.rsplit("/", i)[0] for p in commit.files for i in range(1, p.count("/") + 1)})
        entries = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in folders
        ]
        for path, blob in sorted(commit.files.items()):
            entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.sha256 is not None:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
            entries.append(entry)
        if paths is not None:
            return [e for e in entries if e["path"] in paths]
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        inside = [e for e in entries if e["path"].startswith(prefix)]
        if prefix and not inside:
            raise _HttpError(404, f"{folder} does not exist", code="EntryNotFound")
        return [e for e in inside if recursive or "/" not in e["path"][len(prefix) :]]

    def tree(self, repo: str, revision: str, path: str | None = None) -> tuple[int, Any, dict[str, str]]:
        commit = self._commit(self._readable(repo), revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        return 200, self._entries(commit, None, path or "", recursive), {}

    def paths_info(self, repo: str, revision: str) -> tuple[int, Any, dict[str, str]]:
        commit = self._commit(self._readable(repo), revision)
        paths = parse_qs(self.body.decode()).get("paths", [])
        return 200, self._entries(commit, paths, "", True), {}

    def resolve(self, repo: str, revision: str, path: str) -> tuple[int, Any, dict[str, str]]:
        commit = self._commit(self._readable(repo), revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _HttpError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.oid}"', "Content-Length": str(blob.size)}
        if blob.sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        content = self.hub.content(blob)
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if ranged is None or not any(ranged.groups()):
            return 200, content, headers
        first, last = ranged.groups()  # "a-b", "a-" or the last b bytes "-b"
        start = int(first) if first else max(blob.size - int(last), 0)
        end = min(int(last) if first and last else blob.size - 1, blob.size - 1)
        if start > end:
            raise _HttpError(416, f"range {self.headers['Range']} is outside {blob.size} bytes")
        headers.update({"Content-Range": f"bytes {start}-{end}/{blob.size}", "Content-Length": str(end - start + 1)})
        return 206, content[start : end + 1], headers


_ROUTES = [
    (("GET",), re.compile(r"^/api/whoami-v2$"), _Handler.whoami),
    (("POST",), re.compile(r"^/api/repos/create$"), _Handler.create_repo),
    (("POST",), re.compile(r"^/api/validate-yaml$"), _Handler.validate_yaml),
    (("GET",), re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?$"), _Handler.model_info),
    (("POST",), re.compile(rf"^/api/models/{_REPO}/branch/(?P<revision>[^/]+)$"), _Handler.create_branch),
    (("GET",), re.compile(rf"^/api/models/{_REPO}/refs$"), _Handler.list_refs),
    (("POST",), re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>[^/]+)$"), _Handler.preupload),
    (("POST",), re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>[^/]+)$"), _Handler.commit),
    (("GET",), re.compile(rf"^/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$"), _Handler.tree),
    (("POST",), re.compile(rf"^/api/models/{_REPO}/paths-info/(?P<revision>[^/]+)$"), _Handler.paths_info),
    (("POST",), re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), _Handler.lfs_batch),
    (("POST",), re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$"), _Handler.lfs_verify),
    (("PUT",), re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), _Handler.lfs_upload),
    (("GET", "HEAD"), re.compile(rf"^/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), _Handler.resolve),
]
