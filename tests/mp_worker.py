"""A minimal job member for the multi-process tests: joins the job, then all-gathers across processes in a loop.

Run by ``launch/local.py`` (``python tests/mp_worker.py [STEPS]``); prints ``step N`` lines so a test knows the
collectives run before it kills a peer. ``STEPS`` defaults to forever. ``hybrid-mesh`` instead prints the owners
of a hybrid ICI/DCN mesh and exits.
"""

import sys
import time

from layerflow_jax import distributed

distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

if sys.argv[1:] == [
  "hybrid-mesh"
]:  # print which process owns each device of a data=2 (over DCN) × fsdp=2 mesh
  from layerflow_jax import sharding as shd

  mesh = shd.make_mesh({"data": 2, "fsdp": -1, "dcn": {"data": 2}})
  owners = [[d.process_index for d in row] for row in mesh.devices.reshape(2, -1)]
  print(f"mesh {dict(mesh.shape)} owners {owners}", flush=True)
  sys.exit(0)

steps = int(sys.argv[1]) if len(sys.argv) > 1 else None
i = 0
while steps is None or i < steps:
  got = multihost_utils.process_allgather(jnp.full((2,), float(jax.process_index())))
  i += 1
  print(
    f"step {i} of process {jax.process_index()}/{jax.process_count()}: {got.reshape(-1).tolist()}", flush=True
  )
  time.sleep(0.2)
