"""HTTP API for headless training (the WebUI's FastAPI app, or the standalone server's).

  POST {prefix}/train    body {"config": {TrainConfig keys}, "resume": false, "preview": true}
                         (a bare mapping of config keys is accepted too)  -> 200 {id, name, state, run_dir}
                         400 bad request or config, 401 no/wrong credentials, 403 a path outside the roots,
                         409 a run is already going, 413 body over 1 MB, 503 the host cannot train now
  GET  {prefix}/status   -> the job's status (state idle|waiting|running|finishing|finished|stopped|failed,
                            step, total_steps, loss, it_per_s, eta_s, lora_path, checkpoints, error ...)
  GET  {prefix}/events?since=N -> {"events": [...], "next": M}; poll with since=M
  POST {prefix}/stop     -> {"stopping": true|false}; the run saves a resumable checkpoint and ends

Who may call it is the host's decision (`Host.api_access`): inside a WebUI the routes exist only when the WebUI
serves its own API and carry the WebUI's `--api-auth`; what a request may touch is decided by `confine` below.
"""
# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request, credentials) at run time

import json
from typing import Any, Callable, Optional

from ..config import ConfigError, from_dict
from .confine import RequestRefused, confine
from .jobs import JobError, JobRunner, default_runner

PREFIX = "/lora-trainer/v1"
CONTROL_KEYS = ("config", "resume", "preview")
MAX_BODY_BYTES = 1 << 20


class BodyTooLarge(ValueError):
    pass


def parse_request(payload: Any) -> tuple[dict, bool, bool]:
    """(config dict, resume, preview) from a request body; raises ConfigError for a malformed one."""
    if not isinstance(payload, dict):
        raise ConfigError("the request body must be a JSON object: {\"config\": {...}}")
    if "config" in payload:
        cfg = payload["config"]
        unknown = sorted(set(payload) - set(CONTROL_KEYS))
        if unknown:
            raise ConfigError(f"unknown request field(s) {unknown}; config keys go inside \"config\"")
    else:
        cfg = {k: v for k, v in payload.items() if k not in CONTROL_KEYS}
    if not isinstance(cfg, dict):
        raise ConfigError("\"config\" must be a JSON object of TrainConfig keys")
    return cfg, _flag(payload, "resume", False), _flag(payload, "preview", True)


def _flag(payload: dict, key: str, default: bool) -> bool:
    value = payload.get(key, default)
    if not isinstance(value, bool):  # "no" or 0 must not silently mean true or false
        raise ConfigError(f"{key!r} must be a JSON boolean (true or false), not {type(value).__name__}")
    return value


def decode_body(raw: bytes) -> Any:
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"the request body is not JSON ({type(e).__name__})") from None


def start_from_request(payload: Any, host, runner: JobRunner) -> dict:
    cfg_dict, resume, preview = parse_request(payload)
    cfg = confine(from_dict(cfg_dict, source="API request"), host)
    job = runner.start(cfg, host, resume=resume, preview_after=preview)
    return {"id": job.id, "name": job.name, "state": job.state, "run_dir": str(job.run_dir)}


def register_api(app, host_factory: Callable[[], Any], runner: Optional[JobRunner] = None,
                 prefix: str = PREFIX, dependencies: Optional[list] = None) -> None:
    """Adds the routes to a FastAPI app. dependencies: FastAPI `Depends(...)` put on every route (the host's
    authentication)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from ..hosts.base import HostError

    runner = runner or default_runner()
    deps = list(dependencies or [])

    def error(status: int, message: str):
        return JSONResponse(status_code=status, content={"error": message})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BodyTooLarge(f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise BodyTooLarge(f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        return bytes(raw)

    async def train(request: Request):
        try:
            payload = decode_body(await read_body(request))
            return await run_in_threadpool(start_from_request, payload, host_factory(), runner)
        except BodyTooLarge as e:
            return error(413, str(e))
        except RequestRefused as e:
            return error(403, str(e))
        except ConfigError as e:
            return error(400, str(e))
        except JobError as e:
            return error(409, str(e))
        except (HostError, RuntimeError) as e:  # RuntimeError: e.g. no host for this WebUI
            return error(503, str(e))

    def status():
        return runner.status()

    def events(since: int = 0):
        items, nxt = runner.events_since(max(0, int(since)))
        return {"events": items, "next": nxt}

    def stop():
        return {"stopping": runner.stop("stop requested through the API: saving a resumable checkpoint")}

    app.add_api_route(prefix + "/train", train, methods=["POST"], dependencies=deps)
    app.add_api_route(prefix + "/status", status, methods=["GET"], dependencies=deps)
    app.add_api_route(prefix + "/events", events, methods=["GET"], dependencies=deps)
    app.add_api_route(prefix + "/stop", stop, methods=["POST"], dependencies=deps)


def basic_auth_dependency(credentials: str):
    """A FastAPI dependency that requires HTTP basic auth with one of "user:pass[,user2:pass2]" (the WebUI's
    --api-auth format); 401 otherwise."""
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    allowed = parse_credentials(credentials)
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)):
        expected = allowed.get(given.username)
        if expected is not None and compare_digest(given.password.encode(), expected.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return Depends(check)


def parse_credentials(text: str) -> dict[str, str]:
    allowed = {}
    for item in str(text).split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("credentials must be user:password (several separated by commas)")
        allowed[user] = password
    return allowed
