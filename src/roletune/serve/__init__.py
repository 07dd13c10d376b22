"""`roletune serve`: runs behind an OpenAI-compatible API, one copy of the base weights for all of them.

engine.py loads the base and every run's adapter and generates; app.py is the HTTP API (FastAPI), run
here with uvicorn.
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
          api_key: str | None = None, device: str = "auto", dtype: str | None = None,
          quantization: str | None = None, echo=print) -> None:
    import uvicorn

    from roletune.serve.app import create_app
    from roletune.serve.engine import Engine

    api_key = api_key or os.environ.get("ROLETUNE_API_KEY") or None
    if not api_key and not _loopback(host):
        log.warning("--host %s takes requests from other machines and no API key is set: anyone who reaches the "
                    "port can use the models; pass --api-key KEY (or set ROLETUNE_API_KEY)", host)
    engine = Engine(parse_runs(runs), base_model=base_model, device=device, dtype=dtype, quantization=quantization)
    echo(f"serving {', '.join(engine.characters)} at http://{host}:{port}/v1"
         f"{' (API key required)' if api_key else ''}")
    uvicorn.run(create_app(engine, api_key=api_key), host=host, port=port, log_level="warning")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
