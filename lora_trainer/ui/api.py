"""HTTP API for headless training (the WebUI's FastAPI app, or the standalone server's).

  POST {prefix}/train    body {"config": {TrainConfig keys}, "resume": false, "preview": true}
                         (a bare mapping of config keys is accepted too)  -> 200 {id, name, state, run_dir}
                         400 config error, 409 a run is already going, 503 the host cannot train now
  GET  {prefix}/status   -> the job's status (state idle|waiting|running|finishing|finished|stopped|failed,
                            step, total_steps, loss, it_per_s, eta_s, lora_path, checkpoints, error ...)
  GET  {prefix}/events?since=N -> {"events": [...], "next": M}; poll with since=M
  POST {prefix}/stop     -> {"stopping": true|false}; the run saves a resumable checkpoint and ends
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..config import ConfigError, from_dict
from .jobs import JobError, JobRunner, default_runner

PREFIX = "/lora-trainer/v1"
CONTROL_KEYS = ("config", "resume", "preview")


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
    return cfg, bool(payload.get("resume", False)), bool(payload.get("preview", True))


def start_from_request(payload: Any, host, runner: JobRunner) -> dict:
    cfg_dict, resume, preview = parse_request(payload)
    cfg = from_dict(cfg_dict, source="API request")
    job = runner.start(cfg, host, resume=resume, preview_after=preview)
    return {"id": job.id, "name": job.name, "state": job.state, "run_dir": str(job.run_dir)}


def register_api(app, host_factory: Callable[[], Any], runner: Optional[JobRunner] = None,
                 prefix: str = PREFIX) -> None:
    from fastapi import Body
    from fastapi.responses import JSONResponse

    from ..hosts.base import HostError

    runner = runner or default_runner()

    def error(status: int, message: str):
        return JSONResponse(status_code=status, content={"error": message})

    @app.post(prefix + "/train")
    def train(payload: Any = Body(...)):
        try:
            return start_from_request(payload, host_factory(), runner)
        except ConfigError as e:
            return error(400, str(e))
        except JobError as e:
            return error(409, str(e))
        except HostError as e:
            return error(503, str(e))
        except RuntimeError as e:  # e.g. no host for this WebUI
            return error(503, str(e))

    @app.get(prefix + "/status")
    def status():
        return runner.status()

    @app.get(prefix + "/events")
    def events(since: int = 0):
        items, nxt = runner.events_since(max(0, int(since)))
        return {"events": items, "next": nxt}

    @app.post(prefix + "/stop")
    def stop():
        return {"stopping": runner.stop("stop requested through the API: saving a resumable checkpoint")}
