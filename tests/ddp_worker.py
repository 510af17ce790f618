"""torchrun target for the DDP tests: runs train.py as __main__ with this process's argv, writes the rank's pid
before and its whole model state (raw_model.state_dict(), adapters included) after, so tests compare every rank."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
out_dir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--out_dir='))
rank = int(os.environ['RANK'])
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, f'pid{rank}'), 'w') as f:
    f.write(str(os.getpid()))
path = os.path.join(ROOT, 'train.py')
g = {'__name__': '__main__', '__file__': path}
try:
    exec(compile(open(path).read(), path, 'exec'), g)
finally:
    if 'raw_model' in g:
        torch.save(g['raw_model'].state_dict(), os.path.join(out_dir, f'rank{rank}.pt'))
