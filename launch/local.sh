#!/usr/bin/env bash
# Local workers on this machine through torch's elastic agent.
#   launch/local.sh configs/quickstart.yaml 2 [key=value ...]
set -euo pipefail
config=${1:?usage: local.sh CONFIG NPROC [key=value ...]}; nproc=${2:?usage: local.sh CONFIG NPROC}
shift 2
exec dist-train launch "$config" --nproc "$nproc" "$@"
