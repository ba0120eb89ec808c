"""kdsearch service: FastAPI app, dashboard, worker runner and CLI."""
