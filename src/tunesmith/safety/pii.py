"""Find personal data and secrets in text, and replace them with typed placeholders.

Categories (placeholder): email (<EMAIL>), phone (<PHONE>), payment_card (<CARD_NUMBER>), iban (<IBAN>),
national_id (<NATIONAL_ID>), ip_address (<IP_ADDRESS>), secret (<SECRET>), person (<PERSON>), address
(<ADDRESS>), date_of_birth (<DATE_OF_BIRTH>).

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
- Microsoft Presidio's analyzer runs beside them (``_presidio_findings``): its checksum-validated recognisers for national IDs this module has no rule for (UK NHS, Indian PAN, Spanish
  NIE, Italian fiscal code, Australian TFN, ...), IBANs in any case, phone numbers with context words, and,
  when a spaCy model with NER is installed (``safety.pii_ner``), PERSON names. Presidio needs an NLP
  engine; without a spaCy model it gets a blank English tokenizer (no download, no NER) so its context
  words still work, and the screen says in its report that names are then found by patterns only.
  Its e-mail and URL recognisers are left out (they fetch a public-suffix list from the network).
- names, street addresses and birth dates without NER: patterns. A name after a title (Mr, Dr, ...), after
  "my name is", "patient", "Name:", or before a birth date; a house number, street name and street word
  (Street, Ave, Road, ...; "Hauptstraße 12"; "15 rue ...", not "Calle Mayor 5") with city and postcode; a date after "born", "DOB", "date of
  birth". A name alone is not personal data here: with NER, a PERSON counts only in a text that holds
  other personal data (a birth date, phone, address, ID...), so "Abraham Lincoln was born in 1809" passes.
- more secrets: Google API keys (``AIza...``), passwords with symbols after "password"/"pass is", and
  ``key=value`` pairs whose key only contains a secret word (``aws_secret_access_key``).
Emails and IP addresses are regexes, with IPs validated by ``ipaddress``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

CATEGORIES = ("email", "phone", "payment_card", "iban", "national_id", "ip_address", "secret", "person", "address",
              "date_of_birth")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "payment_card": "<CARD_NUMBER>", "iban": "<IBAN>",
                "national_id": "<NATIONAL_ID>", "ip_address": "<IP_ADDRESS>", "secret": "<SECRET>",
                "person": "<PERSON>", "address": "<ADDRESS>", "date_of_birth": "<DATE_OF_BIRTH>"}
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "AU", "CA", "BR")
log = logging.getLogger(__name__)


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
IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,3})?)\b")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\w)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
DATE_LIKE = re.compile(r"^\d{1,4}([./-])\d{1,2}\1\d{1,4}$")
NATIONAL_IDS = (  # (kind, candidate pattern, validator module under stdnum)
    ("US SSN", re.compile(r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])"), "us.ssn"),
    # nine digits in a row are an SSN only after the words that say so
    ("US SSN", re.compile(r"(?i)(?:\bssn|social security(?: number| no\.?)?)\b[^\d\n]{0,25}(?<![\d-])(\d{9})(?![\d-])"),
     "us.ssn"),
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
    ("Google API key", re.compile(r"(?<![\w-])AIza[0-9A-Za-z_\-]{35}(?![\w-])"), 0),
    ("Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), 0),
    ("key=value secret", re.compile(
        r"(?i)(?<![A-Za-z0-9])[\w.-]*(?:api[_-]?key|apikey|secret|access[_-]?(?:key|token)|auth[_-]?token|"
        r"token|password|passwd|pwd)[\w.-]*[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_\-+/.=]{16,})"), 1),
)
# A password after the word that names it; reported when it mixes three kinds of character (so "password =
# correct-horse-battery-staple" and placeholders like <PASSWORD> pass).
PASSWORD = re.compile(r"(?i)(?<![A-Za-z])(?:password|passwd|pwd|pass|passcode|passphrase)(?:\s+is|\s*[:=])\s*[\"'`]?"
                      r"([^\s\"'`<>]{6,64}?)[\"'`]?(?=[\s,;]|$|[.!?](?:\s|$))")
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
    if sum(c.isdigit() for c in text) < 7:
        return  # no phone number has fewer digits: skip libphonenumber's matcher
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
            if iban.is_valid(candidate.upper()):
                yield Finding("iban", "IBAN", m.start(), m.start() + len(candidate), candidate)
                break
            if " " not in candidate:
                break
            candidate = candidate.rsplit(" ", 1)[0]


def _national_ids(text):
    for kind, rx, validator in NATIONAL_IDS:
        for m in rx.finditer(text):
            g = 1 if m.lastindex else 0
            if validator is None or _stdnum(validator).is_valid(m.group(g).replace(" ", "")):
                yield Finding("national_id", kind, m.start(g), m.end(g), m.group(g))


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


def _password_like(value: str) -> bool:
    kinds = sum(bool(re.search(rx, value)) for rx in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return kinds >= 3 and not value.startswith("<")


def _secrets(text):
    for m in PASSWORD.finditer(text):
        if _password_like(m.group(1)):
            yield Finding("secret", "password", m.start(1), m.end(1), m.group(1))
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


# ---------------------------------------------------------------- names, addresses, birth dates (patterns)

_MONTH = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|" \
         r"nov(?:ember)?|dec(?:ember)?)"
DATE = (r"(?:\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})|\d{1,2}(?:st|nd|rd|th)?\s+" + _MONTH + r"\.?,?\s+\d{4}|"
        + _MONTH + r"\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4})")
BIRTH = re.compile(r"(?i)\b(?:born(?:\s+on)?|date\s+of\s+birth|d\.?\s?o\.?\s?b\.?|birth\s?date|birthday)\s*(?:is|was|:|-)?\s*"
                   r"[(:]?\s*(" + DATE + r")(?![\d/.-]\d)")
_NAME_WORD = r"[A-Z][a-z]+(?:['’-][A-Z]?[a-z]+)?"
_NAME = _NAME_WORD + r"(?:\s+(?:(?:de|van|von|der|den|da|di|del|la|le|bin|al)\s+)*(?:O['’])?" + _NAME_WORD + r"){0,2}"
PERSON_CUES = (
    re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame)\.?\s+(" + _NAME + r")"),
    re.compile(r"(?i:\bmy name is|\bi am called|\bname\s*:|\bpatient|\bemployee|\bclient|\bcontact|\bask for|"
               r"\bfrom|\bmy (?:son|daughter|wife|husband|mother|father|brother|sister|friend|colleague|partner))"
               r"\s*:?\s+(" + _NAME + r")"),
    re.compile(r"\b(" + _NAME_WORD + r"(?:\s+(?:O['’])?" + _NAME_WORD + r"){1,2})\s*[,(]\s*(?:born|DOB|D\.O\.B|date of birth"
               r"|aged?\s+\d)"),
)
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Dr|Court|Ct|Place|Pl|Terrace|Way|Close|"
           r"Crescent|Square|Sq|Parkway|Pkwy|Highway|Hwy|Row|Gardens|Grove|Mews|Hill|Walk)")
_UNIT = r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor)\.?\s*#?\w+)"
_CITY = r"(?:,\s*[A-Z][a-z]+(?:\s+[A-Z][a-z]+){0,2})"
_POST = r"(?:,?\s*(?:[A-Z]{2}\s+\d{5}(?:-\d{4})?|[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}|\d{5}\s+[A-Z][a-zäöüéè]+))"
ADDRESSES = (
    re.compile(r"\b\d{1,5}[A-Za-z]?\s+(?:[A-Z][a-z]+\.?\s+){1,3}" + _STREET + r"\b\.?(?:\s+(?:NW|NE|SW|SE))?"
               + _UNIT + r"?" + _CITY + r"?" + _POST + r"?"),
    re.compile(r"\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|platz|allee|damm)\s+\d{1,4}[a-z]?"
               r"(?:,\s*\d{4,5}\s+[A-ZÄÖÜ][a-zäöüß]+)?"),
    re.compile(r"(?i:\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|boulevard|bd|place|chemin|allée|impasse|quai|calle|"
               r"avenida|plaza|via|viale|piazza|corso)\s+(?:(?:de|du|des|la|le|l'|del|della|di)\s+)*)[A-ZÀ-Ý][\w'-]+"
               r"(?:\s+[A-ZÀ-Ý][\w'-]+)*(?:,\s*\d{4,5}\s+[A-ZÀ-Ý][\w-]+)?"),
)


def _births(text):
    for m in BIRTH.finditer(text):
        yield Finding("date_of_birth", "date of birth", m.start(1), m.end(1), m.group(1))


def _addresses(text):
    for rx in ADDRESSES:
        for m in rx.finditer(text):
            yield Finding("address", "street address", m.start(), m.end(), m.group().rstrip(" ,."))


def _persons(text):
    for rx in PERSON_CUES:
        for m in rx.finditer(text):
            name, start = m.group(1), m.start(1)
            while name.split()[0].lower() in _CUE_WORDS and " " in name:  # "Patient John Miller, DOB ..."
                cut = name.index(" ") + 1
                name, start = name[cut:], start + cut
            if name.split()[0] in _NOT_NAMES:
                continue
            yield Finding("person", "name", start, start + len(name), name)


_CUE_WORDS = {"patient", "employee", "client", "name", "contact", "customer", "resident", "student", "member", "dear",
              "hi", "hello"}
_NOT_NAMES = {"The", "This", "That", "These", "Those", "It", "He", "She", "They", "We", "You", "I", "Monday", "Tuesday",
              "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "January", "February", "March", "April", "May",
              "June", "July", "August", "September", "October", "November", "December", "Street", "Road"}


# ---------------------------------------------------------------- Presidio

# Presidio entity -> our category (the rest of what its recognisers find is left out)
PRESIDIO_ENTITIES = {"CREDIT_CARD": "payment_card", "IBAN_CODE": "iban", "IP_ADDRESS": "ip_address", "PHONE_NUMBER": "phone",
                     "PERSON": "person", "US_SSN": "national_id", "UK_NHS": "national_id", "UK_NINO": "national_id",
                     "IN_PAN": "national_id", "ES_NIF": "national_id", "ES_NIE": "national_id",
                     "IT_FISCAL_CODE": "national_id", "AU_TFN": "national_id", "AU_MEDICARE": "national_id",
                     "SG_NRIC_FIN": "national_id", "PL_PESEL": "national_id", "FI_PERSONAL_IDENTITY_CODE": "national_id",
                     "KR_RRN": "national_id", "TR_NATIONAL_ID": "national_id",
                     "ZA_ID_NUMBER": "national_id", "SE_PERSONNUMMER": "national_id"}
# Left out: Canadian SIN (nine digits with a Luhn check: one phone number in ten passes) and Aadhaar (twelve digits
# with Verhoeff matched the tail of a UUID; this module's own Aadhaar rule wants the spaced form).
PRESIDIO_EXTRA = ("UkNinoRecognizer", "InPanRecognizer", "EsNifRecognizer", "EsNieRecognizer",
                  "ItFiscalCodeRecognizer", "AuTfnRecognizer", "AuMedicareRecognizer", "SgFinRecognizer", "PlPeselRecognizer",
                  "FiPersonalIdentityCodeRecognizer", "KrRrnRecognizer", "TrNationalIdRecognizer",
                  "ZaIdNumberRecognizer", "SePersonnummerRecognizer")
# Digit-only checksums that a phone number passes often enough (NHS: mod 11, one in eleven): counted only near their name.
PRESIDIO_CONTEXT = {"UK_NHS": r"(?i)\bnhs\b", "AU_TFN": r"(?i)\btfn\b|tax file", "AU_MEDICARE": r"(?i)medicare"}
PRESIDIO_MIN_SCORE = 0.5  # after Presidio's context boost: weak patterns (a bare 9-digit number as SSN, 0.05) stay out
NER_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")


class PiiConfigError(ValueError):
    """safety.pii_ner names a spaCy model that is not installed, or Presidio cannot be set up."""


def resolve_ner(ner: str | None) -> str | None:
    """The spaCy model ``safety.pii_ner`` means: ``auto`` (the first installed of NER_MODELS, else None), ``none``, or a
    model name or folder (which must exist)."""
    if not ner or ner == "none":
        return None
    import spacy

    if ner == "auto":
        return next((m for m in NER_MODELS if spacy.util.is_package(m)), None)
    from pathlib import Path

    if spacy.util.is_package(ner) or Path(ner).expanduser().exists():
        return ner
    raise PiiConfigError(f"safety.pii_ner: no spaCy model {ner!r} is installed (pip install it, point to its folder, or "
                         "set auto or none)")


def pii_engine_note(ner: str | None = "auto") -> str:
    """One sentence for the log: what finds names (NER model or patterns only)."""
    model = resolve_ner(ner)
    if model:
        return f"Presidio analyzer with spaCy NER ({model}) for names"
    why = "safety.pii_ner is none" if ner == "none" else "no spaCy NER model is installed (e.g. en_core_web_sm)"
    return f"Presidio analyzer without NER, as {why}: names found only by patterns (titles, 'my name is', beside a birth date)"


@lru_cache(maxsize=4)
def _analyzer(model: str | None):
    """A Presidio AnalyzerEngine: spaCy NER from ``model``, or a blank English tokenizer (no NER, no download)."""
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer import predefined_recognizers as predefined
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)

    class _Engine(SpacyNlpEngine):
        def load(self):
            if model:
                self.nlp = {"en": spacy.load(model)}
                return
            nlp = spacy.blank("en")  # tokens for Presidio's context words; lemma = lower-cased text
            nlp.add_pipe("tunesmith_lower_lemma")
            self.nlp = {"en": nlp}

    engine = _Engine(models=[{"lang_code": "en", "model_name": model or "blank"}])
    engine.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
    for name in PRESIDIO_EXTRA:
        try:
            registry.add_recognizer(getattr(predefined, name)(supported_language="en"))
        except Exception as e:  # a recogniser this Presidio version lacks or builds otherwise
            log.debug("Presidio recogniser %s left out: %s", name, e)
    registry.recognizers = [r for r in registry.recognizers if set(r.supported_entities) & set(PRESIDIO_ENTITIES)]
    return AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=["en"])


def _lower_lemma_component():
    from spacy.language import Language

    if "tunesmith_lower_lemma" not in Language.factories:
        @Language.component("tunesmith_lower_lemma")
        def lower_lemma(doc):
            for t in doc:
                t.lemma_ = t.lower_
            return doc


def _presidio_findings(text: str, wanted: set[str], ner: str | None) -> list[Finding]:
    model = resolve_ner(ner)
    if not model and sum(c.isdigit() for c in text) < 4:
        return []  # without NER every recogniser kept needs digits (an Indian PAN has the fewest: 4)
    _lower_lemma_component()
    entities = [e for e, c in PRESIDIO_ENTITIES.items() if c in wanted and (e != "PERSON" or model)]
    if not entities:
        return []
    results = _analyzer(model).analyze(text, language="en", entities=entities, score_threshold=PRESIDIO_MIN_SCORE)
    return [Finding(PRESIDIO_ENTITIES[r.entity_type], f"{r.entity_type} (Presidio)", r.start, r.end, text[r.start:r.end])
            for r in results if r.entity_type not in PRESIDIO_CONTEXT
            or re.search(PRESIDIO_CONTEXT[r.entity_type], text[max(0, r.start - 40):r.start])]


# The finder of each category, in priority order: when two findings overlap, the earlier category names the span.
_FINDERS = {"secret": _secrets, "payment_card": _cards, "iban": _ibans, "national_id": _national_ids,
            "email": _emails, "ip_address": _ips, "phone": _phones, "date_of_birth": _births, "address": _addresses,
            "person": _persons}
_PRIORITY = {c: i for i, c in enumerate(_FINDERS)}


def find_pii(text: str, categories: tuple[str, ...] | list[str] = CATEGORIES,
             phone_regions: tuple[str, ...] | list[str] = DEFAULT_PHONE_REGIONS, presidio: bool = True,
             ner: str | None = "auto") -> list[Finding]:
    """Every finding in ``text``, in order, overlaps merged (the higher-priority category names the span).

    ``presidio``: run Presidio's analyzer beside the finders here; ``ner``: its spaCy model (see ``resolve_ner``).
    A name from NER counts only when the text holds other personal data."""
    found: list[Finding] = []
    wanted = set(categories)
    for category, finder in _FINDERS.items():
        if category in wanted:
            found += finder(text, phone_regions) if category == "phone" else finder(text)
    if presidio:
        extra = _presidio_findings(text, wanted, ner)
        other = any(f.category not in ("person", "date_of_birth") for f in found + extra)
        found += [f for f in extra if f.category != "person" or other or any(g.category != "person" for g in found)]
    # A birth date alone identifies nobody ("Birthday: 18.12.1958. Convert to ISO"): it counts beside other personal data.
    if not any(f.category != "date_of_birth" for f in found):
        found = []
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
