"""The in-process classifier: no service, a fraction of a millisecond a message.

It runs on the event loop for every message, so it reads only the header
section and the first ``BODY_LIMIT`` bytes of the body, and every pattern in
it is linear in that input. GTUBE is certain; the other signals are weighted
and a message is spam when their sum reaches ``THRESHOLD``. No single weak
signal reaches it alone: a false positive costs the customer a grace slot.

Missing Date or Message-ID is not a signal: the gateway adds those headers
for clients that leave them out.
"""

from __future__ import annotations

import ipaddress
import re
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from html import unescape

from worker.spam import ScanRequest, ScanResult

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
THRESHOLD = 5.0
HEADER_LIMIT = 64 * 1024
BODY_LIMIT = 64 * 1024

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

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_IP_URL = re.compile(
    r"https?://(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?[^\s\"'<>]*"
)
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Tags cannot span another "<", which keeps the scan linear on broken HTML.
_TAG = re.compile(r"<[A-Za-z][^<>]*>")
_ANY_TAG = re.compile(r"<[^<>]*>")
_HIDING_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden"
    r"|font-size\s*:\s*(?:0+(?:\.0*)?|\.0+)(?:px|pt|em|rem|%)?\s*(?:;|\"|'|$)",
    re.IGNORECASE,
)
_HIDDEN_TEXT_MIN = 20
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
    end = _HEADER_END.search(message, 0, HEADER_LIMIT)
    head_end = end.start() if end else min(len(message), HEADER_LIMIT)
    window = message[: head_end + BODY_LIMIT]
    headers = _headers(window[:head_end])
    parsed = BytesParser(policy=compat32).parsebytes(window)
    plain, html = _text_parts(parsed)

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

    sources = [plain, *html]
    if any(_is_public_ip_url(match) for text in sources for match in _IP_URL.finditer(text)):
        hit("RAW_IP_URL")
        if len(_IP_URL.sub(" ", visible).split()) <= 3:
            hit("BODY_ONLY_IP_URL")

    if _from_name_has_other_address(headers.get("from", [""])[0]):
        hit("FROM_NAME_OTHER_ADDR")

    if html and not plain.strip():
        hit("HTML_ONLY")
        # Only without a plain part: newsletters with both hide a preview line.
        if sum(_hidden_text_length(part) for part in html) >= _HIDDEN_TEXT_MIN:
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
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError):
        return value


def _text_parts(message: Message) -> tuple[str, list[str]]:
    """Plain text joined, and each HTML part, decoded; attachments skipped."""
    plain: list[str] = []
    html: list[str] = []
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        # str(): compat32 hands back a Header object for an 8-bit value.
        if str(part.get("Content-Disposition", "")).strip().lower().startswith("attachment"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = payload.decode(charset, "replace")
        except LookupError:
            text = payload.decode("utf-8", "replace")
        if part.get_content_subtype() == "html":
            html.append(text)
        else:
            plain.append(text)
    return "\n".join(plain), html


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


def _hidden_text_length(html: str) -> int:
    """Characters of text that directly follow a tag styled to be invisible."""
    total = 0
    for tag in _TAG.finditer(html):
        if "style" in tag.group().lower() and _HIDING_STYLE.search(tag.group()):
            following = html.find("<", tag.end())
            text = html[tag.end() : following if following >= 0 else len(html)]
            total += len(unescape(text).strip())
    return total


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
    name = _decode_words(name.strip().strip('"'))
    return any(shown.lower() != address.lower() for shown in _ADDRESS.findall(name))
