"""A keyed word count with a windowed aggregate: an example of an ms2m service in Python.

Every payload is cut into two-letter words (the ms2m workload's payloads are random letters,
so there are about a thousand keys). The state is the count of every word ever seen, plus a
sliding window over the last ``WINDOW`` messages' words; each message's output is the most
frequent word in the window. The window is counted in messages, not seconds: a state must
depend on the messages alone, or a target that replays them would end somewhere else.

Run one instance by hand (``MS2M_*`` variables or flags, see ``python -m ms2m.service -h``), or
let a testbed start it:

    tb.deploy("words", host="edge-1",
              command=["python3", "-m", "ms2m.service", "examples/services/wordcount.py:WordCount"])
"""

from __future__ import annotations

import json
from collections import Counter, deque

from ms2m.service import Service

WINDOW = 100
WORD = 2


class WordCount(Service):
    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.window: deque[list[str]] = deque()
        self.in_window: Counter[str] = Counter()

    def handle(self, payload: str) -> str | None:
        words = [payload[i : i + WORD] for i in range(0, len(payload) - WORD + 1, WORD)]
        self.totals.update(words)
        self.window.append(words)
        self.in_window.update(words)
        if len(self.window) > WINDOW:
            self.in_window.subtract(self.window.popleft())
            self.in_window += Counter()  # drops the words whose count fell to 0
        if not self.in_window:
            return None
        # Ties go to the smallest word, so that equal states give equal outputs.
        word, n = min(self.in_window.items(), key=lambda kv: (-kv[1], kv[0]))
        return json.dumps({"top": word, "n": n})

    def snapshot(self) -> bytes:
        state = {"totals": self.totals, "window": list(self.window)}
        return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()

    def restore(self, data: bytes) -> None:
        state = json.loads(data)
        totals = Counter(state["totals"])
        window = deque(state["window"])
        in_window: Counter[str] = Counter()
        for words in window:
            in_window.update(words)
        # Assigned last: a snapshot that does not parse leaves the state as it was.
        self.totals, self.window, self.in_window = totals, window, in_window
