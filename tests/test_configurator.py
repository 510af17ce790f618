"""configurator.py: config files, --key=value, type checks, one-line errors (exit 2) and --help, through a real script."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = f"""import sys
sys.path.insert(0, {ROOT!r})
from configurator import configure
learning_rate = 3e-4  # peak learning rate
batch_size = 8  # sequences per micro-step
compile = True  # torch.compile the model
out_dir = 'out'  # where checkpoints go
init_from = None  # optional checkpoint to start from
betas = (0.9, 0.95)  # adamw betas
_private = 1
MAX_LEN = 36  # a constant, not a config key
config = configure(globals(), sys.argv[1:], __file__)
assert config['batch_size'] == batch_size  # the globals are updated in place
print(repr(config))
"""
DEFAULTS = dict(learning_rate=3e-4, batch_size=8, compile=True, out_dir="out", init_from=None, betas=(0.9, 0.95))


@pytest.fixture
def run(tmp_path):
    script = tmp_path / "train_stub.py"
    script.write_text(SCRIPT)

    def run(*args):
        p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path)
        return p.returncode, (ast.literal_eval(p.stdout) if p.returncode == 0 and "{" in p.stdout[:1] else p.stdout), p.stderr
    return run


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


def test_defaults_and_keys(run):
    rc, config, err = run()
    assert rc == 0, err
    assert config == DEFAULTS  # underscore names and imports are not config keys
    assert type(config["learning_rate"]) is float and type(config["betas"]) is tuple


def test_file_then_cli_overrides(run, tmp_path):
    (tmp_path / "cfg.py").write_text("import math\nlearning_rate = 1e-3\nbatch_size = 4 * 2 ** 2\nout_dir = 'out-' + str(math.pi)[:4]\n")
    rc, config, err = run("cfg.py", "--batch_size=2", "--init_from=ckpt.pt", "--betas=(0.8, 0.99)")
    assert rc == 0, err
    assert config == dict(DEFAULTS, learning_rate=1e-3, batch_size=2, out_dir="out-3.14", init_from="ckpt.pt",
                          betas=(0.8, 0.99))


def test_types(run):
    rc, config, err = run("--learning_rate=1", "--compile=False", "--out_dir=2024", "--betas=[0.5, 0.6]", "--init_from=3")
    assert rc == 0, err
    assert type(config["learning_rate"]) is float and config["learning_rate"] == 1.0  # int -> float promotion
    assert config["compile"] is False
    assert config["out_dir"] == "2024"  # a string key keeps the text
    assert config["betas"] == (0.5, 0.6)
    assert config["init_from"] == 3  # None defaults take any type


def test_unknown_key(run, tmp_path):
    assert_one_line_error(*run("--lr=1e-3")[::2], "'lr'", "did you mean 'learning_rate'")
    (tmp_path / "bad.py").write_text("batch_size = 4\nlearnin_rate = 1e-3\n")
    assert_one_line_error(*run("bad.py")[::2], "'learnin_rate'", "learning_rate")
    assert_one_line_error(*run("missing_config.py")[::2], "missing_config.py")
    assert_one_line_error(*run("--batch_size")[::2], "--key=value")


@pytest.mark.parametrize("arg, key, want", [("--batch_size=1.5", "batch_size", "int"), ("--compile=1", "compile", "bool"),
                                            ("--compile=yes", "compile", "bool"), ("--learning_rate=fast", "learning_rate", "float"),
                                            ("--batch_size=True", "batch_size", "int")])
def test_wrong_type(run, arg, key, want):
    assert_one_line_error(*run(arg)[::2], repr(key), f"expects {want}")


def test_help(run):
    rc, out, err = run("--help")
    assert rc == 0, err
    for key, comment in [("learning_rate", "peak learning rate"), ("batch_size", "sequences per micro-step"),
                         ("compile", "torch.compile the model"), ("init_from", "optional checkpoint to start from")]:
        line = next(l for l in out.splitlines() if l.strip().startswith(f"--{key}="))
        assert comment in line and repr(DEFAULTS[key]) in line, line
    assert "_private" not in out and "MAX_LEN" not in out


def test_keys_under_main_guard(tmp_path):
    script = tmp_path / "eval_stub.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nUUID_LEN = 36\nif __name__ == '__main__':\n"
                      "    from configurator import configure\n    split = 'val'  # which split\n    eval_iters = 50  # batches\n"
                      "    print(repr(configure(globals(), sys.argv[1:], __file__)))\n")
    p = subprocess.run([sys.executable, str(script), "--eval_iters=5"], capture_output=True, text=True)
    assert p.returncode == 0 and ast.literal_eval(p.stdout) == {"split": "val", "eval_iters": 5}, p.stderr
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert "--split='val'  # which split" in p.stdout and "UUID_LEN" not in p.stdout


def test_annotated_none_default_checks_its_types(tmp_path):
    """`key: bool | None = None` takes only those types (an unannotated None default takes anything); a key
    assigned again after configure() (derived values) keeps the comment of its first line in --help."""
    script = tmp_path / "annotated.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nfrom configurator import configure\n"
                      "compile: bool | None = None  # compile (None = auto)\nclip: float | None = None  # clip\n"
                      "config = configure(globals(), sys.argv[1:], __file__)\n"
                      "compile = False if compile is None else compile\nprint(repr(config))\n")
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], capture_output=True, text=True)
    p = run("--compile=True", "--clip=1")
    assert p.returncode == 0 and ast.literal_eval(p.stdout) == {"compile": True, "clip": 1.0}, p.stderr
    assert type(ast.literal_eval(p.stdout)["clip"]) is float
    assert ast.literal_eval(run("--compile=None").stdout) == {"compile": None, "clip": None}
    for arg, want in [("--compile=yes", "expects bool | None, got str 'yes'"), ("--compile=1", "got int 1"),
                      ("--clip=fast", "expects float | None")]:
        p = run(arg)
        assert_one_line_error(p.returncode, p.stderr, want)
    (tmp_path / "cfg.py").write_text("compile = 'yes'\n")
    p = run(str(tmp_path / "cfg.py"))
    assert_one_line_error(p.returncode, p.stderr, "'compile' expects bool | None")
    assert "--compile=None  # compile (None = auto)" in run("--help").stdout


def test_help_keeps_the_comment_of_a_key_resolved_later(tmp_path):
    """train.py resolves keys after configure (dtype = ... if dtype == 'auto'): --help shows the first assignment."""
    script = tmp_path / "resolve_stub.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nfrom configurator import configure\n"
                      "dtype = 'auto'  # autocast dtype\nseed = 1  # seed\nconfigure(globals(), sys.argv[1:], __file__)\n"
                      "if dtype == 'auto':\n    dtype = 'float32'\n")
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert p.stdout.splitlines()[2:] == ["  --dtype='auto'  # autocast dtype", "  --seed=1  # seed"], p.stdout
