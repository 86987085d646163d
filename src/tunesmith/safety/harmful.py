"""Harmful-content screens: pluggable functions from texts to the categories each text is flagged in.

A screen is any callable ``screen(texts: list[str]) -> list[set[str]]`` (one set of category names per
text, empty when the text passes). Two are built in:

- ``lexicon``: local regular expressions per category (see ``lexicon.py`` for what it can and cannot do).
- ``moderator``: a local Hugging Face sequence-classification model (``safety.moderator: PATH``, see
  ``moderator.py``); when it is set and ``safety.harmful_screens`` is left unset, it replaces the lexicon.
- ``moderation``: an OpenAI-compatible moderation endpoint, ``POST {base}/moderations`` with
  ``{"model": ..., "input": [texts]}``; a result's true ``categories`` are its categories (``flagged``
  with none true counts as ``flagged``). Used when ``safety.moderation_endpoint`` is set.

Register another with ``register_screen(name, factory)``, where ``factory(safety_cfg) -> screen``, and
name it in ``safety.harmful_screens``. ``python -m tunesmith.safety.screen_eval`` measures the screens a
config builds on the labelled held-out set.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Callable

from .lexicon import screen_categories

Screen = Callable[[list[str]], list[set[str]]]


class ModerationError(Exception):
    """The moderation endpoint could not be reached or gave an answer we cannot read."""


def lexicon_screen(texts: list[str]) -> list[set[str]]:
    return [screen_categories(t) for t in texts]


class ModerationScreen:
    """Calls ``POST {base_url}/moderations`` in batches of ``batch_size`` inputs."""

    def __init__(self, base_url: str, model: str = "omni-moderation-latest", api_key: str | None = None,
                 timeout: float = 30.0, batch_size: int = 32):
        self.url = base_url.rstrip("/") + "/moderations"
        self.model, self.api_key, self.timeout, self.batch_size = model, api_key, timeout, batch_size

    def __call__(self, texts: list[str]) -> list[set[str]]:
        out: list[set[str]] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            results = self._post(chunk)
            if len(results) != len(chunk):
                raise ModerationError(f"{self.url} returned {len(results)} results for {len(chunk)} inputs")
            out += [_categories(r) for r in results]
        return out

    def _post(self, inputs: list[str]) -> list[dict]:
        body = json.dumps({"model": self.model, "input": inputs}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200]
            raise ModerationError(f"moderation endpoint {self.url} answered HTTP {e.code}: {detail} "
                                  f"(check safety.moderation_endpoint, safety.moderation_model and the API key)") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ModerationError(f"moderation endpoint {self.url} failed: {e} (check safety.moderation_endpoint, "
                                  "or unset it to use only the local screen)") from None
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, list):
            raise ModerationError(f"moderation endpoint {self.url} returned no `results` list")
        return results


def _categories(result: dict) -> set[str]:
    cats = {name for name, hit in (result.get("categories") or {}).items() if hit}
    return cats or ({"flagged"} if result.get("flagged") else set())


def _moderation_factory(cfg) -> Screen:
    if not cfg.moderation_endpoint:
        raise ModerationError("safety.harmful_screens names `moderation` but safety.moderation_endpoint is not set")
    return ModerationScreen(cfg.moderation_endpoint, cfg.moderation_model, os.environ.get(cfg.moderation_api_key_env))


def _moderator_factory(cfg) -> Screen:
    from .moderator import moderator_factory

    return moderator_factory(cfg)


SCREENS: dict[str, Callable[..., Screen]] = {"lexicon": lambda cfg: lexicon_screen, "moderation": _moderation_factory,
                                            "moderator": _moderator_factory}


def register_screen(name: str, factory: Callable[..., Screen]) -> None:
    """Make ``name`` usable in ``safety.harmful_screens``; ``factory(safety_cfg)`` returns the screen."""
    SCREENS[name] = factory


def screen_names(cfg) -> list[str]:
    """The screens a SafetyConfig asks for: ``harmful_screens``, or (unset) the moderator when ``safety.moderator``
    is set and else the lexicon; ``moderation`` added when an endpoint is set."""
    names = cfg.harmful_screens if cfg.harmful_screens is not None else \
        (["moderator"] if getattr(cfg, "moderator", None) else ["lexicon"])
    return list(dict.fromkeys(names + (["moderation"] if cfg.moderation_endpoint else [])))


def build_screens(cfg) -> dict[str, Screen]:
    """The screens a SafetyConfig asks for, by name (see ``screen_names``)."""
    names = screen_names(cfg)
    unknown = [n for n in names if n not in SCREENS]
    if unknown:
        from ..config import ConfigError

        raise ConfigError(f"safety.harmful_screens: unknown screen(s) {unknown}; available: {sorted(SCREENS)}")
    return {n: SCREENS[n](cfg) for n in names}
