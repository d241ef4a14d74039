"""Images at the API edge, for both APIs: the model must read them, the count must be within
the settings, and OpenAI's http(s) image URLs are fetched only where a setting allows it."""
from __future__ import annotations

from typing import Any

import httpx

from ..engines.base import BadRequest
from ..images import limits_of, require_vision


def check_image_count(app_state: Any, model: str, count: int) -> None:
    """Images only for a model that reads them (the clear 400 otherwise), and not too many:
    asked before the images are decoded or fetched."""
    if count:
        require_vision(model, app_state.manager.engine(model).accepts_images(), count, limits_of(app_state.settings))


async def fetch_image_urls(settings: Any, found: list[tuple[str, str]]) -> dict[str, bytes]:
    """The bytes of the request's http(s) image URLs: a 400 when fetching is off (the default,
    setting image_url_fetch), or when a fetch fails or is larger than image_max_bytes."""
    urls = [(where, url) for where, url in found if url.startswith(("http://", "https://"))]
    if not urls:
        return {}
    if not settings.image_url_fetch:
        where = urls[0][0]
        raise BadRequest(f"{where}: http(s) image URLs are not fetched by this server (setting image_url_fetch is "
                         "off): send the image inline as a data URL (data:image/<type>;base64,...)")
    limit = settings.image_max_bytes
    fetched: dict[str, bytes] = {}
    async with httpx.AsyncClient(timeout=settings.image_fetch_timeout_s, follow_redirects=True) as client:
        for where, url in urls:
            if url in fetched:
                continue
            try:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise BadRequest(f"{where}: fetching the image answered HTTP {response.status_code}")
                    data = bytearray()
                    async for piece in response.aiter_bytes():
                        data += piece
                        if len(data) > limit:
                            raise BadRequest(f"{where}: the image is larger than {limit} bytes, the most this "
                                             "server takes (setting image_max_bytes)")
            except httpx.HTTPError as exc:
                raise BadRequest(f"{where}: the image could not be fetched: {exc}") from None
            fetched[url] = bytes(data)
    return fetched
