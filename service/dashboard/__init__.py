"""The dashboard: static pages that poll the REST API; Plotly.js is served from the installed plotly package."""

from __future__ import annotations

from pathlib import Path

import plotly
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def mount_dashboard(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def studies_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/workers", include_in_schema=False)
    def workers_page() -> FileResponse:
        return FileResponse(STATIC / "workers.html")

    @app.get("/studies/{name}", include_in_schema=False)
    def study_page(name: str) -> FileResponse:
        return FileResponse(STATIC / "study.html")

    @app.get("/studies/{name}/trials/{number}", include_in_schema=False)
    def trial_page(name: str, number: str) -> FileResponse:
        return FileResponse(STATIC / "trial.html")

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(PLOTLY_JS, media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
