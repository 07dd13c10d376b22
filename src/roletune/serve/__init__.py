"""`roletune serve`: runs behind an OpenAI-compatible API, one copy of the base weights for all of them.

engine.py loads the base and every run's adapter and generates; app.py is the HTTP API (FastAPI), run
here with uvicorn, and page.html the web page it serves at /. vllm.py hands the runs to vLLM's server
instead (--engine vllm).
"""
from __future__ import annotations

import ipaddress
import logging
import os

log = logging.getLogger(__name__)


def parse_runs(items: list[str]) -> list[tuple[str | None, str]]:
    """RUN or NAME=RUN, as given on the command line -> (name or None, location)."""
    runs = []
    for item in items:
        name, sep, location = item.partition("=")
        runs.append((name, location) if sep and name and not os.path.exists(item) else (None, item))
    return runs


def serve(runs: list[str], *, base_model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, allow_origins: list[str] | None = None, device: str = "auto",
          dtype: str | None = None, quantization: str | None = None, engine: str = "roletune", echo=print) -> None:
    api_key = api_key or os.environ.get("ROLETUNE_API_KEY") or None
    if not api_key and not _loopback(host):
        log.warning("--host %s takes requests from other machines and no API key is set: anyone who reaches the "
                    "port can use the models; pass --api-key KEY (or set ROLETUNE_API_KEY)", host)
    if engine == "vllm":
        from roletune.serve.vllm import run_vllm, vllm_command

        return run_vllm(vllm_command(parse_runs(runs), base_model=base_model, host=host, port=port, dtype=dtype,
                                     quantization=quantization), api_key, echo)
    import uvicorn

    from roletune.serve.app import create_app
    from roletune.serve.engine import Engine

    served = Engine(parse_runs(runs), base_model=base_model, device=device, dtype=dtype, quantization=quantization)
    echo(f"serving {', '.join(served.characters)} at http://{host}:{port}/v1, and a page to talk to them at "
         f"http://{host}:{port}/{' (API key required)' if api_key else ''}")
    uvicorn.run(create_app(served, api_key=api_key, allow_origins=allow_origins), host=host, port=port,
                log_level="warning")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
