"""Image parts of a chat request: count, decode and bound them before they reach the engine."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from server.accounting import Size
from server.config import Settings
from server.errors import GatewayError


def image_parts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(param path, url) of every image_url part, in order."""
    found = []
    for mi, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for pi, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                path = f"messages[{mi}].content[{pi}].image_url"
                if not isinstance(url, str) or not url:
                    raise GatewayError(400, f"{path}: missing url", path)
                found.append((path, url))
    return found


def check_image(path: str, url: str, settings: Settings) -> Size | None:
    """Raise a 400/413 naming ``path`` unless the image is a decodable, bounded picture; returns
    its size (None for a remote URL, which the engine fetches)."""
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise GatewayError(
                400, f"{path}: remote image URLs are disabled here; send a data: URL", path
            )
        return None
    if not url.startswith("data:"):
        raise GatewayError(400, f"{path}: expected a data: URL (data:image/...;base64,...)", path)
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise GatewayError(400, f"{path}: data URL must be base64-encoded", path)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, f"{path}: invalid base64 in data URL", path) from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        raise GatewayError(400, f"{path}: bytes are not a decodable image", path) from None
    if width * height > settings.max_image_pixels:
        raise GatewayError(
            413,
            f"{path}: image has {width}x{height} = {width * height} pixels, "
            f"more than the limit of {settings.max_image_pixels}",
            path,
        )
    return width, height


def validate_images(messages: list[dict[str, Any]], settings: Settings) -> list[Size | None]:
    """Check every image part; returns their sizes in order."""
    parts = image_parts(messages)
    if len(parts) > settings.max_images:
        raise GatewayError(
            400,
            f"messages: {len(parts)} images in one request, the limit is {settings.max_images}",
            "messages",
        )
    return [check_image(path, url, settings) for path, url in parts]
