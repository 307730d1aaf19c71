"""Known-good requests the fuzzer starts from for a few RPCs whose rules tie fields together.

Optional: an RPC without seeds is fuzzed from its descriptor alone. Seeds are mutated like any
generated request (one to three fields set to edge values), so bounds are also tested on
requests that are otherwise valid.
"""

from __future__ import annotations

from typing import Any

#: Valid requests as protobuf JSON, by full name of the request message.
SEEDS: dict[str, list[dict[str, Any]]] = {
    "lodestar.usage.v1.CreateBudgetRequest": [
        {
            "budget": {
                "name": "fuzz monthly",
                "scope": "BUDGET_SCOPE_GLOBAL",
                "period": "BUDGET_PERIOD_MONTHLY",
                "limitMicros": "5000000",
                "thresholdsPct": [50, 90],
            }
        },
        {
            "budget": {
                "name": "fuzz project",
                "scope": "BUDGET_SCOPE_PROJECT",
                "scopeValue": "p1",
                "period": "BUDGET_PERIOD_DAILY",
                "timezone": "Europe/Paris",
                "limitTokens": "100000",
            }
        },
        {
            "budget": {
                "name": "fuzz rolling",
                "scope": "BUDGET_SCOPE_USER",
                "scopeValue": "ann",
                "period": "BUDGET_PERIOD_ROLLING",
                "rolling": "3600s",
                "limitMicros": "1000",
            }
        },
        {
            "budget": {
                "name": "fuzz session",
                "scope": "BUDGET_SCOPE_SESSION",
                "scopeValue": "s1",
                "period": "BUDGET_PERIOD_MONTHLY",
                "sessionLimits": {"maxDuration": "600s", "maxTokens": "5000"},
            }
        },
    ],
    "lodestar.usage.v1.SetPriceRequest": [
        {
            "price": {
                "modelPattern": "claude-sonnet-4*",
                "validFrom": "2026-01-01",
                "inputMicrosPerMtok": "3000000",
                "outputMicrosPerMtok": "15000000",
                "cachedReadMicrosPerMtok": "300000",
            }
        }
    ],
    "lodestar.usage.v1.ReserveRequest": [
        {
            "project": "p1",
            "user": "ann",
            "sessionId": "s1",
            "model": "claude-sonnet-4",
            "estimatedCostMicros": "1000",
            "estimatedTokens": "100",
            "lease": "30s",
        }
    ],
    "lodestar.usage.v1.SummaryRequest": [
        {"window": {"rolling": {"days": 30}}, "groupBy": ["model", "day"]},
        {"window": {"calendar": {"unit": "CALENDAR_UNIT_MONTH"}}, "timezone": "Europe/Paris"},
    ],
    "lodestar.core.v1.RegisterRequest": [
        {
            "name": "fuzz-module",
            "version": "1.0.0",
            "endpoint": "127.0.0.1:1",
            "eventTypes": ["lodestar.usage.v1.RequestCompleted"],
            "lease": "30s",
        }
    ],
    "lodestar.core.v1.SubscribeRequest": [
        {
            "open": {
                "subscription": "fuzz-sub",
                "eventTypes": ["lodestar.usage.v1.RequestCompleted"],
                "start": "START_POSITION_EARLIEST",
                "maxInFlight": 10,
            }
        },
        {"ack": {"sequences": ["1", "2"]}},
    ],
}
