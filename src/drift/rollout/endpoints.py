"""Several OpenAI-compatible servers behind one backend: routing, stickiness, failover, per-server counts.

`EndpointPool` holds one client per server and decides where each request goes:
- a conversation's first request goes to the live server with the fewest requests in flight;
- its later turns go to the same server, whose prefix cache holds the conversation so far;
- a server whose client gave up (connection errors, timeouts or 5xx after the client's own
  retries) is marked lost: the run logs it once, its conversations move to the live servers on
  their next request, and the request that found it lost is sent again elsewhere. Servers keep
  no state of ours, so a moved conversation loses nothing but its cache; its seed is per
  (prompt, sample, turn), so the answer does not depend on which server gives it.
- when no server is left, `LostAll` names each one and why.
Each server counts its requests and tokens (`report`), for the manifest's ledger.

`check_models` asks every server for its model list before anything is generated, so a wrong
URL or a server serving another model is one line at the start, not an error hours in.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from drift import DriftError
from drift.rollout.protocol import ConvId

log = logging.getLogger(__name__)


def endpoint_urls(base_url: str | list[str], endpoints: list[str], default: str) -> list[str]:
    """The servers named by the config: `endpoints`, else `base_url` (one URL, a list, or comma-separated)."""
    if endpoints and base_url != default:
        raise DriftError("give the servers as base_url or as endpoints, not both")
    urls = list(endpoints) if endpoints else (base_url if isinstance(base_url, list) else base_url.split(","))
    urls = [u.strip().rstrip("/") for u in urls if u.strip()]
    if not urls:
        raise DriftError("openai: the endpoint list is empty: give base_url or endpoints = [\"http://host:port/v1\", ...]")
    for u in urls:
        parts = urlsplit(u)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            raise DriftError(f"openai: malformed server URL {u!r} (expected http(s)://host[:port]/v1)")
    duplicates = {u for u in urls if urls.count(u) > 1}
    if duplicates:
        raise DriftError(f"openai: server {sorted(duplicates)[0]!r} is listed twice")
    return urls


class LostAll(Exception):
    """Every server of the pool has stopped answering."""


@dataclass
class Endpoint:
    url: str
    client: Any  # openai.OpenAI
    in_flight: int = 0
    requests: int = 0  # answered
    generated_tokens: int = 0
    prefill_tokens: int = 0
    conversations: int = 0  # conversations that started or moved here
    lost: str | None = None  # why the run stopped sending here (None: live)

    def report(self) -> dict[str, Any]:
        return {"url": self.url, "status": "lost" if self.lost else "live", "error": self.lost,
                "requests": self.requests, "conversations": self.conversations,
                "generated_tokens": self.generated_tokens, "prefill_tokens": self.prefill_tokens}


class EndpointPool:
    def __init__(self, urls: list[str], make_client: Any):
        self.endpoints = [Endpoint(u, make_client(u)) for u in urls]
        self.home: dict[ConvId, Endpoint] = {}  # conversation -> the server holding it
        self._lock = threading.Lock()

    def acquire(self, conv: ConvId) -> Endpoint:
        """The server for this conversation's next request (its own while it lives), one more in flight there."""
        with self._lock:
            ep = self.home.get(conv)
            if ep is None or ep.lost:
                live = [e for e in self.endpoints if not e.lost]
                if not live:
                    raise LostAll("; ".join(f"{e.url} {e.lost}" for e in self.endpoints))
                ep = min(live, key=lambda e: e.in_flight)  # ties: list order
                self.home[conv] = ep
                ep.conversations += 1
            ep.in_flight += 1
            return ep

    def done(self, ep: Endpoint, usage: Any) -> None:
        """An answered request: one fewer in flight, its tokens counted on its server."""
        with self._lock:
            ep.in_flight -= 1
            ep.requests += 1
            ep.generated_tokens += usage.completion_tokens if usage else 0
            ep.prefill_tokens += usage.prompt_tokens if usage else 0

    def failed(self, ep: Endpoint, reason: str | None) -> None:
        """A request that got no answer; with a reason, the server is lost for the rest of the run."""
        with self._lock:
            ep.in_flight -= 1
            if reason is None or ep.lost:
                return
            ep.lost = reason
            moved = [c for c, e in self.home.items() if e is ep]
            live = [e.url for e in self.endpoints if not e.lost]
        if live:
            log.warning("server %s stopped answering (%s); its %d conversation(s) move to %s", ep.url, reason,
                        len(moved), ", ".join(live))
        else:
            log.warning("server %s stopped answering (%s); no server is left", ep.url, reason)

    def release(self, conv_ids: list[ConvId]) -> None:
        with self._lock:
            for c in conv_ids:
                self.home.pop(c, None)

    def report(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e.report() for e in self.endpoints]

    def close(self) -> None:
        for e in self.endpoints:
            e.client.close()


def check_models(pool: EndpointPool, model: str, reason: Any) -> None:
    """Every server answers its model list and serves `model`; else one DriftError naming the server.

    A server without a model list (HTTP 404 on /models) is taken at its word."""
    import openai

    for ep in pool.endpoints:
        try:
            served = [m.id for m in ep.client.models.list()]
        except openai.NotFoundError:
            log.warning("server %s has no /models list; cannot check that it serves %r", ep.url, model)
            continue
        except openai.AuthenticationError as e:
            raise DriftError(f"server {ep.url} refused the model list: {reason(e)}") from None
        except openai.APIError as e:
            raise DriftError(f"server {ep.url} does not answer: {reason(e)}") from None
        if model not in served:
            raise DriftError(f"server {ep.url} serves {served}, not model {model!r}: every server of a run must "
                             "serve the run's model")
