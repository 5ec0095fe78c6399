"""Call results read back from the sandbox: typed JSON lines decoded into builtin values, in bounded time.

A program's values pipe is data from the program, so decoding it must cost the parent little whatever
the program wrote. Its size is capped where it is read (`max_output_bytes`); here the decoding itself
runs against a deadline (`DECODE_SECONDS` per run): building a set or dict hashes every element, and
elements that all hash alike (integers are easy to choose so) make each insertion cost the size of the
set, a quadratic decode. A value that cannot be decoded in time ends the results, as a cut-off line does.

Usage:
    values(b'[1,{"tuple":[2,3]}]\\n')  # [[1, (2, 3)]]
    decode({"set": [1, 2]})            # {1, 2}
"""

from __future__ import annotations

import json
import time

from .sandbox_child import encode

DECODE_SECONDS = 1.0  # a megabyte of ordinary results decodes in a few ms; colliding hashes would take seconds
_CHECK_EVERY = 64  # elements between looks at the clock: each look costs about as much as one element


class _Decoder:
    """`encode`'s inverse, looking at the clock every `_CHECK_EVERY` elements."""

    def __init__(self, deadline: float | None):
        self.deadline, self.count = deadline, 0

    def tick(self) -> None:
        self.count += 1
        if self.deadline is not None and self.count % _CHECK_EVERY == 0 and time.monotonic() > self.deadline:
            raise ValueError(f"decoding took more than {DECODE_SECONDS} s")

    def value(self, tree):
        self.tick()
        if isinstance(tree, list):
            return [self.value(v) for v in tree]
        if not isinstance(tree, dict):
            return tree
        if len(tree) != 1:
            raise ValueError("a typed value has exactly one key")
        ((kind, body),) = tree.items()
        if kind == "bytes" and isinstance(body, str):
            return bytes.fromhex(body)
        if not isinstance(body, list):
            raise ValueError(f"bad typed value {kind!r}")
        if kind == "tuple":
            return tuple(self.value(v) for v in body)
        if kind == "dict":
            out = {}
            for pair in body:
                key, val = pair  # a ValueError or TypeError when it is not a pair
                out[self.value(key)] = self.value(val)
            return out
        if kind in ("set", "frozenset"):
            items: set = set()
            for v in body:
                items.add(self.value(v))
            return items if kind == "set" else frozenset(items)
        raise ValueError(f"unknown typed value {kind!r}")


def decode(tree, deadline: float | None = None):
    """`encode`'s inverse; raises ValueError on anything `encode` cannot have written, or on passing
    `deadline` (a `time.monotonic()` time), and TypeError on an unhashable key or element."""
    return _Decoder(deadline).value(tree)


def values(raw: bytes, seconds: float = DECODE_SECONDS) -> list:
    """Call results, one typed-JSON line each, up to the first that is not one, is cut off, or is not
    decoded within `seconds` (all lines together)."""
    deadline = time.monotonic() + seconds
    out = []
    for line in raw.split(b"\n")[:-1]:
        try:
            out.append(decode(json.loads(line), deadline))
        except (ValueError, TypeError, RecursionError):
            break
    return out


__all__ = ["DECODE_SECONDS", "decode", "encode", "values"]
