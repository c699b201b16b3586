"""`cli/parsing.py`: subcommand parsers from dataclasses, and YAML config files layered under the flags."""

import argparse
import dataclasses
import re

import pytest

from hf_layerskip.cli import build_parser
from hf_layerskip.cli.parsing import CommandParser, add_dataclass_command, dataclasses_from, load_config_file

CONVERTED_COMMANDS = ("convert", "generate", "train", "train-default", "correctness")


@dataclasses.dataclass
class Example:
    _argument_group_name = "example"

    config: str | None = dataclasses.field(default=None, metadata={"help": "YAML options"})
    num_steps: int = dataclasses.field(default=3, metadata={"help": "steps"})
    rate: float = dataclasses.field(default=0.5, metadata={"help": "rate"})
    mode: str = dataclasses.field(default="fast", metadata={"help": "mode", "choices": ["fast", "slow"]})
    layers: list[int] | None = dataclasses.field(default=None, metadata={"help": "layers"})
    verbose: bool = dataclasses.field(default=False, metadata={"help": "talk"})


def example_parser(**kwargs):
    parser = argparse.ArgumentParser(prog="tool")
    subparsers = parser.add_subparsers(dest="command", parser_class=CommandParser)
    add_dataclass_command(subparsers, "run", [Example], **kwargs)
    return parser


def parse(*argv, **kwargs) -> Example:
    (options,) = dataclasses_from(example_parser(**kwargs).parse_args(["run", *argv]), [Example])
    return options


def test_nothing_given_parses_to_the_declared_defaults():
    assert parse() == Example()


def test_both_spellings_and_typed_values():
    assert parse("--num_steps", "5", "--layers", "1", "2", "--verbose") == Example(num_steps=5, layers=[1, 2], verbose=True)
    assert parse("--num-steps", "5") == Example(num_steps=5)


def test_a_config_file_sets_defaults_that_flags_override_wherever_they_stand(tmp_path):
    (tmp_path / "run.yaml").write_text("num_steps: 9\nrate: 1e-3\nmode: slow\nlayers: 4\n")
    config = ["--config", str(tmp_path / "run.yaml")]
    from_file = Example(config=config[1], num_steps=9, rate=1e-3, mode="slow", layers=[4])
    assert parse(*config, config_file=True) == from_file
    assert parse("--num-steps", "2", *config, "--mode", "fast", config_file=True) == dataclasses.replace(
        from_file, num_steps=2, mode="fast"
    )
    # Without config_file=True, --config is an ordinary option.
    assert parse(*config) == Example(config=config[1])


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("num_steps: 2\nnum_stepz: 3\n", r"run\.yaml:2: unknown option 'num_stepz'"),
        ("rate: 0.1\nnum_steps: many\n", r"run\.yaml:2: bad value 'many' for 'num_steps': invalid int value"),
        ("mode: sideways\n", r"run\.yaml:1: bad value 'sideways' for 'mode': choose from fast, slow"),
        ("config: other.yaml\n", r"run\.yaml:1: unknown option 'config'"),
        ("rate: [1\n", r"run\.yaml:2: malformed YAML"),
        ("- rate\n", r"run\.yaml: expected a mapping"),
    ],
)
def test_config_file_errors_name_the_file_and_line(tmp_path, text, pattern):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=pattern):
        load_config_file(tmp_path / "run.yaml", [Example])


def test_other_sections_are_left_to_their_owner(tmp_path):
    (tmp_path / "run.yaml").write_text("extra:\n  anything: 1\nnum_steps: 4\n")
    assert load_config_file(tmp_path / "run.yaml", [Example], other_sections=("extra",)) == {"num_steps": 4}


def subparser(name):
    (subparsers,) = [action for action in build_parser()._actions if action.dest == "command"]
    return subparsers.choices[name]


@pytest.mark.parametrize("command", CONVERTED_COMMANDS)
def test_every_option_of_a_dataclass_command_takes_both_spellings(command):
    parser = subparser(command)
    dataclass_options = [
        action
        for action in parser._actions
        if any(option.startswith("--") and "_" in option for option in action.option_strings)
    ]
    assert dataclass_options, f"{command} has no dataclass options"
    for action in dataclass_options:
        underscored = next(option for option in action.option_strings if "_" in option)
        assert underscored.replace("_", "-") in action.option_strings, action.option_strings


def test_output_dir_in_either_spelling_reaches_the_training_arguments(tmp_path):
    from hf_layerskip.cli.train import ARGUMENT_TYPES

    for option in ("--output_dir", "--output-dir"):
        args = build_parser().parse_args(["train", option, str(tmp_path / option)])
        assert dataclasses_from(args, ARGUMENT_TYPES)[2].output_dir == str(tmp_path / option)
    assert re.search(r"--output_dir OUTPUT_DIR, --output-dir OUTPUT_DIR", subparser("train").format_help())
