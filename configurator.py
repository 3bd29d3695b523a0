"""
Command-line and config-file overrides for nanoGPT-style scripts.

A script declares its settings as module-level assignments, each with a
trailing comment that is its help line:

    batch_size = 16  # micro-batch size per process, in sequences

and then resolves them with

    globals().update(configurator.configure(globals(), __file__))

A setting is a module global whose name does not start with "_", is not
written in capitals only (MAGIC = 20240520 is a constant, not a setting), and
whose value is exactly a bool, int, float or str. Anything else in the
namespace (modules, functions, classes, lists, None) is ignored.

The command line takes, in any order and applied left to right:

    config/some_file.py   a Python file that may only assign known settings
    --key=value           one override, parsed by the type of the setting
    --help, -h            print every setting with its default and help line

A user error (unknown key, wrong type, missing file) prints one message to
stderr and raises SystemExit(2), without a traceback.
"""

import ast
import difflib
import io
import os
import sys
import tokenize
import types

_SETTING_TYPES = (bool, int, float, str)
_TRUE_WORDS = ("True", "true", "1")
_FALSE_WORDS = ("False", "false", "0")


def is_setting(name, value):
    """Return True when a module global counts as a setting (see the module docstring)."""
    if name.startswith("_") or name.isupper():
        return False
    return type(value) in _SETTING_TYPES


def collect_settings(namespace):
    """Return the settings of a namespace (such as a module's globals()) as a new dict."""
    return {name: value for name, value in namespace.items() if is_setting(name, value)}


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _unknown_key_message(key, known, origin):
    message = f"unknown setting '{key}'{origin}."
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if close:
        message += " Did you mean: " + ", ".join(close) + "?"
    message += " Run with --help to list every setting."
    return message


def _type_name(value):
    return type(value).__name__


def parse_value(key, text, default):
    """Convert a command-line string to the type of the setting's default, or exit with status 2."""
    kind = type(default)
    if kind is bool:
        if text in _TRUE_WORDS:
            return True
        if text in _FALSE_WORDS:
            return False
        _fail(f"invalid value '{text}' for bool setting '{key}': use True/False, true/false or 1/0.")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            _fail(f"invalid value '{text}' for int setting '{key}': give a whole number such as {default}.")
    if kind is float:
        try:
            return float(text)
        except ValueError:
            _fail(f"invalid value '{text}' for float setting '{key}': give a number such as {default!r}.")
    return text


def check_value(key, value, default, origin):
    """Return a value assigned in a config file if its type fits the setting, or exit with status 2.

    An int is accepted for a float setting and converted. A bool is rejected for
    an int or float setting, even though bool subclasses int.
    """
    kind = type(default)
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is kind:
        return value
    _fail(
        f"invalid value {value!r} ({_type_name(value)}) for setting '{key}'{origin}: "
        f"expected {kind.__name__}, like the default {default!r}."
    )


def apply_config_file(path, settings):
    """Execute a config file and apply the settings it assigns to `settings` (in place)."""
    origin = f" in config file {path}"
    if not os.path.isfile(path):
        _fail(f"config file not found: {path}. Give the path of a Python file that assigns settings.")
    with open(path, encoding="utf-8") as f:
        source = f.read()

    namespace = {"__builtins__": __builtins__, "__file__": path, **settings}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as error:  # noqa: BLE001 - any failure in user code is reported as one message
        _fail(f"config file {path} failed to run: {type(error).__name__}: {error}")

    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, types.ModuleType):
            continue  # private helpers and imports inside the config file
        if key not in settings:
            _fail(_unknown_key_message(key, list(settings), origin))
        settings[key] = check_value(key, value, settings[key], origin)


def apply_override(argument, settings):
    """Apply one --key=value argument to `settings` (in place)."""
    body = argument[2:]
    if "=" not in body:
        example = "True" if isinstance(settings.get(body), bool) else "VALUE"
        _fail(f"invalid argument '{argument}': write overrides as --key=value, for example --{body}={example}.")
    key, text = body.split("=", 1)
    if key not in settings:
        _fail(_unknown_key_message(key, list(settings), " on the command line"))
    settings[key] = parse_value(key, text, settings[key])


def read_help_lines(script_path):
    """Return {name: comment} for each top-level `name = value  # comment` line of a script."""
    try:
        with open(script_path, encoding="utf-8") as f:
            source = f.read()
    except OSError:
        return {}

    comments = {}  # line number -> comment text, for comments that end a line of code
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        return {}

    help_lines = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            continue
        comment = comments.get(node.end_lineno)
        if comment:
            help_lines[name] = comment
    return help_lines


def read_description(script_path):
    """Return the first paragraph of a script's module docstring, or an empty string."""
    try:
        with open(script_path, encoding="utf-8") as f:
            docstring = ast.get_docstring(ast.parse(f.read()))
    except (OSError, SyntaxError):
        return ""
    if not docstring:
        return ""
    return docstring.strip().split("\n\n")[0]


def format_help(settings, script_path):
    """Return the --help text: usage, the script's description and one line per setting."""
    script = os.path.basename(script_path)
    help_lines = read_help_lines(script_path)
    lines = [f"usage: python {script} [config_file.py ...] [--key=value ...]", ""]
    description = read_description(script_path)
    if description:
        lines += [description, ""]
    lines.append("settings (name, type, default, meaning):")

    rows = [(name, _type_name(value), repr(value)) for name, value in settings.items()]
    name_width = max((len(row[0]) for row in rows), default=0)
    value_width = min(max((len(row[2]) for row in rows), default=0), 28)
    for name, type_name, default in rows:
        meaning = help_lines.get(name, "(no description)")
        lines.append(f"  --{name:<{name_width}}  {type_name:<5}  {default:<{value_width}}  {meaning}")
    lines += [
        "",
        "Config files are Python files applied in order; --key=value overrides follow the same order.",
        "Bools take True/False, true/false or 1/0.",
    ]
    return "\n".join(lines)


def configure(settings, script_path, argv=None):
    """Apply config files and --key=value overrides to a script's settings.

    settings: the script's globals() or any dict; only entries that pass
    is_setting() are used. argv defaults to sys.argv[1:]. Returns a new dict
    with the resolved settings. --help prints every setting and exits with 0;
    a user error prints one message and exits with 2.
    """
    resolved = collect_settings(settings)
    arguments = sys.argv[1:] if argv is None else list(argv)

    if "--help" in arguments or "-h" in arguments:
        print(format_help(resolved, script_path))
        raise SystemExit(0)

    for argument in arguments:
        if argument.startswith("--"):
            apply_override(argument, resolved)
        elif argument.startswith("-"):
            _fail(f"invalid argument '{argument}': write overrides as --key=value.")
        else:
            apply_config_file(argument, resolved)
    return resolved
