"""The policy as text in / text out, for self-localization and repairs: prompts in the dataset's style, replies
decoded by the training sampler (`PolicyText`), and a localizer wrapper that puts each seed's system messages before
its localization prompt (`SystemMessages`)."""

from __future__ import annotations

from collections.abc import Callable


def system_messages(request) -> list[dict]:
    """The system messages of the conversational dataset prompt a localization request's seed came from."""
    return [m for m in (request.row or {}).get("prompt", []) if isinstance(m, dict) and m.get("role") == "system"]


class PolicyText:
    """The policy as text in / text out, in the dataset's prompt style: a conversational dataset's system messages
    lead each localization prompt of the seed they belong to (see `SystemMessages`). ``encode`` and ``decode`` let a
    scheduler decode the replies among the rollouts (`scheduler.run_overlapped`).

    Args:
        sampler: the thought sampler (``complete(prompt_ids, max_new_tokens, temperature) -> reply ids``).
        tokenize: prompts (text, or message lists) -> token ids, as the trainer tokenizes its dataset prompts.
        decode: token ids -> text.
        conversational: whether prompts are wrapped as user messages.
    """

    def __init__(self, sampler, tokenize: Callable[[list], list], decode: Callable[[list[int]], str],
                 conversational: bool):
        self.sampler, self.tokenize, self._decode, self.conversational = sampler, tokenize, decode, conversational
        self.leading: list[list[dict]] | None = None  # per request of the current locate() call

    def encode(self, prompts: list[str], requests=None) -> list[list[int]]:
        """The token ids the policy is prompted with; ``requests`` (one per prompt) give the system messages."""
        leading = [system_messages(r) for r in requests] if requests is not None else self.leading
        leading = leading if leading is not None and len(leading) == len(prompts) else None
        if self.conversational:
            messages = [(leading[i] if leading else []) + [{"role": "user", "content": p}]
                        for i, p in enumerate(prompts)]
        else:
            messages = prompts
        return [list(x) for x in self.tokenize(messages)]

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def complete(self, prompts, max_new_tokens, temperature):
        if not prompts:
            self.sampler.complete([], max_new_tokens, temperature)
            return []
        replies = self.sampler.complete(self.encode(prompts), max_new_tokens, temperature)
        return [(self.decode(reply), len(reply)) for reply in replies]


class SystemMessages:
    """Wraps a localizer so that the policy, asked one localization prompt per request, sees before each the
    system messages of the dataset prompt the request's seed came from. Everything else is the localizer's."""

    def __init__(self, localizer):
        self.localizer, self.name = localizer, localizer.name

    def __getattr__(self, name):
        if name == "localizer":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.localizer, name)

    def locate(self, requests, policy=None, rng=None):
        if isinstance(policy, PolicyText):
            policy.leading = [system_messages(r) for r in requests]
        try:
            return self.localizer.locate(requests, policy, rng)
        finally:
            if isinstance(policy, PolicyText):
                policy.leading = None
