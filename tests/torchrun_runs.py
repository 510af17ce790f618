"""Several train.py runs in one torchrun launch, one after another (each launch costs seconds of startup):
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_runs.py runs.json
runs.json: a list of [args, out_dir]; each run's stdout goes to out_dir/stdout.<rank>.txt."""
import contextlib
import json
import os
import runpy
import socket
import sys

from torch.distributed import TCPStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train.py imports its neighbours
# each run's process group rendezvous on a store of its own, hosted by rank 0 on a fresh port: re-initialising on
# torchrun's store would meet the previous run's keys (a rank may read a dead peer's address and hang)
agent = TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False)
for i, (args, out_dir) in enumerate(json.load(open(sys.argv[1]))):
    if os.environ['RANK'] == '0':
        with socket.socket() as s:
            s.bind((os.environ['MASTER_ADDR'], 0))
            agent.set(f'torchrun_runs/{i}', str(s.getsockname()[1]))
    os.environ.update(MASTER_PORT=agent.get(f'torchrun_runs/{i}').decode(), TORCHELASTIC_USE_AGENT_STORE='False')
    os.makedirs(out_dir, exist_ok=True)
    sys.argv = ['train.py', *args, f'--out_dir={out_dir}']
    with open(os.path.join(out_dir, f"stdout.{os.environ['RANK']}.txt"), 'a') as f, contextlib.redirect_stdout(f):
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')  # inits and destroys the process group
