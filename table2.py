"""
MoRA Table 2 in miniature on a CPU (issue 16): uuid memorisation at the paper's capacity pressure
(config/_mini.py) on a ~1M-parameter byte-level LLaMA that this script pretrains itself. Each run is
the real train.py on a config/mini_* file, --parallel side by side with one thread each; each run's
metrics.jsonl and config.json are copied to the results dir (assets/mini_table2/<run>/).
$ python table2.py                # end to end: text data, the base (config/mini_base.py) + merge,
                                  # pairs, the r8 rows at their config's LR (the sweep's best)
$ python table2.py --stage=sweep  # protocol step 1: each method over the LR grid, seed 1
$ python table2.py --stage=seeds  # step 2: seeds 1-3 at each best LR; LoRA/MoRA r8 at N/2 and 2N
$ python table2.py --stage=table  # the tables from assets/mini_table2/, no training
$ python table2.py --dry_run      # the orchestration on a tiny random base in a temp dir, seconds
Finished runs are skipped, so a stage cut by --budget_s continues where it stopped when rerun.
Protocol (fixed before the sweep ran): best LR = the highest mean char acc over the evals after
step 0, seed 1 (equal to 0.1 pt: the lower final val loss); a best at an edge of the grid adds the
next x3 point beyond it, up to 3 times; then seeds 1-3 (of the pairs and of the init) at that LR.
A separate script, not bench.py: this is an experiment with its own data, base and protocol, and
bench.py (speed and memory, ~500 lines) already holds six benchmarks; the runner is ~30 lines.
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
           'mora_r8_share': ('mora_share', 40), 'remora_r8': ('remora', 40),
           'xgblora': ('xgblora', 40), 'lora_r32': ('lora_r32', 158), 'mora_r32': ('mora_r32', 158),
           'lora_r1': ('lora_r1', 5), 'mora_r1': ('mora_r1', 5)}
HEADLINE = ('full', 'lora_r8', 'mora_r8_rope', 'mora_r8_share', 'remora_r8', 'xgblora')  # main
PRESSURE = ('lora_r8', 'mora_r8_rope')  # also at N/2 and 2N, at the best LR of N
SEEDS = (1, 2, 3)


def run_name(method, lr, seed=1, n=None):
    return f"{method}_lr{lr:.0e}_s{seed}" + (f"_n{n}" if n else '')


def train_cmd(method, lr, seed, n, args):
    config, n0 = METHODS[method]
    data = os.path.join(args.data, f"byte_n{n or n0}_s{seed}")
    data = data if os.path.isabs(data) else os.path.relpath(data, 'data')  # data/<dataset>
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
    """The protocol's criterion: mean char acc % over the evals after step 0 (to 0.1 pt), then the
    lower final val loss."""
    later = [r['char_acc'] for r in rows if r['iter'] > 0]
    return round(100 * sum(later) / len(later), 1), -rows[-1]['val_loss']


def sweep(results, method):
    """(best LR or None, the LRs still to run, {LR: score}): the grid, extended by x3 beyond an edge
    that wins, up to 3 times."""
    grid = list(GRID)
    while True:
        done = {lr: evals(results, run_name(method, lr)) for lr in grid}
        scores = {lr: score(rows) for lr, rows in done.items() if rows}
        if len(scores) < len(grid):
            return None, [lr for lr in grid if lr not in scores], scores
        best = max(grid, key=scores.get)
        if len(grid) == len(GRID) + 3 or best not in (grid[0], grid[-1]):
            return best, [], scores
        grid = [grid[0] / 3, *grid] if best == grid[0] else [*grid, grid[-1] * 3]
        grid = [float(f"{lr:.0e}") for lr in grid]  # 0.03 * 3 = 0.09000000000000001 -> 0.09


def best_lr(results, method):
    return sweep(results, method)[:2]


def config_lr(method):
    own = {}
    exec(open(f'config/mini_{METHODS[method][0]}.py').read(), own)
    return own['learning_rate']


def run_all(jobs, args):
    """Run [(name, cmd)], --parallel at a time with --threads each, skipping finished ones; start
    none after --budget_s. True when all have finished."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads), 'PYTHONUNBUFFERED': '1'}
    todo = [(n, c) for n, c in jobs if evals(args.results, n) is None]
    running, stop, t0 = [], args.t0 + args.budget_s, time.time()
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done, {len(todo)} to run", flush=True)
    while todo or running:
        while todo and len(running) < args.parallel and time.time() < stop:
            name, cmd = todo.pop(0)
            out = os.path.join(args.work, name)
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            log = open(os.path.join(out, 'train.log'), 'w')
            proc = subprocess.Popen([*cmd, f'--out_dir={out}'], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((name, out, proc))
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
            rows = evals(args.results, name)
            acc = ' '.join(f"{r['iter']}:{100 * r['char_acc']:.1f}" for r in rows)
            print(f"  {time.time() - t0:5.0f} s  {name:>28}  char acc % {acc}", flush=True)
    if todo:
        print(f"--budget_s spent: {len(todo)} runs left; the same command again continues")
    return not todo


def setup(args, pairs):
    """Text data, the base (pretrained, merged to an HF dir), the pair datasets (N, seed) asked."""
    py = sys.executable
    if args.dry_run:  # a tiny random base stands in for the pretrained one
        import torch
        from model import LLaMA, ModelConfig
        torch.manual_seed(0)
        LLaMA(ModelConfig(vocab_size=258, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=64, intermediate_size=96)).save_pretrained(f'{args.base}/hf')
    elif not os.path.exists(f'{args.base}/hf/config.json'):
        t0 = time.time()
        subprocess.run([py, 'data/text/prepare.py'], check=True)
        subprocess.run([py, 'train.py', 'config/mini_base.py', f'--out_dir={args.base}'],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([py, 'merge.py', f'--out_dir={args.base}', f'--merged_dir={args.base}/hf'],
                       check=True)
        print(f"base pretrained and merged in {time.time() - t0:.0f} s: {args.base}/hf")
    for n, seed in sorted(pairs):
        subprocess.run([py, 'data/memory/prepare.py', '--tokenizer=byte', f'--n_pairs={n}',
                        f'--seed={seed}', f'--out_dir={args.data}/byte_n{n}_s{seed}'],
                       check=True, capture_output=True)


def table(results, rows, title):
    """rows: [(label, [run names])] -> a Markdown table of char acc % at each eval, mean ± std over
    the runs found."""
    print(f"\n{title}")
    header = False
    for label, names in rows:
        found = [e for e in (evals(results, n) for n in names) if e]
        if not found:
            print(f"| {label} | not run |")
            continue
        if not header:
            steps = [r['iter'] for r in found[0]]
            print('| method | runs | ' + ' | '.join(f"@{s}" for s in steps) + ' |')
            print('|---' * (len(steps) + 2) + '|')
            header = True
        cells = []
        for i in range(len(found[0])):
            accs = [100 * e[i]['char_acc'] for e in found]
            sd = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ''
            cells.append(f"{statistics.mean(accs):.1f}{sd}")
        print(f"| {label} | {len(found)} | " + ' | '.join(cells) + ' |')


def sweep_table(res):
    print("\nthe sweep: mean char acc % over the evals after step 0, seed 1, per LR (* = best)")
    for m in METHODS:
        lr, _, scores = sweep(res, m)
        cells = '  '.join(f"{x:.0e}: {s[0]:4.1f}{'*' * (x == lr)}"
                          for x, s in sorted(scores.items()))
        print(f"{m:>14}  {cells}")


def main(args):
    res, ns = args.results, {n for _, n in METHODS.values()}
    if args.stage == 'main':
        methods = list(METHODS) if args.methods else HEADLINE
        jobs = [(run_name(m, config_lr(m)), train_cmd(m, config_lr(m), 1, None, args))
                for m in methods]
        setup(args, {(METHODS[m][1], 1) for m in methods})
        run_all(jobs, args)
        table(res, [(m, [run_name(m, config_lr(m))]) for m in methods],
              "char acc %, each config's LR (the sweep's best), seed 1")
        print(f"total {time.time() - args.t0:.0f} s")
    elif args.stage == 'sweep':
        setup(args, {(n, 1) for n in ns})
        while True:  # rounds: the grid, then the edge points that the finished runs call for
            jobs = [(run_name(m, lr), train_cmd(m, lr, 1, None, args))
                    for m in METHODS for lr in sweep(res, m)[1]]
            if not jobs or not run_all(jobs, args):
                break
        sweep_table(res)
    else:  # seeds, table
        best = {m: best_lr(res, m)[0] for m in METHODS}
        if None in best.values():  # the rest go ahead; the same command continues them later
            left = ', '.join(m for m, lr in best.items() if not lr)
            print(f"sweep not finished, left out: {left}")
        best = {m: lr for m, lr in best.items() if lr}
        pressure = [(m, n) for m in PRESSURE if m in best
                    for n in (METHODS[m][1] // 2, METHODS[m][1] * 2)]
        jobs = [(run_name(m, best[m], s), train_cmd(m, best[m], s, None, args))
                for m in best for s in SEEDS]
        jobs += [(run_name(m, best[m], s, n), train_cmd(m, best[m], s, n, args))
                 for m, n in pressure for s in SEEDS]
        r8 = [j for j in jobs if '_r32_' not in j[0] and '_r1_' not in j[0]]
        jobs = r8 + [j for j in jobs if j not in r8]  # the r8 rows and their pressure first
        sweep_table(res)
        if args.stage == 'seeds':
            setup(args, {(n, s) for n in ns | {n for _, n in pressure} for s in SEEDS})
            run_all(jobs, args)
        table(res, [(f"{m} LR {best[m]:.0e}", [run_name(m, best[m], s) for s in SEEDS])
                    for m in best], "char acc %, each method at its best LR, seeds 1-3")
        table(res, [(f"{m} N={n}", [run_name(m, best[m], s, n) for s in SEEDS])
                    for m, n in pressure], "pressure: N/2 and 2N at the best LR of N")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--stage', choices=['main', 'sweep', 'seeds', 'table'], default='main')
    ap.add_argument('--parallel', type=int, default=2, help='runs side by side')
    ap.add_argument('--threads', type=int, default=1, help='OMP threads per run')
    ap.add_argument('--budget_s', type=float, default=1e9, help='start no run after this many s')
    ap.add_argument('--methods', default='', help='a comma-separated subset (default: all; the '
                    'main stage: the r8 rows)')
    ap.add_argument('--dry_run', action='store_true', help='a tiny random base, 4 steps per run')
    ARGS = ap.parse_args()
    ARGS.t0 = time.time()
    if ARGS.methods:
        METHODS = {m: METHODS[m] for m in ARGS.methods.split(',')}  # KeyError: an unknown one
    ARGS.extra, ARGS.restart_extra = [], []
    if ARGS.dry_run:
        work = tempfile.mkdtemp(prefix='table2_')
        ARGS.extra = ['--max_iters=4', '--eval_interval=2', '--warmup_iters=1', '--booster_steps=2',
                      '--log_interval=1']
        ARGS.restart_extra = ['--merge_every=2', '--restart_warmup=1']
        ARGS.base, ARGS.data = f'{work}/base', f'{work}/data'
        ARGS.work, ARGS.results = f'{work}/runs', f'{work}/results'
    else:
        ARGS.base, ARGS.data, ARGS.work = 'out/mini_base', 'data/memory', 'out/table2'
        ARGS.results = 'out/table2/results' if ARGS.stage == 'main' else 'assets/mini_table2'
    main(ARGS)
