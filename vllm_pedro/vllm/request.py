"""The contract between the front ends (vllm_pedro.LLM, the OpenAI server) and the engine
(the PEDRO scheduler and worker): what a PEDRO request is, how it rides inside
`SamplingParams.extra_args`, the KV-cache salt, and what a server can serve.

A leaf: nothing here imports the rest of the plugin, so both sides read one definition.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields

from vllm import SamplingParams

from ..config import AdapterError, PedroConfig

EXTRA_ARGS_KEY = "pedro"  # SamplingParams.extra_args[EXTRA_ARGS_KEY]: PedroRequest.to_dict()
# A PEDRO request the engine cannot serve finishes with reason "error" and a stop_reason
# that starts with this and names the adapter and the cause.
ERROR_PREFIX = "PEDRO adapter"
_DIGEST = re.compile(r"[0-9a-f]{64}")


MAX_NAME_CHARS = 256
NAME_RULE = (f"a tenant name is printable text (no control, format or line-separator characters), with no "
             f"leading or trailing whitespace, of 1 to {MAX_NAME_CHARS} characters")


def tenant_name_problem(name) -> str | None:
    """What is wrong with a tenant name, or None. One rule for --pedro-modules, runtime
    loads, --pedro-adapter-dir names and the offline API: a name reaches logs and
    /metrics labels, so it must not be able to forge a log line."""
    if not isinstance(name, str) or not name:
        return f"is empty or not a string ({NAME_RULE})"
    if len(name) > MAX_NAME_CHARS:
        return f"has {len(name)} characters ({NAME_RULE})"
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        return f"holds the non-printable character {bad!r} ({NAME_RULE})"
    if name != name.strip():
        return f"has leading or trailing whitespace ({NAME_RULE})"
    return None


@dataclass(frozen=True)
class PedroRequest:
    """Which adapter a request uses: a unique name, a unique positive integer id, the
    adapter folder, and the sha256 `digest` of the files the front end validated (the
    engine serves those bytes or fails the request; front ends fill it in)."""

    name: str
    int_id: int
    path: str
    digest: str | None = None

    def __post_init__(self):
        problem = tenant_name_problem(self.name)
        if problem:
            raise ValueError(f"PedroRequest name {self.name!r} {problem}")
        if not isinstance(self.int_id, int) or isinstance(self.int_id, bool) or self.int_id < 1:
            raise ValueError(f"PedroRequest int_id must be a positive integer, got {self.int_id!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"PedroRequest path must be a non-empty string, got {self.path!r}")
        if self.digest is not None and not (isinstance(self.digest, str) and _DIGEST.fullmatch(self.digest)):
            raise ValueError(f"PedroRequest digest must be a sha256 hex string, got {self.digest!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d) -> PedroRequest:
        if not isinstance(d, dict) or set(d) != {f.name for f in fields(cls)}:
            raise ValueError(f"malformed PEDRO request {d!r}")
        return cls(**d)


def with_pedro(params: SamplingParams, req: PedroRequest) -> SamplingParams:
    """A copy of `params` that asks the engine for adapter `req` (validated: digest set)."""
    if req.digest is None:
        raise ValueError(f"PEDRO adapter {req.name!r} reached the engine unvalidated (no digest)")
    params = copy.deepcopy(params)
    params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: req.to_dict()}
    # A PEDRO prompt is prefilled whole (its vectors come from all of it), so it never
    # starts from cached KV.
    params.skip_reading_prefix_cache = True
    return params


def pedro_request_of(params) -> PedroRequest | None:
    """The PEDRO request a SamplingParams carries, or None (raises ValueError if malformed)."""
    extra = getattr(params, "extra_args", None)
    if not extra or EXTRA_ARGS_KEY not in extra:
        return None
    return PedroRequest.from_dict(extra[EXTRA_ARGS_KEY])


def cache_salt(req: PedroRequest, secret: str) -> str:
    """The prefix-cache salt of a PEDRO request. KV written under it depends on the adapter;
    `secret` is drawn by the front end at start, so no client can send this salt and read
    a tenant's cached KV (PEDRO requests themselves never read cached KV)."""
    return f"pedro:{secret}:{req.int_id}:{req.name}"


def salted_prompt(prompt, req: PedroRequest, secret: str, prefix_caching: bool):
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    elif isinstance(prompt, dict):
        prompt = dict(prompt)
    else:
        raise TypeError(f"PEDRO requests take str or dict prompts, got {type(prompt).__name__}")
    if prefix_caching:
        prompt["cache_salt"] = cache_salt(req, secret)
    return prompt


def check_servable(config: PedroConfig, serving) -> None:
    """Whether a server with PedroArgs `serving` can serve an adapter with `config`
    (its fit to the base model is checked when it is read). One rule for every front end."""
    if config.r > serving.max_rank:
        raise AdapterError(f"adapter rank {config.r} exceeds max_pedro_rank={serving.max_rank}")
    extra = [t for t in config.targets if t not in serving.targets]
    if extra:
        raise AdapterError(f"adapter targets {extra} are not served (pedro_targets={list(serving.targets)})")
