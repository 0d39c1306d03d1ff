"""One prompt's answer as the engine's updates arrive: text, stop strings, streaming deltas, logprobs."""
from __future__ import annotations

from typing import Optional

from biomedlm_jax.inference import scheduler as scheduler_lib


class Choice:
    """One prompt's answer as it grows: text decoded from all tokens so far, cut at a stop string;
    `delta` gives what can be streamed (held back: a partial UTF-8 character, and any tail that may be
    the start of a stop string)."""

    def __init__(self, index: int, tok, eos_id: int, stop, logprobs: Optional[int]):
        self.index, self.tok, self.eos_id, self.stop = index, tok, eos_id, tuple(stop)
        self.tokens, self.logprobs, self.n_top = [], [], logprobs
        self.offsets: list[int] = []  # with logprobs: each token's text_offset (see add)
        self.sent = 0  # characters streamed
        self.finish_reason: Optional[str] = None
        self.text, self.cut = "", False

    def add(self, update: scheduler_lib.Update) -> None:
        if self.cut:
            return
        for t, lp in zip(update.tokens, update.logprobs or [None] * len(update.tokens)):
            if t == self.eos_id:
                break
            if self.n_top is not None:
                # where this token's text starts: the complete characters before it. A character split
                # over several tokens (UTF-8 bytes) decodes to U+FFFD until its last byte arrives, so
                # a trailing U+FFFD is not yet text (a genuine trailing U+FFFD would be miscounted).
                self.offsets.append(len(self.tok.decode(self.tokens).rstrip("\ufffd")))
            self.tokens.append(t)
            self.logprobs.append(lp)
        self.text = self.tok.decode(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.cut, self.finish_reason = self.text[: min(hits)], True, "stop"
            self._trim_tokens()
        elif update.done:
            self.finish_reason = update.finish_reason

    def _trim_tokens(self) -> None:
        """Keep the tokens whose text starts before the cut (the stop string and after are not output)."""
        keep = 0
        while keep < len(self.tokens) and len(self.tok.decode(self.tokens[:keep])) < len(self.text):
            keep += 1
        del self.tokens[keep:], self.logprobs[keep:], self.offsets[keep:]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def delta(self) -> str:
        end = len(self.text)
        if not self.done:
            end -= max((len(s) for s in self.stop), default=1) - 1
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        out = self.text[self.sent: max(end, self.sent)]
        self.sent += len(out)
        return out

    def logprobs_json(self, start: int = 0) -> Optional[dict]:
        if self.n_top is None:
            return None
        toks = [self.tok.decode([t]) for t in self.tokens[start:]]
        offsets = self.offsets[start:]
        return {"tokens": toks, "token_logprobs": [lp[0] for lp in self.logprobs[start:]],
                "top_logprobs": [{self.tok.decode([t]): v for t, v in lp[1][: self.n_top]} for lp in self.logprobs[start:]],
                "text_offset": offsets}
