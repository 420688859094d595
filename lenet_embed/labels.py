"""What an item's label may be, checked in one place for every front end (the CLI's ``--label``,
the service's ``POST /v1/items``).

A label is a whole number from 0 to :data:`MAX_LABEL` (labels are stored as int64: a digit, or
the number a folder was named by), or a class name of 1 to :data:`MAX_LABEL_LENGTH` characters
(in a bundle built from folders with names), or None for no label. Text that is all ASCII digits
is the number it spells, as a folder name is.
"""

from __future__ import annotations

import numbers

from .errors import LenetEmbedError

MAX_LABEL = 2**63 - 1
MAX_LABEL_LENGTH = 200
RULE = (f"give a whole number from 0 to {MAX_LABEL}, or a class name of 1 to "
        f"{MAX_LABEL_LENGTH} characters")


class BadLabel(LenetEmbedError):
    """A label outside :data:`RULE`."""


def check_label(label: object) -> int | str | None:
    """``label`` as it is stored: an int in 0..MAX_LABEL, a name (stripped), or None.

    Text of ASCII digits becomes its number, so "7" and 7 are the same label. Anything else
    (a negative or too large number, a bool, a float, empty or overlong text) raises
    :class:`BadLabel`, one line quoting the label (shortened) and the rule.
    """
    if label is None:
        return None
    if isinstance(label, str):
        text = label.strip()
        if not (text.isascii() and text.isdecimal()):
            if 1 <= len(text) <= MAX_LABEL_LENGTH:
                return text
        elif len(text.lstrip("0")) <= len(str(MAX_LABEL)):  # int() of it is cheap
            label = int(text)
    if isinstance(label, numbers.Integral) and not isinstance(label, bool) \
            and 0 <= label <= MAX_LABEL:
        return int(label)
    raise BadLabel(f"label {_shown(label)}: {RULE}")


def _shown(label: object) -> str:
    """``label`` quoted for an error line, at most 40 characters."""
    if isinstance(label, numbers.Integral) and abs(int(label)) > 10**30:
        return f"{'-' if label < 0 else ''}(a {int(label).bit_length()}-bit number)"
    text = repr(label)
    return text if len(text) <= 40 else text[:37] + "..."
