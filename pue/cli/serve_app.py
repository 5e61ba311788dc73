"""`pue-serve`: the OpenAI embeddings API over a bundle. Thin: parse, check, load, hand over to `pue.serve`."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pue.cli.common import handle_errors, set_debug

app = typer.Typer(
    name="pue-serve",
    add_completion=False,
    no_args_is_help=True,
    help="Serve a bundle through the OpenAI embeddings API (POST /v1/embeddings, GET /v1/models, /health, /metrics).",
)


@app.command()
@handle_errors
def serve(
    bundle: Path = typer.Argument(..., help="The bundle directory to serve."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs an API key."),
    port: int = typer.Option(8000, "--port", help="Port to bind."),
    model_name: str = typer.Option(
        None, "--model-name", help="The model id clients send (default: <source checkpoint>-<precision>)."
    ),
    api_key_file: Path = typer.Option(
        None, "--api-key-file", help="File whose first line is the API key (or set PUE_API_KEY)."
    ),
    max_batch: int = typer.Option(None, "--max-batch", min=1, help="Rows per runtime batch (default: the bundle's)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="How long a batch waits to fill up."),
    max_queue: int = typer.Option(128, "--max-queue", min=1, help="Queued rows before requests get 503."),
    max_inputs: int = typer.Option(256, "--max-inputs", min=1, help="Inputs per request (more: 413)."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Request body size (more: 413)."),
    max_text_chars: int = typer.Option(10_000, "--max-text-chars", min=1, help="Characters per text (more: 400)."),
    max_image_pixels: int = typer.Option(
        4096 * 4096, "--max-image-pixels", min=1, help="Pixels per image, checked before decoding (more: 400)."
    ),
    allow_remote_images: bool = typer.Option(
        False, "--allow-remote-images", help="Fetch http(s) image URLs (default: only data: URLs are read)."
    ),
    allowed_host: list[str] = typer.Option(
        None, "--allowed-host", help="A Host header name to answer besides the bound address (repeatable)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Runtime backend (auto picks the bundle's)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for the runtime (default: its own)."),
    ssl_certfile: Path = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM); with --ssl-keyfile."),
    ssl_keyfile: Path = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)."),
    no_access_log: bool = typer.Option(False, "--no-access-log", help="Do not write the access log."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Serve BUNDLE until SIGTERM or Ctrl-C, which stop new connections, drain the queue and exit 0."""
    set_debug(debug)
    from pue.extras import require_extras

    require_extras(["serve"], "pue-serve")
    from pue.serve import Limits, Listen, ServeSettings, batching_policy, default_model_name, serve
    from pue.serve.security import allowed_hosts, check_binding, load_api_key

    api_key = load_api_key(api_key_file)
    check_binding(host, api_key)
    listen = Listen(host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    _configure_logging(debug)
    from pue.runtime import Embedder

    embedder = Embedder.load(bundle, backend=backend, device=device, batch_size=max_batch, threads=threads)
    per_request, policy = batching_policy(embedder.manifest)
    settings = ServeSettings(
        model_name=model_name or default_model_name(embedder.manifest, bundle),
        api_key=api_key,
        max_batch=embedder.batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        limits=Limits(
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            max_inputs=max_inputs,
            max_text_chars=max_text_chars,
            max_image_pixels=max_image_pixels,
            allow_remote_images=allow_remote_images,
        ),
        allowed_hosts=allowed_hosts(host, allowed_host or ()),
        per_request=per_request,
        access_log=not no_access_log,
    )
    logging.getLogger("pue.serve").info("batching: %s", policy)
    serve(embedder, settings, listen)


def _configure_logging(debug: bool) -> None:
    """Server logs on stderr: pue.serve and uvicorn at INFO (the access log is one JSON object per line)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    level = logging.DEBUG if debug else logging.INFO
    for name in ("pue.serve", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
