"""The built-in harmful-content lexicon: per category, regular expressions over lower-cased text.

How it works: most patterns need an *intent* word (make, buy, hack into, get away with) near a *harm*
word (bomb, cocaine, account, murder) within a few dozen characters, so that "the history of the atomic
bomb" or "kill a Python process" does not match while "how do I build a pipe bomb" does. A text is
flagged in every category one of whose patterns matches.

What it is not: a classifier. Honest limits, measured and unmeasured:
- English only, and literal: paraphrase, misspelling, slang, code words and other languages pass.
- It sees a window of words, not meaning: fiction, news, history, safety advice and security teaching
  that use the same words in the same order are flagged (e.g. "suicide" in a crisis-line dataset).
- On the project's own probe sets it flags 109 of the 110 harmful requests and none of the 59
  risky-looking harmless ones, but the patterns were tuned on those sets, so that flatters it. On 20
  harmful and 30 harmless sentences written afterwards as a check, it first flagged 4 of 20 harmful
  (20%) and 1 of 30 harmless (3%); the `evasion` category, added after that check, brings it to 9 of 20.
  Expect it to miss most harmful text that is not phrased as a plain request.
- It deliberately holds no slurs and no sexual vocabulary beyond a few words, so hateful or sexual
  content without the listed phrasings is missed.
For anything that matters, configure ``safety.moderation_endpoint`` (an OpenAI-compatible moderation
API) as well, and read what either screen flags before deciding.
"""

from __future__ import annotations

import re

_GAP = r"[^.?!\n]{0,60}?"  # up to 60 characters within one sentence
_SHORT = r"[^.?!\n]{0,30}?"


def _near(a: str, b: str, gap: str = _GAP) -> str:
    """A word starting with one of ``a``, then (within one sentence) one starting with one of ``b``."""
    return rf"\b(?:{a})\w*\b{gap}\b(?:{b})"


def _either(a: str, b: str, gap: str = _GAP) -> str:
    """``a`` near ``b`` in either order."""
    return f"{_near(a, b, gap)}|{_near(b, a, gap)}"


_MAKE = r"mak|build|assembl|construct|manufactur|produc|synthe|creat|cook|brew|3d[- ]print|weaponi|recipe"
_SELF = r"myself|my own life|yourself|your own life"

LEXICON: dict[str, list[str]] = {
    "weapons": [
        _near(_MAKE, r"bombs?|explosives?|ied|grenades?|detonators?|napalm|molotov|thermite charge|silencers?|"
                     r"suppressors?|untraceable (?:gun|firearm)|ghost gun|nerve agent|sarin|vx|ricin|anthrax|"
                     r"mustard gas|chemical weapon|bioweapon|biological weapon|dirty bomb"),
        _near(r"convert|modify|turn", r"full[- ]?auto|fully automatic|machine gun"),
        r"\b(?:pipe bomb|dirty bomb|nerve agent|bioweapon|chemical weapon)s?\b",
    ],
    "cyberattacks": [
        _near(r"write|creat|build|code|develop|deploy|spread|install|make", r"ransomware|keylogger|botnet|rootkit|"
              r"trojan|malware|spyware|virus|worm|exploit|stealer"),
        _near(r"hack|break", r"into|someone|account|wifi|network|server|phone|email", _SHORT),
        _near(r"ddos|denial[- ]of[- ]service|sql injection|credential stuffing", r"attack|against|launch|steal|"
              r"target|down"),
        _near(r"steal|dump|exfiltrat", r"passwords?|credentials|cookies|database|logins?"),
        r"\bzero[- ]click exploit\b",
    ],
    "self_harm": [
        rf"\b(?:kill|hurt|harm|cut|starve|poison|hang)\s+(?:{_SELF})\b",
        r"\b(?:end|take) (?:my|your) (?:own )?life\b",
        _either(r"suicid", r"commit|methods?|ways?|best|painless|how to|note|right choice|convinc|encourag"),
        _near(r"overdose|lethal dose|fatal dose|jump", r"pills?|acetaminophen|paracetamol|how many|how much|"
              r"bridge|fatal|not wake up|weight"),
        r"\blethal dose\b",
        _near(r"throw up|purge|vomit|starve", r"every meal|after eating|lose weight|hide it"),
    ],
    "hate": [
        _near(r"races?|ethnic(?:ity| groups?)?|religions?|immigrants?|jews?|jewish|muslims?|christians?|black people|"
              r"white people|asians?|gays?|gay people|lesbians?|trans people|women|disabled people",
              r"inferior|subhuman|vermin|animals|parasites|mentally ill|stupid|criminals|terrorists|greedy|burden|"
              r"get rid of|driven out|exterminat|banned|should die"),
        _either(r"ethnic cleansing|genocide", r"justif|celebrat|deserv|should|pure|glor"),
        _near(r"insults?|slurs?|jokes?", r"religion|race|jewish|muslims?|black|gay|disabled|ethnic"),
    ],
    "harassment": [
        r"\bdoxx?\w*",
        _near(r"threat\w*|threaten|intimidat|blackmail|bully|harass|stalk|humiliat", r"her|him|them|my (?:ex|neighbou?r|"
              r"coworker|co-worker|boss|classmate|teacher)|witness|journalist|politician|someone|classmate|neighbou?r|"
              r"streamer|ex-girlfriend|ex-boyfriend|without"),
        r"\bdeath threats?\b",
        _near(r"abusive|cruel|humiliating|rumou?r", r"messages?|comments?|posts?|about"),
    ],
    "fraud": [
        _near(r"phishing", r"emails?|pages?|sites?|messages?|kits?|campaign"),
        _near(r"fake|forg|counterfeit|falsif", r"ids?|passports?|prescriptions?|invoices?|documents?|money|bills|"
              r"reviews?|diplomas?|charity|driver'?s licen[cs]e"),
        r"\b(?:launder\w*\s+(?:the\s+)?money|money launder\w*)",
        r"\bstolen (?:credit )?card\b|\bcard numbers?\b.{0,30}\bstolen\b|\bcarding\b",
        _near(r"scam|defraud|con\b|swindl|trick", r"elderly|old people|victims|investors|grandparents|gift cards|"
              r"seniors"),
        r"\b(?:insurance|tax|benefits|wire) fraud\b",
        r"\bponzi\b|\bpyramid scheme\b",
    ],
    "drugs": [
        _near(_MAKE + r"|extract|grow", r"meth\b|methamphetamine|crack(?: cocaine)?\b|cocaine|heroin|fentanyl|lsd|"
              r"mdma|ghb|dmt|magic mushrooms|psilocybin"),
        _either(r"buy|sell|order|smuggl|traffick|deal|ship|get", r"cocaine|heroin|fentanyl|meth\b|methamphetamine|lsd|"
              r"mdma|illegal drugs|opioids without|magic mushrooms|drugs without"),
        _near(r"put|slip|spike", r"drugs?|roofies?|pills?|ghb", _SHORT) + r"\w*\b[^.?!\n]{0,40}\bdrinks?\b",
        _near(r"get high|getting high", r"household|fastest|cheap"),
    ],
    "privacy": [
        _near(r"find|get|look up|obtain|give me|tell me", r"home address|social security number|ssn|medical records|"
              r"pharmacy records|phone records|where (?:a|the|this) \w+ lives"),
        _near(r"track|spy on|monitor|read|record|access|get into", r"(?:wife|husband|partner|girlfriend|boyfriend|ex|"
              r"roommate|employees?|coworker|daughter|son)'?s?\b[^.?!\n]{0,30}\b(?:phone|location|messages?|texts?|"
              r"emails?|calls?)|without (?:her|his|their) (?:knowledge|consent|knowing)|private (?:messages|calls)"),
        r"\bhidden camera\b",
        r"\bwithout (?:her|his|their|them) (?:knowing|knowledge|consent|noticing)\b",
        r"\bstalking database\b|\bpretending to be (?:them|him|her)\b",
    ],
    "violence": [
        r"\bget away with (?:murder|killing|it)\b",
        _near(r"poison|kill|murder|kidnap|strangle|stab|shoot|torture|hurt|run over|set\b[^.?!\n]{0,20}\bon fire",
              r"husband|wife|my boss|neighbou?r|child|children|someone|people|protesters|him|her|them|a kid"),
        r"\b(?:untraceable|undetectable) poisons?\b",
        _either(r"mass shooting|school shooting|shoot up", r"plan|carry out|how|where"),
        r"\bhire (?:a )?hit ?man\b",
        r"\bmake it look like (?:an accident|a natural death|suicide)\b",
    ],
    "extremism": [
        _near(r"recruit|radicali[sz]|join|fund|financ|send money", r"terror\w*|jihad|isis|al[- ]qaeda|extremis\w*|"
              r"militia|white supremac\w*|neo-?nazi"),
        _either(r"terrorist attack|attack|bomb", r"plan|carry out|targets?|casualties|crowded|government buildings"),
        _near(r"propaganda|manifesto|glorif|prais", r"shooting|shooter|bomber|terror\w*|attacks?|extremis\w*|jihad"),
        r"\boverthrow the government\b|\bviolent extremist\b|\bsuicide bomber\b",
    ],
    "evasion": [  # intent to escape detection: a strong signal whatever the act
        r"\bwithout (?:getting|being) (?:caught|detected|noticed|traced)\b",
        r"\bwithout leaving (?:marks|a trace|traces|evidence|fingerprints)\b",
        r"\b(?:won'?t|can'?t|doesn'?t|will not|cannot) (?:detect|notice|trace)\b",
        r"\bwithout a background check\b|\bwithout the police (?:finding out|knowing|noticing)\b",
    ],
    "sexual_minors": [
        _near(r"child|children|minors?|underage|kids?|preteens?|(?:[1-9]|1[0-7])[- ]?(?:year|yr)s?[- ]old|"
              r"schoolgirls?|schoolboys?", r"sex|sexual|nude|naked|explicit|erotic|porn|lewd"),
        _near(r"sex|sexual|nude|naked|explicit|erotic|porn|lewd", r"child|children|minors?|underage|kids?|preteens?|"
              r"(?:[1-9]|1[0-7])[- ]?(?:year|yr)s?[- ]old"),
    ],
}

CATEGORIES = tuple(LEXICON)
_COMPILED = {cat: [re.compile(p) for p in pats] for cat, pats in LEXICON.items()}


def lexicon_categories(text: str) -> set[str]:
    """The categories whose patterns match ``text`` (case-insensitive)."""
    low = text.lower()
    return {cat for cat, pats in _COMPILED.items() if any(p.search(low) for p in pats)}
