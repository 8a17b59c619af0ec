"""Remote text reaches the screen inert: no escape sequences, no control characters, no markup.
(core.text.terminal_safe is the one sanitizer; tui.text re-exports it as `sanitize`.)"""

from __future__ import annotations

import pytest
from rich.console import Console
from rich.text import Text

from core.text import terminal_safe as sanitize


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("\x1b[31mred\x1b[0m plain", "red plain"),
        ("\x1b[1;38;5;196mbold\x1b[m", "bold"),
        ("\x1b[2J\x1b[Hcleared", "cleared"),
        ("\x1b[?1049hALT", "ALT"),
        ("\x1b]0;pwned title\x07after", "after"),
        ("\x1b]0;pwned title\x1b\\after", "after"),
        ("\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\ here", "click here"),
        ("\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07", "click"),
        ("\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07copy", "copy"),  # clipboard write
        ("\x1bP+q544e\x1b\\dcs", "dcs"),
        ("\x1b_apc payload\x1b\\apc", "apc"),
        ("\x1bcreset", "reset"),
        ("\x1b(Bcharset", "charset"),
        ("unterminated \x1b]0;title", "unterminated "),
        ("trailing escape \x1b", "trailing escape "),
        ("\x9b31mc1 csi", "c1 csi"),
        ("\x9d0;title\x9cc1 osc", "c1 osc"),
        ("a\x85b\x8dc\x84d", "abcd"),  # C1 controls that start no sequence
        ("\x9fapc payload\x9cvisible", "visible"),
        ("line\r\n", "line"),
        ("real error\rfake ok", "real error fake ok"),
        ("secret\x08\x08\x08\x08\x08\x08public", "secretpublic"),
        ("bell\x07 nul\x00 del\x7f", "bell nul del"),
        ("multi\nline", "multi line"),
        ("keep\ttab", "keep\ttab"),
        ("admin\u202etxt.exe", "admintxt.exe"),
        ("ünïcödé ✓ 漢字", "ünïcödé ✓ 漢字"),
        ("", ""),
    ],
)
def test_sanitize_strips(raw: str, clean: str) -> None:
    assert sanitize(raw) == clean


def test_no_control_character_survives_any_byte() -> None:
    for start in range(0x00, 0xA0):
        raw = "".join(chr(c) for c in range(start, 0xA0)) + "end"
        out = sanitize(raw)
        assert all(c == "\t" or (0x20 <= ord(c) < 0x7F) for c in out)


def test_markup_stays_literal_text() -> None:
    raw = "[bold red]not bold[/bold red] [link=https://evil.example]x[/link] [@click=quit]q[/]"
    clean = sanitize(raw)
    assert clean == raw  # brackets are data, not something to strip ...
    text = Text(clean)  # ... because remote text is rendered as Text, never parsed as markup
    assert text.plain == raw
    assert not text.spans
    console = Console(width=200, color_system=None, record=True)
    console.print(text)
    assert console.export_text().rstrip("\n") == raw
