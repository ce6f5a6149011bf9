"""Token ids in, text out, O(1) work per token: incremental detokenization and stop strings.

Decoding the whole output again at every step costs O(n) per token (O(n^2) for
an answer). :class:`Detokenizer` decodes a short window instead: the tokens since
the last emitted boundary, diffed against the same window without the newest
token. Starting the window a little before the new token keeps tokenizers
that drop or add a leading space at the start of a decode (SentencePiece's
"▁") and byte-level pieces of one UTF-8 character split over several tokens
right: text is emitted only once it no longer ends in U+FFFD.

:class:`StopFilter` sits after it: it holds back the longest tail of the text
that could still be the start of a stop string, and cuts the text where one
completes; it only ever looks at the held-back tail plus the new piece.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    """What the detokenizer needs of a tokenizer (``transformers`` tokenizers fit)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class Detokenizer:
    """Turns a growing list of token ids into text pieces.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=True)``.

    ``add(token)`` returns the text that token completes (often ``""`` while a
    multi-byte character is incomplete); ``flush()`` returns what is left at the
    end. The concatenation of every piece equals ``tokenizer.decode(ids)``, less the
    U+FFFD that decode ends with when the last tokens leave a character incomplete
    (output cut by ``max_tokens`` mid-character): the pieces leave it out, as vLLM's
    and llama.cpp's servers do.
    """

    max_pending = 16  # tokens a window may grow by before its U+FFFD count as final (bounded work per token)

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoding from here reproduces the emitted text's tail
        self._read = 0  # tokens whose text has been emitted in full
        self._sent = 0  # characters of the window's new text already emitted (before a trailing U+FFFD run)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append ``token``; return the text it completes."""
        self.ids.append(token)
        new = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
        if not new.endswith("\ufffd") or len(self.ids) - self._read >= self.max_pending:
            out = new[self._sent :]
            self._prefix, self._read, self._sent = self._read, len(self.ids), 0
            return out
        # An incomplete character decodes to U+FFFD for now; what comes before that run is final.
        final = new.rstrip("\ufffd")
        out = final[self._sent :]
        self._sent = max(self._sent, len(final))
        return out

    def flush(self) -> str:
        """The text of tokens not emitted yet (the end of the output), less an incomplete last character."""
        if self._read == len(self.ids):
            return ""
        new = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
        self._prefix = self._read = len(self.ids)
        out, self._sent = new[self._sent :], 0
        return out.removesuffix("\ufffd")  # the U+FFFD of a character the last tokens leave incomplete


class StopFilter:
    """Cuts a stream of text pieces at the first stop string (which is not emitted).

    Args:
        stops: strings that end the text; empty strings are ignored.

    ``push(piece)`` returns ``(text safe to emit, stopped)``; once stopped, nothing
    more is accepted. ``flush()`` returns the held-back tail at the end.
    """

    def __init__(self, stops: tuple[str, ...] | list[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        assert not self.stopped, "push after a stop string ended the text"
        if not self.stops:
            return piece, False
        buf = self._held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[: min(hits)], True
        hold = _partial_stop(buf, self.stops)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold
