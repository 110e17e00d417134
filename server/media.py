"""Image parts of a chat request: count, fetch, decode and bound them before they reach the engine.

Remote URLs are fetched here (``server/remote.py``) and replaced by data URLs, so the engine only
ever receives bytes the gateway has checked.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

from server.accounting import Size
from server.config import Settings
from server.errors import GatewayError
from server.remote import RemoteImages
from server.schemas import ImagePart, Message, UserMessage


def image_parts(messages: list[Message]) -> Iterator[tuple[str, ImagePart]]:
    """(param path, part) of every image_url part, in order."""
    for mi, message in enumerate(messages):
        if isinstance(message, UserMessage) and isinstance(message.content, list):
            for pi, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    yield f"messages[{mi}].content[{pi}].image_url", part


def decode_data_url(path: str, url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise GatewayError(400, f"{path}: data URL must be base64-encoded", path)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, f"{path}: invalid base64 in data URL", path) from None


def image_size(path: str, raw: bytes, settings: Settings) -> tuple[Size, str]:
    """(width, height) and format of ``raw``: 400 unless a decodable picture, 413 if too big."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            (width, height), fmt = img.size, (img.format or "png").lower()
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
    return (width, height), fmt


async def check_images(
    messages: list[Message], settings: Settings, remote: RemoteImages
) -> list[Size]:
    """Check every image part (fetching remote ones into data URLs); returns their sizes."""
    parts = list(image_parts(messages))
    if len(parts) > settings.max_images:
        raise GatewayError(
            400,
            f"messages: {len(parts)} images in one request, the limit is {settings.max_images}",
            "messages",
        )
    sizes = []
    for path, part in parts:
        url = part.image_url.url
        if url.startswith("data:"):
            raw = decode_data_url(path, url)
        elif url.startswith(("http://", "https://")):
            raw = await remote.fetch(url, path)
        else:
            raise GatewayError(
                400, f"{path}: expected a data: URL (data:image/...;base64,...)", path
            )
        size, fmt = image_size(path, raw, settings)
        if not url.startswith("data:"):
            part.image_url.url = f"data:image/{fmt};base64," + base64.b64encode(raw).decode()
        sizes.append(size)
    return sizes
