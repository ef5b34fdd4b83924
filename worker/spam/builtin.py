"""The in-process classifier: no service, a fraction of a millisecond a message.

It runs on the event loop for every message, so it reads only the header
section and the first ``BODY_LIMIT`` bytes of the body, walks at most
``MAX_PARTS`` MIME parts ``MAX_DEPTH`` deep, and every pattern in it is linear
in that input. (The stdlib ``email`` parser is not used for the body: nested
multiparts make it quadratic, and deep enough ones raise RecursionError.)

GTUBE is certain; the other signals are weighted and a message is spam when
their sum reaches ``THRESHOLD``. No single weak signal reaches it alone: a
false positive costs the customer a grace slot.

Missing Date or Message-ID is not a signal: the gateway adds those headers
for clients that leave them out.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from html import unescape
from itertools import islice

from worker.headers import header_end
from worker.spam import ScanRequest, ScanResult

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
THRESHOLD = 5.0
HEADER_LIMIT = 64 * 1024
BODY_LIMIT = 64 * 1024
MAX_PARTS = 64
MAX_DEPTH = 8
# RFC 2047 decoding and the address pattern cost more than linear time on
# long hostile values; real subjects and display names are far shorter.
_DECODE_LIMIT = 1024
_NAME_LIMIT = 256
# Matches of one pattern looked at; a hostile body can hold thousands.
_MATCHES_LIMIT = 100

WEIGHTS: dict[str, float] = {
    "GTUBE": 1000.0,
    "SUBJECT_ALL_CAPS": 1.5,
    "SUBJECT_EXCLAIM": 1.0,
    "BODY_EXCLAIM": 1.0,
    "SPAM_PHRASES": 1.5,  # per distinct phrase, up to MAX_PHRASES of them
    "RAW_IP_URL": 1.5,
    "BODY_ONLY_IP_URL": 3.0,
    "FROM_NAME_OTHER_ADDR": 2.5,
    "HTML_ONLY": 0.5,
    "HTML_HIDDEN_TEXT": 2.5,  # in an HTML-only message
    "MANY_VISIBLE_RCPTS": 1.0,  # 20 or more addresses in To/Cc; doubled at 50
}
MAX_PHRASES = 4

# Lower case, whitespace collapsed; matched as substrings of the same
# normalised subject and text, so a phrase split by a line wrap still counts.
PHRASES = (
    "you have won",
    "you've won",
    "claim your prize",
    "lottery winner",
    "act now",
    "limited time offer",
    "100% free",
    "risk-free",
    "no credit check",
    "make money fast",
    "earn extra cash",
    "double your income",
    "work from home",
    "million dollars",
    "wire the funds",
    "verify your account",
    "account will be suspended",
    "viagra",
    "cialis",
    "casino bonus",
    "wygrałeś",
    "wygrałaś",
    "odbierz nagrodę",
    "darmowe pieniądze",
    "pożyczka bez bik",
    "zarabiaj w domu",
    "zweryfikuj swoje konto",
    "konto zostanie zablokowane",
)

_PARAM = re.compile(r';\s*([\w.-]+)\s*=\s*(?:"([^"]*)"|([^;\s]*))')
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_IP_URL = re.compile(
    r"https?://(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?[^\s\"'<>]*"
)
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Tags cannot span another "<", which keeps the scan linear on broken HTML.
_ANY_TAG = re.compile(r"<[^<>]*>")
_HIDING_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden"
    r"|font-size\s*:\s*(?:0+(?:\.0*)?|\.0+)(?:px|pt|em|rem|%)?\s*(?:;|\"|'|$)",
    re.IGNORECASE,
)
_HIDDEN_TEXT_MIN = 20
_TAG_LOOKBACK = 2048
_CAPS_SUBJECT_MIN = 10


class BuiltinScanner:
    name = "builtin"

    def __init__(self, threshold: float = THRESHOLD) -> None:
        self.threshold = threshold

    async def scan(self, request: ScanRequest) -> ScanResult:
        return classify(request.message, self.threshold)

    async def close(self) -> None:
        """No resources."""


def classify(message: bytes, threshold: float = THRESHOLD) -> ScanResult:
    """Score ``message``; spam when the score reaches ``threshold``."""
    head_end, body_start = _header_end(message, HEADER_LIMIT)
    window = message[: body_start + BODY_LIMIT]
    headers = _headers(window[:head_end])
    texts = _Texts()
    _walk(headers, window[body_start:], 0, texts)
    plain, html = "\n".join(texts.plain), texts.html

    hits: list[str] = []
    score = 0.0

    def hit(symbol: str, weight: float | None = None) -> None:
        nonlocal score
        hits.append(symbol)
        score += WEIGHTS[symbol] if weight is None else weight

    # What a reader sees: the plain part when there is one, else the rendered HTML.
    visible = plain if plain.strip() else " ".join(_visible_text(part) for part in html)
    if GTUBE in window or any(GTUBE.decode() in text for text in (plain, *html)):
        hit("GTUBE")

    subject = _decode_words(headers.get("subject", [""])[0])
    capitals = sum(1 for char in subject if char.isupper())
    if capitals >= _CAPS_SUBJECT_MIN and subject.isupper():
        hit("SUBJECT_ALL_CAPS")
    if "!!" in subject or subject.count("!") >= 3:
        hit("SUBJECT_EXCLAIM")
    if visible.count("!!!") >= 3:
        hit("BODY_EXCLAIM")

    normalised = " ".join(f"{subject} {visible}".lower().split())
    phrases = sum(1 for phrase in PHRASES if phrase in normalised)
    if phrases:
        hit("SPAM_PHRASES", WEIGHTS["SPAM_PHRASES"] * min(phrases, MAX_PHRASES))

    urls = (match for text in (plain, *html) for match in _IP_URL.finditer(text))
    if any(_is_public_ip_url(match) for match in islice(urls, _MATCHES_LIMIT)):
        hit("RAW_IP_URL")
        if len(_IP_URL.sub(" ", visible).split()) <= 3:
            hit("BODY_ONLY_IP_URL")

    if _from_name_has_other_address(headers.get("from", [""])[0]):
        hit("FROM_NAME_OTHER_ADDR")

    if html and not plain.strip():
        hit("HTML_ONLY")
        # Only without a plain part: newsletters with both hide a preview line.
        if _has_hidden_text("\n".join(html)):
            hit("HTML_HIDDEN_TEXT")

    visible_rcpts = sum(
        value.count("@") for name in ("to", "cc") for value in headers.get(name, [])
    )
    if visible_rcpts >= 20:
        hit("MANY_VISIBLE_RCPTS", WEIGHTS["MANY_VISIBLE_RCPTS"] * (2 if visible_rcpts >= 50 else 1))

    return ScanResult(
        spam=score >= threshold, score=round(score, 2), symbols=tuple(hits), backend="builtin"
    )


def _headers(raw: bytes) -> dict[str, list[str]]:
    """Unfolded header values by lower-case name; 8-bit values read as UTF-8."""
    headers: dict[str, list[str]] = {}
    name = ""
    for line in raw.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t") and name:
            headers[name][-1] += " " + line.strip()
            continue
        field, sep, value = line.partition(":")
        if not sep:
            name = ""
            continue
        name = field.strip().lower()
        headers.setdefault(name, []).append(value.strip())
    return headers


def _decode_words(value: str) -> str:
    """An RFC 2047 header value as text; undecodable words are left as sent."""
    if "=?" not in value:
        return value
    value = value[:_DECODE_LIMIT]
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError):
        return value


@dataclass
class _Texts:
    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    parts: int = 0


def _header_end(entity: bytes, limit: int) -> tuple[int, int]:
    """Where the header section of ``entity`` ends and where its body starts."""
    bounds = header_end(entity, limit)
    if bounds is None:
        return min(len(entity), limit), len(entity)
    return bounds


def _walk(headers: dict[str, list[str]], body: bytes, depth: int, texts: _Texts) -> None:
    """Collect the decoded text parts of one MIME entity into ``texts``."""
    texts.parts += 1
    content_type = headers.get("content-type", ["text/plain"])[0]
    kind = content_type.partition(";")[0].strip().lower() or "text/plain"
    params = _params(content_type)
    if kind.startswith("multipart/"):
        boundary = params.get("boundary", "")
        if not boundary or depth >= MAX_DEPTH:
            return
        for part in _split_multipart(body, boundary.encode("utf-8", "replace")):
            if texts.parts >= MAX_PARTS:
                return
            head_end, body_start = _header_end(part, len(part))
            _walk(_headers(part[:head_end]), part[body_start:], depth + 1, texts)
        return
    disposition = headers.get("content-disposition", [""])[0].strip().lower()
    if not kind.startswith("text/") or disposition.startswith("attachment"):
        return
    encoding = headers.get("content-transfer-encoding", [""])[0].strip().lower()
    text = _decode_text(_decode_transfer(body, encoding), params.get("charset", "utf-8"))
    (texts.html if kind == "text/html" else texts.plain).append(text)


def _params(content_type: str) -> dict[str, str]:
    return {
        match[1].lower(): match[2] if match[2] is not None else match[3]
        for match in _PARAM.finditer(content_type)
    }


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts between ``--boundary`` lines, up to the closing delimiter."""
    data = b"\n" + body
    marker = b"\n--" + boundary
    parts: list[bytes] = []
    start = data.find(marker)
    while start >= 0 and len(parts) < MAX_PARTS:
        after = start + len(marker)
        if data.startswith(b"--", after):
            break
        line_end = data.find(b"\n", after)
        if line_end < 0:
            break
        start = data.find(marker, line_end)
        part = data[line_end + 1 : start if start >= 0 else len(data)]
        parts.append(part.removesuffix(b"\r"))
    return parts


def _decode_transfer(body: bytes, encoding: str) -> bytes:
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding == "base64":
        try:
            return binascii.a2b_base64(body)
        except binascii.Error:
            # Cut off mid-quantum (by BODY_LIMIT, say): decode what is whole.
            clean = _NOT_BASE64.sub(b"", body)
            return binascii.a2b_base64(clean[: len(clean) // 4 * 4])
    return body


def _decode_text(payload: bytes, charset: str) -> str:
    try:
        return payload.decode(charset.strip() or "utf-8", "replace")
    except (LookupError, ValueError, TypeError):  # unknown, or not a text codec
        return payload.decode("utf-8", "replace")


def _visible_text(html: str) -> str:
    """What a reader sees of ``html``: no tags, styles or scripts; entities decoded."""
    lower = html.lower()
    kept: list[str] = []
    position = 0
    while True:
        start = min(
            (
                found
                for found in (lower.find("<style", position), lower.find("<script", position))
                if found >= 0
            ),
            default=-1,
        )
        if start < 0:
            kept.append(html[position:])
            break
        kept.append(html[position:start])
        closing = "</style" if lower.startswith("<style", start) else "</script"
        stop = lower.find(closing, start)
        if stop < 0:
            break
        position = stop + len(closing)
    return unescape(_ANY_TAG.sub(" ", "".join(kept)))


def _has_hidden_text(html: str) -> bool:
    """Some words of text directly follow tags styled to be invisible."""
    total = 0
    for style in islice(_HIDING_STYLE.finditer(html), _MATCHES_LIMIT):
        # Inside a tag: the last "<" before it is not closed yet. Looking back
        # a bounded distance keeps style text outside tags from costing n².
        opened = html.rfind("<", max(0, style.start() - _TAG_LOOKBACK), style.start())
        if opened < 0 or html.find(">", opened, style.start()) >= 0:
            continue
        closed = html.find(">", style.end())
        if closed < 0:
            break
        following = html.find("<", closed)
        total += len(unescape(html[closed + 1 : following if following >= 0 else None]).strip())
        if total >= _HIDDEN_TEXT_MIN:
            return True
    return False


def _is_public_ip_url(match: re.Match[str]) -> bool:
    try:
        return ipaddress.ip_address(match.group(1).strip("[]")).is_global
    except ValueError:
        return False


def _from_name_has_other_address(value: str) -> bool:
    """The display name shows an address other than the real one (phishing)."""
    # Split by hand: parseaddr reads an unquoted address in the name as the address.
    name, bracket, rest = value.rpartition("<")
    if not bracket:
        return False
    address = rest.partition(">")[0].strip()
    name = _decode_words(name.strip().strip('"'))[:_NAME_LIMIT]
    if "@" not in name:
        return False
    return any(shown.lower() != address.lower() for shown in _ADDRESS.findall(name))
