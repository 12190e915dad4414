"""The small protocol every generation backend (hf, vllm, openai) implements.

The rollout engine owns the multi-turn loop; a backend only turns conversations into
assistant messages. Conversation identity (`ConvId`) is passed so a backend may keep
per-conversation state between turns (the hf backend keeps KV caches) and must be told
when a conversation ends (`release`).

A backend that can take requests while it generates (the hf backend) also implements
`StreamingBackend`: the engine then sends a conversation's next turn as soon as its answer is
judged, instead of one `generate` call per turn for every live conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from drift.config import derive_seed

ConvId = tuple[str, int]  # (prompt_id, sample_idx)


@dataclass(frozen=True)
class SamplingParams:
    """Every sampling parameter, set explicitly and saved with the run."""

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass
class GenRequest:
    """Generate one assistant message for each conversation in `conv_ids`.

    All of them share the same history `messages` (turn 1: the n samples of one prompt
    group; later turns: exactly one live conversation).
    """

    conv_ids: list[ConvId]
    messages: list[dict[str, str]]
    turn: int  # 1-based turn being generated


@dataclass
class GenOutput:
    text: str  # the assistant message, without the end-of-turn token
    tokens: int  # generated tokens (including the end-of-turn token if produced)
    finish_reason: str  # "stop" | "length"


@dataclass
class BackendStats:
    prefill_tokens: int = 0  # prompt tokens actually run through the model (after any cache reuse)
    generated_tokens: int = 0
    parameters: int = 0  # N of the model generating, for the cost ledger (0: unknown, e.g. a remote server)
    cpu_seconds: float = 0.0  # CPU time of the backend's own worker processes (`HFWorkers`), once closed
    peak_memory_bytes: int = 0  # their peak resident memory, summed, once closed


class PromptTooLong(Exception):
    """A backend raises this when some histories do not fit the model's context.

    It lists every offending conversation of the call and generates nothing for the call; the
    engine counts and logs those conversations as skipped and repeats the call without them.
    """

    def __init__(self, conv_ids: list[ConvId], detail: str = ""):
        super().__init__(f"{len(conv_ids)} conversation(s) exceed the model context" + (f": {detail}" if detail else ""))
        self.conv_ids = list(conv_ids)
        self.detail = detail


class Backend(Protocol):
    name: str
    stats: BackendStats

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenOutput]]:
        """One list of outputs per request, one output per conv_id, in order."""
        ...

    def release(self, conv_ids: list[ConvId]) -> None:
        """These conversations are finished: drop any state kept for them."""
        ...

    def close(self) -> None: ...


class GenStream(Protocol):
    """A generation session that takes requests while it runs (`StreamingBackend.stream`)."""

    def submit(self, requests: list[GenRequest]) -> None:
        """Queue the requests; raise PromptTooLong, as `generate` does, queuing none of them."""
        ...

    def poll(self) -> list[tuple[ConvId, GenOutput]]:
        """Generate until some queued conversations' messages are done; return those (empty:
        nothing is queued). Every queued conversation comes back exactly once."""
        ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    def stream(self, params: SamplingParams) -> GenStream:
        """A new session sampling with `params`, each (conversation, turn) with the seed `generate` gives it."""
        ...


def sample_seed(seed: int, conv: ConvId, turn: int) -> int:
    """The seed of one (prompt, sample, turn): the run seed's stream named by them (`derive_seed`)."""
    return derive_seed(seed, conv[0], conv[1], turn)
