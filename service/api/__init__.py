"""The REST API (JSON, OpenAPI at /openapi.json) and the dashboard it serves."""

from service.api.main import create_app

__all__ = ["create_app"]
