"""
Turns: where a turn (a speech of the plays, a chat message) starts in a document's text, found
by a regular expression while the text streams by in pieces. SHAKESPEARE_TURNS finds the
speeches of the default corpus; --turn_regex gives the pattern of any other.

corpus/prepare.py keeps the turns' token offsets beside the tokens ({train,val}.turns), where
pack.py's `turns` block boundaries read them.
"""

import collections
import re
import signal
import threading
import time
from contextlib import contextmanager

from corpus.download import DataError

# A turn of the default corpus: a speech, which starts with its speaker's name on a line of its
# own after a blank line ("\n\nJULIET.\n", "\n\nFirst Lord.\n", "\n\nHor. and Mar.\n"; in A
# Midsummer Night's Dream without the period: "\n\nQUINCE\n"), followed by a line of text (so that
# "ACT I." and other headings, followed by a blank line, are none). The turn starts at the name.
# Lines of capitalized words ending in a period: the words "and", "of", "the" and "&" may join
# the names, any other lower-case word makes the line a sentence ("Saddle my horse."), not a name.
SHAKESPEARE_TURNS = (r"(?<=\n\n)(?!(?:ACT|SCENE|Act|Scene)\b)"
                     r"(?:[A-Z][\w'-]*\.?(?: +(?:and|of|the|&|[A-Z][\w'-]*\.?))*\. *"
                     r"|[A-Z][A-Z' &-]+)\n(?=[ \t]*\S)")

# Characters a turn match and what its look-arounds read may span: documents are searched in
# pieces, each once this much text after it has been read.
TURN_CONTEXT = 4096

# A search of one piece of text that takes this long is reported (and then every SLOW_EVERY s):
# a regex that backtracks catastrophically, such as (\w+\s?)+$, can take hours on one line.
SLOW_AFTER, SLOW_EVERY = 10.0, 30.0


def turn_pattern(regex):
    """The compiled turn regex, or a DataError saying why it does not compile. An empty regex
    would start a turn at every character."""
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise DataError(f"--turn_regex {regex!r} does not compile ({e}); give a Python regular "
                        f"expression whose matches start the turns") from None
    if pattern.fullmatch(""):
        raise DataError(f"--turn_regex {regex!r} matches the empty text, so it would start a turn "
                        f"at every character; anchor it to what starts a turn")
    return pattern


def with_turns(pieces, pattern):
    """(text, bytes, turns) for each (text, bytes) piece of one document: turns are the offsets in
    text where matches of pattern start, as pattern.finditer over the whole document finds them
    (pattern None: none; after an empty match the search goes on one character later). A piece
    is given once TURN_CONTEXT characters after it have been read (or the document has ended),
    and that much is kept before the search point for look-behinds."""
    if pattern is None:
        yield from ((text, size, []) for text, size in pieces)
        return
    pending = collections.deque()  # (text, bytes) read but not given yet
    buf, base = "", 0  # the document's characters from offset base on
    given = scan = 0  # document offsets: of the first pending piece; where the search goes on

    def give():
        nonlocal given, scan
        text, size = pending.popleft()
        end, turns = given + len(text), []
        with watched(pattern):
            for m in pattern.finditer(buf, scan - base):
                if m.start() + base >= end:
                    break
                turns.append(m.start() + base - given)
                scan = m.end() + base if m.end() > m.start() else m.start() + base + 1
        # no match starts between the last one and the next found, which starts at end or later
        scan, given = max(scan, end), end
        return text, size, turns

    for text, size in pieces:
        pending.append((text, size))
        buf += text
        while pending and base + len(buf) - given - len(pending[0][0]) >= TURN_CONTEXT:
            yield give()
        keep = max(min(scan, given) - TURN_CONTEXT - base, 0)
        buf, base = buf[keep:], base + keep
    while pending:
        yield give()


@contextmanager
def watched(pattern):
    """Report a search by pattern that takes more than SLOW_AFTER seconds, and then every
    SLOW_EVERY, with a line the user can act on. Python's regex engine runs signal handlers
    while it matches, so a SIGALRM timer can speak up from inside a search that never returns;
    only the main thread can have one (elsewhere the search goes unwatched)."""
    if threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, "setitimer"):
        yield
        return
    started = time.monotonic()

    def report(*_):
        print(f"finding turns: --turn_regex {pattern.pattern!r} has searched one piece of text "
              f"for {time.monotonic() - started:.0f} s; a regex that backtracks (a repeated group "
              f"that can match the same text in many ways, such as (\\w+\\s?)+) can take "
              f"hours: simplify it, or stop with Ctrl-C", flush=True)

    previous = signal.signal(signal.SIGALRM, report)
    signal.setitimer(signal.ITIMER_REAL, SLOW_AFTER, SLOW_EVERY)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
