"""Image and video parts of a chat request: count, fetch, decode and bound them before they reach
the engine.

Remote URLs are fetched here (``server/remote.py``) and replaced by data URLs, so the engine only
ever receives bytes the gateway has checked. Videos are checked from their container's metadata
and first frame (OpenCV, the reader vLLM itself uses), in a worker thread under a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import cv2
from PIL import Image, UnidentifiedImageError

from server.accounting import Size, VideoCounter
from server.config import Settings
from server.errors import GatewayError
from server.remote import RemoteMedia
from server.schemas import ImagePart, Message, UserMessage, VideoPart

# Containers a `video_url` data URL may name (each checked to decode with OpenCV's FFmpeg here).
# (vLLM reads `video/jpeg` as a comma-separated list of JPEG frames instead: not accepted.)
VIDEO_TYPES = {
    "video/mp4",
    "video/webm",
    "video/x-msvideo",
    "video/avi",
    "video/quicktime",
    "video/x-matroska",
}
Part = TypeVar("Part", ImagePart, VideoPart)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (and its unpruned tokens, when countable)."""

    width: int
    height: int
    frames: int
    fps: float
    original_tokens: int | None = None


@dataclass(frozen=True)
class Media:
    images: list[Size]
    videos: list[VideoInfo]

    def __bool__(self) -> bool:
        return bool(self.images or self.videos)


def media_parts(messages: list[Message], kind: type[Part]) -> Iterator[tuple[str, Part]]:
    """(param path, part) of every part of type ``kind``, in order."""
    field = "image_url" if kind is ImagePart else "video_url"
    for mi, message in enumerate(messages):
        if isinstance(message, UserMessage) and isinstance(message.content, list):
            for pi, part in enumerate(message.content):
                if isinstance(part, kind):
                    yield f"messages[{mi}].content[{pi}].{field}", part


def decode_data_url(path: str, url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise GatewayError(400, f"{path}: data URL must be base64-encoded", path)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, f"{path}: invalid base64 in data URL", path) from None


def data_url_type(url: str) -> str:
    """The media type of a ``data:`` URL, lower-case (``data:video/mp4;base64,...``: video/mp4)."""
    return url.partition(",")[0].removeprefix("data:").split(";")[0].strip().lower()


def image_size(path: str, raw: bytes, settings: Settings) -> tuple[Size, str]:
    """(width, height) and format of ``raw``: 400 unless a decodable picture, 413 if too big."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            (width, height), fmt = img.size, (img.format or "png").lower()
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        raise GatewayError(400, f"{path}: bytes are not a decodable image", path) from None
    check_pixels(path, "image", width, height, settings)
    return (width, height), fmt


def check_pixels(path: str, what: str, width: int, height: int, settings: Settings) -> None:
    if width * height > settings.max_image_pixels:
        raise GatewayError(
            413,
            f"{path}: {what} has {width}x{height} = {width * height} pixels, "
            f"more than the limit of {settings.max_image_pixels}",
            path,
        )


def video_info(
    path: str, raw: bytes, settings: Settings, count: VideoCounter | None = None
) -> VideoInfo:
    """Frame size, frame count and rate of the video in ``raw`` (and its unpruned tokens, by
    ``count``), and one decoded frame: 400 unless a decodable video vLLM can sample, 413 over the
    frame, duration or frame-size limits. Reads the header and the first frame only (and, to
    count, what vLLM reads to find the end), so its cost is bounded by the capped byte count."""
    not_video = GatewayError(400, f"{path}: bytes are not a decodable video", path)
    stream = io.BytesIO(raw)  # referenced until the capture is released (else it crashes)
    cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])
    try:
        if not cap.isOpened():
            raise not_video
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        # a still image opens as a one-picture stream with no frame count; vLLM needs the rate
        if width <= 0 or height <= 0 or frames <= 0 or not fps > 0:
            raise not_video
        check_pixels(path, "video frame", width, height, settings)
        seconds = frames / fps
        if frames > settings.max_video_frames:
            raise GatewayError(
                413,
                f"{path}: video has {frames} frames, more than the limit of "
                f"{settings.max_video_frames}",
                path,
            )
        if seconds > settings.max_video_seconds:
            raise GatewayError(
                413,
                f"{path}: video lasts {seconds:.1f} s, more than the limit of "
                f"{settings.max_video_seconds:g} s",
                path,
            )
        tokens = None
        if count is not None:
            try:
                tokens = count(cap)
            except (ValueError, ArithmeticError):  # then vLLM cannot sample it either
                raise GatewayError(
                    400, f"{path}: the engine cannot sample frames from this video", path
                ) from None
        ok, frame = cap.read()
        if not ok or frame is None:
            raise not_video
        return VideoInfo(width, height, frames, fps, tokens)
    finally:
        cap.release()


async def read_part(
    path: str, url: str, remote: RemoteMedia, kind: str, max_bytes: int | None = None
) -> bytes:
    """The bytes of a part's data URL, or of the remote URL it names (fetched under the remote
    media rules, at most ``max_bytes``)."""
    if url.startswith("data:"):
        return decode_data_url(path, url)
    if url.startswith(("http://", "https://")):
        return await remote.fetch(url, path, kind=kind, max_bytes=max_bytes)
    raise GatewayError(400, f"{path}: expected a data: URL (data:{kind}/...;base64,...)", path)


def count_limit(found: int, limit: int, kind: str) -> None:
    if found > limit:
        raise GatewayError(
            400,
            f"messages: {found} {kind}s in one request, the limit is {limit}",
            "messages",
        )


async def check_images(
    messages: list[Message], settings: Settings, remote: RemoteMedia
) -> list[Size]:
    """Check every image part (fetching remote ones into data URLs); returns their sizes."""
    parts = list(media_parts(messages, ImagePart))
    count_limit(len(parts), settings.max_images, "image")
    sizes = []
    for path, part in parts:
        url = part.image_url.url
        raw = await read_part(path, url, remote, "image")
        size, fmt = image_size(path, raw, settings)
        if not url.startswith("data:"):
            part.image_url.url = f"data:image/{fmt};base64," + base64.b64encode(raw).decode()
        sizes.append(size)
    return sizes


async def in_thread(path: str, timeout_s: float, fn: Callable[[], VideoInfo]) -> VideoInfo:
    """``fn`` in a worker thread, answered 400 after ``timeout_s`` (the event loop never waits
    on a decoder; a thread that overruns finishes on its own, its bytes already capped)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), timeout_s)
    except TimeoutError:
        raise GatewayError(
            400, f"{path}: the video could not be read within {timeout_s:g} s", path
        ) from None


async def check_videos(
    messages: list[Message],
    settings: Settings,
    remote: RemoteMedia,
    count: VideoCounter | None = None,
) -> list[VideoInfo]:
    """Check every video part (fetching remote ones into data URLs); returns what each holds."""
    parts = list(media_parts(messages, VideoPart))
    count_limit(len(parts), settings.max_videos, "video")
    videos = []
    for path, part in parts:
        url = part.video_url.url
        if url.startswith("data:") and data_url_type(url) not in VIDEO_TYPES:
            raise GatewayError(
                400,
                f"{path}: unsupported video type {data_url_type(url)!r}; send one of "
                f"{', '.join(sorted(VIDEO_TYPES))}",
                path,
            )
        raw = await read_part(path, url, remote, "video", settings.max_video_bytes)
        if len(raw) > settings.max_video_bytes:
            raise GatewayError(
                413,
                f"{path}: the video is {len(raw)} bytes, more than the limit of "
                f"{settings.max_video_bytes}",
                path,
            )
        info = await in_thread(
            path,
            settings.video_decode_timeout_s,
            partial(video_info, path, raw, settings, count),
        )
        if not url.startswith("data:"):  # vLLM reads the container from the bytes, not the type
            part.video_url.url = "data:video/mp4;base64," + base64.b64encode(raw).decode()
        videos.append(info)
    return videos


async def check_media(
    messages: list[Message],
    settings: Settings,
    remote: RemoteMedia,
    count_video: VideoCounter | None = None,
) -> Media:
    return Media(
        images=await check_images(messages, settings, remote),
        videos=await check_videos(messages, settings, remote, count_video),
    )
