"""Language codes: one normalised spelling and an English name per code.

Datasets spell codes inconsistently (the XOR-TyDi train file writes " ar" with a
leading space), and the teacher prompt needs the English name of a language
("Please write a question based on this passage in Arabic."). Unknown codes fail
loudly instead of producing a prompt about a language nobody asked for.
"""

from __future__ import annotations

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic",
    "bn": "Bengali",
    "cs": "Czech",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "te": "Telugu",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "vi": "Vietnamese",
    "zh": "Chinese",
}


def _supported() -> str:
    return ", ".join(sorted(LANGUAGE_NAMES))


def normalize_language_code(raw: str, *, source: str = "") -> str:
    """Returns `raw` stripped and lower-cased, after checking it is a known code.

    `source` (e.g. "xor_train_retrieve_eng_span.jsonl line 3") is put in front of
    the error so a bad value can be found in the file it came from.
    """
    code = raw.strip().lower() if isinstance(raw, str) else ""
    if code not in LANGUAGE_NAMES:
        where = f"{source}: " if source else ""
        problem = "unknown" if code else "empty"
        raise ValueError(f"{where}{problem} language code {raw!r}; supported codes: {_supported()}")
    return code


def language_name(code: str) -> str:
    """English name of a language code ("ar" -> "Arabic"), for prompts and reports."""
    return LANGUAGE_NAMES[normalize_language_code(code)]
