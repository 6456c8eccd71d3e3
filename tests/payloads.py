"""Pickles that would run code: each creates a marker file if anything of it runs."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path
from typing import Any


class Exploit:
    """Unpickling this calls exec, which creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def code_pickle(marker: Path, wrap: Any = None) -> bytes:
    """A pickle of `{"state_dict": Exploit(marker)}` (or of `wrap`, with the exploit inside,
    when given), checked once here to really create the marker."""
    data = pickle.dumps(wrap if wrap is not None else {"state_dict": Exploit(marker)},
                        protocol=2)
    pickle.loads(data)
    assert marker.exists(), "the payload must work for the test to mean anything"
    marker.unlink()
    return data
