"""
MoRA Table 2 in miniature on a CPU (issue 16): uuid memorisation at the paper's capacity pressure (config/_mini.py)
on a ~1M-parameter byte-level LLaMA this script pretrains itself. Each run is the real train.py on a config/mini_*
config, --parallel runs side by side with one thread each; results (metrics.jsonl, config.json) are copied per run.
$ python table2.py                  # end to end: text data, base (config/mini_base.py) + merge, pair data, then
                                    # every method at its config's LR (the sweep's best), seed 1; ~12 min, 2 cores
$ python table2.py --stage=sweep    # protocol step 1: every method over the LR grid, seed 1 -> assets/mini_table2/
$ python table2.py --stage=seeds    # step 2: seeds 1-3 at each method's best LR; LoRA r8 / MoRA r8 at N/2 and 2N
$ python table2.py --stage=table    # print the tables from assets/mini_table2/ (no training)
$ python table2.py --dry_run        # the orchestration on a tiny base in a temp dir, seconds
Runs already complete in the results dir are skipped, so a stage cut by --budget_s continues where it stopped.
Protocol (fixed before the sweep ran): best LR = the highest mean char acc over the evals after step 0, seed 1
(ties within 0.1 pt: the lower final val loss); a best at an edge of the grid adds the next x3 point beyond it,
up to 3 times; then seeds 1-3 (of the pairs and of the init) at that LR, mean and standard deviation.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
# method -> (config/mini_<config>.py, pairs N at the paper's pressure), in table order
METHODS = {'full': ('full', 40), 'lora_r8': ('lora', 40), 'mora_r8_rope': ('mora', 40),
           'mora_r8_share': ('mora_share', 40), 'remora_r8': ('remora', 40), 'xgblora': ('xgblora', 40),
           'lora_r32': ('lora_r32', 158), 'mora_r32': ('mora_r32', 158),
           'lora_r1': ('lora_r1', 5), 'mora_r1': ('mora_r1', 5)}
PRESSURE = ('lora_r8', 'mora_r8_rope')  # also at N/2 and 2N (the best LR of N)
SEEDS = (1, 2, 3)


def run_name(method, lr, seed=1, n=None):
    return f"{method}_lr{lr:.0e}_s{seed}" + (f"_n{n}" if n else '')


def train_cmd(method, lr, seed, n, args):
    config, n0 = METHODS[method]
    data = os.path.join(args.data, f"byte_n{n or n0}_s{seed}")
    data = data if os.path.isabs(data) else os.path.relpath(data, 'data')  # train.py reads data/<dataset>
    extra = [*args.extra, *(args.restart_extra if config == 'remora' else [])]
    return [sys.executable, 'train.py', f'config/mini_{config}.py', f'--init_from={args.base}/hf',
            f'--dataset={data}', f'--learning_rate={lr}', f'--seed={seed}', *extra]


def evals(results, name):
    """The eval rows (char_acc, val_loss) of a finished run, or None if it has not finished."""
    path = os.path.join(results, name, 'metrics.jsonl')
    if not os.path.exists(path):
        return None
    rows = [r for r in map(json.loads, open(path)) if 'char_acc' in r]
    cfg = json.load(open(os.path.join(results, name, 'config.json')))
    return rows if rows and rows[-1]['iter'] == cfg['max_iters'] else None


def score(rows):
    """The protocol's criterion: mean char acc over the evals after step 0, then the lower final val loss."""
    later = [r['char_acc'] for r in rows if r['iter'] > 0]
    return round(100 * sum(later) / len(later), 1), -rows[-1]['val_loss']


def best_lr(results, method):
    """(best LR, the LRs still to run): the grid, extended by x3 beyond an edge that wins (up to 3 times)."""
    grid = list(GRID)
    while True:
        done = {lr: evals(results, run_name(method, lr)) for lr in grid}
        if any(v is None for v in done.values()):
            return None, [lr for lr, v in done.items() if v is None]
        best = max(grid, key=lambda lr: score(done[lr]))
        if len(grid) == len(GRID) + 3 or best not in (grid[0], grid[-1]):
            return best, []
        grid = [grid[0] / 3] + grid if best == grid[0] else grid + [grid[-1] * 3]
        grid = [float(f"{lr:.0e}") for lr in grid]


def config_lr(method):
    own = {}
    exec(open(f'config/mini_{METHODS[method][0]}.py').read(), own)
    return own['learning_rate']


def run_all(jobs, args):
    """Run [(name, cmd)] --parallel at a time, one thread each; skip finished ones; stop starting at the budget."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads), 'PYTHONUNBUFFERED': '1'}
    todo = [(n, c) for n, c in jobs if evals(args.results, n) is None]
    running, stop, t0 = [], time.time() + args.budget_s, time.time()
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done, {len(todo)} to run", flush=True)
    while todo or running:
        while todo and len(running) < args.parallel and time.time() < stop:
            name, cmd = todo.pop(0)
            out = os.path.join(args.work, name)
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            log = open(os.path.join(out, 'train.log'), 'w')
            running.append((name, out, subprocess.Popen([*cmd, f'--out_dir={out}'], stdout=log,
                                                        stderr=subprocess.STDOUT, env=env)))
        if not running:
            break
        time.sleep(0.2)
        for item in [i for i in running if i[2].poll() is not None]:
            running.remove(item)
            name, out, proc = item
            if proc.returncode:
                sys.exit(f"{name} failed ({proc.returncode}): see {out}/train.log")
            os.makedirs(os.path.join(args.results, name), exist_ok=True)
            for f in ('metrics.jsonl', 'config.json'):  # what the README's tables cite
                shutil.copy(os.path.join(out, f), os.path.join(args.results, name, f))
            acc = ' '.join(f"{r['iter']}:{100 * r['char_acc']:.1f}" for r in evals(args.results, name))
            print(f"  {time.time() - t0:6.0f} s  {name:>30}  char acc % {acc}", flush=True)
    if todo:
        print(f"budget spent: {len(todo)} runs left, run the same command again")
    return not todo


def setup(args):
    """Text data, the base (pretrained + merged to an HF dir) and every pair dataset the stage needs."""
    py = sys.executable
    if args.dry_run:  # a tiny random base stands in for the pretrained one
        import torch
        from model import LLaMA, ModelConfig
        torch.manual_seed(0)
        LLaMA(ModelConfig(vocab_size=258, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          intermediate_size=96)).save_pretrained(f'{args.base}/hf')
    elif not os.path.exists(f'{args.base}/hf/config.json'):
        t0 = time.time()
        subprocess.run([py, 'data/text/prepare.py'], check=True)
        subprocess.run([py, 'train.py', 'config/mini_base.py', f'--out_dir={args.base}'], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([py, 'merge.py', f'--out_dir={args.base}', f'--merged_dir={args.base}/hf'], check=True)
        print(f"base pretrained and merged in {time.time() - t0:.0f} s: {args.base}/hf")
    for n, seed in sorted({(n, s) for n in args.pairs for s in SEEDS}):
        subprocess.run([py, 'data/memory/prepare.py', '--tokenizer=byte', f'--n_pairs={n}', f'--seed={seed}',
                        f'--out_dir={args.data}/byte_n{n}_s{seed}'], check=True, capture_output=True)


def table(rows, title):
    """rows: [(label, [run names])] -> char acc % at each eval, mean +- std over the runs found."""
    print(f"\n{title}")
    for label, names in rows:
        found = [e for e in (evals(ARGS.results, n) for n in names) if e]
        if not found:
            print(f"{label:>28}  (not run)")
            continue
        steps = [r['iter'] for r in found[0] if r['iter'] > 0]
        cells = []
        for i, step in enumerate(steps, 1):
            accs = [100 * e[i]['char_acc'] for e in found]
            sd = f" ± {statistics.stdev(accs):4.1f}" if len(accs) > 1 else ''
            cells.append(f"@{step} {statistics.mean(accs):5.1f}{sd}")
        print(f"{label:>28}  " + '  '.join(cells) + f"  ({len(found)} run{'s' * (len(found) > 1)})")


def main(args):
    if args.stage == 'main':
        methods = list(METHODS)
        jobs = [(run_name(m, config_lr(m)), train_cmd(m, config_lr(m), 1, None, args)) for m in methods]
        args.pairs = {METHODS[m][1] for m in methods}
        setup(args)
        run_all(jobs, args)
        table([(m, [run_name(m, config_lr(m))]) for m in methods], "char acc %, each config's LR, seed 1")
    elif args.stage == 'sweep':
        args.pairs = {n for _, n in METHODS.values()}
        setup(args)
        while True:  # rounds: the grid, then the edge extensions that the finished runs call for
            jobs = [(run_name(m, lr), train_cmd(m, lr, 1, None, args))
                    for m in METHODS for lr in best_lr(args.results, m)[1]]
            if not jobs or not run_all(jobs, args):
                break
        for m in METHODS:
            lr, left = best_lr(args.results, m)
            grid = sorted({float(n.split('_lr')[1].split('_')[0]) for n in os.listdir(args.results)
                           if n.startswith(m + '_lr') and n.endswith('_s1')})
            scores = ' '.join(f"{x:.0e}:{score(evals(args.results, run_name(m, x)))[0]}" for x in grid
                              if evals(args.results, run_name(m, x)))
            print(f"{m:>14}  best LR {lr and f'{lr:.0e}'}  (mean char acc % over the evals: {scores})")
    elif args.stage in ('seeds', 'table'):
        best = {m: best_lr(args.results, m)[0] for m in METHODS}
        pressure = [m for m in PRESSURE if m in METHODS]
        if None in best.values():
            sys.exit(f"the sweep has not finished for {[m for m, lr in best.items() if lr is None]}")
        jobs = [(run_name(m, best[m], s), train_cmd(m, best[m], s, None, args)) for m in METHODS for s in SEEDS]
        jobs += [(run_name(m, best[m], s, n), train_cmd(m, best[m], s, n, args))
                 for m in pressure for n in (METHODS[m][1] // 2, METHODS[m][1] * 2) for s in SEEDS]
        if args.stage == 'seeds':
            args.pairs = {n for _, n in METHODS.values()} | {20, 80}
            setup(args)
            run_all(jobs, args)
        table([(f"{m} (LR {best[m]:.0e})", [run_name(m, best[m], s) for s in SEEDS]) for m in METHODS],
              "char acc %, each method at its best LR, mean ± std over seeds 1-3")
        table([(f"{m} N={n}", [run_name(m, best[m], s, n) for s in SEEDS])
               for m in pressure for n in (20, 80)], "pressure: N/2 and 2N at the best LR of N = 40")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--stage', choices=['main', 'sweep', 'seeds', 'table'], default='main')
    ap.add_argument('--parallel', type=int, default=2, help='runs side by side')
    ap.add_argument('--threads', type=int, default=1, help='OMP threads per run')
    ap.add_argument('--budget_s', type=float, default=1e9, help='start no run after this many seconds')
    ap.add_argument('--methods', default=','.join(METHODS), help='comma-separated subset of the methods')
    ap.add_argument('--dry_run', action='store_true', help='a tiny random base, 4 steps per run, in a temp dir')
    ARGS = ap.parse_args()
    METHODS = {m: METHODS[m] for m in ARGS.methods.split(',')}  # a KeyError names an unknown method
    ARGS.extra, ARGS.restart_extra = [], []
    if ARGS.dry_run:
        work = tempfile.mkdtemp(prefix='table2_')
        ARGS.extra = ['--max_iters=4', '--eval_interval=2', '--warmup_iters=1', '--booster_steps=2',
                      '--log_interval=1']
        ARGS.restart_extra = ['--merge_every=2', '--restart_warmup=1']
        ARGS.base, ARGS.data = f'{work}/base', f'{work}/data'
        ARGS.work, ARGS.results = f'{work}/runs', f'{work}/results'
    else:
        ARGS.base, ARGS.data = 'out/mini_base', 'data/memory'
        ARGS.work = 'out/table2'
        ARGS.results = 'out/table2/results' if ARGS.stage == 'main' else 'assets/mini_table2'
    main(ARGS)
