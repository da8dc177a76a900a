"""Shared test helper: random damage to a frame, as a link or a disk might do it."""

from __future__ import annotations

from hypothesis import strategies as st


def mutate_frame(frame: bytes, data: st.DataObject, max_steps: int = 4) -> bytes:
    """Flip, cut or insert bytes 1..max_steps times at positions hypothesis chooses."""
    out = bytearray(frame)
    for _ in range(data.draw(st.integers(1, max_steps))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and out:
            out[data.draw(st.integers(0, len(out) - 1))] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            out = out[: data.draw(st.integers(0, len(out)))]
        else:
            i = data.draw(st.integers(0, len(out)))
            out[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    return bytes(out)
