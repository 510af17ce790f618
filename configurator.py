"""nanoGPT-style config overrides, hardened: a script's module-level globals (`lr = 3e-4  # peak lr`) are overridden by
`configure(globals(), sys.argv[1:], __file__)`: `python train.py config/x.py --lr=1e-4`; `--help` lists keys + comments.
Unknown keys and wrong types exit 2 with a one-line message. Derived values (device, dtype) are the caller's, after."""
import ast, difflib, io, os, sys, tokenize, typing

SIMPLE = (int, float, bool, str, type(None), tuple, list)

def die(msg):  # bad input is the user's to fix: one line, exit 2, no traceback (train/eval/merge.py use it too)
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)

def setup(fn, *args, **kwargs):  # fn(*args, **kwargs), a set-up step: its expected failures (missing file, offline) die
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        die(e)

def _checked(key, value, defaults, hints={}):  # value converted to the key's type, or exit 2 naming the key
    if key not in defaults:
        hint = ([k for k in defaults if "".join(w[:1] for w in k.split("_")) == key]  # lr -> learning_rate
                or difflib.get_close_matches(key, list(defaults), n=1) or [k for k in defaults if k.startswith(key)])
        die(f"unknown config key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    want = type(defaults[key])
    if key in hints:  # annotated key (`compile: bool | None = None`): one of its types, ints promoted to float
        kinds = typing.get_args(hints[key]) or (hints[key],)
        if type(value) in kinds or (float in kinds and type(value) is int):
            return float(value) if type(value) is int and int not in kinds else value
        die(f"config key {key!r} expects {' | '.join(k.__name__.replace('NoneType', 'None') for k in kinds)}, "
            f"got {type(value).__name__} {value!r}")
    if defaults[key] is None or type(value) is want:  # unannotated None defaults take anything; bool is no int
        return value
    if (want is float and type(value) is int) or (want in (tuple, list) and type(value) in (tuple, list)):
        return want(value)  # int -> float promotion; a list given for a tuple key (or back)
    die(f"config key {key!r} expects {want.__name__}, got {type(value).__name__} {value!r}")

def configure(globals_: dict, argv: list[str], source_file: str, keys: list[str] | None = None,
              choices: dict = {}, minimum: dict = {}) -> dict:
    """Apply config files and --key=value overrides from argv to globals_ (in place); return {key: value}. Keys default
    to simple-typed lower-case names assigned at source_file's top level (or under `if __name__ == '__main__':`).
    Then each key in choices must take one of its values; with minimum, numbers >= theirs (0 if not named)."""
    src = open(source_file).read()
    comments = {t.start[0]: t.string.lstrip("# ") for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    body = [n for top in ast.parse(src).body for n in (top.body if isinstance(top, ast.If) else [top])]  # + __main__
    named = [(n.target if isinstance(n, ast.AnnAssign) else n.targets[0], n) for n in body  # x = 1, x: int = 1
             if isinstance(n, (ast.Assign, ast.AnnAssign))]
    lines = {}
    for t, n in named:  # a key's first assignment: the one with the comment, not a derived value's
        if isinstance(t, ast.Name):
            lines.setdefault(t.id, n.end_lineno)
    keys = keys or [k for k in lines if k in globals_ and not k.startswith("_") and not k.isupper()  # UPPER = constant
                    and isinstance(globals_[k], SIMPLE)]
    defaults, hints = {k: globals_[k] for k in keys}, globals_.get("__annotations__", {})
    if "--help" in argv or "-h" in argv:  # defaults as written in the source, before any override
        print(f"usage: python {os.path.relpath(source_file)} [config_file.py ...] [--key=value ...]\n")
        for k, v in defaults.items():
            print(f"  --{k}={v!r}" + (f"  # {comments[lines[k]]}" if lines.get(k) in comments else ""))
        raise SystemExit(0)
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):  # a config file: exec'd over the current values, may only set known keys
            if not os.path.isfile(arg):
                die(f"config file {arg!r} not found (overrides are written --key=value)")
            ns = dict(config)
            exec(compile(open(arg).read(), arg, "exec"), ns)
            config.update({k: _checked(k, v, defaults, hints) for k, v in ns.items() if not k.startswith("_") and isinstance(v, SIMPLE)})
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            die(f"expected --key=value, got {arg!r}")
        try:  # python literals (3e-4, True, (1, 2), None); anything else is a plain string
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(defaults.get(key), str) and not isinstance(value, str):
            value = text  # --out_dir=2024 stays a string for a string key
        config[key] = _checked(key, value, defaults, hints)
    for k, v in config.items():
        if k in choices and v not in choices[k]:
            die(f"{k}={v!r} is not one of {' | '.join(choices[k])}")
        if minimum and type(v) in (int, float) and v < minimum.get(k, 0):
            die(f"{k}={v!r} must be >= {minimum.get(k, 0)}")
    globals_.update(config)
    return config
