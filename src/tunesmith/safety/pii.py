"""Find personal data and secrets in text, and replace them with typed placeholders.

Categories (placeholder): email (<EMAIL>), phone (<PHONE>), payment_card (<CARD_NUMBER>), iban (<IBAN>),
national_id (<NATIONAL_ID>), ip_address (<IP_ADDRESS>), secret (<SECRET>).

What does the work, and why:
- phone numbers: ``phonenumbers`` (Google's libphonenumber) with leniency STRICT_GROUPING. A hand
  regex for phones either misses most formats or flags dates; VALID leniency still took "3.10.2004"
  for a US number, STRICT_GROUPING does not (checked on examples/iso_dates).
- checksums: ``python-stdnum`` validates IBANs (ISO 13616 mod-97 plus each country's length), Luhn,
  US SSNs (area/group/serial rules and known invalid numbers), Aadhaar (Verhoeff), CPF and DNI.
  Candidates are found by regex; only numbers that pass their check are reported.
- secrets: the vendor patterns of Yelp's ``detect-secrets`` (AWS, GitHub, GitLab, Slack, Stripe,
  Twilio, SendGrid, JWT, ...), run through ``re.finditer`` for character spans. Its entropy and keyword
  plugins are tuned for source files and flag ordinary words in prose, so they are not used; instead
  we add modern ``sk-`` API keys, fine-grained GitHub tokens, whole PEM private-key blocks and a
  ``key=value`` rule that needs a high-entropy value.
- Microsoft Presidio was not used: its recognisers need a spaCy language model, which is a download
  from outside the package registries, and its regex recognisers add nothing to the above.
Emails and IP addresses are regexes, with IPs validated by ``ipaddress``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

CATEGORIES = ("email", "phone", "payment_card", "iban", "national_id", "ip_address", "secret")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "payment_card": "<CARD_NUMBER>", "iban": "<IBAN>",
                "national_id": "<NATIONAL_ID>", "ip_address": "<IP_ADDRESS>", "secret": "<SECRET>"}


@dataclass(frozen=True)
class Finding:
    """One match: ``text[start:end]`` is personal data of ``category`` (``kind`` says which sort)."""

    category: str
    kind: str
    start: int
    end: int
    value: str

    def masked(self) -> str:
        """The value with its middle hidden, for reports (a report must not leak what it found)."""
        return mask(self.value)


def mask(value: str) -> str:
    v = " ".join(value.split())
    if len(v) <= 6:
        return "*" * len(v)
    keep = 2 if len(v) < 16 else 4
    return f"{v[:keep]}{'*' * min(8, len(v) - 2 * keep)}{v[-2:]}"


# ---------------------------------------------------------------- the detectors


EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                   r"[A-Za-z]{2,24}(?![\w-])")
CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)\b")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\w)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
DATE_LIKE = re.compile(r"^\d{1,4}([./-])\d{1,2}\1\d{1,4}$")
NATIONAL_IDS = (  # (kind, candidate pattern, validator module under stdnum)
    ("US SSN", re.compile(r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])"), "us.ssn"),
    ("India Aadhaar", re.compile(r"(?<!\d)(?<!\d )\d{4} \d{4} \d{4}(?! ?\d)"), "in_.aadhaar"),
    ("Brazil CPF", re.compile(r"(?<![\d.])\d{3}\.\d{3}\.\d{3}-\d{2}(?!\d)"), "br.cpf"),
    ("Spain DNI", re.compile(r"\b\d{8}-?[A-Z]\b"), "es.dni"),
    ("UK National Insurance", re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                                         r" ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"), None),
)
SECRETS_EXTRA = (  # (kind, pattern, group holding the secret)
    ("PEM private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?"
                                   r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S), 0),
    ("API key (sk-)", re.compile(r"(?<![\w-])sk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{32,}"), 0),
    ("GitHub fine-grained token", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}"), 0),
    ("Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), 0),
    ("key=value secret", re.compile(
        r"(?i)\b(?:api[_-]?key|apikey|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?(?:key|token)|auth[_-]?token|"
        r"token|password|passwd|pwd)\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_\-+/.=]{16,})"), 1),
)
# detect-secrets plugins left out: IPs are our own category; the rest are not regex plugins.
_DS_SKIP = {"IPPublicDetector"}
CARD_PREFIXES = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3[0689]|6(?:011|5|4[4-9]|2))")


def shannon_entropy(s: str) -> float:
    """Bits per character of ``s``'s own character distribution."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _high_entropy(value: str) -> bool:
    # Real keys mix letters and digits and look random; "password = correct-horse-battery" does not.
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value) and shannon_entropy(value) >= 3.0


@lru_cache(maxsize=1)
def _detect_secrets_patterns() -> tuple[tuple[str, re.Pattern], ...]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins.base import RegexBasedDetector

    out = []
    for kind, cls in get_mapping_from_secret_type_to_class().items():
        if issubclass(cls, RegexBasedDetector) and cls.__name__ not in _DS_SKIP:
            out += [(kind, rx) for rx in cls().denylist]
    return tuple(out)


@lru_cache(maxsize=64)
def _stdnum(name: str):
    import importlib

    return importlib.import_module(f"stdnum.{name}")


def _secret_span(m: re.Match) -> tuple[int, int]:
    # detect-secrets patterns put the secret in group 1 when it follows a label ("aws_key = '...'"),
    # but some use group 1 for a short prefix ("(ghp|gho)_..."): take group 1 only when it is long.
    if m.lastindex and m.group(1) and len(m.group(1)) >= 8:
        return m.span(1)
    return m.span(0)


def _emails(text):
    for m in EMAIL.finditer(text):
        yield Finding("email", "e-mail address", m.start(), m.end(), m.group())


def _phones(text, regions):
    if not any(c.isdigit() for c in text):
        return  # no digits, no phone number: skip libphonenumber's matcher
    from phonenumbers import Leniency, PhoneNumberMatcher

    seen = set()
    for region in regions:
        for m in PhoneNumberMatcher(text, region, leniency=Leniency.STRICT_GROUPING):
            if (m.start, m.end) in seen or DATE_LIKE.match(m.raw_string):
                continue
            seen.add((m.start, m.end))
            yield Finding("phone", f"phone number ({region})" if not m.raw_string.startswith("+") else "phone number",
                          m.start, m.end, m.raw_string)


def _cards(text):
    luhn = _stdnum("luhn")
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and CARD_PREFIXES.match(digits) and luhn.is_valid(digits):
            yield Finding("payment_card", "payment card number", m.start(), m.end(), m.group())


def _ibans(text):
    iban = _stdnum("iban")
    for m in IBAN.finditer(text):
        candidate = m.group()
        # A spaced IBAN may have swallowed a following group of capitals: drop groups until it checks.
        while len(candidate.replace(" ", "")) >= 15:
            if iban.is_valid(candidate):
                yield Finding("iban", "IBAN", m.start(), m.start() + len(candidate), candidate)
                break
            if " " not in candidate:
                break
            candidate = candidate.rsplit(" ", 1)[0]


def _national_ids(text):
    for kind, rx, validator in NATIONAL_IDS:
        for m in rx.finditer(text):
            if validator is None or _stdnum(validator).is_valid(m.group()):
                yield Finding("national_id", kind, m.start(), m.end(), m.group())


def _ips(text):
    for rx, kind in ((IPV4, "IPv4 address"), (IPV6, "IPv6 address")):
        for m in rx.finditer(text):
            s = m.group()
            if len(s) < 3 or s.strip(":") == "":
                continue
            try:
                ipaddress.ip_address(s)
            except ValueError:
                continue
            yield Finding("ip_address", kind, m.start(), m.end(), s)


def _secrets(text):
    for kind, rx in _detect_secrets_patterns():
        for m in rx.finditer(text):
            a, b = _secret_span(m)
            yield Finding("secret", kind, a, b, text[a:b])
    for kind, rx, group in SECRETS_EXTRA:
        for m in rx.finditer(text):
            if group and not _high_entropy(m.group(group)):
                continue
            a, b = m.span(group)
            yield Finding("secret", kind, a, b, text[a:b])


# The finder of each category, in priority order: when two findings overlap, the earlier category names the span.
_FINDERS = {"secret": _secrets, "payment_card": _cards, "iban": _ibans, "national_id": _national_ids,
            "email": _emails, "ip_address": _ips, "phone": _phones}
_PRIORITY = {c: i for i, c in enumerate(_FINDERS)}


def find_pii(text: str, categories: tuple[str, ...] | list[str] = CATEGORIES,
             phone_regions: tuple[str, ...] | list[str] = ("US",)) -> list[Finding]:
    """Every finding in ``text``, in order, overlaps merged (the higher-priority category names the span)."""
    found: list[Finding] = []
    wanted = set(categories)
    for category, finder in _FINDERS.items():
        if category in wanted:
            found += finder(text, phone_regions) if category == "phone" else finder(text)
    return _merge(found, text)


def _merge(found: list[Finding], text: str) -> list[Finding]:
    out: list[Finding] = []
    for f in sorted(found, key=lambda f: (f.start, _PRIORITY[f.category], -f.end)):
        if out and f.start < out[-1].end:
            last = out[-1]
            keep = last if _PRIORITY[last.category] <= _PRIORITY[f.category] else f
            end = max(last.end, f.end)
            out[-1] = Finding(keep.category, keep.kind, last.start, end, text[last.start:end])
        else:
            out.append(f)
    return out


def redact(text: str, findings: list[Finding] | None = None, **kw) -> str:
    """``text`` with every finding replaced by its category's placeholder (findings from find_pii)."""
    findings = find_pii(text, **kw) if findings is None else findings
    parts, pos = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        parts += [text[pos:f.start], PLACEHOLDERS[f.category]]
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)
