"""The HTTP layer: an OpenAI-compatible chat endpoint, task endpoints, stats and the web page.

Every request is validated here before it reaches the model: body size, JSON shape, options
(in the event loop), then image (data URL, or `file://` when allowed; never fetched from the
network), image bytes and pixels, and the admission proper (`admission.admit`: resize to the
model's input size, tokenise, check the prompt length) in a worker thread of the HTTP layer. A
bad request gets OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) with a
4xx status and one log line; the engine's queue only ever holds model-size inputs and valid
options.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import re
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PaliGemmaError
from ..grammar import answer_grammar, prompt_labels
from ..tasks import answer_prompt, caption_prompt, detect_prompt, parse_detections
from .admission import AdmissionError, admit
from .batcher import Batcher, Job, JobResult

log = logging.getLogger("mlx_paligemma.server")
STATIC = Path(__file__).parent / "static"
TASKS = ("caption", "answer", "detect", "segment")
_LANG = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})?$")


@dataclass
class Limits:
    """Caps on what one request may ask for; every one is a 4xx, never a crash or a stall."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 6000 * 6000
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 100
    max_queued: int = 256  # requests waiting to join the batch (each holds its model-size image); then 503


class ApiError(Exception):
    """A request the server refuses: status, message, and the offending parameter if any."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
    kind = "server_error" if status >= 500 else _ERROR_TYPES.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def _log_refusal(request: Request, status: int, message: str) -> None:
    """One line per refused request (newlines a client smuggled into a path or name are escaped)."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    log.warning("%s %s %s -> %d %s", _client(request), request.method, request.url.path, status, message)


# -- request parsing ------------------------------------------------------------------------------
async def read_json(request: Request, limits: Limits) -> dict:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {int(length)} bytes exceeds the {limits.max_body_bytes}-byte limit")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limits.max_body_bytes:
            raise ApiError(413, f"request body exceeds the {limits.max_body_bytes}-byte limit")
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name}: must be a number, got {json.dumps(value)}", name)
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{name}: must be in {bounds}, got {value:g}", name)
    return float(value)


def sampling_options(body: dict, limits: Limits) -> dict:
    """max_tokens, temperature, top_p, seed, stream from an OpenAI-style body (temperature defaults to 0:
    PaliGemma's task answers are meant to be read greedily)."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError(400, f"{name}: must be an integer, got {json.dumps(max_tokens)}", name)
    elif not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"{name}: must be between 1 and {limits.max_tokens}, got {max_tokens}", name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, f"seed: must be a non-negative integer, got {json.dumps(seed)}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream: must be true or false, got {json.dumps(stream)}", "stream")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "n: only 1 choice per request is supported", "n")
    return dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed,
        stream=stream,
    )


def chat_prompt(body: dict) -> tuple[str, str]:
    """(text, image URL) of the last user message: PaliGemma takes one image and one prompt."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages: must be a non-empty list of message objects", "messages")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ApiError(400, "messages: no message with role 'user'", "messages")
    content = users[-1].get("content")
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ApiError(400, "messages: an image_url part needs a 'url' string", "messages")
                images.append(url)
            else:
                raise ApiError(400, f"messages: unsupported content part {json.dumps(part)[:80]}", "messages")
    else:
        raise ApiError(400, "messages: the content of a user message must be a string or a list of parts", "messages")
    if not images:
        raise ApiError(
            400,
            "no image: PaliGemma answers about one image; add an image_url part (a data: URL) to the last user message",
            "messages",
            "missing_image",
        )
    if len(images) > 1:
        raise ApiError(400, f"{len(images)} images in the last user message: PaliGemma takes one", "messages")
    return " ".join(t.strip() for t in texts if t.strip()), images[0]


def load_image_url(url: str, limits: Limits, allow_local_files: bool, param: str = "image_url") -> Image.Image:
    """A decoded image from a data: URL (or a file:// URL when allowed); refuses anything else."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise ApiError(400, "image data URL must be base64 (data:image/png;base64,...)", param)
        if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
            raise ApiError(413, f"image exceeds the {limits.max_image_bytes}-byte limit", param)
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data URL: bad base64", param) from None
    elif scheme == "file":
        if not allow_local_files:
            raise ApiError(
                400, "file:// image URLs are refused: start the server with --allow-local-files", param, "local_files"
            )
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"file URL with a host ({parsed.netloc}) is not a local file", param)
        path = Path(urllib.request.url2pathname(parsed.path))
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ApiError(400, f"{path}: not a file", param)
            if size > limits.max_image_bytes:
                raise ApiError(413, f"{path}: {size} bytes exceeds the {limits.max_image_bytes}-byte limit", param)
            raw = path.read_bytes()
        except OSError as e:
            raise ApiError(400, f"{path}: cannot read ({e.strerror})", param) from None
    elif scheme in ("http", "https"):
        raise ApiError(400, "image URLs are not fetched over the network: send the image as a data: URL", param)
    else:
        raise ApiError(400, "image must be a data: URL (data:image/png;base64,...)", param)
    if len(raw) > limits.max_image_bytes:
        raise ApiError(413, f"image of {len(raw)} bytes exceeds the {limits.max_image_bytes}-byte limit", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise ApiError(
                    413, f"image of {width}x{height} pixels exceeds the {limits.max_image_pixels}-pixel limit", param
                )
            image.load()
    except Image.DecompressionBombError:
        raise ApiError(413, f"image exceeds the {limits.max_image_pixels}-pixel limit", param) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ApiError(400, f"not an image the server can read ({type(e).__name__})", param) from None
    if width < 1 or height < 1:
        raise ApiError(400, "image has no pixels", param)
    return image


def task_prompt(task: str, body: dict) -> str:
    lang = body.get("lang", "en")
    if not isinstance(lang, str) or not _LANG.match(lang):
        raise ApiError(400, f"lang: expected a language code such as 'en' or 'zh-CN', got {json.dumps(lang)}", "lang")
    if task == "caption":
        return caption_prompt(lang)
    if task == "answer":
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "question: a non-empty string is required for the answer task", "question")
        return answer_prompt(question, lang)
    labels = body.get("labels")
    if isinstance(labels, str):
        labels = [part for part in labels.split(";") if part.strip()]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ApiError(400, f"labels: the {task} task needs object names ('cat ; dog' or a list)", "labels")
    try:
        prompt = detect_prompt(labels)
    except PaliGemmaError as e:
        raise ApiError(400, str(e).replace("detect: ", ""), "labels") from None
    return prompt if task == "detect" else "segment" + prompt[len("detect") :]


# -- results --------------------------------------------------------------------------------------
def usage(result: JobResult) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


class Server:
    """The state behind the routes: model worker, options, and how segmentation masks are decoded."""

    def __init__(
        self,
        batcher: Batcher,
        model_id: str,
        limits: Limits,
        api_key: Optional[str],
        allow_local_files: bool,
        mask_decoder: Any = None,
    ):
        self.batcher, self.model_id, self.limits = batcher, model_id, limits
        self.api_key, self.allow_local_files, self.mask_decoder = api_key, allow_local_files, mask_decoder
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None, "invalid_api_key"
            )

    async def admit(
        self, url: Any, param: str, prompt: str, options: dict, logits_processors: Sequence = ()
    ) -> tuple[Job, asyncio.Queue]:
        """Decode, check and resize the image, tokenise and check the prompt (in a worker thread), then queue."""
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str):
            raise ApiError(400, f"{param}: must be a data: URL string", param, "missing_image")

        def prepare() -> Job:
            image = load_image_url(url, self.limits, self.allow_local_files, param)
            try:
                return admit(self.batcher.model, self.batcher.processor, image, prompt, options, logits_processors)
            except AdmissionError as e:
                raise ApiError(400, str(e), "messages" if param == "messages" else None, "prompt_too_long") from None

        return self.submit(await run_in_threadpool(prepare))

    def submit(self, job: Job) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job.emit = emit
        try:
            self.batcher.submit(job)
        except PaliGemmaError as e:
            raise ApiError(503, str(e)) from None
        return job, events

    async def result(self, request: Request, job: Job, events: asyncio.Queue) -> JobResult:
        """Wait for the whole answer; a client that goes away cancels its job."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = ("waiting",)
                if event[0] == "done":
                    return event[1]
                if event[0] == "error":
                    raise ApiError(event[2], event[1])
                if loop.time() - checked >= 0.5:  # text keeps coming: look at the connection now and then
                    checked = loop.time()
                    if await request.is_disconnected():
                        job.cancel()
                        raise ApiError(499, "client closed the request")
        finally:
            job.cancel()  # no-op once finished; frees the row if we are being cancelled

    async def events(self, job: Job, events: asyncio.Queue) -> AsyncIterator[tuple]:
        """The job's events as they come; leaving early (a disconnect) cancels the job."""
        try:
            while True:
                event = await events.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            job.cancel()

    def segmentations(self, text: str, image_size: tuple[int, int]) -> list[dict]:
        """Boxes and codes always; masks (COCO RLE) when a mask decoder is loaded."""
        if self.mask_decoder is None:
            return [{**d.to_dict(), "seg_codes": d.seg_codes, "mask": None} for d in parse_detections(text, image_size)]
        from ..segmentation import mask_to_rle, parse_segmentations

        return [
            {
                "label": s.label,
                "box": [round(float(v), 2) for v in s.box],
                "seg_codes": list(s.codes) if s.codes is not None else None,
                "mask": mask_to_rle(s.mask),
            }
            for s in parse_segmentations(text, image_size, self.mask_decoder)
        ]

    async def grammar_for(self, body: dict, prompt: str, default: bool) -> list:
        """The request's answer grammar as its logits processors (`"constrain"`: on by default for the detect
        and segment tasks, opt-in for chat), built in a worker thread (a 257k-token vocabulary takes ~5 ms)."""
        constrain = body.get("constrain", default)
        if not isinstance(constrain, bool):
            raise ApiError(400, "constrain: must be true or false", "constrain")
        if not constrain:
            return []
        try:
            grammar = await run_in_threadpool(answer_grammar, self.batcher.processor, prompt)
        except PaliGemmaError as e:
            raise ApiError(400, str(e), "constrain") from None
        return [grammar] if grammar is not None else []

    async def task_result(self, task: str, prompt: str, result: JobResult, constrained: bool = False) -> dict:
        out = {
            "object": "task.result",
            "task": task,
            "model": self.model_id,
            "prompt": prompt,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "image_size": list(result.image_size),
            "usage": usage(result),
            "timings": result.timings,
        }
        if task == "detect":
            out["detections"] = [d.to_dict() for d in parse_detections(result.text, result.image_size)]
        elif task == "segment" and self.mask_decoder is None:
            out["segmentations"], out["masks"] = self.segmentations(result.text, result.image_size), False
        elif task == "segment":
            # The decoder is a model too: it runs on the worker thread, between batches (the one thread
            # that touches MLX, so no two threads ever evaluate at once).
            try:
                out["segmentations"] = await asyncio.wrap_future(
                    self.batcher.call(self.segmentations, result.text, result.image_size)
                )
            except Exception as e:  # noqa: BLE001 -- one object's failure must not take the answer down
                log.exception("mask decoding failed")
                raise ApiError(500, f"decoding the segmentation masks failed ({type(e).__name__}: {e})") from None
            out["masks"] = True
        if constrained:  # an answer cut by max_tokens may end in part of a label (`red` of `red car`): drop it
            labels = set(prompt_labels(prompt)[1])
            for key in ("detections", "segmentations"):
                if key in out:
                    out[key] = [item for item in out[key] if item["label"] in labels]
        return out


def _sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(
    model: Any,
    processor: Any,
    *,
    model_id: str = "paligemma",
    max_batch: int = 8,
    batch_window: float = 0.01,
    vision_cache_mb: Optional[float] = None,
    api_key: Optional[str] = None,
    allow_local_files: bool = False,
    mask_decoder: Any = None,
    limits: Optional[Limits] = None,
) -> FastAPI:
    """The FastAPI app serving one loaded model (MLX or the torch reference); its worker starts now."""
    limits = limits or Limits()
    vision_cache_bytes = None if vision_cache_mb is None else int(vision_cache_mb * 2**20)
    batcher = Batcher(
        model,
        processor,
        max_batch=max_batch,
        batch_window=batch_window,
        max_queued=limits.max_queued,
        vision_cache_bytes=vision_cache_bytes,
    )
    server = Server(batcher, model_id, limits, api_key, allow_local_files, mask_decoder)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="mlx-paligemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        _log_refusal(request, exc.status, exc.message)
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        _log_refusal(request, exc.status_code, str(exc.detail))
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("%s %s %s -> 500", _client(request), request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id, "masks": server.mask_decoder is not None}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        card = {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "mlx-paligemma"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/stats")
    async def stats(request: Request):
        server.check_key(request)
        return batcher.snapshot()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        with batcher.arriving():
            body = await read_json(request, server.limits)
            options = sampling_options(body, server.limits)
            prompt, url = chat_prompt(body)
            grammar = await server.grammar_for(body, prompt, default=False)
            job, events = await server.admit(url, "messages", prompt, options, grammar)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "created": created, "model": server.model_id}
        if not options["stream"]:
            result = await server.result(request, job, events)
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage(result),
                "timings": result.timings,
            }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: Optional[str] = None) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        async def stream():
            yield _sse(chunk({"role": "assistant", "content": ""}))
            async for event in server.events(job, events):
                if event[0] == "delta":
                    yield _sse(chunk({"content": event[1]}))
                elif event[0] == "done":
                    result = event[1]
                    yield _sse({**chunk({}, result.finish_reason), "usage": usage(result), "timings": result.timings})
                    if include_usage:
                        yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(result)})
                else:
                    _log_refusal(request, event[2], event[1])
                    yield _sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
            yield _sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/v1/tasks/{task}")
    async def run_task(task: str, request: Request):
        server.check_key(request)
        if task not in TASKS:
            raise ApiError(404, f"unknown task {task!r}: choose from {', '.join(TASKS)}")
        with batcher.arriving():
            body = await read_json(request, server.limits)
            options = sampling_options(body, server.limits)
            prompt = task_prompt(task, body)
            if "image" not in body:
                raise ApiError(400, "image: required (a data: URL)", "image", "missing_image")
            grammar = await server.grammar_for(body, prompt, default=True)
            job, events = await server.admit(body["image"], "image", prompt, options, grammar)
        constrained = bool(grammar)
        if not options["stream"]:
            return await server.task_result(task, prompt, await server.result(request, job, events), constrained)

        async def stream():
            async for event in server.events(job, events):
                if event[0] == "delta":
                    yield _sse({"delta": event[1]})
                elif event[0] == "done":
                    try:
                        yield _sse({"result": await server.task_result(task, prompt, event[1], constrained)})
                    except ApiError as e:
                        _log_refusal(request, e.status, e.message)
                        yield _sse(
                            {"error": {"message": e.message, "type": "server_error", "param": None, "code": None}}
                        )
                else:
                    _log_refusal(request, event[2], event[1])
                    yield _sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
            yield _sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream", headers=_SSE_HEADERS)

    return app


__all__ = ["create_app", "Limits", "ApiError", "load_image_url"]
