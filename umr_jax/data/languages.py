"""Language codes: one normalised spelling and an English name per code.

Datasets spell codes inconsistently (the XOR-TyDi train file writes " ar" with a
leading space), and the teacher prompt needs the English name of a language
("Please write a question based on this passage in Arabic."). Unknown codes fail
loudly instead of producing a prompt about a language nobody asked for.
"""

from __future__ import annotations

LANGUAGE_NAMES: dict[str, str] = {
    "af": "Afrikaans",
    "am": "Amharic",
    "ar": "Arabic",
    "az": "Azerbaijani",
    "be": "Belarusian",
    "bg": "Bulgarian",
    "bn": "Bengali",
    "ca": "Catalan",
    "cs": "Czech",
    "cy": "Welsh",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "eu": "Basque",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "ga": "Irish",
    "gl": "Galician",
    "gu": "Gujarati",
    "ha": "Hausa",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "hu": "Hungarian",
    "hy": "Armenian",
    "id": "Indonesian",
    "ig": "Igbo",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "jv": "Javanese",
    "ka": "Georgian",
    "kk": "Kazakh",
    "km": "Khmer",
    "kn": "Kannada",
    "ko": "Korean",
    "ky": "Kyrgyz",
    "lo": "Lao",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "mk": "Macedonian",
    "ml": "Malayalam",
    "mn": "Mongolian",
    "mr": "Marathi",
    "ms": "Malay",
    "my": "Burmese",
    "ne": "Nepali",
    "nl": "Dutch",
    "no": "Norwegian",
    "pa": "Punjabi",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "si": "Sinhala",
    "sk": "Slovak",
    "sl": "Slovenian",
    "so": "Somali",
    "sq": "Albanian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "te": "Telugu",
    "tg": "Tajik",
    "th": "Thai",
    "tl": "Tagalog",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "uz": "Uzbek",
    "vi": "Vietnamese",
    "xh": "Xhosa",
    "yo": "Yoruba",
    "zh": "Chinese",
    "zu": "Zulu",
}


def _supported() -> str:
    return ", ".join(sorted(LANGUAGE_NAMES))


def normalize_language_code(raw: str, *, source: str = "") -> str:
    """Returns `raw` stripped, lower-cased and without a region subtag, after checking it is a known code.

    `source` (e.g. "xor_train_retrieve_eng_span.jsonl line 3") is put in front of
    the error so a bad value can be found in the file it came from.
    """
    code = raw.strip().lower() if isinstance(raw, str) else ""
    # A region or script subtag names the same language to the teacher: zh-CN, pt_BR, zh-Hant.
    code = code.replace("_", "-").split("-", 1)[0]
    if code not in LANGUAGE_NAMES:
        where = f"{source}: " if source else ""
        problem = "unknown" if code else "empty"
        raise ValueError(f"{where}{problem} language code {raw!r}; supported codes: {_supported()}")
    return code


def language_name(code: str) -> str:
    """English name of a language code ("ar" -> "Arabic"), for prompts and reports."""
    return LANGUAGE_NAMES[normalize_language_code(code)]
