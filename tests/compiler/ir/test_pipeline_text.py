"""Pipeline text: round trips, the config form, and the errors a user gets for bad text."""

from __future__ import annotations

import pytest

from detc.compiler import (
    DEFAULT_PIPELINE,
    BadInputError,
    parse_pipeline,
    pipeline_from_config,
)
from detc.passes import FoldConstantsPass

ROUND_TRIPS = [
    "fold-conv-bn",
    DEFAULT_PIPELINE,
    "fold-constants{size_limit=1024},fold-conv-bn",
    "fold-constants{size_limit=16,input_size_limit=64,shape_inference=false},eliminate-dead-code",
    "fold-conv-bn,lowrank{energy=0.95},prune{ratio=0.3}",  # text only: names checked later
    'calibrate{images="/data/coco 64",layout=nchw}',
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_text_round_trips(text: str) -> None:
    pipeline = parse_pipeline(text)
    assert str(pipeline) == text
    assert parse_pipeline(str(pipeline)) == pipeline


def test_whitespace_is_not_significant() -> None:
    messy = "  fold-constants { size_limit = 16 , shape_inference=off } ,  fold-conv-bn "
    assert (
        str(parse_pipeline(messy))
        == "fold-constants{size_limit=16,shape_inference=off},fold-conv-bn"
    )


def test_default_expands_in_place() -> None:
    pipeline = parse_pipeline("default,fold-conv-bn")
    assert str(pipeline) == f"{DEFAULT_PIPELINE},fold-conv-bn"


def test_options_arrive_typed() -> None:
    (folding,) = parse_pipeline("fold-constants{size_limit=16,shape_inference=no}").instantiate()
    assert isinstance(folding, FoldConstantsPass)
    assert folding.options == FoldConstantsPass.Options(size_limit=16, shape_inference=False)


def test_config_tables_say_the_same_as_text() -> None:
    config = {
        "passes": [
            {"name": "fold-constants", "size_limit": 16, "shape_inference": False},
            {"name": "fold-conv-bn"},
        ]
    }
    text = "fold-constants{size_limit=16,shape_inference=false},fold-conv-bn"
    assert pipeline_from_config(config) == parse_pipeline(text)
    assert pipeline_from_config({"pipeline": text}) == parse_pipeline(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fold-constants{size_limit=big}", "option size_limit='big' is not a valid int"),
        (
            "fold-constants{shape_inference=maybe}",
            "option shape_inference='maybe' is not a valid bool",
        ),
        (
            "fold-constants{sizelimit=3}",
            "pass 'fold-constants' has no option 'sizelimit' "
            "(its options: size_limit, input_size_limit, shape_inference)",
        ),
        (
            "fold-conv-bn{threshold=1}",
            "pass 'fold-conv-bn' has no option 'threshold' (its options: none)",
        ),
        ("fold-constants{size_limit=1,size_limit=2}", "option size_limit is given twice"),
    ],
)
def test_bad_options_are_bad_input(text: str, message: str) -> None:
    pipeline = parse_pipeline(text)
    with pytest.raises(BadInputError) as caught:
        pipeline.instantiate()
    assert message in str(caught.value)


def test_unknown_pass_lists_the_known_ones() -> None:
    with pytest.raises(BadInputError) as caught:
        parse_pipeline("fold-constants,fold-conv-bnn").instantiate()
    message = str(caught.value)
    assert message.startswith("unknown pass 'fold-conv-bnn'; known passes: ")
    for name in DEFAULT_PIPELINE.split(","):
        assert name in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("fold-conv-bn{", "expected an option name at column 14"),
        ("fold-conv-bn,", "expected a kebab-case pass name at column 14"),
        ("Fold-Conv-BN", "expected a kebab-case pass name at column 1"),
        ("fold-constants{size_limit}", "expected '=' at column 26"),
        ('x{path="unterminated}', "unterminated quoted value"),
    ],
)
def test_syntax_errors_say_where(text: str, where: str) -> None:
    with pytest.raises(BadInputError, match="pipeline .*" + where.replace("(", r"\(")):
        parse_pipeline(text)


def test_default_in_angle_brackets_is_the_default_pipeline() -> None:
    # the form the docs use for a placeholder: "<default>,quantize{...}"
    assert str(parse_pipeline("<default>,fold-conv-bn")) == f"{DEFAULT_PIPELINE},fold-conv-bn"
    with pytest.raises(BadInputError, match="only <default>"):
        parse_pipeline("<fold-conv-bn>")
