"""newstagger's HTTP service: `newstagger serve`, or `serving.app.create_app(settings)` for any
ASGI server. Nothing is imported here, so the CLI stays quick to start for other commands."""
