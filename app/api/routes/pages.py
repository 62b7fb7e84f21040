"""The playground page at `/` (plain HTML and a little JavaScript, no build step) and its icon."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def get_playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "playground.html", media_type="text/html")


@router.get("/favicon.ico")
async def get_favicon() -> FileResponse:
    # Browsers ask for /favicon.ico whatever the page links; answer with the one icon, an SVG.
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")
