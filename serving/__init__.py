"""newstagger's HTTP service: `newstagger serve`, or `serving.app:app_from_environment` for any ASGI
server (a factory: it configures logging from NEWSTAGGER_LOG_FORMAT, then calls `create_app(settings)`).
Nothing is imported here, so the CLI stays quick to start for other commands."""
