"""The runner's raw stdout byte stream, turned into events.

The runner writes to a block-buffered pipe, so the reader gets bursts cut anywhere: inside an
ANSI sequence, a UTF-8 character, a log line or the prompt marker. `RunnerOutputParser.feed`
takes such chunks and returns the events they complete, holding back only what the next bytes
could still change. It works in two layers:

1. ANSI sequences are removed; colour changes are kept as signals, because a colour start marks
   the beginning of an A/B log line and the reset closes the load bar, which never ends with a
   newline. Inside a turn an escape sequence that turns out to be part of the answer (a model can
   print any byte) is kept in the text.
2. The plain bytes are cut into lines on `\\n` and `\\r` outside a turn. Inside a turn every byte
   is answer text unless it belongs to a log line; text is released at once except trailing
   newlines (the runner's `\\n\\n` before `hit eos` is not part of the answer), a line start that
   could still become a log line, and an incomplete UTF-8 character.

Pure: no I/O; the work per chunk is proportional to the chunk.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from .dialects import DIALECTS, MARKERS, dialect_of_log_style, dialect_of_startup_line, dialects_with_marker

# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class LogLine:
    level: str  # "I", "W", "E", "N" (A/B); C adds "D"
    function: str
    line: int
    message: str


@dataclass(frozen=True, slots=True)
class Progress:
    percent: int
    step: int
    total: int
    message: str


@dataclass(frozen=True, slots=True)
class InitOk:
    pass


@dataclass(frozen=True, slots=True)
class Marker:
    marker: str


@dataclass(frozen=True, slots=True)
class ImageMarker:
    """A vision runner's second marker (`image >> `): it reads the image's path now."""

    marker: str


@dataclass(frozen=True, slots=True)
class FrameLine:
    """A Qwen-VL runner's list of the frames it read from a directory: one path."""

    path: str


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Ttft:
    ms: float


@dataclass(frozen=True, slots=True)
class TurnEnd:
    tokens_per_second: float


@dataclass(frozen=True, slots=True)
class KvCache:
    precompute_len: int
    remaining: int


@dataclass(frozen=True, slots=True)
class ContextUsed:
    """`precompute_len: N` at start-up or after a reset: the system prompt already fills N tokens."""
    tokens: int


@dataclass(frozen=True, slots=True)
class InputTokens:
    count: int


@dataclass(frozen=True, slots=True)
class BosEos:
    bos_id: int
    eos_id: int


@dataclass(frozen=True, slots=True)
class Uid:
    uid: str


@dataclass(frozen=True, slots=True)
class Banner:
    supports_reset: bool


@dataclass(frozen=True, slots=True)
class PlainLine:
    text: str


@dataclass(frozen=True, slots=True)
class RunnerError:
    kind: str
    message: str


Event = (LogLine | Progress | InitOk | Marker | ImageMarker | FrameLine | Text | Ttft | TurnEnd | KvCache | ContextUsed | InputTokens
         | BosEos | Uid | Banner | PlainLine | RunnerError)

# ---------------------------------------------------------------------------------------------
# Recognisers

C_LEVELS = {"INF": "I", "WRN": "W", "ERR": "E", "NTC": "N", "DBG": "D"}
# Errors that end the turn: the runner goes back to its marker without a `hit eos` line.
TURN_ABORTING_ERRORS = frozenset({"context_overflow", "prompt_too_long"})
# Bound for a line held outside a turn without a newline, so garbage cannot grow it without limit.
MAX_LINE_BYTES = 65536


def _prefix_pattern(tokens: list[tuple[str, str | None]]) -> re.Pattern[bytes]:
    """A pattern matching exactly the prefixes of the concatenated tokens.

    Each token is (pattern, pattern of its proper prefixes or None when every prefix of a match
    is itself a match or empty), so a held line start can be tested with one `fullmatch`.
    """
    pattern = ""
    for full, partial in reversed(tokens):
        inner = f"{full}(?:{pattern})?" if pattern else full
        pattern = f"(?:{inner}|{partial})" if partial else f"(?:{inner})"
    return re.compile(f"(?:{pattern})?".encode())


def _header_pattern(tokens: list[tuple[str, str | None]]) -> re.Pattern[bytes]:
    return re.compile("".join(full for full, _ in tokens).encode())


# `[I][                            Init][ 136]: ` — the function right-aligned in 32 columns.
_AB_HEADER_TOKENS = [
    (r"\[", None), (r"[IWEND]", None), (r"\]", None), (r"\[", None), (r"[^\]\r\n]{0,100}", None),
    (r"\]", None), (r"\[", None), (r" {0,8}", None), (r"\d{1,6}", None), (r"\]", None),
    (r":", None), (r" ", None),
]
# `17:47:50.101 INF Init:448 | `
_C_HEADER_TOKENS = [
    (r"\d", None), (r"\d", None), (r":", None), (r"\d", None), (r"\d", None), (r":", None),
    (r"\d", None), (r"\d", None), (r"\.", None), (r"\d", None), (r"\d", None), (r"\d", None),
    (r" {1,8}", None),
    (r"(?:INF|WRN|ERR|NTC|DBG)", r"(?:I(?:N)?|W(?:R)?|E(?:R)?|N(?:T)?|D(?:B)?)"),
    (r" {1,8}", None), (r"\S{1,100}", None), (r":", None), (r"\d{1,9}", None), (r" {1,8}", None),
    (r"\|", None), (r" ", None),
]
_AB_PREFIX = _prefix_pattern(_AB_HEADER_TOKENS)
_AB_HEADER = _header_pattern(_AB_HEADER_TOKENS)
_C_PREFIX = _prefix_pattern(_C_HEADER_TOKENS)
_C_HEADER = _header_pattern(_C_HEADER_TOKENS)
_LOG_PATTERNS = {"ab": (_AB_HEADER, _AB_PREFIX), "c": (_C_HEADER, _C_PREFIX)}

_AB_LINE = re.compile(r"\[([IWEND])\]\[ *([^\]\r\n]{0,100}?) *\]\[ *(\d{1,6})\]:(?: (.*)|)",
                      re.ASCII | re.DOTALL)
_AB_HEADER_SEARCH = re.compile(r"\[[IWEND]\]\[[^\]\r\n]{0,100}\]\[ *\d{1,6}\]:", re.ASCII)
_C_LINE = re.compile(
    r"\d\d:\d\d:\d\d\.\d\d\d {1,8}(INF|WRN|ERR|NTC|DBG) {1,8}(\S{1,100}):(\d{1,9}) {1,8}\|(?: (.*)|)",
    re.ASCII | re.DOTALL)
_PROGRESS = re.compile(
    r"\s*(\d{1,3})%\s*\|[^|]*\|\s*(\d+)\s*/\s*(\d+)\s*(?:\[[^\]]*\])?\s*(.*?)\s*", re.DOTALL)
_PROGRESS_START = re.compile(rb"\s*\d{1,3}%\s*\|")
_BOS_EOS = re.compile(r"\s*bos_id\s*:\s*(-?\d+)\s*,\s*eos_id\s*:\s*(-?\d+)\s*", re.ASCII)
_UID = re.compile(r"uid\s*:\s*(\S+)")
_TTFT = re.compile(r"ttft\s*:\s*([0-9.]+)\s*ms", re.ASCII)
_HIT_EOS = re.compile(r"hit eos(?:\s*,\s*avg\s*([0-9.]+))?", re.ASCII)
_KV_CACHE = re.compile(r"precompute_len\s*:\s*(\d+)\s*,\s*remaining\s*:\s*(-?\d+)", re.ASCII)
_CONTEXT_USED = re.compile(r"precompute_len\s*:\s*(\d+)\s*", re.ASCII)
_INPUT_TOKENS = re.compile(r"(?:input token num\s*:|input_num_token\s*:)\s*(\d+)", re.ASCII)
_BANNER_CONTINUATION = re.compile(r'Ctrl\+c |"\w+" to ')
_ERROR_KINDS = [
    ("context_overflow", re.compile(
        r"precompute_len\(\d+\)\s*\+\s*input_num_token\(\d+\)\s*>"
        r"|input_num_token\(\d+\)\s*>\s*_attr\.prefill_max_token_num")),
    ("prompt_too_long", re.compile(r"input_ids\(\d+\)\s*>\s*prefill_token_num\(\d+\)")),
    ("tokenizer_connect", re.compile(r"\bconnect\s+\S+\s+failed")),
    ("device", re.compile(r"(?:Set|Get) AXCL device failed")),
    ("init_failed", re.compile(
        r"lLaMa\.Init failed|init axmodel\b.*failed|embed_selector\.Init\b.*failed"
        r"|AXCLWorker initialization timeout")),
]


_REMAIN_CMM = re.compile(r"remain_cmm\(\s*(\d+)\s*MB\s*\)", re.ASCII)


def remain_cmm_mb(message: str) -> int | None:
    """The card memory (CMM) left, from a load step's message such as
    `init 3 axmodel ok,remain_cmm(5000 MB)`; None when the message has no figure."""
    match = _REMAIN_CMM.search(message)
    return int(match.group(1)) if match else None


def claimed_cmm_mb(figures: list[int]) -> int | None:
    """The card memory a load claimed, from the remain_cmm figures it printed, in order.

    The runner prints what remains after each layer and after the post model, nothing before
    the first layer. Its layers are of one size, so what was free before the load is the first
    figure plus one layer's share (the step from the first figure to the second). None with
    fewer than two figures or no decrease: nothing to tell."""
    if len(figures) < 2:
        return None
    first, second, last = figures[0], figures[1], figures[-1]
    claimed = (first - last) + max(0, first - second)
    return claimed if claimed > 0 else None


def _float(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:  # "1.2.3" passes the character class but is not a number
        return 0.0


def parse_log_line(text: str) -> tuple[LogLine, str] | None:
    """A complete log line (no newline) as a LogLine and its dialect family ("ab" or "c")."""
    match = _AB_LINE.fullmatch(text)
    if match:
        level, function, line, message = match.groups()
        return LogLine(level, function.strip(), int(line), message or ""), "ab"
    match = _C_LINE.fullmatch(text)
    if match:
        level, function, line, message = match.groups()
        return LogLine(C_LEVELS[level], function, int(line), message or ""), "c"
    return None


def runner_error_kind(message: str) -> str | None:
    """The kind of a known failure message, or None."""
    for kind, pattern in _ERROR_KINDS:
        if pattern.search(message):
            return kind
    return None


# ---------------------------------------------------------------------------------------------
# The parser

_ESC = 0x1B
_NORMAL, _AFTER_ESC, _IN_CSI = range(3)
_MAX_CSI_BYTES = 32
# A whole CSI sequence as the byte-wise reader below accepts it. Every log line carries two, and
# reading them whole takes the parsing of a log chunk from ~0.25 to ~0.1 µs a byte: such a
# chunk comes right before a turn's first text. A sequence split across reads, or one the
# pattern does not take, goes through the byte-wise reader.
_WHOLE_CSI = re.compile(rb"\x1b\[([\x20-\x3f]{0,%d})([\x40-\x7e])" % _MAX_CSI_BYTES)


class RunnerOutputParser:
    def __init__(self, dialect: str | None = None) -> None:
        if dialect == "auto":
            dialect = None
        if dialect is not None and dialect not in DIALECTS:
            raise ValueError(f"unknown runner dialect {dialect!r}: expected one of {tuple(DIALECTS)} or None")
        self._dialect = dialect
        # Given, or settled by the first turn: from then on lines cannot change it (a model's
        # answer may hold another generation's log line).
        self._dialect_given = dialect is not None
        self._events: list[Event] = []
        # ANSI layer
        self._escape_state = _NORMAL
        self._csi = bytearray()
        self._escape = bytearray()  # the raw bytes of the escape sequence being read
        # outside a turn: the line being collected, and a banner waiting for its last line
        self._line = bytearray()
        self._banner_pending: bool | None = None  # None: no banner; else its supports_reset
        # inside a turn
        self._turn_open = False
        self._held_newlines = 0
        self._at_line_start = False
        self._candidate = bytearray()  # a line start that may still be a log line, escapes removed
        self._candidate_raw = bytearray()  # the same bytes as they came, escapes kept: text if not a log line
        self._candidate_is_log = False  # the candidate holds a complete log-line header
        # The candidate was opened by a colour start. Inside a turn an A/B log line must be: the
        # runner colours every one, so a model's text that merely looks like one stays text.
        self._coloured = False
        # The turn's text has begun: from then on the runner prints no log line but its end
        # (`hit eos`), so any other "log line" is the model's text.
        self._text_seen = False
        # A vision runner's second marker, expected at the start of the turn, and its bytes seen so far.
        self._image_marker: bytes | None = None
        self._image_marker_seen = 0
        # Lines the runner prints after it, before its log lines: the frames of a directory,
        # one path a line, each starting with this prefix (the directory's path and "/").
        self._frame_prefix: bytes | None = None
        self._frame_line = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def dialect(self) -> str | None:
        return self._dialect

    @property
    def turn_open(self) -> bool:
        return self._turn_open

    def feed(self, data: bytes) -> list[Event]:
        self._strip_ansi(data)
        return self._take_events()

    def begin_turn(self, image_marker: bytes | None = None, frame_prefix: bytes | None = None) -> None:
        """The daemon wrote a prompt line: from now until TurnEnd, non-log bytes are answer text.
        `image_marker`: a vision runner's second marker, which comes first (an ImageMarker event);
        `frame_prefix`: the runner then lists the frames of this directory, one a line (dropped)."""
        if self._turn_open:
            return
        self._image_marker = image_marker
        self._image_marker_seen = 0
        self._frame_prefix = frame_prefix if image_marker is not None else None
        self._frame_line.clear()
        if self._line:  # not expected after a marker; keep it rather than mix it into the answer
            self._complete_line(self._take_line())
        self._flush_banner()
        self._dialect_given = self._dialect_given or self._dialect is not None
        self._turn_open = True
        self._held_newlines = 0
        self._at_line_start = True
        self._candidate.clear()
        self._candidate_raw.clear()
        self._candidate_is_log = False
        self._coloured = False
        self._text_seen = False
        self._decoder.reset()

    def end_of_stream(self) -> list[Event]:
        """The process exited: flush whatever is held. An open turn stays open (no TurnEnd came)."""
        self._escape_state = _NORMAL
        if self._turn_open:
            if self._escape:
                self._turn_escape(bytes(self._escape), colour=False, reset=False)
                self._escape.clear()
            if self._candidate_raw and not self._finish_candidate_as_log():
                self._release_held()
            self._release(b"\n" * self._held_newlines)
            self._held_newlines = 0
            self._flush_decoder()
        elif self._line:
            self._complete_line(self._take_line())
        self._flush_banner()
        return self._take_events()

    # -- layer 1: ANSI ---------------------------------------------------------------------------

    def _strip_ansi(self, data: bytes) -> None:
        index, size = 0, len(data)
        while index < size:
            if self._escape_state == _NORMAL:
                esc = data.find(b"\x1b", index)
                if esc < 0:
                    self._plain(data[index:])
                    return
                if esc > index:
                    self._plain(data[index:esc])
                whole = _WHOLE_CSI.match(data, esc)
                if whole is not None:
                    params, final = whole.group(1, 2)
                    self._escape[:] = whole.group(0)
                    self._csi[:] = params
                    colour = final == b"m"
                    self._escape_done(colour=colour, reset=colour and params in (b"", b"0"))
                    index = whole.end()
                    continue
                self._escape_state = _AFTER_ESC
                self._escape[:] = b"\x1b"
                index = esc + 1
                continue
            byte = data[index]
            if self._escape_state == _AFTER_ESC:
                if byte == 0x5B:  # "["
                    self._escape_state = _IN_CSI
                    self._csi.clear()
                    self._escape.append(byte)
                    index += 1
                elif 0x40 <= byte <= 0x5F:  # a two-byte escape
                    self._escape.append(byte)
                    self._escape_done(colour=False, reset=False)
                    index += 1
                else:  # a lone ESC; the byte is read again as plain
                    self._escape_done(colour=False, reset=False)
            elif 0x20 <= byte <= 0x3F and len(self._csi) < _MAX_CSI_BYTES:
                self._csi.append(byte)
                self._escape.append(byte)
                index += 1
            elif 0x40 <= byte <= 0x7E:
                self._escape.append(byte)
                index += 1
                colour = byte == 0x6D  # "m": a colour change
                self._escape_done(colour=colour, reset=colour and self._csi in (b"", b"0"))
            else:  # malformed sequence; the byte is read again as plain
                self._escape_done(colour=False, reset=False)

    def _escape_done(self, colour: bool, reset: bool) -> None:
        """An escape sequence ended: a signal outside a turn (colours only), text or signal inside."""
        self._escape_state = _NORMAL
        raw = bytes(self._escape)
        self._escape.clear()
        if self._turn_open:
            self._turn_escape(raw, colour, reset)
        elif colour:
            self._colour(reset)

    def _turn_escape(self, raw: bytes, colour: bool, reset: bool) -> None:
        if colour and not reset and not self._candidate_is_log:
            # A colour start opens a log line, wherever the text stands.
            if self._candidate_raw:
                self._release_held()
            self._at_line_start = True
            self._coloured = True
            self._candidate_raw += raw
        elif self._candidate_raw or self._at_line_start:
            self._candidate_raw += raw  # part of the line being held: a log line's, or text's
        else:
            self._release(raw)

    def _colour(self, reset: bool) -> None:
        """A colour change outside a turn."""
        if reset:
            # The load bar ends with a reset and no newline: it is complete now.
            if _PROGRESS_START.match(self._line):
                self._complete_line(self._take_line())
        elif self._line and not _PROGRESS_START.match(self._line):
            # A coloured log line starts on the same physical line as something else.
            self._complete_line(self._take_line())

    # -- layer 2: lines and turns ----------------------------------------------------------------

    def _plain(self, segment: bytes) -> None:
        position = 0
        while position < len(segment):
            if self._turn_open and self._image_marker is not None:
                position = self._image_marker_bytes(segment, position)
            elif self._turn_open and self._frame_prefix is not None:
                position = self._frame_bytes(segment, position)
            elif self._turn_open:
                position = self._turn_bytes(segment, position)
            else:
                position = self._outside_bytes(segment, position)

    def _outside_bytes(self, segment: bytes, position: int) -> int:
        newline = segment.find(b"\n", position)
        carriage = segment.find(b"\r", position, newline if newline >= 0 else len(segment))
        end = carriage if carriage >= 0 else (newline if newline >= 0 else len(segment))
        if len(self._line) < len(MARKERS[0]):
            held = len(self._line)
            head = bytes(self._line) + segment[position:min(end, position + len(MARKERS[0]))]
            for marker in MARKERS:
                if held < len(marker) and head.startswith(marker):
                    self._line.clear()
                    self._on_marker(marker)
                    return position + len(marker) - held
        self._line += segment[position:end]
        while len(self._line) > MAX_LINE_BYTES:
            self._complete_line(bytes(self._line[:MAX_LINE_BYTES]))
            del self._line[:MAX_LINE_BYTES]
        if end < len(segment):
            self._complete_line(self._take_line())
            return end + 1
        return end

    def _take_line(self) -> bytes:
        line = bytes(self._line)
        self._line.clear()
        return line

    def _on_marker(self, marker: bytes) -> None:
        if not self._dialect_given:
            candidates = [d.name for d in dialects_with_marker(marker)]
            if self._dialect not in candidates:  # keep what earlier lines showed, if the marker agrees
                self._dialect = candidates[0]
        self._emit(Marker(marker.decode()))

    def _image_marker_bytes(self, segment: bytes, position: int) -> int:
        """The turn's first bytes, while they may still be the second marker."""
        marker = self._image_marker
        assert marker is not None
        seen = self._image_marker_seen
        take = segment[position:position + len(marker) - seen]
        if marker[seen:seen + len(take)] == take:
            self._image_marker_seen += len(take)
            if self._image_marker_seen == len(marker):
                self._image_marker = None
                self._emit(ImageMarker(marker.decode()))
            return position + len(take)
        # Not the marker after all: what was held is the turn's output.
        self._image_marker = None
        if seen:
            self._turn_bytes(marker[:seen], 0)
        return position

    def _frame_bytes(self, segment: bytes, position: int) -> int:
        """After the image marker: lines naming the frames of the directory given are dropped."""
        prefix = self._frame_prefix
        assert prefix is not None
        newline = segment.find(b"\n", position)
        end = newline if newline >= 0 else len(segment)
        self._frame_line += segment[position:end]
        line = bytes(self._frame_line)
        if not (line.startswith(prefix) or prefix.startswith(line)) or (newline >= 0 and not line.startswith(prefix)):
            self._frame_prefix = None  # not a frame line: the turn's output goes on as usual
            self._frame_line.clear()
            self._turn_bytes(line, 0)
            return end
        if newline < 0:
            return end
        self._frame_line.clear()
        self._emit(FrameLine(line.decode("utf-8", errors="replace")))
        return newline + 1

    def _turn_bytes(self, segment: bytes, position: int) -> int:
        newline = segment.find(b"\n", position)
        end = newline if newline >= 0 else len(segment)
        if not (self._at_line_start or self._candidate_raw):
            self._release(segment[position:end])
            if newline >= 0:
                self._held_newlines = 1
                self._at_line_start = True
                self._coloured = False
                return newline + 1
            return end
        if end > position:
            self._candidate += segment[position:end]
            self._candidate_raw += segment[position:end]
            if not self._candidate_is_log:
                if self._header_pattern_matches():
                    self._candidate_is_log = True
                elif not self._prefix_pattern_matches():
                    self._release_held()
        if newline < 0:
            return end
        if self._candidate_raw:
            if self._finish_candidate_as_log():
                return newline + 1
            self._release_held()
        self._held_newlines += 1
        self._at_line_start = True
        self._coloured = False
        return newline + 1

    def _styles(self) -> tuple[str, ...]:
        """The log styles the held candidate may be: inside a turn, an A/B line only if coloured."""
        styles = ("ab", "c") if self._dialect is None else (DIALECTS[self._dialect].log_style,)
        if self._turn_open and not self._coloured:
            styles = tuple(style for style in styles if style != "ab")
        return styles

    def _patterns(self) -> tuple[tuple[re.Pattern[bytes], re.Pattern[bytes]], ...]:
        return tuple(_LOG_PATTERNS[style] for style in self._styles())

    def _header_pattern_matches(self) -> bool:
        return any(header.match(self._candidate) for header, _ in self._patterns())

    def _prefix_pattern_matches(self) -> bool:
        return any(prefix.fullmatch(self._candidate) for _, prefix in self._patterns())

    def _release(self, data: bytes) -> None:
        if data:
            text = self._decoder.decode(data)
            if text:
                self._text_seen = self._text_seen or bool(text.strip())
                self._emit(Text(text))

    def _release_held(self) -> None:
        """The held line start is answer text after all."""
        self._release(b"\n" * self._held_newlines + bytes(self._candidate_raw))
        self._held_newlines = 0
        self._candidate.clear()
        self._candidate_raw.clear()
        self._candidate_is_log = False
        self._at_line_start = False
        self._coloured = False

    def _flush_decoder(self) -> None:
        text = self._decoder.decode(b"", final=True)
        if text:
            self._emit(Text(text))
        self._decoder.reset()

    def _finish_candidate_as_log(self) -> bool:
        """Emit the held candidate as a log line if it is one; False leaves it untouched."""
        parsed = parse_log_line(self._candidate.decode("utf-8", errors="replace"))
        if parsed is None or parsed[1] not in self._styles():
            return False
        if self._text_seen and _HIT_EOS.match(parsed[0].message) is None:
            return False  # in the middle of the answer: the model's text, however it looks
        log, family = parsed
        self._candidate.clear()
        self._candidate_raw.clear()
        self._candidate_is_log = False
        self._at_line_start = True
        self._coloured = False
        newlines = self._held_newlines
        self._held_newlines = 0
        ends_turn = _HIT_EOS.match(log.message) is not None
        if ends_turn:
            newlines -= min(2, newlines)  # the runner's "\n\n" before hit eos
        self._release(b"\n" * newlines)
        self._flush_decoder()  # text never continues across a log line
        if self._log_events(log, family) in TURN_ABORTING_ERRORS or ends_turn:
            self._turn_open = False
        return True

    # -- classification --------------------------------------------------------------------------

    def _complete_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            return
        parsed = parse_log_line(text)
        if parsed is not None:
            self._log_events(*parsed)
            return
        progress = _PROGRESS.fullmatch(text)
        if progress:
            percent, step, total, message = progress.groups()
            following_log = _AB_HEADER_SEARCH.search(message)
            if following_log:  # an uncoloured log line written right after the bar
                message, text = message[:following_log.start()].rstrip(), message[following_log.start():]
            self._emit(Progress(int(percent), int(step), int(total), message))
            if following_log:
                self._complete_line(text.encode())
            return
        if text.startswith('Type "q" to exit'):
            self._flush_banner()
            self._banner_pending = '"reset"' in text
            return
        if self._banner_pending is not None and _BANNER_CONTINUATION.match(text):
            self._banner_pending = self._banner_pending or '"reset"' in text
            return
        bos_eos = _BOS_EOS.fullmatch(text)
        if bos_eos:
            self._emit(BosEos(int(bos_eos.group(1)), int(bos_eos.group(2))))
            return
        if not self._dialect_given and (hinted := dialect_of_startup_line(text)) is not None:
            self._dialect = hinted.name
        self._emit(PlainLine(text))
        kind = runner_error_kind(text)
        if kind:
            self._emit(RunnerError(kind, text))

    def _log_events(self, log: LogLine, family: str) -> str | None:
        """Emit a log line and what it means; returns the RunnerError kind, if any."""
        if not self._dialect_given:
            if (styled := dialect_of_log_style(family)) is not None:
                self._dialect = styled.name
            elif self._dialect is None and log.message == "LLM init ok":
                self._dialect = "b"  # an A runner would have printed its build time first
        self._emit(log)
        message = log.message
        kind = runner_error_kind(message)
        if kind is None and log.level == "E":
            kind = "other"
        if kind:
            self._emit(RunnerError(kind, message))
            return kind
        if message.strip() == "LLM init ok":
            self._emit(InitOk())
        elif match := _HIT_EOS.match(message):
            self._emit(TurnEnd(_float(match.group(1))))
        elif match := _TTFT.match(message):
            self._emit(Ttft(_float(match.group(1))))
        elif match := _KV_CACHE.search(message):
            self._emit(KvCache(int(match.group(1)), int(match.group(2))))
        elif match := _CONTEXT_USED.fullmatch(message):
            self._emit(ContextUsed(int(match.group(1))))
        elif match := _UID.match(message):
            if not self._dialect_given and self._dialect is None:
                self._dialect = "b"
            self._emit(Uid(match.group(1)))
        elif (match := _BOS_EOS.fullmatch(message)):
            self._emit(BosEos(int(match.group(1)), int(match.group(2))))
        elif self._turn_open and (match := _INPUT_TOKENS.match(message)):
            self._emit(InputTokens(int(match.group(1))))
        return None

    # -- output ----------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self._banner_pending is not None:
            self._flush_banner()
        self._events.append(event)

    def _flush_banner(self) -> None:
        if self._banner_pending is not None:
            supports_reset = self._banner_pending
            self._banner_pending = None
            self._events.append(Banner(supports_reset))

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events
