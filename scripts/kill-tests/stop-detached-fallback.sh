#!/usr/bin/env bash
# stop-detached with agentd told to use no cgroup (--no-cgroup), on any host: the
# process-tree fallback must still end the setsid'd and the double-forked
# grandchildren; the environment-scrubbed double fork is its documented escape.
KT_NAME=stop-detached-fallback KT_CONTAINMENT=tree KT_AGENTD_EXTRA=--no-cgroup \
    exec "$(dirname "$0")/stop-detached.sh"
