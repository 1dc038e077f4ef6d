"""What crosses between the ingress, the router and the engine replicas (plain values)."""

from __future__ import annotations

from typing import Any

import attrs

from ..backends.base import Capabilities, GenerateRequest

__all__ = ["ReplicaInfo", "RoutedRequest"]


@attrs.frozen(kw_only=True)
class RoutedRequest:
    """A request on its way to an engine replica, with what the router decides by: the
    chained block hashes of its prompt's tokens (empty when unknown, e.g. a prompt with
    images) and its program's session key (None outside a program)."""

    request: GenerateRequest
    block_hashes: tuple[int, ...] = ()
    session: str | None = None


@attrs.frozen(kw_only=True)
class ReplicaInfo:
    """What the ingress needs of the model to serve the OpenAI routes and to tokenize
    prompts for routing: taken once from one replica (every replica runs the same model)."""

    model_name: str
    capabilities: Capabilities
    chat_template: Any
    chat_template_source: str | None
    tokenizer: Any
    escape_special_tokens: bool
