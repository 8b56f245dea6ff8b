#!/usr/bin/env bash
# mpiexec (Open MPI or MPICH). MPI is used for rendezvous only: rank 0 broadcasts a routable address
# and a free port with mpi4py, then training runs over gloo (CPU) or nccl (GPU).
#   NP=2 launch/mpirun.sh configs/quickstart.yaml [key=value ...]
set -euo pipefail
config=${1:?usage: mpirun.sh CONFIG [key=value ...]}; shift
exec mpiexec -n "${NP:-2}" python -m dist_train run "$config" "$@"
