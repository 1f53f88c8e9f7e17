"""Terminal safety of what detc prints of user-named things."""

from __future__ import annotations

from detc.compiler.errors import escape_control


def test_control_characters_are_shown_not_acted_on():
    hostile = "conv\x1b[2J\x1b]0;owned\x07\rname\u202eexe.onnx\x9b"
    shown = escape_control(hostile)
    assert shown == "conv\\x1b[2J\\x1b]0;owned\\x07\\rname\\u202eexe.onnx\\x9b"
    assert all(ch.isprintable() for ch in shown)


def test_plain_text_and_kept_newlines_pass_through():
    assert escape_control("model.onnx: node 'Conv_3' (Conv)") == "model.onnx: node 'Conv_3' (Conv)"
    assert escape_control("a\nb\x1b", keep="\n") == "a\nb\\x1b"
    assert escape_control("日本語 café") == "日本語 café"
