"""``dialplan schema``: a JSON Schema (draft 2020-12) of the dialplan YAML files.

Editors with yaml-language-server validate while typing when a file starts with
``# yaml-language-server: $schema=<path or URL of the schema>``. The schema checks
the shape (keys, types, key names); ``dialplan check`` checks everything else
(placeholders, files, references, clashes). ``tests/test_dialplan.py`` keeps its
keys in step with the parser's.
"""

from __future__ import annotations

from typing import Any

from consentivr.model import Basis

SCHEMA_ID = "https://consentivr.invalid/schema/dialplan.json"

_LANGUAGE = r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$"
_NAME = r"^[A-Za-z0-9_-]+$"
_DTMF = r"^[0-9*#]$"
# Asterisk's 80-byte context and extension buffers (see config.AST_MAX_CONTEXT).
_MAX = 79
_FLOW_NAME_MAX = _MAX - len("consentivr-flow-")
_MENU_NAME_MAX = _MAX - len("consentivr-menu-")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def _text(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": description, **more}


def dialplan_schema() -> dict[str, Any]:
    """The schema as a JSON-ready dict."""
    prompt_object = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "media": {
                "description": "Asterisk sounds played in order, e.g. [hello-world] or "
                               "[sound:digits/1]",
                "oneOf": [_text("one sound"),
                          {"type": "array", "minItems": 1, "items": _text("a sound")}],
            },
            "file": _text("your own recording, relative to this file: .wav (8 kHz mono "
                          "16-bit), .gsm, .ulaw, .sln..., or a name without extension"),
            "text": _text("spoken by `consentivr prompts build` (espeak-ng); may use "
                          "placeholders such as {retention.recording}, {yes_key} and "
                          "{repeat_key}"),
            "voice": _text("the espeak-ng voice for text, e.g. nl, en-gb, en+f3"),
            "transcript": _text("what a media or file prompt says, with the same "
                                "placeholders and checks as text"),
        },
        "oneOf": [{"required": ["media"]}, {"required": ["file"]}, {"required": ["text"]}],
    }
    destination = {
        "description": "Where the call goes: a dialplan location, or a menu of this file",
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["context"],
                "properties": {
                    "context": _text("a dialplan context", pattern=r"^[A-Za-z0-9_.+-]+$",
                                     maxLength=_MAX),
                    "exten": {"description": "the extension (default s)",
                              "type": ["string", "integer"]},
                    "priority": {"type": "integer", "minimum": 1, "maximum": 100000,
                                 "default": 1},
                },
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["menu"],
                "properties": {"menu": _text("a menu under menus: in this file",
                                             pattern=_NAME)},
            },
        ],
    }
    purpose = {
        "type": "object",
        "additionalProperties": False,
        "required": ["basis", "retention_days", "question"],
        "properties": {
            "basis": {"enum": [b.value for b in Basis],
                      "description": "consent: opt-in, only the yes key counts; public_task "
                                     "or legitimate_interest: announced, the caller may "
                                     "object"},
            "retention_days": {"type": "integer", "minimum": 1, "maximum": 36500,
                               "description": "what purge enforces and {retention.<name>} "
                                              "says"},
            "question": _ref("perLanguage"),
            "timeout": _ref("seconds"),
            "retries": _ref("retries"),
            "yes_key": _ref("dtmfKey"),
            "no_key": _ref("dtmfKey"),
            "object_key": _ref("dtmfKey"),
            "records": {"type": "boolean", "description": "this purpose gates MixMonitor"},
            "callback": {"type": "boolean",
                         "description": "a yes keeps the caller's number for a callback"},
            "default": {"enum": [False, "no"],
                        "description": "consent never defaults to yes"},
        },
        "allOf": [
            {
                "if": {"properties": {"basis": {"const": "consent"}}, "required": ["basis"]},
                "then": {"required": ["yes_key", "no_key"],
                         "not": {"required": ["object_key"]}},
                "else": {"required": ["object_key"],
                         "not": {"anyOf": [{"required": ["yes_key"]},
                                           {"required": ["no_key"]},
                                           {"required": ["default"]}]}},
            },
        ],
    }
    language_menu = {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompt", "keys"],
        "properties": {
            "prompt": {"description": "one prompt, or one part per language (each spoken "
                                      "in its own voice; {key} is that language's key)",
                       "anyOf": [_ref("prompt"), _ref("perLanguage")]},
            "keys": {"type": "object", "minProperties": 1,
                     "propertyNames": {"pattern": _DTMF},
                     "additionalProperties": {"type": "string", "pattern": _LANGUAGE}},
            "timeout": _ref("seconds"),
            "retries": _ref("retries"),
        },
    }
    number = {"type": ["string", "integer"], "maxLength": _MAX,
              "description": "a dialled number or an Asterisk pattern such as _0201234XXX"}
    flow = {
        "type": "object",
        "additionalProperties": False,
        "required": ["languages", "notice", "purposes", "destination"],
        "properties": {
            "languages": {"type": "array", "minItems": 1, "uniqueItems": True,
                          "items": {"type": "string", "pattern": _LANGUAGE},
                          "description": "the first is the default"},
            "language_menu": _ref("languageMenu"),
            "notice": {**_ref("perLanguage"),
                       "description": "the privacy notice; a text must use "
                                      "{retention.<purpose>} for every purpose"},
            "purposes": {"type": "object", "propertyNames": {"pattern": r"^[A-Za-z0-9_]+$"},
                         "additionalProperties": _ref("purpose")},
            "destination": _ref("destination"),
            "invalid": _ref("perLanguage"),
            "numbers": {"oneOf": [number, {"type": "array", "items": number}]},
            "max_menu_seconds": _ref("seconds"),
            "not_recorded": {**_ref("perLanguage"),
                             "description": "played by the dialplan when the app is down"},
            "repeat_key": {**_ref("dtmfKey"),
                           "description": "during the notice or a question: the notice "
                                          "again, then that question ({repeat_key})"},
            "more_info": {**_ref("perLanguage"),
                          "description": "more information (e.g. where to read the full "
                                         "privacy statement), played on more_info_key"},
            "more_info_key": {**_ref("dtmfKey"),
                              "description": "plays more_info, then back to where the "
                                             "caller was ({more_info_key})"},
            "language_by_country": {
                "type": "object",
                "description": 'country calling code -> language, e.g. {"49": de}: an '
                               "international caller number starts in that language",
                "propertyNames": {"pattern": r"^[1-9][0-9]{0,2}$"},
                "additionalProperties": {"type": "string", "pattern": _LANGUAGE},
            },
        },
        "dependentRequired": {"more_info": ["more_info_key"],
                              "more_info_key": ["more_info"]},
    }
    menu = {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompt", "options"],
        "properties": {
            "prompt": {**_ref("perLanguage"),
                       "description": "per language; chosen by ${CONSENTIVR_LANGUAGE}"},
            "options": {"type": "object", "minProperties": 1,
                        "propertyNames": {"pattern": _DTMF},
                        "additionalProperties": _ref("destination")},
            "timeout": _ref("seconds"),
            "retries": _ref("retries"),
            "invalid": _ref("perLanguage"),
            "default": _ref("destination"),
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "consentivr dialplan file",
        "type": "object",
        "additionalProperties": False,
        "required": ["flows"],
        "properties": {
            "version": {"const": 1},
            "flows": {"type": "object", "minProperties": 1,
                      "propertyNames": {"pattern": _NAME, "maxLength": _FLOW_NAME_MAX},
                      "additionalProperties": _ref("flow")},
            "menus": {"type": "object",
                      "propertyNames": {"pattern": _NAME, "maxLength": _MENU_NAME_MAX},
                      "additionalProperties": _ref("menu")},
        },
        "$defs": {
            "flow": flow,
            "purpose": purpose,
            "languageMenu": language_menu,
            "menu": menu,
            "destination": destination,
            "prompt": {"oneOf": [_text("an Asterisk sound name, e.g. hello-world"),
                                 prompt_object]},
            "perLanguage": {"type": "object", "minProperties": 1,
                            "propertyNames": {"pattern": _LANGUAGE},
                            "additionalProperties": _ref("prompt")},
            "dtmfKey": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                  {"type": "string", "pattern": _DTMF}]},
            "seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            "retries": {"type": "integer", "minimum": 0, "maximum": 5},
        },
    }
