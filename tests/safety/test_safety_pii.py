"""PII and secret detection: each category found with its checksum, near-misses not found, redaction typed."""

import json
from pathlib import Path

import pytest

from tunesmith.safety.pii import find_pii, mask, redact, shannon_entropy

ROOT = Path(__file__).resolve().parents[2]


def cats(text, **kw):
    return [(f.category, f.value) for f in find_pii(text, **kw)]


def test_email_and_phone():
    text = "Mail jane.doe@example.co.uk or call (415) 555-2671, or +44 20 7946 0958 in London."
    assert cats(text) == [("email", "jane.doe@example.co.uk"), ("phone", "(415) 555-2671"),
                          ("phone", "+44 20 7946 0958")]
    # national formats need their region; +CC numbers are found with any
    assert cats("ring 020 7946 0958 today") == []
    assert cats("ring 020 7946 0958 today", phone_regions=["GB"]) == [("phone", "020 7946 0958")]


def test_payment_cards_are_luhn_checked():
    assert cats("card 4111 1111 1111 1111 exp 12/27") == [("payment_card", "4111 1111 1111 1111")]
    assert cats("amex 3782-822463-10005") == [("payment_card", "3782-822463-10005")]
    assert cats("card 4111 1111 1111 1112") == []  # one digit off: fails the Luhn check
    assert cats("order number 1234567890123456") == []  # no card prefix, fails Luhn too


def test_ibans_are_mod97_checked():
    found = cats("Pay GB82 WEST 1234 5698 7654 32 AND DE89370400440532013000 please")
    assert found == [("iban", "GB82 WEST 1234 5698 7654 32"), ("iban", "DE89370400440532013000")]
    assert cats("DE89370400440532013001") == []  # check digits wrong


def test_national_ids_are_validated():
    text = "SSN 536-22-1234, NI AB 12 34 56 C, Aadhaar 2345 6789 0124, CPF 390.533.447-05, DNI 54362315K"
    assert [v for c, v in cats(text) if c == "national_id"] == [
        "536-22-1234", "AB 12 34 56 C", "2345 6789 0124", "390.533.447-05", "54362315K"]
    # an SSN area of 000 or 666, a known-invalid number, a bad Aadhaar/CPF/DNI check: not reported
    assert cats("000-12-3456 666-12-3456 078-05-1120 2345 6789 0125 390.533.447-06 54362315A") == []


def test_ip_addresses_but_not_versions_or_times():
    assert cats("hosts 8.8.8.8, 192.168.1.20 and 2001:db8::1.") == [
        ("ip_address", "8.8.8.8"), ("ip_address", "192.168.1.20"), ("ip_address", "2001:db8::1")]
    assert cats("version 1.2.3, at 10:30:45, 999.1.1.1, 3.10.2004") == []


@pytest.mark.parametrize("secret", [
    "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL",  # OpenAI
    "AKIAIOSFODNN7EXAMPLE",  # AWS access key id
    "ghp_aBcdEfGhIjKlMnOpQrStUvWxYz0123456789",  # GitHub
    "xoxb-123456789012-1234567890123-abcdefABCDEF123456",  # Slack
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",  # Stripe
])
def test_vendor_secrets_found_whole(secret):
    text = f"config: {secret} end"
    assert cats(text) == [("secret", secret)]
    assert redact(text) == "config: <SECRET> end"


def test_pem_block_and_high_entropy_key_value():
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n-----END RSA PRIVATE KEY-----"
    assert redact(f"key:\n{pem}\nthanks") == "key:\n<SECRET>\nthanks"
    assert redact("api_key=a8f5f167f44f4964e6c998dee827110c;") == "api_key=<SECRET>;"
    # low-entropy values and plain prose are not secrets
    assert cats("password = 'correct-horse-battery' and token: aaaaaaaaaaaaaaaaaaaa") == []
    assert shannon_entropy("aaaa") == 0.0 and shannon_entropy("abcd") == 2.0


def test_redact_uses_typed_placeholders_and_keeps_the_rest():
    text = "Jane (jane@x.org, 415-555-2671) paid with 4111111111111111 from 10.0.0.7"
    assert redact(text) == "Jane (<EMAIL>, <PHONE>) paid with <CARD_NUMBER> from <IP_ADDRESS>"
    assert redact(text, categories=["email"]) == "Jane (<EMAIL>, 415-555-2671) paid with 4111111111111111 from 10.0.0.7"


def test_mask_hides_the_middle():
    assert mask("jane.doe@example.com") == "jane********om"
    assert mask("12345") == "*****"
    f = find_pii("AKIAIOSFODNN7EXAMPLE")[0]
    assert "IOSFODNN7" not in f.masked()


def test_shipped_example_has_no_findings():
    """examples/iso_dates is 720 conversations full of dates: none may look like a phone, IP or ID."""
    texts = [m["content"] for name in ("train", "valid", "test")
             for line in (ROOT / "examples" / "iso_dates" / f"{name}.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"]]
    assert len(texts) == 2160
    assert [(t, cats(t)) for t in texts if cats(t)] == []
