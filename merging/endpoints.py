"""Models served elsewhere: OpenAI-compatible endpoints (vLLM, TGI, SGLang, llama.cpp's server,
``transformers serve``), named ``openai:<base URL>#<model name>``.

Once a merge is 8B or 70B it is served by an engine (tensor-parallel across GPUs, continuous
batching), not loaded into the studio's process. An endpoint reference is a model like any other
in the Chat and Evaluate tabs and in ``generate``: its answers stream through the ``openai``
client with the shared sampling settings (temperature, top-p, max new tokens, seed); the server
applies the model's chat template.

Which endpoints may be used: ``MERGE_STUDIO_ENDPOINTS`` lists them (``name=openai:URL#model,...``
or a JSON object); their API key is ``MERGE_STUDIO_ENDPOINT_API_KEY`` (else ``OPENAI_API_KEY``,
else none). Locally any endpoint reference may be typed; a hosted studio offers only the listed
ones (``SourcePolicy.endpoints``), so a visitor cannot make the server call an arbitrary URL.
Every failure is one message for that panel: server unreachable, key refused, unknown model
(with the models it does serve), a stream cut in the middle.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from merging.errors import MergeStudioError

PREFIX = "openai:"
KEY_VARIABLES = ("MERGE_STUDIO_ENDPOINT_API_KEY", "OPENAI_API_KEY")
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 120.0


@dataclass(frozen=True)
class Endpoint:
    """A model on an OpenAI-compatible server: ``base_url`` (``http://host:port/v1``) and the
    ``model`` name the server knows it by."""

    base_url: str
    model: str

    @property
    def ref(self) -> str:
        return f"{PREFIX}{self.base_url}#{self.model}"

    @property
    def label(self) -> str:
        return f"{self.model} @ {urlsplit(self.base_url).netloc}"


def is_endpoint(ref) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def parse_endpoint(ref: str) -> Endpoint:
    """``openai:http://host:8000/v1#org/model`` -> Endpoint; a malformed one says what it should look like."""
    body = ref[len(PREFIX):] if is_endpoint(ref) else ref
    url, sep, model = body.partition("#")
    parts = urlsplit(url)
    if not sep or not model.strip() or parts.scheme not in ("http", "https") or not parts.netloc:
        raise MergeStudioError(f"{ref!r} is not an endpoint reference: write openai:<base URL>#<model name>, "
                               "e.g. openai:http://127.0.0.1:8000/v1#my-merge")
    if parts.username or parts.password:  # it would be shown wherever the reference is
        raise MergeStudioError("an endpoint URL must not hold credentials: put the key in "
                               "MERGE_STUDIO_ENDPOINT_API_KEY instead")
    return Endpoint(url.rstrip("/"), model.strip())


def configured_endpoints(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """name -> endpoint reference, from ``MERGE_STUDIO_ENDPOINTS`` (``name=ref,...`` or a JSON object)."""
    text = ((os.environ if env is None else env).get("MERGE_STUDIO_ENDPOINTS") or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            pairs = json.loads(text)
        except ValueError as exc:
            raise MergeStudioError(f"MERGE_STUDIO_ENDPOINTS is not valid JSON: {exc}") from None
        if not isinstance(pairs, dict) or not all(isinstance(v, str) for v in pairs.values()):
            raise MergeStudioError('MERGE_STUDIO_ENDPOINTS must be a JSON object {"name": "openai:URL#model", ...}')
    else:
        pairs = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, ref = part.partition("=")
            if not sep or not name.strip():
                raise MergeStudioError(f"MERGE_STUDIO_ENDPOINTS entry {part!r} is not name=openai:URL#model")
            pairs[name.strip()] = ref.strip()
    return {name: parse_endpoint(ref if is_endpoint(ref) else PREFIX + ref).ref for name, ref in pairs.items()}


def check_endpoint_access(ref: str, allowed: Sequence[str] | None) -> Endpoint:
    """The endpoint of ``ref`` if it may be used: any when ``allowed`` is None (locally), else only
    one of the configured references (hosted)."""
    endpoint = parse_endpoint(ref)
    if allowed is not None and endpoint.ref not in allowed:
        raise MergeStudioError(f"{ref!r}: this hosted studio only uses the endpoints it is configured with; "
                               "choose one from the list")
    return endpoint


def api_key(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return next((env[name] for name in KEY_VARIABLES if env.get(name)), "none")  # the client needs a string


def _client(endpoint: Endpoint):
    # Deferred: the openai client is only needed once an endpoint is asked something.
    import httpx
    import openai

    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    return openai.OpenAI(base_url=endpoint.base_url, api_key=api_key(), timeout=timeout, max_retries=0)


def served_models(endpoint: Endpoint) -> list[str]:
    """The model names the server lists (``GET /models``), for messages; empty if it cannot say."""
    try:
        return [model.id for model in _client(endpoint).models.list()]
    except Exception:  # a server without /models (or gone): the message just names fewer choices
        return []


def failure(endpoint: Endpoint, exc: Exception, tokens: int = 0) -> str:
    """What went wrong asking ``endpoint``, and what to do, for each case the client tells apart."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    where = f"the server at {urlsplit(endpoint.base_url).netloc}"
    if tokens and kinds & {"APIConnectionError", "RemoteProtocolError", "ReadError", "APIError", "ReadTimeout"}:
        return f"the stream from {where} was cut after {tokens} chunks; send the message again"
    if "APITimeoutError" in kinds:
        return f"{where} did not answer within {READ_TIMEOUT_S:.0f} s; is the server overloaded?"
    if "APIConnectionError" in kinds:
        return f"cannot reach {where}: is the server running, and is the URL (with its /v1) right?"
    if kinds & {"AuthenticationError", "PermissionDeniedError"}:
        return (f"{where} refused the API key: set MERGE_STUDIO_ENDPOINT_API_KEY (or OPENAI_API_KEY) to a key it "
                "accepts")
    if kinds & {"NotFoundError", "BadRequestError", "UnprocessableEntityError"}:  # servers differ: 404, 400, 422
        served = served_models(endpoint)
        if "NotFoundError" in kinds or (served and endpoint.model not in served):
            offer = f"; it serves: {', '.join(served)}" if served else ""
            return f"{where} has no model {endpoint.model!r}{offer}"
    body = getattr(exc, "body", None)
    detail = body.get("message") or body.get("detail") if isinstance(body, dict) else None
    reason = str(detail or exc).splitlines()[0] if str(detail or exc) else type(exc).__name__
    return f"{where} answered with an error ({type(exc).__name__}: {reason[:300]})"


def stream_endpoint(endpoint: Endpoint, messages: Sequence[dict], *, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int, stop_events: Sequence[threading.Event | None] = ()) -> Iterator[str]:
    """Text deltas of ``endpoint``'s answer to ``messages`` (the server applies the chat template),
    until the answer ends or one of ``stop_events`` is set; failures raise ``MergeStudioError``
    with ``failure``'s message."""
    client, chunks = _client(endpoint), 0
    try:
        stream = client.chat.completions.create(
            model=endpoint.model, messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed, stream=True)
        with stream:
            for chunk in stream:
                if any(event is not None and event.is_set() for event in stop_events):
                    return  # closing the stream closes the connection: the server stops generating
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    chunks += 1
                    yield delta
    except MergeStudioError:
        raise
    except Exception as exc:  # the client raises many types; each case gets its own message
        raise MergeStudioError(failure(endpoint, exc, chunks)) from None


class Background:
    """An endpoint's answer streamed on a thread of its own and read without waiting: ``steps()``
    yields what has arrived ("" when nothing has), so several panels advance together while one
    waits on the network. An error ends the stream with its message as the last text; closing
    ``steps()`` (the reader is gone) stops the stream at its next chunk."""

    def __init__(self, endpoint: Endpoint, messages: Sequence[dict], params, stop_event: threading.Event | None):
        self._queue: queue.Queue = queue.Queue()
        self.closed, self.stop_event = threading.Event(), stop_event
        self._deltas = stream_endpoint(endpoint, messages, temperature=params.temperature, top_p=params.top_p,
                                       max_new_tokens=params.max_new_tokens, seed=params.seed,
                                       stop_events=(stop_event, self.closed))
        # started by the first read of steps(): a panel never read (another panel's input was refused
        # before any ran) asks its server nothing
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for delta in self._deltas:
                self._queue.put(("text", delta))
        except MergeStudioError as exc:
            self._queue.put(("error", str(exc)))
        except Exception as exc:  # a bug must end this panel, not hang it
            self._queue.put(("error", f"unexpected error ({type(exc).__name__}: {exc})"))
        finally:
            self._queue.put(("end", None))

    def steps(self) -> Iterator[str]:
        written = False
        self._thread.start()
        try:
            while True:
                try:
                    kind, value = self._queue.get_nowait()
                except queue.Empty:
                    if self.stop_event is not None and self.stop_event.is_set():
                        return  # Stop while the server has not sent a first token
                    yield ""
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    yield ("\n\n" if written else "") + f"⚠ {value}"
                    continue
                written = True
                yield value
        finally:
            self.closed.set()


def idle_wait() -> None:
    """A short sleep for a round in which no panel had anything new (only endpoints waiting)."""
    time.sleep(0.005)
