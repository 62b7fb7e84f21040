"""The playground page at `/` (plain HTML and a little JavaScript, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def get_playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "playground.html", media_type="text/html")
