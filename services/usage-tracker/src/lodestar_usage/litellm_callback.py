"""LiteLLM on the request path: usage events for every call, and budget admission before it.

``LodestarLogger`` is a LiteLLM ``CustomLogger`` (install the ``litellm`` extra). Register it as a
callback of the SDK (``litellm.callbacks = [logger]``), of a ``Router``, or of the proxy
(``callbacks:`` in its config, see examples/):

* after every call, success or failure, it publishes a ``RequestCompleted`` — model, provider,
  tokens by kind (cached reads, cache writes and reasoning apart), the cost LiteLLM computed (as
  ``reported_cost``), duration, status and error, and project / user / session / task from the
  call's ``metadata={"lodestar": {...}}`` — through the SDK ``Publisher``, which spools to disk
  while core is unreachable, so publishing never fails the call;
* for a project whose content is collected (``collect_projects``; ``"*"`` for all), a successful
  call also publishes a ``ResponseCollected`` — the prompt (the messages, as JSON), the answer,
  model, provider, task and its kind (metadata ``task_kind``) — for the learning service; an
  answer too large for one event (``max_collected_bytes``) is left out, and said so in the log;
* with a ``BudgetGate``, it reserves an estimate before each call is sent
  (``async_pre_call_deployment_hook``, run by the SDK, the Router and the proxy alike), refuses an
  over-budget call with :class:`BudgetExceededError` naming the budget, commits the actual cost
  after a success and releases the hold after a failure.

A call refused by a budget is never sent and publishes nothing. Publishing, committing and
releasing run in the background: ``await logger.drain()`` waits for them (e.g. at shutdown).
The Commit or Release goes first and the event after it: the tracker settles a reservation when it
records the event that names it, and a reservation settled before its Commit would refuse it.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

from google.protobuf.message import Message
from litellm.integrations.custom_logger import CustomLogger

from lodestar.common.events import new_event
from lodestar.common.logging import get_logger
from lodestar.common.sdk import Publisher
from lodestar.learning.v1 import events_pb2 as learning_events
from lodestar.usage.v1 import events_pb2, usage_pb2
from lodestar_usage.bounds import MAX_COST_MICROS, MAX_TOKENS
from lodestar_usage.client import BudgetGate
from lodestar_usage.cost_map import TOKEN_PRICE_TIER, scaled

log = get_logger(__name__)
#: The call's metadata key holding Lodestar's fields (project, user, session_id, task_id, attempt).
METADATA_KEY = "lodestar"
#: The metadata key the budget hook leaves the reservation id under, for the callbacks.
RESERVATION_KEY = "lodestar_reservation_id"
#: Where the events come from (a scheme of its own: lodestar:// names Lodestar's modules).
DEFAULT_SOURCE = "litellm://gateway"
#: Output tokens assumed for a call that sets no ``max_tokens``, for its estimate.
DEFAULT_MAX_OUTPUT_TOKENS = 1024
#: A model in LiteLLM's bundled cost map, estimated once at start-up (``warm_estimate``).
WARM_MODEL = "gpt-4o-mini"
MAX_ERROR_CHARS = 1000
MICROS_PER_USD = 1_000_000
#: The largest ResponseCollected published (core refuses events over 256 KiB by default).
DEFAULT_MAX_COLLECTED_BYTES = 200 * 1024
#: ``collect_projects`` entry that collects every project's responses.
ALL_PROJECTS = "*"
#: What a Reserve is asked to hold for one call: micro-dollars and tokens.
Estimate = Callable[[Mapping[str, Any]], tuple[int, int]]


class BudgetExceededError(Exception):
    """A call refused before it was sent: a budget has not enough left for its estimate.

    The LiteLLM proxy answers it with HTTP ``status_code`` (429) and ``code`` "budget_exceeded".
    """

    status_code = 429
    code = "budget_exceeded"

    def __init__(self, denial: usage_pb2.Denial) -> None:
        self.denial = denial
        left = []
        if denial.limit_micros:
            left.append(f"{denial.remaining_micros / 1e6:.6f} USD")
        if denial.limit_tokens:
            left.append(f"{denial.remaining_tokens} tokens")
        resets = (
            f"; its window resets at {denial.resets_at.ToDatetime(UTC).isoformat()}"
            if denial.HasField("resets_at")
            else ""
        )
        self.message = (
            f"budget {denial.budget_name!r} ({denial.budget_id}) refuses the call: "
            f"{denial.reason}; {' and '.join(left) or 'nothing'} left{resets}"
        )
        super().__init__(self.message)


def estimate_with_litellm(kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """The call's prompt tokens plus its ``max_tokens``, priced by LiteLLM's cost map (rounded up).

    A prompt longer than a model's price tier (``…_above_200k_tokens``) is priced at that tier. A
    model LiteLLM cannot price is estimated in tokens only (0 micro-dollars).
    """
    import litellm

    model = str(kwargs.get("model", ""))
    prompt = litellm.token_counter(model=model, messages=kwargs.get("messages") or [])
    completion = int(kwargs.get("max_tokens") or DEFAULT_MAX_OUTPUT_TOKENS)
    tokens = min(prompt + completion, MAX_TOKENS)
    tiers = price_tiers(model)
    if not tiers:  # an unmapped model: its cost is unknown before the call
        return 0, tokens
    _, input_usd, output_usd = max(t for t in tiers if t[0] < max(prompt, 1))
    cost = scaled(str(input_usd * prompt + output_usd * completion), MICROS_PER_USD, ROUND_CEILING)
    return min(cost, MAX_COST_MICROS), tokens


def warm_estimate() -> None:
    """Load what LiteLLM loads on its first token count and model lookup.

    Done at start-up, so that the first admitted call does not hold the gateway's event loop
    for it (~0.4 s here). A model's own first estimate still costs milliseconds, up to ~0.15 s
    where LiteLLM loads the provider's tokenizer then (Anthropic's).
    """
    estimate_with_litellm({"model": WARM_MODEL, "messages": [{"role": "user", "content": "hi"}]})


@functools.lru_cache(maxsize=1024)
def price_tiers(model: str) -> tuple[tuple[int, Decimal, Decimal], ...]:
    """``model``'s prices per input and output token from LiteLLM's cost map, by tier.

    Each tier is (prompt tokens it starts above, input price, output price), the base tier first
    (0); empty for a model the map does not price per token. Read once per model and process
    (``price_tiers.cache_clear()`` after changing the map).
    """
    import litellm

    try:
        info = litellm.get_model_info(model)
    except Exception:
        return ()
    prices: dict[int, dict[str, Decimal]] = {}
    for key, value in info.items():
        match = TOKEN_PRICE_TIER.fullmatch(key)
        if match and isinstance(value, int | float):
            above = int(match[2] or 0) * 1000
            prices.setdefault(above, {})[match[1]] = Decimal(repr(value))
    if 0 not in prices:
        return ()
    base = prices[0]
    return tuple(
        (
            above,
            tier.get("input", base.get("input", Decimal(0))),
            tier.get("output", base.get("output", Decimal(0))),
        )
        for above, tier in sorted(prices.items())
    )


class LodestarLogger(CustomLogger):
    """Publishes a usage event for every LiteLLM call and, with a gate, admits calls first."""

    def __init__(
        self,
        publisher: Publisher,
        gate: BudgetGate | None = None,
        *,
        estimate: Estimate = estimate_with_litellm,
        source: str = DEFAULT_SOURCE,
        collect_projects: Iterable[str] = (),
        max_collected_bytes: int = DEFAULT_MAX_COLLECTED_BYTES,
    ) -> None:
        super().__init__()
        self.publisher = publisher
        self.gate = gate
        self.estimate = estimate
        self.source = source
        self.collect_projects = frozenset(collect_projects)
        self.max_collected_bytes = max_collected_bytes
        self._pending: set[asyncio.Task[None]] = set()
        if gate is not None and estimate is estimate_with_litellm:
            warm_estimate()

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: object
    ) -> dict[str, Any]:
        """Reserve the call's estimate; BudgetExceededError when a budget refuses it."""
        if self.gate is None:
            return kwargs
        fields = lodestar_fields(kwargs.get("metadata"))
        micros, tokens = self.estimate(kwargs)
        reply = await self.gate.reserve(
            usage_pb2.ReserveRequest(
                project=fields.get("project", ""),
                user=fields.get("user", "") or str(kwargs.get("user") or ""),
                session_id=fields.get("session_id", ""),
                model=str(kwargs.get("model", "")),
                estimated_cost_micros=micros,
                estimated_tokens=tokens,
            )
        )
        if not reply.granted:
            raise BudgetExceededError(reply.denial)
        if reply.reservation_id:
            metadata = kwargs.get("metadata")
            if not isinstance(metadata, dict):
                metadata = kwargs["metadata"] = {}
            metadata[RESERVATION_KEY] = reply.reservation_id
        return kwargs

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Publish the call's usage (and answer, if collected); commit its reservation."""
        event = request_completed(kwargs, response_obj, ok=True)
        collected = self._collected(kwargs, response_obj, event)
        self._in_background(self._after_success(event, _ended(kwargs), collected))

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Publish the failed call and release its reservation (a refused one was never sent)."""
        if isinstance(kwargs.get("exception"), BudgetExceededError):
            return
        event = request_completed(kwargs, response_obj, ok=False)
        self._in_background(self._after_failure(event, _ended(kwargs)))

    async def drain(self) -> None:
        """Wait until what earlier calls published and committed is done (e.g. at shutdown)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` without holding up the call (LiteLLM awaits failure callbacks inline)."""
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _collected(
        self, kwargs: Mapping[str, Any], response_obj: Any, event: events_pb2.RequestCompleted
    ) -> learning_events.ResponseCollected | None:
        """The call's ResponseCollected when its project's content is collected and it fits."""
        if not self.collect_projects & {event.project, ALL_PROJECTS}:
            return None
        collected = response_collected(kwargs, response_obj, event)
        if collected is not None and collected.ByteSize() > self.max_collected_bytes:
            log.warning(
                "response not collected: too large",
                bytes=collected.ByteSize(),
                max_bytes=self.max_collected_bytes,
                task_id=event.task_id,
            )
            return None
        return collected

    async def _after_success(
        self,
        event: events_pb2.RequestCompleted,
        ended: datetime | None,
        collected: learning_events.ResponseCollected | None = None,
    ) -> None:
        if self.gate is not None and event.reservation_id:
            tokens = event.tokens
            used = tokens.input + tokens.output + tokens.cached_read + tokens.cache_write
            commit = usage_pb2.CommitRequest(
                reservation_id=event.reservation_id,
                actual_cost_micros=min(event.reported_cost.micros, MAX_COST_MICROS),
                actual_tokens=min(used + tokens.reasoning, MAX_TOKENS),
            )
            await self._finish(self.gate.commit(commit), "commit")
        await self._publish(event, ended)  # after the Commit: its ingest settles the reservation
        if collected is not None:
            await self._publish(collected, ended)

    async def _after_failure(
        self, event: events_pb2.RequestCompleted, ended: datetime | None
    ) -> None:
        if self.gate is not None and event.reservation_id:
            release = usage_pb2.ReleaseRequest(reservation_id=event.reservation_id)
            await self._finish(self.gate.release(release), "release")
        await self._publish(event, ended)

    @staticmethod
    async def _finish(call: Coroutine[Any, Any, bool], what: str) -> None:
        """Commit or release; a refusal is logged (the lease then returns the hold)."""
        try:
            await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("reservation not finished", action=what, error=str(exc))

    async def _publish(self, payload: Message, ended: datetime | None) -> None:
        envelope = new_event(payload, source=self.source, time=ended)
        try:
            await self.publisher.publish_events([envelope])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the spool keeps what core did not take; never fail the call
            log.error("usage event not published", error=str(exc))


def _ended(kwargs: Mapping[str, Any]) -> datetime | None:
    """When the call ended, as LiteLLM logged it."""
    ended = (kwargs.get("standard_logging_object") or {}).get("endTime")
    return datetime.fromtimestamp(ended, UTC) if isinstance(ended, int | float) else None


def lodestar_fields(metadata: object) -> dict[str, str]:
    """Lodestar's fields of a call's metadata (``{"lodestar": {...}}``), as text."""
    if not isinstance(metadata, Mapping):
        return {}
    fields = metadata.get(METADATA_KEY)
    if not isinstance(fields, Mapping):
        requester = metadata.get("requester_metadata")  # the proxy keeps the request's here
        fields = requester.get(METADATA_KEY) if isinstance(requester, Mapping) else None
    if not isinstance(fields, Mapping):
        return {}
    return {str(k): str(v) for k, v in fields.items() if v is not None}


def request_completed(
    kwargs: Mapping[str, Any], response_obj: Any, *, ok: bool
) -> events_pb2.RequestCompleted:
    """The ``RequestCompleted`` of one LiteLLM call, from its kwargs and response."""
    log_object: Mapping[str, Any] = kwargs.get("standard_logging_object") or {}
    params = kwargs.get("litellm_params") or {}
    metadata = params.get("metadata") or kwargs.get("metadata") or {}
    fields = lodestar_fields(metadata)
    provider = str(log_object.get("custom_llm_provider") or params.get("custom_llm_provider") or "")
    model = str(log_object.get("model") or kwargs.get("model") or "")
    event = events_pb2.RequestCompleted(
        model=model.removeprefix(f"{provider}/") if provider else model,
        provider=provider,
        project=fields.get("project", ""),
        user=fields.get("user", "") or str(kwargs.get("user") or log_object.get("end_user") or ""),
        session_id=fields.get("session_id", ""),
        task_id=fields.get("task_id", ""),
        attempt=int(fields.get("attempt", "0") or 0),
        status=events_pb2.REQUEST_STATUS_OK if ok else events_pb2.REQUEST_STATUS_ERROR,
        reservation_id=str(metadata.get(RESERVATION_KEY, ""))
        if isinstance(metadata, Mapping)
        else "",
    )
    _time_the_call(event, log_object)
    if ok:
        _count_tokens(event.tokens, getattr(response_obj, "usage", None))
        cost = log_object.get("response_cost")
        if isinstance(cost, int | float) and cost > 0:
            event.reported_cost.micros = scaled(cost, MICROS_PER_USD)
    else:
        event.error_message = str(log_object.get("error_str") or kwargs.get("exception") or "")[
            :MAX_ERROR_CHARS
        ]
    return event


def response_collected(
    kwargs: Mapping[str, Any], response_obj: Any, event: events_pb2.RequestCompleted
) -> learning_events.ResponseCollected | None:
    """The prompt and answer of a successful call, or None when it answered no text."""
    choices = getattr(response_obj, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    answer = getattr(message, "content", None)
    if not isinstance(answer, str) or not answer:
        return None
    fields = lodestar_fields((kwargs.get("litellm_params") or {}).get("metadata"))
    fields = fields or lodestar_fields(kwargs.get("metadata"))
    return learning_events.ResponseCollected(
        task_id=event.task_id,
        model=event.model,
        provider=event.provider,
        task_kind=fields.get("task_kind", ""),
        prompt=json.dumps(kwargs.get("messages") or [], ensure_ascii=False, default=str),
        response=answer,
        project=event.project,
    )


def _time_the_call(event: events_pb2.RequestCompleted, log_object: Mapping[str, Any]) -> None:
    """Duration and time to first token from LiteLLM's start, first-chunk and end times."""
    started, ended = log_object.get("startTime"), log_object.get("endTime")
    if not (isinstance(started, int | float) and isinstance(ended, int | float)):
        return
    if ended < started:
        return
    event.duration.FromTimedelta(timedelta(seconds=ended - started))
    first = log_object.get("completionStartTime")
    if isinstance(first, int | float) and started <= first <= ended:
        event.time_to_first_token.FromTimedelta(timedelta(seconds=first - started))


def _count_tokens(tokens: events_pb2.TokenUsage, usage: Any) -> None:
    """LiteLLM's usage as disjoint kinds.

    Input leaves out cache reads and writes, output leaves out reasoning.
    """
    if usage is None:
        return
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    cached = int(getattr(prompt_details, "cached_tokens", 0) or 0)
    written = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
    reasoning = int(getattr(completion_details, "reasoning_tokens", 0) or 0)
    tokens.cached_read = min(cached, prompt)
    tokens.cache_write = min(written, prompt - tokens.cached_read)
    tokens.input = prompt - tokens.cached_read - tokens.cache_write
    tokens.reasoning = min(reasoning, completion)
    tokens.output = completion - tokens.reasoning
