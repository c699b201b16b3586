"""Subcommand parsers built from dataclasses; not a subcommand itself.

A command declares its options once, as dataclass fields with `help` metadata, and `add_dataclass_command`
builds its parser with `transformers.HfArgumentParser`: every field `foo_bar` becomes `--foo_bar` and
`--foo-bar`, its type, choices and default come from the field, `--help` shows the defaults.

    @dataclass
    class SweepArguments:
        output_dir: str = field(default="runs/sweep", metadata={"help": "where the CSV goes"})

    def add_parser(subparsers):
        parser = add_dataclass_command(subparsers, "sweep", [SweepArguments], help="...", description="...")
        parser.set_defaults(run=run)

    def run(args):
        (options,) = dataclasses_from(args, [SweepArguments])

With `config_file=True`, `--config FILE.yaml` (a field of one of the dataclasses) gives options as `name: value`
pairs: they become the parser's defaults before the command line is parsed, so any flag overrides them. With
`check_on_parse=True`, the dataclasses are built right after parsing and a `ValueError` from their `__post_init__`
becomes a usage error (opt-in: `TrainingArguments` does real work when built).
"""

import argparse
import typing
from dataclasses import fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

CONFIG_OPTION = "--config"


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser; where `config_loader` is set, the `--config` file's options become defaults first."""

    config_loader = None
    checked_types = ()

    def parse_known_args(self, args=None, namespace=None):
        if self.config_loader is not None:
            finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            finder.add_argument(CONFIG_OPTION)
            path = finder.parse_known_args(args)[0].config
            if path:
                try:
                    self.set_defaults(**self.config_loader(path))
                except (ValueError, FileNotFoundError) as error:
                    self.error(str(error))
        parsed, extras = super().parse_known_args(args, namespace)
        try:
            dataclasses_from(parsed, self.checked_types)
        except ValueError as error:
            self.error(str(error))
        return parsed, extras


class KeepParagraphsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown; the description's and epilog's line breaks kept (for examples and paragraphs)."""


def add_dataclass_command(
    subparsers, name: str, dataclass_types, *, config_file: bool = False, check_on_parse: bool = False, **parser_kwargs
) -> argparse.ArgumentParser:
    """Adds subcommand `name` whose options are the fields of `dataclass_types`, grouped by each dataclass's
    `_argument_group_name`. Positional arguments, which dataclasses cannot declare, may be added to the result."""
    options = HfArgumentParser(dataclass_types, add_help=False)
    parser_kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
    parser = subparsers.add_parser(name, parents=[options], **parser_kwargs)
    if config_file:
        parser.config_loader = lambda path: load_config_file(path, dataclass_types)
    if check_on_parse:
        parser.checked_types = tuple(dataclass_types)
    return parser


def dataclasses_from(args: argparse.Namespace, dataclass_types) -> tuple:
    """One instance of each of `dataclass_types`, from the parsed options (other attributes are ignored)."""
    return tuple(
        dtype(**{f.name: getattr(args, f.name) for f in fields(dtype) if f.init and hasattr(args, f.name)})
        for dtype in dataclass_types
    )


def load_config_file(path: str | Path, dataclass_types, other_sections: tuple[str, ...] = ()) -> dict:
    """The options of a YAML config file, typed as the command line types them; top-level keys in
    `other_sections` belong to another consumer and are skipped.

    Raises `ValueError` naming the file and line for a malformed file, an unknown option or a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        document = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: malformed YAML: {getattr(error, 'problem', error)}.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of `option: value` pairs, got {type(values).__name__}.")
    lines = {key_node.value: key_node.start_mark.line + 1 for key_node, _ in document.value}

    declared = {f.name: (dtype, f) for dtype in dataclass_types for f in fields(dtype) if f.init}
    options = {}
    for name, value in values.items():
        if name in other_sections or value is None:
            continue
        where = f"{path}:{lines.get(name, '?')}"
        if name not in declared or f"--{name}" == CONFIG_OPTION:
            raise ValueError(f"{where}: unknown option {name!r} (see the command's --help).")
        dtype, declared_field = declared[name]
        choices = declared_field.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{where}: bad value {value!r} for {name!r}: choose from {', '.join(map(str, choices))}.")
        options[name] = [value] if _is_list(dtype, name) and not isinstance(value, list) else value

    # The command line's own typing, applied to the file's values as defaults of an empty command line.
    typing_parser = HfArgumentParser(dataclass_types, exit_on_error=False)
    typing_parser.set_defaults(**options)
    try:
        typed = vars(typing_parser.parse_args([]))
    except argparse.ArgumentError as error:
        names = (error.argument_name or "").split("/")
        name = next((key for key in options if f"--{key}" in names), None)
        where = f"{path}:{lines.get(name, '?')}"
        raise ValueError(f"{where}: bad value {options.get(name)!r} for {name!r}: {error.message}") from None
    return {name: typed[name] for name in options}


def _is_list(dtype, name: str) -> bool:
    annotation = typing.get_type_hints(dtype)[name]
    return list in (typing.get_origin(annotation), *(typing.get_origin(arg) for arg in typing.get_args(annotation)))
