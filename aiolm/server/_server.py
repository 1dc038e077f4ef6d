"""What one app shares across its requests (``_Server``): its options, metrics and chat
formats, the checks a request passes (API key, content type, admission, model), and the GET
routes (``/v1/models``, ``/health``, ``/metrics``)."""

from __future__ import annotations

import hmac
import time
from typing import Any

import attrs
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..backends.base import Backend
from .errors import ApiError
from .images import ImageFetch
from .metrics import Metrics
from .protocol import ChatParsers, Limits


@attrs.define(eq=False)
class _Server:
    backend: Backend
    model: str
    api_key: str | None
    max_body_bytes: int
    body_timeout: float | None
    max_pending: int
    limits: Limits
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    #: How image URLs are fetched (``--allow-image-urls``); None: refused.
    image_fetch: ImageFetch | None = None
    created: int = attrs.field(factory=lambda: int(time.time()))
    metrics: Metrics = attrs.field(init=False)
    _parsers: ChatParsers | None = attrs.field(default=None, init=False)

    @metrics.default
    def _metrics(self) -> Metrics:
        return Metrics(self.backend, self.failure)

    def chat_parsers(self) -> ChatParsers:
        """The tool-call and thinking formats: those configured, the rest detected from the
        backend's chat template (known once the backend has loaded its model)."""
        if self._parsers is not None:
            return self._parsers
        source = self.backend.chat_template_source
        if source is None:   # no template (yet: the engine loads its model when it starts)
            return ChatParsers(tool=self.tool_parser, reasoning=self.reasoning_parser)
        from ..tools.parsers import detect_tool_parser
        from ..tools.reasoning import detect_reasoning_parser

        self._parsers = ChatParsers(tool=self.tool_parser or detect_tool_parser(source),
                                    reasoning=self.reasoning_parser or detect_reasoning_parser(source))
        return self._parsers

    def check_key(self, headers: dict[str, str]) -> None:
        """Raise 401 unless the request carries the API key (when one is set)."""
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        if not given.lower().startswith("bearer "):
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(given[7:].strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_content_type(self, headers: dict[str, str]) -> None:
        """Raise 415 unless the body is declared JSON.

        A web page can send ``text/plain`` (or, through a ``Blob``, no type at all) to any
        server without a CORS preflight; requiring JSON stops such requests. A missing type
        is accepted when a key is set: the page cannot send the key without a preflight.
        """
        declared = headers.get("content-type")
        if declared is None and self.api_key is not None:
            return
        media = (declared or "").partition(";")[0].strip().lower()
        if media != "application/json":
            shown = "none" if declared is None else repr(declared)
            raise ApiError(415, f"Content-Type must be application/json (got {shown}).",
                           code="unsupported_media_type")

    def admit(self, size: int) -> None:
        """Count ``size`` more pending backend requests, or raise 429 when that passes the limit."""
        if self.metrics.pending + size > self.max_pending:
            raise ApiError(429, f"The server is busy ({self.metrics.pending} generations pending, "
                                f"limit {self.max_pending}): retry shortly.",
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        self.metrics.pending += size

    def failure(self) -> BaseException | None:
        """The error that stopped the backend's engine loop (None while it serves)."""
        return getattr(self.backend, "failure", None)

    def check_model(self, body: dict[str, Any]) -> None:
        """Raise 404 for a request naming another model (a missing or mistyped ``model`` is
        the body model's 400)."""
        model = body.get("model")
        if isinstance(model, str) and model and model != self.model:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model!r}.",
                           param="model", code="model_not_found")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "aiolm"}

    def _guarded(self, request: Request, route: str) -> ApiError | None:
        try:
            self.check_key({k.lower(): v for k, v in request.headers.items()})
        except ApiError as err:
            self.metrics.count(route, err.status)
            return err
        self.metrics.count(route, 200)
        return None

    async def list_models(self, request: Request) -> Response:
        if (err := self._guarded(request, "/v1/models")) is not None:
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        if (err := self._guarded(request, "/v1/models/{model}")) is not None:
            return JSONResponse(err.body(), status_code=err.status)
        if request.path_params["model"] != self.model:
            err = ApiError(404, f"The model {request.path_params['model']!r} does not exist.",
                           param="model", code="model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        failure = self.failure()
        if failure is None:
            return JSONResponse({"status": "ok", "model": self.model})
        return JSONResponse({"status": "failed", "model": self.model,
                             "failure": type(failure).__name__,
                             "message": "The engine stopped on an error; restart the server."},
                            status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        if (err := self._guarded(request, "/metrics")) is not None:
            return JSONResponse(err.body(), status_code=err.status)
        body, media_type = self.metrics.exposition()
        return Response(body, media_type=media_type)
