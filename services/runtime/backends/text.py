"""Tokenizer-side operations every Hugging Face tokenizer backend shares.

TorchBackend and VLLMBackend load the same tokenizer and must build prompts, count,
truncate and encode exactly alike (so the two engines score the same ids), and cut
generations at stop strings alike; they both inherit this instead of keeping two copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.runtime.errors import InvalidArgument


class TokenizerText:
    """Chat rendering, token counting, truncation and prompt encoding over ``_tokenizer``.

    Subclasses set ``self._tokenizer`` (a transformers tokenizer) and ``self._bos``
    (its BOS id or None) before use.
    """

    _tokenizer: Any
    _bos: int | None

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def render_chat(self, user_message: str, history: Sequence[tuple[str, str]] = ()) -> str:
        if not self.has_chat_template:
            return "".join(f"{user}\n{answer}\n\n" for user, answer in history) + user_message
        messages = []
        for user, answer in history:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]
        messages.append({"role": "user", "content": user_message})
        rendered = self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def token_ids(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        enc = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        try:
            enc = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow (Python) tokenizers have no offsets
            ids = self.token_ids(text)
            return text if len(ids) <= max_tokens else str(self._tokenizer.decode(ids[:max_tokens]))
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_tokens:
            return text
        # Cut at the character where the first dropped token starts, so the kept text
        # re-encodes to (at most) the kept tokens and keeps its original spelling.
        return text[: offsets[max_tokens][0]].rstrip()

    def with_bos(self, ids: list[int]) -> list[int]:
        """``ids`` after BOS when the model has one; added only when missing, so a chat
        template's own BOS is never doubled."""
        if self._bos is not None and (not ids or ids[0] != self._bos):
            ids.insert(0, int(self._bos))
        return ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """The ids a prompt is scored with: its tokens, after BOS when the model has one."""
        return self.with_bos(self.token_ids(prompt))

    def encode_prompts_within(self, prompts: list[str], limit: int) -> list[list[int]]:
        """``encode_prompt`` of each prompt, refusing (InvalidArgument) an empty one or one
        longer than ``limit`` tokens: cutting a prompt's end would drop the question."""
        encoded = [self.encode_prompt(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise InvalidArgument("empty prompt: there is no position to read the answer at")
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if too_long:
            worst = max(len(encoded[i]) for i in too_long)
            raise InvalidArgument(
                f"{len(too_long)} prompt(s) exceed {limit} tokens (longest {worst}); truncate "
                "the sample text (backend.truncate) before building the prompt: cutting the "
                "prompt's end would drop the question"
            )
        return encoded

    def encode_for_nll(self, texts: list[str], budget: int) -> list[list[int]]:
        """Each text's first ``budget`` tokens (head kept), after BOS when there is one."""
        return [self.with_bos(self.token_ids(t)[:budget]) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Generated ids as text, special tokens (EOS, padding) skipped."""
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def ids_within(self, ids: list[int], chars: int) -> list[int]:
        """The longest prefix of ``ids`` whose text is at most ``chars`` characters: the
        tokens wholly before a cut. Walks back from the end, since a cut made at a stop
        string lies within the last few tokens."""
        n = len(ids)
        while n and len(self.decode(ids[:n])) > chars:
            n -= 1
        return ids[:n]


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None when none occurs."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
