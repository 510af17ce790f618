"""
A run's files in out_dir, written by train.py and read back by eval.py, merge.py and sample.py:
ckpt.pt (written atomically, read with weights_only=True after every record's CRC is checked) and
the model keys it holds, the fingerprint of the base it was trained on, the check a resume makes of
its config, config.json (with the hash of the code that ran) and metrics.jsonl, its rows also in
Weights & Biases with wandb_log.
    python -m pytest -q tests/test_checkpoint.py tests/test_errors.py
"""
import hashlib
import json
import os
import subprocess
import zipfile

import torch

import adapters
from data import replace_atomically

# the files whose sha256 config.json records: the code a run ran
CODE = ('train.py', 'model.py', 'adapters.py', 'kernels.py', 'checkpoint.py', 'eval.py', 'fsdp.py',
        'configurator.py', 'tokenizer.py', 'data/__init__.py')
# train.py keys a resume may change; any other difference is refused (out_dir: a moved run resumes)
MAY_CHANGE = ('max_iters', 'eval_interval', 'log_interval', 'eval_iters', 'char_acc_pairs',
              'eval_only', 'resume', 'compile', 'device', 'out_dir', 'note', 'parallel',
              'wandb_log', 'wandb_project', 'wandb_run_name')


def base_fingerprint(state_dict: dict) -> str:
    """sha256 over sorted names, shapes, dtypes and all bytes of the base tensors (keys with an
    '.adapter.' component skipped). Full hash, no subsampling: sha256 runs ~1.7 GB/s here, so 135M
    fp32 params take ~0.4 s."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        if ".adapter." in name:
            continue
        t = state_dict[name].detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(ckpt: dict, out_dir: str):
    """Atomic write of out_dir/ckpt.pt (temp file, fsync, os.replace). Returns None, or the error
    line of a failed write (disk full), which leaves ckpt.pt as it was."""
    tmp = os.path.join(out_dir, 'ckpt.pt.tmp')
    try:  # torch.save's zip writer reports a full disk as a RuntimeError, not an OSError
        torch.save(ckpt, tmp)
        replace_atomically(tmp, os.path.join(out_dir, 'ckpt.pt'))
    except (OSError, RuntimeError) as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        return f"could not write {tmp} ({e}); {out_dir}/ckpt.pt still holds the previous checkpoint"


def load_checkpoint(path):
    """torch.load of a ckpt.pt with weights_only=True (no code runs); a cut-off or damaged file is a
    ValueError."""
    bad = ValueError(f"{path} is truncated or corrupted (not a complete torch.save archive)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip: a cut-off file lacks its directory
        raise bad
    try:  # torch.load checks no CRC: a flipped byte in a tensor would load silently (~1 GB/s here)
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:  # a damaged record header
        raise bad from e
    if damaged:
        raise ValueError(f"{path} is truncated or corrupted (record {damaged} fails its CRC)")
    return torch.load(path, map_location='cpu', weights_only=True)


def resume_error(out_dir, saved: dict, config: dict):
    """Why the run in out_dir (its saved config) cannot resume with config, or None: only the keys
    in MAY_CHANGE may differ, and max_iters only where lr_decay_iters is set (it sets the decay)."""
    changed = {k: (saved.get(k), v) for k, v in config.items()  # model_config: by its shape keys
               if saved.get(k) != v and k not in (*MAY_CHANGE, 'model_config')}
    if not saved['lr_decay_iters'] and saved['max_iters'] != config['max_iters']:
        changed['max_iters'] = (saved['max_iters'], config['max_iters'])  # every LR would change
    if changed:
        return (f"cannot resume {out_dir} with a changed config: "
                + ', '.join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                + f" (a resume may change only {', '.join(MAY_CHANGE)}; max_iters only with"
                  f" lr_decay_iters set, else the decay follows it)")


def load_for_resume(out_dir, config: dict, fingerprint: str) -> dict:
    """out_dir's ckpt.pt if this run may continue it: the same config but for the keys in
    MAY_CHANGE, the same base (its fingerprint). Raises, with the line to print, where not."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} to resume from (drop --resume=True to "
                                "start a fresh run)")
    ckpt = load_checkpoint(path)
    if error := resume_error(out_dir, ckpt['config'], config):
        raise ValueError(error)
    if ckpt['base_fingerprint'] != fingerprint:
        raise ValueError(f"{path} was trained on another base than {config['init_from']} (base "
                         "fingerprint differs)")
    return ckpt


def saved_keys(model, tensors, everything=False) -> list:
    """The keys of model.state_dict() a run's ckpt.pt holds: every tensor that can differ from the
    base (tensors: those trained or moved by merges; or everything), then all adapter tensors and
    buffers (booster gates)."""
    ids = {id(p) for p in tensors}
    keys = [k for k, p in model.state_dict(keep_vars=True).items() if id(p) in ids or everything]
    return keys + list(adapters.adapter_state_dict(model))


def write_config(out_dir, config: dict, code_files) -> str:
    """config.json: the resolved config, the git hash and the sha256 of code_files (a copied
    checkout's git hash can lag its working tree, the files' hash cannot). Returns the git hash."""
    try:
        sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        sha = ''
    root = os.path.dirname(os.path.abspath(__file__))
    code = hashlib.sha256(b''.join(open(os.path.join(root, name), 'rb').read()
                                   for name in code_files)).hexdigest()[:16]
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump({**config, 'git': sha, 'code_sha256': code}, f, indent=1)
    return sha


def start_metrics(out_dir, resume: bool, iter_num: int):
    """A fresh run starts metrics.jsonl anew; a resumed one drops what was logged past its
    checkpoint (that eval is redone)."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    keep = lambda row: resume and (row['iter'] < iter_num or (row['iter'] == iter_num
                                                                and 'val_loss' not in row))
    rows = [line for line in open(path) if keep(json.loads(line))] if os.path.exists(path) else []
    with open(path, 'w') as f:
        f.writelines(rows)


def append_metrics(out_dir, row: dict, wandb=None):
    """One row of metrics.jsonl; with wandb (tracker()), the same row at its step."""
    with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    if wandb:
        wandb.log(row, step=row['iter'])


def tracker(wandb_log: bool):
    """The wandb module if wandb_log (imported only then), else None."""
    if not wandb_log:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError("wandb_log=True needs the wandb package: pip install wandb (or "
                          "--wandb_log=False)") from e
    return wandb


def start_run(out_dir, config: dict, resume: bool, iter_num: int, wandb=None) -> str:
    """A run's files at its start: out_dir, config.json (write_config of CODE), metrics.jsonl
    (start_metrics) and, with wandb, its wandb run (config's wandb_project and wandb_run_name, ''
    naming it after out_dir). Returns the git hash."""
    os.makedirs(out_dir, exist_ok=True)
    sha = write_config(out_dir, config, CODE)
    start_metrics(out_dir, resume, iter_num)
    if wandb:
        name = config['wandb_run_name'] or os.path.basename(os.path.abspath(out_dir))
        wandb.init(project=config['wandb_project'], name=name, config=config)
    return sha
