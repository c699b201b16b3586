"""`cli/parsing.py`: subcommand parsers from dataclasses, and YAML config files layered under the flags."""

import argparse
import dataclasses
import re

import pytest

from hf_layerskip.cli import SUBCOMMANDS, build_parser
from hf_layerskip.cli.parsing import CommandParser, add_dataclass_command, dataclasses_from, load_config_file


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


@pytest.mark.parametrize("command", SUBCOMMANDS)
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


def test_sweep_takes_output_dir_in_either_spelling_and_lists_in_the_documented_syntax(tmp_path):
    from hf_layerskip.cli.sweep import ARGUMENT_TYPES

    for option in ("--output_dir", "--output-dir"):
        argv = ["sweep", option, str(tmp_path), "--exit-layers", "4-12:4", "--num_speculations", "3,1,2,1"]
        args = build_parser().parse_args([*argv, "--confidence-thresholds", "0.7,0"])
        options = dataclasses_from(args, ARGUMENT_TYPES)[-1]
        assert options.output_dir == str(tmp_path)
        assert (options.exit_layers, options.num_speculations) == ((4, 8, 12), (1, 2, 3))
        assert (options.confidence_thresholds, options.draft_vocab_sizes) == ((0.0, 0.7), (0,))
    help_text = " ".join(subparser("sweep").format_help().split())
    assert "Draft lengths d, e.g. 1,2,4 or 1-6. (default: 1,2,3,4,6)" in help_text


def test_a_shared_option_takes_the_command_default_in_parsing_and_help():
    from hf_layerskip.cli.sweep import ARGUMENT_TYPES

    _, _, prompts, generation, _ = dataclasses_from(build_parser().parse_args(["sweep"]), ARGUMENT_TYPES)
    assert (prompts.num_prompts, generation.max_new_tokens) == (5, 32)
    help_text = " ".join(subparser("sweep").format_help().split())
    assert "decoding also stops at EOS. (default: 32)" in help_text
    assert "Use N prompts. (default: 5)" in help_text


@dataclasses.dataclass
class Checked:
    rate: float = dataclasses.field(default=0.5, metadata={"help": "rate"})

    def __post_init__(self):
        if self.rate > 1:
            raise ValueError("rate must be at most 1")


@pytest.mark.parametrize("check_on_parse", [True, False])
def test_a_post_init_error_is_a_usage_error_where_the_command_asks(capsys, check_on_parse):
    parser = argparse.ArgumentParser(prog="tool")
    subparsers = parser.add_subparsers(parser_class=CommandParser)
    add_dataclass_command(subparsers, "run", [Checked], check_on_parse=check_on_parse)
    assert dataclasses_from(parser.parse_args(["run", "--rate", "1"]), [Checked]) == (Checked(1.0),)
    if check_on_parse:
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--rate", "2"])
        assert "tool run: error: rate must be at most 1" in capsys.readouterr().err
    else:
        args = parser.parse_args(["run", "--rate", "2"])
        with pytest.raises(ValueError, match="at most 1"):
            dataclasses_from(args, [Checked])
