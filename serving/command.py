"""`newstagger serve`: the HTTP service under uvicorn.

Flags override NEWSTAGGER_* environment variables (every setting in serving/settings.py has
one). They are handed on as environment variables, so each uvicorn worker process builds the
same settings.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from newstagger.cli import add_model_argument
from newstagger.errors import UsageError

FLAGS = ("model", "host", "port", "workers")


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the tagger over HTTP", description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--host", help="interface to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="TCP port (default: 8000)")
    parser.add_argument("--workers", type=int, help="server processes, each with its own model (default: 1)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from newstagger.folders import META_FILE, default_model_dir

    from .observability import metrics_shared_by_workers
    from .settings import ServeSettings

    if args.model:
        # Absolute: workers may not share our idea of "."; not resolved (with one worker), so a link
        # such as registry/current stays a link, which a reload without a folder follows.
        args.model = str(Path(args.model).absolute())
    for name in FLAGS:
        if getattr(args, name) is not None:
            os.environ[f"NEWSTAGGER_{name.upper()}"] = str(getattr(args, name))
    try:
        settings = ServeSettings()
    except ValidationError as err:
        problems = "; ".join(f"NEWSTAGGER_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors())
        raise UsageError(problems) from None
    model = settings.model or default_model_dir()
    if not (model / META_FILE).is_file():
        raise UsageError(f"{model} is not a model folder (no {META_FILE}); pass --model or set NEWSTAGGER_MODEL")
    if settings.workers > 1:
        # Workers load on their own, and uvicorn restarts one that dies: through a link such as
        # registry/current, a restart after a promotion would serve another model beside the rest.
        os.environ["NEWSTAGGER_MODEL"] = str(model.resolve())
    check_can_listen(settings.host, settings.port)
    with metrics_shared_by_workers(settings.workers):
        uvicorn.run("serving.app:app_from_environment", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, limit_concurrency=settings.max_connections, log_config=None,
                    access_log=False, timeout_graceful_shutdown=settings.shutdown_timeout_s)
    return 0


def check_can_listen(host: str, port: int) -> None:
    """UsageError when the address cannot be listened on (a port in use, no such interface), said in
    one line before uvicorn would say it in a log record amid its start-up and shutdown lines."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except (OSError, UnicodeError) as err:  # UnicodeError: a host name IDNA cannot encode
        raise UsageError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None
