"""A small Hub-compatible HTTP server for upload tests: the calls huggingface_hub makes to push a folder.

It answers ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``,
``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}``, the LFS batch API
(``POST /{repo}.git/info/lfs/objects/batch``) with ``PUT /lfs/{oid}`` uploads, and
``POST /api/models/{repo}/commit/{rev}`` (ndjson), recording every repo, request and commit.
Start it on 127.0.0.1 and point ``HF_ENDPOINT`` at :attr:`HubServer.url` (with
``HF_HUB_DISABLE_XET=1``, so large files go through LFS rather than Xet).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

__all__ = ["USER", "Commit", "HubServer"]

_LFS_SUFFIXES = (".safetensors", ".onnx", ".data", ".png")
USER = "user"  # whom every token belongs to


@dataclass
class Commit:
    """One commit the server accepted."""

    repo_id: str
    revision: str
    summary: str
    create_pr: bool
    files: dict[str, bytes]  # path in repo -> content

    def write_to(self, folder: Path) -> Path:
        """Materialise the commit's files under ``folder`` (as a download would)."""
        for path, content in self.files.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return folder


@dataclass
class _State:
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    branches: dict[str, set[str]] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, user-agent)


class HubServer:
    """Run the fake Hub in a background thread: ``with HubServer() as hub: ... hub.commits``."""

    def __init__(self) -> None:
        self.state = _State()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def commits(self) -> list[Commit]:
        return self.state.commits

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    state = hub.state

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _reply(self, status: int, payload: Any = None) -> None:
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            path = urlsplit(self.path).path
            state.requests.append(("PUT", path, self.headers.get("User-Agent", "")))
            oid = path.removeprefix("/lfs/")
            content = self._body()
            if hashlib.sha256(content).hexdigest() != oid:
                return self._reply(400, {"error": f"content does not match oid {oid}"})
            state.lfs[oid] = content
            self._reply(200)

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), url.query
            state.requests.append(("POST", path, self.headers.get("User-Agent", "")))
            body = self._body()
            if path == "/api/repos/create":
                data = json.loads(body)
                repo_id = f"{data.get('organization') or USER}/{data['name']}"  # no namespace: the token's user
                state.repos.setdefault(repo_id, {"visibility": data.get("visibility")})
                state.branches.setdefault(repo_id, {"main"})
                return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
            if path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                try:
                    yaml.safe_load(content.split("---")[1])
                except (IndexError, yaml.YAMLError) as err:
                    return self._reply(400, {"errors": [{"message": f"invalid metadata: {err}"}]})
                return self._reply(200, {"errors": [], "warnings": []})
            if path.endswith(".git/info/lfs/objects/batch"):
                objects = json.loads(body)["objects"]
                actions = [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "authenticated": True,
                        "actions": {"upload": {"href": f"{hub.url}/lfs/{o['oid']}"}},
                    }
                    for o in objects
                ]
                return self._reply(200, {"transfer": "basic", "objects": actions})
            parts = path.removeprefix("/api/models/").split("/")
            repo_id, verb, revision = "/".join(parts[:2]), parts[2], "/".join(parts[3:])
            if repo_id not in state.repos:
                return self._reply(404, {"error": f"Repository {repo_id} not found"})
            if verb == "branch":
                state.branches[repo_id].add(revision)
                return self._reply(200)
            if revision not in state.branches[repo_id] and not revision.startswith("refs/pr/"):
                return self._reply(404, {"error": f"Invalid rev id: {revision}"})
            if verb == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": _mode(f), "shouldIgnore": False, "oid": None} for f in files]
                return self._reply(200, {"files": modes})
            if verb == "commit":
                return self._commit(repo_id, revision, body, create_pr="create_pr=1" in query)
            return self._reply(404, {"error": f"unknown endpoint {path}"})

        def _commit(self, repo_id: str, revision: str, body: bytes, *, create_pr: bool) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"]
            files: dict[str, bytes] = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in state.lfs:
                        return self._reply(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    files[value["path"]] = state.lfs[value["oid"]]
                else:
                    return self._reply(400, {"error": f"unsupported operation {line['key']}"})
            state.commits.append(Commit(repo_id, revision, header["summary"], create_pr, files))
            oid = hashlib.sha1(body).hexdigest()
            payload = {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid}
            if create_pr:
                payload["pullRequestUrl"] = f"{hub.url}/{repo_id}/discussions/{len(state.commits)}"
            self._reply(200, payload)

    return Handler


def _mode(file: dict[str, Any]) -> str:
    """LFS for binary files, as the Hub decides (here: by extension or a NUL byte in the sample)."""
    sample = base64.b64decode(file["sample"])
    return "lfs" if file["path"].endswith(_LFS_SUFFIXES) or b"\x00" in sample else "regular"
