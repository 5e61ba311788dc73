"""`pue-serve`: the OpenAI embeddings API over any bundle (`pip install "pue[serve]"`).

`create_app(embedder, settings)` builds the FastAPI app; `serve(embedder, settings, listen)` runs it under uvicorn
with a draining SIGTERM. Modules: `schema` (request bodies → rows), `limits` (limits, images from data URLs),
`rows` (decode + tokenize before queueing), `batcher` (coalescing, off the event loop), `security` (key, Host,
binding), `metrics` (Prometheus), `responses`, `config`, `app`, `server`.
"""

from pue.serve.app import create_app
from pue.serve.config import ServeSettings, batching_policy, default_model_name
from pue.serve.limits import Limits
from pue.serve.server import Listen, serve

__all__ = ["Limits", "Listen", "ServeSettings", "batching_policy", "create_app", "default_model_name", "serve"]
