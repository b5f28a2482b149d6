"""mm.cli: the serve arguments and argument types the servers and demos share."""
import argparse

import pytest

from mm.cli import add_device_argument, add_serve_arguments, file_size, positive_float, positive_int


def test_serve_arguments_default_to_this_machine_and_the_given_port():
    p = argparse.ArgumentParser()
    add_serve_arguments(p, port=7860)
    args = p.parse_args([])
    assert (args.host, args.port, args.device) == ("127.0.0.1", 7860, None)
    args = p.parse_args(["--host", "0.0.0.0", "--port", "9000", "--device", "cuda:1"])
    assert (args.host, args.port, args.device) == ("0.0.0.0", 9000, "cuda:1")


def test_serve_arguments_leave_device_to_a_tool_that_has_its_own():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    add_serve_arguments(p, port=8000, device=False)  # no argparse conflict
    assert p.parse_args([]).device == "cpu"


@pytest.mark.parametrize("text, expected", [("25mb", 25 * 1024 ** 2), ("800KB", 800 * 1024), ("1gb", 1024 ** 3),
                                            (" 512 ", 512), ("7b", 7)])
def test_file_size_reads_units_of_1024(text, expected):
    assert file_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0mb", "-1kb", "1.5mb", "10tb", "mb", ""])
def test_file_size_refuses_what_is_not_a_positive_size(text):
    with pytest.raises(argparse.ArgumentTypeError, match="give a size such as"):
        file_size(text)


@pytest.mark.parametrize("parse, good, expected, bad, refusal, not_a_number", [
    (positive_float, "0.5", 0.5, ("0", "-2"), "more than 0", "x"),
    (positive_int, "3", 3, ("0", "-2"), "at least 1", "1.5"),
])
def test_positive_numbers(parse, good, expected, bad, refusal, not_a_number):
    assert parse(good) == expected
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=refusal):
            parse(text)
    with pytest.raises(ValueError):
        parse(not_a_number)


def test_device_argument_on_a_parser_or_a_group():
    p = argparse.ArgumentParser()
    add_device_argument(p.add_argument_group("model"))
    assert p.parse_args([]).device is None and p.parse_args(["--device", "cpu"]).device == "cpu"
